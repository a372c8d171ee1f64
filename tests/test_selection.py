import math
import random

import pytest
import torch

from adaspark.ops.selection import (
    TOP_P_PARTIAL,
    SelectionPolicy,
    entropy,
    keep_from_probs,
    keep_from_probs_reference,
    masked_softmax,
)


def naive_keep(probs: list[float], valid: list[bool], pol: SelectionPolicy) -> list[bool]:
    """Textbook selection on Python floats: stable descending sort, then the policy's prefix."""
    cand = [i for i in range(len(probs)) if valid[i]]
    order = sorted(cand, key=lambda i: -probs[i])  # Python's sort is stable
    n = len(order)
    if n == 0:
        return [False] * len(probs)
    if pol.kind == "top_p":
        if pol.p >= 1:
            k = n
        else:
            k, acc = 0, 0.0
            while k < n and acc < pol.p:
                acc += probs[order[k]]
                k += 1
    elif pol.kind == "top_k":
        k = min(pol.k, n)
    else:
        k = max(1, math.ceil(pol.ratio * n - 1e-9))
    k = max(k, min(max(pol.min_keep, 1), n))
    k = min(k, n)
    if pol.max_keep is not None:
        k = min(k, pol.max_keep)
    out = [False] * len(probs)
    for i in order[:k]:
        out[i] = True
    return out


@pytest.mark.parametrize(
    "pol",
    [
        SelectionPolicy(p=0.3),
        SelectionPolicy(p=0.7),
        SelectionPolicy(p=0.95),
        SelectionPolicy(p=1.0),
        SelectionPolicy(kind="top_k", k=3),
        SelectionPolicy(kind="ratio", ratio=0.4),
        SelectionPolicy(p=0.5, min_keep=4),
        SelectionPolicy(p=0.99, max_keep=2),
    ],
)
def test_keep_matches_naive(pol):
    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        c = rng.randint(1, 12)
        valid = torch.rand(c, generator=g) < 0.8
        probs = masked_softmax(torch.randn(c, generator=g) * 3, valid).double()
        got = keep_from_probs(probs[None], valid[None], pol)[0].tolist()
        assert got == naive_keep(probs.tolist(), valid.tolist(), pol)


def _awkward_rows(c: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``c`` candidates: peaked, flat (nucleus past the partial sort), tied, with zero and
    invalid entries, no candidate at all, and a few candidates only."""
    g = torch.Generator().manual_seed(c)
    scores = torch.randn(12, c, generator=g, dtype=torch.float64)
    scores[0] *= 8  # peaked: a few cubes hold the mass
    scores[1] *= 0.01  # nearly flat: the nucleus needs more than the partial sort holds
    scores[2] = 0.0  # exactly uniform: every boundary is a tie
    scores[3] = torch.randint(0, 3, (c,), generator=g).double()  # three tied levels
    scores[4, : c // 2] = -200.0  # probabilities that underflow to zero
    valid = torch.rand(12, c, generator=g) < 0.9
    valid[5] = False  # no candidate
    valid[6] = False
    valid[6, :3] = True  # three candidates
    valid[7] = True
    valid[7, TOP_P_PARTIAL + 2 :] = False  # just past the partial sort's width
    return masked_softmax(scores, valid).to(dtype), valid


@pytest.mark.parametrize("probe", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [TOP_P_PARTIAL + 1, 3 * TOP_P_PARTIAL + 7, 8 * TOP_P_PARTIAL])
def test_partial_sort_top_p_equals_the_whole_sort(c, dtype, probe, monkeypatch):
    from adaspark.ops import selection

    monkeypatch.setattr(selection, "PARTIAL_MIN", 0)  # these rows are few: force the partial path
    monkeypatch.setattr(selection, "PARTIAL_MIN_CANDIDATES", 0)
    monkeypatch.setattr(selection, "PARTIAL_PROBE", probe)  # 0: no probe, every row tries it
    probs, valid = _awkward_rows(c, dtype)
    probs3 = probs.view(3, 4, c)  # leading dimensions, as [Hq, rows, C]
    valid3 = valid.view(3, 4, c)
    for pol in [SelectionPolicy(p=p) for p in (0.05, 0.3, 0.5, 0.7, 0.9, 0.95, 0.999)] + [
        SelectionPolicy(p=0.5, min_keep=2 * TOP_P_PARTIAL),
        SelectionPolicy(p=0.9, max_keep=5),
    ]:
        got = keep_from_probs(probs3, valid3, pol)
        want = keep_from_probs_reference(probs3, valid3, pol)
        assert torch.equal(got, want), (pol, (got != want).nonzero()[:5].tolist())


def test_ties_keep_lower_index_first():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    keep = keep_from_probs(probs, torch.ones_like(probs, dtype=torch.bool), SelectionPolicy(p=0.5))
    assert keep.tolist() == [[True, True, False, False]]


def test_at_least_one_and_empty_rows():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    keep = keep_from_probs(probs, valid, SelectionPolicy(p=0.01))
    assert keep.tolist() == [[True, False, False], [False, False, False]]


def test_p_one_keeps_even_zero_probability_candidates():
    probs = torch.tensor([[1.0, 0.0, 0.0]])
    keep = keep_from_probs(probs, torch.ones(1, 3, dtype=torch.bool), SelectionPolicy(p=1.0))
    assert keep.all()


def test_masked_softmax_and_entropy():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, False, True], [False, False, False]])
    p = masked_softmax(s, valid)
    assert p[0, 1] == 0 and torch.allclose(p[0].sum(), torch.tensor(1.0))
    assert p[1].sum() == 0
    uniform = torch.full((1, 4), 0.25)
    assert torch.allclose(entropy(uniform), torch.tensor([math.log(4)]))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="nucleus"),
        dict(p=0.0),
        dict(p=1.5),
        dict(k=0),
        dict(ratio=0),
        dict(min_keep=-1),
        dict(max_keep=0),
    ],
)
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        SelectionPolicy(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_shares_reach_p_exactly(dtype):
    """r of n equal shares have mass r/n: Top-p at p = r/n keeps exactly r (rounding tolerated)."""
    for n in (3, 7, 10, 64, 100, 128):
        probs = torch.full((1, n), 1.0 / n, dtype=dtype)
        valid = torch.ones(1, n, dtype=torch.bool)
        for r in range(1, n):
            assert keep_from_probs(probs, valid, SelectionPolicy(p=r / n)).sum().item() == r, (n, r)
