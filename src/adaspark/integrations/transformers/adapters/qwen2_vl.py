"""Qwen2-VL and Qwen2.5-VL: the layout is read from the processor outputs a call receives.

Each video is one run of ``T·(H/m)·(W/m)`` ``<|video_pad|>`` tokens between ``<|vision_start|>`` and
``<|vision_end|>`` (m = spatial merge size). The processor outputs (``input_ids``,
``mm_token_type_ids``, ``video_grid_thw``, ``image_grid_thw``, ``attention_mask``) say everything
the layout needs; the shared mechanism hands them over from ``generate`` (which pre-encodes the
video and passes no grids to the forwards) and from every forward that comes with its grids. The
layout is built and checked before the model runs, so a grid / token-count mismatch gets our clear
error instead of a shape error from inside the M-RoPE computation.
"""

from __future__ import annotations

import torch

from adaspark.config import AdaSparkConfig
from adaspark.core.layout import Layout, build_layout, token_types_from_ids
from adaspark.integrations.transformers.adapters.base import ModelAdapter, ModelParts

__all__ = ["QWEN2_5_VL", "QWEN2_VL", "QwenVLAdapter"]


class QwenVLAdapter(ModelAdapter):
    """Qwen-VL families (Qwen2-VL, Qwen2.5-VL; Qwen3-VL subclasses it): a ``visual`` tower and grids."""

    layout_hint = (
        "Pass `mm_token_type_ids` and `video_grid_thw` as the Qwen processor returns them (without "
        "mm_token_type_ids the M-RoPE positions are wrong too)."
    )

    def __init__(self, name: str, model_type: str, class_names: tuple[str, ...]) -> None:
        self.name = name
        self.model_type = model_type
        self.class_names = class_names

    def find_parts(self, model: torch.nn.Module) -> ModelParts:
        vl = self._backbone(model, "visual")
        lm = self._language_model(vl)
        cfg = model.config
        visual = getattr(vl, "visual", None)
        return ModelParts(
            model=model,
            vl=vl,
            language_model=lm,
            layers=list(lm.layers),
            vision=(visual,) if visual is not None else (),
            lm_head=getattr(model, "lm_head", None),
            text_config=lm.config,
            video_token_id=int(cfg.video_token_id),
            image_token_id=int(cfg.image_token_id),
        )

    def merge_size(self, parts: ModelParts) -> int:
        vcfg = getattr(parts.model.config, "vision_config", None)
        return int(getattr(vcfg, "spatial_merge_size", 2))

    def layout_from_call(self, config: AdaSparkConfig, parts: ModelParts, bound: dict):
        """The layout of the processor outputs in ``bound`` (None without video/image grids).

        The token types come from ``mm_token_type_ids`` when it covers ``input_ids`` (the processor
        returns it), else from the placeholder ids.
        """
        input_ids = bound.get("input_ids")
        video_grid = bound.get("video_grid_thw")
        image_grid = bound.get("image_grid_thw")
        if not isinstance(input_ids, torch.Tensor) or (video_grid is None and image_grid is None):
            return None
        types = bound.get("mm_token_type_ids")
        if not isinstance(types, torch.Tensor) or types.shape != input_ids.shape:
            types = token_types_from_ids(
                input_ids, image_token_id=parts.image_token_id, video_token_id=parts.video_token_id
            )
        mask = bound.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
            mask = None
        layout = self.build_layout(types, video_grid, image_grid, mask, config, self.merge_size(parts))
        return input_ids, layout

    def build_layout(
        self,
        types: torch.Tensor,
        video_grid_thw: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        config: AdaSparkConfig,
        merge: int,
    ) -> Layout:
        """Contiguous videos (Qwen2-VL / Qwen2.5-VL): ``adaspark.core.layout.build_layout``."""
        return build_layout(
            types,
            video_grid_thw,
            cube=config.cube,
            spatial_merge_size=merge,
            attention_mask=attention_mask,
            image_grid_thw=image_grid_thw,
            images_as_video=config.images_as_video,
        )

    def vision_key(self, module, args, kwargs) -> tuple | None:
        """The vision tower's FLOPs depend only on the patch tensor's shape, its dtype and the grids."""
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
        grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
        if not isinstance(x, torch.Tensor) or not isinstance(grid, torch.Tensor):
            return None
        return (tuple(x.shape), x.dtype, tuple(grid.reshape(-1).tolist()))


QWEN2_5_VL = QwenVLAdapter(
    "Qwen2.5-VL", "qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
)
QWEN2_VL = QwenVLAdapter("Qwen2-VL", "qwen2_vl", ("Qwen2VLForConditionalGeneration", "Qwen2VLModel"))
