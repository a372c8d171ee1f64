"""``adaspark show``: the recorded selection equals what AdaSpark reports, and the command renders PNGs
of the documented sizes on a tiny saved model and a short video."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adaspark.config import AdaSparkConfig
from test_analyze import run_cli, write_video

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers not installed"
)
needs_mpl = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed"
)


@needs_hf
def test_capture_selection_refuses_adaptive_cubes():
    """It draws the fixed cube grid: adaptive cubes are refused in one line, never drawn wrongly."""
    from adaspark.integrations.transformers.analysis import capture_selection
    from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl(num_layers=2, hidden_size=64, seed=2)
    inputs = build_inputs([[(4, 8, 8)]], prefix=5, suffix=6)
    with pytest.raises(ValueError, match="cube_mode='adaptive' is not supported here"):
        capture_selection(model, inputs, AdaSparkConfig(p=0.6, cube=(2, 2, 2), cube_mode="adaptive"))


@needs_hf
@pytest.mark.parametrize("granularity", ["token", "cube"])
@pytest.mark.parametrize("query", ["answer", "last", 20])
def test_capture_selection_matches_the_report(query, granularity):
    """Cubes kept and FFN tokens recomputed from the run equal the kernels' own statistics."""
    from adaspark.integrations.transformers.analysis import capture_selection
    from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl(num_layers=3, hidden_size=64, seed=2)
    inputs = build_inputs([[(4, 8, 8)]], prefix=5, suffix=6)  # 64 video tokens at positions 6..69
    cfg = AdaSparkConfig(p=0.6, cube=(2, 2, 2), dense_layers=(1,), granularity=granularity)
    cap = capture_selection(model, inputs, cfg, query=query, layer=2)
    n = inputs["input_ids"].shape[1] + (1 if query == "answer" else 0)
    assert cap.input_ids.numel() == n
    assert cap.query_pos == (20 if query == 20 else n - 1)
    assert (cap.answer_token is not None) == (query == "answer")
    assert cap.sparse_attn_layers == [0, 2] and cap.sparse_ffn_layers == [0, 2]
    rep = cap.report
    for li in (0, 2):
        np.testing.assert_allclose(cap.kept_per_head[li].numpy(), rep.layers[li].cubes_kept, rtol=1e-9)
        video = cap.cube_ids >= 0
        active = float((cap.ffn_active[li] & video).sum() / video.sum())
        assert active == pytest.approx(rep.layers[li].ffn_active)
    assert 1 not in cap.ffn_active and float(cap.kept[1].sum()) == 0  # the dense layer selects nothing
    cand, keep, probs = cap.query_candidates, cap.query_keep, cap.query_probs
    assert bool((keep <= cand[None]).all())  # kept cubes are candidates
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    assert float(probs[:, ~cand].abs().sum()) == 0
    if query == 20:  # a video query: its own cube is no candidate, later cubes are none either
        assert cap.query_cube >= 0 and not bool(cand[cap.query_cube])
    # frequencies: kept never exceed candidates; per-(query, head) kept counts add up
    assert bool((cap.kept <= cap.candidates).all())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers not installed")
    from adaspark.integrations.transformers.tiny import tiny_qwen2_5_vl

    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_qwen2_5_vl(num_layers=2, hidden_size=64, seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    if importlib.util.find_spec("av") is None:
        pytest.skip("PyAV not installed")
    # 12 frames of 112×84 px -> grid (6, 6, 8) patches -> 6·3·4 = 72 video tokens
    return write_video(tmp_path_factory.mktemp("video") / "tiny.mp4", frames=12)


VIDEO_ARGS = ["--num-frames", "12", "--max-pixels", "12544", "--cube", "2", "2", "2", "--no-progress"]


@pytest.fixture(scope="module")
def show_run(model_dir, video, tmp_path_factory):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed")
    out = tmp_path_factory.mktemp("show") / "pictures"
    argv = ["show", "--model", str(model_dir), "--video", str(video), *VIDEO_ARGS, "--out", str(out)]
    code, stdout, stderr = run_cli(argv)
    return code, stdout, stderr, out


@needs_mpl
def test_show_command_renders_the_pictures(show_run):
    from PIL import Image

    from adaspark.viz import frames_figure_size

    code, stdout, stderr, out = show_run
    assert code == 0, stderr
    doc = json.loads((out / "show.json").read_text())
    assert doc["command"] == "show" and doc["video"]["grid_thw"] == [6, 6, 8]
    assert doc["config"]["p"] == 0.5 and doc["config"]["cube"] == [2, 2, 2]
    q = doc["query"]
    assert (
        q["mode"] == "answer" and q["position"] == doc["tokens"] - 1 and q["answer_token_id"] == q["token_id"]
    )
    assert q["layer"] == 1 and q["head"] == 0 and q["own_cube"] == -1
    assert doc["cubes"] == 3 * 2 * 2 and doc["cube_grid"] == [3, 2, 2]
    assert q["candidates"] == doc["cubes"] and 1 <= len(q["kept_cubes"]) <= q["candidates"]
    assert sum(q["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert q["kept_probability_mass"] >= 0.5 - 1e-6  # Top-p keeps at least p of the mass
    for lay in doc["layers"]:
        np.testing.assert_allclose(lay["cubes_kept_per_head"], lay["report_cubes_kept_per_head"], rtol=1e-9)
        assert lay["ffn_active"] == pytest.approx(lay["report_ffn_active"])
    tl = doc["timeline"]
    assert (
        np.array(tl["frequency_text_queries"]).shape
        == (2, 3)
        == np.array(tl["frequency_video_queries"]).shape
    )
    assert tl["slice_start_s"] == pytest.approx([0.0, 1.0, 2.0])  # 4 fps, 2 frames per step, 2 steps a slice
    assert doc["shown_slices"] == [0, 1, 2]
    # 3 panels of 4·28 × 3·28 px frames, 1600 px wide
    want = frames_figure_size(3, 84, 112, 1600)
    assert want[0] == 1600
    for name, size in (("cubes", want), ("ffn", want), ("timeline", (1600, 900))):
        fig = doc["figures"][name]
        with Image.open(out / fig["file"]) as im:
            assert im.format == "PNG"
            assert im.size == size == (fig["width"], fig["height"])
            arr = np.asarray(im.convert("RGB"))
        assert arr.std() > 10  # not a blank canvas
    assert "Wrote" in stdout and not list(out.glob(".*"))


@needs_mpl
def test_show_options(model_dir, video, tmp_path):
    from PIL import Image

    from adaspark.viz import frames_figure_size

    out = tmp_path / "o"
    argv = ["show", "--model", str(model_dir), "--video", str(video), *VIDEO_ARGS, "--out", str(out)]
    extra = ["--query", "last", "--layer", "-1", "--head", "3", "--frames", "2", "--width", "1001"]
    extra += ["--p-attn", "0.3", "--granularity", "token"]
    code, _, stderr = run_cli([*argv, *extra])
    assert code == 0, stderr
    doc = json.loads((out / "show.json").read_text())
    assert doc["query"]["mode"] == "last" and doc["query"]["answer_token_id"] is None
    assert doc["query"]["layer"] == 1 and doc["query"]["head"] == 3
    assert doc["config"]["p_attn"] == 0.3 and doc["config"]["granularity"] == "token"
    assert len(doc["shown_slices"]) == 2
    with Image.open(out / "cubes.png") as im:
        assert im.size == frames_figure_size(2, 84, 112, 1001)
    with Image.open(out / "timeline.png") as im:
        assert im.size == (1001, 900)


@needs_mpl
def test_show_bad_input(model_dir, video, tmp_path):
    base = [
        "show",
        "--model",
        str(model_dir),
        "--video",
        str(video),
        *VIDEO_ARGS,
        "--out",
        str(tmp_path / "o"),
    ]
    cases = [
        (["--layer", "2"], "--layer 2 is out of range"),
        (["--head", "4"], "--head 4 is out of range"),
        (["--p", "0"], "(0, 1]"),
        (["--query", "middle"], "'answer', 'last' or a token position"),
        (["--query", "100000"], "out of range"),
        (["--width", "100"], "--width"),
    ]
    for extra, message in cases:
        code, _, stderr = run_cli([*base, *extra])
        assert code == 2, (extra, stderr)
        assert message in stderr.strip().splitlines()[-1], (extra, stderr)
        assert "Traceback" not in stderr


@needs_mpl
def test_frame_figures_have_the_stated_size(tmp_path):
    from PIL import Image

    from adaspark.viz import frames_figure_size, plot_cube_selection, plot_ffn_skips

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 56, 84, 3), dtype=np.uint8)  # 5 panels -> 2 rows of up to 4
    cube = np.tile(np.arange(6).reshape(2, 3).repeat(1, 0).repeat(1, 1), (5, 1, 1))
    prob = rng.random((5, 2, 3))
    prob[0, 0, 0] = np.nan  # not a candidate
    kw = dict(panel_titles=[f"p{i}" for i in range(5)], cube_hw=(1, 1), title="t", subtitle="s", width=1234)
    size = plot_cube_selection(tmp_path / "c.png", frames, cube, prob, {1, 2}, 4, **kw)
    assert size == frames_figure_size(5, 56, 84, 1234)
    size2 = plot_ffn_skips(tmp_path / "f.png", frames, cube, prob > 0.5, **kw)
    assert size2 == size
    for name in ("c.png", "f.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == size
    w, h = frames_figure_size(5, 56, 84, 1234)
    assert w == 1234 and h > 2 * (1234 / 4) * 56 / 84  # two rows of panels plus header and footer
    with pytest.raises(ValueError, match="too small"):
        frames_figure_size(4, 56, 84, 120)
