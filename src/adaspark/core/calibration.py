"""Machine calibration: the attention cost model's measured fits, cached on disk per machine.

:func:`cost_model` returns an :class:`~adaspark.ops.attention.cost.CostModel` whose fits are read
from ``<cache>/attention_costs.json`` (``<cache>`` = :func:`cache_dir`) and written back when a new
call shape is measured (a second or so, once per machine, dtype, head shape, granularity, kernel and
thread count). Entries are keyed by a fingerprint of the machine (CPU model and instruction set,
core count, PyTorch version), so a cache directory shared between machines never mixes their
figures; a fit is measured under a file lock, so processes starting together (eval shards) measure
once and share it. ``ADASPARK_COSTS=0`` keeps the fits in memory only.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch
from filelock import FileLock

from adaspark.core.io import atomic_write_json
from adaspark.ops.attention.cost import CostFit, CostModel, measure_costs

__all__ = ["cache_dir", "cost_model", "costs_path", "machine_fingerprint"]

COSTS_FILE = "attention_costs.json"
#: bumped when the measurement changes: entries of other versions are measured again
COSTS_VERSION = 3


def cache_dir() -> Path:
    """``$ADASPARK_CACHE`` if set, else ``~/.cache/adaspark``."""
    env = os.environ.get("ADASPARK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "adaspark"


def costs_path() -> Path:
    return cache_dir() / COSTS_FILE


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_fingerprint(device: str = "cpu") -> str:
    """``cpu-model|isa|cores|torch`` (CPU) or ``gpu-name|torch`` (CUDA)."""
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}|torch {torch.__version__}"
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{_cpu_model()}|{isa}|{os.cpu_count()} cores|torch {torch.__version__}"


def _entry(key: tuple) -> str:
    from adaspark.ops.attention.native import kernel_version

    # the native kernel's source hash: fits measured with one build are re-measured for another
    head = f"v{COSTS_VERSION}|{machine_fingerprint(key[0])}|native {kernel_version()}|"
    return head + "|".join(str(x) for x in key)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cost_model(*, persist: bool | None = None) -> CostModel:
    """A :class:`CostModel` backed by the on-disk cache (``persist=False``: memory only; default:
    on unless ``ADASPARK_COSTS=0``)."""
    if persist is None:
        persist = os.environ.get("ADASPARK_COSTS", "1") != "0"
    if not persist:
        return CostModel()
    path = costs_path()
    stored = _read(path)

    def load(key: tuple) -> CostFit | None:
        entry = stored.get(_entry(key))
        if not isinstance(entry, dict):
            return None
        try:
            return CostFit(**entry)
        except TypeError:  # another layout: measure again
            return None

    def measure(**kw) -> CostFit:
        # under the file lock: concurrent processes (eval shards) measure once and share the fit
        key = CostModel.key(**kw)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path) + ".lock", timeout=600):
                data = _read(path)
                entry = data.get(_entry(key))
                if isinstance(entry, dict):
                    try:
                        return CostFit(**entry)
                    except TypeError:
                        pass
                f = measure_costs(**kw)
                data[_entry(key)] = f.to_dict()
                atomic_write_json(path, data)
                return f
        except OSError:  # a read-only cache: measure, keep the fit in memory
            return measure_costs(**kw)

    return CostModel(load=load, measure=measure)
