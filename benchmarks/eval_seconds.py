"""Seconds per answer of an ``adaspark eval`` run, per variant against dense, item by item (not a test).

``adaspark eval`` answers every item with every variant one after the other (dense first), so each
variant's seconds on an item are paired with dense's on the same item. Per variant this prints the
mean seconds per answer, its ratio to dense, the decoder FLOPs saved (executed), and how many items
it answered more than ``--noise`` slower than dense::

    adaspark eval --lengths 256 1024 --n 2 --ps 0.9 0.5 --out runs/eval-speed
    python benchmarks/eval_seconds.py runs/eval-speed
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="an adaspark eval --out directory")
    ap.add_argument("--noise", type=float, default=0.15, help="relative slack before 'slower' (0.15)")
    ap.add_argument("--md", type=Path, default=None, help="also write the table to this Markdown file")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in (args.results / "results.jsonl").read_text().splitlines() if line]
    by_item: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_item[r["item_id"]][r["variant"]] = r
    variants = sorted({r["variant"] for r in rows} - {"dense"})
    lines = [
        "| variant | items | s per answer | dense s | ratio to dense | decoder FLOPs saved "
        f"| items slower than dense by > {args.noise:.0%} | accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in ["dense", *variants]:
        pairs = [(it[v], it["dense"]) for it in by_item.values() if v in it and "dense" in it]
        if not pairs:
            continue
        s = statistics.fmean(a["seconds"] for a, _ in pairs)
        d = statistics.fmean(b["seconds"] for _, b in pairs)
        flops = sum(a["decoder_flops"] for a, _ in pairs)
        saved = 1 - flops / sum(a["decoder_flops_dense"] for a, _ in pairs)
        slower = sum(a["seconds"] > (1 + args.noise) * b["seconds"] for a, b in pairs)
        acc = statistics.fmean(bool(a["correct"]) for a, _ in pairs)
        lines.append(
            f"| {v} | {len(pairs)} | {s:.3f} | {d:.3f} | {s / d:.2f} | {saved:.1%} | {slower} | {acc:.1%} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.md:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
