"""ZeRO-Offload end to end on CPU: DeepSpeed ZeRO-2 with ``offload_optimizer: {"device": "cpu"}``,
2 ranks on gloo, the byte-level LM of perf/lm.py, the same model, init and data for each
optimizer, which comes from the JSON config as a user writes it:

    deepspeed-adamw     {"type": "AdamW", "betas": [b, b]}: DeepSpeed's own DeepSpeedCPUAdam
                        (fp32 moments, 12 B/param of host state with the fp32 partition)
    tiedadam            {"type": "TiedAdamW"}: fp32 moments (torch's fused CPU AdamW)
    tiedadam-bf16       {"type": "TiedAdamW", "state_dtype": "bfloat16"}: 8 B/param
    tiedadam-ratio8     {"type": "TiedAdamW", "state_dtype": "ratio8"}: 7 B/param

Per optimizer, rank 0 reports: the median training step (forward, backward, ``engine.step()``)
and the median ``engine.step()`` alone (ZeRO's copies plus the CPU optimizer step) over the
steps after ``--warmup``; host RSS after the last step and its peak (VmRSS / VmHWM of each rank,
summed over ranks); the optimizer's state bytes per parameter of its partition; the loss every
step (mean over ranks). Each optimizer runs in processes of its own (Note [offload processes]
in bench_offload.py). Writes bench_offload_train.json and a PNG of the loss curves side by side.

    python perf/bench_offload_train.py --out perf/results/cpu/offload_train
    python perf/bench_offload_train.py --d-model 64 --layers 1 --steps 3 --warmup 1   # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_HELP, SCRATCH, machine, progress, versions, write_json  # noqa: E402

PROVIDERS = {
    "deepspeed-adamw": ("AdamW", {}),
    "tiedadam": ("TiedAdamW", {}),
    "tiedadam-bf16": ("TiedAdamW", {"state_dtype": "bfloat16"}),
    "tiedadam-ratio8": ("TiedAdamW", {"state_dtype": "ratio8"}),
}


def ds_config(provider: str, args) -> dict:
    kind, extra = PROVIDERS[provider]
    params = {"lr": args.lr, "betas": [args.beta, args.beta], "weight_decay": args.weight_decay,
              **extra}
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": kind, "params": params},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rank(rank: int, world: int, provider: str, args, init_file: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    import deepspeed

    import tiedadam  # noqa: F401  what a user does: publishes "TiedAdamW" for DeepSpeed configs
    from lm import Data, LMConfig, TinyLM, param_groups
    cfg = LMConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, seq=args.seq)
    torch.manual_seed(0)
    model = TinyLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    data = Data.load(args.data_bytes)
    rss0 = _proc_kib("VmRSS")
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config(provider, args),
                                           model_parameters=param_groups(model,
                                                                         args.weight_decay))
    gen = torch.Generator().manual_seed(1000 + rank)
    losses, step_s, opt_s = [], [], []
    for _ in range(args.steps):
        x, y = data.batch("train", args.batch, args.seq, gen)
        t0 = time.perf_counter()
        loss = engine(x, y)
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    held = [p for g in inner.param_groups for p in g["params"]]
    numel = sum(p.numel() for p in held)
    state = sum(v.numel() * v.element_size() for st in inner.state.values()
                for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    mem = torch.tensor([_proc_kib("VmRSS"), _proc_kib("VmHWM"), rss0], dtype=torch.float64)
    dist.all_reduce(mem)
    out = dict(rank=rank, losses=losses, step_s=step_s, opt_s=opt_s, n_params=n_params,
               optimizer=type(inner).__name__, partition_numel=numel,
               state_bytes_per_param=(state + 4 * numel) / max(numel, 1),
               rss_mib=float(mem[0]) / 1024, peak_rss_mib=float(mem[1]) / 1024,
               rss_before_init_mib=float(mem[2]) / 1024)
    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        queue.put(out)


def run_provider(provider: str, args) -> dict:
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_rank, args=(r, 2, provider, args, f"{d}/rdzv", q))
                 for r in range(2)]
        for p in procs:
            p.start()
        t0, out = time.monotonic(), None
        while out is None:  # a rank that dies reports nothing: stop waiting for it
            try:
                out = q.get(timeout=5.0)
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs) or \
                        time.monotonic() - t0 > args.timeout:
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"{provider}: a rank failed or timed out "
                                       f"(exit codes {[p.exitcode for p in procs]})")
        for p in procs:
            p.join(timeout=120)
        codes = [p.exitcode for p in procs]
        if codes != [0, 0]:
            raise RuntimeError(f"{provider}: ranks exited with {codes}")
    w = args.warmup
    out.update(provider=provider, median_step_s=statistics.median(out["step_s"][w:]),
               median_engine_step_s=statistics.median(out["opt_s"][w:]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--providers", default="deepspeed-adamw,tiedadam-ratio8,tiedadam-bf16")
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=0.95)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank (2 ranks)")
    ap.add_argument("--data-bytes", type=int, default=4_000_000)
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    if args.warmup >= args.steps:
        ap.error(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    names = [p for p in args.providers.split(",") if p]
    bad = [p for p in names if p not in PROVIDERS]
    if bad:
        ap.error(f"--providers: unknown {bad}; choose from {sorted(PROVIDERS)}")
    rows = []
    for name in names:
        progress(f"{name}: 2 ranks, ZeRO-2 offload, {args.steps} steps ...")
        rows.append(run_provider(name, args))
    path = write_json(args.out, "bench_offload_train.json", dict(
        what="DeepSpeed ZeRO-2 with the optimizer offloaded to CPU, 2 ranks (gloo), byte-level LM",
        machine=machine(), versions=versions(), config=vars(args), rows=rows))
    plot(rows, os.path.join(args.out, "bench_offload_train.png"))
    ref = next((r for r in rows if r["provider"] == "deepspeed-adamw"), None)
    print(f"\nZeRO-2 offload, {rows[0]['n_params']:,} params, 2 ranks x {args.threads} thread(s)")
    print(f"{'provider':18s} {'optimizer':18s} {'step ms':>8s} {'engine.step ms':>14s} "
          f"{'B/param':>7s} {'RSS MiB':>8s} {'peak MiB':>8s} {'last loss':>9s} {'vs DS':>6s}")
    for r in rows:
        vs = f"{ref['median_step_s'] / r['median_step_s']:.2f}x" if ref else "-"
        print(f"{r['provider']:18s} {r['optimizer']:18s} {r['median_step_s'] * 1e3:8.0f} "
              f"{r['median_engine_step_s'] * 1e3:14.1f} {r['state_bytes_per_param']:7.1f} "
              f"{r['rss_mib']:8.0f} {r['peak_rss_mib']:8.0f} {r['losses'][-1]:9.4f} {vs:>6s}")
    print(f"wrote {path}")
    return 0


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for r in rows:
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"],
                label=f"{r['provider']} ({r['state_bytes_per_param']:.0f} B/param)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over ranks)")
    ax.set_title("ZeRO-2 offload, same model, init and data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
