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
    """128-bit accesses per thread per BLOCK on the full path, from the bytes each role moves:
    every thread holds 4 elements per step (2 for fp64; Note [block size]), so a role moves in
    one 128-bit access when it is 4-byte (fp32) or 8-byte (fp64), one 64-bit access when bf16."""
    per_thread = min(4, 16 // max(ELEM[v["param"]], ELEM[v["state"]]))
    wide = lambda dtype: int(per_thread * ELEM[dtype] == 16)  # noqa: E731
    p, s, w = wide(v["param"]), wide(v["state"]), wide("fp32")
    loads = p + 2 * s + (w if v["master"] else p)  # grad, m, v, master | param
    stores = 2 * s + p + (w if v["master"] else 0) + (p if v["scale"] else 0)  # + unscaled grad
    return loads, stores


def test_every_variant_vectorised_without_spills(report):
    data, text = report
    assert len(data["variants"]) >= 10, text
    for v in data["variants"]:
        assert v["spill_bytes"] == 0, v
        loads, stores = expected_128(v)
        widest = 128 if loads else 64  # pure bf16: every role is 64-bit
        assert v["widest_load"] == widest and v["widest_store"] == widest, v
        assert v["loads"].get("LDG.E.128", 0) == loads, (v["name"], v["loads"], loads)
        assert v["stores"].get("STG.E.128", 0) == stores, (v["name"], v["stores"], stores)
        if loads < 4:  # some role is bf16/fp16: it must move in 64-bit accesses, not 16-bit
            assert v["loads"].get("LDG.E.64", 0) >= 1 and v["stores"].get("STG.E.64", 0) >= 1, v
