"""Trained through the real `deepspeed` launcher by tests/test_deepspeed.py: a config that names
"TiedAdamW", nothing else added, after `import tiedadam`."""

import json
import sys

import deepspeed
import torch

import tiedadam  # noqa: F401  publishes "TiedAdamW" for the config below
import ds_ranks

if __name__ == "__main__":
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = ds_ranks.Net()
    cfg = ds_ranks.ds_config(2, "fp32")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=ds_ranks.groups(model),
                                           config=cfg)
    losses = []
    for x, y in ds_ranks.batches(rank, 3):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    print("RESULT " + json.dumps({"rank": rank, "optimizer": type(engine.optimizer.optimizer).__name__,
                                  "losses": losses}), flush=True)
    engine.destroy()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.exit(0)
