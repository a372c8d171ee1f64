"""The one loader: every supported family opens, preprocesses, prompts and runs under AdaSpark,
and every command (ask, eval, analyze, show) accepts a checkpoint of every family."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")

from adaspark import AdaSparkConfig, patch
from adaspark.integrations.transformers import loading
from adaspark.integrations.transformers.tiny import (
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)
from adaspark.needle import VOCABULARY, make_item, render_frames
from adaspark.needle.model import build_tokenizer

FAMILIES = {
    "Qwen2.5-VL": tiny_qwen2_5_vl,
    "Qwen2-VL": tiny_qwen2_vl,
    "Qwen3-VL": tiny_qwen3_vl,
    "LLaVA-OneVision": tiny_llava_onevision,
}


def _save(family: str, path):
    """A tiny random checkpoint of ``family`` with the needle tokenizer (its special token ids)."""
    tok = build_tokenizer(VOCABULARY)
    model = FAMILIES[family](num_layers=2)
    ids = {
        "video_token_id": "<|video_pad|>",
        "image_token_id": "<|image_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    for name, token in ids.items():
        if hasattr(model.config, name):
            setattr(model.config, name, tok.convert_tokens_to_ids(token))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    return request.param, _save(request.param, tmp_path_factory.mktemp("ckpt") / request.param)


@pytest.fixture(scope="module")
def frames():
    return render_frames(make_item("retrieval", 16, 0, split="test"))


@torch.inference_mode()
def test_every_family_loads_prompts_and_runs_sparse(checkpoint, frames):
    family, path = checkpoint
    lm = loading.load_model(path)
    assert lm.family == family and lm.tokenizer is not None and lm.directory == path
    video = lm.preprocess(frames, 2.0)
    inputs = lm.inputs(video, "What shape appeared in the video?")
    ids = inputs["input_ids"]
    vid = lm.model.config.video_token_id
    block, types = lm.adapter.video_block(lm.model, video, lambda text: [])
    assert int((ids == vid).sum()) == block.count(vid) >= video.num_llm_tokens - 1
    assert int((inputs["mm_token_type_ids"] == 2).sum()) == types.count(2)
    dense = lm.model(**inputs).logits
    with patch(lm.model, AdaSparkConfig(p=0.5, cube=(2, 2, 2))) as h:
        sparse = lm.model(**inputs).logits
        rep = h.report()
    assert dense.shape == sparse.shape and torch.isfinite(sparse).all()
    assert rep.video_tokens > 0 and rep.layers[0].attn_density < 1.0


def test_unsupported_and_broken_checkpoints_are_one_line_errors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=64
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported\. Supported models: Qwen2\.5"):
        loading.load_model(tmp_path / "llama")
    with pytest.raises(ValueError, match="not a directory"):
        loading.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        loading.load_model(tmp_path / "empty")


def test_one_reader_of_the_processor_configs(tmp_path):
    """Pixel bounds only from the video config (the image config's are far too large per frame)."""
    img = loading.VideoSettings(min_pixels=1, max_pixels=10**7, patch_size=16).to_processor_json("image")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(img))
    got = loading.read_video_settings(tmp_path)
    assert got.patch_size == 16
    default = loading.VideoSettings()
    assert (got.min_pixels, got.max_pixels) == (default.min_pixels, default.max_pixels)
    loading.write_processor_configs(tmp_path, loading.VideoSettings(min_pixels=784, max_pixels=3136, fps=1.0))
    got = loading.read_video_settings(tmp_path)
    assert (got.min_pixels, got.max_pixels, got.fps, got.patch_size) == (784, 3136, 1.0, 14)
    assert loading.read_video_settings(tmp_path / "none") == loading.VideoSettings()


def _cli(argv):
    from adaspark import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_every_command_accepts_every_family(checkpoint, tmp_path):
    family, path = checkpoint
    pytest.importorskip("matplotlib")
    common = ["--model", str(path), "--no-progress"]
    cube = ["--cube", "2", "2", "2"]
    needle = ["--needle", "retrieval", "--needle-frames", "16"]
    runs = {
        "ask": ["ask", *common, *cube, "--frames", "16", "--repeats", "1"],
        "eval": ["eval", *common, "--lengths", "16", "--n", "1", "--tasks", "retrieval", "--ps", "0.5",
                 "--families", "top_p", "--no-plot", "--out", str(tmp_path / "eval")],
        "analyze": ["analyze", *common, *cube, *needle, "--no-figures", "--out", str(tmp_path / "analyze")],
        "show": ["show", *common, *cube, *needle, "--out", str(tmp_path / "show"), "--frames", "2"],
    }  # fmt: skip
    for name, argv in runs.items():
        code, _, err = _cli(argv)
        assert code == 0, f"{family} {name}: {err}"
    assert json.loads((tmp_path / "analyze" / "analysis.json").read_text())["model"]["type"]
    assert (tmp_path / "show" / "show.json").is_file()
