"""``adaspark analyze``: the paper's preliminary analysis of a dense model on one video.

Measures, per decoder layer of a checkpoint of a supported family (one dense prefill):

* attention sparsity — for each analysed query (video and text), how many keys and how many cubes
  hold 90 / 95 / 99 % of its attention mass, per head;
* FFN laziness — ``||FFN(x)|| / ||x||`` for video vs text tokens, mean and variance;
* the entropy of AdaS-Attn's cube distribution and how many cubes (and FFN tokens) Top-p keeps at a
  few values of ``p``;

and writes ``analysis.json`` plus four PNG figures into ``--out``. The statistics live in
:mod:`adaspark.core.analysis`, the model taps in :mod:`adaspark.integrations.transformers.analysis`,
the figures in :mod:`adaspark.viz`; this module parses, loads, calls and writes.

The model, video and prompt options and their loading are shared with ``adaspark show`` through
:mod:`adaspark.commands.common`.

Exit codes: 0 success, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import time

from adaspark import __version__
from adaspark.commands.common import (
    add_common_arguments,
    check_common,
    check_matplotlib,
    fraction,
    json_ready,
    load_errors,
    model_info,
    output_dir,
    positive_int,
    prepare,
    progress_bar,
)
from adaspark.commands.errors import fail

__all__ = ["add_parser", "run"]


# ------------------------------------------------------------------------------------ arguments


def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``analyze`` on the ``adaspark`` sub-command parser."""
    parser = commands.add_parser(
        "analyze",
        help="measure attention sparsity, FFN laziness and cube entropy of a dense model (JSON + PNG)",
        description=(
            "Run one dense prefill of a model (Qwen2.5-VL, Qwen2-VL, Qwen3-VL or LLaVA-OneVision) on a "
            "video and measure, per layer: "
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
