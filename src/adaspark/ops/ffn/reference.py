"""Naive AdaS-FFN: run the FFN on every token, then overwrite the skipped ones.

The definition of correct for :func:`adaspark.ops.cube_sparse_ffn`; it saves no compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaspark.ops.cubes import CubeIndex
from adaspark.ops.ffn.common import FFNStats, check_ffn_inputs, select_ffn_tokens_reference, token_scores
from adaspark.ops.selection import SelectionPolicy, as_policy

__all__ = ["cube_sparse_ffn_reference"]


def cube_sparse_ffn_reference(
    x: torch.Tensor,
    f: Callable[[torch.Tensor], torch.Tensor],
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scores: torch.Tensor | None = None,
    mean_compensation: bool = True,
    index: CubeIndex | None = None,
    stats: FFNStats | None = None,
) -> torch.Tensor:
    """``delta = f(x)`` for active tokens; for a skipped token ``k`` of cube ``i``, the mean of
    ``f(x)`` over the active tokens of cube ``i`` (0 without mean compensation, or when the cube has
    no active token, which happens only when all its scores are non-finite).

    Same signature as :func:`adaspark.ops.cube_sparse_ffn`.
    """
    check_ffn_inputs(x, cube_ids, scores)
    pol = as_policy(p, policy)
    if scores is None:
        scores = token_scores(x)
    active = select_ffn_tokens_reference(scores, cube_ids, pol)
    y = f(x)
    delta = y.clone()
    for b in range(x.shape[0]):
        ids = cube_ids[b]
        for c in torch.unique(ids[ids >= 0]).tolist():
            in_cube = ids == c
            act = in_cube & active[b]
            skip = in_cube & ~active[b]
            if bool(skip.any()):
                # a cube without an active token (all its scores non-finite) gets a zero update
                if mean_compensation and bool(act.any()):
                    delta[b][skip] = y[b][act].mean(dim=0)
                else:
                    delta[b][skip] = torch.zeros_like(y[b, 0])
    if stats is not None:
        video = cube_ids >= 0
        stats.tokens += cube_ids.numel()
        stats.video_tokens += int(video.sum())
        stats.active_video += int((video & active).sum())
        stats.ffn_rows += cube_ids.numel()  # the naive path runs the FFN on every token
        stats.compensated += int((video & ~active).sum()) if mean_compensation else 0
    return delta
