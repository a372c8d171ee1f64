"""Token layout: where each video sits in the LM sequence and which cube every video token is in.

Qwen2-VL / Qwen2.5-VL geometry: a video of ``grid_thw = (T, H, W)`` patches becomes
``T × (H/m) × (W/m)`` LM tokens (``m`` = spatial merge size, 2), in time-major raster order of the
merged patches: token ``t·(h·w) + y·w + x`` with ``h = H/m``, ``w = W/m``. A cube is ``ct × ch × cw``
LM tokens; edge cubes may be smaller. Cube ids are numbered per sample, video after video, each
video's cubes in time-major raster order of the cube grid.

:func:`build_layout` reads every video as one unbroken run of ``T·H·W`` placeholder tokens
(Qwen2-VL, Qwen2.5-VL). :func:`build_segmented_layout` covers the arrangements of other families:
Qwen3-VL writes each temporal slice of a video as its own group (``<t seconds>`` text and
``<|vision_start|> … <|vision_end|>`` between the slices), LLaVA-OneVision follows the ``F·h·w``
pooled frame tokens of a video with one more placeholder token carrying the newline embedding. It
reads each video's tokens in order across such gaps, cubes them on the video's own ``(t, h, w)``
grid (so a cube can hold tokens of slices with text between them) and leaves trailing placeholder
tokens un-cubed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "IMAGE",
    "TEXT",
    "VIDEO",
    "Layout",
    "VisualSpan",
    "build_layout",
    "build_segmented_layout",
    "grid_cube_ids",
    "token_types_from_ids",
]

TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass(frozen=True)
class VisualSpan:
    """One video (or image treated as a video) in one sample.

    Attributes:
        sample: batch row.
        positions: ``[n]`` int64 sequence positions of its tokens (ascending).
        grid: ``(t, h, w)`` in LM tokens (after the spatial merge).
        kind: ``"video"`` or ``"image"``.
        first_cube: id of its first cube within the sample.
        num_cubes: number of cubes it has.
    """

    sample: int
    positions: torch.Tensor
    grid: tuple[int, int, int]
    kind: str
    first_cube: int
    num_cubes: int


@dataclass(frozen=True)
class Layout:
    """Cube layout of one batch.

    Attributes:
        cube_ids: ``[B, N]`` int64, ``-1`` for non-video tokens (the ops convention).
        spans: every cubed video/image, in order.
        cube: cube size ``(ct, ch, cw)``.
    """

    cube_ids: torch.Tensor
    spans: tuple[VisualSpan, ...]
    cube: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.cube_ids.shape)  # type: ignore[return-value]

    @property
    def num_cubes(self) -> torch.Tensor:
        """``[B]`` cubes per sample."""
        if self.cube_ids.shape[1] == 0:  # an empty sequence has no cube (max() of nothing raises)
            return self.cube_ids.new_zeros(self.cube_ids.shape[0])
        return (self.cube_ids.max(dim=1).values + 1).clamp_min(0)

    @property
    def num_video_tokens(self) -> int:
        return int((self.cube_ids >= 0).sum())

    def repeat_samples(self, repeats: int) -> Layout:
        """The layout of a batch whose every sample is repeated ``repeats`` times in a row (as
        ``generate`` expands inputs for ``num_return_sequences`` / beams)."""
        spans = tuple(
            VisualSpan(s.sample * repeats + r, s.positions, s.grid, s.kind, s.first_cube, s.num_cubes)
            for s in self.spans
            for r in range(repeats)
        )
        spans = tuple(sorted(spans, key=lambda s: s.sample))
        return Layout(self.cube_ids.repeat_interleave(repeats, dim=0), spans, self.cube)

    def extend_to(self, length: int) -> Layout:
        """The layout of the same sequences followed by ``length - N`` non-video tokens."""
        return Layout(self.extended(length), self.spans, self.cube)

    def extended(self, length: int) -> torch.Tensor:
        """``cube_ids`` right-padded with ``-1`` (generated tokens are non-video) to ``length``."""
        n = self.cube_ids.shape[1]
        if length < n:
            raise ValueError(f"cannot shrink a layout of {n} tokens to {length}")
        if length == n:
            return self.cube_ids
        pad = self.cube_ids.new_full((self.cube_ids.shape[0], length - n), -1)
        return torch.cat([self.cube_ids, pad], dim=1)


def grid_cube_ids(t: int, h: int, w: int, cube: tuple[int, int, int]) -> torch.Tensor:
    """Local cube id of every token of a ``t × h × w`` token grid in time-major raster order.

    Returns ``[t·h·w]`` int64; cubes are numbered in time-major raster order of the cube grid
    ``ceil(t/ct) × ceil(h/ch) × ceil(w/cw)``.

    Example:
        >>> grid_cube_ids(1, 2, 4, (1, 2, 2)).tolist()
        [0, 0, 1, 1, 0, 0, 1, 1]
    """
    ct, ch, cw = cube
    nh, nw = -(-h // ch), -(-w // cw)
    ti = torch.arange(t).view(t, 1, 1) // ct
    yi = torch.arange(h).view(1, h, 1) // ch
    xi = torch.arange(w).view(1, 1, w) // cw
    return (ti * (nh * nw) + yi * nw + xi).reshape(-1)


def _num_cubes(grid: tuple[int, int, int], cube: tuple[int, int, int]) -> int:
    return (-(-grid[0] // cube[0])) * (-(-grid[1] // cube[1])) * (-(-grid[2] // cube[2]))


def token_types_from_ids(
    input_ids: torch.Tensor, *, image_token_id: int, video_token_id: int
) -> torch.Tensor:
    """``mm_token_type_ids`` (0 text, 1 image, 2 video) from the placeholder token ids."""
    types = torch.zeros_like(input_ids)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def _runs(types: list[int]) -> list[tuple[int, int, int]]:
    """``(type, start, end)`` runs of equal values."""
    out = []
    start = 0
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            out.append((types[start], start, i))
            start = i
    return out


def _llm_grid(grid, merge: int, what: str) -> tuple[int, int, int]:
    t, h, w = (int(g) for g in grid)
    if t < 1 or h < 1 or w < 1:
        raise ValueError(f"{what}: grid_thw {[t, h, w]} must be positive")
    if h % merge or w % merge:
        raise ValueError(
            f"{what}: grid_thw {[t, h, w]} has H or W not divisible by spatial_merge_size {merge}"
        )
    return t, h // merge, w // merge


def build_layout(
    mm_token_type_ids: torch.Tensor,
    video_grid_thw: torch.Tensor | None,
    *,
    cube: tuple[int, int, int] = (4, 4, 4),
    spatial_merge_size: int = 2,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    images_as_video: bool = False,
) -> Layout:
    """Assign cube ids to the video tokens of a batch.

    Args:
        mm_token_type_ids: ``[B, N]`` 0 = text, 1 = image, 2 = video (as the Qwen processors give).
        video_grid_thw: ``[V, 3]`` patch grids of all videos of the batch, in order (sample 0's
            videos first). May be None when there is no video.
        cube: cube size ``(ct, ch, cw)`` in LM tokens.
        spatial_merge_size: ``m``; ``H`` and ``W`` must be multiples of it.
        attention_mask: ``[B, N]`` 1 = real token, 0 = padding (left or right); padding is non-video.
        image_grid_thw: ``[I, 3]`` image grids; needed when ``images_as_video``.
        images_as_video: cube images as one-frame videos instead of treating them as text.

    Returns:
        :class:`Layout`. Raises ``ValueError`` naming the sample and video when the number of video
        tokens in the sequence does not match ``video_grid_thw`` (or the counts of videos differ).
    """
    if mm_token_type_ids.dim() != 2:
        raise ValueError(f"mm_token_type_ids must be [B, N], got {tuple(mm_token_type_ids.shape)}")
    bsz, n = mm_token_type_ids.shape
    types_all = mm_token_type_ids.long()
    if attention_mask is not None:
        if attention_mask.shape != (bsz, n):
            raise ValueError(
                f"attention_mask must be [B, N] = [{bsz}, {n}], got {tuple(attention_mask.shape)}"
            )
        types_all = types_all.masked_fill(attention_mask == 0, TEXT)
    for name, g in (("video_grid_thw", video_grid_thw), ("image_grid_thw", image_grid_thw)):
        if g is not None and (not isinstance(g, torch.Tensor) or g.dim() != 2 or g.shape[-1] != 3):
            raise ValueError(
                f"{name} must be a [num, 3] tensor of (T, H, W) grids, got {getattr(g, 'shape', g)!r}"
            )
    grids = {
        VIDEO: [] if video_grid_thw is None else [tuple(int(x) for x in g) for g in video_grid_thw.tolist()],
        IMAGE: [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.tolist()],
    }
    used = {VIDEO: 0, IMAGE: 0}
    names = {VIDEO: "video", IMAGE: "image"}
    grid_keys = {VIDEO: "video_grid_thw", IMAGE: "image_grid_thw"}
    cube_ids = torch.full((bsz, n), -1, dtype=torch.long)
    spans: list[VisualSpan] = []
    for b in range(bsz):
        next_cube = 0
        types = types_all[b].tolist()
        for kind, start, end in _runs(types):
            if kind == TEXT:
                continue
            if kind not in (IMAGE, VIDEO):
                raise ValueError(f"mm_token_type_ids has unknown value {kind} in sample {b}")
            cubed = kind == VIDEO or images_as_video
            if kind == IMAGE and not grids[IMAGE]:
                if images_as_video:
                    raise ValueError("images_as_video=True needs image_grid_thw for the image tokens")
                continue
            pos = start
            while pos < end:
                k = used[kind]
                what = f"{names[kind]} {k} (sample {b})"
                if k >= len(grids[kind]):
                    raise ValueError(
                        f"{what}: the sequence holds more {names[kind]} tokens than {grid_keys[kind]} "
                        f"describes ({len(grids[kind])} {names[kind]}s)"
                    )
                t, h, w = _llm_grid(grids[kind][k], spatial_merge_size, what)
                count = t * h * w
                if pos + count > end:
                    raise ValueError(
                        f"{what}: {grid_keys[kind]} {list(grids[kind][k])} implies {count} LM tokens "
                        f"(T·H·W/{spatial_merge_size}²) but the sequence has {end - pos} {names[kind]} "
                        f"tokens there: grid and token count do not match"
                    )
                used[kind] += 1
                if cubed:
                    positions = torch.arange(pos, pos + count)
                    local = grid_cube_ids(t, h, w, cube)
                    nc = _num_cubes((t, h, w), cube)
                    cube_ids[b, pos : pos + count] = local + next_cube
                    spans.append(VisualSpan(b, positions, (t, h, w), names[kind], next_cube, nc))
                    next_cube += nc
                pos += count
    for kind in (VIDEO, IMAGE):
        if (
            grids[kind]
            and used[kind] != len(grids[kind])
            and (kind == VIDEO or images_as_video or used[kind])
        ):
            raise ValueError(
                f"{grid_keys[kind]} describes {len(grids[kind])} {names[kind]}s but the sequence holds "
                f"{used[kind]}: grid and token count do not match"
            )
    return Layout(cube_ids=cube_ids.to(mm_token_type_ids.device), spans=tuple(spans), cube=tuple(cube))


# ---------------------------------------------------------------------- segmented layouts
_NAMES = {VIDEO: "video", IMAGE: "image"}


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
