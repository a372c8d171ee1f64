"""The vLLM plugin: entry point ``adaspark`` of the group ``vllm.general_plugins``.

vLLM calls :func:`register` in every process it starts (the API server, the engine core, each
worker), so it only registers the model class, lazily by name, and does it once.
"""

from __future__ import annotations

from adaspark.integrations.vllm.options import ARCHITECTURE

__all__ = ["register"]

_MODEL_CLASS = "adaspark.integrations.vllm.model:AdaSparkQwen2_5_VLForConditionalGeneration"


def register() -> None:
    """Register :data:`~adaspark.integrations.vllm.options.ARCHITECTURE` with vLLM (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, _MODEL_CLASS)
