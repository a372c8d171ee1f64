"""Naive AdaS-Attn: materialise the full token mask, then masked softmax attention.

This is the definition of correct (the semantics stated in
:func:`adaspark.ops.attention.cube_sparse_attention`); it is O(N²) in memory and meant for tests
and small inputs. Layout: see :mod:`adaspark.ops.attention.common`.
"""

from __future__ import annotations

import torch

from adaspark.ops.attention.common import (
    AttentionStats,
    causal_valid_pairs,
    check_attention_inputs,
    select_range,
)
from adaspark.ops.attention.units import check_granularity, select_units
from adaspark.ops.cubes import CubeIndex, build_cube_index, cube_mean_keys
from adaspark.ops.selection import SelectionPolicy, as_policy

__all__ = ["cube_sparse_attention_reference", "reference_attention_mask", "reference_cube_keep"]


def _prepare(q, k, cube_ids, key_mask, mean_keys, index):
    bsz, _hq, _hkv, _nq, nk, _d = check_attention_inputs(q, k, k, cube_ids, key_mask)
    if index is None:
        index = build_cube_index(cube_ids)
    if mean_keys is None:
        mean_keys = cube_mean_keys(k, index)
    if key_mask is None:
        key_mask = torch.ones(bsz, nk, dtype=torch.bool, device=q.device)
    return index, mean_keys, key_mask


def reference_cube_keep(
    q: torch.Tensor,
    k: torch.Tensor,
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    mean_keys: torch.Tensor | None = None,
    index: CubeIndex | None = None,
    stats: AttentionStats | None = None,
    granularity: str = "token",
) -> torch.Tensor:
    """Kept candidate cubes of every query and head: ``[B, Hq, Nq, C]`` bool (own cube excluded).

    ``granularity="cube"``: the video queries of a cube share the selection of their cube (the
    average of their distributions, :mod:`adaspark.ops.attention.units`); non-video queries select
    per token.
    """
    check_granularity(granularity)
    pol = as_policy(p, policy)
    index, mean_keys, key_mask = _prepare(q, k, cube_ids, key_mask, mean_keys, index)
    bsz, hq, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    c = index.max_cubes
    if granularity == "cube":
        sel = select_units(q, mean_keys, cube_ids, key_mask, index, pol, scale, "cube", stats)
        keep = sel.table[..., :c].gather(2, sel.unit[:, None, :, None].expand(bsz, hq, nq, c)).clone()
        qc = cube_ids[:, nk - nq :]
        for b in range(bsz):
            vq = (qc[b] >= 0).nonzero().squeeze(1)
            keep[b, :, vq, qc[b, vq]] = False
        return keep
    keep = torch.zeros(bsz, hq, nq, c, dtype=torch.bool, device=q.device)
    for b in range(bsz):
        if nq:
            keep[b] = select_range(
                q[b], mean_keys[b], 0, nq, nk - nq, cube_ids[b], index, b, pol, scale, key_mask[b], stats
            )
    return keep


def reference_attention_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    mean_keys: torch.Tensor | None = None,
    index: CubeIndex | None = None,
    stats: AttentionStats | None = None,
    granularity: str = "token",
) -> torch.Tensor:
    """The token-level AdaS-Attn mask ``[B, Hq, Nq, Nk]`` (True = attended).

    Query ``i`` (position ``t = Nk - Nq + i``) attends key ``j`` iff ``j <= t``, both are real tokens,
    and ``j`` is non-video, or in the query's own cube, or in a kept cube. Padding queries attend
    nothing.
    """
    index, mean_keys, key_mask = _prepare(q, k, cube_ids, key_mask, mean_keys, index)
    keep = reference_cube_keep(
        q,
        k,
        cube_ids,
        p,
        policy=policy,
        scale=scale,
        key_mask=key_mask,
        mean_keys=mean_keys,
        index=index,
        stats=stats,
        granularity=granularity,
    )
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    dev = q.device
    qpos = torch.arange(nk - nq, nk, device=dev)
    kpos = torch.arange(nk, device=dev)
    causal = kpos[None, :] <= qpos[:, None]  # [Nq, Nk]
    kc = cube_ids  # [B, Nk]
    qc = cube_ids[:, nk - nq :]  # [B, Nq]
    text_k = (kc < 0)[:, None, :]  # [B, 1, Nk]
    same = (qc[:, :, None] == kc[:, None, :]) & (kc[:, None, :] >= 0)  # [B, Nq, Nk]
    if keep.shape[-1] > 0:
        sel = keep.gather(-1, kc.clamp_min(0)[:, None, None, :].expand(bsz, hq, nq, nk))
        sel = sel & (kc >= 0)[:, None, None, :]
    else:
        sel = torch.zeros(bsz, hq, nq, nk, dtype=torch.bool, device=dev)
    mask = (text_k | same)[:, None] | sel
    qvalid = key_mask[:, nk - nq :]
    mask = mask & causal & key_mask[:, None, None, :] & qvalid[:, None, :, None]
    return mask


def cube_sparse_attention_reference(
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
) -> torch.Tensor:
    """Naive AdaS-Attn (same signature as :func:`adaspark.ops.cube_sparse_attention`).

    Computes ``softmax(q kᵀ · scale + mask) v`` with the full ``[B, Hq, Nq, Nk]`` mask of
    :func:`reference_attention_mask`, in the input dtype (softmax in float32), like an eager
    attention. Rows that attend nothing (padding queries) are zero. ``query_block`` is ignored.
    """
    check_attention_inputs(q, k, v, cube_ids, key_mask)
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    own_means = mean_keys is None
    mask = reference_attention_mask(
        q,
        k,
        cube_ids,
        p,
        policy=policy,
        scale=scale,
        key_mask=key_mask,
        mean_keys=mean_keys,
        index=index,
        stats=stats,
        granularity=granularity,
    )
    g = hq // hkv
    kr = k.repeat_interleave(g, dim=1)
    vr = v.repeat_interleave(g, dim=1)
    scores = torch.matmul(q, kr.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    w = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    # rows that attend nothing (padding queries) are zero; NaN from the inputs propagates as in SDPA
    w = w.masked_fill(~mask.any(-1, keepdim=True), 0.0).to(q.dtype)
    out = torch.matmul(w, vr)
    if stats is not None:
        km = torch.ones(bsz, nk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        qvalid = km[:, nk - nq :]
        stats.kv_heads = hkv
        stats.queries += int(qvalid.sum())
        stats.causal_pairs += int(causal_valid_pairs(km, nq).sum())
        stats.attended += mask.sum(dim=(0, 2, 3)).double()
        stats.executed += int(qvalid.sum()) * nk * hq  # the naive kernel scores every key
        stats.mean_key_tokens += int((cube_ids >= 0).sum()) if own_means else 0
    return out
