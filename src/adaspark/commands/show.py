"""``adaspark show``: pictures of what AdaSpark selects on one video.

Runs a checkpoint of a supported family patched with AdaSpark on a video and question, reads the
cube sets the kernels used in that run (and selects the FFN tokens from its residual streams with
the library's own function), so the pictures show exactly what AdaSpark did (the per-layer means are
checked against ``handle.report()`` and both are written to ``show.json``), and renders:

* ``cubes.png`` — sampled frames with the cube distribution of one query (default: the first answer
  token) at one layer and head as a heat map, the kept cubes outlined;
* ``ffn.png`` — the same frames with the tokens whose FFN was skipped at that layer shaded;
* ``timeline.png`` — how often the cubes of each stretch of the video were kept, per layer, for
  text and for video queries.

Exit codes: 0 success, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import math
import time

from adaspark import __version__
from adaspark.commands.common import (
    add_common_arguments,
    add_config_arguments,
    check_common,
    check_matplotlib,
    config_from_args,
    json_ready,
    load_errors,
    model_info,
    output_dir,
    positive_int,
    prepare,
)
from adaspark.commands.errors import UsageError, fail

__all__ = ["add_parser", "run"]

_MERGED_PATCH = 28
#: the AdaSparkConfig fields show takes as flags (besides --cube, shared with analyze)
CONFIG_FLAGS = ("p", "p_attn", "p_ffn", "granularity")


def _query(text: str) -> str | int:
    if text in ("answer", "last"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'answer', 'last' or a token position, got {text!r}"
        ) from None


def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``show`` on the ``adaspark`` sub-command parser."""
    parser = commands.add_parser(
        "show",
        help="render PNGs of what AdaSpark selects: kept cubes, skipped FFN tokens, selection timeline",
        description=(
            "Run a model (Qwen2.5-VL, Qwen2-VL, Qwen3-VL or LLaVA-OneVision) with AdaSpark on a video "
            "and draw the cubes one query "
            "keeps (heat map over sampled frames), the tokens whose FFN was skipped, and a timeline of "
            "cube selection frequency over the video and all layers. Writes show.json and PNGs into --out."
        ),
    )
    add_common_arguments(parser, out_default="adaspark-show")
    add_config_arguments(
        parser,
        CONFIG_FLAGS,
        defaults={"p": 0.5},
        helps={
            "p": "Top-p threshold of both modules",
            "p_attn": "AdaS-Attn threshold (none: --p)",
            "p_ffn": "AdaS-FFN threshold (none: --p)",
            "granularity": "cube selection per query token or shared per cube",
        },
    )
    parser.add_argument(
        "--query",
        type=_query,
        default="answer",
        help="the query whose cubes are drawn: 'answer' (the first answer token, greedy under AdaSpark), "
        "'last' (the last prompt token) or a token position (negative counts from the end); "
        "default %(default)s",
    )
    parser.add_argument("--layer", type=int, help="decoder layer of the pictures (default: the middle one)")
    parser.add_argument(
        "--head", type=int, default=0, help="query head of the cube picture (default %(default)s)"
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=8,
        help="frames (time slices) in the pictures (default %(default)s)",
    )
    parser.add_argument(
        "--width", type=positive_int, default=1600, help="figure width in pixels (default %(default)s)"
    )
    parser.set_defaults(handler=run)
    return parser


# ------------------------------------------------------------------------------------ geometry
def _slices_to_show(n_slices: int, k: int, must: int | None) -> list[int]:
    """Up to ``k`` evenly spread slice indices, with ``must`` (the query's strongest slice) in."""
    import numpy as np

    chosen = sorted({int(x) for x in np.linspace(0, n_slices - 1, min(k, n_slices)).round()})
    if must is not None and must not in chosen:
        nearest = min(range(len(chosen)), key=lambda i: abs(chosen[i] - must))
        chosen[nearest] = must
        chosen = sorted(set(chosen))
    return chosen


def _resize(frame, height: int, width: int):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BILINEAR))


def _needle_boxes(needles, frame_index: int, scale_y: float, scale_x: float) -> list[tuple]:
    """Token-unit boxes ``(x, y, w, h)`` of the needles on screen in ``frame_index``."""
    boxes = []
    for n in needles or ():
        if n["frame"] <= frame_index < n["frame"] + n["frames"]:
            boxes.append(
                (
                    n["x"] * scale_x / _MERGED_PATCH,
                    n["y"] * scale_y / _MERGED_PATCH,
                    n["size"] * scale_x / _MERGED_PATCH,
                    n["size"] * scale_y / _MERGED_PATCH,
                    f"{n['role']}: {n['color']} {n['label']}",
                )
            )
    return boxes


def run(args: argparse.Namespace) -> int:
    """``adaspark show``: returns the exit code."""
    from adaspark.core.io import atomic_write_json

    try:
        check_common(args)
        check_matplotlib()
        config = config_from_args(args, (*CONFIG_FLAGS, "cube"))
        if args.width < 400:
            raise UsageError(f"--width must be at least 400 pixels, got {args.width}")
        out = output_dir(args)
        prepared = prepare(args)
        model = prepared.loaded.model
        tc = getattr(model.config, "text_config", model.config)
        n_layers, n_heads = int(tc.num_hidden_layers), int(tc.num_attention_heads)
        layer = n_layers // 2 if args.layer is None else args.layer
        if not -n_layers <= layer < n_layers:
            raise UsageError(f"--layer {args.layer} is out of range for a model with {n_layers} layers")
        layer %= n_layers
        if not -n_heads <= args.head < n_heads:
            raise UsageError(f"--head {args.head} is out of range for a model with {n_heads} query heads")
        head = args.head % n_heads
        if config.is_dense_layer(layer, n_layers):
            raise UsageError(f"--layer {layer} is kept dense: it selects nothing")
    except load_errors() as e:
        return fail(e)
    import numpy as np
    import torch

    from adaspark.integrations.transformers.analysis import capture_selection
    from adaspark.integrations.transformers.loading import decode_token

    start = time.perf_counter()
    try:
        with torch.inference_mode():
            cap = capture_selection(model, prepared.inputs, config, query=args.query, layer=layer)
    except ValueError as e:
        return fail(e)
    seconds = time.perf_counter() - start
    if not cap.layout.spans or cap.query_probs is None:
        return fail("the prompt has no video cubes to select from")
    source = prepared.source
    span = cap.layout.spans[0]
    t_tok, h_tok, w_tok = span.grid
    ct, ch, cw = config.cube
    vcfg = getattr(model.config, "vision_config", None)
    tpatch = int(getattr(vcfg, "temporal_patch_size", 2))
    cube_ids = cap.cube_ids.numpy()
    positions = span.positions.numpy()
    token_cube = cube_ids[positions].reshape(t_tok, h_tok, w_tok)  # cube of every video token
    n_slices = math.ceil(t_tok / ct)
    n_frames = int(source.frames.shape[0])
    timestamps = source.timestamps

    def frame_of(step: int) -> int:
        return min(step * tpatch, n_frames - 1)

    def time_of(step: int) -> float | None:
        return float(timestamps[frame_of(step)]) if timestamps else None

    # --- the chosen query's distribution at the chosen layer and head
    probs = cap.query_probs[head].numpy().astype(float)
    cand = cap.query_candidates.numpy()
    keep = cap.query_keep[head].numpy()
    kept_cubes = set(np.nonzero(keep)[0].tolist())
    prob_tok = np.where(cand[token_cube], probs[token_cube], np.nan)  # [t, h, w]
    strongest = (
        int(np.nanargmax(prob_tok.reshape(t_tok, -1).max(-1) if cand.any() else np.zeros(t_tok))) // ct
    )
    shown = _slices_to_show(n_slices, args.frames, strongest if cand.any() else None)
    steps = [s * ct for s in shown]
    fh, fw = h_tok * _MERGED_PATCH, w_tok * _MERGED_PATCH
    frames = np.stack([_resize(source.frames[frame_of(st)], fh, fw) for st in steps])
    titles = []
    for s, st in zip(shown, steps, strict=True):
        t = time_of(st)
        when = f"t = {t:.1f} s" if t is not None else f"step {st}"
        titles.append(f"{when} · frame {frame_of(st)} · slice {s + 1}/{n_slices}")
    marks = None
    if source.needles:
        sy = fh / source.frames.shape[1]
        sx = fw / source.frames.shape[2]
        marks = [_needle_boxes(source.needles, frame_of(st), sy, sx) for st in steps]

    n_cand = int(cand.sum())
    mass = float(probs[list(kept_cubes)].sum()) if kept_cubes else 0.0
    qpos = cap.query_pos
    ids = cap.input_ids
    tokenizer = prepared.loaded.tokenizer
    token_text = decode_token(tokenizer, int(ids[qpos]))
    if args.query == "answer":
        qdesc = f"the first answer token {token_text!r} (position {qpos})"
    elif args.query == "last":
        qdesc = f"the last prompt token {token_text!r} (position {qpos}, it emits the first answer token)"
    else:
        qdesc = f"token {token_text!r} at position {qpos}" + (
            " (a video token)" if cap.query_cube >= 0 else ""
        )
    report = cap.report
    rl = report.layers[layer]
    kept_all = float(np.mean(rl.cubes_kept)) if rl.cubes_kept else 0.0

    # --- FFN skips at the chosen layer
    video_mask = cube_ids >= 0
    active = cap.ffn_active.get(layer)
    if active is not None:
        skipped = (~active.numpy()) & video_mask
        skip_frac = float(skipped.sum() / max(video_mask.sum(), 1))
    else:
        skipped = np.zeros_like(video_mask)
        skip_frac = 0.0
    skipped_tok = skipped[positions].reshape(t_tok, h_tok, w_tok)

    # --- timeline: selection frequency per layer and temporal slice
    slice_of_cube = {}
    for t in range(t_tok):
        for cid in np.unique(token_cube[t]).tolist():
            slice_of_cube.setdefault(cid, t // ct)
    cube_slice = np.array([slice_of_cube.get(c, -1) for c in range(cap.kept.shape[-1])])
    freq = np.full((2, n_layers, n_slices), np.nan)
    kept_np, cand_np = cap.kept.numpy(), cap.candidates.numpy()
    for li in cap.sparse_attn_layers:
        for kind in (0, 1):
            k_s = np.bincount(
                cube_slice[cube_slice >= 0], weights=kept_np[li, kind][cube_slice >= 0], minlength=n_slices
            )
            c_s = np.bincount(
                cube_slice[cube_slice >= 0], weights=cand_np[li, kind][cube_slice >= 0], minlength=n_slices
            )
            with np.errstate(invalid="ignore", divide="ignore"):
                freq[kind, li] = np.where(c_s > 0, k_s / np.maximum(c_s, 1e-300), np.nan)
    slice_times = [time_of(s * ct) for s in range(n_slices)]

    from adaspark.viz.figure import frames_figure_size
    from adaspark.viz.selection import TIMELINE_HEIGHT

    fig_size = frames_figure_size(len(shown), fh, fw, args.width)
    figures = {
        "cubes": {"file": "cubes.png", "width": fig_size[0], "height": fig_size[1]},
        "ffn": {"file": "ffn.png", "width": fig_size[0], "height": fig_size[1]},
        "timeline": {"file": "timeline.png", "width": args.width, "height": TIMELINE_HEIGHT},
    }
    layers_doc = []
    for li in range(n_layers):
        lr = report.layers[li]
        act = cap.ffn_active.get(li)
        layers_doc.append(
            {
                "index": li,
                "sparse_attn": li in cap.sparse_attn_layers,
                "sparse_ffn": li in cap.sparse_ffn_layers,
                "cubes_kept_per_head": cap.kept_per_head[li].tolist(),
                "report_cubes_kept_per_head": list(lr.cubes_kept),
                "ffn_active": float((act.numpy() & video_mask).sum() / max(video_mask.sum(), 1))
                if act is not None
                else 1.0,
                "report_ffn_active": float(lr.ffn_active),
                "attn_density": float(lr.attn_density),
            }
        )
    doc = {
        "adaspark_version": __version__,
        "command": "show",
        "model": model_info(prepared),
        "video": source.info,
        "question": prepared.question,
        "config": config.to_dict(),
        "seconds": seconds,
        "tokens": int(ids.numel()),
        "cubes": int(cap.kept.shape[-1]),
        "cube_grid": [n_slices, math.ceil(h_tok / ch), math.ceil(w_tok / cw)],
        "query": {
            "mode": args.query if isinstance(args.query, str) else "position",
            "position": qpos,
            "token_id": int(ids[qpos]),
            "token": token_text,
            "answer_token_id": cap.answer_token,
            "layer": layer,
            "head": head,
            "own_cube": cap.query_cube,
            "candidates": n_cand,
            "kept_cubes": sorted(kept_cubes),
            "kept_probability_mass": mass,
            "probabilities": probs.tolist(),
            "kept_per_head": cap.query_keep.sum(-1).tolist(),
        },
        "ffn": {
            "layer": layer,
            "skipped_fraction": skip_frac,
            "skipped_positions": np.nonzero(skipped)[0].tolist(),
        },
        "timeline": {
            "slice_start_s": slice_times,
            "frequency_text_queries": freq[1].tolist(),
            "frequency_video_queries": freq[0].tolist(),
        },
        "shown_slices": shown,
        "layers": layers_doc,
        "report": report.to_dict(),
        "figures": figures,
    }
    json_path = out / "show.json"
    try:
        atomic_write_json(json_path, json_ready(doc), allow_nan=False)
    except (OSError, ValueError) as e:
        return fail(f"cannot write {str(json_path)!r}: {e}")

    from adaspark.viz.selection import plot_cube_selection, plot_ffn_skips, plot_selection_timeline

    cube_label = "x".join(map(str, config.cube))
    try:
        plot_cube_selection(
            out / "cubes.png",
            frames,
            token_cube[steps],
            prob_tok[steps],
            kept_cubes,
            cap.query_cube,
            panel_titles=titles,
            cube_hw=(ch, cw),
            marks=marks,
            title=f"AdaS-Attn cube selection — layer {layer}, head {head}, query: {qdesc}",
            subtitle=(
                f"p_attn = {config.attn_p:g}, cube {cube_label}: kept {len(kept_cubes)} of {n_cand} "
                f"candidate cubes, {mass:.0%} of the selection probability (all heads and queries of "
                f"this layer: {kept_all:.1f} cubes on average); {len(shown)} of {n_slices} time slices shown"
            ),
            width=args.width,
        )
        plot_ffn_skips(
            out / "ffn.png",
            frames,
            token_cube[steps],
            skipped_tok[steps],
            panel_titles=titles,
            cube_hw=(ch, cw),
            marks=marks,
            title=f"AdaS-FFN — layer {layer}: FFN skipped for {skip_frac:.1%} of the video tokens "
            f"(p_ffn = {config.ffn_p:g})",
            subtitle=(
                "in every cube, the tokens whose residual-stream norms make up the top-p share of the cube's "
                "norm sum go through the FFN; the others get the cube's mean FFN update"
            ),
            width=args.width,
        )
        plot_selection_timeline(
            out / "timeline.png",
            freq[1],
            freq[0],
            slice_times,
            dense_layers=[i for i in range(n_layers) if i not in cap.sparse_attn_layers],
            title=f"Cube selection over the video, all layers (p_attn = {config.attn_p:g}, "
            f"cube {cube_label})",
            width=args.width,
        )
    except (OSError, ImportError, ValueError) as e:
        return fail(f"cannot draw the figures into {str(out)!r}: {e}")
    print(f"AdaSpark {__version__} show")
    print(f"Model    {prepared.loaded.source}")
    print(
        f"Video    {source.info.get('path', 'needle item')}: {source.info['video_tokens']} video tokens, "
        f"grid {span.grid}"
    )
    print(f"Query    {qdesc}")
    print(
        f"Layer {layer}, head {head}: kept {len(kept_cubes)} of {n_cand} candidate cubes "
        f"({mass:.0%} of the selection probability); FFN skipped for {skip_frac:.1%} of the video tokens"
    )
    print("Per layer: cubes kept per selecting query (mean over heads) / FFN active (video tokens)")
    for d in layers_doc:
        k = float(np.mean(d["cubes_kept_per_head"])) if d["sparse_attn"] else float("nan")
        print(f"  {d['index']:>5}   {k:6.2f}   {d['ffn_active']:6.1%}")
    print(f"\nWrote {json_path}")
    for f in figures.values():
        print(f"Wrote {out / f['file']}  ({f['width']}x{f['height']})")
    return 0
