"""Frame-index sampling, exactly as the Qwen2-VL / Qwen2.5-VL video processor of transformers 5.x.

Rules (``Qwen2VLVideoProcessor.sample_frames``, transformers 5.23), with ``N`` the stream's frame
count, ``r`` its native frame rate and ``tps`` the temporal patch size (2):

* ``num_frames=k``: ``n = round(k / tps) * tps`` (Python ``round``: halves go to even, so ``k=3``
  and ``k=5`` both give 4, ``k=7`` gives 8). ``min_frames``/``max_frames`` are NOT applied here.
  ``n > N`` is an error.
* ``fps=f``: ``cap = floor(min(max_frames, N) / tps) * tps``;
  ``n = floor(min(max(N / r * f, min_frames), cap, N) / tps) * tps``. The requested rate is only a
  target: the count is rounded *down* to a multiple of ``tps`` and clamped, so the effective rate
  is ``n / N * r`` (what transformers calls ``sampled_fps``).
* neither: every frame, ``0 .. N-1``.
* indices: ``torch.arange(0, N, N / n).int()`` — float32 steps truncated toward zero, i.e. the
  first frame of each of ``n`` equal slices (never the last frame of the video; this differs from
  qwen-vl-utils, which uses ``linspace(0, N-1, n).round()``).

Where transformers would crash or do something useless we raise or degrade on purpose (documented
in :func:`sample_frame_indices`).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MIN_FRAMES",
    "DEFAULT_TEMPORAL_PATCH_SIZE",
    "sample_frame_indices",
]

DEFAULT_MIN_FRAMES = 4
"""``Qwen2VLVideoProcessor.min_frames``: lower clamp of the fps-derived frame count."""
DEFAULT_MAX_FRAMES = 768
"""``Qwen2VLVideoProcessor.max_frames``: upper clamp of the fps-derived frame count."""
DEFAULT_TEMPORAL_PATCH_SIZE = 2
"""``Qwen2VLVideoProcessor.temporal_patch_size``: frames per temporal patch of the vision tower."""


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_int(name: str, value, *, minimum: int) -> int:
    """Return ``value`` as ``int`` or raise ``ValueError`` naming ``name`` (needs ``value >= minimum``)."""
    if not _is_int(value) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_real(name: str, value) -> float:
    """Return ``value`` as ``float`` or raise ``ValueError`` naming ``name`` (needs finite ``value > 0``)."""
    if not _is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_sampling_args(
    *,
    fps,
    num_frames,
    min_frames,
    max_frames,
    temporal_patch_size,
) -> tuple[float | None, int | None, int, int, int]:
    """Validate the sampling arguments (before any file is opened); returns them normalised.

    Raises:
        ValueError: naming the offending argument: ``fps`` and ``num_frames`` both given,
            ``fps <= 0``, ``num_frames <= 0``, ``temporal_patch_size < 1``, ``min_frames < 0``,
            ``max_frames < temporal_patch_size`` (the fps rule would round it to 0 frames).
    """
    if fps is not None and num_frames is not None:
        raise ValueError(
            f"fps and num_frames are mutually exclusive, got fps={fps!r} and num_frames={num_frames!r}"
        )
    fps = None if fps is None else check_positive_real("fps", fps)
    num_frames = None if num_frames is None else check_int("num_frames", num_frames, minimum=1)
    temporal_patch_size = check_int("temporal_patch_size", temporal_patch_size, minimum=1)
    min_frames = check_int("min_frames", min_frames, minimum=0)
    max_frames = check_int("max_frames", max_frames, minimum=temporal_patch_size)
    return fps, num_frames, min_frames, max_frames, temporal_patch_size


def sample_frame_indices(
    total_num_frames: int,
    video_fps: float | None = None,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    temporal_patch_size: int = DEFAULT_TEMPORAL_PATCH_SIZE,
) -> np.ndarray:
    """Indices of the frames Qwen2-VL's video processor keeps from a ``total_num_frames`` video.

    Args:
        total_num_frames: ``N``, frames in the stream (transformers' PyAV reader uses
            ``stream.frames``).
        video_fps: Native frame rate ``r`` (``stream.average_rate``); needed only with ``fps``.
        fps: Target sampling rate (frames per second). Exclusive with ``num_frames``.
        num_frames: Target frame count, rounded half-to-even to a multiple of
            ``temporal_patch_size``. Exclusive with ``fps``.
        min_frames / max_frames: Clamp of the fps-derived count (ignored with ``num_frames``).
        temporal_patch_size: Counts are multiples of this.

    Returns:
        ``(n,)`` int64, strictly increasing, in ``[0, N)``. ``n`` is a multiple of
        ``temporal_patch_size`` except in the two cases below.

    Deliberate departures (transformers raises ``ZeroDivisionError`` there):
        * the ``fps`` rule giving 0 frames (``N < tps``, or ``N / r * fps`` below ``tps`` with
          ``min_frames < tps``): ``min(tps, N)`` frames, spread as usual (a video shorter than one
          temporal patch keeps all its frames; the preprocessor pads by repeating the last one).
        * ``num_frames`` rounding to 0 (``num_frames=1`` with ``tps=2``): ``ValueError``.

    Raises:
        ValueError: invalid arguments (named), ``fps`` without a known ``video_fps``, or more
            frames requested than the video has (as transformers).
    """
    fps, num_frames, min_frames, max_frames, tps = check_sampling_args(
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
        temporal_patch_size=temporal_patch_size,
    )
    total = check_int("total_num_frames", total_num_frames, minimum=1)

    n: int | None = None
    if num_frames is not None:
        n = round(num_frames / tps) * tps
        if n == 0:
            raise ValueError(
                f"num_frames={num_frames} rounds to 0 frames with temporal_patch_size={tps}; "
                f"use num_frames >= {(tps + 2) // 2}"
            )
    elif fps is not None:
        if video_fps is None:
            raise ValueError("sampling with fps needs the video's native frame rate (video_fps), got None")
        video_fps = check_positive_real("video_fps", video_fps)
        cap = math.floor(min(max_frames, total) / tps) * tps
        target = total / video_fps * fps
        target = min(max(target, min_frames), cap, total)
        n = math.floor(target / tps) * tps
        if n == 0:  # transformers divides by zero here; take the smallest valid count instead
            n = min(tps, total)

    if n is None:
        return np.arange(total, dtype=np.int64)
    if n > total:
        raise ValueError(
            f"cannot sample {n} frames (num_frames={num_frames}) from a video of {total} frames; "
            "decrease num_frames or fps"
        )
    # Same op as transformers (float32 arange, truncating cast) so rounding quirks match bit for bit.
    return torch.arange(0, total, total / n).int().numpy().astype(np.int64)
