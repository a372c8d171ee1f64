"""Budget mode: the Top-p threshold that keeps a given fraction of a weighted candidate set.

A row of ``probs`` is one Top-p selection (:func:`adaspark.ops.selection.keep_from_probs`: the
candidate of rank ``r`` of the stable descending order is kept iff ``r = 0`` or the mass strictly
before it is ``< p - tol``, :data:`~adaspark.ops.selection.TOP_P_TOLERANCE`). Each candidate carries
a weight (the (query, key) pairs of a cube pair, or 1 per token); :func:`top_p_for_fraction` returns
the smallest ``p`` whose kept sets, over every row at once, hold at least ``fraction`` of the total
candidate weight. :func:`top_p_for_fraction_reference` finds the same ``p`` by bisection (for tests).

Layout: ``probs`` ``[..., C]`` (float32 or float64, zero outside ``valid``, rows sum to 1 or 0),
``valid`` ``[..., C]`` bool, ``weights`` broadcastable to ``probs`` (non-negative).
"""

from __future__ import annotations

import torch

from adaspark.ops.selection import TOP_P_TOLERANCE, SelectionPolicy, keep_from_probs

__all__ = ["P_MIN", "kept_weight", "top_p_for_fraction", "top_p_for_fraction_reference"]

#: the threshold returned when the rank-0 entries alone reach the target (below every tolerance:
#: nothing but rank 0 is kept)
P_MIN = 1e-30


def _check(probs: torch.Tensor, valid: torch.Tensor, weights, fraction) -> torch.Tensor:
    if not isinstance(probs, torch.Tensor) or probs.dim() < 1 or probs.dtype not in TOP_P_TOLERANCE:
        raise ValueError(
            f"probs must be a float32/float64 tensor [..., C], got {getattr(probs, 'dtype', type(probs))}"
        )
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got {getattr(valid, 'dtype', type(valid))}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    w = torch.as_tensor(weights, dtype=torch.float64, device=probs.device)
    try:
        w = torch.broadcast_to(w, probs.shape)
    except RuntimeError:
        raise ValueError(
            f"weights of shape {tuple(w.shape)} do not broadcast to probs {tuple(probs.shape)}"
        ) from None
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError("weights must be finite and non-negative")
    return w


def kept_weight(probs: torch.Tensor, valid: torch.Tensor, weights, p: float) -> float:
    """Total weight of the candidates the Top-p sets at ``p`` keep (``keep_from_probs``)."""
    w = torch.broadcast_to(torch.as_tensor(weights, dtype=torch.float64, device=probs.device), probs.shape)
    keep = keep_from_probs(probs, valid.expand_as(probs), SelectionPolicy(kind="top_p", p=float(p)))
    return float((w * keep).sum())


def top_p_for_fraction(probs: torch.Tensor, valid: torch.Tensor, weights, fraction: float) -> float:
    """The smallest Top-p threshold in (0, 1] that keeps at least ``fraction`` of the candidate weight.

    Exact: each candidate of rank ``r >= 1`` enters the kept set once ``p`` exceeds the mass before
    it (plus the tolerance); rank 0 is always kept. The entries sorted by that mass, their weights
    cumulated, give the first entry that reaches ``fraction · total``; the threshold returned lies
    just above its mass (the next float32/float64 value the comparison of ``keep_from_probs``
    distinguishes), clamped to (0, 1]. ``fraction = 0`` (or a target the rank-0 entries already
    reach) gives :data:`P_MIN`; a target out of reach below ``p = 1`` gives 1.

    Args:
        probs: ``[..., C]`` distributions (float32/float64, as for ``keep_from_probs``).
        valid: ``[..., C]`` bool candidates (broadcastable to ``probs``).
        weights: weight of each candidate, broadcastable to ``probs`` (non-negative).
        fraction: in ``[0, 1]``.

    Returns:
        ``p`` as a Python float.

    Example:
        >>> probs = torch.tensor([[0.5, 0.3, 0.2]]); valid = torch.ones(1, 3, dtype=torch.bool)
        >>> p = top_p_for_fraction(probs, valid, 1.0, 2 / 3)
        >>> keep_from_probs(probs, valid, SelectionPolicy(p=p)).tolist()
        [[True, True, False]]
    """
    w = _check(probs, valid, weights, fraction)
    valid = valid.expand_as(probs)
    total = float((w * valid).sum())
    target = fraction * total
    # the sort and the mass before each entry exactly as keep_from_probs computes them
    key = probs.to(torch.promote_types(probs.dtype, torch.float32)).masked_fill(~valid, -1.0)
    sorted_p, order = torch.sort(key, dim=-1, descending=True, stable=True)
    sp = sorted_p.clamp_min(0.0)
    before = (torch.cumsum(sp, dim=-1) - sp).reshape(-1, probs.shape[-1])
    ws = (w * valid).gather(-1, order).reshape(-1, probs.shape[-1])
    n_valid = valid.sum(-1).reshape(-1, 1)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    always = (rank == 0) & (n_valid > 0)
    later = (rank > 0) & (rank < n_valid)
    base = float(ws[always].sum())
    tol = TOP_P_TOLERANCE[sp.dtype]
    if target <= base * (1 + 1e-12) or not bool(later.any()):
        return P_MIN
    b = before[later].double()
    order_b = torch.argsort(b, stable=True)
    cum = base + torch.cumsum(ws[later].double()[order_b], 0)
    hit = torch.nonzero(cum >= target * (1 - 1e-12))
    if hit.numel() == 0:
        return 1.0
    return _just_above(float(b[order_b[int(hit[0])]]), tol, sp.dtype)


def _just_above(b: float, tol: float, dtype: torch.dtype) -> float:
    """The smallest float ``p`` (within a few ulps) with ``dtype(p - tol) > b``, clamped to (0, 1]."""
    tiny = torch.finfo(dtype).tiny
    step = max(torch.finfo(dtype).eps * abs(b), tiny)
    p = b + tol + step
    for _ in range(64):  # the comparison rounds p - tol to dtype: step up until it clears b
        if float(torch.tensor(p - tol, dtype=torch.float64).to(dtype)) > b:
            break
        p += step
    return min(p, 1.0)


def top_p_for_fraction_reference(probs: torch.Tensor, valid: torch.Tensor, weights, fraction: float) -> float:
    """:func:`top_p_for_fraction` by bisection on ``p`` with ``keep_from_probs`` (naive, for tests).

    The kept weight is monotone in ``p``; the bisection narrows ``[lo, hi]`` (``lo`` fails, ``hi``
    reaches the target) to the float resolution and returns ``hi`` (:data:`P_MIN` when that
    already reaches it).
    """
    w = _check(probs, valid, weights, fraction)
    valid = valid.expand_as(probs)
    target = fraction * float((w * valid).sum())

    def reaches(p: float) -> bool:
        return kept_weight(probs, valid, w, p) >= target * (1 - 1e-12)

    if reaches(P_MIN):
        return P_MIN
    lo, hi = P_MIN, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    return hi
