"""LLaVA-OneVision: 1D RoPE, bilinearly pooled frame grids, one newline token after each video.

``LlavaOnevisionModel.get_video_features`` encodes the ``F`` frames of a video
(``pixel_values_videos``: ``[videos, F, C, H, W]``), pools each frame's ``s × s`` patch grid
(``s = image_size // patch_size``) bilinearly to ``ceil(s/2) × ceil(s/2)``, lays the frames out in
time-major raster order and appends the learned ``image_newline`` vector once, after the whole
video. The prompt therefore holds ``F·ceil(s/2)² + 1`` ``<video>`` placeholder tokens per video:
AdaSpark cubes the first ``F·ceil(s/2)²`` on the grid ``(F, ceil(s/2), ceil(s/2))`` and leaves the
newline token non-video.

The layout is read from a call's own inputs (the backbone's forward, or ``generate``): the
placeholder tokens of ``input_ids`` and the frame count of ``pixel_values_videos`` (or of the
pre-encoded ``mm_encoder_outputs`` that ``generate`` passes instead), else of the placeholder runs.
The language model is Qwen2, so attention and MLP patching are the shared ones.
Images (AnyRes tiles with a newline per row) stay dense; ``images_as_video`` is not supported.
"""

from __future__ import annotations

import math

import torch

from adaspark.config import AdaSparkConfig
from adaspark.core.layout import TEXT, VIDEO, build_segmented_layout, token_types_from_ids
from adaspark.integrations.transformers.adapters.base import ModelAdapter, ModelParts
from adaspark.video import VideoInputs

__all__ = ["LLAVA_ONEVISION", "LlavaOnevisionAdapter"]


class _LlavaVideo(VideoInputs):
    """LLaVA-OneVision video inputs: ``pixel_values_videos`` ``[1, F, 3, S, S]``."""

    def as_model_kwargs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values_videos": self.pixel_values_videos}


class LlavaOnevisionAdapter(ModelAdapter):
    name = "LLaVA-OneVision"
    model_type = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    layout_hint = (
        "Pass `input_ids` holding the processor's <video> placeholder tokens (frames·h·w + 1 per video) "
        "together with `pixel_values_videos`."
    )

    def find_parts(self, model: torch.nn.Module) -> ModelParts:
        vl = self._backbone(model, "vision_tower")
        lm = self._language_model(vl)
        cfg = model.config
        vision = tuple(
            m for m in (vl.vision_tower, getattr(vl, "multi_modal_projector", None)) if m is not None
        )
        return ModelParts(
            model=model,
            vl=vl,
            language_model=lm,
            layers=list(lm.layers),
            vision=vision,
            lm_head=getattr(model, "lm_head", None),
            text_config=lm.config,
            video_token_id=int(cfg.video_token_id),
            image_token_id=int(cfg.image_token_id),
        )

    def default_video_settings(self, model, base):
        """LLaVA-OneVision's video processor: CLIP normalisation, frames resized to the tower's size."""
        return base

    def preprocess_video(self, model, frames, fps: float, settings):
        """Every frame resized (bicubic) to the vision tower's ``image_size`` square and normalised."""
        import numpy as np

        side = int(model.config.vision_config.image_size)
        x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
        x = x.clamp(0, 255) / 255.0
        mean = torch.tensor(settings.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(settings.image_std).view(1, 3, 1, 1)
        x = ((x - mean) / std)[None]
        f = int(x.shape[1])
        h, w = self.frame_grid_of(model)
        return _LlavaVideo(
            pixel_values_videos=x,
            video_grid_thw=torch.tensor([[f, h, w]], dtype=torch.long),
            second_per_grid_t=1.0 / float(fps) if fps else 1.0,
            num_llm_tokens=f * h * w + 1,
        )

    def video_block(self, model, video, encode) -> tuple[list[int], list[int]]:
        """The ``<video>`` placeholders: ``F·h·w`` frame tokens and the newline token after them."""
        vid = int(model.config.video_token_id)
        n = int(video.num_llm_tokens)
        return [vid] * n, [2] * (n - 1) + [0]

    @staticmethod
    def frame_grid_of(model) -> tuple[int, int]:
        vcfg = model.config.vision_config
        pooled = math.ceil(int(vcfg.image_size) // int(vcfg.patch_size) / 2)
        return pooled, pooled

    def check(self, config: AdaSparkConfig, parts: ModelParts) -> None:
        if config.images_as_video:
            raise ValueError(
                "AdaSparkConfig.images_as_video is not supported for LLaVA-OneVision: its images are "
                "AnyRes tiles with a newline token per row, not a t × h × w token grid"
            )

    @classmethod
    def frame_grid(cls, parts: ModelParts) -> tuple[int, int]:
        """``(h, w)`` LM tokens per frame after the 2× bilinear pooling."""
        return cls.frame_grid_of(parts.model)

    def layout_from_call(self, config: AdaSparkConfig, parts: ModelParts, bound: dict):
        """The layout of the ``<video>`` placeholders in ``bound["input_ids"]`` (None without any)."""
        input_ids = bound.get("input_ids")
        if input_ids is None:
            if bound.get("pixel_values_videos") is not None:
                raise ValueError(
                    "AdaSpark needs `input_ids` to locate the video tokens of LLaVA-OneVision "
                    "(got inputs_embeds with pixel_values_videos)"
                )
            return None
        types = token_types_from_ids(
            input_ids, image_token_id=parts.image_token_id, video_token_id=parts.video_token_id
        )
        mask = bound.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] < input_ids.shape[1]:
            mask = None
        if mask is not None:
            mask = mask[:, -input_ids.shape[1] :]  # with a cache the mask also covers the cached tokens
            types = types.masked_fill(mask == 0, TEXT)
        if not bool((types == VIDEO).any()):
            return None
        h, w = self.frame_grid(parts)
        frames = self._frames_per_video(bound, types, h * w)
        layout = build_segmented_layout(
            types,
            [(f, h, w) for f in frames],
            cube=config.cube,
            attention_mask=mask,
            video_trailing_tokens=1,
            grid_source=f"the video frames (F, {h}, {w}) with a newline token,",
        )
        return input_ids, layout

    @staticmethod
    def _frames_per_video(bound: dict, types: torch.Tensor, per_frame: int) -> list[int]:
        """Frame count of every video of the batch, in order.

        From ``pixel_values_videos`` ``[videos, F, C, H, W]``, else from pre-encoded video features
        ``[videos, F·h·w + 1, d]``, else from the placeholder runs (each run one video).
        """
        pix = bound.get("pixel_values_videos")
        if isinstance(pix, torch.Tensor):
            if pix.dim() != 5:
                raise ValueError(
                    "pixel_values_videos must be [videos, frames, channels, height, width], got shape "
                    f"{tuple(pix.shape)}"
                )
            return [int(pix.shape[1])] * int(pix.shape[0])
        encoded = (bound.get("mm_encoder_outputs") or {}).get("video")
        feats = getattr(encoded, "pooler_output", None)
        if isinstance(feats, torch.Tensor) and feats.dim() == 3:
            return [_frames(int(feats.shape[1]), per_frame, "the pre-encoded video features")] * int(
                feats.shape[0]
            )
        frames = []
        for b, row in enumerate(types.tolist()):
            start = None
            for i, t in enumerate([*row, TEXT]):
                if t == VIDEO and start is None:
                    start = i
                elif t != VIDEO and start is not None:
                    frames.append(_frames(i - start, per_frame, f"the <video> run at {start} of sample {b}"))
                    start = None
        return frames


def _frames(tokens: int, per_frame: int, what: str) -> int:
    if tokens < per_frame + 1 or (tokens - 1) % per_frame:
        raise ValueError(
            f"{what} has {tokens} tokens; a LLaVA-OneVision video has frames·{per_frame} + 1 (the newline): "
            "grid and token count do not match"
        )
    return (tokens - 1) // per_frame


LLAVA_ONEVISION = LlavaOnevisionAdapter()
