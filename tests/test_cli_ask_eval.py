"""Tests of ``adaspark ask`` and ``adaspark eval`` (in-process, the shipped model, short videos)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("av")

from adaspark import cli
from adaspark.commands import eval as eval_command
from adaspark.needle import TASKS

from conftest import ask_prefill, decode_attn_density

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="no matplotlib")
FAST = ["--repeats", "1", "--no-progress"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_clean_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("adaspark: error: "), err
    for needle in needles:
        assert needle in lines[0], err


# --------------------------------------------------------------------------- ask


@pytest.fixture(scope="module")
def needle_video(tmp_path_factory) -> tuple[Path, object]:
    """A generated needle video written to an mp4 file (lossless) and its item."""
    from adaspark.needle import make_item, write_split

    item = make_item("retrieval", 32, 11)
    d = write_split([item], tmp_path_factory.mktemp("split"))
    return d / "videos" / f"{item.id}.mp4", item


def test_ask_on_a_user_video_file(needle_video, tmp_path):
    path, item = needle_video
    out_json = tmp_path / "ask.json"
    code, out, err = run_cli(
        [
            "ask",
            str(path),
            item.question,
            "--options",
            *item.options,
            "--p",
            "0.3",
            "--json",
            str(out_json),
            *FAST,
        ]
    )
    assert code == 0, err
    assert err == ""
    data = json.loads(out_json.read_text())
    assert data["source"] == "file" and data["video"]["frames"] == 32
    assert data["video"]["grid_thw"] == [16, 8, 8] and data["video"]["video_tokens"] == 256
    assert data["question"] == item.question and data["options"] == list(item.options)
    assert data["answer"] is None  # a user video: the right answer is unknown
    assert data["unknown_words"] == []
    d, s = data["dense"], data["adaspark"]
    assert d["flops"] == d["flops_dense"] == s["flops_dense"]
    assert s["decoder_flops"] < d["decoder_flops"]
    assert s["report"]["saved"] == pytest.approx(1 - s["flops"] / s["flops_dense"])
    # the feature is on: well above zero saved, and the option continuations (decode steps after the
    # cache) are in the report and attended sparsely
    rep = s["report"]
    assert rep["saved"] > 0.05 and rep["llm_saved"] > 0.05, (rep["saved"], rep["llm_saved"])
    argv = ["ask", str(path), item.question, "--options", *item.options, "--p", "0.3"]
    prefill, n, steps = ask_prefill(argv)
    assert rep["forward_calls"] == 1 + len(steps) > 1
    assert rep["tokens"] == n + sum(m for _, m in steps)
    decode = decode_attn_density(rep["layers"], prefill["layers"], n, steps)
    assert all(0.0 < d < 1.0 for d in decode), f"decode-step attention density per layer: {decode}"
    # what is printed is what is stored
    saved = 1 - s["flops"] / d["flops"]
    assert f"whole model {saved:.1%}" in out
    for letter, opt in zip("ABCD", item.options, strict=True):
        assert f"{letter}. {opt}" in out
    assert re.search(r"^  dense\s+[A-D]\. ", out, flags=re.M)
    assert re.search(r"^  AdaSpark\s+[A-D]\. ", out, flags=re.M)
    assert "p = 0.3" in out
    # the decoded file gives the same frames as the generator, so the dense answer is the generator's
    from adaspark.needle.model import answer_item, load_model

    assert answer_item(load_model(), item, None)["pred"] == d["pred"]


def test_ask_default_is_a_generated_sample():
    code, out, err = run_cli(["ask", "--frames", "64", "--task", "counting", "--seed", "4", *FAST])
    assert code == 0, err
    assert "generated needle-benchmark video test-counting-00064f-s4" in out
    assert "How many times did the" in out
    assert "(correct answer: " in out
    assert re.search(r"Dense and AdaSpark give (the same|DIFFERENT) answers? \(dense (right|wrong)", out)
    saved = re.search(r"FLOPs saved: whole model (-?[\d.]+)% .*decoder (-?[\d.]+)% ", out)
    assert saved, out
    assert float(saved[1]) > 5.0 and float(saved[2]) > 5.0, saved[0]


def test_demo_is_ask_on_a_sample_and_p_1_matches_dense(tmp_path):
    out_json = tmp_path / "demo.json"
    code, out, err = run_cli(["demo", "--frames", "32", "--p", "1", "--json", str(out_json), *FAST])
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["dense"]["pred"] == data["adaspark"]["pred"]
    assert data["dense"]["option_scores"] == pytest.approx(data["adaspark"]["option_scores"], abs=1e-4)
    assert "the same answer" in out


def test_ask_warns_about_unknown_words(needle_video):
    path, _ = needle_video
    code, out, err = run_cli(["ask", str(path), "Is there a zebra?", "--options", "yes", "no", *FAST])
    assert code == 0, err
    assert "does not know the words" in out and "zebra" in out
    assert "A. yes   B. no" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["ask", "--p", "1.5"], "AdaSparkConfig.p"),
        (["ask", "--cube", "0", "4", "4"], "AdaSparkConfig.cube"),
        (["ask", "--frames", "15"], "--frames"),
        (["ask", "nope.mp4"], "no such file"),
        (["ask", "nope.mp4", "What?"], "--options"),
        (["ask", "--options", "a", "b"], "--options go with a VIDEO"),
        (["ask", "--model", "/no/such/dir"], "--model"),
        (["ask", "--json", "/no/such/dir/x.json"], "does not exist"),
        (["ask", "--sample", "bikes", "--fps", "0"], "--fps"),
    ],
)
def test_ask_bad_input(argv, needle):
    assert_clean_error(*run_cli([*argv, "--no-progress"]), needle)


def test_ask_too_many_options(needle_video):
    path, _ = needle_video
    code, out, err = run_cli(
        ["ask", str(path), "what?", "--options", "1", "2", "3", "4", "5", "--no-progress"]
    )
    assert_clean_error(code, out, err, "2 to 4")


def test_ask_unreadable_video_and_model(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    assert_clean_error(*run_cli(["ask", str(bad), "--no-progress"]), str(bad))
    empty = tmp_path / "model"
    empty.mkdir()
    assert_clean_error(*run_cli(["ask", "--model", str(empty), "--no-progress"]), "cannot load the model")


# --------------------------------------------------------------------------- eval

EVAL_SMALL = ["eval", "--lengths", "32", "--n", "1", "--ps", "0.5", "--no-progress"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


@needs_matplotlib
def test_eval_writes_every_result_file(tmp_path):
    out = tmp_path / "ev"
    code, stdout, err = run_cli([*EVAL_SMALL, "--out", str(out)])
    assert code == 0, err
    rows = _rows(out)
    variants = ["dense", "top_p@0.5", "top_k@0.5", "ratio@0.5", "top_p@0.5-nocomp"]
    assert sorted({r["variant"] for r in rows}) == sorted(variants)
    assert len(rows) == len(TASKS) * len(variants)  # every task x 1 item x 5 variants
    assert {r["task"] for r in rows} == set(TASKS)
    for r in rows:
        assert r["num_frames"] == 32 and r["flops_dense"] > 0 and 0 <= r["pred"] < 4
    for name in ("summary.csv", "summary.md", "accuracy_vs_flops.png", "eval_config.json"):
        assert (out / name).is_file(), name
    assert (out / "accuracy_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| dense |" in stdout and "Wrote " in stdout
    cfg = json.loads((out / "eval_config.json").read_text())
    assert [v["name"] for v in cfg["variants"]] == variants
    # a second run finds everything done: nothing is added
    code, _, err = run_cli([*EVAL_SMALL, "--out", str(out)])
    assert code == 0, err
    assert len(_rows(out)) == len(rows)


def test_eval_resumes_after_interruption(tmp_path, monkeypatch):
    out = tmp_path / "ev"
    argv = [*EVAL_SMALL, "--families", "top_p", "--out", str(out), "--no-plot"]
    real = eval_command.make_answer_fn
    calls = {"n": 0}

    def dying(*args, **kwargs):
        fn = real(*args, **kwargs)

        def answer(item, variant):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt  # a kill in the middle of the run
            return fn(item, variant)

        return answer

    monkeypatch.setattr(eval_command, "make_answer_fn", dying)
    code, _, err = run_cli(argv)
    assert code == 130
    assert "run the same command again to resume" in err
    assert len(_rows(out)) == 3
    # a torn last line (a write cut short by the kill) is discarded, not duplicated
    with open(out / "results.jsonl", "a") as f:
        f.write('{"item_id": "test-ordering-00032f-s1", "vari')
    monkeypatch.setattr(eval_command, "make_answer_fn", real)
    code, _, err = run_cli(argv)
    assert code == 0, err
    rows = _rows(out)
    pairs = [(r["item_id"], r["variant"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == len(TASKS) * 2  # every pair exactly once
    assert (out / "summary.md").is_file() and not (out / "accuracy_vs_flops.png").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "--lengths", "33"], "--lengths"),
        (["eval", "--lengths", "32", "32"], "duplicate"),
        (["eval", "--ps", "0.5", "0.5"], "duplicate"),
        (["eval", "--model", "/no/such/dir"], "--model"),
        (["eval", "--data", "/no/such/dir"], "--data"),
    ],
)
def test_eval_bad_input(argv, needle, tmp_path):
    assert_clean_error(*run_cli([*argv, "--out", str(tmp_path / "o"), "--no-progress"]), needle)


def test_eval_usage_errors():
    code, _, err = run_cli(["eval", "--ps", "1.5"])
    assert code == 2 and "usage: adaspark eval" in err


# --------------------------------------------------------------------------- eval, data parallel

# the exact sparse path (no cost model): the shards run in processes of their own, the single run here
EVAL_TINY = ["eval", "--lengths", "16", "--n", "1", "--ps", "0.5", "--families", "top_p", "--no-plot"]
EVAL_TINY += ["--no-cost-model"]
SAME = ("pred", "correct", "answer", "config", "flops", "flops_dense", "decoder_flops", "decoder_flops_dense")


def _by_pair(rows: list[dict]) -> dict:
    pairs = [(r["item_id"], r["variant"]) for r in rows]
    assert len(pairs) == len(set(pairs)), "a pair was written twice"
    return {(r["item_id"], r["variant"]): {k: r[k] for k in SAME} for r in rows}


def test_eval_two_shard_processes_equal_one_run(tmp_path):
    """Two real processes (``--shard 0/2``, and shard 1/2 from RANK/WORLD_SIZE as torchrun sets them)
    write into one --out; together they give what one process gives, item for item."""
    import os
    import subprocess
    import sys

    shared = tmp_path / "shared"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "adaspark", *EVAL_TINY, "--no-progress", "--out", str(shared)]
    procs = [
        subprocess.Popen([*cmd, "--shard", "0/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        subprocess.Popen(cmd, env={**env, "RANK": "1", "WORLD_SIZE": "2"}, stdout=subprocess.PIPE),
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "shard 0/2: 2 of 4 items" in outs[0][0].decode() and "shard 1/2: 2 of 4" in outs[1][0].decode()
    code, stdout, err = run_cli([*EVAL_TINY, "--no-progress", "--out", str(tmp_path / "one")])
    assert code == 0, err
    single = _by_pair(_rows(tmp_path / "one"))
    assert len(single) == len(TASKS) * 2
    assert _by_pair(_rows(shared)) == single  # nothing lost, nothing twice, the same answers and FLOPs
    assert sorted(r["shard"] for r in _rows(shared)) == ["0/2"] * 4 + ["1/2"] * 4  # each did its part
    assert {r["shard"] for r in _rows(tmp_path / "one")} == {None}
    # the summary of the shared directory covers both shards (the later one wrote it)
    assert "| dense | 4 |" in eval_command._overall_table(shared) and "| dense | 4 |" in stdout

    # --merge: the two shards' rows in two directories, merged into a third
    rows = _rows(shared)
    from adaspark.core.sharding import Shard
    from adaspark.needle import make_split
    from adaspark.needle.evaluate import shard_items

    ids0 = {it.id for it in shard_items(make_split("test", 1, (16,)), Shard(0, 2))}
    for name, part in (
        ("s0", [r for r in rows if r["item_id"] in ids0]),
        ("s1", [r for r in rows if r["item_id"] not in ids0]),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    merged = tmp_path / "merged"
    argv = ["eval", "--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(merged), "--no-plot"]
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    assert (
        _by_pair(_rows(merged)) == single and "8 rows added from 2 directories (0 already present)" in stdout
    )
    assert "| dense | 4 |" in stdout and (merged / "summary.csv").is_file()
    code, stdout, err = run_cli(argv)  # again: nothing added
    assert code == 0 and "0 rows added from 2 directories (8 already present)" in stdout


@pytest.mark.parametrize("shard", ["2/2", "3/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_eval_bad_shard(shard, tmp_path):
    code, out, err = run_cli(["eval", f"--shard={shard}", "--out", str(tmp_path / "o"), "--no-progress"])
    assert_clean_error(code, out, err, "--shard must be i/n with 0 <= i < n", repr(shard))
    assert not (tmp_path / "o").exists()


def test_eval_bad_launcher_environment_and_merge_input(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    o = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert_clean_error(*run_cli(["eval", *o]), "RANK/WORLD_SIZE = 2/2 is not a shard")
    assert_clean_error(*run_cli(["eval", "--merge", str(tmp_path), *o]), "holds no results.jsonl")
    (tmp_path / "results.jsonl").write_text("")
    assert_clean_error(
        *run_cli(["eval", "--merge", str(tmp_path), "--shard", "0/2", *o]), "exclude each other"
    )
