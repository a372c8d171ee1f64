"""Storing needle items: lossless mp4 videos plus ``questions.jsonl``, and reading them back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from adaspark.needle.render import render_frames
from adaspark.needle.spec import NeedleItem

__all__ = ["QUESTIONS_FILE", "VIDEOS_DIR", "load_frames", "read_split", "video_path", "write_split"]

QUESTIONS_FILE = "questions.jsonl"
VIDEOS_DIR = "videos"


def video_path(item: NeedleItem, directory: str | os.PathLike) -> Path:
    """Where :func:`write_split` stores the video of ``item`` under ``directory``."""
    return Path(directory) / VIDEOS_DIR / f"{item.id}.mp4"


def _encode_mp4(frames: np.ndarray, fps: float, path: Path, *, lossless: bool = True) -> None:
    """H.264 in mp4. Lossless (``libx264rgb``, qp 0): decoding returns the exact RGB frames;
    lossy (``libx264``, yuv420p, crf 18): about 10× smaller, colours shift by a few levels."""
    from fractions import Fraction

    import av

    from adaspark.core.io import atomic_path

    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        codec = "libx264rgb" if lossless else "libx264"
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.options = (
            {"qp": "0", "preset": "veryfast"} if lossless else {"crf": "18", "preset": "veryfast"}
        )
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_split(
    items: Iterable[NeedleItem],
    directory: str | os.PathLike,
    *,
    videos: bool = True,
    lossless: bool = True,
    progress: bool = False,
) -> Path:
    """Store ``items`` under ``directory``: ``questions.jsonl`` and (``videos=True``) ``videos/<id>.mp4``.

    Every file is written atomically (temporary file + rename); ``questions.jsonl`` comes last and
    each of its lines is :meth:`NeedleItem.to_json` plus ``"video"`` (the mp4's path relative to
    ``directory``, or ``null`` when videos are not stored). With ``lossless=True`` (default; about
    12 kB per 112×112 frame) :func:`load_frames` returns exactly :func:`render_frames`;
    ``lossless=False`` stores ordinary yuv420p H.264 (crf 18). ``progress`` shows a tqdm bar.
    Returns ``directory``.

    Raises:
        ValueError: duplicate item ids.
        OSError: the directory cannot be created or written.
    """
    from adaspark.core.io import atomic_write_text

    items = list(items)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"write_split: duplicate item id {dup!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    if videos:
        (directory / VIDEOS_DIR).mkdir(exist_ok=True)
    iterator = items
    if progress and videos:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="rendering videos", unit="video")
    for item in iterator:
        record = item.to_json()
        if videos:
            path = video_path(item, directory)
            _encode_mp4(render_frames(item), item.fps, path, lossless=lossless)
            record["video"] = path.relative_to(directory).as_posix()
        else:
            record["video"] = None
        lines.append(json.dumps(record, separators=(",", ":")))
    atomic_write_text(directory / QUESTIONS_FILE, "".join(line + "\n" for line in lines))
    return directory


def read_split(directory: str | os.PathLike) -> list[NeedleItem]:
    """The items of a split stored by :func:`write_split` (from ``directory/questions.jsonl``).

    Raises:
        FileNotFoundError: no ``questions.jsonl`` in ``directory``.
        ValueError: a line is not valid JSON or not a needle item (the message names the line).
    """
    path = Path(directory) / QUESTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {QUESTIONS_FILE} in {str(directory)!r} (write one with write_split)")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(NeedleItem.from_json(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a needle item ({e})") from None
    return items


def load_frames(item: NeedleItem, directory: str | os.PathLike | None = None) -> np.ndarray:
    """The frames of ``item``: decoded from its stored mp4 when ``directory`` holds one, else rendered.

    Raises:
        adaspark.video.VideoDecodeError: the stored video cannot be read or has the wrong size.
    """
    if directory is not None:
        path = video_path(item, directory)
        if path.is_file():
            from adaspark.video import VideoDecodeError, read_video

            frames, _ = read_video(path)
            if frames.shape != (item.num_frames, item.height, item.width, 3):
                raise VideoDecodeError(
                    f"{str(path)!r} holds frames of shape {frames.shape}, item {item.id!r} needs "
                    f"{(item.num_frames, item.height, item.width, 3)}"
                )
            return frames
    return render_frames(item)
