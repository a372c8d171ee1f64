"""Tests of the needle model: tokenizer, prompt layout, save/load, and the shipped trained weights.

The shipped model is small (about 1.3M parameters) and the held-out set is short videos, so the
whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("av")

from adaspark import AdaSparkConfig
from adaspark.needle import CORE_TASKS, VOCABULARY, make_item, make_split, render_frames
from adaspark.needle import model as nm

from conftest import decode_attn_density

SHIPPED = nm.DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return nm.build_tokenizer(VOCABULARY)


def _loaded(model, tokenizer):
    """A model and its tokenizer as the loader would hand them over (the needle model's settings)."""
    from adaspark.integrations.transformers.adapters import get_adapter
    from adaspark.integrations.transformers.loading import LoadedModel

    return LoadedModel(model, tokenizer, get_adapter(model), nm.NEEDLE_VIDEO, "test")


@pytest.fixture(scope="module")
def small(tokenizer):
    """A small untrained needle model (prompt layout and scoring need a model config)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(1)
    cfg = nm.needle_config(tokenizer, hidden_size=32, intermediate_size=64, num_layers=2, vision_hidden=32)
    return _loaded(Qwen2_5_VLForConditionalGeneration(cfg).eval(), tokenizer)


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.fail(f"the shipped model is missing from {SHIPPED}")
    return nm.load_model()


# --------------------------------------------------------------------------- tokenizer and prompt


def test_tokenizer_knows_the_benchmark_vocabulary(tokenizer):
    unk = tokenizer.unk_token_id
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != unk, word
    for tok in nm.SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(tok) == nm.SPECIAL_TOKENS.index(tok)
    # the letters A-D are the (lower-cased) words a-d, distinct from each other
    letters = nm.letter_token_ids(tokenizer)
    assert len(set(letters)) == 4
    assert letters[0] == tokenizer.convert_tokens_to_ids("a")
    # case and spacing do not matter; unknown words become <|unk|>
    a = tokenizer("Which shape appeared first?", add_special_tokens=False)["input_ids"]
    b = tokenizer("which  SHAPE appeared first ?", add_special_tokens=False)["input_ids"]
    assert a == b and unk not in a
    assert tokenizer("zebra", add_special_tokens=False)["input_ids"] == [unk]
    # special tokens are matched whole, never split
    ids = tokenizer("<|vision_start|><|video_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|vision_start|>", "<|video_pad|>", "<|vision_end|>"]


def test_prompt_layout(tokenizer, small):
    item = make_item("ordering", 32, 3, split="val")
    video = nm.preprocess_frames(render_frames(item), item.fps)
    assert video.video_grid_thw.tolist() == [[16, 8, 8]]
    assert video.num_llm_tokens == 16 * 16
    inp = nm.encode_prompt(small, video, item.question, item.options)
    ids, types = inp["input_ids"][0], inp["mm_token_type_ids"][0]
    vid = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((ids == vid).sum()) == video.num_llm_tokens
    assert torch.equal(types == 2, ids == vid)  # the video pads are exactly the video tokens
    toks = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert toks[:3] == ["<|im_start|>", "user", "<|vision_start|>"]
    assert toks[3 + video.num_llm_tokens] == "<|vision_end|>"
    question = toks[4 + video.num_llm_tokens : -3]
    assert question == tokenizer.convert_ids_to_tokens(tokenizer(item.question.lower())["input_ids"])
    assert toks[-3:] == ["<|im_end|>", "<|im_start|>", "assistant"]  # the answer comes next
    assert inp["unknown_words"] == []
    unknown = nm.encode_prompt(small, video, "what is a zebra ?", ["x", "y"])["unknown_words"]
    assert unknown == ["is", "x", "y", "zebra"]
    # the answer of an option: its words, then <|im_end|>
    opts = nm.option_token_ids(tokenizer, ["circle, cross", "red"])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [tokenizer.convert_ids_to_tokens(o) for o in opts] == [
        ["circle", ",", "cross", "<|im_end|>"],
        ["red", "<|im_end|>"],
    ]
    assert opts[1][-1] == end
    with pytest.raises(ValueError, match="options"):
        nm.option_token_ids(tokenizer, ["only one"])
    with pytest.raises(ValueError, match="options"):
        nm.prompt_text("what ?", ["only one"])
    # the lettered form, for letter-answering models and the lmms-eval task
    assert nm.prompt_text("What?", ["x", "y"]) == "What?\nA. x\nB. y\nAnswer with the letter."


def test_option_scores_equal_a_full_forward(tokenizer, small):
    """The KV-cache continuation that scores multi-token options gives the log-probabilities of one
    forward over prompt + option (M-RoPE positions and cache cropping are right), dense and at p = 1."""
    model = small.model
    item = next(it for s in range(40) if (it := make_item("ordering", 32, s)).question.startswith("In which"))
    inp = nm.encode_prompt(small, nm.preprocess_frames(render_frames(item), item.fps), item.question)
    opts = nm.option_token_ids(tokenizer, item.options)
    assert max(len(o) for o in opts) > 2  # multi-word options
    kw = {k: v for k, v in inp.items() if isinstance(v, torch.Tensor)}
    n0 = kw["input_ids"].shape[1]
    want = []
    with torch.inference_mode():
        for ids in opts:
            full = torch.cat([kw["input_ids"], torch.tensor([ids])], 1)
            types = torch.cat([kw["mm_token_type_ids"], torch.zeros(1, len(ids), dtype=torch.long)], 1)
            model.model.rope_deltas = None
            logits = model(
                **{**kw, "input_ids": full, "mm_token_type_ids": types, "attention_mask": None}
            ).logits
            lp = torch.log_softmax(logits[0].float(), -1)
            want.append(float(torch.stack([lp[n0 - 1 + j, t] for j, t in enumerate(ids)]).mean()))
    dense = nm.run_model(model, inp, opts, None)
    assert dense["option_scores"] == pytest.approx(want, abs=1e-3)  # float32 noise of another kernel path
    assert dense["pred"] == max(range(len(want)), key=want.__getitem__)
    exact = nm.run_model(model, inp, opts, AdaSparkConfig(p=1.0))
    assert exact["option_scores"] == pytest.approx(dense["option_scores"], abs=1e-4)
    assert dense["report"].forward_calls == 1 + len(opts)  # the prefill and one continuation per option


def test_video_settings_follow_the_processor_config(tmp_path):
    settings = nm.VideoSettings(min_pixels=784, max_pixels=56 * 56, fps=1.0)
    nm.write_processor_configs(tmp_path, settings)
    got = nm.video_settings(tmp_path)
    assert got == settings
    d = json.loads((tmp_path / "video_preprocessor_config.json").read_text())
    assert d["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert d["size"] == {"longest_edge": 56 * 56, "shortest_edge": 784}
    assert (
        json.loads((tmp_path / "processor_config.json").read_text())["processor_class"]
        == "Qwen2_5_VLProcessor"
    )
    # 112 x 112 frames become 56 x 56: 2 x 2 patches of 28 px per temporal patch
    frames = render_frames(make_item("retrieval", 16, 0))
    assert nm.preprocess_frames(frames, 2.0, got).num_llm_tokens == 8 * 4
    assert nm.video_settings(tmp_path / "nothing-here") == nm.NEEDLE_VIDEO


def test_save_and_load_round_trip(tmp_path, tokenizer):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = nm.needle_config(tokenizer, hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden=32)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    nm.write_processor_configs(tmp_path)
    loaded = nm.load_model(tmp_path)
    assert type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert loaded.family == "Qwen2.5-VL" and loaded.settings == nm.NEEDLE_VIDEO
    assert nm.letter_token_ids(loaded.tokenizer) == nm.letter_token_ids(tokenizer)
    item = make_item("counting", 32, 1)
    a = nm.answer_item(_loaded(model, tokenizer), item, None)
    b = nm.answer_item(loaded, item, None)
    assert a["option_scores"] == pytest.approx(b["option_scores"], abs=1e-5)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        nm.load_model(tmp_path)


# --------------------------------------------------------------------------- the shipped model


def test_shipped_files_are_complete():
    names = {p.name for p in SHIPPED.iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "processor_config.json",
        "training_config.json",
        "README.md",
    ):
        assert name in names, name
    assert (SHIPPED / "model.safetensors").stat().st_size <= 30 * 2**20
    cfg = json.loads((SHIPPED / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    train = json.loads((SHIPPED / "training_config.json").read_text())
    assert train["args"]["seed"] == 0 and train["steps"] > 0 and train["train_seconds"] > 0
    card = (SHIPPED / "README.md").read_text()
    assert "scripts/train_needle_model.py" in card and "accuracy" in card.lower()


@pytest.fixture(scope="module")
def held_out():
    """A fixed small held-out set: test split, 64 frames, 8 items per task the tiny model learnt."""
    return make_split("test", 8, [64], CORE_TASKS, seed=9000)


@pytest.fixture(scope="module")
def dense_answers(shipped, held_out):
    return [nm.answer_item(shipped, it, None) for it in held_out]


def test_shipped_model_beats_chance(held_out, dense_answers):
    correct = [r["pred"] == it.answer for it, r in zip(held_out, dense_answers, strict=True)]
    acc = sum(correct) / len(correct)
    # chance is 25%; with 24 items, 50% is about 2.8 standard deviations above it
    assert acc >= 0.5, f"dense accuracy {acc:.1%} on {len(correct)} held-out items"
    # unconstrained, the model's first answer token is mostly one of the options' first words
    assert sum(r["top_token_in_options"] for r in dense_answers) >= 0.75 * len(dense_answers)


def test_adaspark_at_p_1_gives_identical_answers(shipped, held_out, dense_answers):
    cfg = AdaSparkConfig(p=1.0)
    for it, d in zip(held_out[::3], dense_answers[::3], strict=True):
        s = nm.answer_item(shipped, it, cfg)
        assert s["pred"] == d["pred"]
        assert s["option_scores"] == pytest.approx(d["option_scores"], abs=1e-4)


def test_answer_item_reports_cost(shipped):
    item = make_item("retrieval", 256, 5)
    d = nm.answer_item(shipped, item, None)
    s = nm.answer_item(shipped, item, AdaSparkConfig(p=0.5))
    for r in (d, s):
        assert isinstance(r["pred"], int) and 0 <= r["pred"] < 4
        assert r["seconds"] > 0 and r["video_tokens"] == 256 * 8
        assert sum(r["option_probs"]) == pytest.approx(1.0)
    assert d["flops"] == d["flops_dense"] == s["flops_dense"]
    assert d["decoder_flops"] == d["decoder_flops_dense"] == s["decoder_flops_dense"]
    assert s["decoder_flops"] < s["decoder_flops_dense"]  # AdaSpark skips work
    assert s["flops"] - s["decoder_flops"] == pytest.approx(d["flops"] - d["decoder_flops"])  # vision + head
    assert 0 < s["attn_density"] < 1 and 0 < s["ffn_active"] < 1
    # 256 frames at p = 0.5: well above zero saved, whole model and decoder
    assert 1 - s["flops"] / s["flops_dense"] > 0.05
    assert 1 - s["decoder_flops"] / s["decoder_flops_dense"] > 0.05


def _prefill_and_options(shipped, item, config):
    """The AdaSpark report of the prefill alone, the prompt length and the options' token ids."""
    import adaspark

    model, tok = shipped.model, shipped.tokenizer
    inp = nm.encode_prompt(shipped, nm.preprocess_frames(render_frames(item), item.fps), item.question)
    kw = {k: v for k, v in inp.items() if isinstance(v, torch.Tensor)}
    with torch.inference_mode(), adaspark.patch(model, config) as handle:
        model(**kw, use_cache=True, logits_to_keep=1)
        prefill = handle.report().to_dict()
    return inp, kw, prefill, nm.option_token_ids(tok, item.options)


def test_option_continuations_run_sparse(shipped):
    """``run_model``'s report covers the prefill and every option's continuation after the cache, and
    the continuations (decode steps) attend a strict subset of the causal pairs."""
    item = make_item("ordering", 64, 2)
    config = AdaSparkConfig(p=0.5)
    inp, kw, prefill, opts = _prefill_and_options(shipped, item, config)
    n = int(kw["input_ids"].shape[1])
    rep = nm.run_model(shipped.model, inp, opts, config)["report"]
    steps = [(n, len(ids) - 1) for ids in opts if len(ids) > 1]
    assert rep.forward_calls == 1 + len(steps) > 1
    assert rep.tokens == n + sum(m for _, m in steps)
    assert rep.saved > 0.05 and rep.llm_saved > 0.05, (rep.saved, rep.llm_saved)
    decode = decode_attn_density(rep.to_dict()["layers"], prefill["layers"], n, steps)
    assert all(0.0 < d < 1.0 for d in decode), f"decode-step attention density per layer: {decode}"


def test_generate_decodes_sparse(shipped):
    """``generate``: one report for the prefill and every decode step; the decode steps run sparse."""
    import adaspark

    model = shipped.model
    item = make_item("retrieval", 64, 3)
    config = AdaSparkConfig(p=0.5)
    _, kw, prefill, _ = _prefill_and_options(shipped, item, config)
    n, new = int(kw["input_ids"].shape[1]), 5
    with torch.inference_mode(), adaspark.patch(model, config) as handle:
        out = model.generate(**kw, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        rep = handle.report()
    assert out.shape[1] == n + new
    steps = [(n + i, 1) for i in range(new - 1)]  # the last new token needs no forward
    assert rep.forward_calls == 1 + len(steps)
    assert rep.tokens == n + len(steps)
    assert rep.saved > 0.05 and rep.llm_saved > 0.05, (rep.saved, rep.llm_saved)
    decode = decode_attn_density(rep.to_dict()["layers"], prefill["layers"], n, steps)
    assert all(0.0 < d < 1.0 for d in decode), f"decode-step attention density per layer: {decode}"


def test_model_card_numbers_come_from_the_eval_file():
    ev = json.loads((SHIPPED / "eval.json").read_text())
    card = (SHIPPED / "README.md").read_text()
    assert f"| all | all | {ev['dense']['all']:.1%} | {ev['adaspark']['all']:.1%} | |" in card


def test_shipped_processor_settings():
    s = nm.video_settings()
    assert (s.max_pixels, s.patch_size, s.merge_size, s.temporal_patch_size) == (112 * 112, 14, 2, 2)
    assert Path(nm.DEFAULT_MODEL_DIR).is_dir()
