"""Selection: turn a probability distribution over candidates into a kept set.

Everything here works on the last dimension of a tensor and is shared by AdaS-Attn (candidates =
cubes, one distribution per query and head) and AdaS-FFN (candidates = the tokens of one cube).

Top-p ("nucleus") semantics, as the whole package uses them: sort the candidates by descending probability
(stable: on ties the lower index comes first) and keep the shortest prefix whose cumulative mass is
``>= p``; at least one candidate is kept whenever one exists; ``p >= 1`` keeps every candidate.
Equivalently, the candidate of rank ``r`` is kept iff the mass strictly before it is ``< p``; a
mass within rounding error of ``p`` (:data:`TOP_P_TOLERANCE`) counts as ``p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "PARTIAL_MIN",
    "PARTIAL_MIN_CANDIDATES",
    "PARTIAL_PROBE",
    "TOP_P_PARTIAL",
    "TOP_P_TOLERANCE",
    "SelectionPolicy",
    "entropy",
    "keep_from_probs",
    "keep_from_probs_reference",
    "masked_softmax",
]

#: per-candidate rounding allowance of the Top-p cumulative mass, by dtype (times the row length)
TOP_P_TOLERANCE = {
    torch.float32: 4 * torch.finfo(torch.float32).eps,
    torch.float64: 4 * torch.finfo(torch.float64).eps,
}


@dataclass(frozen=True)
class SelectionPolicy:
    """How many candidates to keep from a distribution.

    Attributes:
        kind: ``"top_p"`` (nucleus with threshold ``p``), ``"top_k"`` (the ``k`` most probable) or
            ``"ratio"`` (the ``ceil(ratio · n_candidates)`` most probable).
        p: Top-p threshold in (0, 1].
        k: Count for ``top_k``.
        ratio: Fraction for ``ratio``.
        min_keep: Lower bound on the kept count (capped by the number of candidates).
        max_keep: Optional upper bound on the kept count.
    """

    kind: str = "top_p"
    p: float = 0.9
    k: int = 8
    ratio: float = 0.25
    min_keep: int = 0
    max_keep: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("top_p", "top_k", "ratio"):
            raise ValueError(f"SelectionPolicy.kind must be 'top_p', 'top_k' or 'ratio', got {self.kind!r}")
        if not (isinstance(self.p, (int, float)) and 0.0 < self.p <= 1.0):
            raise ValueError(f"SelectionPolicy.p must be in (0, 1], got {self.p!r}")
        if not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"SelectionPolicy.k must be an integer >= 1, got {self.k!r}")
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0):
            raise ValueError(f"SelectionPolicy.ratio must be in (0, 1], got {self.ratio!r}")
        if not (isinstance(self.min_keep, int) and self.min_keep >= 0):
            raise ValueError(f"SelectionPolicy.min_keep must be an integer >= 0, got {self.min_keep!r}")
        if self.max_keep is not None and not (isinstance(self.max_keep, int) and self.max_keep >= 1):
            raise ValueError(f"SelectionPolicy.max_keep must be None or >= 1, got {self.max_keep!r}")

    @property
    def keeps_all(self) -> bool:
        """True when the policy keeps every candidate whatever the distribution."""
        if self.max_keep is not None:
            return False
        return (self.kind == "top_p" and self.p >= 1.0) or (self.kind == "ratio" and self.ratio >= 1.0)


def as_policy(p: float | SelectionPolicy | None, policy: SelectionPolicy | None) -> SelectionPolicy:
    """Normalise the ``(p, policy)`` pair accepted by the public ops into one policy."""
    if policy is not None:
        return policy
    if isinstance(p, SelectionPolicy):
        return p
    if p is None:
        return SelectionPolicy()
    return SelectionPolicy(kind="top_p", p=float(p))


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``valid``; rows without a valid entry give zeros.

    Non-finite scores have a defined result (scores of a NaN/inf query or cube mean key, or a
    float32 overflow of ``q · k̄``), so a single bad cube cannot derail the selection of the others:

    * ``NaN`` counts as ``-inf``: probability exactly 0, and the other entries are normalised
      without it (a row whose valid scores are all NaN gives zeros, like a row with none);
    * ``+inf`` entries share the row's whole mass equally (the limit of the softmax), the finite
      ones get 0;
    * ``-inf`` gets probability 0.

    The output never contains NaN. Only the row maxima are checked on the common (finite) path.

    Args:
        scores: ``[..., C]`` float scores (any float dtype; computed in float32).
        valid: ``[..., C]`` bool, broadcastable to ``scores``.

    Returns:
        ``[..., C]`` float32 probabilities, exactly 0 outside ``valid``; rows sum to 1 or 0.
    """
    s = scores.float().masked_fill(~valid, float("-inf"))
    mx = s.amax(dim=-1, keepdim=True)  # NaN iff the row holds a NaN, +inf iff it holds a +inf
    if bool((torch.isnan(mx) | torch.isposinf(mx)).any()):
        s = s.masked_fill(torch.isnan(s), float("-inf"))
        mx = s.amax(dim=-1, keepdim=True)
        top = torch.isposinf(mx)
        shift = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        e = torch.where(top, torch.isposinf(s).float(), torch.exp(s - shift))
    else:
        e = torch.exp(s - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    z = e.sum(dim=-1, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dim; zero entries contribute nothing. ``[..., C] -> [...]``."""
    p = probs.float()
    return -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim=-1)


#: Top-p reads the ``TOP_P_PARTIAL`` most probable candidates of a row (a partial sort, about twice
#: as fast as sorting hundreds of cubes); rows whose nucleus needs more are sorted whole
TOP_P_PARTIAL = 64
#: below this many probabilities the whole sort is as fast (the partial path is a dozen small ops)
PARTIAL_MIN = 1 << 16
#: ... and for rows of at most this many candidates (sorting 126 cubes costs about what the partial
#: sort does; 254 and 510 were 1.3-2x faster partially on peaked rows: benchmarks/selection_speed.py)
PARTIAL_MIN_CANDIDATES = 2 * TOP_P_PARTIAL
#: rows tried first: when most of them need more than the partial sort, every row is sorted whole
PARTIAL_PROBE = 64


def keep_from_probs(probs: torch.Tensor, valid: torch.Tensor, policy: SelectionPolicy) -> torch.Tensor:
    """The kept set of each row of a distribution (:func:`keep_from_probs_reference`'s result, with
    partial sorts for Top-p over more than :data:`TOP_P_PARTIAL` candidates).

    Args, returns: as :func:`keep_from_probs_reference`.
    """
    valid = valid.expand_as(probs)
    c = probs.shape[-1]
    partial = (
        policy.kind == "top_p"
        and policy.p < 1.0
        and c > max(TOP_P_PARTIAL, PARTIAL_MIN_CANDIDATES)
        and probs.numel() >= PARTIAL_MIN
    )
    if not partial:
        return keep_from_probs_reference(probs, valid, policy)
    shape = probs.shape
    probs, valid = probs.reshape(-1, c), valid.reshape(-1, c)
    keep = torch.empty_like(valid)
    # a row's nucleus holds at least p / (its largest probability) candidates: rows that cannot fit
    # in the partial sort go straight to the whole one, and so do those found not to fit
    need = policy.p / probs.masked_fill(~valid, 0.0).amax(dim=-1).clamp_min(1e-30).double()
    fits = need <= TOP_P_PARTIAL
    rows = fits.nonzero().squeeze(1)
    whole = (~fits).nonzero().squeeze(1)
    # a flat distribution passes that bound and still needs the whole sort: try a few rows first,
    # and sort every row whole when most of those do not fit (the partial sort would be wasted)
    for first, part in ((True, rows[:PARTIAL_PROBE]), (False, rows[PARTIAL_PROBE:])):
        if not part.numel():
            continue
        kept, more = _top_p_prefix(probs[part], valid[part], policy, TOP_P_PARTIAL)
        if first and 2 * int(more.sum()) > part.numel():
            return keep_from_probs_reference(probs, valid, policy).view(shape)
        keep[part] = kept
        whole = torch.cat([whole, part[more]])
    if whole.numel():
        keep[whole] = keep_from_probs_reference(probs[whole], valid[whole], policy)
    return keep.view(shape)


def _keep_bounds(n_keep: torch.Tensor, n_valid: torch.Tensor, policy: SelectionPolicy) -> torch.Tensor:
    """The kept count within the policy's bounds: at least one (and ``min_keep``) where a candidate
    exists, at most the candidates and ``max_keep``."""
    n_keep = torch.maximum(n_keep, torch.clamp(n_valid, max=max(policy.min_keep, 1)))
    n_keep = torch.minimum(n_keep, n_valid)
    if policy.max_keep is not None:
        n_keep = torch.clamp(n_keep, max=policy.max_keep)
    return n_keep


def _top_p_prefix(probs, valid, policy: SelectionPolicy, width: int):
    """Top-p of ``[R, C]`` rows from their ``width`` largest values: ``(keep, more)``, ``more`` ``[R]``
    marking the rows whose nucleus may reach past them (their ``keep`` is not final)."""
    key = probs.to(torch.promote_types(probs.dtype, torch.float32)).masked_fill(~valid, -1.0)
    n_valid = valid.sum(dim=-1, keepdim=True)
    top = torch.topk(key, width, dim=-1, sorted=True).values  # the sorted order's first values
    sp = top.clamp_min(0.0)
    before = torch.cumsum(sp, dim=-1) - sp  # the same prefix sums as over the whole sorted row
    reach = before < policy.p - TOP_P_TOLERANCE[sp.dtype]
    rank = torch.arange(width, device=probs.device)
    n_keep = (reach & (rank < n_valid)).sum(dim=-1, keepdim=True)
    n_keep = _keep_bounds(n_keep, n_valid, policy)
    more = ((reach[:, -1:] & (n_valid > width)) | (n_keep > width)).squeeze(1)
    # the kept prefix of the stable order: every value above the last kept one, and of the values
    # equal to it the lowest-indexed ones (stable ties) up to the count
    last = top.gather(-1, (n_keep - 1).clamp(0, width - 1))
    last = torch.where(n_keep > 0, last, torch.full_like(last, float("inf")))
    above = key > last
    tie = key == last
    keep = above | (tie & (torch.cumsum(tie, dim=-1) <= n_keep - above.sum(dim=-1, keepdim=True)))
    return keep, more


def keep_from_probs_reference(
    probs: torch.Tensor, valid: torch.Tensor, policy: SelectionPolicy
) -> torch.Tensor:
    """The kept set of each row of a distribution, from the whole stable sort of every row.

    Args:
        probs: ``[..., C]`` probabilities (float32 or float64, kept at that precision; zero outside
            ``valid``; rows sum to 1 or 0; no NaN, as :func:`masked_softmax` guarantees).
        valid: ``[..., C]`` bool candidate mask (same shape as ``probs``).
        policy: How many to keep.

    Returns:
        ``[..., C]`` bool, a subset of ``valid``. A row with ``n >= 1`` candidates keeps at least
        one, and always a prefix of the stable descending order of ``probs``.

    Example:
        >>> p = torch.tensor([[0.1, 0.6, 0.3]])
        >>> keep_from_probs_reference(p, p > 0, SelectionPolicy(p=0.8)).tolist()
        [[False, True, True]]
    """
    valid = valid.expand_as(probs)
    n_valid = valid.sum(dim=-1, keepdim=True)
    if policy.keeps_all:
        return valid.clone()
    c = probs.shape[-1]
    # invalid entries sort last; stable so that ties keep the lower index first
    key = probs.to(torch.promote_types(probs.dtype, torch.float32)).masked_fill(~valid, -1.0)
    sorted_p, order = torch.sort(key, dim=-1, descending=True, stable=True)
    rank = torch.arange(c, device=probs.device)
    if policy.kind == "top_p":
        if policy.p >= 1.0:
            n_keep = n_valid
        else:
            sp = sorted_p.clamp_min(0.0)
            before = torch.cumsum(sp, dim=-1) - sp
            # a mass equal to p up to rounding counts as reached (uniform distributions, e.g. the
            # identical norms of static frames, would otherwise keep one extra candidate)
            tol = TOP_P_TOLERANCE[sp.dtype]
            n_keep = ((before < policy.p - tol) & (rank < n_valid)).sum(dim=-1, keepdim=True)
    elif policy.kind == "top_k":
        n_keep = torch.clamp(n_valid, max=policy.k)
    else:  # ratio
        n_keep = torch.ceil(n_valid.double() * policy.ratio - 1e-9).long()
    n_keep = _keep_bounds(n_keep, n_valid, policy)
    keep_sorted = rank < n_keep
    return torch.zeros_like(valid).scatter(-1, order, keep_sorted)
