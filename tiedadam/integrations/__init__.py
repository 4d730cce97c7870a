"""Framework integrations (DeepSpeed, FSDP): registration and sharding rules, no optimizer math."""
