"""Blocked AdaS-Attn: per query block, gather only the keys some query of the block may attend.

For each sample and each block of queries, the cube selection of every query and head is computed
(:func:`~adaspark.ops.attention.common.select_range`), the union of the kept cubes, the block's own
cubes and all non-video keys up to the block's last position is gathered, and one SDPA call per
block runs with the query heads of each GQA group stacked along the query axis (no repeated K/V)
and a ``[Hkv, G·bq, M]`` boolean mask holding the exact per-head, per-query semantics. Memory is
``O(Hq · bq · N)`` per block; no ``N × N`` mask is ever built. Layout: see
:mod:`adaspark.ops.attention.common`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaspark.ops.attention.common import (
    SELECT_BLOCK,
    AttentionStats,
    causal_valid_pairs,
    check_attention_inputs,
    select_range,
)
from adaspark.ops.cubes import CubeIndex, build_cube_index, cube_mean_keys
from adaspark.ops.selection import SelectionPolicy, as_policy

__all__ = ["cube_sparse_attention_blocked"]


def cube_sparse_attention_blocked(
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
    query_block: int = 128,
) -> torch.Tensor:
    """Efficient AdaS-Attn by key gathering (same signature as the reference).

    ``query_block`` is rounded up to a multiple of ``SELECT_BLOCK`` (64).
    """
    bsz, hq, hkv, nq, nk, d = check_attention_inputs(q, k, v, cube_ids, key_mask)
    pol = as_policy(p, policy)
    scale = d**-0.5 if scale is None else scale
    own_means = mean_keys is None
    if index is None:
        index = build_cube_index(cube_ids)
    if mean_keys is None:
        mean_keys = cube_mean_keys(k, index)
    km = torch.ones(bsz, nk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    g = hq // hkv
    qb_size = max(SELECT_BLOCK, -(-query_block // SELECT_BLOCK) * SELECT_BLOCK)
    q_offset = nk - nq
    out = torch.empty_like(q)
    kpos = torch.arange(nk, device=q.device)
    for b in range(bsz):
        kc = cube_ids[b]
        kv_ok = km[b]
        is_text = (kc < 0) & kv_ok
        is_video = kc >= 0
        for s in range(0, nq, qb_size):
            e = min(s + qb_size, nq)
            bq = e - s
            qpos = kpos[q_offset + s : q_offset + e]
            qc = kc[qpos]
            qvalid = kv_ok[qpos]
            keep = select_range(q[b], mean_keys[b], s, e, q_offset, kc, index, b, pol, scale, kv_ok, stats)
            union = keep.any(dim=1).any(dim=0) if keep.shape[-1] else keep.new_zeros(0)
            if union.numel():
                own = qc[qc >= 0]
                union = union.clone()
                union[own] = True
                vid_keep = is_video & union[kc.clamp_min(0)] & kv_ok
            else:
                vid_keep = torch.zeros_like(is_text)
            last = q_offset + e - 1
            idx = ((is_text | vid_keep)[: last + 1]).nonzero().squeeze(1)  # [M]
            m = idx.numel()
            if m == 0:
                out[b, :, s:e] = 0
                continue
            kg = k[b].index_select(1, idx)  # [Hkv, M, D]
            vg = v[b].index_select(1, idx)
            kcg = kc[idx]
            causal = idx[None, :] <= qpos[:, None]  # [bq, M]
            base = causal & ((kcg < 0)[None, :] | (kcg[None, :] == qc[:, None]))
            if keep.shape[-1]:
                selg = keep.index_select(2, kcg.clamp_min(0)) & (kcg >= 0)[None, None, :]
                allowed = base[None] | (selg & causal[None])  # [Hq, bq, M]
            else:
                allowed = base[None].expand(hq, bq, m)
            allowed = allowed & qvalid[None, :, None]
            qg = q[b, :, s:e].reshape(hkv, g * bq, d)
            o = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=allowed.reshape(hkv, g * bq, m), scale=scale
            ).view(hq, bq, d)
            out[b, :, s:e] = o.masked_fill(~qvalid[None, :, None], 0)
            if stats is not None:
                stats.attended += allowed.sum(dim=(1, 2)).double()
                stats.executed += int(qvalid.sum()) * m * hq
    if stats is not None:
        stats.kv_heads = hkv
        stats.queries += int(km[:, q_offset:].sum())
        stats.causal_pairs += int(causal_valid_pairs(km, nq).sum())
        stats.mean_key_tokens += int((cube_ids >= 0).sum()) if own_means else 0
    return out
