"""Naive AdaS-Attn: materialise the full token mask, then masked softmax attention.

This is the definition of correct (the semantics stated in
:func:`adaspark.ops.attention.cube_sparse_attention`); it is O(N²) in memory and meant for tests
and small inputs. Layout: see :mod:`adaspark.ops.attention.common`.
"""

from __future__ import annotations

import torch

from adaspark.ops.attention.common import AttentionInputs, AttentionStats, prepare_inputs, select_range
from adaspark.ops.attention.units import select_units, token_selection
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy

__all__ = ["cube_sparse_attention_reference", "reference_attention_mask", "reference_cube_keep"]


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
    per token. With ``stats.record`` the selection is appended to ``stats.selections_log``.
    """
    inp = prepare_inputs(
        q, k, None, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
        mean_keys=mean_keys, index=index, granularity=granularity,
    )  # fmt: skip
    return _cube_keep(q, inp, stats)


def _cube_keep(q: torch.Tensor, inp: AttentionInputs, stats: AttentionStats | None) -> torch.Tensor:
    pol, scale, c = inp.policy, inp.scale, inp.index.max_cubes
    if inp.granularity == "cube":
        sel = select_units(q, inp.mean_keys, inp.cube_ids, inp.key_mask, inp.index, pol, scale, "cube", stats)
        return sel.kept_cubes(inp.cube_ids)
    keep = torch.zeros(inp.bsz, inp.hq, inp.nq, c, dtype=torch.bool, device=q.device)
    for b in range(inp.bsz):
        if inp.nq:
            keep[b] = select_range(
                q[b], inp.mean_keys[b], 0, inp.nq, inp.q_offset, inp.cube_ids[b], inp.index, b, pol,
                scale, inp.key_mask[b], stats,
            )  # fmt: skip
    if stats is not None and stats.record:
        stats.log_selection(token_selection(keep, inp.cube_ids, inp.key_mask))
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
    inp = prepare_inputs(
        q, k, None, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
        mean_keys=mean_keys, index=index, granularity=granularity,
    )  # fmt: skip
    return _token_mask(q, inp, _cube_keep(q, inp, stats))


def _token_mask(q: torch.Tensor, inp: AttentionInputs, keep: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, Nq, Nk]`` token mask of the kept cubes ``keep`` ``[B, Hq, Nq, C]``."""
    cube_ids, key_mask = inp.cube_ids, inp.key_mask
    bsz, hq, nq, nk = inp.bsz, inp.hq, inp.nq, inp.nk
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
    inp = prepare_inputs(
        q, k, v, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
        mean_keys=mean_keys, index=index, granularity=granularity,
    )  # fmt: skip
    hq, hkv, nk, scale = inp.hq, inp.hkv, inp.nk, inp.scale
    mask = _token_mask(q, inp, _cube_keep(q, inp, stats))
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
        inp.count_call(stats)
        inp.count_mean_keys(stats)
        stats.attended += mask.sum(dim=(0, 2, 3)).double()
        stats.executed += int(inp.query_valid.sum()) * nk * hq  # the naive kernel scores every key
    return out
