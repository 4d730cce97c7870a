"""The split-master codec (tiedadam/kernels/split_master.py, Note [split master]): join(split(x))
is x bit for bit over every bf16 binade boundary, ties, subnormals, +-0 and inf, with every one
of the 65,536 low halves under each head tested; the head is torch's round-to-nearest-even bf16
except on the exact ties the tie rule names; NaN stays NaN."""

from __future__ import annotations

import pytest
import torch

from tiedadam.kernels import split_master as S

# high halves (bf16 patterns) around which every low half is tried: zero and the subnormals'
# edge, the smallest normal, 1.0 and its neighbours, binade edges, the largest finite bf16 and
# inf, and their negatives
HEADS = [0x0000, 0x0001, 0x007F, 0x0080, 0x0081, 0x3F7F, 0x3F80, 0x3F81, 0x3FFF, 0x4000,
         0x7F7E, 0x7F7F, 0x7F80]
HEADS += [h | 0x8000 for h in HEADS]


def _patterns(heads) -> torch.Tensor:
    hi = torch.tensor(heads, dtype=torch.int64)[:, None] << 16
    lo = torch.arange(1 << 16, dtype=torch.int64)[None, :]
    b = (hi | lo).reshape(-1)
    return torch.where(b >= 1 << 31, b - (1 << 32), b).to(torch.int32).view(torch.float32)


def _random_heads(n):
    return torch.randint(0, 1 << 16, (n,)).tolist()


@pytest.mark.parametrize("heads", ["edges", "random"])
def test_join_of_split_is_the_master_bit_for_bit(heads):
    x = _patterns(HEADS if heads == "edges" else _random_heads(24))
    finite_or_inf = ~x.isnan()
    head, rem = S.split(x)
    assert head.dtype == torch.bfloat16 and rem.dtype == torch.int16
    back = S.join(head, rem)
    assert torch.equal(back.view(torch.int32)[finite_or_inf], x.view(torch.int32)[finite_or_inf])
    assert back[~finite_or_inf].isnan().all() and head[~finite_or_inf].isnan().all()
    assert (rem[~finite_or_inf] == 0).all()


@pytest.mark.parametrize("heads", ["edges", "random"])
def test_head_is_round_to_nearest_even_except_on_the_named_ties(heads):
    x = _patterns(HEADS if heads == "edges" else _random_heads(24))
    head, _ = S.split(x)
    rne = x.to(torch.bfloat16)
    ok = ~x.isnan()
    differ = (head.view(torch.int16) != rne.view(torch.int16)) & ok
    assert torch.equal(differ, S.ties_differ(x))
    # the named ties: low half exactly 0x8000, even high half: one bf16 ulp further from zero
    n_ties = int(differ.sum())
    n_heads = len(HEADS) if heads == "edges" else 24
    assert 0 < n_ties <= n_heads
    h, r = head.view(torch.int16)[differ].to(torch.int32), rne.view(torch.int16)[differ]
    assert torch.equal((h - r.to(torch.int32)).abs(), torch.ones_like(h))
    assert (head[differ].float().abs() > x[differ].abs()).all()


def test_remainder_spans_the_int16_range_and_crosses_binades():
    """At a binade edge the head rounds up into the next binade and the remainder is negative:
    1.0 - 2**-24 (pattern 0x3F7FFFFF) has head 1.0 and remainder -1."""
    x = torch.tensor([1.0 - 2 ** -24, 1.0, 2.0 ** -126, -(2.0 ** -149), 0.0, -0.0,
                      float("inf"), -float("inf"), 3.4028234663852886e38])
    head, rem = S.split(x)
    assert head[0].item() == 1.0 and rem[0].item() == -1
    assert rem[1].item() == 0 and rem[4].item() == 0 and rem[6].item() == 0
    assert torch.equal(S.join(head, rem).view(torch.int32), x.view(torch.int32))  # -0.0 kept
    assert head[8].isinf() and x.to(torch.bfloat16)[8].isinf()  # as round-to-nearest-even
    every = _patterns([0x3F80])
    _, rem = S.split(every)
    assert int(rem.min()) == -0x8000 and int(rem.max()) == 0x7FFF


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match="master must be float32"):
        S.split(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="rem int16"):
        S.join(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="differ"):
        S.join(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.int16))
