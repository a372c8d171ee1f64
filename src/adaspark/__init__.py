"""AdaSpark: adaptive sparsity for efficient long-video understanding with Video-LLMs.

``import adaspark`` needs only torch; the transformers integration is imported on first use of
:func:`patch`.
"""

from adaspark.config import AdaSparkConfig

__version__ = "0.1.0"
__all__ = ["AdaSparkConfig", "__version__", "patch"]


def patch(model, config: AdaSparkConfig | None = None):
    """Switch AdaSpark on for a Qwen2.5-VL / Qwen2-VL / Qwen3-VL / LLaVA-OneVision model; returns a handle.

    ``handle.report()`` gives FLOPs and sparsity of the last call, ``handle.remove()`` restores the
    model exactly. See :func:`adaspark.integrations.transformers.patch`.
    """
    from adaspark.integrations.transformers import patch as _patch

    return _patch(model, config)
