"""AdaSpark inside Hugging Face transformers (Qwen2.5-VL, Qwen2-VL)."""

from adaspark.integrations.transformers.attention import ATTN_NAME, PaddingMask, register
from adaspark.integrations.transformers.qwen2_vl import SUPPORTED_MODEL_TYPES, AdaSparkHandle, patch

__all__ = ["ATTN_NAME", "SUPPORTED_MODEL_TYPES", "AdaSparkHandle", "PaddingMask", "patch", "register"]
