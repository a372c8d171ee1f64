"""The paper's claims from eval results: paired standard errors and the claim logic."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from adaspark.needle import claims

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "paper_claims.py")


def row(item: str, variant: str, frames: int, correct: bool, decoder: float, dense: float = 100.0) -> dict:
    return {
        "item_id": item,
        "variant": variant,
        "num_frames": frames,
        "task": "retrieval",
        "correct": correct,
        "flops": decoder + 10,
        "flops_dense": dense + 10,
        "decoder_flops": decoder,
        "decoder_flops_dense": dense,
        "seconds": 1.0,
    }


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_paired_se_is_that_of_the_per_item_differences(tmp_path):
    a = [row(f"i{k}", "x", 64, k % 2 == 0, 50) for k in range(10)]  # 5 right
    b = [row(f"i{k}", "y", 64, k < 8, 100) for k in range(10)]  # 8 right
    c = claims.compare("b", a, b, "x", "y", 64)
    d = [int(k % 2 == 0) - int(k < 8) for k in range(10)]
    mean = sum(d) / 10
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 9)
    assert c.n == 10 and c.difference == pytest.approx(-0.3) and c.se == pytest.approx(sd / math.sqrt(10))
    assert c.accuracy_a == 0.5 and c.accuracy_b == 0.8
    assert c.decoder_saved_a == pytest.approx(0.5) and c.decoder_saved_b == pytest.approx(0.0)
    assert c.resolved is (abs(c.difference) > 2 * c.se)
    same = claims.compare("c", a, a, "x", "x", 64)
    assert same.se == 0 and same.difference == 0 and same.verdict == "identical answers"
    with pytest.raises(ValueError, match="share no items"):
        claims.compare("b", a, [row("other", "y", 64, True, 1)], "x", "y", 64)


def test_only_shared_items_are_paired(tmp_path):
    a = [row("i0", "x", 64, True, 50), row("i1", "x", 64, True, 50)]
    b = [row("i1", "y", 64, False, 100), row("i2", "y", 64, False, 100)]
    c = claims.compare("b", a, b, "x", "y", 64)
    assert c.n == 1 and c.difference == 1.0


def test_claims_from_one_run(tmp_path):
    rows = []
    for k in range(40):
        for frames in (256, 1024):
            right = k % 5 != 0  # dense 80%
            rows.append(row(f"{frames}-{k}", "dense", frames, right, 100))
            rows.append(row(f"{frames}-{k}", "top_p@0.5", frames, right, 35))  # same answers, 65% saved
            rows.append(row(f"{frames}-{k}", "top_k@0.5", frames, right and k % 2 == 0, 35))
            rows.append(row(f"{frames}-{k}", "top_p@0.5-nocomp", frames, k % 5 > 1, 36))
    path = write(tmp_path / "results.jsonl", rows)
    out = claims.paper_claims(path, min_frames=1024)
    a = [c for c in out if c.claim == "a"]
    assert [(c.a, c.frames) for c in a] == [("top_p@0.5", 1024)]
    assert a[0].verdict.startswith("met") and a[0].decoder_saved_a == pytest.approx(0.65)
    b = [c for c in out if c.claim == "b"]
    assert {c.b for c in b} == {"top_k@0.5"} and {c.frames for c in b} == {256, 1024, "all"}
    b_all = next(c for c in b if c.frames == "all")
    assert b_all.difference > 2 * b_all.se and "better" in b_all.verdict
    c_all = next(c for c in out if c.claim == "c" and c.frames == "all")
    assert c_all.n == 80 and c_all.difference == pytest.approx(0.8 - 0.6)
    table = claims.markdown(out)
    assert table.count("\n") == len(out) + 2 and "± " in table


def test_claim_a_not_met_when_accuracy_drops(tmp_path):
    rows = []
    for k in range(20):
        rows.append(row(f"i{k}", "dense", 1024, True, 100))
        rows.append(row(f"i{k}", "top_p@0.3", 1024, k % 4 != 0, 20))
    out = claims.paper_claims(write(tmp_path / "r.jsonl", rows), min_frames=1024)
    assert out[0].verdict.startswith("not met")
    with pytest.raises(ValueError, match="no dense"):
        claims.paper_claims(write(tmp_path / "nodense.jsonl", rows[1::2]))


def test_two_runs_and_the_script(tmp_path):
    before = write(tmp_path / "before.jsonl", [row(f"i{k}", "top_p@0.5", 512, k < 3, 40) for k in range(6)])
    after = write(tmp_path / "after.jsonl", [row(f"i{k}", "top_p@0.5", 512, k < 5, 40) for k in range(6)])
    (d,) = claims.compare_runs("d", after, before, "fine-tuned", "before")
    assert d.difference == pytest.approx(2 / 6) and d.a == "top_p@0.5 (fine-tuned)"
    dense = write(
        tmp_path / "main.jsonl",
        [
            row(f"i{k}", v, 512, k < 5, 40 if v != "dense" else 100)
            for k in range(6)
            for v in ("dense", "top_p@0.5")
        ],
    )
    out_md = tmp_path / "claims.md"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--results", str(dense), "--min-frames", "512", "--before", str(before),
         "--out", str(out_md)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| a | top_p@0.5 | dense | 512 |" in proc.stdout and "| d |" in proc.stdout
    assert out_md.read_text().startswith("# The paper's claims")
    bad = subprocess.run(
        [sys.executable, SCRIPT, "--results", str(tmp_path / "none.jsonl")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "none.jsonl" in bad.stderr
