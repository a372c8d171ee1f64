"""Qwen2-VL and Qwen2.5-VL: the layout is captured where the M-RoPE index is computed.

Each video is one run of ``T·(H/m)·(W/m)`` ``<|video_pad|>`` tokens between ``<|vision_start|>`` and
``<|vision_end|>`` (m = spatial merge size). ``get_rope_index`` receives exactly what the layout
needs (``mm_token_type_ids``, ``video_grid_thw``, ``image_grid_thw``, ``attention_mask``), also
inside ``generate``, which later drops ``video_grid_thw``; so its instance attribute is wrapped.
"""

from __future__ import annotations

from functools import partial

import torch

from adaspark.config import AdaSparkConfig
from adaspark.core.layout import Layout, build_layout, token_types_from_ids
from adaspark.integrations.transformers.adapters.base import (
    ModelAdapter,
    ModelParts,
    bind_call,
    set_instance_attr,
)

__all__ = ["QWEN2_5_VL", "QWEN2_VL", "QwenVLAdapter"]


class QwenVLAdapter(ModelAdapter):
    """Qwen-VL families whose backbone has ``get_rope_index`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""

    layout_hint = (
        "Pass `mm_token_type_ids` and `video_grid_thw` as the Qwen processor returns them (without "
        "mm_token_type_ids the M-RoPE positions are wrong too)."
    )

    def __init__(self, name: str, model_type: str, class_names: tuple[str, ...]) -> None:
        self.name = name
        self.model_type = model_type
        self.class_names = class_names

    def find_parts(self, model: torch.nn.Module) -> ModelParts:
        vl = self._backbone(model, "get_rope_index")
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

    def install(self, state, parts: ModelParts, undo: list, hooks: list) -> None:
        original = parts.vl.get_rope_index
        capture = partial(self._capture_rope_call, state, parts, original)
        set_instance_attr(parts.vl, "get_rope_index", capture, undo)

    def _capture_rope_call(self, state, parts: ModelParts, original, *args, **kwargs):
        """Wrapper body of ``get_rope_index``: the cube layout first, then the positions.

        The layout is built (and checked) first, so that a grid / token-count mismatch gets our
        clear error instead of a shape error from inside the M-RoPE computation.
        """
        bound = bind_call(original, args, kwargs)
        input_ids = bound.get("input_ids")
        if input_ids is not None:
            types = bound.get("mm_token_type_ids")
            if types is None:
                types = token_types_from_ids(
                    input_ids, image_token_id=parts.image_token_id, video_token_id=parts.video_token_id
                )
            layout = self.build_layout(
                types,
                bound.get("video_grid_thw"),
                bound.get("image_grid_thw"),
                bound.get("attention_mask"),
                state.config,
                self.merge_size(parts),
            )
            state.set_pending(input_ids, layout)
        return original(*args, **kwargs)

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
