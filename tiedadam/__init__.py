"""tiedadam: multi-tensor AdamW with tied betas (beta1 = beta2 = beta) on Triton kernels."""

from .optim import TiedAdamW

__all__ = ["TiedAdamW"]
__version__ = "0.1.0"
