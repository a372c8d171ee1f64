"""Gather AdaS-Attn: a loop over cube-major query blocks that gathers only the kept key blocks.

Selection (:func:`~adaspark.ops.attention.units.select_units`, token or cube granularity) →
block pattern (:func:`~adaspark.ops.attention.blocks.block_pattern`, cube-major order) → for each
query block, the key blocks kept by any query head of a GQA group are gathered once per kv head, and
one SDPA call runs with the group's query heads stacked along the query axis (no repeated K/V);
when the heads of a group keep very different blocks (their union would cost much more than each
head's own set), the blocks are gathered per query head instead. The
additive mask is built at block level (0 for blocks every pair of which is attended, ``-inf`` for
blocks a head does not keep) and evaluated token by token only on the few *partial* blocks (the
causal diagonal, ragged cube edges, two cubes of one block keeping different sets). When a query
block keeps most of its causal prefix, the prefix is attended in place (a view) under the mask
instead of being copied: that is the dense fallback, decided per block.

Any device and dtype; the default fast path for float32 on CPU (where it beats compiled
flex_attention) and the path for anything flex cannot take. Layout: see
:mod:`adaspark.ops.attention.common`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaspark.ops.attention.blocks import BlockPlan, plan_blocks, run_blocks
from adaspark.ops.attention.common import AttentionStats, prepare_inputs
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy

__all__ = [
    "DENSE_PREFIX_FRACTION",
    "GATHER_BLOCK",
    "cube_sparse_attention_gather",
    "gather_kernel",
]

#: default block size (tokens) of the block paths: one 4×4×4 cube
GATHER_BLOCK = 64
#: a query block that keeps at least this fraction of its causal prefix attends the prefix in place
DENSE_PREFIX_FRACTION = 0.75
#: gather per query head (instead of once per GQA group, heads stacked) when the busiest head keeps
#: fewer than this fraction of the blocks of the busiest group's union
PER_HEAD_FRACTION = 0.7


def _permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``[H, S, D]``: the rows of ``x`` (``[H, N, D]``) at the slots of ``perm`` (``[S]``, ``-1``:
    an empty slot, zeros)."""
    return x.index_select(1, perm.clamp_min(0)).masked_fill_((perm < 0)[None, :, None], 0)


def cube_sparse_attention_gather(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    mean_keys: torch.Tensor | None = None,
    index: CubeIndex | None = None,
    stats: AttentionStats | None = None,
    query_block: int = GATHER_BLOCK,
    granularity: str = "token",
) -> torch.Tensor:
    """AdaS-Attn by block gathering (same signature as the reference).

    ``query_block`` is the block size in tokens (queries and keys), default one 4×4×4 cube. The two
    steps, :func:`~adaspark.ops.attention.blocks.plan_blocks` then
    :func:`~adaspark.ops.attention.blocks.run_blocks` with :func:`gather_kernel`, are public.
    """
    inp = prepare_inputs(
        q, k, v, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
        mean_keys=mean_keys, index=index, granularity=granularity,
    )  # fmt: skip
    plan = plan_blocks(q, inp, block=query_block, stats=stats)
    return run_blocks(q, k, v, plan, kernel=gather_kernel, stats=stats)


def gather_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    stats: AttentionStats | None = None,
) -> torch.Tensor:
    """The gather loop for a :class:`~adaspark.ops.attention.blocks.BlockPlan` (adds ``executed``
    to ``stats``)."""
    sel, pat, scale = plan.selection, plan.pattern, plan.inputs.scale
    bsz, hq, _nq, d = q.shape
    hkv = k.shape[1]
    block = pat.block
    g = hq // hkv
    sq, sk = pat.q_pos.shape[1], pat.k_pos.shape[1]
    n_qb, n_kb = sq // block, sk // block
    out = torch.empty_like(q)  # every query row is copied in below (the NaN-poison tests check it)
    ar_blk = torch.arange(block, device=q.device)
    kv_of_head = torch.arange(hq, device=q.device) // g
    kv_of_group = torch.arange(hkv, device=q.device)
    ncls = sel.table.shape[-1]
    executed = 0
    neg = float("-inf")
    for b in range(bsz):
        qp = _permute_rows(q[b], pat.q_perm[b])
        kp = _permute_rows(k[b], pat.k_perm[b])
        vp = _permute_rows(v[b], pat.k_perm[b])
        outp = q.new_zeros(hq, sq, d)
        kflat, vflat = kp.reshape(hkv * sk, d), vp.reshape(hkv * sk, d)
        table_b = sel.table[b]
        for qb in range(n_qb):
            qs, qe = qb * block, (qb + 1) * block
            qv = pat.q_valid[b, qs:qe]
            nqv = int(qv.sum())
            if nqv == 0:
                continue
            kept_q = pat.kept[b, :, qb]  # [Hq, nK]
            grp = kept_q.view(hkv, g, n_kb).any(1)  # [Hkv, nK]
            cnt = grp.sum(1)
            if int(cnt.max()) == 0:  # nothing kept (cannot happen for a valid query: it sees itself)
                outp[:, qs:qe] = 0
                continue
            last = int(grp.any(0).nonzero().max()) + 1
            per_head = kept_q.sum(1)
            if int(cnt.sum()) >= DENSE_PREFIX_FRACTION * hkv * last:
                # dense fallback for this block: the causal prefix in place, masked; heads stacked
                ng, gs, mb = hkv, g, last
                order = torch.arange(last, device=q.device).expand(hkv, last)
                slot_ok = grp[:, :last]
                kg, vg = kp[:, : last * block], vp[:, : last * block]
            else:
                if g > 1 and int(per_head.max()) < PER_HEAD_FRACTION * int(cnt.max()):
                    # the heads of a group keep different blocks: one gather per query head
                    ng, gs, sets, src = hq, 1, kept_q, kv_of_head
                else:
                    ng, gs, sets, src = hkv, g, grp, kv_of_group
                n_set = sets.sum(1)
                mb = int(n_set.max())
                # kept blocks first, in ascending order (stable sort); padded slots point at block 0
                order = torch.argsort(sets.to(torch.int8), dim=1, descending=True, stable=True)[:, :mb]
                slot_ok = torch.arange(mb, device=q.device)[None] < n_set[:, None]
                order = torch.where(slot_ok, order, torch.zeros_like(order))
                tok = (src[:, None, None] * sk + order[:, :, None] * block + ar_blk).view(-1)
                kg = kflat.index_select(0, tok).view(ng, mb * block, d)
                vg = vflat.index_select(0, tok).view(ng, mb * block, d)
            ix = order[:, None].expand(ng, gs, mb)
            kept_o = pat.kept[b, :, qb].view(ng, gs, n_kb).gather(2, ix) & slot_ok[:, None]
            full_o = pat.full[b, :, qb].view(ng, gs, n_kb).gather(2, ix) & kept_o
            part_o = kept_o & ~full_o  # [ng, gs, mb]
            bias = torch.zeros(ng, gs, 1, mb, 1, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~kept_o[:, :, None, :, None], neg)
            bias = bias.expand(ng, gs, block, mb, block).contiguous()
            pcols = part_o.any(1).any(0).nonzero().squeeze(1)
            if pcols.numel():
                npc = pcols.numel()
                kb = order[:, pcols]  # [ng, P] key blocks
                slots = (kb[:, :, None] * block + ar_blk).view(ng, npc * block)
                kcls = pat.k_cls[b][slots]  # [ng, P*block]
                kpos = pat.k_pos[b][slots]
                kval = pat.k_valid[b][slots]
                rows = table_b.index_select(1, pat.q_unit[b, qs:qe]).view(ng, gs * block, ncls)
                allowed = rows.gather(2, kcls[:, None, :].expand(ng, gs * block, npc * block))
                allowed = allowed.view(ng, gs, block, npc * block)
                allowed &= (kpos[:, None, :] <= pat.q_pos[b, qs:qe][:, None])[:, None] & kval[:, None, None]
                tok_bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
                tok_bias.masked_fill_(~allowed, neg)
                tok_bias = tok_bias.view(ng, gs, block, npc, block)
                sub = bias[:, :, :, pcols]
                bias[:, :, :, pcols] = torch.where(part_o[:, :, None, pcols, None], tok_bias, sub)
            bias = bias.view(1, ng, gs * block, mb * block)
            if nqv < block:
                bias = bias.masked_fill(~qv.repeat(gs)[None, None, :, None], neg)
            qg = qp[:, qs:qe].reshape(1, ng, gs * block, d)
            o = F.scaled_dot_product_attention(qg, kg[None], vg[None], attn_mask=bias, scale=scale)
            outp[:, qs:qe] = o.view(hq, block, d)
            executed += nqv * mb * block * hq
        slot = pat.q_slot[b]
        out[b].copy_(outp.index_select(1, slot).masked_fill(~pat.q_valid[b, slot][None, :, None], 0))
    if stats is not None:
        stats.executed += executed
    return out
