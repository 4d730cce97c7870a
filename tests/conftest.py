"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs (DESIGN.md §4),
so it is set here, before tiedadam is imported by any test module. Tests that need the real
compiler (the sm_90 report) run it in a child process without the variable."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # silence Triton 3.9's notice; we pass it

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random data every run (reported on failure), not a fixed seed.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed
