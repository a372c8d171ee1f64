"""The evaluation harness: resumable without duplicated or lost rows, correct summaries, variants."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adaspark import AdaSparkConfig
from adaspark.needle import CORE_TASKS, make_split
from adaspark.needle.evaluate import (
    Budget,
    Variant,
    calibrate_budgets,
    load_results,
    run_eval,
    standard_variants,
    summarize,
)


def _cost(config) -> float:
    """A made-up decoder cost model: fraction of dense FLOPs a config spends."""
    if config is None:
        return 1.0
    if config.policy == "top_p":
        return 0.2 + 0.8 * config.p**2
    if config.policy == "ratio":
        return 0.2 + 0.8 * config.ratio
    return 0.2 + 0.4 * min(config.top_k / 32, 1.0) + 0.4 * config.top_k_tokens / 64


class FakeModel:
    """A deterministic answer function; ``kill_after`` raises once that many calls succeeded."""

    def __init__(self, kill_after: int | None = None):
        self.calls: list[tuple[str, str]] = []
        self.kill_after = kill_after

    def __call__(self, item, variant):
        if self.kill_after is not None and len(self.calls) >= self.kill_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append((item.id, variant.name))
        frac = _cost(variant.config)
        good = variant.config is None or variant.config.p >= 0.5 or item.seed % 2 == 0
        return {
            "pred": item.answer if good else (item.answer + 1) % 4,
            "flops": 50.0 + 100.0 * frac,
            "flops_dense": 150.0,
            "decoder_flops": 100.0 * frac,
            "decoder_flops_dense": 100.0,
            "seconds": 0.01,
            "note": f"{variant.name}",
        }


@pytest.fixture(scope="module")
def items():
    return make_split("test", 2, (64, 128), CORE_TASKS, seed=100)  # 12 items


@pytest.fixture(scope="module")
def variants():
    return standard_variants((0.9, 0.3))  # 9 variants


def _keys(rows):
    return [(r["item_id"], r["variant"]) for r in rows]


def test_resume_after_kill_and_torn_line(tmp_path, items, variants):
    total = len(items) * len(variants)
    first = FakeModel(kill_after=20)
    with pytest.raises(KeyboardInterrupt):
        run_eval(items, variants, first, tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    kept = path.read_bytes()
    assert len(load_results(path)) == 20 and kept.endswith(b"\n")
    assert not (tmp_path / "summary.csv").exists()
    # A write cut short by the kill: half a JSON line without its newline.
    with open(path, "ab") as f:
        f.write(b'{"item_id": "test-retrieval-00064f-s100", "variant": "dense", "pr')
    second = FakeModel()
    run_eval(items, variants, second, tmp_path, progress=False)
    rows = load_results(path)
    assert len(rows) == total
    assert len(set(_keys(rows))) == total  # no duplicates
    assert set(_keys(rows)) == {(i.id, v.name) for i in items for v in variants}  # nothing lost
    assert path.read_bytes().startswith(kept)  # rows written before the kill are untouched
    assert path.read_bytes().count(b"\n") == total  # the torn fragment is gone
    assert len(second.calls) == total - 20
    assert set(second.calls).isdisjoint(first.calls)
    # Finished: a third run answers nothing and changes no row.
    before = path.read_bytes()
    third = FakeModel()
    run_eval(items, variants, third, tmp_path, progress=False)
    assert third.calls == [] and path.read_bytes() == before
    for name in ("summary.csv", "summary.md", "accuracy_vs_flops.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_complete_last_line_without_newline_is_recomputed_once(tmp_path, items):
    variants = [Variant("dense", None)]
    run_eval(items[:2], variants, FakeModel(), tmp_path, progress=False, plot=False)
    path = tmp_path / "results.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # the newline of the last row never reached the disk
    fake = FakeModel()
    run_eval(items[:2], variants, fake, tmp_path, progress=False, plot=False)
    assert fake.calls == [(items[1].id, "dense")]
    assert path.read_bytes() == data


def test_real_sigkill(tmp_path):
    """Kill -9 a run in a subprocess mid-way, then resume here."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_needle_evaluate import FakeModel
        from adaspark.needle.evaluate import Variant, run_eval
        from adaspark.needle import CORE_TASKS, make_split

        fake = FakeModel()
        def slow(item, variant):
            time.sleep(0.05)
            return fake(item, variant)

        items = make_split("test", 4, (64,), CORE_TASKS, seed=0)
        run_eval(items, [Variant("dense", None)], slow, {str(tmp_path)!r}, progress=False, plot=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    path = tmp_path / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 3):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(load_results(path))
    assert 3 <= done < 12
    items = make_split("test", 4, (64,), CORE_TASKS, seed=0)
    fake = FakeModel()
    run_eval(items, [Variant("dense", None)], fake, tmp_path, progress=False, plot=False)
    rows = load_results(path)
    assert sorted(_keys(rows)) == sorted((i.id, "dense") for i in items)
    assert len(fake.calls) == 12 - done


def test_rows_and_summary(tmp_path, items, variants):
    run_eval(items, variants, FakeModel(), tmp_path, progress=False, plot=False)
    rows = load_results(tmp_path / "results.jsonl")
    row = rows[0]
    assert row["item_id"] == items[0].id and row["variant"] == "dense" and row["config"] is None
    assert row["correct"] is True and row["note"] == "dense" and row["num_frames"] == items[0].num_frames
    summary = summarize(tmp_path / "results.jsonl")
    by = {(s["variant"], s["num_frames"], s["task"]): s for s in summary}
    dense = by[("dense", "all", "all")]
    assert dense["n"] == len(items) and dense["accuracy"] == 1.0 and dense["flops_saved"] == 0.0
    low = by[("top_p@0.3", "all", "all")]
    assert low["accuracy"] == pytest.approx(0.5)  # FakeModel misses the odd seeds at p < 0.5
    assert low["accuracy_se"] == pytest.approx(math.sqrt(0.25 / len(items)))
    frac = 0.2 + 0.8 * 0.09
    assert low["decoder_flops_saved"] == pytest.approx(1 - frac)
    assert low["flops_saved"] == pytest.approx(1 - (50 + 100 * frac) / 150)
    assert low["policy"] == "top_p" and low["family"] == "top_p"
    assert by[("top_p@0.3-nocomp", "all", "all")]["family"] == "top_p, no mean comp."
    cell = by[("top_p@0.3", 64, "counting")]
    assert cell["n"] == 2
    assert {s["num_frames"] for s in summary} == {64, 128, "all"}
    csv_lines = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(summary) and csv_lines[0].startswith("variant,family,policy,p,")
    md = (tmp_path / "summary.md").read_text()
    assert "| top_p@0.3 | 12 | 50.0% ± 14.4% |" in md
    assert not (tmp_path / "accuracy_vs_flops.png").exists()  # plot=False


def test_mismatches_and_bad_results(tmp_path, items):
    dense = [Variant("dense", None)]
    run_eval(items[:1], [*dense, Variant("v", AdaSparkConfig(p=0.5))], FakeModel(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds variant 'v' with config"):
        run_eval(items[:1], [Variant("v", AdaSparkConfig(p=0.6))], FakeModel(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="duplicate variant name"):
        run_eval(items[:1], dense + dense, FakeModel(), tmp_path / "x", progress=False)

    def bad(item, variant):
        return {"pred": 7, "flops": 1.0}

    with pytest.raises(ValueError, match=r"'pred' = 7 is not an option index"):
        run_eval(items[:1], dense, bad, tmp_path / "bad", progress=False)

    def missing(item, variant):
        return {"pred": 0, "flops": 1.0, "flops_dense": 1.0}

    with pytest.raises(ValueError, match="'decoder_flops' must be a number"):
        run_eval(items[:1], dense, missing, tmp_path / "bad", progress=False)
    assert (tmp_path / "bad" / "results.jsonl").read_bytes() == b""
    # A damaged line in the middle is an error, not something to silently drop.
    path = tmp_path / "results.jsonl"
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b"{broken", *lines[1:]]))
    with pytest.raises(ValueError, match=r"results.jsonl:2: corrupt results line"):
        run_eval(items[:1], dense, FakeModel(), tmp_path, progress=False)


def test_changed_items_are_refused(tmp_path, items):
    dense = [Variant("dense", None)]
    run_eval(items[:1], dense, FakeModel(), tmp_path, progress=False, plot=False)
    rec = json.loads((tmp_path / "results.jsonl").read_text())
    rec["answer"] = (rec["answer"] + 1) % 4
    (tmp_path / "results.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="the items changed"):
        run_eval(items[:1], dense, FakeModel(), tmp_path, progress=False, plot=False)


def test_standard_variants():
    vs = standard_variants((0.9, 0.5))
    names = [v.name for v in vs]
    assert names == [
        "dense",
        "top_p@0.9",
        "top_k@0.9",
        "ratio@0.9",
        "top_p@0.9-nocomp",
        "top_p@0.5",
        "top_k@0.5",
        "ratio@0.5",
        "top_p@0.5-nocomp",
    ]
    by = {v.name: v.config for v in vs}
    assert by["dense"] is None
    assert by["top_p@0.5"].policy == "top_p" and by["top_p@0.5"].p == 0.5
    assert by["ratio@0.5"].policy == "ratio" and by["ratio@0.5"].ratio == pytest.approx(0.25)  # p² prior
    assert by["top_k@0.5"].policy == "top_k"
    assert by["top_k@0.5"].top_k_tokens == 16 and by["top_k@0.5"].top_k == 8  # 0.25 · 64 tokens, · 32 cubes
    assert by["top_p@0.5-nocomp"].mean_compensation is False and by["top_p@0.5"].mean_compensation is True
    measured = standard_variants(
        (0.5,), budgets={0.5: Budget(0.4, 5, 20)}, base=AdaSparkConfig(cube=(2, 4, 4))
    )
    by = {v.name: v.config for v in measured}
    assert by["ratio@0.5"].ratio == 0.4 and (by["top_k@0.5"].top_k, by["top_k@0.5"].top_k_tokens) == (5, 20)
    assert by["top_p@0.5"].cube == (2, 4, 4)
    assert [v.name for v in standard_variants((0.7,), families=("top_p",))] == ["dense", "top_p@0.7"]
    adaptive = standard_variants((0.7,), families=("top_p", "adaptive"), flop_budgets=(0.5,))
    assert [v.name for v in adaptive] == [
        "dense",
        "top_p@0.7",
        "top_p@0.7-adaptive",
        "budget@0.5",
        "budget@0.5-adaptive",
    ]
    by = {v.name: v.config for v in adaptive}
    assert by["top_p@0.7-adaptive"].cube_mode == "adaptive" and by["top_p@0.7"].cube_mode == "fixed"
    assert by["budget@0.5-adaptive"].budget == 0.5 and by["budget@0.5-adaptive"].cube_mode == "adaptive"
    with pytest.raises(ValueError, match=r"every p must be a number in \(0, 1\]"):
        standard_variants((1.5,))
    with pytest.raises(ValueError, match="unknown variant families"):
        standard_variants((0.5,), families=("top_q",))


def test_calibrate_budgets_matches_flops(items):
    fake = FakeModel()
    budgets = calibrate_budgets(items[:2], fake, (0.9, 0.5), iterations=10)
    for p, b in budgets.items():
        target = 0.2 + 0.8 * p**2
        assert 0.2 + 0.8 * b.ratio == pytest.approx(target, abs=0.002)
        got = _cost(AdaSparkConfig(policy="top_k", top_k=b.top_k, top_k_tokens=b.top_k_tokens))
        assert got == pytest.approx(target, abs=0.4 / 32 + 0.4 / 64)  # one cube / one token of resolution
        assert b.source == "calibrated on 2 items"


# --------------------------------------------------------------------------------- shards

_SHARD_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from test_needle_evaluate import FakeModel
from adaspark.core.sharding import parse_shard
from adaspark.needle import CORE_TASKS, make_split
from adaspark.needle.evaluate import run_eval, standard_variants

fake = FakeModel()
def slow(item, variant):
    time.sleep(0.002)
    return fake(item, variant)

shard = None if sys.argv[1] == "all" else parse_shard(sys.argv[1])
items = make_split("test", 2, (64, 128), CORE_TASKS, seed=100)
run_eval(items, standard_variants((0.9, 0.3)), slow, sys.argv[2], progress=False, plot=False, shard=shard)
print(len(fake.calls))
"""


def _run_processes(argvs) -> list[int]:
    """Start one process per argv at once; returns how many answers each computed."""
    script = _SHARD_SCRIPT.format(tests=str(Path(__file__).parent))
    procs = [
        subprocess.Popen([sys.executable, "-c", script, *a], stdout=subprocess.PIPE, text=True) for a in argvs
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs)
    return [int(o.split()[-1]) for o in outs]


def _pairs(path) -> list[tuple[str, str]]:
    return [(r["item_id"], r["variant"]) for r in map(json.loads, Path(path).read_text().splitlines())]


def test_shard_items_cover_the_split(items):
    from adaspark.core.sharding import Shard
    from adaspark.needle.evaluate import shard_items

    parts = [shard_items(items, Shard(k, 3)) for k in range(3)]
    assert sorted(i.id for p in parts for i in p) == sorted(i.id for i in items)  # disjoint, covering
    for p in parts:  # 12 items of 64 and 128 frames: each shard gets 2 of each length
        assert sorted(i.num_frames for i in p) == [64, 64, 128, 128]
    assert shard_items(items, None) == list(items)


def test_concurrent_shards_share_one_out_dir(tmp_path, items, variants):
    """Two shards and a whole-run duplicate write into one results.jsonl at the same time."""
    calls = _run_processes([["0/2", str(tmp_path)], ["1/2", str(tmp_path)], ["all", str(tmp_path)]])
    expected = {(i.id, v.name) for i in items for v in variants}
    pairs = _pairs(tmp_path / "results.jsonl")
    assert len(pairs) == len(set(pairs)) == len(expected) and set(pairs) == expected
    # each shard answered at most its half (less where the whole run was there first)
    assert max(calls[:2]) <= len(expected) // 2 and sum(calls) >= len(expected)
    # the summary was written by the last process to finish, over every row
    overall = [s for s in summarize(tmp_path / "results.jsonl") if s["num_frames"] == s["task"] == "all"]
    assert [s["n"] for s in overall] == [len(items)] * len(variants)
    assert f"| dense | {len(items)} |" in (tmp_path / "summary.md").read_text()
    # a single run elsewhere gives the same rows, item for item
    run_eval(items, variants, FakeModel(), tmp_path / "one", progress=False, plot=False)
    single = {(r["item_id"], r["variant"]): r for r in load_results(tmp_path / "one" / "results.jsonl")}
    shared = load_results(tmp_path / "results.jsonl")
    for r in shared:  # the same rows but for who wrote them
        assert {**r, "shard": None} == single[(r["item_id"], r["variant"])]
    assert {r["shard"] for r in shared} <= {"0/2", "1/2", None} and {r["shard"] for r in single.values()} == {
        None
    }


def test_merge_separate_shard_dirs(tmp_path, items, variants):
    from adaspark.needle.evaluate import merge_results

    dirs = [tmp_path / "s0", tmp_path / "s1"]
    assert sum(_run_processes([["0/2", str(dirs[0])], ["1/2", str(dirs[1])]])) == len(items) * len(variants)
    halves = [set(_pairs(d / "results.jsonl")) for d in dirs]
    assert halves[0].isdisjoint(halves[1]) and halves[0] and halves[1]
    out = tmp_path / "merged"
    assert merge_results(dirs, out, plot=False) == (len(items) * len(variants), 0)
    pairs = _pairs(out / "results.jsonl")
    assert len(pairs) == len(set(pairs)) and set(pairs) == halves[0] | halves[1]
    assert {s["n"] for s in summarize(out / "results.jsonl") if s["num_frames"] == s["task"] == "all"} == {12}
    # idempotent, and the target may be one of the sources
    assert merge_results(dirs, out, plot=False) == (0, len(pairs))
    assert merge_results([dirs[1]], dirs[0], plot=False) == (len(halves[1]), 0)
    assert sorted(_pairs(dirs[0] / "results.jsonl")) == sorted(pairs)
    # results of another run (same variant name, other config) are refused, nothing written
    other = tmp_path / "other"
    run_eval(items[:1], [Variant("top_p@0.9", AdaSparkConfig(p=0.8))], FakeModel(), other, progress=False)
    before = (out / "results.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"cannot merge: variant 'top_p@0\.9' has config"):
        merge_results([*dirs, other], out, plot=False)
    with pytest.raises(ValueError, match=r"holds variant 'top_p@0\.9' with config"):
        merge_results([other], out, plot=False)
    assert (out / "results.jsonl").read_bytes() == before
    with pytest.raises(FileNotFoundError, match=r"holds no results\.jsonl"):
        merge_results([tmp_path / "nowhere"], out)
