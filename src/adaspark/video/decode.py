"""Decode a video file to sampled RGB frames with PyAV (no torchvision, no torchcodec).

:func:`read_video` reproduces what transformers does for Qwen2-VL / Qwen2.5-VL when a video file is
decoded with its PyAV backend and sampled by ``Qwen2VLVideoProcessor.sample_frames``: frame count
``N = stream.frames``, native rate ``r = float(stream.average_rate)``, the indices of
:func:`~adaspark.video.sampling.sample_frame_indices`, frame ``i`` = the ``i``-th frame the decoder
outputs, converted with ``frame.to_ndarray(format="rgb24")``. Unlike transformers it decodes once,
sequentially, keeps only the wanted frames and stops after the last one, so memory is
``O(len(indices))`` frames, not ``O(N)``.

PyAV is imported lazily: ``import adaspark.video`` works without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaspark.video.errors import VideoDecodeError
from adaspark.video.sampling import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_MIN_FRAMES,
    DEFAULT_TEMPORAL_PATCH_SIZE,
    check_sampling_args,
    sample_frame_indices,
)

__all__ = ["VideoMetadata", "read_video"]


@dataclass(frozen=True)
class VideoMetadata:
    """What :func:`read_video` learnt about a file and which frames it kept.

    Attributes:
        path: The file, as given (``str``).
        fps: Native frame rate ``r`` (``stream.average_rate``, falling back to the guessed rate);
            ``None`` when the container states none.
        total_num_frames: ``N``, frames in the stream (``stream.frames``; counted by demuxing when
            the container does not state it; corrected downwards when fewer frames decode).
        duration: ``N / r`` seconds (transformers' definition), or the container duration when
            ``r`` is unknown, or ``None``.
        height / width: Frame size in pixels of the returned frames.
        frames_indices: ``(T,)`` indices of the returned frames into the decoded stream.
        timestamps: ``(T,)`` seconds, ``index / r`` (transformers' ``VideoMetadata.timestamps``);
            the frames' presentation times when ``r`` is unknown.
    """

    path: str
    fps: float | None
    total_num_frames: int
    duration: float | None
    height: int
    width: int
    frames_indices: tuple[int, ...]
    timestamps: tuple[float, ...]

    @property
    def num_frames(self) -> int:
        """``T``, number of returned frames."""
        return len(self.frames_indices)

    @property
    def sampled_fps(self) -> float | None:
        """Effective rate of the returned frames, ``T / N * r`` (transformers' ``sampled_fps``).

        This, not the requested ``fps``, is what Qwen2.5-VL's processor turns into
        ``second_per_grid_t = temporal_patch_size / sampled_fps``. ``None`` when ``r`` is unknown.
        """
        if self.fps is None:
            return None
        return len(self.frames_indices) / self.total_num_frames * self.fps


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError(
            "adaspark.video.read_video needs PyAV to decode videos: pip install av "
            "(or pip install 'adaspark[video]')"
        ) from e
    return av


def _ffmpeg_errors(av) -> tuple[type[BaseException], ...]:
    base = getattr(av, "FFmpegError", None) or av.error.FFmpegError
    # PyAV raises plain OSError/ValueError/EOFError for a few container-level failures too.
    return (base, OSError, EOFError, ValueError, RuntimeError)


def _native_fps(stream) -> float | None:
    for rate in (stream.average_rate, getattr(stream, "guessed_rate", None), stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return None


def _probe(av, path: str) -> tuple[float | None, int, float | None]:
    """Open ``path`` and return ``(native_fps, total_num_frames, container_seconds)``."""
    errors = _ffmpeg_errors(av)
    try:
        container = av.open(path)
    except errors as e:
        raise VideoDecodeError(f"cannot read video {path!r}: not a readable media file ({e})") from None
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoDecodeError(
                f"cannot read video {path!r}: the file has no video stream (streams: {', '.join(kinds)})"
            )
        stream = container.streams.video[0]
        fps = _native_fps(stream)
        total = int(stream.frames or 0)
        seconds = container.duration / 1_000_000 if container.duration else None
        if total <= 0:  # not stated by the container (e.g. WebM, MKV): count packets, no decoding
            try:
                total = sum(1 for pkt in container.demux(stream) if pkt.size > 0)
            except errors as e:
                raise VideoDecodeError(f"cannot read video {path!r}: demuxing failed ({e})") from None
    finally:
        container.close()
    if total <= 0:
        raise VideoDecodeError(f"cannot read video {path!r}: the video stream has no frames")
    return fps, total, seconds


def _decode_selected(av, path: str, indices: np.ndarray) -> tuple[list[np.ndarray | None], list[float], int]:
    """Decode sequentially; keep frames whose ordinal is in ``indices``.

    Returns ``(frames, pts_seconds, n_seen)``: ``frames[k]`` is the ``(H, W, 3)`` uint8 frame for
    ``indices[k]`` (``None`` if the stream ended first), ``n_seen`` the number of frames decoded
    (exact only when the stream ended before the last wanted index).
    """
    errors = _ffmpeg_errors(av)
    wanted: dict[int, list[int]] = {}
    for pos, idx in enumerate(indices.tolist()):
        wanted.setdefault(int(idx), []).append(pos)
    last = max(wanted)
    frames: list[np.ndarray | None] = [None] * len(indices)
    times: list[float] = [0.0] * len(indices)
    size: tuple[int, int] | None = None
    n_seen = 0
    try:
        container = av.open(path)
    except errors as e:
        raise VideoDecodeError(f"cannot read video {path!r}: not a readable media file ({e})") from None
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # bit-exact; only faster
        for frame in container.decode(stream):
            if n_seen in wanted:
                if size is None:
                    size = (frame.height, frame.width)
                if (frame.height, frame.width) == size:
                    arr = frame.to_ndarray(format="rgb24")
                else:  # resolution change mid-stream: scale to the first kept frame's size
                    arr = frame.to_ndarray(format="rgb24", height=size[0], width=size[1])
                t = float(frame.time) if frame.time is not None else 0.0
                for pos in wanted[n_seen]:
                    frames[pos] = arr
                    times[pos] = t
            n_seen += 1
            if n_seen > last:
                break
    except errors as e:
        if n_seen == 0:
            raise VideoDecodeError(
                f"cannot read video {path!r}: the video stream has no decodable frames ({e})"
            ) from None
        # A broken tail: keep what decoded; the caller resamples over the frames that exist.
    finally:
        container.close()
    return frames, times, n_seen


def read_video(
    path: str | os.PathLike,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    max_frames: int | None = None,
    min_frames: int = DEFAULT_MIN_FRAMES,
    temporal_patch_size: int = DEFAULT_TEMPORAL_PATCH_SIZE,
) -> tuple[np.ndarray, VideoMetadata]:
    """Decode ``path`` and return the frames Qwen2-VL's processor would sample, as RGB uint8.

    Args:
        path: Video file (anything FFmpeg reads: mp4, mkv, webm, avi, ...).
        fps: Sample about ``fps`` frames per second (Qwen rule: count = ``N / r * fps`` clamped to
            ``[min_frames, max_frames]``, rounded down to a multiple of ``temporal_patch_size``).
        num_frames: Sample this many frames uniformly (rounded half-to-even to a multiple of
            ``temporal_patch_size``). Exclusive with ``fps``. With neither, every frame is returned
            (all in memory: mind long videos).
        max_frames: Upper bound of the fps-derived count; ``None`` = 768 (the processor default).
            Like transformers, it does not cap ``num_frames`` or the all-frames case.
        min_frames: Lower bound of the fps-derived count (processor default 4).
        temporal_patch_size: Frame counts are multiples of it (2 for Qwen2/2.5-VL).

    Returns:
        ``(frames, metadata)``: ``frames`` is ``(T, H, W, 3)`` uint8 RGB, C-contiguous;
        ``metadata`` a :class:`VideoMetadata` with ``frames_indices`` of length ``T``.

    Raises:
        VideoDecodeError: missing/empty/corrupt file, no video stream, no decodable frame, or fps
            sampling on a stream without a frame rate.
        ValueError: invalid arguments (named), or ``num_frames`` larger than the video.
        ImportError: PyAV is not installed (``pip install av``).
    """
    max_frames = DEFAULT_MAX_FRAMES if max_frames is None else max_frames
    fps, num_frames, min_frames, max_frames, tps = check_sampling_args(
        fps=fps,
        num_frames=num_frames,
        min_frames=min_frames,
        max_frames=max_frames,
        temporal_patch_size=temporal_patch_size,
    )
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    p = Path(path)
    if not p.exists():
        raise VideoDecodeError(f"cannot read video {path!r}: no such file")
    if not p.is_file():
        raise VideoDecodeError(f"cannot read video {path!r}: not a regular file")
    if p.stat().st_size == 0:
        raise VideoDecodeError(f"cannot read video {path!r}: the file is empty (0 bytes)")

    av = _import_av()
    native_fps, total, container_seconds = _probe(av, path)
    if fps is not None and native_fps is None:
        raise VideoDecodeError(
            f"cannot sample {path!r} at fps={fps}: the video stream states no frame rate; use num_frames"
        )

    def indices_for(n_total: int) -> np.ndarray:
        return sample_frame_indices(
            n_total,
            native_fps,
            fps=fps,
            num_frames=num_frames,
            min_frames=min_frames,
            max_frames=max_frames,
            temporal_patch_size=tps,
        )

    indices = indices_for(total)
    frames, times, n_seen = _decode_selected(av, path, indices)
    if any(f is None for f in frames):
        # The container over-stated its frame count (or the tail is broken): resample over the
        # frames that really decode, as if the header had stated n_seen.
        if n_seen == 0:
            raise VideoDecodeError(f"cannot read video {path!r}: the video stream has no decodable frames")
        total = n_seen
        indices = indices_for(total)
        frames, times, n_seen = _decode_selected(av, path, indices)
        if any(f is None for f in frames):
            raise VideoDecodeError(f"cannot read video {path!r}: decoding is not reproducible")

    video = np.stack(frames)  # (T, H, W, 3) uint8
    if native_fps is not None:
        timestamps = tuple(float(i) / native_fps for i in indices.tolist())
        duration: float | None = total / native_fps
    else:
        timestamps = tuple(times)
        duration = container_seconds
    metadata = VideoMetadata(
        path=path,
        fps=native_fps,
        total_num_frames=total,
        duration=duration,
        height=int(video.shape[1]),
        width=int(video.shape[2]),
        frames_indices=tuple(int(i) for i in indices.tolist()),
        timestamps=timestamps,
    )
    return video, metadata
