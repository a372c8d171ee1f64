"""Shared pieces of the speed benchmarks: interleaved timing, load flags, output files.

Not a test module. Every benchmark times the dense baseline and the AdaSpark variants of one
configuration *interleaved* (dense, v1, v2, ..., dense, v1, v2, ...), reports medians, and flags a
measurement as disturbed when the spread of its repeats or the machine's load average says another
process competed for the cores.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from adaspark.core.io import atomic_path, atomic_write_json, atomic_write_text

#: a measurement whose repeats spread more than this (max/min - 1) is flagged as noisy
NOISY_SPREAD = 0.15


def machine() -> dict:
    """What ran the benchmark (printed with every table)."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return float("nan")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int, *, warmup: bool = True) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu") -> dict[str, dict]:
    """Time every function ``repeats`` times, interleaved; returns ``{name: stats}``.

    stats: ``median`` / ``min`` / ``max`` seconds, ``times``, ``spread`` (max/min - 1), ``load``
    (the 1-minute load average seen during its runs, max) and ``noisy`` (spread above
    :data:`NOISY_SPREAD` or load average above the number of threads + 0.5).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    loads: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            loads[name].append(load_average())
    out = {}
    threads = torch.get_num_threads()
    for name, ts in times.items():
        spread = max(ts) / min(ts) - 1 if min(ts) > 0 else 0.0
        load = max(loads[name])
        out[name] = {
            "median": statistics.median(ts),
            "min": min(ts),
            "max": max(ts),
            "times": ts,
            "spread": spread,
            "load": load,
            "noisy": bool(spread > NOISY_SPREAD or (device == "cpu" and load > threads + 0.5)),
        }
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: ``(key, header, format)``; format ``""`` prints the value as is."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key, "")
            cells.append(format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(
    out_dir: Path, name: str, meta: dict, rows: list[dict], table: str, plot: Callable[[Path], None] | None
) -> list[Path]:
    """``name.json`` (meta + rows), ``name.md`` (the table with the command and machine) and ``name.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_json(out_dir / f"{name}.json", {"meta": meta, "rows": rows})]
    md = (
        f"# {meta.get('title', name)}\n\n"
        f"Command: `{meta['command']}`\n\n"
        f"Machine: {json.dumps(meta['machine'])}\n\n" + table
    )
    if any(r.get("noisy") for r in rows):
        md += "\n`noisy` = the repeats spread > 15% or the load average exceeded the thread count.\n"
    written.append(atomic_write_text(out_dir / f"{name}.md", md))
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            print("matplotlib is not installed: no PNG written (pip install matplotlib)")
            return written
        with atomic_path(out_dir / f"{name}.png") as tmp:
            plot(tmp)
        written.append(out_dir / f"{name}.png")
    return written
