"""Compile every kernel variant for sm_90 (no GPU needed) and check the aligned full-chunk path:
every tensor it touches is moved with 128-bit accesses, and nothing spills.

The compile runs in a child process: under TRITON_INTERPRET=1 (set for the other tests)
@triton.jit returns an interpreted function that cannot be compiled (docs/design.md §6)."""

from __future__ import annotations

import json

import pytest

ELEM = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from test_perf_scripts import run_script  # default --out, checkout left as it was
    out = tmp_path_factory.mktemp("kr")
    stdout = run_script("kernel_report.py", tmp_path=out)
    with open(out / "kernel_report.json") as f:
        return json.load(f), stdout


def expected_128(v):
    """128-bit accesses per thread per BLOCK on the full path, from the bytes each role moves."""
    # elements per thread per block: 16 bytes of the narrowest stored dtype (Note [block size])
    per_thread = 16 // min(ELEM[v["param"]], ELEM[v["state"]])
    p_vec = per_thread * ELEM[v["param"]] // 16
    s_vec = per_thread * ELEM[v["state"]] // 16
    w_vec = per_thread * 4 // 16
    loads = p_vec + 2 * s_vec + (w_vec if v["master"] else p_vec)  # grad, m, v, master|param
    stores = 2 * s_vec + p_vec + (w_vec if v["master"] else 0)
    stores += p_vec if v["scale"] else 0  # AMP: the unscaled grad is written back
    return loads, stores


def test_every_variant_vectorised_without_spills(report):
    data, text = report
    assert len(data["variants"]) >= 10, text
    for v in data["variants"]:
        assert v["spill_bytes"] == 0, v
        assert v["widest_load"] == 128 and v["widest_store"] == 128, v
        loads, stores = expected_128(v)
        assert v["loads"].get("LDG.E.128", 0) == loads, (v["name"], v["loads"], loads)
        assert v["stores"].get("STG.E.128", 0) == stores, (v["name"], v["stores"], stores)
