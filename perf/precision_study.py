"""Accuracy of TiedAdamW's precision modes: train the same small transformer LM (same init, same
batches) in each mode and compare its loss curve with the fp32 reference.

Modes: fp32 states (reference); bf16 states with stochastic rounding; bf16 states rounded to
nearest; bf16 params with fp32 master weights; pure bf16 (params and states) with stochastic
rounding; pure bf16 rounded to nearest. Data: the Python standard library's source (offline).

    python perf/precision_study.py                      # ~300 steps per mode on CPU
    python perf/precision_study.py --steps 5 --d-model 32 --layers 1   # smoke

Writes precision_study.json and precision_study.png to --out and prints a table last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_HELP, SCRATCH, machine, progress, versions, write_json  # noqa: E402
from lm import Data, LMConfig, TinyLM, add_lm_args, cosine_lr, evaluate, param_groups, setup  # noqa: E402,E501

BF16, FP32 = torch.bfloat16, torch.float32
MODES = {
    "fp32": (FP32, {}),
    "bf16-state-sr": (FP32, dict(state_dtype=BF16, stochastic_rounding=True)),
    "bf16-state-nearest": (FP32, dict(state_dtype=BF16, stochastic_rounding=False)),
    "bf16-params-master": (BF16, dict(master_weights=True)),
    "pure-bf16-sr": (BF16, dict(state_dtype=BF16, stochastic_rounding=True,
                                param_stochastic_rounding=True)),
    "pure-bf16-nearest": (BF16, dict(state_dtype=BF16, stochastic_rounding=False,
                                     param_stochastic_rounding=False)),
}


def train(mode: str, seed: int, data: Data, cfg: LMConfig, args, device: str) -> dict:
    from tiedadam import TiedAdamW
    dtype, opt_kw = MODES[mode]
    torch.manual_seed(seed)
    model = TinyLM(cfg).to(device=device, dtype=dtype)
    opt = TiedAdamW(param_groups(model, args.weight_decay), lr=args.lr, beta=args.beta,
                    seed=seed, **opt_kw)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine_lr(step, args.steps, args.warmup)
        x, y = data.batch("train", args.batch, cfg.seq, gen)
        loss = model(x.to(device), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    val = evaluate(model, data, args.eval_batches, args.batch, cfg.seq, seed=10_000 + seed)
    return dict(mode=mode, seed=seed, train_loss=losses, val_loss=val,
                seconds=time.time() - t0, state_bytes=opt.state_bytes())


def smooth(xs, k=20):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc = x if i == 0 else acc + (x - acc) / min(i + 1, k)
        out.append(acc)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of " + ",".join(MODES))
    add_lm_args(ap, steps=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--beta", type=float, default=0.95)
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds per mode")
    args = ap.parse_args(argv)
    cfg, data = setup(args)
    modes = args.modes.split(",")
    if "fp32" not in modes:
        modes = ["fp32"] + modes  # the reference every gap is measured against
    runs = []
    for mode in modes:
        for seed in range(args.seeds):
            progress(f"{mode} seed {seed} ...")
            runs.append(train(mode, seed, data, cfg, args, args.device))
            progress(f"  val {runs[-1]['val_loss']:.4f} ({runs[-1]['seconds']:.0f} s)")
    ref = {r["seed"]: r for r in runs if r["mode"] == "fp32"}
    summary = []
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        gaps = [sum(abs(a - b) for a, b in zip(smooth(r["train_loss"]),
                                               smooth(ref[r["seed"]]["train_loss"]))) / len(r["train_loss"])
                for r in rs]
        summary.append(dict(
            mode=mode, seeds=len(rs),
            final_train_loss=sum(sum(r["train_loss"][-20:]) / len(r["train_loss"][-20:]) for r in rs) / len(rs),
            val_loss=sum(r["val_loss"] for r in rs) / len(rs),
            val_gap_vs_fp32=sum(r["val_loss"] - ref[r["seed"]]["val_loss"] for r in rs) / len(rs),
            mean_abs_curve_gap=sum(gaps) / len(gaps),
            state_bytes=rs[0]["state_bytes"]))
    n_params = sum(p.numel() for p in TinyLM(cfg).parameters())
    path = write_json(args.out, "precision_study.json", dict(
        what="TiedAdamW precision modes vs fp32 states, small LM on stdlib source",
        model=dict(cfg.__dict__, params=n_params), config=vars(args), machine=machine(),
        versions=versions(), summary=summary, runs=runs))
    plot(runs, modes, os.path.join(args.out, "precision_study.png"), n_params)
    print(f"\nprecision modes, {n_params:,}-param LM, {args.steps} steps, {args.device}")
    print(f"{'mode':<22}{'final train':>12}{'val':>9}{'val - fp32':>12}{'|curve gap|':>13}")
    for s in summary:
        print(f"{s['mode']:<22}{s['final_train_loss']:>12.4f}{s['val_loss']:>9.4f}"
              f"{s['val_gap_vs_fp32']:>+12.4f}{s['mean_abs_curve_gap']:>13.4f}")
    print(f"wrote {path}")
    return 0


def plot(runs, modes, path, n_params) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ref = {r["seed"]: r for r in runs if r["mode"] == "fp32"}
    for mode in modes:
        r = next(x for x in runs if x["mode"] == mode and x["seed"] == 0)
        a.plot(smooth(r["train_loss"]), label=mode, lw=1)
        b.plot([x - y for x, y in zip(smooth(r["train_loss"]), smooth(ref[0]["train_loss"]))],
               label=mode, lw=1)
    a.set(xlabel="step", ylabel="train loss (smoothed)", title=f"{n_params:,}-param LM, seed 0")
    b.set(xlabel="step", ylabel="loss - fp32 loss", title="gap to fp32 states")
    b.axhline(0, color="k", lw=0.5)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
