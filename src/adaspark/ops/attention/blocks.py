"""Cube-major token order and the block pattern of a :class:`~adaspark.ops.attention.units.Selection`.

Cubes interleave in raster order (a 4×4×4 cube is 16 runs of 4 tokens spread over 4 frames), so
fixed-size blocks of the original sequence never line up with cubes. The block paths therefore work
in *cube-major order*: every video token is moved to its cube's first position (ties broken by the
original position), non-video tokens stay where they are. Each cube becomes one contiguous run, cubes
follow each other in the order of their first tokens, and a 64-token cube of a cube-aligned grid fills
exactly half of a 128-token block. The permutation only changes the order of the rows of ``q``,
``k``, ``v`` (attention is order-free given the mask); the token-level mask, causality included, is
always evaluated with the original positions.

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
from adaspark.ops.attention.units import Selection, attended_pairs, key_classes, select_units
from adaspark.ops.cubes import NEVER, CubeIndex

__all__ = ["BlockPattern", "BlockPlan", "block_pattern", "cube_major_order", "plan_blocks", "run_blocks"]

#: positions of padded slots (after every real position, so never causally visible)
_PAD_POS = NEVER // 2
#: :func:`block_pattern` counts the queries of a block per unit with one matmul while the units are
#: at most ``UNIT_MATMUL_FACTOR * classes + UNIT_MATMUL_SLACK`` (cube granularity), and row by row
#: in chunks of about ``PATTERN_CHUNK_TOKENS`` queries otherwise (token granularity: one unit per query)
UNIT_MATMUL_FACTOR = 4
UNIT_MATMUL_SLACK = 64
PATTERN_CHUNK_TOKENS = 4096


def cube_major_order(cube_ids: torch.Tensor, index: CubeIndex) -> torch.Tensor:
    """``[B, N]`` int64 permutation: position of the token placed at each cube-major slot."""
    bsz, n = cube_ids.shape
    pos = torch.arange(n, device=cube_ids.device).expand(bsz, n)
    if index.max_cubes == 0:
        return pos.clone()
    anchor = torch.where(cube_ids >= 0, index.first_pos.gather(1, cube_ids.clamp_min(0)), pos)
    return torch.sort(anchor * n + pos, dim=1, stable=True).indices


@dataclass
class BlockPattern:
    """Permuted, block-padded token metadata and the block-level pattern of one batch.

    Attributes (``Sq``/``Sk`` = padded query/key slots, multiples of ``block``):
        block: block size in tokens (queries and keys).
        q_perm: ``[B, Nq]`` query index placed at each of the first ``Nq`` query slots.
        k_perm: ``[B, Nk]`` key position placed at each of the first ``Nk`` key slots.
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
    k_perm = cube_major_order(cube_ids, index)
    q_perm = k_perm if nq == nk else torch.arange(nq, device=dev).expand(bsz, nq).clone()
    sq = -(-max(nq, 1) // block) * block
    sk = -(-max(nk, 1) // block) * block
    n_qb, n_kb = sq // block, sk // block
    cls = key_classes(cube_ids, sel.num_cubes)
    k_pos = _pad(k_perm, sk, _PAD_POS)
    k_cls = _pad(cls.gather(1, k_perm), sk, 0)
    k_valid = _pad(key_mask.gather(1, k_perm), sk, False)
    q_pos = _pad(q_perm + q_offset, sq, -1)
    q_unit = _pad(sel.unit.gather(1, q_perm), sq, n_units - 1)
    q_valid = _pad(key_mask[:, q_offset:].gather(1, q_perm), sq, False)

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
    q: torch.Tensor, inputs: AttentionInputs, *, block: int, stats: AttentionStats | None = None
) -> BlockPlan:
    """Step one of the block backends: the cube selection and its block pattern.

    Args:
        q: ``[B, Hq, Nq, D]`` queries.
        inputs: the call's :func:`~adaspark.ops.attention.common.prepare_inputs`.
        block: block size in tokens (queries and keys), ``>= 1``.
        stats: receives what the selection computes (entropy / kept / candidates, the mean-key
            tokens, the selection itself with ``stats.record``); the attention counters come
            with :func:`run_blocks`.
    """
    block = int(block)
    if block < 1:
        raise ValueError(f"query_block must be >= 1, got {block}")
    inp = inputs
    sel = select_units(
        q, inp.mean_keys, inp.cube_ids, inp.key_mask, inp.index, inp.policy, inp.scale, inp.granularity, stats
    )
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
