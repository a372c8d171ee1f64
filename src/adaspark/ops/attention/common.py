"""Pieces shared by every AdaS-Attn path: the input preamble, per-block cube selection, statistics.

Tensor layout (the one layout of ``adaspark.ops``):
    q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (GQA: query head ``h`` reads
    kv head ``h // (Hq // Hkv)``), ``Nq <= Nk``. Queries are the *last* ``Nq`` positions of the key
    sequence (prefill: ``Nq == Nk``; decoding with a cache: ``Nq`` new tokens), so query ``i`` sits at
    absolute position ``Nk - Nq + i``. ``cube_ids`` ``[B, Nk]`` int64 (``-1`` = not video) describes
    every key position; ``key_mask`` ``[B, Nk]`` bool (True = real token, False = padding).

Selection is always computed in float32 from a fixed blocking of the queries (:data:`SELECT_BLOCK`
rows aligned at query 0), so every path selects bit-identical cube sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaspark.ops.cubes import CubeIndex, build_cube_index, cube_mean_keys
from adaspark.ops.selection import SelectionPolicy, as_policy, entropy, keep_from_probs, masked_softmax

#: the selection granularities (see :mod:`adaspark.ops.attention.units`)
GRANULARITIES: tuple[str, ...] = ("token", "cube")

#: queries scored per selection matmul (a fixed blocking aligned at query 0: bit-identical selections)
SELECT_BLOCK = 64


@dataclass
class AttentionStats:
    """Counters one attention call adds to (all over valid, i.e. non-padding, queries).

    Attributes:
        num_heads: query heads ``Hq``.
        head_dim: ``D``.
        queries: valid queries processed.
        causal_pairs: causal (query, valid key) pairs, per head (dense attention would compute
            ``causal_pairs * num_heads`` score entries).
        attended: ``[Hq]`` pairs the semantics keep, per head (the ideal).
        executed: score entries the kernel really computed, summed over heads.
        selections: ``[Hq]`` queries that ran a cube selection (had at least one candidate cube).
        entropy_sum: ``[Hq]`` sum of the entropy (nats) of the cube distributions.
        kept_sum: ``[Hq]`` sum of the number of candidate cubes kept.
        candidates_sum: ``[Hq]`` sum of the number of candidate cubes.
        mean_key_tokens: key tokens averaged into cube mean keys (per kv head).
        kv_heads: ``Hkv``.
        dense_fallbacks: calls that ran dense attention because sparse would not pay (the cost
            model or ``dense_fallback`` of :func:`adaspark.ops.cube_sparse_attention`).
        sparse_calls: calls that ran a sparse kernel.
        record: opt-in: keep the selection of every call in ``selections_log`` (costs memory:
            a ``[B, Hq, U, C + 1]`` bool table per call).
        selections_log: with ``record``, one :class:`~adaspark.ops.attention.units.Selection` per
            call that ran a cube selection, in call order: what the kernel used, also when the call
            then fell back to dense attention. Per head and query unit the kept key classes
            (``table``, own cube and non-video class included) and each query's unit (``unit``);
            :meth:`~adaspark.ops.attention.units.Selection.kept_cubes` gives the kept candidate
            cubes per query in the layout of ``reference_cube_keep``.
    """

    num_heads: int
    head_dim: int
    kv_heads: int = 0
    queries: int = 0
    causal_pairs: int = 0
    executed: int = 0
    mean_key_tokens: int = 0
    dense_fallbacks: int = 0
    sparse_calls: int = 0
    attended: torch.Tensor = field(default=None)  # type: ignore[assignment]
    selections: torch.Tensor = field(default=None)  # type: ignore[assignment]
    entropy_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    kept_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    candidates_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    record: bool = False
    selections_log: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("attended", "selections", "entropy_sum", "kept_sum", "candidates_sum"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.num_heads, dtype=torch.float64))

    def merge(self, other: AttentionStats, *, selection_only: bool = False) -> None:
        """Add ``other``'s counters (``selection_only``: only what the cube selection recorded)."""
        self.selections += other.selections
        self.entropy_sum += other.entropy_sum
        self.kept_sum += other.kept_sum
        self.candidates_sum += other.candidates_sum
        self.mean_key_tokens += other.mean_key_tokens
        self.dense_fallbacks += other.dense_fallbacks
        if self.record:
            self.selections_log.extend(other.selections_log)
        if selection_only:
            return
        self.kv_heads = other.kv_heads or self.kv_heads
        self.sparse_calls += other.sparse_calls
        self.queries += other.queries
        self.causal_pairs += other.causal_pairs
        self.executed += other.executed
        self.attended += other.attended

    @property
    def density(self) -> float:
        """Fraction of causal (query, key) pairs attended, over all heads (1.0 if none)."""
        tot = self.causal_pairs * self.num_heads
        return float(self.attended.sum().item()) / tot if tot else 1.0

    @property
    def executed_density(self) -> float:
        """Score entries computed by the kernel relative to dense causal attention."""
        tot = self.causal_pairs * self.num_heads
        return self.executed / tot if tot else 1.0

    def log_selection(self, selection) -> None:
        """Keep ``selection`` (a :class:`~adaspark.ops.attention.units.Selection`) if ``record`` is on."""
        if self.record:
            self.selections_log.append(selection)

    def add_selection(self, probs: torch.Tensor, keep: torch.Tensor, cand: torch.Tensor, qvalid) -> None:
        """Record the distributions of one block: ``probs``/``keep`` ``[Hq, bq, C]``, ``cand`` ``[bq, C]``."""
        ncand = cand.sum(-1)  # [bq]
        use = (ncand > 0) & qvalid  # [bq]
        if not bool(use.any()):
            return
        u = use.to(torch.float64)
        self.selections += u.sum().expand(self.num_heads)
        self.entropy_sum += (entropy(probs).double() * u).sum(-1)
        self.kept_sum += (keep.sum(-1).double() * u).sum(-1)
        self.candidates_sum += (ncand.double() * u).sum().expand(self.num_heads)


def check_attention_inputs(q, k, v, cube_ids, key_mask) -> tuple[int, int, int, int, int, int]:
    """Validate shapes/dtypes with clear messages; returns ``(B, Hq, Hkv, Nq, Nk, D)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D], got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    bsz, hq, nq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != bsz or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    hkv, nk = k.shape[1], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if nq > nk:
        raise ValueError(f"more queries ({nq}) than keys ({nk}): queries are the last Nq key positions")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(cube_ids, torch.Tensor) or cube_ids.shape != (bsz, nk):
        raise ValueError(
            f"cube_ids must have shape [B, Nk] = [{bsz}, {nk}], got {tuple(getattr(cube_ids, 'shape', ()))}"
        )
    if cube_ids.dtype != torch.int64:
        raise ValueError(f"cube_ids must be int64, got {cube_ids.dtype}")
    if key_mask is not None and (key_mask.shape != (bsz, nk) or key_mask.dtype != torch.bool):
        raise ValueError(
            f"key_mask must be a bool tensor [B, Nk] = [{bsz}, {nk}], got "
            f"{tuple(key_mask.shape)} {key_mask.dtype}"
        )
    return bsz, hq, hkv, nq, nk, d


def check_fraction(name: str, value) -> float:
    """A kernel threshold in ``[0, 1]``, or a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


@dataclass(frozen=True)
class AttentionInputs:
    """The checked inputs of one attention call, with every default filled in.

    What :func:`prepare_inputs` returns and every backend starts from. ``key_mask`` is never
    ``None`` (all True without padding); ``mean_keys`` and ``index`` are the caller's or computed
    here (``own_means`` says which, for the ``mean_key_tokens`` statistic).
    """

    bsz: int
    hq: int
    hkv: int
    nq: int
    nk: int
    d: int
    cube_ids: torch.Tensor
    key_mask: torch.Tensor
    index: CubeIndex
    mean_keys: torch.Tensor
    policy: SelectionPolicy
    scale: float
    granularity: str
    own_means: bool

    @property
    def q_offset(self) -> int:
        """Position of the first query: queries are the last ``Nq`` of the ``Nk`` key positions."""
        return self.nk - self.nq

    @property
    def query_valid(self) -> torch.Tensor:
        """``[B, Nq]`` bool, False for padding queries."""
        return self.key_mask[:, self.q_offset :]

    def count_call(self, stats: AttentionStats | None) -> None:
        """Add the attention counters every kernel shares: kv heads, valid queries, causal pairs."""
        if stats is None:
            return
        stats.kv_heads = self.hkv
        stats.sparse_calls += 1
        stats.queries += int(self.query_valid.sum())
        stats.causal_pairs += int(causal_valid_pairs(self.key_mask, self.nq).sum())

    def count_mean_keys(self, stats: AttentionStats | None) -> None:
        """Add the key tokens averaged into cube mean keys (none when the caller passed ``mean_keys``)."""
        if stats is not None and self.own_means:
            stats.mean_key_tokens += int((self.cube_ids >= 0).sum())


def prepare_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    mean_keys: torch.Tensor | None = None,
    index: CubeIndex | None = None,
    granularity: str = "token",
) -> AttentionInputs:
    """The input preamble of every AdaS-Attn backend (the arguments of the common signature).

    Checks shapes and dtypes (:func:`check_attention_inputs`; ``v=None`` skips ``v``, for the
    selection-only functions) and the granularity, resolves the policy, fills the default scale
    ``D ** -0.5``, builds the cube index and cube mean keys unless given, and an all-True key mask
    when there is no padding.
    """
    bsz, hq, hkv, nq, nk, d = check_attention_inputs(q, k, k if v is None else v, cube_ids, key_mask)
    check_granularity(granularity)
    pol = as_policy(p, policy)
    own_means = mean_keys is None
    if index is None:
        index = build_cube_index(cube_ids)
    if mean_keys is None:
        mean_keys = cube_mean_keys(k, index)
    if key_mask is None:
        key_mask = torch.ones(bsz, nk, dtype=torch.bool, device=q.device)
    return AttentionInputs(
        bsz=bsz,
        hq=hq,
        hkv=hkv,
        nq=nq,
        nk=nk,
        d=d,
        cube_ids=cube_ids,
        key_mask=key_mask,
        index=index,
        mean_keys=mean_keys,
        policy=pol,
        scale=d**-0.5 if scale is None else scale,
        granularity=granularity,
        own_means=own_means,
    )


def select_block(
    q_blk: torch.Tensor,
    mean_keys_b: torch.Tensor,
    q_pos: torch.Tensor,
    q_cube: torch.Tensor,
    index: CubeIndex,
    b: int,
    policy: SelectionPolicy,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cube selection for a block of queries of sample ``b`` (per query head).

    Args:
        q_blk: ``[Hq, bq, D]`` queries (any float dtype; scored in float32).
        mean_keys_b: ``[Hkv, C, D]`` float32 cube mean keys of sample ``b``.
        q_pos: ``[bq]`` absolute positions of the queries.
        q_cube: ``[bq]`` cube id of each query (``-1`` for non-video queries).
        index: cube index of the batch.
        policy: selection policy.
        scale: score scale (``1/sqrt(D)`` by default).

    Returns:
        ``(keep, probs, cand)``: ``keep`` ``[Hq, bq, C]`` bool kept candidate cubes (own cube not
        included), ``probs`` ``[Hq, bq, C]`` float32 distributions, ``cand`` ``[bq, C]`` candidates.
    """
    probs, ok, cand = block_scores(q_blk, mean_keys_b, q_pos, q_cube, index, b, scale)
    return keep_from_probs(probs, ok, policy), probs, cand


def block_scores(
    q_blk: torch.Tensor,
    mean_keys_b: torch.Tensor,
    q_pos: torch.Tensor,
    q_cube: torch.Tensor,
    index: CubeIndex,
    b: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The threshold-independent half of :func:`select_block` (same arguments less the policy).

    Returns:
        ``(probs, ok, cand)``: ``probs`` ``[Hq, bq, C]`` float32 distributions, ``ok`` ``[Hq, bq, C]``
        the candidates a policy may keep (NaN scores excluded), ``cand`` ``[bq, C]`` candidates.
    """
    hq, bq, d = q_blk.shape
    hkv, c = mean_keys_b.shape[0], mean_keys_b.shape[1]
    cids = torch.arange(c, device=q_blk.device)
    cand = (index.first_pos[b][None, :] <= q_pos[:, None]) & (cids[None, :] != q_cube[:, None])
    if c == 0:
        z = torch.zeros(hq, bq, 0, device=q_blk.device)
        return z, z.bool(), cand
    g = hq // hkv
    qf = q_blk.reshape(hkv, g * bq, d).float()
    scores = torch.matmul(qf, mean_keys_b.transpose(-1, -2)).view(hq, bq, c) * scale
    # a cube whose score is NaN (NaN in its keys or the query) is never a candidate, whatever the policy
    ok = cand[None] & ~torch.isnan(scores)
    return masked_softmax(scores, ok), ok, cand


@torch.no_grad()  # the selection itself is not differentiated (as in MoBA)
def select_range(
    q_b: torch.Tensor,
    mean_keys_b: torch.Tensor,
    start: int,
    end: int,
    q_offset: int,
    cube_ids_b: torch.Tensor,
    index: CubeIndex,
    b: int,
    policy: SelectionPolicy,
    scale: float,
    qvalid_b: torch.Tensor,
    stats: AttentionStats | None,
) -> torch.Tensor:
    """Selection for queries ``start..end`` of sample ``b`` in :data:`SELECT_BLOCK` chunks.

    ``start`` must be a multiple of :data:`SELECT_BLOCK`. Returns ``keep`` ``[Hq, end-start, C]``.
    """
    assert start % SELECT_BLOCK == 0
    parts = []
    for s in range(start, end, SELECT_BLOCK):
        e = min(s + SELECT_BLOCK, end)
        pos = torch.arange(s, e, device=q_b.device) + q_offset
        keep, probs, cand = select_block(
            q_b[:, s:e], mean_keys_b, pos, cube_ids_b[pos], index, b, policy, scale
        )
        if stats is not None:
            stats.add_selection(probs, keep, cand, qvalid_b[pos])
        parts.append(keep)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def causal_valid_pairs(key_mask: torch.Tensor, nq: int) -> torch.Tensor:
    """``[B, Nq]`` number of valid keys at or before each valid query (0 for padding queries)."""
    nk = key_mask.shape[1]
    cum = torch.cumsum(key_mask.long(), dim=1)[:, nk - nq :]
    return cum * key_mask[:, nk - nq :]
