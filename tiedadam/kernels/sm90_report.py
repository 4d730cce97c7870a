"""Compile every kernel variant for sm_90 without a GPU and read back what the hardware will run:
registers, spill bytes, and the width of global loads/stores in the SASS.

Used by ``perf/kernel_report.py`` and ``tests/test_kernel_report.py``. Must run in a process
*without* ``TRITON_INTERPRET=1`` (the interpreter replaces what ``@triton.jit`` returns).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import triton

from . import tied_adamw as K

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.float64: "*fp64"}


@dataclass
class VariantReport:
    name: str
    param: str
    state: str
    master: bool
    scale: bool
    flat: bool
    state_sr: bool
    param_sr: bool
    registers: int
    spill_bytes: int
    # SASS opcode -> count, e.g. {"LDG.E.128": 8, "STG.E.128": 6}
    loads: dict
    stores: dict

    @property
    def widest_load(self) -> int:
        return max((_bits(op) for op in self.loads), default=0)

    @property
    def widest_store(self) -> int:
        return max((_bits(op) for op in self.stores), default=0)

    def as_dict(self) -> dict:
        return {**asdict(self), "widest_load": self.widest_load, "widest_store": self.widest_store}


def _bits(op: str) -> int:
    m = re.search(r"\.(128|64|U16|S16|U8|S8)$", op)
    if m is None:
        return 32
    return {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}[m.group(1)]


def variants():
    """The specialisations the optimizer launches (table and flat forms of each mode)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    modes = [  # param, state, master, state SR, param SR
        (fp32, fp32, False, False, False),
        (bf16, fp32, False, False, False),
        (fp16, fp32, False, False, False),
        (bf16, fp32, True, False, False),    # master weights
        (fp16, fp32, True, False, False),
        (fp32, bf16, False, True, False),    # bf16 states, stochastic rounding
        (fp32, bf16, False, False, False),   # bf16 states, round to nearest (ablation)
        (bf16, bf16, False, True, True),     # pure bf16 with stochastic rounding
        (bf16, bf16, True, True, False),     # master weights + bf16 states
        (torch.float64, torch.float64, False, False, False),  # fp64 params: fp64 state, math
    ]
    for param, state, master, ssr, psr in modes:
        for flat in (False, True):
            yield dict(param=param, state=state, master=master, scale=False, flat=flat,
                       state_sr=ssr, param_sr=psr)
    yield dict(param=fp16, state=fp32, master=False, scale=True, flat=False,
               state_sr=False, param_sr=False)
    yield dict(param=fp32, state=fp32, master=False, scale=False, flat=False,
               state_sr=False, param_sr=False, telemetry=True)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_variant(param, state, master, scale, flat, state_sr=False, param_sr=False,
                    telemetry=False, arch: int = 90) -> VariantReport:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"addr_ptr": "*i64", "meta_ptr": "*i64", "chunk_ptr": "*i64", "n_tensors": "i32",
           "hyper_ptr": "*fp64", "scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
           "flat_p": _PTR[param], "flat_g": _PTR[param], "flat_m": _PTR[state],
           "flat_v": _PTR[state], "flat_w": "*fp32", "flat_step": "*fp32",
           "flat_numel": "i64", "flat_aligned": "i32", "flat_group": "i32",
           "seed": "i64", "tele_ptr": "*fp32", "snr_threshold": "fp32"}
    consts = dict(PARAM=K._TL_DTYPES[param], STATE=K._TL_DTYPES[state], HAS_MASTER=master,
                  HAS_SCALE=scale, STATE_SR=state_sr, PARAM_SR=param_sr, TELEMETRY=telemetry,
                  FLAT=flat,
                  CHUNK=K.CHUNK, BLOCK=K.block_for(param, state))
    sig.update({k: "constexpr" for k in consts})
    # Direct tensor arguments are specialised as 16-byte aligned, as Triton does at launch.
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig)
             if sig[k].startswith("*")}
    src = ASTSource(fn=K._tied_adamw_kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": K.NUM_WARPS,
                                       "enable_fp_fusion": K.ENABLE_FP_FUSION})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
    ops = Counter(re.findall(r"\b((?:LDG|STG)\.E[\w.]*)", sass))
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.float64: "fp64"}
    name = "-".join([f"p{short[param]}", f"s{short[state]}"] + (["master"] if master else [])
                    + (["sr"] if state_sr else []) + (["psr"] if param_sr else [])
                    + (["scale"] if scale else []) + (["telemetry"] if telemetry else [])
                    + (["flat"] if flat else ["table"]))
    return VariantReport(
        name=name, param=short[param], state=short[state], master=master, scale=scale,
        flat=flat, state_sr=state_sr, param_sr=param_sr, registers=int(re.search(r"REG:(\d+)", usage).group(1)),
        spill_bytes=int(re.search(r"LOCAL:(\d+)", usage).group(1)),
        loads={k: v for k, v in ops.items() if k.startswith("LDG")},
        stores={k: v for k, v in ops.items() if k.startswith("STG")})


def report(arch: int = 90) -> list[VariantReport]:
    return [compile_variant(**v, arch=arch) for v in variants()]
