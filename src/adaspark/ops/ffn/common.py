"""AdaS-FFN token selection: inside each cube keep the Top-p tokens by residual-stream L2 norm.

Layout: ``x`` ``[B, N, d]`` residual stream entering the FFN sub-layer, ``cube_ids`` ``[B, N]`` int64
(``-1`` = not video), ``scores`` ``[B, N]`` (default: L2 norm of ``x``). Within a cube the
distribution is ``score / sum(scores of the cube)`` (uniform if the cube's scores sum to 0), computed
in float64; non-video tokens are always active.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaspark.ops.cubes import CubeIndex, build_cube_index
from adaspark.ops.selection import SelectionPolicy, keep_from_probs

__all__ = ["FFNStats", "check_ffn_inputs", "select_ffn_tokens", "select_ffn_tokens_reference", "token_scores"]


@dataclass
class FFNStats:
    """Counters one FFN call adds to.

    Attributes:
        tokens: real tokens seen (padding included only when no key mask is known).
        video_tokens: video tokens seen.
        active_video: video tokens that went through the FFN.
        ffn_rows: rows the FFN really processed (active video + all non-video).
        compensated: skipped tokens that received the cube's mean update.
    """

    tokens: int = 0
    video_tokens: int = 0
    active_video: int = 0
    ffn_rows: int = 0
    compensated: int = 0

    @property
    def active_fraction(self) -> float:
        """Fraction of video tokens that went through the FFN (1.0 without video)."""
        return self.active_video / self.video_tokens if self.video_tokens else 1.0


def check_ffn_inputs(x: torch.Tensor, cube_ids: torch.Tensor, scores: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [B, N, d], got {getattr(x, 'shape', type(x))}")
    if (
        not isinstance(cube_ids, torch.Tensor)
        or cube_ids.shape != x.shape[:2]
        or cube_ids.dtype != torch.int64
    ):
        raise ValueError(
            f"cube_ids must be an int64 tensor [B, N] = {list(x.shape[:2])}, got "
            f"{tuple(getattr(cube_ids, 'shape', ()))} {getattr(cube_ids, 'dtype', '')}"
        )
    if scores is not None and scores.shape != x.shape[:2]:
        raise ValueError(f"scores must have shape [B, N] = {list(x.shape[:2])}, got {tuple(scores.shape)}")


def token_scores(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of every token, ``[B, N, d] -> [B, N]``, accumulated in at least float32 (no overflow
    for bf16/fp16 inputs; float64 stays float64)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))


def _cube_probs(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Normalise non-negative scores ``[..., S]`` within each row (float64); zero rows are uniform."""
    s = torch.nan_to_num(s.double(), nan=0.0, posinf=torch.finfo(torch.float64).max).clamp_min(0) * valid
    tot = s.sum(-1, keepdim=True)
    uni = valid.double() / valid.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(tot > 0, s / torch.where(tot > 0, tot, torch.ones_like(tot)), uni)


def select_ffn_tokens(
    scores: torch.Tensor,
    cube_ids: torch.Tensor,
    policy: SelectionPolicy,
    *,
    index: CubeIndex | None = None,
) -> torch.Tensor:
    """Active tokens ``[B, N]`` bool: all non-video tokens plus each cube's kept set (vectorised).

    Args:
        scores: ``[B, N]`` non-negative token scores (L2 norms).
        cube_ids: ``[B, N]`` int64, ``-1`` = not video.
        policy: selection policy applied within each cube.
        index: optional precomputed cube index of ``cube_ids``.
    """
    if index is None:
        index = build_cube_index(cube_ids)
    active = cube_ids < 0
    if index.max_cubes == 0:
        return active
    bsz = scores.shape[0]
    tidx = index.token_idx  # [B, C, S]
    valid = tidx >= 0
    flat = tidx.clamp_min(0).reshape(bsz, -1)
    s = scores.gather(1, flat).view_as(tidx)
    keep = keep_from_probs(_cube_probs(s, valid), valid, policy)  # [B, C, S]
    active = active.clone()
    rows = torch.arange(bsz, device=scores.device)[:, None, None].expand_as(tidx)
    active[rows[keep], tidx[keep]] = True
    return active


def select_ffn_tokens_reference(
    scores: torch.Tensor,
    cube_ids: torch.Tensor,
    policy: SelectionPolicy,
    *,
    index: CubeIndex | None = None,
) -> torch.Tensor:
    """Naive per-cube loop with the same result as :func:`select_ffn_tokens` (for tests)."""
    active = cube_ids < 0
    for b in range(cube_ids.shape[0]):
        ids = cube_ids[b]
        for c in torch.unique(ids[ids >= 0]).tolist():
            pos = (ids == c).nonzero().squeeze(1)  # ascending positions
            probs = _cube_probs(scores[b, pos], torch.ones(pos.numel(), dtype=torch.bool))
            keep = keep_from_probs(probs[None], torch.ones(1, pos.numel(), dtype=torch.bool), policy)[0]
            active[b, pos[keep]] = True
    return active
