"""AdaSpark inside Hugging Face transformers (Qwen2.5-VL, Qwen2-VL, Qwen3-VL, LLaVA-OneVision)."""

from adaspark.integrations.transformers.adapters import SUPPORTED_MODEL_TYPES, get_adapter, supported_models
from adaspark.integrations.transformers.attention import ATTN_NAME, PaddingMask, register
from adaspark.integrations.transformers.patching import AdaSparkHandle, patch

__all__ = [
    "ATTN_NAME",
    "SUPPORTED_MODEL_TYPES",
    "AdaSparkHandle",
    "PaddingMask",
    "get_adapter",
    "patch",
    "register",
    "supported_models",
]
