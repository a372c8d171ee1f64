"""AdaSpark inside vLLM (``pip install 'adaspark[vllm]'``, a vLLM environment of its own).

The plugin (entry point group ``vllm.general_plugins``) registers
:data:`ARCHITECTURE`, vLLM's Qwen2.5-VL with AdaS-Attn and AdaS-FFN on whole-prompt video prefills
and AdaS-Attn on the decode steps after them
(:mod:`adaspark.integrations.vllm.model`). Select it and its settings with ``hf_overrides``::

    from vllm import LLM
    from adaspark import AdaSparkConfig
    from adaspark.integrations.vllm import hf_overrides

    llm = LLM(model=PATH, hf_overrides=hf_overrides(AdaSparkConfig(p=0.5)),
              enable_chunked_prefill=False, enable_prefix_caching=False)

Importing this package does not import vLLM; the model module does (``adaspark.integrations.vllm.model``).
"""

from adaspark.integrations.vllm.options import (
    ARCHITECTURE,
    OPTIONS_KEY,
    EngineOptions,
    hf_overrides,
    read_options,
)
from adaspark.integrations.vllm.plugin import register
from adaspark.integrations.vllm.positions import transformers_mrope_positions
from adaspark.integrations.vllm.step import prompt_digest

__all__ = [
    "ARCHITECTURE",
    "OPTIONS_KEY",
    "EngineOptions",
    "hf_overrides",
    "prompt_digest",
    "read_options",
    "register",
    "transformers_mrope_positions",
]
