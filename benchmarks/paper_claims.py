"""The paper's claims from ``adaspark eval`` results, with paired standard errors (not a test).

Claims a (≥ 60% decoder FLOPs saved within 1 point of dense at ≥ ``--min-frames``), b (Top-p vs
top-k / ratio at matched measured FLOPs: run the eval with ``--calibrate``), c (with vs without mean
compensation) come from one results file; d (before vs after fine-tuning with sparsity on) and e
(token vs cube granularity) compare two runs over the same items. See :mod:`adaspark.needle.claims`::

    python benchmarks/paper_claims.py --results runs/eval/results.jsonl --min-frames 1024
    python benchmarks/paper_claims.py --results runs/eval/results.jsonl \\
        --before runs/eval-stage2/results.jsonl --token runs/eval-token/results.jsonl --out claims.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaspark.core.io import atomic_write_text
from adaspark.needle.claims import compare_runs, markdown, paper_claims


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, required=True, help="results.jsonl of the main run")
    ap.add_argument("--min-frames", type=int, default=1024, help="claim a: lengths from this on")
    ap.add_argument("--before", type=Path, help="claim d: results.jsonl of the model before fine-tuning")
    ap.add_argument("--token", type=Path, help="claim e: results.jsonl of the same eval at token granularity")
    ap.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    try:
        comps = paper_claims(args.results, min_frames=args.min_frames)
        if args.before is not None:
            comps += compare_runs("d", args.results, args.before, "fine-tuned", "before")
        if args.token is not None:
            comps += compare_runs("e", args.token, args.results, "token", "cube")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown(comps)
    print(table)
    if args.out is not None:
        atomic_write_text(args.out, f"# The paper's claims\n\nCommand: `{' '.join(sys.argv)}`\n\n{table}")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
