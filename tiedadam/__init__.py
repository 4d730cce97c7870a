"""tiedadam: multi-tensor AdamW with tied betas (beta1 = beta2 = beta) on Triton kernels."""

from .integrations import deepspeed as _deepspeed
from .optim import TiedAdamW
from .optim.checkpoint import dequantize_state_dict

__all__ = ["TiedAdamW", "dequantize_state_dict"]
__version__ = "0.1.0"

# `"type": "TiedAdamW"` in a DeepSpeed config (Note [deepspeed registration]); imports nothing
# from DeepSpeed until DeepSpeed itself is imported.
_deepspeed.register()
