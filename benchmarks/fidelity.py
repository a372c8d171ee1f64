"""How closely each AdaSpark variant reproduces the dense model, from ``adaspark eval`` results (not a
test).

Accuracy on a few dozen four-way items has a standard error of 8–9 points, too coarse to rank
variants that differ by a few. Fidelity to the dense model on the same items is far finer: per item,
the total-variation distance between the variant's and the dense model's distributions over the four
options (``option_probs``), and whether both pick the same option. Paired comparisons (``--pairs
A:B``) give the mean per-item difference of the distance with its standard error, so "A is closer to
dense than B at the same FLOPs" can be told from noise.

    python benchmarks/fidelity.py benchmarks/results/eval_smolvl_stage2_128f \\
        --pairs top_p@0.5-adaptive:top_p@0.5 budget@0.5-adaptive:budget@0.5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from adaspark.core.io import atomic_write_text
from adaspark.needle.evaluate import RESULTS_FILE, load_results


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def fidelity(rows: list[dict]) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """Per variant: n, decoder FLOPs saved, accuracy, agreement with dense and mean TV distance (each
    with its standard error); and per variant the TV distance of every item (for paired tests)."""
    dense = {r["item_id"]: r for r in rows if r["variant"] == "dense"}
    if not dense:
        raise ValueError("the results hold no dense rows to compare with")
    variants: dict[str, list[dict]] = {}
    for r in rows:
        variants.setdefault(r["variant"], []).append(r)
    table, tv_by = [], {}
    for name, rs in variants.items():
        rs = [r for r in rs if r["item_id"] in dense and r.get("option_probs") is not None]
        if not rs:
            continue
        tv = {
            r["item_id"]: 0.5
            * sum(
                abs(a - b)
                for a, b in zip(r["option_probs"], dense[r["item_id"]]["option_probs"], strict=True)
            )
            for r in rs
        }
        agree = [float(r["pred"] == dense[r["item_id"]]["pred"]) for r in rs]
        acc = [float(bool(r["correct"])) for r in rs]
        saved = 1 - sum(r["decoder_flops"] for r in rs) / sum(r["decoder_flops_dense"] for r in rs)
        row = {"variant": name, "n": len(rs), "decoder_saved": saved}
        for key, xs in (("accuracy", acc), ("agreement", agree), ("tv", list(tv.values()))):
            row[key], row[f"{key}_se"] = _mean_se(xs)
        table.append(row)
        tv_by[name] = tv
    return table, tv_by


def paired(tv_by: dict[str, dict[str, float]], a: str, b: str) -> dict:
    """Mean per-item difference TV(a) - TV(b) over the items both answered, with its standard error."""
    for name in (a, b):
        if name not in tv_by:
            raise ValueError(f"no variant {name!r} in the results; variants: {', '.join(tv_by)}")
    common = sorted(set(tv_by[a]) & set(tv_by[b]))
    diffs = [tv_by[a][i] - tv_by[b][i] for i in common]
    m, se = _mean_se(diffs)
    resolved = not math.isnan(se) and abs(m) > 2 * se
    verdict = (
        (f"{a} closer to dense" if m < 0 else f"{b} closer to dense")
        if resolved
        else "not resolved (|diff| <= 2 s.e.)"
    )
    return {"a": a, "b": b, "n": len(common), "diff": m, "se": se, "verdict": verdict}


def markdown(table: list[dict], pairs: list[dict]) -> str:
    lines = [
        "| variant | n | decoder FLOPs saved | accuracy | agrees with dense | TV distance to dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['variant']} | {r['n']} | {100 * r['decoder_saved']:.1f}% | "
            f"{100 * r['accuracy']:.1f}% ± {100 * r['accuracy_se']:.1f} | "
            f"{100 * r['agreement']:.1f}% ± {100 * r['agreement_se']:.1f} | "
            f"{r['tv']:.3f} ± {r['tv_se']:.3f} |"
        )
    if pairs:
        lines += ["", "| A | B | items | mean TV(A) − TV(B) | verdict |", "|---|---|---:|---:|---|"]
        for p in pairs:
            lines.append(
                f"| {p['a']} | {p['b']} | {p['n']} | {p['diff']:+.3f} ± {p['se']:.3f} | {p['verdict']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="an adaspark eval --out directory (or its results.jsonl)")
    ap.add_argument(
        "--pairs", nargs="*", default=[], metavar="A:B", help="paired comparisons of two variants"
    )
    ap.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = ap.parse_args(argv)
    path = args.results / RESULTS_FILE if args.results.is_dir() else args.results
    try:
        table, tv_by = fidelity(load_results(path))
        pairs = []
        for spec in args.pairs:
            a, sep, b = spec.partition(":")
            if not sep:
                raise ValueError(f"--pairs takes A:B, got {spec!r}")
            pairs.append(paired(tv_by, a, b))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(table, pairs)
    print(text, end="")
    if args.out is not None:
        atomic_write_text(
            args.out, f"# Fidelity to the dense model\n\nCommand: `python {' '.join(sys.argv)}`\n\n{text}"
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
