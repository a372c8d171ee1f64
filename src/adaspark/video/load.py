"""`load_video`: read + preprocess a video file for Qwen2-VL / Qwen2.5-VL in one call."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from adaspark.video.decode import read_video
from adaspark.video.preprocess import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_VIDEO_TOKENS,
    DEFAULT_MIN_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VideoInputs,
    preprocess_video,
)
from adaspark.video.sampling import DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES, DEFAULT_TEMPORAL_PATCH_SIZE

__all__ = ["DEFAULT_FPS", "load_video"]

DEFAULT_FPS = 2.0
"""Sampling rate Qwen2.5-VL was trained with (qwen-vl-utils' ``FPS``). transformers' processor
itself samples nothing unless asked (``do_sample_frames=False``, ``fps=None``)."""


def load_video(
    path: str | os.PathLike,
    *,
    fps: float | None = DEFAULT_FPS,
    num_frames: int | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = DEFAULT_TEMPORAL_PATCH_SIZE,
    merge_size: int = 2,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    cap_pixels_per_frame: bool = False,
    max_video_tokens: int = DEFAULT_MAX_VIDEO_TOKENS,
) -> VideoInputs:
    """Decode ``path``, sample frames the Qwen way and preprocess them.

    Equivalent to ``read_video`` followed by ``preprocess_video(frames, fps=metadata.sampled_fps)``:
    ``second_per_grid_t = temporal_patch_size / (T / N * r)``, exactly what transformers'
    Qwen2.5-VL processor computes from the sampled metadata.

    Args:
        path: Video file.
        fps: Sampling rate (default 2.0). Ignored when ``num_frames`` is given (``num_frames``
            selects count-based sampling); ``fps=None`` with ``num_frames=None`` keeps every frame.
        num_frames: Uniformly sample this many frames (rounded half-to-even to a multiple of
            ``temporal_patch_size``).
        min_frames / max_frames: Clamp of the fps-derived frame count.
        min_pixels / max_pixels: Per-frame pixel bounds (video defaults 100352 / 602112).
        Others: as :func:`~adaspark.video.preprocess.preprocess_video`.

    Returns:
        :class:`VideoInputs` with ``metadata`` set (indices, timestamps, native fps).

    Raises:
        VideoDecodeError / ValueError / ImportError: as :func:`~adaspark.video.decode.read_video`
        and :func:`~adaspark.video.preprocess.preprocess_video`.
    """
    if num_frames is not None:
        fps = None
    frames, metadata = read_video(
        path,
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
        temporal_patch_size=temporal_patch_size,
    )
    inputs = preprocess_video(
        frames,
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=merge_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        image_mean=image_mean,
        image_std=image_std,
        fps=metadata.sampled_fps,
        cap_pixels_per_frame=cap_pixels_per_frame,
        max_video_tokens=max_video_tokens,
    )
    return dataclasses.replace(inputs, metadata=metadata)
