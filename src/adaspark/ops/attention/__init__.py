"""AdaS-Attn: adaptive cube-selective attention (reference, blocked) and dense causal attention."""

from __future__ import annotations

import torch

from adaspark.ops.attention.blocked import cube_sparse_attention_blocked
from adaspark.ops.attention.common import SELECT_BLOCK, AttentionStats
from adaspark.ops.attention.dense import dense_causal_attention
from adaspark.ops.attention.reference import (
    cube_sparse_attention_reference,
    reference_attention_mask,
    reference_cube_keep,
)
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy

__all__ = [
    "ATTENTION_BACKENDS",
    "SELECT_BLOCK",
    "AttentionStats",
    "cube_sparse_attention",
    "cube_sparse_attention_blocked",
    "cube_sparse_attention_reference",
    "dense_causal_attention",
    "reference_attention_mask",
    "reference_cube_keep",
]

ATTENTION_BACKENDS = {
    "reference": cube_sparse_attention_reference,
    "blocked": cube_sparse_attention_blocked,
}


def resolve_attention_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend ``"auto"`` stands for on this device/dtype."""
    if backend == "auto":
        return "blocked"
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {backend!r}; choose from 'auto', {sorted(ATTENTION_BACKENDS)}"
        )
    return backend


def cube_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
    mean_keys: torch.Tensor | None = None,
    index: CubeIndex | None = None,
    stats: AttentionStats | None = None,
    query_block: int = 128,
) -> torch.Tensor:
    """Adaptive cube-selective causal attention (AdaS-Attn).

    Each query scores every earlier cube ``j`` other than its own by ``q · k̄_j · scale`` (``k̄_j``
    = mean key of cube ``j``), softmaxes over those candidates, keeps the Top-p set (per query head),
    and attends: all non-video keys, its own cube, and the kept cubes — always causally.

    Args:
        q: ``[B, Hq, Nq, D]`` queries; they are the last ``Nq`` positions of the keys.
        k: ``[B, Hkv, Nk, D]`` keys (``Hq % Hkv == 0``; GQA without repeating K/V).
        v: ``[B, Hkv, Nk, D]`` values.
        cube_ids: ``[B, Nk]`` int64 cube id of every key position, ``-1`` = not video.
        p: Top-p threshold in (0, 1] (ignored when ``policy`` is given). ``p = 1`` is dense.
        policy: A :class:`~adaspark.ops.selection.SelectionPolicy` (top_p / top_k / ratio).
        scale: Score scale, default ``D ** -0.5``.
        key_mask: ``[B, Nk]`` bool, False for padding (padding queries return zeros).
        backend: ``"auto"``, ``"reference"`` or ``"blocked"``.
        mean_keys: Optional cached ``[B, Hkv, C, D]`` float32 cube mean keys (decoding).
        index: Optional precomputed :class:`~adaspark.ops.cubes.CubeIndex` of ``cube_ids``.
        stats: Optional :class:`AttentionStats` to accumulate densities and selection statistics.
        query_block: Query block size of the blocked path.

    Returns:
        ``[B, Hq, Nq, D]`` in the dtype of ``q``.

    Example:
        >>> q = torch.randn(1, 4, 96, 16); k = torch.randn(1, 2, 96, 16); v = torch.randn(1, 2, 96, 16)
        >>> cube_ids = torch.full((1, 96), -1); cube_ids[0, 8:72] = torch.arange(64) // 8
        >>> cube_sparse_attention(q, k, v, cube_ids, p=0.5).shape
        torch.Size([1, 4, 96, 16])
    """
    if isinstance(p, (int, float)) and not isinstance(p, bool) and policy is None and not (0.0 < p <= 1.0):
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    name = resolve_attention_backend(backend, q.device, q.dtype)
    return ATTENTION_BACKENDS[name](
        q,
        k,
        v,
        cube_ids,
        p,
        policy=policy,
        scale=scale,
        key_mask=key_mask,
        mean_keys=mean_keys,
        index=index,
        stats=stats,
        query_block=query_block,
    )
