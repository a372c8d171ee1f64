"""Qwen3-VL: temporal slices separated by timestamp text; DeepStack visual features in early layers.

The Qwen3-VL processor writes a video of ``grid_thw = (T, H, W)`` patches as ``T`` groups, one per
temporal slice: ``<t seconds>`` text, ``<|vision_start|>``, ``(H/m)·(W/m)`` ``<|video_pad|>`` tokens,
``<|vision_end|>``. ``video_grid_thw`` holds the per-video grids, so the layout is read from the
processor outputs as for Qwen2.5-VL, but with
:func:`~adaspark.core.layout.build_segmented_layout`: each video keeps one
``(T, H/m, W/m)`` cube grid across the text between its slices, and that text stays non-video.

DeepStack adds features of intermediate vision layers to the hidden states of the video tokens
after the first decoder layers. That happens between decoder layers, outside the attention and
MLP sub-layers AdaSpark replaces, so it needs nothing here: the added features are part of the
residual stream that the next layer's AdaS-FFN scores.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from adaspark.config import AdaSparkConfig
from adaspark.core.layout import Layout, build_segmented_layout
from adaspark.integrations.transformers.adapters.qwen2_vl import QwenVLAdapter
from adaspark.video import VideoInputs

__all__ = ["QWEN3_VL", "Qwen3VLAdapter"]


def _llm_grids(grid_thw: torch.Tensor | None, merge: int, what: str) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(
            f"{what} must be a [num, 3] tensor of (T, H, W) grids, "
            f"got {getattr(grid_thw, 'shape', grid_thw)!r}"
        )
    out = []
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        if h % merge or w % merge:
            raise ValueError(
                f"{what} {i}: grid {[t, h, w]} has H or W not divisible by spatial_merge_size {merge}"
            )
        out.append((int(t), int(h) // merge, int(w) // merge))
    return out


class _Qwen3Video(VideoInputs):
    """Qwen3-VL video inputs: its forward takes no ``second_per_grid_ts`` (timestamps are text)."""

    def as_model_kwargs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values_videos": self.pixel_values_videos, "video_grid_thw": self.video_grid_thw}


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: like Qwen2.5-VL, but a video's temporal slices may have text between them."""

    def default_video_settings(self, model, base):
        """Qwen3-VL's video processor: 16-px patches, ImageNet-standard normalisation (0.5, 0.5)."""
        base = replace(base, patch_size=16, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
        return super().default_video_settings(model, base)

    def preprocess_video(self, model, frames, fps: float, settings):
        """Frames resized per frame within the checkpoint's pixel bounds (transformers' Qwen3-VL
        processor budgets pixels over the whole clip instead), patched like Qwen2-VL."""
        v = super().preprocess_video(model, frames, fps, settings)
        return _Qwen3Video(**{f.name: getattr(v, f.name) for f in fields(v)})

    def video_block(self, model, video, encode) -> tuple[list[int], list[int]]:
        """Every temporal slice behind its ``<t seconds>`` timestamp (the mean time of its frames)."""
        cfg = model.config
        vs, vid, ve = int(cfg.vision_start_token_id), int(cfg.video_token_id), int(cfg.vision_end_token_id)
        t, h, w = (int(x) for x in video.video_grid_thw[0].tolist())
        merge = self.merge_size_of(model)
        per_slice = h * w // merge**2
        span = float(video.second_per_grid_t)
        ids: list[int] = []
        types: list[int] = []
        for i in range(t):
            stamp = encode(f"<{(i + 0.5) * span:.1f} seconds>")
            ids += [*stamp, vs, *([vid] * per_slice), ve]
            types += [0] * (len(stamp) + 1) + [2] * per_slice + [0]
        return ids, types

    @staticmethod
    def merge_size_of(model) -> int:
        return int(getattr(getattr(model.config, "vision_config", None), "spatial_merge_size", 2))

    def build_layout(
        self,
        types: torch.Tensor,
        video_grid_thw: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        config: AdaSparkConfig,
        merge: int,
    ) -> Layout:
        return build_segmented_layout(
            types,
            _llm_grids(video_grid_thw, merge, "video_grid_thw"),
            cube=config.cube,
            attention_mask=attention_mask,
            image_grids=_llm_grids(image_grid_thw, merge, "image_grid_thw"),
            images_as_video=config.images_as_video,
            slices_may_split=True,
        )


QWEN3_VL = Qwen3VLAdapter("Qwen3-VL", "qwen3_vl", ("Qwen3VLForConditionalGeneration", "Qwen3VLModel"))
