"""Selection as a table: which key classes each query *unit* may attend.

Every path that works on blocks (``gather``, ``flex``) and the cube-granularity reference describe
the AdaS-Attn mask in one compact form, a :class:`Selection`:

* a key's *class* is its cube id ``0 .. C-1``, or ``C`` for every non-video key (text, images by
  default, generated tokens, padding);
* a query's *unit* is the set of queries that share one selection: with ``granularity="token"``
  every query is its own unit (the reference semantics); with ``granularity="cube"`` all video queries of
  one cube share the unit of that cube (the cube-granularity variant) and every non-video query
  is its own unit; padding queries share one unit that allows nothing;
* ``table[b, h, u, j]`` says whether the queries of unit ``u`` attend the keys of class ``j`` (head
  ``h``). It already contains the own cube and the non-video class, so the token-level mask is

  ``mask[b, h, i, k] = table[b, h, unit[b, i], cls[b, k]] and key_valid[b, k] and pos(k) <= pos(i)``.

Cube granularity, precisely: the unit of cube ``c`` keeps the Top-p set of the average of the
distributions ``P_i`` of its queries ``i`` (each ``P_i`` is the softmax over the candidates of
``i`` and zero elsewhere; queries without a candidate contribute nothing; the average is taken over
the queries that have one, so it sums to 1). Its candidates are the union of its queries'
candidates. Selection is computed in float32 and is not differentiated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaspark.ops.attention.common import (
    GRANULARITIES,
    SELECT_BLOCK,
    AttentionStats,
    block_scores,
    check_granularity,
    select_range,
)
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy, entropy, keep_from_probs, masked_softmax

__all__ = [
    "CUBE_SCORE_CHUNK",
    "GRANULARITIES",
    "Selection",
    "UnitScores",
    "attended_pairs",
    "check_granularity",
    "cube_unit_probs",
    "cube_unit_probs_reference",
    "key_classes",
    "select_units",
    "token_selection",
    "unit_scores",
]

#: video queries scored per matmul when averaging distributions per cube (a fixed blocking, aligned
#: at the first video query, so that every path that calls :func:`cube_unit_probs` gets the same bits)
CUBE_SCORE_CHUNK = 1024
#: queries counted per step by :func:`attended_pairs` (bounds its float64 temporaries)
PAIR_COUNT_CHUNK = 2048


@dataclass
class Selection:
    """The AdaS-Attn mask of a batch in table form (see the module docstring).

    Attributes:
        unit: ``[B, Nq]`` int64 unit of every query (``U - 1`` for padding queries).
        table: ``[B, Hq, U, C + 1]`` bool allowed key classes per unit and head.
        num_cubes: ``C`` (the largest cube count of the batch; class ``C`` is non-video).
        granularity: ``"token"`` or ``"cube"``.
    """

    unit: torch.Tensor
    table: torch.Tensor
    num_cubes: int
    granularity: str

    @property
    def num_units(self) -> int:
        return int(self.table.shape[2])

    def kept_cubes(self, cube_ids: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, Nq, C]`` bool kept candidate cubes of every query (own cube excluded), the layout
        of :func:`~adaspark.ops.attention.reference.reference_cube_keep`; padding queries keep
        nothing. ``cube_ids`` ``[B, Nk]`` are the call's."""
        bsz, hq, _u, _ = self.table.shape
        nq, c = self.unit.shape[1], self.num_cubes
        keep = self.table[..., :c].gather(2, self.unit[:, None, :, None].expand(bsz, hq, nq, c)).clone()
        qc = cube_ids[:, cube_ids.shape[1] - nq :]
        for b in range(bsz):
            vq = (qc[b] >= 0).nonzero().squeeze(1)
            keep[b, :, vq, qc[b, vq]] = False
        return keep


def key_classes(cube_ids: torch.Tensor, num_cubes: int) -> torch.Tensor:
    """``[B, Nk]`` key class: the cube id, or ``num_cubes`` for non-video keys."""
    return torch.where(cube_ids >= 0, cube_ids, torch.full_like(cube_ids, num_cubes))


def _video_queries(cube_ids_b: torch.Tensor, qvalid: torch.Tensor, q_offset: int):
    qc = cube_ids_b[q_offset:]
    return ((qc >= 0) & qvalid).nonzero().squeeze(1), qc


@torch.no_grad()
def cube_unit_probs(
    q_b: torch.Tensor,
    mean_keys_b: torch.Tensor,
    cube_ids_b: torch.Tensor,
    qvalid_b: torch.Tensor,
    q_offset: int,
    first_pos_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Averaged cube distributions of the video queries of one sample, per cube and head.

    Args:
        q_b: ``[Hq, Nq, D]`` queries (the last ``Nq`` of the key positions).
        mean_keys_b: ``[Hkv, C, D]`` float32 cube mean keys.
        cube_ids_b: ``[Nk]`` cube ids of the sample.
        qvalid_b: ``[Nq]`` bool, False for padding queries.
        q_offset: ``Nk - Nq``.
        first_pos_b: ``[C]`` first position of every cube.
        scale: score scale.

    Returns:
        ``(probs, cand, n_sel)``: ``probs`` ``[Hq, C, C]`` float32 (row ``c`` = normalised average over
        the queries of cube ``c`` that have a candidate; zero rows for cubes without such queries),
        ``cand`` ``[C, C]`` bool union of the candidates of the queries of each cube, ``n_sel`` ``[C]``
        int64 number of queries of each cube that have at least one candidate.
    """
    hq, _nq, d = q_b.shape
    hkv, c = mean_keys_b.shape[0], mean_keys_b.shape[1]
    g = hq // hkv
    dev = q_b.device
    acc = torch.zeros(hq, c, c, dtype=torch.float32, device=dev)
    n_sel = torch.zeros(c, dtype=torch.long, device=dev)
    last = torch.full((c,), -1, dtype=torch.long, device=dev)
    vq, qc = _video_queries(cube_ids_b, qvalid_b, q_offset)
    cids = torch.arange(c, device=dev)
    mkt = mean_keys_b.transpose(-1, -2)
    # finite inputs whose products cannot overflow give finite scores: no NaN checks needed
    qmax = float(q_b.detach().abs().amax()) if q_b.numel() else 0.0
    kmax = float(mean_keys_b.abs().amax()) if mean_keys_b.numel() else 0.0
    finite = math.isfinite(qmax) and math.isfinite(kmax) and qmax * kmax * d * abs(scale) < 1e37
    for s in range(0, vq.numel(), CUBE_SCORE_CHUNK):
        idx = vq[s : s + CUBE_SCORE_CHUNK]
        n = idx.numel()
        pos = idx + q_offset
        own = qc[idx]
        cand = (first_pos_b[None, :] <= pos[:, None]) & (cids[None, :] != own[:, None])  # [n, C]
        qf = q_b.index_select(1, idx).reshape(hkv, g * n, d).float()
        scores = torch.matmul(qf, mkt).view(hq, n, c) * scale
        has = cand.any(-1)
        if finite:
            # one fused softmax; rows without a candidate (all -inf: NaN) are zero
            probs = torch.softmax(scores.masked_fill_(~cand[None], float("-inf")), dim=-1)
            if not bool(has.all()):
                probs[:, ~has] = 0.0
        else:
            ok = cand[None] & ~torch.isnan(scores)
            # one fused softmax; the rare rows it cannot take (no candidate, +inf scores) are redone
            probs = torch.softmax(scores.masked_fill_(~ok, float("-inf")), dim=-1)
            bad = torch.isnan(probs).any(-1)
            if bool(bad.any()):
                probs[bad] = masked_softmax(scores[bad], ok[bad])
        acc.index_add_(1, own, probs)
        n_sel.index_add_(0, own, has.long())
        last.scatter_reduce_(0, own, pos, reduce="amax", include_self=True)
    ucand = (first_pos_b[None, :] <= last[:, None]) & (cids[None, :] != cids[:, None]) & (last[:, None] >= 0)
    tot = acc.sum(-1, keepdim=True)
    probs = acc / torch.where(tot > 0, tot, torch.ones_like(tot))
    return probs, ucand, n_sel


@torch.no_grad()
def cube_unit_probs_reference(
    q_b: torch.Tensor,
    mean_keys_b: torch.Tensor,
    cube_ids_b: torch.Tensor,
    qvalid_b: torch.Tensor,
    q_offset: int,
    first_pos_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Naive :func:`cube_unit_probs` (same signature): one query at a time, in float64."""
    hq, nq, _d = q_b.shape
    hkv, c = mean_keys_b.shape[0], mean_keys_b.shape[1]
    g = hq // hkv
    acc = torch.zeros(hq, c, c, dtype=torch.float64)
    ucand = torch.zeros(c, c, dtype=torch.bool)
    n_sel = torch.zeros(c, dtype=torch.long)
    for i in range(nq):
        pos = i + q_offset
        own = int(cube_ids_b[pos])
        if own < 0 or not bool(qvalid_b[i]):
            continue
        cand = [j for j in range(c) if j != own and int(first_pos_b[j]) <= pos]
        if not cand:
            continue
        n_sel[own] += 1
        for j in cand:
            ucand[own, j] = True
        for h in range(hq):
            s = torch.stack([q_b[h, i].double() @ mean_keys_b[h // g, j].double() * scale for j in cand])
            acc[h, own, cand] += torch.softmax(s, 0)
    tot = acc.sum(-1, keepdim=True)
    probs = acc / torch.where(tot > 0, tot, torch.ones_like(tot))
    return probs.float(), ucand, n_sel


@dataclass(frozen=True)
class UnitScores:
    """The threshold-independent half of a cube-granularity selection, for reuse across policies.

    Budget mode probes several thresholds on one layer's queries; the distributions they cut are
    the same each time. :func:`select_units` with ``scores=`` applies a policy to them (the same
    bits as computing them anew).

    Attributes:
        cubes: per sample, :func:`cube_unit_probs`'s ``(probs, cand, n_sel)`` (None without cubes).
        text: per sample, the non-video queries' distributions in :data:`SELECT_BLOCK` blocks, as
            ``(start, probs, ok, cand)`` of :func:`~adaspark.ops.attention.common.block_scores`
            (``start`` indexes the sample's non-video queries).
    """

    cubes: tuple
    text: tuple


def _text_queries(cube_ids_b, qv, q_offset: int, index: CubeIndex, b: int, c: int):
    """Non-video valid queries of sample ``b`` and how many of them come before every cube."""
    qc = cube_ids_b[q_offset:]
    tq = ((qc < 0) & qv).nonzero().squeeze(1)
    skip = int(((tq + q_offset) < index.first_pos[b].min()).sum()) if c else tq.numel()
    return qc, tq, skip


@torch.no_grad()
def unit_scores(
    q: torch.Tensor,
    mean_keys: torch.Tensor,
    cube_ids: torch.Tensor,
    key_mask: torch.Tensor,
    index: CubeIndex,
    scale: float,
) -> UnitScores:
    """The cube-granularity distributions of a batch (arguments as :func:`select_units`)."""
    nq = q.shape[2]
    q_offset = cube_ids.shape[1] - nq
    c = index.max_cubes
    qvalid = key_mask[:, q_offset:]
    cubes, text = [], []
    for b in range(q.shape[0]):
        qv = qvalid[b]
        fp = index.first_pos[b]
        cubes.append(cube_unit_probs(q[b], mean_keys[b], cube_ids[b], qv, q_offset, fp, scale) if c else None)
        qc, tq, skip = _text_queries(cube_ids[b], qv, q_offset, index, b, c)
        blocks = []
        for s in range(skip, tq.numel(), SELECT_BLOCK):
            idx = tq[s : s + SELECT_BLOCK]
            qb = q[b].index_select(1, idx)
            blocks.append((s, *block_scores(qb, mean_keys[b], idx + q_offset, qc[idx], index, b, scale)))
        text.append(tuple(blocks))
    return UnitScores(cubes=tuple(cubes), text=tuple(text))


@torch.no_grad()
def select_units(
    q: torch.Tensor,
    mean_keys: torch.Tensor,
    cube_ids: torch.Tensor,
    key_mask: torch.Tensor,
    index: CubeIndex,
    policy: SelectionPolicy,
    scale: float,
    granularity: str,
    stats: AttentionStats | None = None,
    scores: UnitScores | None = None,
) -> Selection:
    """Run the cube selection of a batch and return it as a :class:`Selection`.

    Args:
        q: ``[B, Hq, Nq, D]`` queries (the last ``Nq`` key positions).
        mean_keys: ``[B, Hkv, C, D]`` float32 cube mean keys.
        cube_ids: ``[B, Nk]`` int64.
        key_mask: ``[B, Nk]`` bool.
        index: cube index of ``cube_ids``.
        policy: selection policy.
        scale: score scale.
        granularity: ``"token"`` (per query, the reference semantics; selected with the same
            fixed blocking as the ``blocked`` path) or ``"cube"``.
        stats: optional statistics (entropy / kept / candidates per selecting query).
        scores: cube granularity: this batch's :func:`unit_scores` (computed here when None).
    """
    check_granularity(granularity)
    bsz, hq, nq, _d = q.shape
    nk = cube_ids.shape[1]
    q_offset = nk - nq
    c = index.max_cubes
    dev = q.device
    qvalid = key_mask[:, q_offset:]
    if granularity == "token":
        n_units = nq + 1
    else:
        n_text = int(((cube_ids[:, q_offset:] < 0) & qvalid).sum(1).max()) if nq else 0
        n_units = c + n_text + 1
    pad_unit = n_units - 1
    if granularity == "cube" and scores is None:
        scores = unit_scores(q, mean_keys, cube_ids, key_mask, index, scale)
    table = torch.zeros(bsz, hq, n_units, c + 1, dtype=torch.bool, device=dev)
    unit = torch.full((bsz, nq), pad_unit, dtype=torch.long, device=dev)
    for b in range(bsz):
        qc = cube_ids[b, q_offset:]
        qv = qvalid[b]
        if granularity == "token":
            if nq and c:
                table[b, :, :nq, :c] = select_range(
                    q[b],
                    mean_keys[b],
                    0,
                    nq,
                    q_offset,
                    cube_ids[b],
                    index,
                    b,
                    policy,
                    scale,
                    key_mask[b],
                    stats,
                )
            _finish_token_rows(table[b], unit[b], qc, qv, c)
            continue
        # cube granularity: one averaged distribution per cube ...
        if c:
            probs, ucand, n_sel = scores.cubes[b]
            keep = keep_from_probs(probs, ucand[None].expand(hq, c, c), policy)
            table[b, :, :c, :c] = keep
            if stats is not None and bool((n_sel > 0).any()):
                w = n_sel.double()
                stats.selections += w.sum().expand(hq)
                stats.entropy_sum += (entropy(probs).double() * w).sum(-1)
                stats.kept_sum += (keep.sum(-1).double() * w).sum(-1)
                stats.candidates_sum += (ucand.sum(-1).double() * w).sum().expand(hq)
            cid = torch.arange(c, device=dev)
            table[b, :, cid, cid] = True
        vmask = (qc >= 0) & qv
        unit[b] = torch.where(vmask, qc, unit[b])
        # ... and per-token selection for the non-video queries
        # text before the first cube has no candidate: nothing to select (unit_scores skips it)
        _, tq, _ = _text_queries(cube_ids[b], qv, q_offset, index, b, c)
        tu = c + torch.arange(tq.numel(), device=dev)
        unit[b, tq] = tu
        table[b, :, :pad_unit, c] = True
        for s, probs_t, ok_t, cand_t in scores.text[b]:
            keep_t = keep_from_probs(probs_t, ok_t, policy)
            if stats is not None:
                stats.add_selection(probs_t, keep_t, cand_t, qv[tq[s : s + SELECT_BLOCK]])
            table[b, :, tu[s : s + SELECT_BLOCK], :c] = keep_t
    sel = Selection(unit=unit, table=table, num_cubes=c, granularity=granularity)
    if stats is not None:
        stats.log_selection(sel)
    return sel


def _finish_token_rows(table_b, unit_b, qc, qv, c: int) -> None:
    """Token granularity, one sample: unit ``i`` for valid query ``i`` (the padding unit ``U - 1``
    otherwise), and rows of valid queries that allow their own cube and the non-video class.
    ``table_b`` ``[Hq, Nq + 1, C + 1]`` holds the kept cubes in ``[:, :Nq, :C]``; both are edited in place."""
    nq = qc.shape[0]
    ar = torch.arange(nq, device=qc.device)
    unit_b.copy_(torch.where(qv, ar, torch.full_like(ar, table_b.shape[1] - 1)))
    vq = ((qc >= 0) & qv).nonzero().squeeze(1)
    table_b[:, vq, qc[vq]] = True
    table_b[:, :nq, c] = qv


@torch.no_grad()
def token_selection(keep: torch.Tensor, cube_ids: torch.Tensor, key_mask: torch.Tensor) -> Selection:
    """The :class:`Selection` of per-token kept sets ``keep`` ``[B, Hq, Nq, C]`` (own cube excluded),
    the same object :func:`select_units` returns at ``granularity="token"`` for that selection.

    For the kernels that select per token with :func:`~adaspark.ops.attention.common.select_range`
    (``blocked``, ``decode``, the reference) and record their selection.
    """
    bsz, hq, nq, c = keep.shape
    q_offset = cube_ids.shape[1] - nq
    table = torch.zeros(bsz, hq, nq + 1, c + 1, dtype=torch.bool, device=keep.device)
    table[:, :, :nq, :c] = keep
    unit = torch.empty(bsz, nq, dtype=torch.long, device=keep.device)
    for b in range(bsz):
        _finish_token_rows(table[b], unit[b], cube_ids[b, q_offset:], key_mask[b, q_offset:], c)
    return Selection(unit=unit, table=table, num_cubes=c, granularity="token")


@torch.no_grad()
def attended_pairs(sel: Selection, cube_ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """``[Hq]`` float64 number of (valid query, key) pairs the selection attends, per head.

    Counted by class: a query at position ``t`` of unit ``u`` attends ``sum_j table[u, j] ·
    #{valid keys of class j at or before t}``. Never builds an ``Nq × Nk`` mask.
    """
    bsz, hq, n_units, ncls = sel.table.shape
    nk = cube_ids.shape[1]
    nq = sel.unit.shape[1]
    q_offset = nk - nq
    cls = key_classes(cube_ids, sel.num_cubes)
    out = torch.zeros(hq, dtype=torch.float64, device=cube_ids.device)
    for b in range(bsz):
        onehot = torch.zeros(nk, ncls, dtype=torch.int32, device=cube_ids.device)
        onehot[torch.arange(nk, device=cube_ids.device), cls[b]] = key_mask[b].int()
        cum = torch.cumsum(onehot, dim=0, dtype=torch.int32)[q_offset:]  # [Nq, ncls]
        qv = key_mask[b, q_offset:]
        if sel.granularity == "token":
            for s in range(0, nq, PAIR_COUNT_CHUNK):
                e = min(s + PAIR_COUNT_CHUNK, nq)
                t = sel.table[b, :, s:e]
                w = (cum[s:e] * qv[s:e, None]).double()
                out += (t.double() * w[None]).sum(dim=(1, 2))
        else:
            w = torch.zeros(n_units, ncls, dtype=torch.float64, device=cube_ids.device)
            w.index_add_(0, sel.unit[b], cum.double() * qv[:, None])
            out += (sel.table[b].double() * w[None]).sum(dim=(1, 2))
    return out
