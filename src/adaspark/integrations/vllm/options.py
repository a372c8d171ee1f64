"""The AdaSpark settings of a vLLM engine: the ``adaspark`` entry of ``hf_overrides`` (vLLM-free).

vLLM copies every dict-valued entry of ``hf_overrides`` onto the model's Hugging Face config, so
``hf_overrides={"architectures": [ARCHITECTURE], "adaspark": {"p": 0.5, "cube": [4, 4, 4]}}``
(``--hf-overrides '{...}'`` for ``vllm serve``) selects the AdaSpark model class and its
:class:`~adaspark.config.AdaSparkConfig` in every process of the engine. The entry holds
``AdaSparkConfig`` fields (typed values or the strings the CLI takes, ``"4x4x4"``, ``"0;-1"``) and
one option of the engine, ``report_path``: a JSONL file that receives one record per video prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

from adaspark.config import AdaSparkConfig, config_from_options

__all__ = ["ARCHITECTURE", "OPTIONS_KEY", "EngineOptions", "hf_overrides", "read_options"]

#: the architecture name the plugin registers (``hf_overrides["architectures"]``)
ARCHITECTURE = "AdaSparkQwen2_5_VLForConditionalGeneration"
#: the ``hf_overrides`` entry holding the settings
OPTIONS_KEY = "adaspark"
#: options of the engine besides the AdaSparkConfig fields
_ENGINE_KEYS = ("report_path",)


@dataclass(frozen=True)
class EngineOptions:
    """What the ``adaspark`` entry says: the config and where per-request reports go (None: log only)."""

    config: AdaSparkConfig
    report_path: str | None = None


def read_options(entry) -> EngineOptions:
    """The :class:`EngineOptions` of an ``adaspark`` entry (None: the defaults).

    Raises:
        ValueError: not a dict, an unknown key or an invalid value (the message names the field).
    """
    if entry is None:
        return EngineOptions(AdaSparkConfig())
    if not isinstance(entry, dict):
        raise ValueError(
            f"hf_overrides[{OPTIONS_KEY!r}] must be a dict of AdaSparkConfig fields, "
            f"got {type(entry).__name__}"
        )
    fields = {k: v for k, v in entry.items() if k not in _ENGINE_KEYS}
    path = entry.get("report_path")
    if path is not None and not isinstance(path, str):
        raise ValueError(f"hf_overrides[{OPTIONS_KEY!r}]['report_path'] must be a path string, got {path!r}")
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return EngineOptions(config_from_options(fields, what=f"hf_overrides[{OPTIONS_KEY!r}]"), path)


def hf_overrides(config: AdaSparkConfig | None = None, *, report_path: str | None = None) -> dict:
    """The ``hf_overrides`` that run a Qwen2.5-VL checkpoint with AdaSpark ``config`` in vLLM."""
    cfg = config or AdaSparkConfig()
    entry = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
    if report_path is not None:
        entry["report_path"] = str(report_path)
    return {"architectures": [ARCHITECTURE], OPTIONS_KEY: entry}
