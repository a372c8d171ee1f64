"""One way to load a model: a checkpoint directory → :class:`LoadedModel`.

Every command (``ask``, ``eval``, ``analyze``, ``show``) and the lmms-eval plugin open checkpoints
here. :func:`load_model` reads ``config.json``, checks the family against the adapter registry
(every family ``adaspark.patch`` supports), loads the weights with ``from_pretrained``, the
tokenizer when the directory has one, and the video preprocessing settings with
:func:`read_video_settings` — the one reader of the processor configs. The returned
:class:`LoadedModel` turns frames and a question into model inputs the family's way
(``LoadedModel.inputs``), through the family's adapter.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from adaspark.integrations.transformers.adapters import SUPPORTED_MODEL_TYPES as _TYPES
from adaspark.integrations.transformers.adapters import ModelAdapter, get_adapter, supported_models
from adaspark.video import (
    DEFAULT_FPS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

__all__ = [
    "LoadedModel",
    "VideoSettings",
    "decode_token",
    "load_model",
    "read_video_settings",
    "write_processor_configs",
]

#: files that show a checkpoint directory carries its own tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# ------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class VideoSettings:
    """Video preprocessing of a checkpoint: pixel bounds per frame, patch geometry, normalisation, fps.

    The defaults are those of transformers' ``Qwen2VLVideoProcessor`` (what a checkpoint without
    processor configs gets).
    """

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    fps: float = DEFAULT_FPS

    def to_processor_json(self, kind: str) -> dict:
        """The JSON transformers' ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` would save."""
        d = {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "merge_size": self.merge_size,
            "patch_size": self.patch_size,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": self.max_pixels, "shortest_edge": self.min_pixels},
            "temporal_patch_size": self.temporal_patch_size,
        }
        if kind == "image":
            d["image_processor_type"] = "Qwen2VLImageProcessor"
        else:
            d.update(
                video_processor_type="Qwen2VLVideoProcessor",
                do_sample_frames=False,
                fps=self.fps,
                min_frames=4,
                max_frames=768,
            )
        return d

    def video_kwargs(self) -> dict:
        """Keyword arguments of :func:`adaspark.video.preprocess_video` / ``load_video``."""
        return {
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }


def write_processor_configs(directory: str | os.PathLike, settings: VideoSettings | None = None) -> None:
    """Write ``preprocessor_config.json``, ``video_preprocessor_config.json`` and
    ``processor_config.json`` as transformers' Qwen2.5-VL processor would (atomically)."""
    from adaspark.core.io import atomic_write_json

    settings = settings or VideoSettings()
    directory = Path(directory)
    atomic_write_json(directory / "preprocessor_config.json", settings.to_processor_json("image"))
    atomic_write_json(directory / "video_preprocessor_config.json", settings.to_processor_json("video"))
    atomic_write_json(directory / "processor_config.json", {"processor_class": "Qwen2_5_VLProcessor"})


def read_video_settings(
    directory: str | os.PathLike | None, default: VideoSettings | None = None
) -> VideoSettings:
    """The video preprocessing settings of the checkpoint in ``directory``.

    Pixel bounds and fps come only from ``video_preprocessor_config.json`` (a real Qwen2.5-VL's
    ``preprocessor_config.json`` holds the *image* bounds, far too large per video frame); patch
    geometry and normalisation from either file, the video one winning. What neither file says
    keeps ``default`` (:class:`VideoSettings` ``()``: the video processor's own defaults).
    """
    out = default or VideoSettings()
    if directory is None:
        return out
    directory = Path(directory)
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):  # video wins
        f = directory / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: cannot read the processor config: {e}") from None
        upd: dict = {}
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if d.get(key) is not None:
                upd[key] = int(d[key])
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                upd[key] = tuple(float(x) for x in d[key])
        if name.startswith("video"):
            size = d.get("size") or {}
            lo = size.get("shortest_edge", d.get("min_pixels"))
            hi = size.get("longest_edge", d.get("max_pixels"))
            if lo is not None:
                upd["min_pixels"] = int(lo)
            if hi is not None:
                upd["max_pixels"] = int(hi)
            if d.get("fps"):
                upd["fps"] = float(d["fps"])
        out = replace(out, **upd)
    return out


# ------------------------------------------------------------------------------------ the model
@dataclass
class LoadedModel:
    """A checkpoint opened by :func:`load_model`.

    Attributes:
        model: the ``*ForConditionalGeneration`` model (eval mode).
        tokenizer: its tokenizer, or None (prompts then use byte ids, see ``ModelAdapter.prompt``).
        adapter: the family adapter (``adaspark.integrations.transformers.adapters``).
        settings: video preprocessing (:func:`read_video_settings`).
        source: where it came from (shown to users).
        directory: the checkpoint directory.
    """

    model: torch.nn.Module
    tokenizer: object | None
    adapter: ModelAdapter
    settings: VideoSettings
    source: str
    directory: Path | None = None

    @property
    def family(self) -> str:
        return self.adapter.name

    def preprocess(self, frames, fps: float):
        """``(T, H, W, 3)`` uint8 frames at ``fps`` → the family's video inputs."""
        return self.adapter.preprocess_video(self.model, frames, fps, self.settings)

    def prompt(self, video, question: str) -> dict:
        """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` of a one-video chat prompt."""
        return self.adapter.prompt(self.model, self.tokenizer, video, question)

    def inputs(self, video, question: str) -> dict:
        """Everything the model's forward needs for one preprocessed video and a question."""
        return {**self.prompt(video, question), **video.as_model_kwargs()}


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str = "cpu",
    default_settings: VideoSettings | None = None,
) -> LoadedModel:
    """Open the checkpoint directory ``path`` (what ``save_pretrained`` writes).

    Args:
        path: the checkpoint directory (``config.json``, weights, optional tokenizer and processor
            configs).
        dtype: parameter dtype (None keeps the checkpoint's).
        device: where to put the model.
        default_settings: video settings for what the processor configs do not say.

    Raises:
        ValueError: not a checkpoint directory, an unreadable config or weights, or a family AdaSpark
            does not support (the message lists the supported ones).
        ImportError: transformers is not installed.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"model {str(path)!r} is not a directory (expected a save_pretrained checkpoint)")
    if not (p / "config.json").is_file():
        raise ValueError(f"model {str(path)!r} has no config.json: not a save_pretrained checkpoint")
    try:
        from transformers import AutoConfig, AutoModelForImageTextToText
        from transformers.utils import logging as hf_logging
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"loading a model needs transformers: pip install 'adaspark[hf]' ({e})") from None
    try:
        cfg = AutoConfig.from_pretrained(p)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model {str(path)!r}: cannot read config.json: {e}") from None
    mt = getattr(cfg, "model_type", None)
    if mt not in _TYPES:
        raise ValueError(
            f"model {str(path)!r}: model_type {mt!r} is not supported. "
            f"Supported models: {supported_models()}."
        )
    kwargs = {} if dtype is None else {"dtype": dtype}
    bar_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a small model loads at once: no "Loading weights" bar
    try:
        try:
            model = AutoModelForImageTextToText.from_pretrained(p, **kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(f"model {str(path)!r}: cannot load the weights: {e}") from None
        tokenizer = None
        if any((p / f).is_file() for f in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(p)
            except (OSError, ValueError) as e:
                raise ValueError(f"model {str(path)!r}: cannot load its tokenizer: {e}") from None
    finally:
        if bar_on:
            hf_logging.enable_progress_bar()
    adapter = get_adapter(model)
    base = adapter.default_video_settings(model, default_settings or VideoSettings())
    settings = read_video_settings(p, base)
    return LoadedModel(
        model=model.to(device).eval(),
        tokenizer=tokenizer,
        adapter=adapter,
        settings=settings,
        source=str(p),
        directory=p,
    )


def decode_token(tokenizer, token_id: int) -> str:
    """Readable text of one token id (``"id 123"`` without a tokenizer)."""
    if tokenizer is not None and hasattr(tokenizer, "decode"):
        with contextlib.suppress(Exception):
            return str(tokenizer.decode([int(token_id)]))
    return f"id {int(token_id)}"
