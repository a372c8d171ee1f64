"""lmms-eval integration: the model ``adaspark_qwen2_5_vl``.

lmms-eval is optional (``pip install 'adaspark[lmms]'``): nothing here imports it at import time.

- :mod:`.runner` — ``--model_args`` parsing and the request handling (no lmms-eval import).
- :mod:`.model` — the ``lmms`` subclass lmms-eval instantiates (imports lmms-eval).

A small multiple-choice lmms-eval task from the needle benchmark is the application's
(:mod:`adaspark.needle.lmms_task`: ``python -m adaspark.needle.lmms_task DIR``, then
``--include_path DIR``).

lmms-eval finds the model through the entry point group ``lmms_eval.models`` declared in
adaspark's ``pyproject.toml``, which points at :func:`model_manifest`.
"""

from __future__ import annotations

__all__ = ["MODEL_CLASS_PATH", "MODEL_NAME", "model_manifest"]

MODEL_NAME = "adaspark_qwen2_5_vl"
MODEL_CLASS_PATH = "adaspark.integrations.lmms_eval.model.AdaSparkQwen2_5_VL"


def model_manifest():
    """The ``lmms_eval.models`` entry point: the manifest that registers :data:`MODEL_NAME`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)
