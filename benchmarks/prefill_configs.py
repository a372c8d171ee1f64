"""One model's prefill of a needle video under named configs, timed interleaved, with an optional
per-op profile of where each config's time goes (not a test).

Configs: ``dense``, ``top_p@P``, ``budget@B``, ``nocm@P`` (Top-p p without the cost model: every
layer sparse). Each runs once as a warm-up, then ``--repeats`` times interleaved; the table gives
the median seconds, the ratio to dense and the executed decoder FLOPs fraction. With ``--profile``
each config is then run once under ``torch.profiler`` and its top operators (self CPU time) are
written beside the table::

    OMP_NUM_THREADS=1 python benchmarks/prefill_configs.py --model smolvl --frames 512 \\
        --configs dense top_p@0.5 nocm@0.5 budget@0.6 --repeats 2 --profile
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

import adaspark
from adaspark.needle import make_item, render_frames
from adaspark.needle import model as nm

from _bench import interleaved, machine, markdown_table, write_outputs


def config_of(name: str) -> adaspark.AdaSparkConfig:
    if name == "dense":
        return adaspark.AdaSparkConfig(sparse_attn=False, sparse_ffn=False)
    kind, _, value = name.partition("@")
    try:
        x = float(value)
    except ValueError:
        raise SystemExit(f"error: config {name!r}: expected dense, top_p@P, nocm@P or budget@B") from None
    if kind == "top_p":
        return adaspark.AdaSparkConfig(p=x)
    if kind == "nocm":
        return adaspark.AdaSparkConfig(p=x, cost_model=False)
    if kind == "budget":
        return adaspark.AdaSparkConfig(budget=x)
    raise SystemExit(f"error: config {name!r}: expected dense, top_p@P, nocm@P or budget@B")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smolvl", help="tiny, smolvl or a checkpoint directory")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--task", default="retrieval")
    ap.add_argument("--configs", nargs="+", default=["dense", "top_p@0.5", "nocm@0.5", "budget@0.6"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also one profiled run per config")
    ap.add_argument("--top", type=int, default=12, help="operators listed per profiled config")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    configs = {name: config_of(name) for name in args.configs}
    torch.set_grad_enabled(False)
    loaded = nm.load_model(args.model)
    item = make_item(args.task, args.frames, 0, split="test")
    video = loaded.preprocess(render_frames(item), item.fps)
    inputs = nm.encode_prompt(loaded, video, item.question, item.options)
    kw = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    ntok = int(kw["input_ids"].shape[1])
    print(f"machine: {machine()}\nmodel: {loaded.source}\n{ntok}-token prompt", flush=True)
    fractions: dict[str, float] = {}

    def runner(name):
        def run():
            with adaspark.patch(loaded.model, configs[name]) as h:
                loaded.model(**kw, use_cache=False, logits_to_keep=1)
                fractions[name] = h.report().llm_fraction

        return run

    fns = {name: runner(name) for name in configs}
    for fn in fns.values():
        fn()  # warm-up: kernels built, cost-model fits measured, vision FLOPs counted
    stats = interleaved(fns, args.repeats)
    base = stats["dense"]["median"] if "dense" in stats else None
    rows = []
    for name, st in stats.items():
        rows.append(
            {
                "config": name,
                "tokens": ntok,
                "seconds": st["median"],
                "speedup": base / st["median"] if base else None,
                "executed_fraction": fractions[name],
                "noisy": st["noisy"],
            }
        )
        print(f"{name}: {st['median']:.2f} s, executed decoder fraction {fractions[name]:.3f}", flush=True)
    cols = [
        ("config", "config", ""),
        ("tokens", "prompt tokens", "d"),
        ("seconds", "median s", ".2f"),
        ("speedup", "dense / config", ".2f"),
        ("executed_fraction", "executed decoder FLOPs / dense", ".3f"),
        ("noisy", "noisy", ""),
    ]
    table = "## Prefill, interleaved\n\n" + markdown_table(rows, cols)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6
            ops = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in events]
            table += f"\n## Profile: {name} (self CPU {total:.2f} s)\n\n" + markdown_table(
                ops, [("op", "operator", ""), ("self_s", "self s", ".3f"), ("calls", "calls", "d")]
            )
    print()
    print(table)
    name = args.name or f"prefill_configs_{Path(str(args.model)).name}_{args.frames}f"
    meta = {
        "title": "Prefill under named configs",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "model": loaded.source,
    }
    for pth in write_outputs(args.out, name, meta, rows, table, None):
        print(f"wrote {pth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
