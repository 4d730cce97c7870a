"""A small decoder-only transformer LM and its data, shared by the accuracy and beta studies.

Data: the Python standard library's own source text (ships with every Python: runs offline),
byte-level tokens (vocabulary 256), files in sorted order, the last 10 % held out.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sysconfig
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of the standard library's .py sources, as uint8 token ids."""
    root = sysconfig.get_paths()["stdlib"]
    out, n = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        out.append(data)
        n += len(data)
        if n >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(out)[:limit]), dtype=torch.uint8).long()


@dataclass
class Data:
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def load(cls, n_bytes: int) -> "Data":
        tokens = stdlib_bytes(n_bytes)
        cut = int(len(tokens) * 0.9)
        return cls(tokens[:cut], tokens[cut:])

    def batch(self, split: str, batch: int, seq: int, gen: torch.Generator):
        src = self.train if split == "train" else self.val
        idx = torch.randint(0, len(src) - seq - 1, (batch,), generator=gen)
        x = torch.stack([src[i:i + seq] for i in idx.tolist()])
        y = torch.stack([src[i + 1:i + seq + 1] for i in idx.tolist()])
        return x, y


@dataclass
class LMConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq: int = 128
    vocab: int = 256


class Block(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.fc = nn.Linear(c.d_model, 4 * c.d_model)
        self.out = nn.Linear(4 * c.d_model, c.d_model)
        self.n_heads = c.n_heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.tok = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Embedding(c.seq, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab, bias=False)

    def forward(self, x, y=None):
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for blk in self.blocks:
            h = blk(h)
        logits = self.head(self.ln(h))
        if y is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))


def param_groups(model: nn.Module, weight_decay: float):
    """No weight decay on biases, norms and embeddings (the usual LM recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "tok" not in name and "pos" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_step(model, opt, data: Data, batch: int, seq: int, gen: torch.Generator,
               device) -> float:
    """One training batch: forward, backward, ``opt.step()``, ``zero_grad``; the loss."""
    x, y = data.batch("train", batch, seq, gen)
    loss = model(x.to(device), y.to(device))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model, data: Data, batches: int, batch: int, seq: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    loss = sum(float(model(*data.batch("val", batch, seq, gen))) for _ in range(batches))
    model.train()
    return loss / batches


def add_lm_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The model, data and training options the studies share."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--data-bytes", type=int, default=2_000_000)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def setup(args) -> tuple[LMConfig, Data]:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = LMConfig(d_model=args.d_model, n_layers=args.layers,
                   n_heads=max(1, args.d_model // 32), seq=args.seq)
    return cfg, Data.load(args.data_bytes)
