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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ADAPTIVE_FEATURE_DIM",
    "IMAGE",
    "TEXT",
    "VIDEO",
    "Layout",
    "VisualSpan",
    "adaptive_cube_bounds",
    "adaptive_grid_cube_ids",
    "adaptive_grid_cube_ids_reference",
    "adaptive_layout",
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


# ---------------------------------------------------------------------- adaptive cubes
#: features are projected to at most this many dimensions before the cube statistics (a fixed,
#: seeded Gaussian projection: sums of squared deviations are kept within a few percent)
ADAPTIVE_FEATURE_DIM = 64
_ADAPTIVE_SEED = 0x5EED


def adaptive_cube_bounds(cube: tuple[int, int, int], max_cube=None, min_cube=None):
    """``(max_cube, min_cube)`` of adaptive cubes around the fixed ``cube``: by default the largest
    cube is ``(4·ct, 2·ch, 2·cw)`` (static regions merge over more time and space) and the smallest
    ``(⌈ct/4⌉, ⌈ch/4⌉, ⌈cw/4⌉)`` (busy ones split below the fixed size: a 2×2-token object in a
    4×4×4 grid can get a cube of its own)."""
    ct, ch, cw = cube
    big = (4 * ct, 2 * ch, 2 * cw) if max_cube is None else tuple(int(x) for x in max_cube)
    small = (-(-ct // 4), -(-ch // 4), -(-cw // 4)) if min_cube is None else tuple(int(x) for x in min_cube)
    if any(s > c or c > b for s, c, b in zip(small, cube, big, strict=True)):
        raise ValueError(f"adaptive cubes need min_cube {small} <= cube {tuple(cube)} <= max_cube {big}")
    return big, small


def _features(features: torch.Tensor, grid: tuple[int, int, int]):
    """``(t, h, w, D')`` float64 NumPy array: each token's feature divided by its RMS (what a decoder
    layer's RMSNorm hands its projections), projected to at most :data:`ADAPTIVE_FEATURE_DIM` dims."""
    import numpy as np

    t, h, w = grid
    x = features.detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[0] != t * h * w:
        raise ValueError(
            f"adaptive cubes: features must be [{t * h * w}, D] for grid {grid}, got {tuple(x.shape)}"
        )
    x = x / x.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
    d = x.shape[1]
    if d > ADAPTIVE_FEATURE_DIM:
        g = torch.Generator().manual_seed(_ADAPTIVE_SEED)
        proj = torch.randn(d, ADAPTIVE_FEATURE_DIM, generator=g, dtype=torch.float64)
        x = x @ proj / math.sqrt(ADAPTIVE_FEATURE_DIM)
    return np.ascontiguousarray(x.numpy().reshape(t, h, w, -1))


def _tiles(grid, size):
    """Boxes ``(t0, t1, h0, h1, w0, w1)`` tiling ``grid`` by ``size`` (edge boxes smaller)."""
    t, h, w = grid
    return [
        (a, min(a + size[0], t), b, min(b + size[1], h), c, min(c + size[2], w))
        for a in range(0, t, size[0])
        for b in range(0, h, size[1])
        for c in range(0, w, size[2])
    ]


def _cut(box, axis: int, at: int):
    """``box`` cut in two along ``axis`` before index ``at``."""
    left, right = list(box), list(box)
    left[2 * axis + 1] = at
    right[2 * axis] = at
    return tuple(left), tuple(right)


def _best_split(box, min_cube, sse):
    """``(gain, axis, at)`` of the best cut of ``box`` in two (the largest drop of the summed squared
    deviation, over every axis and position leaving both parts at least ``min_cube``; ties: the
    earlier axis, time first, then the earlier position), or None when no cut is possible."""
    best = None
    parent = sse(box)
    for axis in range(3):
        lo, hi = box[2 * axis], box[2 * axis + 1]
        for at in range(lo + min_cube[axis], hi - min_cube[axis] + 1):
            left, right = _cut(box, axis, at)
            gain = parent - sse(left) - sse(right)
            if best is None or gain > best[0]:
                best = (gain, axis, at)
    return best


def _quantize(gain: float, scale: float) -> float:
    # gains compared at a relative resolution of 1e-9: the fast and the naive statistics agree there
    return round(gain / scale, 9) if scale > 0 else 0.0


def _number(boxes, grid) -> torch.Tensor:
    """Local cube ids of the grid's tokens, boxes numbered in time-major raster order of their first token."""
    t, h, w = grid
    ids = torch.empty(t, h, w, dtype=torch.long)
    for i, b in enumerate(sorted(boxes, key=lambda b: (b[0], b[2], b[4]))):
        ids[b[0] : b[1], b[2] : b[3], b[4] : b[5]] = i
    return ids.reshape(-1)


def adaptive_grid_cube_ids(
    features: torch.Tensor,
    grid: tuple[int, int, int],
    cube: tuple[int, int, int],
    *,
    max_cube=None,
    min_cube=None,
    num_cubes: int | None = None,
) -> torch.Tensor:
    """Content-adaptive cubes of one ``t × h × w`` token grid: local cube ids ``[t·h·w]`` (time-major
    raster order of the tokens), every cube a box.

    The grid is first tiled by ``max_cube``; then, as long as there are fewer than ``num_cubes``
    cubes (default: as many as the fixed ``cube`` tiling, so the selection costs what it costs with
    fixed cubes), the cube whose cut in two (along t, h or w, at any position leaving both parts at
    least ``min_cube``) lowers the summed squared deviation of its tokens' features from their cube
    means the most is cut there (a regression tree on the token grid). Static
    regions thus stay in long, large cubes and busy ones (a needle, motion) get small ones. Features
    are divided by their RMS and randomly projected (:func:`_features`); box statistics come from
    3-D prefix sums, the next split from a heap. :func:`adaptive_grid_cube_ids_reference` computes
    the same partition naively. Cubes are numbered in time-major raster order of their first token.

    Args:
        features: ``[t·h·w, D]`` a feature per token (e.g. the decoder's input embeddings).
        grid: ``(t, h, w)`` in LM tokens.
        cube: the fixed cube size the defaults derive from (:func:`adaptive_cube_bounds`).
        max_cube / min_cube: overrides of the largest / smallest cube.
        num_cubes: target count (clamped to what ``max_cube`` / ``min_cube`` allow).
    """
    import heapq

    import numpy as np

    big, small = adaptive_cube_bounds(cube, max_cube, min_cube)
    x = _features(features, grid)
    t, h, w = grid
    s1 = np.zeros((t + 1, h + 1, w + 1, x.shape[-1]))
    s1[1:, 1:, 1:] = x.cumsum(0).cumsum(1).cumsum(2)
    s2 = np.zeros((t + 1, h + 1, w + 1))
    s2[1:, 1:, 1:] = (x * x).sum(-1).cumsum(0).cumsum(1).cumsum(2)

    def box_sum(s, b):
        t0, t1, h0, h1, w0, w1 = b
        return (
            s[t1, h1, w1]
            - s[t0, h1, w1]
            - s[t1, h0, w1]
            - s[t1, h1, w0]
            + s[t0, h0, w1]
            + s[t0, h1, w0]
            + s[t1, h0, w0]
            - s[t0, h0, w0]
        )

    def sse(b) -> float:
        n = (b[1] - b[0]) * (b[3] - b[2]) * (b[5] - b[4])
        v = box_sum(s1, b)
        return float(box_sum(s2, b) - (v @ v) / n)

    scale = sse((0, t, 0, h, 0, w))
    target = _num_cubes(grid, cube) if num_cubes is None else int(num_cubes)
    boxes = _tiles(grid, big)
    heap = []

    def push(b):
        best = _best_split(b, small, sse)
        if best is not None:
            heapq.heappush(heap, (-_quantize(best[0], scale), b, best[1], best[2]))

    for b in boxes:
        push(b)
    live = set(boxes)
    while len(live) < target and heap:
        _, b, axis, at = heapq.heappop(heap)
        live.discard(b)
        for part in _cut(b, axis, at):
            live.add(part)
            push(part)
    return _number(live, grid)


def adaptive_grid_cube_ids_reference(
    features: torch.Tensor,
    grid: tuple[int, int, int],
    cube: tuple[int, int, int],
    *,
    max_cube=None,
    min_cube=None,
    num_cubes: int | None = None,
) -> torch.Tensor:
    """Naive reference of :func:`adaptive_grid_cube_ids` (same signature and result): every box's
    squared deviation summed token by token, the best split found by scanning all cubes each step."""
    big, small = adaptive_cube_bounds(cube, max_cube, min_cube)
    x = _features(features, grid)
    t, h, w = grid

    def sse(b) -> float:
        v = x[b[0] : b[1], b[2] : b[3], b[4] : b[5]].reshape(-1, x.shape[-1])
        return float(((v - v.mean(0)) ** 2).sum())

    scale = sse((0, t, 0, h, 0, w))
    target = _num_cubes(grid, cube) if num_cubes is None else int(num_cubes)
    boxes = _tiles(grid, big)
    while len(boxes) < target:
        cands = []
        for b in boxes:
            best = _best_split(b, small, sse)
            if best is not None:
                cands.append((-_quantize(best[0], scale), b, best[1], best[2]))
        if not cands:
            break
        _, b, axis, at = min(cands)
        boxes.remove(b)
        boxes.extend(_cut(b, axis, at))
    return _number(boxes, grid)


def adaptive_layout(
    layout: Layout,
    features: torch.Tensor,
    *,
    max_cube=None,
    min_cube=None,
) -> Layout:
    """``layout`` with every cubed video re-partitioned into content-adaptive cubes
    (:func:`adaptive_grid_cube_ids`, as many cubes per video as its fixed tiling), from
    ``features [B, N, D]`` at the layout's positions (e.g. the decoder's ``inputs_embeds``). Cube ids
    stay numbered per sample, video after video; spans keep their positions and grids."""
    bsz, n = layout.cube_ids.shape
    if features.dim() != 3 or tuple(features.shape[:2]) != (bsz, n):
        raise ValueError(
            f"adaptive cubes need features [B, N, D] = [{bsz}, {n}, D] for the layout, "
            f"got {tuple(features.shape)}"
        )
    cube_ids = torch.full_like(layout.cube_ids, -1)
    spans: list[VisualSpan] = []
    next_cube: dict[int, int] = {}
    for s in layout.spans:
        first = next_cube.get(s.sample, 0)
        pos = s.positions.to(features.device)
        local = adaptive_grid_cube_ids(
            features[s.sample, pos],
            s.grid,
            layout.cube,
            max_cube=max_cube,
            min_cube=min_cube,
            num_cubes=s.num_cubes,
        )
        num = int(local.max()) + 1
        cube_ids[s.sample, s.positions.to(cube_ids.device)] = local.to(cube_ids.device) + first
        spans.append(VisualSpan(s.sample, s.positions, s.grid, s.kind, first, num))
        next_cube[s.sample] = first + num
    return Layout(cube_ids=cube_ids, spans=tuple(spans), cube=layout.cube)
