"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs (docs/design.md §6),
so it is set here, before tiedadam is imported by any test module. Tests that need the real
compiler (the sm_90 report) run it in a child process without the variable."""

import os

# perf/gpu_suite.sh sets TIEDADAM_TEST_GPU=1 and runs `pytest -m gpu`: real compiled kernels.
GPU_RUN = os.environ.get("TIEDADAM_TEST_GPU") == "1"
if not GPU_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The compiled CPU step is tested in tests/test_cpu_step.py; elsewhere CPU tensors take the
# torch-op path, so that test processes do not each compile every mode (tens of seconds).
os.environ.setdefault("TIEDADAM_CPU_COMPILE", "0")
# The native CPU step likewise, in tests/test_native_cpu.py (one build per machine, cached).
os.environ.setdefault("TIEDADAM_CPU_NATIVE", "0")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # silence Triton 3.9's notice; we pass it

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU"
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        reason = "GPU tests need compiled kernels: run with TIEDADAM_TEST_GPU=1 (perf/gpu_suite.sh)"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random data every run (reported on failure), not a fixed seed.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


@pytest.fixture(params=["fast", "full"])
def guard_path(request, monkeypatch):
    """A cached-plan case run on the guard's fast check and on its full comparison (Notes
    [guard], [guard fast path] in tiedadam/optim/guard.py)."""
    from tiedadam.optim import guard
    if request.param == "full":
        monkeypatch.setattr(guard, "USE_FAST_GUARD", False)
    elif not guard.USE_FAST_GUARD:
        pytest.skip("this torch has no torch._C._dynamo.guards.TensorGuards / dict_version")
    return request.param
