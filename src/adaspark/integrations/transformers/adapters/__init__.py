"""Per-family adapters and the registry that picks one for a model.

``patch`` asks :func:`get_adapter` for the adapter of the model's class; a model of no registered
family gets a ``ValueError`` that lists the supported ones.
"""

from __future__ import annotations

import torch

from adaspark.integrations.transformers.adapters.base import ModelAdapter, ModelParts
from adaspark.integrations.transformers.adapters.llava_onevision import LLAVA_ONEVISION
from adaspark.integrations.transformers.adapters.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from adaspark.integrations.transformers.adapters.qwen3_vl import QWEN3_VL

__all__ = [
    "ADAPTERS",
    "SUPPORTED_MODEL_TYPES",
    "ModelAdapter",
    "ModelParts",
    "get_adapter",
    "supported_models",
]

#: every supported family, in the order the error message lists them
ADAPTERS: tuple[ModelAdapter, ...] = (QWEN2_5_VL, QWEN2_VL, QWEN3_VL, LLAVA_ONEVISION)

#: ``config.model_type`` -> family name
SUPPORTED_MODEL_TYPES = {a.model_type: a.name for a in ADAPTERS}


def supported_models() -> str:
    """One line naming every supported family and its transformers classes."""
    return ", ".join(a.describe() for a in ADAPTERS)


def get_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family, or ``ValueError`` naming the model and the supported ones."""
    for adapter in ADAPTERS:
        if isinstance(model, torch.nn.Module) and adapter.matches(model):
            return adapter
    mt = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"AdaSpark does not support {type(model).__name__} (model_type {mt!r}). "
        f"Supported models: {supported_models()}."
    )
