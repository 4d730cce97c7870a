from .tied_adamw import TiedAdamW

__all__ = ["TiedAdamW"]
