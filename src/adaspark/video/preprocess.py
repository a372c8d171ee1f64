"""Frames → ``pixel_values_videos`` / ``video_grid_thw``, as transformers' ``Qwen2VLVideoProcessor``.

Pipeline (transformers 5.23, the class Qwen2.5-VL also uses), for frames ``(T, H, W, 3)`` uint8:

1. ``(H', W') = smart_resize(H, W, factor=patch_size * merge_size, min_pixels, max_pixels)``.
   Video defaults: ``min_pixels = 128·28·28 = 100352``, ``max_pixels = 768·28·28 = 602112``
   (the *image* processor's are ``56·56`` and ``28·28·1280``).
   With ``cap_pixels_per_frame`` (transformers' opt-in "qwen-vl-utils" behaviour),
   ``max_pixels ← max(min(max_pixels, int(max_video_tokens·factor²·0.9)·tps // T),
   int(1.05·min_pixels))``.
2. Bicubic resize with antialias *on the uint8 tensor* (torchvision's CPU path calls
   ``torch.nn.functional.interpolate`` on uint8 directly, which rounds and saturates internally;
   on other devices torchvision resizes in float32, clamps to [0, 255] and rounds — we do the
   same). Skipped when the size does not change.
3. ``x = (float32(u) - mean·255) / (std·255)`` with the OpenAI CLIP mean/std (rescale 1/255 fused
   into normalisation exactly as transformers fuses it).
4. Pad ``T`` to a multiple of ``temporal_patch_size`` by repeating the last frame.
5. Patchify: ``(T, C, H', W')`` viewed as ``(gt, tps, C, gh/m, m, p, gw/m, m, p)`` and permuted
   to ``(gt, gh/m, gw/m, m, m, C, tps, p, p)``, flattened to ``(gt·gh·gw, C·tps·p·p)``. Rows run
   over time, then 2×2 merge blocks in raster order, then the 4 patches inside a block (raster);
   each row is ``[channel][frame-in-patch][y][x]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from adaspark.video.decode import VideoMetadata
from adaspark.video.sampling import DEFAULT_TEMPORAL_PATCH_SIZE, check_int, check_positive_real

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VideoInputs",
    "patchify",
    "preprocess_video",
    "resize_frames",
    "smart_resize",
]

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MIN_PIXELS = 128 * 28 * 28
"""``Qwen2VLVideoProcessor.size["shortest_edge"]`` (per-frame minimum pixel count)."""
DEFAULT_MAX_PIXELS = 768 * 28 * 28
"""``Qwen2VLVideoProcessor.size["longest_edge"]`` (per-frame maximum pixel count)."""
DEFAULT_MAX_VIDEO_TOKENS = 128000
"""``Qwen2VLVideoProcessor.max_video_tokens`` (only used with ``cap_pixels_per_frame``)."""
_RESCALE_FACTOR = 1 / 255


@dataclass(frozen=True)
class VideoInputs:
    """One video, ready for Qwen2-VL / Qwen2.5-VL.

    Attributes:
        pixel_values_videos: ``(gt·gh·gw, 3·tps·p·p)`` float32 (``(L, 1176)`` for Qwen2.5-VL).
        video_grid_thw: ``(1, 3)`` int64 ``[[gt, gh, gw]]`` in patches (``gh = H'/p``).
        second_per_grid_t: Seconds spanned by one temporal patch, ``tps / fps`` with ``fps`` the
            rate of the given frames (the *sampled* rate); ``1.0`` when unknown. (transformers'
            Qwen2.5-VL processor would use ``tps / 24`` for frames without metadata.)
        num_llm_tokens: ``gt·gh·gw // merge_size²``: ``<|video_pad|>`` tokens in the prompt.
        metadata: The :class:`VideoMetadata` when the frames came from
            :func:`~adaspark.video.load.load_video`, else ``None``.
    """

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid_t: float
    num_llm_tokens: int
    metadata: VideoMetadata | None = None

    def as_model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``Qwen2_5_VLForConditionalGeneration`` (one video):
        ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts`` (``(1,)`` float32)."""
        return {
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
            "second_per_grid_ts": torch.tensor([self.second_per_grid_t], dtype=torch.float32),
        }


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(H', W')`` of Qwen2-VL: multiples of ``factor``, about ``min..max_pixels`` pixels.

    Round each side to the nearest multiple of ``factor`` (half-to-even); if the area exceeds
    ``max_pixels`` scale by ``beta = sqrt(H·W / max_pixels)`` and round *down* (each side at least
    ``factor``); if it is below ``min_pixels`` scale by ``sqrt(min_pixels / (H·W))`` and round *up*.
    The aspect ratio is kept as well as the rounding allows. Note that for extreme aspect ratios
    the ``factor`` floor can make ``H'·W'`` exceed ``max_pixels``.

    Raises:
        ValueError: ``max(H, W) / min(H, W) > 200`` (as transformers) or non-positive sizes.
    """
    height = check_int("height", height, minimum=1)
    width = check_int("width", width, minimum=1)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resize of ``(T, C, H, W)`` uint8 frames to ``size = (H', W')`` (uint8).

    Same computation as ``torchvision.transforms.v2.functional.resize(..., BICUBIC,
    antialias=True)``: native uint8 ``interpolate`` on CPU; float32 ``interpolate`` + clamp +
    round elsewhere. Returns the input unchanged when the size already matches.
    """
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    if frames.device.type == "cpu":
        return F.interpolate(frames, size=list(size), mode="bicubic", align_corners=False, antialias=True)
    out = F.interpolate(
        frames.to(torch.float32), size=list(size), mode="bicubic", align_corners=False, antialias=True
    )
    return out.clamp_(0, 255).round_().to(torch.uint8)


def patchify(
    video: torch.Tensor,
    patch_size: int = 14,
    temporal_patch_size: int = DEFAULT_TEMPORAL_PATCH_SIZE,
    merge_size: int = 2,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flatten ``(T, C, H, W)`` into Qwen2-VL patch rows; returns ``(rows, (gt, gh, gw))``.

    ``T`` is padded to a multiple of ``temporal_patch_size`` by repeating the last frame; ``H`` and
    ``W`` must be multiples of ``patch_size * merge_size``. ``rows`` is
    ``(gt·gh·gw, C·tps·p·p)``; row ``r`` with
    ``r = ((t·(gh/m) + bh)·(gw/m) + bw)·m² + ih·m + iw`` holds the patch at patch coordinates
    ``(t, bh·m + ih, bw·m + iw)``, laid out as ``[c][dt][y][x]``.
    """
    if video.ndim != 4:
        raise ValueError(f"video must be (T, C, H, W), got shape {tuple(video.shape)}")
    num_frames, channels, height, width = video.shape
    factor = patch_size * merge_size
    if height % factor or width % factor:
        raise ValueError(f"H and W must be multiples of patch_size*merge_size={factor}, got {height}x{width}")
    if pad := -num_frames % temporal_patch_size:
        video = torch.cat((video, video[-1:].expand(pad, -1, -1, -1)), dim=0)
        num_frames += pad
    gt, gh, gw = num_frames // temporal_patch_size, height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    x = video.reshape(gt, temporal_patch_size, channels, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, channels * temporal_patch_size * p * p), (gt, gh, gw)


def _as_frames_tensor(frames) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must have dtype uint8, got {frames.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(frames))
    elif isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must have dtype uint8, got {frames.dtype}")
        tensor = frames
    else:
        raise ValueError(f"frames must be a numpy array or torch tensor, got {type(frames).__name__}")
    if tensor.ndim != 4 or tensor.shape[-1] != 3 or min(tensor.shape[:3]) < 1:
        raise ValueError(f"frames must have shape (T, H, W, 3) with T, H, W >= 1, got {tuple(tensor.shape)}")
    return tensor


def _check_triple(name: str, values) -> tuple[float, float, float]:
    if not isinstance(values, Sequence) or len(values) != 3:
        raise ValueError(f"{name} must be a sequence of 3 numbers, got {values!r}")
    return tuple(float(v) for v in values)


def preprocess_video(
    frames: np.ndarray | torch.Tensor,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = DEFAULT_TEMPORAL_PATCH_SIZE,
    merge_size: int = 2,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    fps: float | None = None,
    cap_pixels_per_frame: bool = False,
    max_video_tokens: int = DEFAULT_MAX_VIDEO_TOKENS,
) -> VideoInputs:
    """Turn RGB frames into Qwen2-VL / Qwen2.5-VL video inputs (``Qwen2VLVideoProcessor`` clone).

    Args:
        frames: ``(T, H, W, 3)`` uint8 RGB (numpy or torch; a CUDA tensor is processed on its
            device). All frames share one size.
        patch_size / temporal_patch_size / merge_size: Vision tower geometry (14 / 2 / 2).
        min_pixels / max_pixels: Per-frame pixel bounds of :func:`smart_resize` (video defaults
            100352 / 602112).
        image_mean / image_std: Per-channel normalisation in [0, 1] units (OpenAI CLIP).
        fps: Frame rate of ``frames`` as given (for sampled frames: the *sampled* rate, see
            :attr:`VideoMetadata.sampled_fps`); sets ``second_per_grid_t``.
        cap_pixels_per_frame / max_video_tokens: transformers' opt-in bound of the whole video's
            pixel budget (off by default there, as here).

    Returns:
        :class:`VideoInputs` with ``pixel_values_videos`` ``(gt·gh·gw, 3·tps·p²)`` float32 on the
        frames' device, ``video_grid_thw`` ``(1, 3)`` int64 on CPU.

    Raises:
        ValueError: wrong ``frames`` type/dtype/shape, or an invalid argument (named).
    """
    video = _as_frames_tensor(frames)
    patch_size = check_int("patch_size", patch_size, minimum=1)
    temporal_patch_size = check_int("temporal_patch_size", temporal_patch_size, minimum=1)
    merge_size = check_int("merge_size", merge_size, minimum=1)
    min_pixels = check_int("min_pixels", min_pixels, minimum=1)
    max_pixels = check_int("max_pixels", max_pixels, minimum=1)
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels must be <= max_pixels, got {min_pixels} > {max_pixels}")
    max_video_tokens = check_int("max_video_tokens", max_video_tokens, minimum=1)
    mean = _check_triple("image_mean", image_mean)
    std = _check_triple("image_std", image_std)
    if not all(s > 0 for s in std):
        raise ValueError(f"image_std must be > 0, got {image_std!r}")
    fps = None if fps is None else check_positive_real("fps", fps)

    factor = patch_size * merge_size
    video = video.permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W) uint8
    num_frames, _, height, width = video.shape
    if cap_pixels_per_frame:
        total_pixels = int(max_video_tokens * factor * factor * 0.9)
        max_pixels = max(
            min(max_pixels, total_pixels * temporal_patch_size // num_frames), int(min_pixels * 1.05)
        )
    new_size = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    video = resize_frames(video, new_size)

    # transformers fuses rescale into normalise: mean/std are scaled by 1/rescale_factor in float32.
    scale = 1.0 / _RESCALE_FACTOR
    mean_t = (torch.tensor(mean, dtype=torch.float32, device=video.device) * scale).view(-1, 1, 1)
    std_t = (torch.tensor(std, dtype=torch.float32, device=video.device) * scale).view(-1, 1, 1)
    video = video.to(torch.float32).sub_(mean_t).div_(std_t)

    rows, (gt, gh, gw) = patchify(video, patch_size, temporal_patch_size, merge_size)
    return VideoInputs(
        pixel_values_videos=rows,
        video_grid_thw=torch.tensor([[gt, gh, gw]], dtype=torch.int64),
        second_per_grid_t=temporal_patch_size / fps if fps is not None else 1.0,
        num_llm_tokens=gt * gh * gw // merge_size**2,
    )
