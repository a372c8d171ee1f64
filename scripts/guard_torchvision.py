"""Make PyPI's torchvision importable beside a CPU-only torch (the vLLM CPU environment).

PyPI's torchvision wheel is a CUDA build; beside ``torch==2.13.0+cpu`` its C++ ops do not load, and
``torchvision/_meta_registrations.py`` then dies at import on ``register_fake("torchvision::nms")``
(and ``qnms``). vLLM's Qwen2.5-VL needs ``torchvision.transforms.v2`` (through transformers' Qwen2-VL
image processor), which works without the C++ ops. This script guards the two ``register_fake``
decorators with ``torchvision.extension._has_ops()``, so they register only when the ops exist.

Usage: ``python scripts/guard_torchvision.py`` with the environment's interpreter. Idempotent: a
guarded file is left alone; a torchvision without the two decorators is reported and left alone.
Exit code 0 when torchvision imports afterwards (``transforms.v2`` included), 1 otherwise.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

OPS = ("torchvision::nms", "torchvision::qnms")
GUARD = "@(torch.library.register_fake({op!r}) if torchvision.extension._has_ops() else (lambda fn: fn))"


def guard(path: Path) -> str:
    """Rewrite ``path`` in place; returns what was done (``guarded``, ``already guarded``, ``no change``)."""
    text = path.read_text()
    new = text
    for op in OPS:
        new = new.replace(f'@torch.library.register_fake("{op}")', GUARD.format(op=op))
    if new == text:
        return "already guarded" if all(GUARD.format(op=op) in text for op in OPS) else "no change"
    path.write_text(new)
    return "guarded"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed: nothing to guard")
        return 0
    path = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    if not path.is_file():
        print(f"{path} does not exist: nothing to guard")
    else:
        print(f"{path}: {guard(path)}")
    check = subprocess.run(
        [sys.executable, "-c", "import torchvision.transforms.v2"], capture_output=True, text=True
    )
    if check.returncode:
        print(f"torchvision.transforms.v2 still fails to import:\n{check.stderr.strip()}", file=sys.stderr)
        return 1
    print("torchvision.transforms.v2 imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
