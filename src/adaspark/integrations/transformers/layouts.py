"""Cube layouts for token arrangements that ``adaspark.core.layout.build_layout`` does not cover.

``build_layout`` expects every video as one unbroken run of ``T·H·W`` placeholder tokens (Qwen2-VL,
Qwen2.5-VL). Two other families differ:

* Qwen3-VL writes each temporal slice of a video as its own group, ``<t seconds>`` text and
  ``<|vision_start|> … <|vision_end|>`` between the slices, so one video's ``T·H·W`` tokens are
  spread over ``T`` runs;
* LLaVA-OneVision follows the ``F·h·w`` pooled frame tokens of a video with one more placeholder
  token that carries the learned newline embedding.

:func:`build_segmented_layout` reads each video's tokens in order across such gaps, cubes them on
the video's own ``(t, h, w)`` grid (so a cube can hold tokens of slices with text between them) and
leaves trailing placeholder tokens un-cubed. It needs no transformers (tensors in, a
:class:`~adaspark.core.layout.Layout` out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adaspark.core.layout import IMAGE, TEXT, VIDEO, Layout, VisualSpan, grid_cube_ids

__all__ = ["build_segmented_layout"]

_NAMES = {VIDEO: "video", IMAGE: "image"}


def _runs(types: list[int]) -> list[tuple[int, int, int]]:
    """``(type, start, end)`` runs of equal values."""
    out = []
    start = 0
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            out.append((types[start], start, i))
            start = i
    return out


def _check_grids(grids, what: str) -> list[tuple[int, int, int]]:
    out = []
    for i, g in enumerate(grids or []):
        t, h, w = (int(x) for x in g)
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"{what} {i}: grid {[t, h, w]} (LM tokens) must be positive")
        out.append((t, h, w))
    return out


class _Item:
    """One video or image being read from the token stream."""

    def __init__(self, kind: int, index: int, sample: int, grid: tuple[int, int, int], trailing: int):
        self.kind, self.index, self.sample, self.grid = kind, index, sample, grid
        self.body = grid[0] * grid[1] * grid[2]
        self.need = self.body + trailing
        self.positions: list[int] = []

    @property
    def name(self) -> str:
        return f"{_NAMES[self.kind]} {self.index} (sample {self.sample})"


def build_segmented_layout(
    mm_token_type_ids: torch.Tensor,
    video_grids: Sequence[Sequence[int]] | None,
    *,
    cube: tuple[int, int, int] = (4, 4, 4),
    attention_mask: torch.Tensor | None = None,
    image_grids: Sequence[Sequence[int]] | None = None,
    images_as_video: bool = False,
    slices_may_split: bool = False,
    video_trailing_tokens: int = 0,
    grid_source: str = "video_grid_thw",
) -> Layout:
    """Assign cube ids to video tokens that may be interrupted by text between temporal slices.

    Args:
        mm_token_type_ids: ``[B, N]`` 0 = text, 1 = image, 2 = video placeholder token.
        video_grids: ``(t, h, w)`` grids **in LM tokens** of all videos of the batch, in the order
            their tokens appear (sample 0 first). None when there is no video.
        cube: cube size ``(ct, ch, cw)`` in LM tokens.
        attention_mask: ``[B, N]``, 0 = padding (left or right); padding is never video.
        image_grids: image grids in LM tokens (``(1, h, w)``), in order; without them image tokens
            are left as they are (not cubed, not checked).
        images_as_video: cube each image as a one-frame video.
        slices_may_split: a video's temporal slices may be separated by text (Qwen3-VL); a break
            inside a slice is an error. Without it each video must be one run.
        video_trailing_tokens: placeholder tokens that follow every video's ``t·h·w`` grid tokens in
            the same run and are not video content (LLaVA-OneVision's newline token: 1); they stay
            non-video (``-1``).
        grid_source: name of the input the video grids came from, for error messages.

    Returns:
        :class:`~adaspark.core.layout.Layout` whose spans list the (possibly non-contiguous)
        positions of every cubed video. Raises ``ValueError`` naming the sample and video when the
        tokens and the grids disagree.

    Example:
        >>> types = torch.tensor([[0, 2, 2, 0, 0, 2, 2, 0]])  # two slices of 1×2 tokens, text between
        >>> build_segmented_layout(types, [(2, 1, 2)], cube=(2, 1, 1), slices_may_split=True).cube_ids
        tensor([[-1,  0,  1, -1, -1,  0,  1, -1]])
    """
    if mm_token_type_ids.dim() != 2:
        raise ValueError(f"mm_token_type_ids must be [B, N], got {tuple(mm_token_type_ids.shape)}")
    if video_trailing_tokens < 0:
        raise ValueError(f"video_trailing_tokens must be >= 0, got {video_trailing_tokens}")
    bsz, n = mm_token_type_ids.shape
    types_all = mm_token_type_ids.long().cpu()
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (bsz, n):
            raise ValueError(
                f"attention_mask must be [B, N] = [{bsz}, {n}], got {tuple(attention_mask.shape)}"
            )
        types_all = types_all.masked_fill(attention_mask.cpu() == 0, TEXT)
    grids = {VIDEO: _check_grids(video_grids, "video"), IMAGE: _check_grids(image_grids, "image")}
    sources = {VIDEO: grid_source, IMAGE: "image_grid_thw"}
    trailing = {VIDEO: video_trailing_tokens, IMAGE: 0}
    used = {VIDEO: 0, IMAGE: 0}
    cube_ids = torch.full((bsz, n), -1, dtype=torch.long)
    spans: list[VisualSpan] = []

    for b in range(bsz):
        next_cube = 0
        item: _Item | None = None
        for kind, start, end in _runs(types_all[b].tolist()):
            if kind == TEXT:
                continue
            if kind not in (IMAGE, VIDEO):
                raise ValueError(f"mm_token_type_ids has unknown value {kind} in sample {b}")
            if kind == IMAGE and not grids[IMAGE]:
                if images_as_video:
                    raise ValueError("images_as_video=True needs image_grid_thw for the image tokens")
                if item is not None:
                    raise ValueError(f"{item.name}: its tokens are interrupted by image tokens")
                continue
            pos = start
            while pos < end:
                if item is None:
                    k = used[kind]
                    if k >= len(grids[kind]):
                        raise ValueError(
                            f"{_NAMES[kind]} {k} (sample {b}): the sequence holds more {_NAMES[kind]} tokens "
                            f"than {sources[kind]} describes ({len(grids[kind])} {_NAMES[kind]}s): grid and "
                            "token count do not match"
                        )
                    item = _Item(kind, k, b, grids[kind][k], trailing[kind])
                    used[kind] += 1
                elif item.kind != kind:
                    raise ValueError(f"{item.name}: its tokens are interrupted by {_NAMES[kind]} tokens")
                take = min(item.need - len(item.positions), end - pos)
                item.positions.extend(range(pos, pos + take))
                pos += take
                if len(item.positions) == item.need:
                    if kind == VIDEO or images_as_video:
                        next_cube = _place(item, cube, cube_ids, spans, next_cube)
                    item = None
            if item is not None:
                _check_break(item, slices_may_split, sources[item.kind])
        if item is not None:
            raise ValueError(
                f"{item.name}: {sources[item.kind]} {list(item.grid)} implies {item.need} tokens but the "
                f"sample ends after {len(item.positions)} of them: grid and token count do not match"
            )
    for kind in (VIDEO, IMAGE):
        if grids[kind] and used[kind] != len(grids[kind]):
            raise ValueError(
                f"{sources[kind]} describes {len(grids[kind])} {_NAMES[kind]}s but the sequence holds "
                f"{used[kind]}: grid and token count do not match"
            )
    return Layout(cube_ids=cube_ids.to(mm_token_type_ids.device), spans=tuple(spans), cube=tuple(cube))


def _check_break(item: _Item, slices_may_split: bool, source: str) -> None:
    """A run of placeholder tokens ended before ``item`` was complete: allowed only between slices."""
    got = len(item.positions)
    _, h, w = item.grid
    if not slices_may_split or item.kind == IMAGE:
        raise ValueError(
            f"{item.name}: {source} {list(item.grid)} implies {item.need} tokens in one run but the "
            f"sequence has {got} there: grid and token count do not match"
        )
    if got >= item.body:
        raise ValueError(f"{item.name}: text separates its last video token from its trailing token")
    if got % (h * w):
        raise ValueError(
            f"{item.name}: text interrupts a temporal slice after {got} tokens (slices have h·w = {h * w} "
            f"tokens for {source} {list(item.grid)}): grid and token count do not match"
        )


def _place(item: _Item, cube, cube_ids: torch.Tensor, spans: list, first_cube: int) -> int:
    """Write the cube ids of a complete item; returns the next free cube id of its sample."""
    t, h, w = item.grid
    positions = torch.tensor(item.positions[: item.body], dtype=torch.long)
    local = grid_cube_ids(t, h, w, cube)
    cube_ids[item.sample, positions] = local + first_cube
    num = int(local.max()) + 1
    spans.append(VisualSpan(item.sample, positions, (t, h, w), _NAMES[item.kind], first_cube, num))
    return first_cube + num
