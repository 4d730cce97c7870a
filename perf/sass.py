"""Compile TiedAdamW kernel variants for sm_90 without a GPU and read the SASS the hardware would
run: registers, spills, and the kernel's hot loop (a development tool, used by
``perf/kernel_report.py`` and ``tests/test_kernel_report.py``; not part of the runtime package).

Must run in a process *without* ``TRITON_INTERPRET=1``: the interpreter replaces what
``@triton.jit`` returns, and an interpreted function cannot be compiled.

Note [hot loop]
---------------
A program spends its time in the loop over whole BLOCKs of an aligned chunk (Note [loop bounds]
in ``tiedadam/kernels/tied_adamw.py``). In the SASS a loop is a backward branch; the hot loop is
the one whose body moves the most bytes per global access (the hinted, unmasked one: the masked
loop of a tail or misaligned view uses narrower, predicated accesses). Its *fast path* is what a
thread executes per iteration when no element needs IEEE division's or square root's slow path:
starting at the loop head, a conditional forward branch that jumps over a ``CALL`` (the
subnormal/special-case slow path) is taken, an unconditional forward branch is followed,
everything else falls through, up to the backward branch. Instructions per element = fast-path
instructions / elements a thread updates per iteration; the latter is read from the loop's own
loads (their bytes over the bytes one element loads), so unrolling is accounted for.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import triton

from tiedadam.kernels import tied_adamw as K

# int8 as the state dtype is ratio8: int8 exp_avg codes, bf16 exp_avg_sq (Note [ratio8 kernel]
# in tiedadam/kernels/tied_adamw.py).
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64", torch.int8: "ratio8"}
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
        torch.float64: "*fp64", torch.int8: "*i8"}


def state_bytes(state: torch.dtype) -> tuple[int, int]:
    """(exp_avg, exp_avg_sq) bytes per element."""
    if state == torch.int8:
        return 1, 2
    return (BYTES[SHORT[state]],) * 2
# The targets for every variant (perf/README.md): registers for >= 1024 threads per SM
# at 4 warps, no spills, no shared memory in the hot loop, and a budget of SASS instructions
# per element on the loop's fast path.
MAX_REGISTERS = 64
MAX_INSTR_PER_ELEMENT = 60
MAX_INSTR_PER_ELEMENT_SR = 80  # variants with stochastic rounding (Philox in the loop)

# Shared-memory traffic and barriers: none may appear in the hot loop (Note [block size]).
SHARED_OPS = ("LDS", "STS", "LDSM", "STSM", "BAR", "ATOMS", "RED.E.ADD.F32.FTZ.RN.STRONG.SM")


def variants():
    """The specialisations the optimizer launches (table and flat forms of each mode)."""
    bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    i8 = torch.int8  # ratio8
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
        (fp64, fp64, False, False, False),   # fp64 params: fp64 state and math
        (fp32, i8, False, True, False),      # ratio8 moments, stochastic rounding
        (fp32, i8, False, False, False),     # ratio8, round to nearest
        (bf16, i8, True, True, False),       # ratio8 with master weights
        (bf16, i8, False, True, True),       # pure bf16 params, ratio8 moments
    ]
    for param, state, master, ssr, psr in modes:
        for flat in (False, True):
            yield dict(param=param, state=state, master=master, scale=False, flat=flat,
                       state_sr=ssr, param_sr=psr)
    for flat in (False, True):
        yield dict(param=fp16, state=fp32, master=False, scale=True, flat=flat,
                   state_sr=False, param_sr=False)
        yield dict(param=fp32, state=fp32, master=False, scale=False, flat=flat,
                   state_sr=False, param_sr=False, telemetry=True)
        # max_grad_norm: the clip coefficient read from device memory (Note [clipping]),
        # alone and after AMP's unscaling
        yield dict(param=fp32, state=fp32, master=False, scale=False, flat=flat,
                   state_sr=False, param_sr=False, clip=True)
        yield dict(param=fp16, state=fp32, master=False, scale=True, flat=flat,
                   state_sr=False, param_sr=False, clip=True)


def variant_name(param, state, master, scale, flat, state_sr=False, param_sr=False,
                 telemetry=False, clip=False) -> str:
    """``p<param>-s<state>[-master][-sr][-psr][-scale][-clip][-telemetry]-<table|flat>``."""
    return "-".join([f"p{SHORT[param]}", f"s{SHORT[state]}"] + (["master"] if master else [])
                    + (["sr"] if state_sr else []) + (["psr"] if param_sr else [])
                    + (["scale"] if scale else []) + (["clip"] if clip else [])
                    + (["telemetry"] if telemetry else [])
                    + (["flat"] if flat else ["table"]))


def elements_per_thread(spec: dict) -> int:
    """Elements each thread holds per BLOCK, as the kernel lays them out (Note [block size])."""
    return K.block_for(spec["param"], spec["state"]) // (32 * K.NUM_WARPS)


def roles(param, state, master, scale, **_) -> dict:
    """Each global role the hot loop touches -> (element bytes, loaded?, stored?)."""
    p, (sm, sv) = BYTES[SHORT[param]], state_bytes(state)
    r = {"grad": (p, True, scale), "exp_avg": (sm, True, True), "exp_avg_sq": (sv, True, True),
         "param": (p, not master, True)}
    if master:
        r["master"] = (4, True, True)
    return r


def compile_cubin(param, state, master, scale, flat, state_sr=False, param_sr=False,
                  telemetry=False, clip=False, arch: int = 90) -> bytes:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"addr_ptr": "*i64", "meta_ptr": "*i64", "chunk_ptr": "*i64", "n_tensors": "i32",
           "hyper_ptr": "*fp64", "scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
           "clip_ptr": "*fp32",
           "flat_p": _PTR[param], "flat_g": _PTR[param], "flat_m": _PTR[state],
           "flat_v": "*bf16" if state == torch.int8 else _PTR[state], "flat_w": "*fp32", "flat_step": "*fp32",
           "flat_numel": "i64", "flat_aligned": "i32", "flat_group": "i32",
           "flat_key": "i64", "tele_ptr": "*fp32", "snr_threshold": "fp32",
           "ticket_ptr": "*i32"}
    consts = dict(PARAM=K._TL_DTYPES[param], STATE=K._TL_DTYPES[state], HAS_MASTER=master,
                  HAS_SCALE=scale, CLIP=clip, STATE_SR=state_sr, PARAM_SR=param_sr, TELEMETRY=telemetry,
                  FLAT=flat, CHUNK=K.CHUNK, BLOCK=K.block_for(param, state))
    sig.update({k: "constexpr" for k in consts})
    # Direct tensor arguments are specialised as 16-byte aligned, as Triton does at launch.
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig)
             if sig[k].startswith("*")}
    src = ASTSource(fn=K._tied_adamw_kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": K.NUM_WARPS, "num_stages": K.NUM_STAGES, "maxnreg": K.MAX_REGISTERS,
                                       "enable_fp_fusion": K.ENABLE_FP_FUSION})
    return compiled.asm["cubin"]


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cuobjdump(cubin: bytes) -> tuple[str, str]:
    """(resource usage, SASS) of a cubin, with the cuobjdump that ships with Triton."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
    return usage, sass


@dataclass
class Instr:
    addr: int
    pred: str  # "" or e.g. "@!P1"
    op: str  # full opcode with modifiers, e.g. "LDG.E.128"
    args: str


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)\s*([^;]*);")


def parse_sass(text: str) -> list[Instr]:
    out = []
    for m in _LINE.finditer(text):
        out.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                         m.group(4).strip()))
    return out


def _target(ins: Instr) -> int | None:
    if not ins.op.startswith("BRA"):
        return None
    m = re.search(r"0x([0-9a-f]+)\s*$", ins.args)
    return int(m.group(1), 16) if m else None


def access_bits(op: str) -> int:
    m = re.search(r"\.(128|64|U16|S16|U8|S8)\b", op)
    if m is None:
        return 32
    return {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}[m.group(1)]


def is_global(op: str, kind: str) -> bool:
    return op.startswith(kind + ".E") or op == kind


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(index of head, index of back-edge branch) for every backward branch."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    out = []
    for i, ins in enumerate(instrs):
        t = _target(ins)
        if t is not None and t <= ins.addr and t in index:
            out.append((index[t], i))
    return out


def fast_path(instrs: list[Instr], head: int, back: int) -> list[Instr]:
    """The instructions one iteration executes when no slow path is taken (Note [hot loop])."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    path, i = [], head
    while i <= back and len(path) <= 100_000:
        ins = instrs[i]
        path.append(ins)
        t = _target(ins)
        if i == back:
            break
        if t is not None and t > ins.addr and t in index:
            j = index[t]
            if not ins.pred or any(x.op.startswith("CALL") for x in instrs[i + 1:j]):
                i = j
                continue
        i += 1
    return path


def ticket_after_barrier(instrs: list[Instr]) -> bool:
    """Note [ticket ordering] in tiedadam/kernels/tied_adamw.py: a ``BAR.SYNC`` lies between
    the last loop's backward branch and the step-count ticket (the first integer ``ATOMG`` add,
    the one that returns the ticket), so every thread has read the count before the ticket is
    taken."""
    ticket = next((i for i, x in enumerate(instrs) if x.op.startswith("ATOMG")
                   and ".ADD" in x.op and ".F" not in x.op), None)
    if ticket is None:
        return False
    backs = [back for _, back in loops(instrs) if back < ticket]
    start = max(backs) + 1 if backs else 0
    return any(x.op.startswith("BAR.SYNC") for x in instrs[start:ticket])


@dataclass
class LoopReport:
    instructions: int  # fast-path instructions per iteration
    elements_per_thread: float  # elements a thread updates per iteration
    instructions_per_element: float
    loads: dict = field(default_factory=dict)  # opcode -> count in the loop body
    stores: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # shared-memory/barrier opcode -> count
    role_bits: dict = field(default_factory=dict)  # role -> access width (bits) it gets


def hot_loop(instrs: list[Instr], spec: dict) -> LoopReport:
    """Find and measure the hot loop (Note [hot loop])."""
    best = None
    for head, back in loops(instrs):
        body = instrs[head:back + 1]
        gl = [ins for ins in body if is_global(ins.op, "LDG") or is_global(ins.op, "STG")]
        if not gl:
            continue
        width = sum(access_bits(x.op) for x in gl) / len(gl)
        score = (width, -(back - head))  # widest accesses; innermost on a tie
        if best is None or score > best[0]:
            best = (score, head, back)
    if best is None:
        raise RuntimeError("no loop with global memory accesses in the SASS")
    _, head, back = best
    body = instrs[head:back + 1]
    path = fast_path(instrs, head, back)
    loads = Counter(x.op for x in body if is_global(x.op, "LDG"))
    stores = Counter(x.op for x in body if is_global(x.op, "STG"))
    shared = Counter(x.op for x in body if x.op.split(".")[0] in SHARED_OPS)
    rl = roles(**spec)
    load_bytes = sum(access_bits(op) // 8 * n for op, n in loads.items())
    per_element = sum(b for b, ld, _ in rl.values() if ld)
    elems = load_bytes / per_element
    n = sum(1 for x in path if x.op != "NOP")
    # Each role's access width, from the layout (4 elements per thread, 2 for fp64): the
    # caller checks that the loop's access multiset is exactly these widths (one per role).
    per_thread = elements_per_thread(spec)
    role_bits = {r: min(128, per_thread * b * 8) for r, (b, _, _) in rl.items()}
    return LoopReport(instructions=n, elements_per_thread=elems,
                      instructions_per_element=round(n / elems, 1) if elems else float("inf"),
                      loads=dict(loads), stores=dict(stores), shared=dict(shared),
                      role_bits=role_bits)


def expected_accesses(spec: dict, loop_elements: float) -> tuple[Counter, Counter]:
    """The loads and stores the hot loop must have if every role moves at its width once per
    ``per_thread`` elements: {opcode: count}."""
    rl = roles(**spec)
    per_thread = elements_per_thread(spec)
    unroll = round(loop_elements / per_thread)  # elements a thread updates per loop iteration
    loads, stores = Counter(), Counter()
    for b, ld, st in rl.values():
        bits = per_thread * b * 8
        op = {128: "LDG.E.128", 64: "LDG.E.64", 32: "LDG.E"}[bits]
        if ld:
            loads[op] += unroll
        if st:
            stores[op.replace("LDG", "STG")] += unroll
    return loads, stores


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
    telemetry: bool
    registers: int
    threads_per_sm: int
    spill_bytes: int
    loop: LoopReport
    widths_as_laid_out: bool  # the loop's accesses are exactly one per role at its width
    ticket_after_barrier: bool  # Note [ticket ordering]

    @property
    def instr_budget(self) -> int:
        sr = self.state_sr or self.param_sr
        return MAX_INSTR_PER_ELEMENT_SR if sr else MAX_INSTR_PER_ELEMENT

    def structural_misses(self) -> list[str]:
        """The structural targets this variant misses (tests/test_kernel_report.py asserts
        none): registers, spills, shared memory in the hot loop, one access per role at its
        layout's width."""
        out = []
        if self.registers > MAX_REGISTERS:
            out.append(f"registers {self.registers} > {MAX_REGISTERS}")
        if self.spill_bytes:
            out.append(f"{self.spill_bytes} spill bytes")
        if self.loop.shared:
            out.append(f"shared memory in the hot loop {self.loop.shared}")
        if not self.widths_as_laid_out:
            out.append(f"hot-loop accesses {self.loop.loads} / {self.loop.stores} are not one "
                       f"per role at {self.loop.role_bits}")
        if not self.ticket_after_barrier:
            out.append("no barrier before the step-count ticket (Note [ticket ordering])")
        return out

    def misses(self) -> list[str]:
        """Every target this variant misses, the instruction budget included."""
        out = self.structural_misses()
        if self.loop.instructions_per_element > self.instr_budget:
            out.append(f"{self.loop.instructions_per_element} instructions per element > "
                       f"{self.instr_budget}")
        return out

    def as_dict(self) -> dict:
        return {**asdict(self), "instr_budget": self.instr_budget, "misses": self.misses(),
                "structural_misses": self.structural_misses()}


def threads_per_sm(registers: int, num_warps: int = K.NUM_WARPS) -> int:
    """Resident threads per SM on sm_90 at this register count: 64K registers per SM, allocated
    per warp in units of 256, at most 2048 threads (64 warps) and 32 blocks."""
    per_warp = -(-registers * 32 // 256) * 256
    warps = min(65536 // per_warp, 64)
    blocks = min(warps // num_warps, 32)
    return blocks * num_warps * 32


def analyse(spec: dict, arch: int = 90, dump_dir: str | None = None) -> VariantReport:
    cubin = compile_cubin(**spec, arch=arch)
    name = variant_name(**spec)
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"{name}.cubin"), "wb") as f:
            f.write(cubin)
    usage, sass = cuobjdump(cubin)
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    instrs = parse_sass(sass)
    loop = hot_loop(instrs, spec)
    want_loads, want_stores = expected_accesses(spec, loop.elements_per_thread)
    return VariantReport(
        name=name, param=SHORT[spec["param"]], state=SHORT[spec["state"]],
        master=spec["master"], scale=spec["scale"], flat=spec["flat"],
        state_sr=spec.get("state_sr", False), param_sr=spec.get("param_sr", False),
        telemetry=spec.get("telemetry", False), registers=regs,
        threads_per_sm=threads_per_sm(regs),
        spill_bytes=int(re.search(r"LOCAL:(\d+)", usage).group(1)),
        loop=loop, widths_as_laid_out=(Counter(loop.loads) == want_loads
                                       and Counter(loop.stores) == want_stores),
        ticket_after_barrier=ticket_after_barrier(instrs))
