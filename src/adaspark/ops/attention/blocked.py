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
    check_fraction,
    prepare_inputs,
    select_range,
)
from adaspark.ops.attention.units import token_selection
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy

__all__ = ["DENSE_BLOCK_FRACTION", "cube_sparse_attention_blocked"]

#: when a query block keeps at least this fraction of its causal prefix, attend the prefix in place
#: (masked) instead of gathering the kept keys into a copy (the default of ``blocked_dense_fraction``)
DENSE_BLOCK_FRACTION = 0.75


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
    granularity: str = "token",
    blocked_dense_fraction: float = DENSE_BLOCK_FRACTION,
) -> torch.Tensor:
    """Efficient AdaS-Attn by key gathering (same signature as the reference, plus its threshold).

    ``query_block`` is rounded up to a multiple of ``SELECT_BLOCK`` (64). Selection is per token:
    ``granularity="cube"`` is accepted only when no query is a video token (then both are the same,
    e.g. decoding), and raises otherwise. A query block that keeps at least
    ``blocked_dense_fraction`` of its causal prefix attends the prefix in place under the mask
    instead of gathering the kept keys (same result; a speed trade-off, :data:`DENSE_BLOCK_FRACTION`).
    """
    inp = prepare_inputs(
        q, k, v, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
        mean_keys=mean_keys, index=index, granularity=granularity,
    )  # fmt: skip
    check_fraction("blocked_dense_fraction", blocked_dense_fraction)
    bsz, hq, hkv, nq, nk, d = inp.bsz, inp.hq, inp.hkv, inp.nq, inp.nk, inp.d
    if granularity == "cube" and bool((cube_ids[:, nk - nq :] >= 0).any()):
        raise ValueError(
            "the 'blocked' backend selects per token; use 'gather' or 'flex' for granularity='cube'"
        )
    pol, scale, index, mean_keys, km = inp.policy, inp.scale, inp.index, inp.mean_keys, inp.key_mask
    record = stats is not None and stats.record
    keeps = []  # the per-sample selections, kept only when recorded
    g = hq // hkv
    qb_size = max(SELECT_BLOCK, -(-query_block // SELECT_BLOCK) * SELECT_BLOCK)
    q_offset = nk - nq
    out = torch.empty_like(q)
    kpos = torch.arange(nk, device=q.device)
    n_cls = index.max_cubes  # key class: cube id, or n_cls for every non-video key
    for b in range(bsz):
        kc = cube_ids[b]
        kv_ok = km[b]
        kcls = torch.where(kc >= 0, kc, torch.full_like(kc, n_cls))
        if record:
            keeps.append(torch.zeros(hq, nq, n_cls, dtype=torch.bool, device=q.device))
        for s in range(0, nq, qb_size):
            e = min(s + qb_size, nq)
            bq = e - s
            qpos = kpos[q_offset + s : q_offset + e]
            qc = kc[qpos]
            qvalid = kv_ok[qpos]
            keep = select_range(q[b], mean_keys[b], s, e, q_offset, kc, index, b, pol, scale, kv_ok, stats)
            if record:
                keeps[b][:, s:e] = keep
            # per (head, query) table over key classes: kept cubes + own cube + non-video keys
            table = torch.ones(hq, bq, n_cls + 1, dtype=torch.bool, device=q.device)
            table[..., :n_cls] = keep
            vq = (qc >= 0).nonzero().squeeze(1)
            table[:, vq, qc[vq]] = True
            union = table.any(dim=1).any(dim=0)  # [n_cls + 1]
            last = q_offset + e - 1
            pre_ok = kv_ok[: last + 1] & union[kcls[: last + 1]]
            m = int(pre_ok.sum())
            if m == 0:
                out[b, :, s:e] = 0
                continue
            dense_prefix = m >= blocked_dense_fraction * (last + 1)
            if dense_prefix:
                # nearly everything is kept: attend the whole prefix (a view, no gather) under the mask
                m = last + 1
                kpos_g = kpos[:m]
                kg, vg = k[b, :, :m], v[b, :, :m]
            else:
                kpos_g = pre_ok.nonzero().squeeze(1)  # [M] ascending positions
                kg = k[b].index_select(1, kpos_g)  # [Hkv, M, D]
                vg = v[b].index_select(1, kpos_g)
            # additive mask in the compute dtype (SDPA would convert a bool mask on every call),
            # built from a class-major table: gathering whole rows beats gathering along the last dim
            neg_t = torch.zeros(n_cls + 1, hq * bq, dtype=q.dtype, device=q.device)
            neg_t.masked_fill_(~table.reshape(hq * bq, n_cls + 1).t(), float("-inf"))
            bias = neg_t.index_select(0, kcls[kpos_g]).t().contiguous().view(hq, bq, m)  # [Hq, bq, M]
            if dense_prefix and not bool(kv_ok[:m].all()):
                bias.masked_fill_(~kv_ok[:m][None, None, :], float("-inf"))
            # causality can only bite on keys at or after the block's first query
            t0 = int(torch.searchsorted(kpos_g, qpos[0]))
            future = kpos_g[None, t0:] > qpos[:, None]  # [bq, M - t0]
            bias[:, :, t0:].masked_fill_(future[None], float("-inf"))
            if not bool(qvalid.all()):
                bias.masked_fill_(~qvalid[None, :, None], float("-inf"))
            qg = q[b, :, s:e].reshape(1, hkv, g * bq, d)
            # 4-D inputs take PyTorch's fused (flash) CPU kernel; 3-D ones do not
            o = F.scaled_dot_product_attention(
                qg, kg[None], vg[None], attn_mask=bias.reshape(1, hkv, g * bq, m), scale=scale
            ).view(hq, bq, d)
            out[b, :, s:e] = o.masked_fill(~qvalid[None, :, None], 0)
            if stats is not None:
                # keys before the block's first query are visible to all its queries: count them per
                # class and weight by the table; only the short causal tail is counted entry by entry
                before = kpos_g[:t0]
                head = kcls[before][kv_ok[before]]
                per_cls = torch.bincount(head, minlength=n_cls + 1).double()
                rows = (table & qvalid[None, :, None]).double()
                stats.attended += rows.reshape(hq, -1, n_cls + 1).sum(1) @ per_cls
                stats.attended += (bias[:, :, t0:] == 0).sum(dim=(1, 2)).double()
                stats.executed += int(qvalid.sum()) * m * hq
    inp.count_call(stats)
    inp.count_mean_keys(stats)
    if record:
        stats.log_selection(token_selection(torch.stack(keeps), cube_ids, km))
    return out
