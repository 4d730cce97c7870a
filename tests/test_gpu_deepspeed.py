"""DeepSpeed on a GPU (``pytest -m gpu``): fp16 with dynamic loss scaling and overflow skips,
which DeepSpeed's CPU accelerator refuses. One rank, NCCL, the compiled Triton kernel."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

ds = pytest.importorskip("deepspeed")

import ds_ranks  # noqa: E402
from distributed import run_ranks  # noqa: E402


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp16_loss_scaling_matches_deepspeed_adamw(stage):
    (ours, ref), = run_ranks(ds_ranks.parity, stage, "fp16", False, 8, world=1, backend="nccl")
    assert ours["basic"] == "TiedAdamW"
    # initial scale 2**8 with a 2-step window: both skip the same overflowing steps
    assert ours["skipped"] == ref["skipped"]
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]),
                               rtol=2 ** -10, atol=1e-4)
    for a, b in zip(ours["params"], ref["params"]):
        torch.testing.assert_close(a, b, rtol=2 ** -10, atol=1e-4)
