"""How close budget mode lands on its target: executed decoder FLOPs vs ``AdaSparkConfig(budget=B)``.

Not a test. For generated needle items of each length (frames), one prefill per budget through the
patched model; prints and writes the executed fraction of the dense decoder FLOPs
(``Report.llm_flops_sparse / Report.llm_flops_dense``), its error against the budget, the floor
(the least a prefill of that input can execute) and whether the budget was reachable, and the
selection work of the threshold search (included in the executed FLOPs).

    python benchmarks/budget_error.py --model tiny --lengths 64 256 512 --budgets 0.5 0.6 0.7 0.8
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import adaspark
from adaspark import AdaSparkConfig
from adaspark.needle import make_item, render_frames
from adaspark.needle.model import encode_prompt, load_model

from _bench import machine, markdown_table, write_outputs

RESULTS = Path(__file__).resolve().parent / "results"


def prefill_report(model, inputs: dict, config: AdaSparkConfig):
    kwargs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.inference_mode(), adaspark.patch(model, config) as handle:
        model(**kwargs, use_cache=True, logits_to_keep=1)
        return handle.report()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny, smolvl or a checkpoint directory")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512], metavar="FRAMES")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--items", type=int, default=2, help="needle items per length (default 2)")
    ap.add_argument("--task", default="retrieval", help="needle task of the items (default retrieval)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for b in args.budgets:
        AdaSparkConfig(budget=b)  # a bad budget fails here, naming the field
    loaded = load_model(args.model)
    name = Path(args.model).name if Path(args.model).is_dir() else args.model
    print(f"model {loaded.source}; machine: {machine()}", flush=True)
    rows = []
    for frames in args.lengths:
        for seed in range(args.items):
            item = make_item(args.task, frames, seed, split="test")
            video = loaded.preprocess(render_frames(item), item.fps)
            inputs = encode_prompt(loaded, video, item.question, list(item.options))
            tokens = int(inputs["input_ids"].shape[1])
            for budget in args.budgets:
                t0 = time.perf_counter()
                rep = prefill_report(loaded.model, inputs, AdaSparkConfig(budget=budget))
                seconds = time.perf_counter() - t0
                frac = rep.llm_fraction
                rows.append(
                    {
                        "frames": frames,
                        "item": item.id,
                        "tokens": tokens,
                        "video_tokens": rep.video_tokens,
                        "budget": budget,
                        "executed": frac,
                        "error": frac - budget,
                        "floor": rep.budget_floor,
                        "reachable": rep.budget_reachable,
                        "search": rep.budget_search_flops / rep.llm_flops_dense,
                        "seconds": seconds,
                    }
                )
                r = rows[-1]
                print(
                    f"{frames:4d} frames {tokens:6d} tokens  budget {budget:.2f}  executed {frac:.3f}  "
                    f"error {r['error']:+.3f}  floor {r['floor']:.3f}  reachable {r['reachable']}  "
                    f"search {r['search']:.1%}  {seconds:.1f} s",
                    flush=True,
                )
    # one line per (length, budget): the items' mean executed fraction and worst error
    cells = []
    for frames in args.lengths:
        for budget in args.budgets:
            rs = [r for r in rows if r["frames"] == frames and r["budget"] == budget]
            reach = [r for r in rs if r["reachable"]]
            cells.append(
                {
                    "frames": frames,
                    "tokens": int(statistics.mean(r["tokens"] for r in rs)),
                    "budget": budget,
                    "executed": statistics.mean(r["executed"] for r in rs),
                    "max_abs_error": max(abs(r["error"]) for r in rs),
                    "max_abs_error_reachable": max((abs(r["error"]) for r in reach), default=float("nan")),
                    "floor": max(r["floor"] for r in rs),
                    "reachable": f"{len(reach)}/{len(rs)}",
                    "search": statistics.mean(r["search"] for r in rs),
                }
            )
    table = markdown_table(
        cells,
        [
            ("frames", "frames", ""),
            ("tokens", "prompt tokens", ""),
            ("budget", "budget", ".2f"),
            ("executed", "executed (mean)", ".4f"),
            ("max_abs_error", "max abs error", ".4f"),
            ("max_abs_error_reachable", "max abs error, reachable", ".4f"),
            ("floor", "floor (max)", ".3f"),
            ("reachable", "reachable items", ""),
            ("search", "search FLOPs / dense", ".2%"),
        ],
    )
    print(table)
    meta = {
        "title": f"Budget mode: executed decoder FLOPs vs budget ({name})",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "model": loaded.source,
        "items_per_length": args.items,
    }
    note = (
        "\nexecuted = llm_flops_sparse / llm_flops_dense of one prefill (the report's executed decoder "
        "FLOPs); error = executed - budget; floor = the least the prefill could execute (projections, "
        "text, own cubes, one kept cube and token per cube); a budget below the floor is not reachable "
        "and runs at the floor. search = selection work of the attention threshold search (block-plan "
        "probes), included in the executed FLOPs (the budget pays for its own search).\n"
    )
    for pth in write_outputs(args.out, f"budget_error_{name}", meta, rows, table + note, None):
        print(f"wrote {pth}")


if __name__ == "__main__":
    main()
