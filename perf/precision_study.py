"""Accuracy of TiedAdamW's precision modes: train the same small transformer LM (same init, same
batches) in each mode and compare its loss curve with the fp32 reference.

Modes: fp32 states (reference); bf16 states with stochastic rounding; bf16 states rounded to
nearest; bf16 params with fp32 master weights; pure bf16 (params and states) with stochastic
rounding; pure bf16 rounded to nearest; ratio8 moments (Note [ratio8] in
tiedadam/kernels/ratio8.py) with stochastic rounding, rounded to nearest, and with the
companded ("sqrt") code instead of the linear one; and for comparison torch.optim.AdamW with
untied betas (beta, 0.999) in fp32, and the 8-bit AdamW of torchao and of bitsandbytes with
betas (beta, beta) where they are installed (``pip install --no-deps torchao bitsandbytes``;
both run on CPU). Data: the Python standard library's source (offline).

    python perf/precision_study.py                      # ~500 steps per mode on CPU
    python perf/precision_study.py --modes ratio8,ratio8-sqrt,untied --betas 0.9,0.95 --seeds 2
    python perf/precision_study.py --steps 5 --d-model 32 --layers 1   # smoke

Per run: the loss curve, validation loss, optimizer state bytes, and at the end the update
statistics from the optimizer's state: RMS and max of |u| for u = m_hat / (sqrt(v_hat) + eps),
and the fraction of elements with |m_hat| / sqrt(v_hat) > 0.5 (tied betas bound |u| by 1).
Writes precision_study.json and precision_study.png to --out and prints a table per beta last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_HELP, SCRATCH, machine, progress, versions, write_json  # noqa: E402
from lm import (Data, LMConfig, TinyLM, add_lm_args, cosine_lr, evaluate, param_groups,  # noqa: E402
                setup, train_step)

BF16, FP32 = torch.bfloat16, torch.float32
EPS = 1e-8
SNR = 0.5
# mode -> (param dtype, optimizer, its options). "tied": TiedAdamW; the others are peers.
MODES = {
    "fp32": (FP32, "tied", {}),
    "bf16-state-sr": (FP32, "tied", dict(state_dtype=BF16, stochastic_rounding=True)),
    "bf16-state-nearest": (FP32, "tied", dict(state_dtype=BF16, stochastic_rounding=False)),
    "bf16-params-master": (BF16, "tied", dict(master_weights=True)),
    "pure-bf16-sr": (BF16, "tied", dict(state_dtype=BF16, stochastic_rounding=True,
                                        param_stochastic_rounding=True)),
    "pure-bf16-nearest": (BF16, "tied", dict(state_dtype=BF16, stochastic_rounding=False,
                                             param_stochastic_rounding=False)),
    "ratio8": (FP32, "tied", dict(state_dtype="ratio8", stochastic_rounding=True)),
    "ratio8-nearest": (FP32, "tied", dict(state_dtype="ratio8", stochastic_rounding=False)),
    # the companded code (ratio8.CODE = "sqrt"): the torch backend only
    "ratio8-sqrt": (FP32, "tied-sqrt", dict(state_dtype="ratio8", stochastic_rounding=True)),
    "untied": (FP32, "torch", {}),  # torch.optim.AdamW(betas=(beta, 0.999))
    "torchao-8bit": (FP32, "torchao", {}),
    "bnb-8bit": (FP32, "bnb", {}),
}
PEERS = ("torchao", "bnb")


def available(mode: str) -> bool:
    kind = MODES[mode][1]
    try:
        if kind == "torchao":
            import torchao.optim  # noqa: F401
        elif kind == "bnb":
            import bitsandbytes  # noqa: F401
    except Exception:  # not installed, or no backend for this machine
        return False
    return True


def make_optimizer(mode: str, groups, lr: float, beta: float, seed: int):
    _, kind, opt_kw = MODES[mode]
    if kind.startswith("tied"):
        from tiedadam import TiedAdamW
        backend = "torch" if kind == "tied-sqrt" else "auto"
        return TiedAdamW(groups, lr=lr, beta=beta, eps=EPS, seed=seed, backend=backend,
                         **opt_kw)
    if kind == "torch":
        return torch.optim.AdamW(groups, lr=lr, betas=(beta, 0.999), eps=EPS)
    if kind == "torchao":
        from torchao.optim import AdamW8bit
        return AdamW8bit(groups, lr=lr, betas=(beta, beta), eps=EPS)
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=(beta, beta), eps=EPS)


@torch.no_grad()
def update_stats(opt) -> dict | None:
    """RMS and max of |u|, u = m_hat / (sqrt(v_hat) + eps), and the fraction of elements with
    |m_hat| / sqrt(v_hat) > SNR, from the optimizer's state (None for the 8-bit peers, whose
    states are block-quantized)."""
    from tiedadam.kernels import ratio8
    usq, n, high, umax = 0.0, 0, 0.0, 0.0
    for group in opt.param_groups:
        b1, b2 = group["betas"] if "beta" not in group else (group["beta"],) * 2
        for p in group["params"]:
            st = opt.state.get(p)
            if not st or "exp_avg" not in st or not isinstance(st["exp_avg"], torch.Tensor):
                return None
            m, v = st["exp_avg"], st["exp_avg_sq"]
            if type(m) is not torch.Tensor:
                return None  # a tensor subclass (torchao's 8-bit state)
            m = ratio8.decode(m, v) if m.dtype == torch.int8 else m.float()
            v = v.float()
            t = float(st["step"])
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            u = m_hat / (v_hat.sqrt() + EPS)
            usq += float((u * u).sum())
            umax = max(umax, float(u.abs().max()))
            n += u.numel()
            high += float((m_hat.abs() > SNR * v_hat.sqrt()).sum())
    return dict(update_rms=(usq / n) ** 0.5, max_abs_u=umax, high_snr_fraction=high / n)


def state_bytes(opt) -> int:
    """Bytes of optimizer state (every tensor in opt.state; torchao's subclasses by their
    codes and scales)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                parts = [getattr(v, a) for a in ("codes", "scale", "qmap") if hasattr(v, a)]
                for t in parts or [v]:
                    total += t.numel() * t.element_size()
    return total


def train(mode: str, beta: float, seed: int, data: Data, cfg: LMConfig, args,
          device: str) -> dict:
    from tiedadam.kernels import ratio8
    dtype, kind, _ = MODES[mode]
    torch.manual_seed(seed)
    model = TinyLM(cfg).to(device=device, dtype=dtype)
    opt = make_optimizer(mode, param_groups(model, args.weight_decay), args.lr, beta, seed)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.time()
    code = ratio8.CODE
    ratio8.CODE = "sqrt" if kind == "tied-sqrt" else code
    try:
        for step in range(args.steps):
            for g in opt.param_groups:
                lr = args.lr * cosine_lr(step, args.steps, args.warmup)
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].fill_(lr)  # torchao keeps lr as a tensor and wants it so
                else:
                    g["lr"] = lr
            losses.append(train_step(model, opt, data, args.batch, cfg.seq, gen, device))
        stats = update_stats(opt)
    finally:
        ratio8.CODE = code
    val = evaluate(model, data, args.eval_batches, args.batch, cfg.seq, seed=10_000 + seed)
    n_params = sum(p.numel() for p in model.parameters())
    return dict(mode=mode, beta=beta, seed=seed, train_loss=losses, val_loss=val,
                seconds=time.time() - t0, state_bytes=state_bytes(opt),
                state_bytes_per_param=state_bytes(opt) / n_params, update=stats)


def smooth(xs, k=20):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc = x if i == 0 else acc + (x - acc) / min(i + 1, k)
        out.append(acc)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--modes", default=",".join(m for m in MODES if MODES[m][1] not in PEERS),
                    help="comma list of " + ",".join(MODES))
    add_lm_args(ap, steps=500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--betas", default="0.95", help="comma list of tied betas to run each mode at")
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds per mode")
    args = ap.parse_args(argv)
    cfg, data = setup(args)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown modes {unknown}: choose from {', '.join(MODES)}")
    if "fp32" not in modes:
        modes = ["fp32"] + modes  # the reference every gap is measured against
    skipped = [m for m in modes if not available(m)]
    for m in skipped:
        progress(f"{m}: not installed here, skipped")
    modes = [m for m in modes if m not in skipped]
    betas = [float(b) for b in args.betas.split(",")]
    runs = []
    for beta in betas:
        for mode in modes:
            for seed in range(args.seeds):
                progress(f"beta {beta} {mode} seed {seed} ...")
                runs.append(train(mode, beta, seed, data, cfg, args, args.device))
                progress(f"  val {runs[-1]['val_loss']:.4f} ({runs[-1]['seconds']:.0f} s)")
    summary = [summarise(runs, mode, beta) for beta in betas for mode in modes]
    n_params = sum(p.numel() for p in TinyLM(cfg).parameters())
    path = write_json(args.out, "precision_study.json", dict(
        what="TiedAdamW precision modes vs fp32 states, small LM on stdlib source",
        model=dict(cfg.__dict__, params=n_params), config=vars(args), machine=machine(),
        versions=versions(), skipped=skipped, summary=summary, runs=runs))
    plot(runs, modes, betas, os.path.join(args.out, "precision_study.png"), n_params)
    for beta in betas:
        print(f"\nprecision modes, beta {beta}, {n_params:,}-param LM, {args.steps} steps, "
              f"{args.seeds} seeds, {args.device}")
        print(f"{'mode':<20}{'final train':>12}{'val':>9}{'val range':>17}{'val - fp32':>12}"
              f"{'|curve gap|':>12}{'u rms':>7}{'max|u|':>8}{'B/param':>8}")
        for s in summary:
            if s["beta"] != beta:
                continue
            u = s["update"] or {}
            rms = f"{u['update_rms']:.3f}" if u else "-"
            mx = f"{u['max_abs_u']:.2f}" if u else "-"
            print(f"{s['mode']:<20}{s['final_train_loss']:>12.4f}{s['val_loss']:>9.4f}"
                  f"{s['val_loss_min']:>9.4f}..{s['val_loss_max']:.4f}"
                  f"{s['val_gap_vs_fp32']:>+12.4f}{s['mean_abs_curve_gap']:>12.4f}{rms:>7}"
                  f"{mx:>8}{s['state_bytes_per_param']:>8.2f}")
    print(f"wrote {path}")
    return 0


def summarise(runs: list, mode: str, beta: float) -> dict:
    """One mode at one beta over its seeds, against fp32 states of the same seeds."""
    ref = {r["seed"]: r for r in runs if r["mode"] == "fp32" and r["beta"] == beta}
    rs = [r for r in runs if r["mode"] == mode and r["beta"] == beta]
    gaps = [sum(abs(a - b) for a, b in zip(smooth(r["train_loss"]),
                                           smooth(ref[r["seed"]]["train_loss"])))
            / len(r["train_loss"]) for r in rs]
    ups = [r["update"] for r in rs if r["update"]]
    vals = [r["val_loss"] for r in rs]
    return dict(
        mode=mode, beta=beta, seeds=len(rs),
        final_train_loss=sum(sum(r["train_loss"][-20:]) / len(r["train_loss"][-20:])
                             for r in rs) / len(rs),
        val_loss=sum(vals) / len(vals), val_loss_min=min(vals), val_loss_max=max(vals),
        val_gap_vs_fp32=sum(r["val_loss"] - ref[r["seed"]]["val_loss"] for r in rs) / len(rs),
        mean_abs_curve_gap=sum(gaps) / len(gaps),
        update={k: sum(u[k] for u in ups) / len(ups) for k in ups[0]} if ups else None,
        state_bytes=rs[0]["state_bytes"], state_bytes_per_param=rs[0]["state_bytes_per_param"])


def plot(runs, modes, betas, path, n_params) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(betas), 2, figsize=(11, 4 * len(betas)), squeeze=False)
    for (a, b), beta in zip(axes, betas):
        ref = next(x for x in runs if x["mode"] == "fp32" and x["beta"] == beta
                   and x["seed"] == 0)
        for mode in modes:
            r = next(x for x in runs if x["mode"] == mode and x["beta"] == beta
                     and x["seed"] == 0)
            a.plot(smooth(r["train_loss"]), label=mode, lw=1)
            b.plot([x - y for x, y in zip(smooth(r["train_loss"]), smooth(ref["train_loss"]))],
                   label=mode, lw=1)
        a.set(xlabel="step", ylabel="train loss (smoothed)",
              title=f"{n_params:,}-param LM, beta {beta}, seed 0")
        b.set(xlabel="step", ylabel="loss - fp32 loss", title=f"gap to fp32 states, beta {beta}")
        b.axhline(0, color="k", lw=0.5)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
