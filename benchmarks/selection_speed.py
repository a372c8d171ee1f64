"""Top-p selection: the partial sort of ``keep_from_probs`` against the whole sort, side by side (not a test).

Rows of cube distributions shaped like AdaS-Attn's — one decode step (heads × 1 × C) and one
cube-granularity prefill (heads × C × C) — peaked (a few cubes hold the mass, as in the trained
model's deep layers) or flat (the nucleus reaches past the partial sort), at each ``--p``. Both
functions run interleaved on the same rows; their kept sets are checked equal first.

    python benchmarks/selection_speed.py --cubes 126 254 510 --threads 1
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from adaspark.ops.selection import SelectionPolicy, keep_from_probs, keep_from_probs_reference

from _bench import interleaved, machine, markdown_table, write_outputs

#: logit scale of the synthetic rows: peaked and flat distributions
SHAPES = {"peaked": 6.0, "flat": 1.0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cubes", type=int, nargs="+", default=[126, 254, 510])
    ap.add_argument("--heads", type=int, default=7)
    ap.add_argument("--p", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="selection_speed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for c in args.cubes:
        for call, n_rows in (("decode", 1), ("prefill", c)):
            for shape, scale in SHAPES.items():
                probs = torch.softmax(torch.randn(args.heads, n_rows, c, generator=g) * scale, dim=-1)
                valid = torch.ones_like(probs, dtype=torch.bool)
                for p in args.p:
                    pol = SelectionPolicy(p=p)
                    fast = keep_from_probs(probs, valid, pol)
                    if not torch.equal(fast, keep_from_probs_reference(probs, valid, pol)):
                        sys.exit(f"partial and whole sort differ: C={c}, {call}, {shape}, p={p}")
                    fns = {
                        "whole": lambda a=(probs, valid, pol): keep_from_probs_reference(*a),
                        "partial": lambda a=(probs, valid, pol): keep_from_probs(*a),
                    }
                    t = interleaved(fns, args.repeats)
                    row = {
                        "cubes": c,
                        "call": f"{call} [{args.heads}, {n_rows}, {c}]",
                        "rows": shape,
                        "p": p,
                        "kept": float(fast.float().sum(-1).mean()),
                        "whole_ms": t["whole"]["median"] * 1e3,
                        "partial_ms": t["partial"]["median"] * 1e3,
                        "speedup": t["whole"]["median"] / t["partial"]["median"],
                        "noisy": t["whole"]["noisy"] or t["partial"]["noisy"],
                    }
                    rows.append(row)
                    print(
                        f"C={c:4d} {call:7s} {shape:6s} p={p}: kept {row['kept']:6.1f}  "
                        f"whole {row['whole_ms']:8.3f} ms  partial {row['partial_ms']:8.3f} ms  "
                        f"x{row['speedup']:.2f}",
                        flush=True,
                    )
    cols = [
        ("call", "call (heads, rows, cubes)", ""),
        ("rows", "distribution", ""),
        ("p", "p", ".2f"),
        ("kept", "cubes kept per row", ".1f"),
        ("whole_ms", "whole sort ms", ".3f"),
        ("partial_ms", "partial sort ms", ".3f"),
        ("speedup", "speed-up", ".2f"),
        ("noisy", "noisy", ""),
    ]
    cmd = shlex.join(argv if argv is not None else sys.argv[1:])
    meta = {
        "title": "Top-p selection: partial vs whole sort",
        "command": f"python benchmarks/selection_speed.py {cmd}",
        "machine": machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for pth in write_outputs(args.out, args.name, meta, rows, markdown_table(rows, cols), None):
        print(f"wrote {pth}")


if __name__ == "__main__":
    main()
