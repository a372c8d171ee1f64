"""AdaSpark inside Hugging Face transformers (Qwen2.5-VL, Qwen2-VL, Qwen3-VL, LLaVA-OneVision)."""

from adaspark.integrations.transformers.adapters import SUPPORTED_MODEL_TYPES, get_adapter, supported_models
from adaspark.integrations.transformers.attention import ATTN_NAME, SparseMask, register
from adaspark.integrations.transformers.compat import TESTED_MAX, TESTED_MIN, TransformersCompatError
from adaspark.integrations.transformers.patching import AdaSparkHandle, patch

__all__ = [
    "ATTN_NAME",
    "SUPPORTED_MODEL_TYPES",
    "TESTED_MAX",
    "TESTED_MIN",
    "AdaSparkHandle",
    "SparseMask",
    "TransformersCompatError",
    "get_adapter",
    "patch",
    "register",
    "supported_models",
]
