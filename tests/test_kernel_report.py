"""Compile every kernel variant for sm_90 (no GPU needed) and check the structure of its hot
loop (perf/sass.py, Note [hot loop]): <= 64 registers (>= 1024 threads per SM at 4 warps), no
spills, no shared-memory instructions in the loop, exactly one global access per role at
the width its layout gives (fp32 roles 128-bit, bf16/fp16 roles 64-bit, fp64 128-bit, ratio8's
int8 codes 32-bit), and a
barrier before the step-count ticket (Note [ticket ordering] in the kernel).
Structure, not timings: the instruction counts are reported, not asserted.

The compile runs in a child process: under TRITON_INTERPRET=1 (set for the other tests)
@triton.jit returns an interpreted function that cannot be compiled (docs/design.md §6)."""

from __future__ import annotations

import json

import pytest

BITS = {"fp32": 128, "bf16": 64, "fp16": 64, "fp64": 128}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from test_perf_scripts import run_script  # default --out, checkout left as it was
    out = tmp_path_factory.mktemp("kr")
    stdout = run_script("kernel_report.py", "--dump", str(out / "cubins"), tmp_path=out)
    with open(out / "kernel_report.json") as f:
        return json.load(f), stdout, out


def test_every_variant_meets_the_structural_targets(report):
    data, text, _ = report
    assert len(data["variants"]) >= 20, text
    for v in data["variants"]:
        assert v["registers"] <= 64 and v["threads_per_sm"] >= 1024, (v["name"], v["registers"])
        assert v["spill_bytes"] == 0, v["name"]
        assert v["loop"]["shared"] == {}, (v["name"], v["loop"]["shared"])
        assert v["widths_as_laid_out"], (v["name"], v["loop"])
        assert v["ticket_after_barrier"], v["name"]  # Note [ticket ordering]
        assert v["structural_misses"] == [], v["name"]


def test_each_role_moves_at_its_layouts_width(report):
    data, _, _ = report
    for v in data["variants"]:
        roles = v["loop"]["role_bits"]
        assert roles["grad"] == BITS[v["param"]] and roles["param"] == BITS[v["param"]], v["name"]
        if v["state"] == "ratio8":  # int8 codes and bf16 v, 4 elements a thread
            assert (roles["exp_avg"], roles["exp_avg_sq"]) == (32, 64), v["name"]
        else:
            assert roles["exp_avg"] == roles["exp_avg_sq"] == BITS[v["state"]], v["name"]
        if v["master"]:
            assert roles["master"] == 128, v["name"]
        # The loop really does that: each load/store opcode count matches the roles' widths.
        widths = {128: "LDG.E.128", 64: "LDG.E.64", 32: "LDG.E"}
        want = {}
        for r, b in roles.items():
            if not (r == "param" and v["master"]):  # the master, not the param, is loaded
                want[widths[b]] = want.get(widths[b], 0) + 1
        unroll = round(v["loop"]["elements_per_thread"] / (2 if v["param"] == "fp64" else 4))
        assert {k: n // unroll for k, n in v["loop"]["loads"].items()} == want, v["name"]


def test_cubins_are_dumped_under_the_report_names(report):
    data, _, out = report
    names = {p.name for p in (out / "cubins").iterdir()}
    assert names == {v["name"] + ".cubin" for v in data["variants"]}
    assert "pfp32-sfp32-table.cubin" in names and "pbf16-sfp32-master-flat.cubin" in names
