"""The paper's claims, read off ``adaspark eval`` results: paired comparisons with standard errors.

Every comparison pairs the two variants' answers on the *same* items (``item_id``), so the standard
error of an accuracy difference is that of the mean of per-item differences,
``sd(d) / sqrt(n)`` with ``d ∈ {-1, 0, 1}`` — much smaller than two independent binomial errors when
the variants mostly agree. A difference is called *resolved* when it exceeds twice its standard
error; otherwise the comparison says plainly that the items cannot tell the variants apart.

Claims (names as in the issue):

* ``a``: for each Top-p variant at each length ≥ ``min_frames`` (and over those lengths), the
  executed decoder FLOPs saved and the accuracy against dense: met when it saves ≥ 60% and its
  accuracy is within 1 point of dense (point estimate; the standard error is reported beside it).
* ``b``: Top-p against top-k and ratio at the same ``p`` (their budgets calibrated to Top-p's
  measured FLOPs by ``adaspark eval --calibrate``): accuracy difference and the decoder FLOPs of both.
* ``c``: Top-p with against without mean compensation.
* ``d`` / ``e`` (two result files: before vs after fine-tuning, token vs cube granularity): every
  variant of one file against the same variant of the other.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from adaspark.needle.evaluate import load_results

__all__ = ["Comparison", "compare", "compare_runs", "markdown", "paper_claims"]


@dataclass(frozen=True)
class Comparison:
    """Variant ``a`` against variant ``b`` on the items both answered."""

    claim: str
    a: str
    b: str
    frames: int | str
    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_a - accuracy_b
    se: float  # paired standard error of the difference
    decoder_saved_a: float
    decoder_saved_b: float
    verdict: str

    @property
    def resolved(self) -> bool:
        return self.se > 0 and abs(self.difference) > 2 * self.se

    def to_dict(self) -> dict:
        return {**asdict(self), "resolved": self.resolved}


def _saved(rows: Sequence[dict]) -> float:
    dense = sum(float(r["decoder_flops_dense"]) for r in rows)
    return 1.0 - sum(float(r["decoder_flops"]) for r in rows) / dense if dense > 0 else 0.0


def _paired(rows_a: Sequence[dict], rows_b: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    by_b = {r["item_id"]: r for r in rows_b}
    pa = [r for r in rows_a if r["item_id"] in by_b]
    return pa, [by_b[r["item_id"]] for r in pa]


def compare(claim: str, rows_a: Sequence[dict], rows_b: Sequence[dict], a: str, b: str, frames) -> Comparison:
    """Paired accuracy difference of ``rows_a`` over ``rows_b`` (rows of one variant each)."""
    pa, pb = _paired(rows_a, rows_b)
    n = len(pa)
    if n == 0:
        raise ValueError(f"{a} and {b} share no items at {frames} frames")
    d = [int(bool(x["correct"])) - int(bool(y["correct"])) for x, y in zip(pa, pb, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n)
    acc_a = sum(bool(r["correct"]) for r in pa) / n
    acc_b = sum(bool(r["correct"]) for r in pb) / n
    if se == 0 and mean == 0:
        verdict = "identical answers"
    elif abs(mean) > 2 * se:
        verdict = f"{a} {'better' if mean > 0 else 'worse'} (beyond 2 SE)"
    else:
        verdict = "not resolved by these items"
    return Comparison(claim, a, b, frames, n, acc_a, acc_b, mean, se, _saved(pa), _saved(pb), verdict)


def _by(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return out


def _lengths(rows: Sequence[dict], min_frames: int) -> list[int | str]:
    lengths = sorted({int(r["num_frames"]) for r in rows if int(r["num_frames"]) >= min_frames})
    return [*lengths, "all"] if len(lengths) > 1 else lengths


def _at(rows: Sequence[dict], frames, min_frames: int) -> list[dict]:
    if frames == "all":
        return [r for r in rows if int(r["num_frames"]) >= min_frames]
    return [r for r in rows if int(r["num_frames"]) == frames]


def paper_claims(results_jsonl: str | os.PathLike, *, min_frames: int = 1024) -> list[Comparison]:
    """Claims a, b, c from one ``results.jsonl`` of ``adaspark eval`` (variants named as
    :func:`adaspark.needle.evaluate.standard_variants` names them)."""
    rows = load_results(results_jsonl)
    variants = _by(rows)
    if "dense" not in variants:
        raise ValueError(f"{results_jsonl}: no dense variant to compare with")
    out = []
    top_p = [v for v in variants if v.startswith("top_p@") and not v.endswith("-nocomp")]
    for frames in _lengths(rows, min_frames):
        dense = _at(variants["dense"], frames, min_frames)
        for v in top_p:
            c = compare("a", _at(variants[v], frames, min_frames), dense, v, "dense", frames)
            met = c.decoder_saved_a >= 0.60 and c.difference >= -0.01
            out.append(
                Comparison(**{**asdict(c), "verdict": ("met" if met else "not met") + f"; {c.verdict}"})
            )
    for frames in _lengths(rows, 0):
        for v in top_p:
            p = v[len("top_p@") :]
            mine = _at(variants[v], frames, 0)
            for other, claim in ((f"top_k@{p}", "b"), (f"ratio@{p}", "b"), (f"top_p@{p}-nocomp", "c")):
                if other in variants:
                    out.append(compare(claim, mine, _at(variants[other], frames, 0), v, other, frames))
    return out


def compare_runs(
    claim: str, results_a: str | os.PathLike, results_b: str | os.PathLike, label_a: str, label_b: str
) -> list[Comparison]:
    """Claims d / e: every variant of run ``a`` against the same variant of run ``b``, per length and
    over all lengths, paired by item."""
    va, vb = _by(load_results(results_a)), _by(load_results(results_b))
    out = []
    for name in va:
        if name not in vb:
            continue
        for frames in _lengths(va[name], 0):
            out.append(
                compare(
                    claim,
                    _at(va[name], frames, 0),
                    _at(vb[name], frames, 0),
                    f"{name} ({label_a})",
                    f"{name} ({label_b})",
                    frames,
                )
            )
    return out


def markdown(comparisons: Sequence[Comparison]) -> str:
    """The comparisons as a Markdown table (accuracies and saved FLOPs in percent)."""
    head = (
        "| claim | A | B | frames | n | acc A | acc B | A − B ± SE | decoder saved A / B | verdict |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {c.claim} | {c.a} | {c.b} | {c.frames} | {c.n} | {c.accuracy_a:.1%} | {c.accuracy_b:.1%} | "
        f"{100 * c.difference:+.1f} ± {100 * c.se:.1f} pt | "
        f"{c.decoder_saved_a:.1%} / {c.decoder_saved_b:.1%} | {c.verdict} |"
        for c in comparisons
    ]
    return head + "\n".join(lines) + "\n"
