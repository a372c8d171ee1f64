"""AdaS-FFN token selection: inside each cube keep the Top-p tokens by residual-stream L2 norm.

Layout: ``x`` ``[B, N, d]`` residual stream entering the FFN sub-layer, ``cube_ids`` ``[B, N]`` int64
(``-1`` = not video), ``scores`` ``[B, N]`` (default: L2 norm of ``x``). Within a cube the
distribution is ``score / sum(scores of the cube)`` (uniform if the cube's scores sum to 0), computed
in float64; non-video tokens are always active.

Non-finite values: a video token whose score is NaN or ±inf (a residual row holding NaN/inf) is
never selected, whatever the policy (``p = 1`` included): it receives its cube's compensation like
any skipped token, so its output ``x + delta`` stays non-finite exactly where ``x`` is, and the cube
mean that its neighbours receive stays finite — as in the dense FFN, which is row-wise, a bad row
never spreads. A cube with no finite score keeps no token; its tokens get a zero update. Norms of
finite inputs do not overflow: see :func:`token_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaspark.ops.cubes import CubeIndex, build_cube_index
from adaspark.ops.selection import SelectionPolicy, keep_from_probs

__all__ = [
    "FFNStats",
    "check_ffn_inputs",
    "cube_token_probs",
    "select_ffn_tokens",
    "select_ffn_tokens_reference",
    "token_scores",
]


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
    """L2 norm of every token, ``[B, N, d] -> [B, N]``, in float32 (float64 for float64 inputs).

    Accumulated in at least float32, so fp16 squares never overflow. Rows whose float32 norm
    still overflows (bf16/float32 entries beyond ~1.8e19) are recomputed in float64, scaled by their
    largest entry, so a finite row gets its true norm whenever that fits the result dtype; only a
    row holding inf (or a norm beyond the float32 range) scores ``inf``, and a row holding NaN
    scores NaN. The check runs on the ``[B, N]`` norms, not on ``x``.
    """
    out = torch.linalg.vector_norm(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))
    over = torch.isposinf(out)
    if bool(over.any()):
        rows = x[over].double()  # [M, d], only the overflowing rows
        top = rows.abs().amax(dim=-1)
        fixed = top * torch.linalg.vector_norm(rows / top[:, None], dim=-1)
        out[over] = torch.where(torch.isinf(top), top, fixed).to(out.dtype)  # a row holding inf stays inf
    return out


def _cube_probs(s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Normalise scores ``[..., S]`` within each row (float64; negatives count as 0); rows that sum to
    zero are uniform over ``valid``. Entries outside ``valid`` (which must hold every non-finite
    score) are exactly 0."""
    s = torch.where(valid, s.double(), 0.0).clamp_min(0)
    tot = s.sum(-1, keepdim=True)
    uni = valid.double() / valid.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(tot > 0, s / torch.where(tot > 0, tot, torch.ones_like(tot)), uni)


def cube_token_probs(scores: torch.Tensor, index: CubeIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution AdaS-FFN selects from in every cube: ``(probs, valid)``, ``[B, C, S]``
    (float64, bool) in the layout of ``index.token_idx``; ``valid`` marks the video tokens with a
    finite score (the others are never selected)."""
    tidx = index.token_idx  # [B, C, S]
    flat = tidx.clamp_min(0).reshape(scores.shape[0], -1)
    s = scores.gather(1, flat).view_as(tidx)
    valid = (tidx >= 0) & torch.isfinite(s)  # one entry per video token, cheap
    return _cube_probs(s, valid), valid


def select_ffn_tokens(
    scores: torch.Tensor,
    cube_ids: torch.Tensor,
    policy: SelectionPolicy,
    *,
    index: CubeIndex | None = None,
) -> torch.Tensor:
    """Active tokens ``[B, N]`` bool: all non-video tokens plus each cube's kept set (vectorised).

    Args:
        scores: ``[B, N]`` non-negative token scores (L2 norms); video tokens with a non-finite
            score are never selected (see the module docstring).
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
    probs, valid = cube_token_probs(scores, index)
    keep = keep_from_probs(probs, valid, policy)  # [B, C, S]
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
            finite = torch.isfinite(scores[b, pos])
            probs = _cube_probs(scores[b, pos], finite)
            keep = keep_from_probs(probs[None], finite[None], policy)[0]
            active[b, pos[keep]] = True
    return active
