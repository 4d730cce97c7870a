"""Does tied beta train as well as the usual untied betas? A small decoder-only transformer LM on
the Python standard library's source (offline), a fixed token budget per run, a small lr grid
and several seeds per setting:

  tied    beta in {0.9, 0.95, 0.975}          TiedAdamW, with its in-kernel telemetry
  untied  0.9/0.95 and 0.9/0.999 (beta1/beta2)  torch.optim.AdamW

Per run: final validation loss, the training loss curve, and update statistics every
--log-every steps: RMS of u = m_hat / (sqrt(v_hat) + eps) (the update before lr) and the
fraction of elements with |m_hat| / sqrt(v_hat) > 0.5 (high signal-to-noise), plus the |u|
distribution at the end. For untied runs the same quantities are computed from AdamW's state
(there |m_hat| / sqrt(v_hat) is not bounded by 1).

    python perf/beta_study.py                                    # CPU: ~20 runs, minutes
    python perf/beta_study.py --steps 3 --lrs 1e-3 --seeds 1 --d-model 32 --layers 1   # smoke

Writes beta_study.json and beta_study.png into --out and prints a table last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT_HELP, SCRATCH, machine, progress, versions, write_json  # noqa: E402
from lm import (TinyLM, add_lm_args, cosine_lr, evaluate, param_groups, setup,  # noqa: E402
                train_step)

SETTINGS = {"tied 0.9": (0.9, 0.9), "tied 0.95": (0.95, 0.95), "tied 0.975": (0.975, 0.975),
            "untied 0.9/0.95": (0.9, 0.95), "untied 0.9/0.999": (0.9, 0.999)}
SNR = 0.5
EPS = 1e-8
U_BINS, U_MAX = 75, 1.5  # |u| histogram saved per run: bins of 0.02 over [0, 1.5], last one open


def u_histogram(values) -> list[int]:
    t = torch.tensor(values, dtype=torch.float32).clamp(max=U_MAX - 1e-6)
    return torch.histc(t, bins=U_BINS, min=0.0, max=U_MAX).long().tolist()


@torch.no_grad()
def untied_stats(opt, sample: int):
    """update RMS, high-SNR fraction and a |u| sample from torch AdamW's state."""
    usq, n, high, us = 0.0, 0, 0.0, []
    for group in opt.param_groups:
        b1, b2 = group["betas"]
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            t = float(st["step"])
            m_hat = st["exp_avg"] / (1 - b1 ** t)
            v_hat = st["exp_avg_sq"] / (1 - b2 ** t)
            u = m_hat / (v_hat.sqrt() + EPS)
            usq += float((u * u).sum())
            n += u.numel()
            high += float((m_hat.abs() > SNR * v_hat.sqrt()).sum())
            us.append(u.flatten())
    u_all = torch.cat(us)
    idx = torch.randperm(len(u_all), generator=torch.Generator().manual_seed(0))[:sample]
    return (usq / n) ** 0.5, high / n, u_all[idx].abs().tolist()


def tied_stats(opt, model, sample: int):
    from tiedadam.optim.telemetry import to_floats
    flat = to_floats(opt.telemetry())
    us = []  # the |u| sample is taken from the state (telemetry holds sums, not elements)
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                t, b = float(st["step"]), group["beta"]
                c = 1 - b ** t
                us.append(((st["exp_avg"] / c) / ((st["exp_avg_sq"] / c).sqrt() + EPS)).flatten())
    u_all = torch.cat(us)
    idx = torch.randperm(len(u_all), generator=torch.Generator().manual_seed(0))[:sample]
    return (flat["telemetry/all/update_rms"], flat["telemetry/all/high_snr_fraction"],
            u_all[idx].abs().tolist())


def run(setting, lr, seed, data, cfg, args, device):
    b1, b2 = SETTINGS[setting]
    torch.manual_seed(seed)
    model = TinyLM(cfg).to(device)
    groups = param_groups(model, args.weight_decay)
    if b1 == b2:
        from tiedadam import TiedAdamW
        opt = TiedAdamW(groups, lr=lr, beta=b1, eps=EPS, telemetry=True, snr_threshold=SNR)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=EPS)
    gen = torch.Generator().manual_seed(seed)
    losses, log = [], []
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step, args.steps, args.warmup)
        losses.append(train_step(model, opt, data, args.batch, cfg.seq, gen, device))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rms, high, _ = (tied_stats(opt, model, 0) if b1 == b2 else untied_stats(opt, 1))
            log.append(dict(step=step + 1, update_rms=rms, high_snr_fraction=high))
    _, _, u_sample = (tied_stats(opt, model, args.u_sample) if b1 == b2
                      else untied_stats(opt, args.u_sample))
    val = evaluate(model, data, args.eval_batches, args.batch, cfg.seq, seed=10_000 + seed)
    return dict(setting=setting, betas=[b1, b2], lr=lr, seed=seed, val_loss=val,
                train_loss=losses, stats=log, u_abs_max_sample=max(u_sample, default=0.0),
                u_abs_hist=u_histogram(u_sample), seconds=time.time() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=SCRATCH, help=OUT_HELP)
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--seeds", type=int, default=2)
    add_lm_args(ap, steps=300)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--u-sample", type=int, default=20000)
    ap.add_argument("--plot-from", default=None, help="re-plot a beta_study.json, train nothing")
    args = ap.parse_args(argv)
    if args.plot_from:
        import json
        with open(args.plot_from) as f:
            d = json.load(f)
        plot(d["runs"], d["summary"], os.path.join(args.out, "beta_study.png"),
             d["model"]["params"], args)
        return 0
    cfg, data = setup(args)
    settings = args.settings.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    runs = []
    total = len(settings) * len(lrs) * args.seeds
    for setting in settings:
        for lr in lrs:
            for seed in range(args.seeds):
                progress(f"[{len(runs) + 1}/{total}] {setting} lr={lr:g} seed={seed} ...")
                runs.append(run(setting, lr, seed, data, cfg, args, args.device))
                progress(f"  val {runs[-1]['val_loss']:.4f} ({runs[-1]['seconds']:.0f} s)")
    summary = []
    for setting in settings:
        by_lr = {lr: [r for r in runs if r["setting"] == setting and r["lr"] == lr] for lr in lrs}
        mean = {lr: sum(r["val_loss"] for r in rs) / len(rs) for lr, rs in by_lr.items()}
        best = min(mean, key=mean.get)
        vals = [r["val_loss"] for r in by_lr[best]]
        last = [r["stats"][-1] for r in by_lr[best]]
        summary.append(dict(setting=setting, best_lr=best, val_loss_mean=mean[best],
                            val_loss_min=min(vals), val_loss_max=max(vals),
                            val_loss_by_lr=mean,
                            final_update_rms=sum(s["update_rms"] for s in last) / len(last),
                            final_high_snr_fraction=sum(s["high_snr_fraction"] for s in last) / len(last)))
    n_params = sum(p.numel() for p in TinyLM(cfg).parameters())
    path = write_json(args.out, "beta_study.json", dict(
        what="tied vs untied betas, small LM on the Python stdlib source",
        model=dict(cfg.__dict__, params=n_params), config=vars(args), machine=machine(),
        versions=versions(), summary=summary, runs=runs))
    plot(runs, summary, os.path.join(args.out, "beta_study.png"), n_params, args)
    print(f"\nbeta study: {n_params:,}-param LM, {args.steps} steps x {args.batch}x{args.seq} tokens, "
          f"{args.seeds} seeds, lrs {lrs}, {args.device}")
    print(f"{'setting':<22}{'best lr':>9}{'val (mean)':>12}{'min..max':>18}{'upd RMS':>9}{'hi-SNR':>8}")
    for s in summary:
        print(f"{s['setting']:<22}{s['best_lr']:>9g}{s['val_loss_mean']:>12.4f}"
              f"{s['val_loss_min']:>9.4f}..{s['val_loss_max']:.4f}{s['final_update_rms']:>9.3f}"
              f"{s['final_high_snr_fraction']:>8.3f}")
    print(f"wrote {path}")
    return 0


def plot(runs, summary, path, n_params, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from precision_study import smooth
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for s in summary:
        rs = [r for r in runs if r["setting"] == s["setting"] and r["lr"] == s["best_lr"]]
        curve = [sum(x) / len(x) for x in zip(*(smooth(r["train_loss"]) for r in rs))]
        axes[0].plot(curve, label=f"{s['setting']} (lr {s['best_lr']:g})", lw=1)
        hist = [sum(c) for c in zip(*(r["u_abs_hist"] for r in rs))]
        width = U_MAX / U_BINS
        total = max(1, sum(hist))
        axes[2].stairs([h / total / width for h in hist], [i * width for i in range(U_BINS + 1)],
                       label=s["setting"])
    axes[0].set(xlabel="step", ylabel="train loss (smoothed, seed mean)",
                title=f"{n_params:,}-param LM, best lr per setting")
    axes[0].legend(fontsize=7)
    xs = range(len(summary))
    axes[1].errorbar(xs, [s["val_loss_mean"] for s in summary],
                     yerr=[[s["val_loss_mean"] - s["val_loss_min"] for s in summary],
                           [s["val_loss_max"] - s["val_loss_mean"] for s in summary]],
                     fmt="o", capsize=4)
    axes[1].set_xticks(list(xs), [s["setting"] for s in summary], rotation=20, fontsize=7)
    axes[1].set(ylabel="validation loss (best lr; seed min..max)", title="final validation loss")
    axes[2].set(xlabel="|u| = |m_hat| / (sqrt(v_hat) + eps) at the end", ylabel="density",
                title="update magnitude before lr")
    axes[2].axvline(1.0, color="k", lw=0.5)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
