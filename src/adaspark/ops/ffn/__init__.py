"""AdaS-FFN: adaptive token-selective FFN with mean compensation (reference and gathered paths)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaspark.ops.cubes import CubeIndex
from adaspark.ops.ffn.common import FFNStats, select_ffn_tokens, select_ffn_tokens_reference, token_scores
from adaspark.ops.ffn.gathered import SUM_CHUNK, cube_sparse_ffn_gathered
from adaspark.ops.ffn.reference import cube_sparse_ffn_reference
from adaspark.ops.selection import SelectionPolicy

__all__ = [
    "FFN_BACKENDS",
    "SUM_CHUNK",
    "FFNStats",
    "cube_sparse_ffn",
    "cube_sparse_ffn_gathered",
    "cube_sparse_ffn_reference",
    "select_ffn_tokens",
    "select_ffn_tokens_reference",
    "token_scores",
]

FFN_BACKENDS = {"reference": cube_sparse_ffn_reference, "gathered": cube_sparse_ffn_gathered}


def resolve_ffn_backend(backend: str) -> str:
    """Map a config backend name (``auto``, ``reference``, an efficient attention backend, or
    ``gathered``) to an FFN path: every efficient attention backend pairs with the gathered FFN."""
    if backend in ("auto", "blocked", "decode", "gather", "flex", "native", "triton", "gathered"):
        return "gathered"
    if backend == "reference":
        return "reference"
    raise ValueError(
        f"unknown FFN backend {backend!r}; choose from 'auto', 'reference', 'gathered' "
        "(or an attention backend name)"
    )


def cube_sparse_ffn(
    x: torch.Tensor,
    f: Callable[[torch.Tensor], torch.Tensor],
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scores: torch.Tensor | None = None,
    mean_compensation: bool = True,
    backend: str = "auto",
    index: CubeIndex | None = None,
    stats: FFNStats | None = None,
    ffn_sum_chunk: int = SUM_CHUNK,
) -> torch.Tensor:
    """Adaptive token-selective FFN (AdaS-FFN) with mean compensation.

    Inside each cube, tokens are ranked by ``scores`` (default: the L2 norm of ``x``) and the Top-p
    set goes through ``f``; a skipped token ``k`` of cube ``i`` gets the mean of ``f`` over the
    cube's active tokens. Non-video tokens always go through ``f``.

    Args:
        x: ``[B, N, d]`` input of ``f`` (the residual stream entering the FFN sub-layer).
        f: the FFN sub-layer (e.g. RMSNorm then MLP), applied row-wise to ``[M, d]``.
        cube_ids: ``[B, N]`` int64, ``-1`` = not video.
        p: Top-p threshold in (0, 1]; ``p = 1`` equals the dense FFN.
        policy: optional :class:`~adaspark.ops.selection.SelectionPolicy` (overrides ``p``).
        scores: optional ``[B, N]`` ranking scores (e.g. norms of the residual stream when ``x``
            is already normalised).
        mean_compensation: False gives skipped tokens a zero update (ablation).
        backend: ``"auto"``/``"gathered"`` (efficient) or ``"reference"``.
        index: optional precomputed cube index; stats: optional :class:`FFNStats`.
        ffn_sum_chunk: the gathered path upcasts at most this many FFN output rows to float32 at a
            time for the cube means (a memory bound; default :data:`SUM_CHUNK`).

    Returns:
        ``delta`` ``[B, N, d_out]`` such that the layer output is ``x + delta``.

    Example:
        >>> x = torch.randn(1, 10, 8); ids = torch.tensor([[-1, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
        >>> cube_sparse_ffn(x, torch.nn.Linear(8, 8), ids, p=0.5).shape
        torch.Size([1, 10, 8])
    """
    if isinstance(p, (int, float)) and not isinstance(p, bool) and policy is None and not (0.0 < p <= 1.0):
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    name = resolve_ffn_backend(backend)
    kwargs = {"ffn_sum_chunk": ffn_sum_chunk} if name == "gathered" else {}
    return FFN_BACKENDS[name](
        x,
        f,
        cube_ids,
        p,
        policy=policy,
        scores=scores,
        mean_compensation=mean_compensation,
        index=index,
        stats=stats,
        **kwargs,
    )
