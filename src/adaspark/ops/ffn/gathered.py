"""Efficient AdaS-FFN: gather the active tokens, run the FFN on them only, scatter back.

Skipped tokens receive the per-cube mean of the active outputs, accumulated in float32 in chunks of
:data:`SUM_CHUNK` (``ffn_sum_chunk``) rows (no float32 copy of the whole output). Every output row is written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaspark.ops.cubes import CubeIndex, build_cube_index
from adaspark.ops.ffn.common import FFNStats, check_ffn_inputs, select_ffn_tokens, token_scores
from adaspark.ops.selection import SelectionPolicy, as_policy

__all__ = ["SUM_CHUNK", "cube_sparse_ffn_gathered"]

#: rows of FFN output upcast to float32 at a time for the per-cube means (the default of
#: ``ffn_sum_chunk``: a memory bound, the result does not depend on it)
SUM_CHUNK = 4096


def cube_sparse_ffn_gathered(
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
    ffn_sum_chunk: int = SUM_CHUNK,
) -> torch.Tensor:
    """Token-selective FFN running ``f`` on ``[M, d]`` active rows only (same signature as the
    reference, plus ``ffn_sum_chunk``: FFN output rows upcast to float32 at a time for the cube means)."""
    check_ffn_inputs(x, cube_ids, scores)
    if isinstance(ffn_sum_chunk, bool) or not isinstance(ffn_sum_chunk, int) or ffn_sum_chunk < 1:
        raise ValueError(f"ffn_sum_chunk must be an integer >= 1, got {ffn_sum_chunk!r}")
    pol = as_policy(p, policy)
    bsz, n, d = x.shape
    if index is None:
        index = build_cube_index(cube_ids)
    if scores is None:
        scores = token_scores(x)
    active = select_ffn_tokens(scores, cube_ids, pol, index=index)
    flat_active = active.reshape(-1)
    act_idx = flat_active.nonzero().squeeze(1)
    y_act = f(x.reshape(bsz * n, d).index_select(0, act_idx))
    d_out = y_act.shape[-1]
    delta = y_act.new_empty(bsz * n, d_out)
    delta.index_copy_(0, act_idx, y_act)
    skip_idx = (~flat_active).nonzero().squeeze(1)
    if skip_idx.numel():
        if mean_compensation:
            c = max(index.max_cubes, 1)
            gid = (cube_ids + torch.arange(bsz, device=x.device)[:, None] * c).reshape(-1)
            is_vid_act = cube_ids.reshape(-1)[act_idx] >= 0
            gid_act = gid[act_idx][is_vid_act]
            sums = torch.zeros(bsz * c, d_out, dtype=torch.float32, device=x.device)
            vid_rows = is_vid_act.nonzero().squeeze(1)
            # float32 cube sums, upcasting at most ffn_sum_chunk rows at a time
            for lo in range(0, vid_rows.numel(), ffn_sum_chunk):
                rows = vid_rows[lo : lo + ffn_sum_chunk]
                sums.index_add_(0, gid_act[lo : lo + ffn_sum_chunk], y_act.index_select(0, rows).float())
            cnt = torch.bincount(gid_act, minlength=bsz * c).clamp_min(1)
            means = (sums / cnt[:, None].to(torch.float32)).to(y_act.dtype)
            delta.index_copy_(0, skip_idx, means.index_select(0, gid[skip_idx]))
        else:
            delta.index_fill_(0, skip_idx, 0)
    if stats is not None:
        video = cube_ids >= 0
        stats.tokens += cube_ids.numel()
        stats.video_tokens += int(video.sum())
        stats.active_video += int((video & active).sum())
        stats.ffn_rows += int(act_idx.numel())
        stats.compensated += int(skip_idx.numel()) if mean_compensation else 0
    return delta.view(bsz, n, d_out)
