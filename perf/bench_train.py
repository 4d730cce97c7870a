"""End-to-end training steps of a GPT-style LM: tokens/s, step time, the optimizer's share of the
step, and peak memory, with TiedAdamW against torch's fused AdamW and DeepSpeed's FusedAdam.

Frameworks (one process; FSDP2 and DeepSpeed on a world of 1, the way a single GPU runs them):
  plain      the model as is (bf16 autocast on CUDA)
  fsdp2      fully_shard per block, MixedPrecisionPolicy(param_dtype=bf16) on CUDA
  ds-zero2   DeepSpeed ZeRO-2, "bf16": {"enabled": true} on CUDA; optimizer from the config

    python perf/bench_train.py                    # CUDA: ~350M-param model (d=1024, 24 layers)
    python perf/bench_train.py --d-model 64 --layers 2 --seq 64 --batch 4 --steps 4   # CPU smoke

The optimizer's share is the time of ``optimizer.step()`` (``engine.step()`` under DeepSpeed,
which also does ZeRO's bookkeeping) over the whole step. Writes bench_train.json/.png.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_HELP, SCRATCH, machine, progress, release, versions, write_json  # noqa: E402
from lm import LMConfig, TinyLM, param_groups  # noqa: E402
from providers import Unavailable  # noqa: E402

PAIRS = {  # framework -> providers
    "plain": ["tiedadam", "torch-fused"],
    "fsdp2": ["tiedadam", "torch-fused"],
    "ds-zero2": ["tiedadam", "deepspeed-fused"],
}


class Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            self.a, self.b = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.b.record()
            self.b.synchronize()
            self.s = self.a.elapsed_time(self.b) / 1e3
        else:
            self.s = time.perf_counter() - self.t0


def init_world_of_one(device):
    if dist.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1")
    path = os.path.join(tempfile.mkdtemp(), "rendezvous")
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            init_method=f"file://{path}", rank=0, world_size=1)


def build(framework, provider, model, args, device):
    """(forward-backward fn, step fn, optimizer) for one framework x provider."""
    lr, beta, wd = 3e-4, 0.95, 0.1
    bf16 = device == "cuda"
    if framework == "ds-zero2":
        try:
            import deepspeed
        except ImportError:
            raise Unavailable("deepspeed is not installed") from None
        import tiedadam  # noqa: F401  publishes "TiedAdamW"
        params = {"lr": lr, "betas": [beta, beta], "weight_decay": wd}
        if provider == "tiedadam":
            opt_cfg = {"type": "TiedAdamW", "params": params}
        else:
            opt_cfg = {"type": "AdamW", "params": {**params, "torch_adam": device != "cuda"}}
        cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": 1.0,
               "optimizer": opt_cfg, "zero_optimization": {"stage": 2},
               "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9}
        engine, opt, _, _ = deepspeed.initialize(model=model, config=cfg,
                                                 model_parameters=param_groups(model, wd))

        def fwd_bwd(x, y):
            loss = engine(x, y)
            engine.backward(loss)
            return loss
        return fwd_bwd, engine.step, engine
    if framework == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)} if bf16 else {}
        for blk in model.blocks:
            fully_shard(blk, **kw)
        fully_shard(model, **kw)
    if provider == "tiedadam":
        from tiedadam import TiedAdamW
        opt = TiedAdamW(param_groups(model, wd), lr=lr, beta=beta)
    else:
        opt = torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=(beta, beta), fused=True)
    autocast = framework == "plain" and bf16

    def fwd_bwd(x, y):
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = model(x, y)
        loss.backward()
        return loss

    def step():
        opt.step()
        opt.zero_grad(set_to_none=True)
    return fwd_bwd, step, opt


def run(framework, provider, base, cfg, args, device):
    model = copy.deepcopy(base).to(device)
    fwd_bwd, step, _ = build(framework, provider, model, args, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab, (args.batch, cfg.seq), generator=gen).to(device)
    y = torch.randint(0, cfg.vocab, (args.batch, cfg.seq), generator=gen).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    totals, opt_times, losses = [], [], []
    for i in range(args.warmup + args.steps):
        with Timer(device) as whole:
            loss = fwd_bwd(x, y)
            with Timer(device) as o:
                step()
        if i >= args.warmup:
            totals.append(whole.s)
            opt_times.append(o.s)
            losses.append(float(loss.detach()))
    step_s = statistics.median(totals)
    row = dict(framework=framework, provider=provider, step_s=step_s,
               optimizer_s=statistics.median(opt_times),
               optimizer_share=statistics.median(opt_times) / step_s,
               tokens_per_s=args.batch * cfg.seq / step_s, losses=losses,
               peak_memory_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)
    del model
    release(device)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--frameworks", default="plain,fsdp2,ds-zero2")
    ap.add_argument("--d-model", type=int, default=1024 if cuda else 64)
    ap.add_argument("--layers", type=int, default=24 if cuda else 2)
    ap.add_argument("--seq", type=int, default=1024 if cuda else 64)
    ap.add_argument("--batch", type=int, default=8 if cuda else 4)
    ap.add_argument("--steps", type=int, default=10 if cuda else 4)
    ap.add_argument("--warmup", type=int, default=3 if cuda else 1)
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    device = args.device
    init_world_of_one(device)
    cfg = LMConfig(d_model=args.d_model, n_layers=args.layers,
                   n_heads=max(1, args.d_model // 64), seq=args.seq)
    torch.manual_seed(0)
    base = TinyLM(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    progress(f"{n_params / 1e6:.1f}M-param model on {device}")
    rows, skipped = [], {}
    for fw in args.frameworks.split(","):
        for prov in PAIRS[fw]:
            progress(f"{fw} / {prov} ...")
            try:
                rows.append(run(fw, prov, base, cfg, args, device))
            except Exception as e:  # a missing framework (no deepspeed) is reported, not fatal
                why = str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}"
                skipped[f"{fw}/{prov}"] = why[:300]
                progress(f"  skipped: {skipped[f'{fw}/{prov}']}")
    tag = f"_{args.tag}" if args.tag else ""
    path = write_json(args.out, f"bench_train{tag}.json", dict(
        what="end-to-end training steps", device=device, model=dict(cfg.__dict__, params=n_params),
        machine_before=machine(), versions=versions(), config=vars(args), skipped=skipped,
        results=rows))
    plot(rows, os.path.join(args.out, f"bench_train{tag}.png"), n_params, device)
    print(f"\ntraining steps, {n_params / 1e6:.1f}M params, batch {args.batch} x {cfg.seq}, {device}")
    print(f"{'framework':<10}{'provider':<17}{'step ms':>9}{'tokens/s':>11}{'opt ms':>9}{'opt %':>7}{'peak MiB':>10}")
    for r in rows:
        pk = r["peak_memory_bytes"]
        print(f"{r['framework']:<10}{r['provider']:<17}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>11.0f}"
              f"{r['optimizer_s'] * 1e3:>9.2f}{100 * r['optimizer_share']:>7.1f}"
              f"{'-' if pk is None else f'{pk / 2**20:.0f}':>10}")
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    print(f"wrote {path}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def plot(rows, path, n_params, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['framework']}\n{r['provider']}" for r in rows]
    ax.bar(labels, [r["tokens_per_s"] for r in rows])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{n_params / 1e6:.0f}M-param LM, {device}")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
