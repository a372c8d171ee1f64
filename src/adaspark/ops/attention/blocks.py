"""Cube-major token order and the block pattern of a :class:`~adaspark.ops.attention.units.Selection`.

Cubes interleave in raster order (a 4×4×4 cube is 16 runs of 4 tokens spread over 4 frames), so
fixed-size blocks of the original sequence never line up with cubes. The block paths therefore work
in *cube-major order*: every video token is moved to its cube's first position (ties broken by the
original position), non-video tokens stay where they are. Each cube becomes one contiguous run, cubes
follow each other in the order of their first tokens, and a 64-token cube of a cube-aligned grid fills
exactly half of a 128-token block. The permutation only changes the order of the rows of ``q``,
``k``, ``v`` (attention is order-free given the mask); the token-level mask, causality included, is
always evaluated with the original positions.

Cubes are also *aligned* to the block grid (:func:`aligned_slots`): where a cube would straddle a
block boundary that it need not cross (a 64-token cube after a 25-token text prefix spans two
64-token blocks), empty slots are inserted before it so that it starts on the boundary. Unaligned,
every query block holds parts of two cubes (the union of their kept sets) and every kept key block
holds part of a cube that was not kept: the kernels compute about twice the attended pairs. Empty
slots are neither valid queries nor valid keys; slots are what the kernels index, tokens what the
caller sees (``q_perm`` / ``k_perm`` map slots to tokens, ``q_slot`` / ``k_slot`` back).

The block pattern marks, per head and (query block, key block) pair, whether the block holds any
attended pair (``kept``) and whether it holds only attended pairs (``full``: a kernel may skip the
mask there). Both are computed from class counts, never from the token-level mask.

The block backends (``gather``, ``flex``) run in two public steps, so that a caller (the dispatcher's
dense fallback) can look at what a kernel would compute before running it::

    inputs = prepare_inputs(q, k, v, cube_ids, p, ...)      # the shared preamble
    plan = plan_blocks(q, inputs, block=64, stats=stats)     # selection + block pattern
    plan.executed_fraction                                   # share of dense causal work it would do
    out = run_blocks(q, k, v, plan, kernel=gather_kernel, stats=stats)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adaspark.ops.attention.common import AttentionInputs, AttentionStats, causal_valid_pairs
from adaspark.ops.attention.units import Selection, UnitScores, attended_pairs, key_classes, select_units
from adaspark.ops.cubes import NEVER, CubeIndex

__all__ = [
    "BlockPattern",
    "BlockPlan",
    "aligned_slots",
    "block_pattern",
    "cube_major_order",
    "plan_blocks",
    "rows_from_slots",
    "rows_to_slots",
    "run_blocks",
]

#: positions of padded slots (after every real position, so never causally visible)
_PAD_POS = NEVER // 2
#: :func:`block_pattern` counts the queries of a block per unit with one matmul while the units are
#: at most ``UNIT_MATMUL_FACTOR * classes + UNIT_MATMUL_SLACK`` (cube granularity), and row by row
#: in chunks of about ``PATTERN_CHUNK_TOKENS`` queries otherwise (token granularity: one unit per query)
UNIT_MATMUL_FACTOR = 4
UNIT_MATMUL_SLACK = 64
PATTERN_CHUNK_TOKENS = 4096
#: :func:`aligned_slots` inserts no empty slots where they would exceed this fraction of the tokens
ALIGN_MAX_EMPTY = 0.125


def cube_major_order(cube_ids: torch.Tensor, index: CubeIndex) -> torch.Tensor:
    """``[B, N]`` int64 permutation: position of the token placed at each cube-major slot."""
    bsz, n = cube_ids.shape
    pos = torch.arange(n, device=cube_ids.device).expand(bsz, n)
    if index.max_cubes == 0:
        return pos.clone()
    anchor = torch.where(cube_ids >= 0, index.first_pos.gather(1, cube_ids.clamp_min(0)), pos)
    return torch.sort(anchor * n + pos, dim=1, stable=True).indices


def _blocks_spanned(start: int, size: int, block: int) -> int:
    return (start + size - 1) // block - start // block + 1


def aligned_slots(cube_ids: torch.Tensor, index: CubeIndex, order: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, N]`` int64 slot of every token in the cube-major, block-aligned layout.

    ``order`` is :func:`cube_major_order`. Tokens keep their cube-major order; before a cube that
    would span more blocks than it must (started at the next block boundary, it would span fewer),
    the slots up to that boundary are left empty. Non-video tokens are never moved apart. When the
    empty slots of a sample would exceed :data:`ALIGN_MAX_EMPTY` of the tokens (short inputs: a
    few cubes after a prefix), none are inserted: there every block a hole adds is a whole extra
    column of most query blocks' work.
    """
    bsz, n = cube_ids.shape
    if index.max_cubes == 0 or n == 0:
        return torch.empty_like(order).copy_(torch.argsort(order, dim=1))
    seg = cube_ids.gather(1, order)  # [B, N] cube of the token at each cube-major position
    starts = seg >= 0
    starts[:, 1:] &= seg[:, 1:] != seg[:, :-1]
    pad_at = torch.zeros(bsz, n, dtype=torch.int64, device=cube_ids.device)
    counts = index.counts.tolist()
    for b in range(bsz):
        at = starts[b].nonzero().squeeze(1)
        sizes = [counts[b][c] for c in seg[b, at].tolist()]
        shift, pads = 0, []
        for j, size in zip(at.tolist(), sizes, strict=True):
            s = j + shift
            aligned = -(-s // block) * block
            shorter = _blocks_spanned(aligned, size, block) < _blocks_spanned(s, size, block)
            pad = aligned - s if shorter else 0
            pads.append(pad)
            shift += pad
        if at.numel():
            pad_at[b, at] = torch.tensor(pads, dtype=torch.int64, device=cube_ids.device)
    if int(pad_at.sum(1).max()) > ALIGN_MAX_EMPTY * n:
        pad_at.zero_()  # a short input: the empty slots would cost more than they save
    slot_of_position = torch.arange(n, device=cube_ids.device)[None] + pad_at.cumsum(1)  # [B, N]
    slots = torch.empty_like(order)
    slots.scatter_(1, order, slot_of_position)
    return slots


def rows_to_slots(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]``: the rows of ``x`` (``[B, H, N, D]``) at the slots of ``perm`` (``[B, S]``,
    the token at each slot, ``-1`` for empty slots, which get zeros)."""
    bsz, h, _n, d = x.shape
    idx = perm.clamp_min(0)[:, None, :, None].expand(bsz, h, perm.shape[1], d)
    return x.gather(2, idx).masked_fill_((perm < 0)[:, None, :, None], 0)


def rows_from_slots(y: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]``: the rows of ``y`` (``[B, H, S, D]``) back in token order (``slot``:
    ``[B, N]``, the slot of every token)."""
    bsz, h, _s, d = y.shape
    out = torch.empty(bsz, h, slot.shape[1], d, dtype=y.dtype, device=y.device)  # every row written
    return torch.gather(y, 2, slot[:, None, :, None].expand(bsz, h, slot.shape[1], d), out=out)


@dataclass
class BlockPattern:
    """Permuted, block-padded token metadata and the block-level pattern of one batch.

    Attributes (``Sq``/``Sk`` = query/key slots, multiples of ``block``):
        block: block size in tokens (queries and keys).
        q_perm: ``[B, Sq]`` query index at each query slot (``-1``: an empty slot).
        k_perm: ``[B, Sk]`` key position at each key slot (``-1``: an empty slot).
        q_slot: ``[B, Nq]`` slot of every query (the inverse of ``q_perm``).
        k_slot: ``[B, Nk]`` slot of every key.
        q_pos, k_pos: ``[B, Sq]`` / ``[B, Sk]`` original positions (padded slots: a huge value
            for keys, ``-1`` for queries, so padded slots never meet causally).
        q_unit: ``[B, Sq]`` unit of every query slot (padded slots: the padding unit).
        k_cls: ``[B, Sk]`` class of every key slot (padded slots: class 0, never visible).
        k_valid: ``[B, Sk]`` bool, real non-padding keys.
        q_valid: ``[B, Sq]`` bool, real non-padding queries.
        kept: ``[B, Hq, nQ, nK]`` bool, blocks holding at least one attended pair.
        full: ``[B, Hq, nQ, nK]`` bool, kept blocks where every (valid query, key) pair is attended
            and every key slot is valid.
        executed: score entries a block kernel computes (valid queries × key slots of kept blocks,
            summed over heads).
    """

    block: int
    q_perm: torch.Tensor
    k_perm: torch.Tensor
    q_slot: torch.Tensor
    k_slot: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_unit: torch.Tensor
    k_cls: torch.Tensor
    k_valid: torch.Tensor
    q_valid: torch.Tensor
    kept: torch.Tensor
    full: torch.Tensor
    executed: int

    @property
    def density(self) -> float:
        """Fraction of the (query block, key block) pairs kept, over heads and samples."""
        return float(self.kept.float().mean()) if self.kept.numel() else 1.0


def _pad(x: torch.Tensor, size: int, value) -> torch.Tensor:
    if x.shape[1] == size:
        return x
    pad = torch.full((x.shape[0], size - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def _block_counts(idx: torch.Tensor, valid: torch.Tensor, n_blocks: int, block: int, width: int):
    """``[B, nB, width]`` float32 counts of valid slots of each block per value of ``idx``."""
    bsz, s = idx.shape
    blk = torch.arange(s, device=idx.device) // block
    out = torch.zeros(bsz, n_blocks * width, dtype=torch.float32, device=idx.device)
    out.scatter_add_(1, blk[None] * width + idx, valid.float())
    return out.view(bsz, n_blocks, width)


@torch.no_grad()
def block_pattern(
    sel: Selection,
    cube_ids: torch.Tensor,
    key_mask: torch.Tensor,
    index: CubeIndex,
    block: int = 128,
) -> BlockPattern:
    """The block pattern of a selection (see the module docstring).

    Keys are taken in cube-major order. Queries too when ``Nq == Nk`` (prefill); otherwise (new
    tokens after a cache) they stay in their order.
    """
    bsz, hq, n_units, ncls = sel.table.shape
    nk = cube_ids.shape[1]
    nq = sel.unit.shape[1]
    q_offset = nk - nq
    dev = cube_ids.device
    k_slot = aligned_slots(cube_ids, index, cube_major_order(cube_ids, index), block)
    sk = -(-max(int(k_slot.max()) + 1 if nk else 1, 1) // block) * block
    k_perm = torch.full((bsz, sk), -1, dtype=torch.int64, device=dev)
    k_perm.scatter_(1, k_slot, torch.arange(nk, device=dev).expand(bsz, nk))
    if nq == nk:
        q_slot, q_perm, sq = k_slot, k_perm, sk
    else:  # new tokens after a cache stay in their order
        q_slot = torch.arange(nq, device=dev).expand(bsz, nq).clone()
        sq = -(-max(nq, 1) // block) * block
        q_perm = _pad(q_slot, sq, -1)
    n_qb, n_kb = sq // block, sk // block
    cls = key_classes(cube_ids, sel.num_cubes)
    k_real, q_real = k_perm >= 0, q_perm >= 0
    kt, qt = k_perm.clamp_min(0), q_perm.clamp_min(0)
    k_pos = torch.where(k_real, k_perm, _PAD_POS)
    k_cls = torch.where(k_real, cls.gather(1, kt), 0)
    k_valid = k_real & key_mask.gather(1, kt)
    q_pos = torch.where(q_real, q_perm + q_offset, -1)
    q_unit = torch.where(q_real, sel.unit.gather(1, qt), n_units - 1)
    q_valid = q_real & key_mask[:, q_offset:].gather(1, qt)

    # per key block: valid keys of each class; per query block: valid queries of each unit
    mk = _block_counts(k_cls, k_valid, n_kb, block, ncls)  # [B, nK, ncls]
    n_kv = mk.sum(-1)  # [B, nK]
    n_qv = q_valid.view(bsz, n_qb, block).sum(-1).float()  # [B, nQ]
    # qa[b, h, qb, j]: valid queries of block qb whose unit attends class j
    if n_units <= UNIT_MATMUL_FACTOR * ncls + UNIT_MATMUL_SLACK:
        mq = _block_counts(q_unit, q_valid, n_qb, block, n_units)  # [B, nQ, U]
        qa = torch.matmul(mq[:, None], sel.table.float())  # [B, Hq, nQ, ncls]
    else:
        qa = torch.empty(bsz, hq, n_qb, ncls, dtype=torch.float32, device=dev)
        step = max(1, PATTERN_CHUNK_TOKENS // block)
        for b in range(bsz):
            for s in range(0, n_qb, step):
                e = min(s + step, n_qb)
                u = q_unit[b, s * block : e * block]
                rows = sel.table[b].index_select(1, u) & q_valid[b, s * block : e * block][None, :, None]
                qa[b, :, s:e] = rows.view(hq, e - s, block, ncls).sum(2, dtype=torch.float32)
    # selection-level any / all, per head and block pair
    any_sel = torch.matmul((qa > 0).float(), (mk > 0).float().transpose(-1, -2)[:, None]) > 0
    pairs = torch.matmul(qa, mk.transpose(-1, -2)[:, None])  # attended class pairs (exact in fp32)
    all_sel = pairs >= (n_qv[:, :, None] * n_kv[:, None, :])[:, None] - 0.5
    # causality from the original positions of the valid tokens of each block
    big = torch.iinfo(torch.int64).max
    kp = k_pos.view(bsz, n_kb, block)
    kv = k_valid.view(bsz, n_kb, block)
    k_min = torch.where(kv, kp, torch.full_like(kp, big)).amin(-1)
    k_max = torch.where(kv, kp, torch.full_like(kp, -1)).amax(-1)
    qp = q_pos.view(bsz, n_qb, block)
    qv = q_valid.view(bsz, n_qb, block)
    q_min = torch.where(qv, qp, torch.full_like(qp, big)).amin(-1)
    q_max = torch.where(qv, qp, torch.full_like(qp, -1)).amax(-1)
    c_any = k_min[:, None, :] <= q_max[:, :, None]  # [B, nQ, nK]
    c_all = k_max[:, None, :] <= q_min[:, :, None]
    nonempty = (n_qv[:, :, None] > 0) & (n_kv[:, None, :] > 0)
    kept = any_sel & (c_any & nonempty)[:, None]
    slots_valid = kv.all(-1)  # [B, nK]
    full = kept & all_sel & (c_all & slots_valid[:, None, :])[:, None]
    executed = int((kept.float() * n_qv[:, None, :, None]).sum().item()) * block
    return BlockPattern(
        block=block,
        q_perm=q_perm,
        k_perm=k_perm,
        q_slot=q_slot,
        k_slot=k_slot,
        q_pos=q_pos,
        k_pos=k_pos,
        q_unit=q_unit,
        k_cls=k_cls,
        k_valid=k_valid,
        q_valid=q_valid,
        kept=kept,
        full=full,
        executed=executed,
    )


@dataclass(frozen=True)
class BlockPlan:
    """What a block kernel runs: one call's inputs, its selection and its block pattern.

    Attributes:
        inputs: the checked call inputs (:class:`~adaspark.ops.attention.common.AttentionInputs`).
        selection: the cube selection (:class:`~adaspark.ops.attention.units.Selection`).
        pattern: the block pattern of the selection (:class:`BlockPattern`).
        causal_pairs: causal (valid query, valid key) pairs of the call, per head.
    """

    inputs: AttentionInputs
    selection: Selection
    pattern: BlockPattern
    causal_pairs: int

    @property
    def block(self) -> int:
        return self.pattern.block

    @property
    def executed(self) -> int:
        """Score entries a block kernel computes for this plan (summed over heads)."""
        return self.pattern.executed

    @property
    def executed_fraction(self) -> float:
        """:attr:`executed` relative to dense causal attention (``causal_pairs`` × heads; 1.0 if none)."""
        tot = self.causal_pairs * self.inputs.hq
        return self.executed / tot if tot else 1.0


def plan_blocks(
    q: torch.Tensor,
    inputs: AttentionInputs,
    *,
    block: int,
    stats: AttentionStats | None = None,
    scores: UnitScores | None = None,
) -> BlockPlan:
    """Step one of the block backends: the cube selection and its block pattern.

    Args:
        q: ``[B, Hq, Nq, D]`` queries.
        inputs: the call's :func:`~adaspark.ops.attention.common.prepare_inputs`.
        block: block size in tokens (queries and keys), ``>= 1``.
        stats: receives what the selection computes (entropy / kept / candidates, the mean-key
            tokens, the selection itself with ``stats.record``); the attention counters come
            with :func:`run_blocks`.
        scores: cube granularity: the call's :func:`~adaspark.ops.attention.units.unit_scores`,
            when several policies are planned on one call (budget mode's threshold search).
    """
    block = int(block)
    if block < 1:
        raise ValueError(f"query_block must be >= 1, got {block}")
    inp = inputs
    sel = select_units(
        q, inp.mean_keys, inp.cube_ids, inp.key_mask, inp.index, inp.policy, inp.scale, inp.granularity,
        stats, scores,
    )  # fmt: skip
    pat = block_pattern(sel, inp.cube_ids, inp.key_mask, inp.index, block)
    inp.count_mean_keys(stats)
    pairs = int(causal_valid_pairs(inp.key_mask, inp.nq).sum())
    return BlockPlan(inputs=inp, selection=sel, pattern=pat, causal_pairs=pairs)


def run_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    kernel: Callable[..., torch.Tensor],
    stats: AttentionStats | None = None,
) -> torch.Tensor:
    """Step two: run ``kernel`` (``gather_kernel`` or ``flex_kernel``, signature
    ``(q, k, v, plan, stats)``) on a plan; adds the attention counters of the call to ``stats``."""
    inp = plan.inputs
    inp.count_call(stats)
    if stats is not None:
        stats.attended += attended_pairs(plan.selection, inp.cube_ids, inp.key_mask)
    return kernel(q, k, v, plan, stats)
