"""One mechanism, several Video-LLM families: the adapters for Qwen3-VL and LLaVA-OneVision (tiny random
models built locally), the registry, and the segmented layout they rely on."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from adaspark import AdaSparkConfig, patch
from adaspark.core.layout import build_layout, build_segmented_layout, grid_cube_ids
from adaspark.integrations.transformers import SUPPORTED_MODEL_TYPES, get_adapter
from adaspark.integrations.transformers.tiny import (
    TINY_IDS,
    build_inputs,
    build_llava_onevision_inputs,
    build_qwen3_vl_inputs,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)

# Qwen3-VL: sample 0 one video, sample 1 two videos (grids in 16-px patches; T temporal slices each)
Q3_GRIDS = [[(4, 8, 12)], [(2, 8, 8), (3, 4, 8)]]
# LLaVA-OneVision: sample 0 one video, sample 1 two; 4 frames of 3 × 3 pooled tokens + 1 newline each
OV_VIDEOS = [1, 2]
OV_FRAMES, OV_SIDE = 4, 3
CUBE = (2, 2, 2)


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3_vl(num_layers=3)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava_onevision(num_layers=2)


def _family(name, qwen3, llava):
    """(model, batch inputs, number of video tokens AdaSpark should cube)."""
    if name == "qwen3_vl":
        inputs = build_qwen3_vl_inputs(Q3_GRIDS, padding_side="left")
        return qwen3, inputs, sum(t * h * w // 4 for g in Q3_GRIDS for (t, h, w) in g)
    inputs = build_llava_onevision_inputs(OV_VIDEOS, num_frames=OV_FRAMES, padding_side="left")
    return llava, inputs, sum(OV_VIDEOS) * OV_FRAMES * OV_SIDE**2


FAMILIES = ["qwen3_vl", "llava_onevision"]


def _valid(inputs):
    return inputs["attention_mask"].bool()


# ---------------------------------------------------------------------------------------------- registry
def test_registry_picks_the_family_adapter(qwen3, llava):
    assert SUPPORTED_MODEL_TYPES == {
        "qwen2_5_vl": "Qwen2.5-VL",
        "qwen2_vl": "Qwen2-VL",
        "qwen3_vl": "Qwen3-VL",
        "llava_onevision": "LLaVA-OneVision",
    }
    models = {
        "Qwen2.5-VL": tiny_qwen2_5_vl(num_layers=1),
        "Qwen2-VL": tiny_qwen2_vl(num_layers=1),
        "Qwen3-VL": qwen3,
        "LLaVA-OneVision": llava,
    }
    for name, model in models.items():
        assert get_adapter(model).name == name
        assert get_adapter(model.model).name == name  # the backbone without the LM head
        assert SUPPORTED_MODEL_TYPES[model.config.model_type] == name


def test_unsupported_models_get_the_supported_list():
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    bert = BertModel(
        BertConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    for model, name in ((llama, "LlamaForCausalLM"), (bert, "BertModel"), (torch.nn.Linear(2, 2), "Linear")):
        with pytest.raises(ValueError) as err:
            patch(model, AdaSparkConfig())
        msg = str(err.value)
        assert f"does not support {name}" in msg and "Supported models:" in msg
        for family in ("Qwen2.5-VL", "Qwen2-VL", "Qwen3-VL", "LLaVA-OneVision"):
            assert family in msg
        assert "LlavaOnevisionForConditionalGeneration" in msg and "Qwen3VLForConditionalGeneration" in msg
    assert not llama.model.layers[0].self_attn._forward_hooks  # nothing was touched


# ---------------------------------------------------------------------------------------------- p = 1
@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_p1_reproduces_dense_logits_and_generate(family, qwen3, llava):
    model, inputs, _ = _family(family, qwen3, llava)
    valid = _valid(inputs)
    ref = model(**inputs).logits
    gen_ref = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    beams_ref = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    with patch(model, AdaSparkConfig(p=1.0, cube=CUBE)) as h:
        out = model(**inputs).logits
        assert h.report().video_tokens > 0  # the layout was captured: this is the sparse path at p = 1
        gen = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        rep = h.report()
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, gen_ref)
    assert torch.equal(beams, beams_ref)
    assert rep.forward_calls == 5
    assert all(lr.attn_density == pytest.approx(1.0) and lr.ffn_active == 1.0 for lr in rep.layers)


@torch.inference_mode()
def test_qwen3_deepstack_reaches_the_language_model(qwen3):
    """The tiny Qwen3-VL really adds DeepStack features in early layers (so the p = 1 test covers it)."""
    inputs = build_qwen3_vl_inputs([Q3_GRIDS[0]])
    seen = []

    def spy(module, args, kwargs):
        seen.append(kwargs.get("deepstack_visual_embeds"))

    hook = qwen3.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with patch(qwen3, AdaSparkConfig(p=0.5, cube=CUBE)):
            qwen3(**inputs)
    finally:
        hook.remove()
    n_video = int((inputs["mm_token_type_ids"] == 2).sum())
    assert len(seen[0]) == len(qwen3.config.vision_config.deepstack_visual_indexes) == 2
    assert all(e.shape[0] == n_video for e in seen[0])


# ---------------------------------------------------------------------------------------------- p < 1
@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_sparse_prefill_and_decode_run_and_report(family, qwen3, llava):
    model, inputs, n_video = _family(family, qwen3, llava)
    valid = _valid(inputs)
    with patch(model, AdaSparkConfig(p=0.5, cube=CUBE)) as h:
        out = model(**inputs).logits
        rep = h.report()
        assert torch.isfinite(out[valid]).all()
        assert rep.video_tokens == n_video == h.layout.num_video_tokens
        assert 0 < rep.layers[0].attn_density < 1 and 0 < rep.layers[0].ffn_active < 1
        assert rep.flops_sparse_ideal < rep.flops_dense and rep.vision_flops > 0 and rep.lm_head_flops > 0
        assert all(k > 0 for k in rep.layers[0].cubes_kept)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        rep_gen = h.report()
        assert h.layout.num_video_tokens == n_video
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4
    assert rep_gen.forward_calls == 4 and rep_gen.tokens == rep.tokens + 3 * gen.shape[0]
    assert rep_gen.layers[0].attn_density < 1
    assert rep_gen.vision_flops == pytest.approx(rep.vision_flops)


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_remove_restores_the_model_exactly(family, qwen3, llava):
    model, inputs, _ = _family(family, qwen3, llava)

    def hooks():  # transformers installs output-capturing hooks of its own (SigLIP layers)
        return [(list(m._forward_hooks), list(m._forward_pre_hooks)) for m in model.modules()]

    ref = model(**inputs).logits
    before = hooks()
    impl = model.config.text_config._attn_implementation
    h = patch(model, AdaSparkConfig(p=0.3, cube=CUBE))
    assert hooks() != before
    assert not torch.allclose(model(**inputs).logits[_valid(inputs)], ref[_valid(inputs)])
    h.remove()
    assert model.config.text_config._attn_implementation == impl
    assert hooks() == before
    for mod in model.modules():
        assert not {"forward", "get_rope_index", "generate"} & set(mod.__dict__)
    assert torch.equal(model(**inputs).logits, ref)


@torch.inference_mode()
def test_qwen3_padding_and_batching_change_nothing(qwen3):
    """Each sample of a left-padded batch gives the logits it gives alone."""
    cfg = AdaSparkConfig(p=0.5, cube=CUBE)
    batch = build_qwen3_vl_inputs(Q3_GRIDS, padding_side="left", seed=1)
    with patch(qwen3, cfg):
        out = qwen3(**batch).logits
        start = 0
        for b, grids in enumerate(Q3_GRIDS):
            cnt = sum(t * h * w for (t, h, w) in grids)
            valid = batch["attention_mask"][b].bool()
            single = {
                k: batch[k][b : b + 1, valid] for k in ("input_ids", "attention_mask", "mm_token_type_ids")
            }
            single["pixel_values_videos"] = batch["pixel_values_videos"][start : start + cnt]
            single["video_grid_thw"] = torch.tensor(grids)
            start += cnt
            torch.testing.assert_close(out[b, valid], qwen3(**single).logits[0], atol=3e-5, rtol=1e-4)


@torch.inference_mode()
def test_llava_padding_and_batching_change_nothing(llava):
    cfg = AdaSparkConfig(p=0.5, cube=CUBE)
    batch = build_llava_onevision_inputs(OV_VIDEOS, num_frames=OV_FRAMES, padding_side="left", seed=1)
    with patch(llava, cfg):
        out = llava(**batch).logits
        start = 0
        for b, count in enumerate(OV_VIDEOS):
            valid = batch["attention_mask"][b].bool()
            single = {k: batch[k][b : b + 1, valid] for k in ("input_ids", "attention_mask")}
            single["pixel_values_videos"] = batch["pixel_values_videos"][start : start + count]
            start += count
            torch.testing.assert_close(out[b, valid], llava(**single).logits[0], atol=3e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- layouts
@torch.inference_mode()
def test_qwen3_images_are_dense_by_default_and_cubed_on_request(qwen3):
    inputs = build_qwen3_vl_inputs([Q3_GRIDS[0]], image_grids=[[(1, 8, 8)]], seed=9)
    ref = qwen3(**inputs).logits
    with patch(qwen3, AdaSparkConfig(p=1.0, cube=CUBE)):
        torch.testing.assert_close(qwen3(**inputs).logits, ref, atol=2e-5, rtol=1e-4)
    with patch(qwen3, AdaSparkConfig(p=0.5, cube=CUBE)) as h:
        qwen3(**inputs)
        plain = h.layout
    with patch(qwen3, AdaSparkConfig(p=0.5, cube=CUBE, images_as_video=True)) as h:
        qwen3(**inputs)
        cubed = h.layout
    image = inputs["mm_token_type_ids"] == 1
    assert (
        int(image.sum()) == 16 and (plain.cube_ids[image] == -1).all() and (cubed.cube_ids[image] >= 0).all()
    )
    assert [s.kind for s in plain.spans] == ["video"] and [s.kind for s in cubed.spans] == ["image", "video"]


@torch.inference_mode()
def test_qwen3_layout_cubes_each_video_across_its_timestamps(qwen3):
    """The captured layout equals Qwen2.5-VL's layout of the same videos without the separators."""
    inputs = build_qwen3_vl_inputs(Q3_GRIDS, padding_side="left", seed=2)
    with patch(qwen3, AdaSparkConfig(p=0.5, cube=CUBE)) as h:
        qwen3(**inputs)
        layout = h.layout
    types = inputs["mm_token_type_ids"]
    ids = layout.cube_ids
    assert ((ids >= 0) == (types == 2)).all()  # timestamps, vision_start/end, padding: non-video
    separators = (inputs["input_ids"] == TINY_IDS["vision_start"]) | (
        inputs["input_ids"] == TINY_IDS["vision_end"]
    )
    assert (ids[separators] == -1).all()
    contiguous = build_inputs(Q3_GRIDS, padding_side="left")  # one run per video (Qwen2.5-VL layout)
    want = build_layout(
        contiguous["mm_token_type_ids"], torch.tensor([g for s in Q3_GRIDS for g in s]), cube=CUBE
    )
    for b in range(len(Q3_GRIDS)):
        assert torch.equal(ids[b][types[b] == 2], want.cube_ids[b][contiguous["mm_token_type_ids"][b] == 2])
    assert [s.grid for s in layout.spans] == [(t, h // 2, w // 2) for g in Q3_GRIDS for (t, h, w) in g]
    # a cube of ct = 2 holds tokens of two slices with timestamp text between them
    first = layout.spans[0]
    hw = first.grid[1] * first.grid[2]
    a, b = int(first.positions[0]), int(first.positions[hw])
    assert ids[0, a] == ids[0, b] and b - a > hw and (types[0, a + hw : b] == 0).any()


@torch.inference_mode()
def test_llava_layout_pooled_frames_and_newline(llava):
    inputs = build_llava_onevision_inputs(OV_VIDEOS, num_frames=OV_FRAMES, padding_side="left", seed=3)
    with patch(llava, AdaSparkConfig(p=0.5, cube=CUBE)) as h:
        llava(**inputs)
        layout = h.layout
    per_frame = OV_SIDE * OV_SIDE
    local = grid_cube_ids(OV_FRAMES, OV_SIDE, OV_SIDE, CUBE)
    for b, count in enumerate(OV_VIDEOS):
        placeholders = (inputs["input_ids"][b] == TINY_IDS["video"]).nonzero().flatten()
        assert placeholders.numel() == count * (OV_FRAMES * per_frame + 1)
        runs = placeholders.split(OV_FRAMES * per_frame + 1)
        for j, run in enumerate(runs):
            body, newline = run[:-1], run[-1]
            assert torch.equal(layout.cube_ids[b, body], local + j * (int(local.max()) + 1))
            assert layout.cube_ids[b, newline] == -1  # the newline embedding is not video content
    text = inputs["input_ids"] != TINY_IDS["video"]
    assert (layout.cube_ids[text] == -1).all()
    assert [s.grid for s in layout.spans] == [(OV_FRAMES, OV_SIDE, OV_SIDE)] * sum(OV_VIDEOS)
    # the frame count of the pre-encoded features (what generate passes), and of the placeholder runs
    # alone, give the same layout
    encoded = llava.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
    without_pixels = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
    with patch(llava, AdaSparkConfig(p=0.5, cube=CUBE)) as h:
        llava(**without_pixels, mm_encoder_outputs={"video": encoded})
        assert torch.equal(h.layout.cube_ids, layout.cube_ids)
        llava(**without_pixels)
        assert torch.equal(h.layout.cube_ids, layout.cube_ids)


@torch.inference_mode()
def test_llava_decoding_selects_like_a_full_prefill(llava):
    """Prefill N tokens + decode token N+1 from the cache == one forward over N+1 tokens (1D RoPE)."""
    cfg = AdaSparkConfig(p=0.5, cube=CUBE)
    inp = build_llava_onevision_inputs([2], num_frames=OV_FRAMES, seed=4)
    nxt = torch.tensor([[123]])
    full = dict(inp)
    full["input_ids"] = torch.cat([inp["input_ids"], nxt], 1)
    full["attention_mask"] = torch.cat([inp["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    with patch(llava, cfg) as h:
        want = llava(**full).logits[0, -1]
        pre = llava(**inp, use_cache=True)
        step = llava(
            input_ids=nxt, attention_mask=full["attention_mask"], past_key_values=pre.past_key_values
        )
        rep = h.report()
    torch.testing.assert_close(step.logits[0, -1], want, atol=3e-5, rtol=1e-4)
    assert rep.forward_calls == 2 and rep.layers[0].attn_density < 1


@torch.inference_mode()
def test_qwen3_decoding_selects_like_a_full_prefill(qwen3):
    cfg = AdaSparkConfig(p=0.5, cube=CUBE)
    inp = build_qwen3_vl_inputs([Q3_GRIDS[1]], seed=5)
    nxt = torch.tensor([[77]])
    full = dict(inp)
    full["input_ids"] = torch.cat([inp["input_ids"], nxt], 1)
    full["attention_mask"] = torch.cat([inp["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    full["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)
    with patch(qwen3, cfg):
        want = qwen3(**full).logits[0, -1]
        pre = qwen3(**inp, use_cache=True)
        pos, _ = qwen3.model.get_rope_index(
            full["input_ids"],
            mm_token_type_ids=full["mm_token_type_ids"],
            video_grid_thw=full["video_grid_thw"],
            attention_mask=full["attention_mask"],
        )
        step = qwen3(
            input_ids=nxt,
            attention_mask=full["attention_mask"],
            past_key_values=pre.past_key_values,
            position_ids=pos[:, :, -1:],
        )
    torch.testing.assert_close(step.logits[0, -1], want, atol=3e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- errors
@torch.inference_mode()
def test_qwen3_bad_layouts_are_clear_errors(qwen3):
    inputs = build_qwen3_vl_inputs([Q3_GRIDS[0]], seed=6)
    with patch(qwen3, AdaSparkConfig(p=0.5, cube=CUBE)):
        # as many patches as the real (4, 8, 12), but slices of 4 × 12 tokens: the slice runs disagree
        # (transformers' own check counts the tokens only)
        with pytest.raises(ValueError, match="grid and token count do not match"):
            qwen3(**dict(inputs, video_grid_thw=torch.tensor([[2, 8, 24]])))
        types = inputs["mm_token_type_ids"].clone()
        ids = inputs["input_ids"].clone()
        video = (types[0] == 2).nonzero().flatten()
        inside, stamp = int(video[5]), int(video[24]) - 2  # a token of slice 0; the timestamp of slice 1
        types[0, inside], ids[0, inside] = 0, 42
        types[0, stamp], ids[0, stamp] = 2, TINY_IDS["video"]  # the token count still matches
        with pytest.raises(ValueError, match="interrupts a temporal slice after 5 tokens"):
            qwen3(**dict(inputs, input_ids=ids, mm_token_type_ids=types))


@torch.inference_mode()
def test_llava_bad_inputs_are_clear_errors(llava):
    inputs = build_llava_onevision_inputs([1], num_frames=OV_FRAMES, seed=7)
    ids = inputs["input_ids"].clone()
    ids[0, int((ids[0] == TINY_IDS["video"]).nonzero()[-1])] = 42  # drop the newline placeholder
    with (
        patch(llava, AdaSparkConfig(p=0.5, cube=CUBE)),
        pytest.raises(ValueError, match="grid and token count do not match"),
    ):
        llava(**dict(inputs, input_ids=ids))
    with pytest.raises(ValueError, match="images_as_video"):
        patch(llava, AdaSparkConfig(images_as_video=True))


@torch.inference_mode()
@pytest.mark.parametrize("family", ["qwen3_vl", "llava_onevision"])
def test_chunked_prefill_runs_sparse(family, qwen3, llava):
    if family == "llava_onevision":
        model, inputs = llava, build_llava_onevision_inputs([1], num_frames=OV_FRAMES, seed=7)
    else:
        model, inputs = qwen3, build_qwen3_vl_inputs([Q3_GRIDS[0]], seed=8)
    kw = dict(max_new_tokens=3, do_sample=False, prefill_chunk_size=16)
    ref = model.generate(**inputs, **kw)
    exact = AdaSparkConfig(p=1.0, cube=CUBE, backend="gather", dense_fallback=None, cost_model=False)
    with patch(model, exact):
        assert torch.equal(model.generate(**inputs, **kw), ref)
    with patch(model, AdaSparkConfig(p=0.5, cube=CUBE)) as h:
        out = model.generate(**inputs, **kw)
        rep = h.report()
    assert out.shape == ref.shape
    assert rep.decode_steps > 2 and rep.sparse_decode_steps == rep.decode_steps
    assert rep.layers[0].attn_density < 1.0


# ---------------------------------------------------------------------------------------------- segmented
def test_segmented_layout_small_cases():
    #                      0  1  2  3  4  5  6  7  8  9
    types = torch.tensor([[0, 2, 2, 0, 0, 2, 2, 0, 2, 2]])
    lay = build_segmented_layout(types, [(2, 1, 2), (1, 1, 2)], cube=(2, 1, 1), slices_may_split=True)
    assert lay.cube_ids.tolist() == [[-1, 0, 1, -1, -1, 0, 1, -1, 2, 3]]
    assert lay.spans[0].positions.tolist() == [1, 2, 5, 6] and lay.spans[1].first_cube == 2
    # trailing placeholder tokens (LLaVA-OneVision's newline) stay non-video
    types = torch.tensor([[0, 2, 2, 2, 2, 2, 0]])
    lay = build_segmented_layout(types, [(2, 1, 2)], cube=(1, 1, 2), video_trailing_tokens=1)
    assert lay.cube_ids.tolist() == [[-1, 0, 0, 1, 1, -1, -1]]
    # padding is never video; left padding shifts nothing
    types = torch.tensor([[2, 2, 0, 2, 2], [0, 2, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    lay = build_segmented_layout(
        types, [(2, 1, 2), (2, 1, 2)], cube=(2, 1, 2), attention_mask=mask, slices_may_split=True
    )
    assert lay.cube_ids.tolist() == [[0, 0, -1, 0, 0], [-1, 0, 0, 0, 0]]


def test_segmented_layout_errors():
    split = torch.tensor([[2, 2, 0, 2, 2]])
    with pytest.raises(ValueError, match="in one run"):
        build_segmented_layout(split, [(2, 1, 2)])  # a split is refused unless slices_may_split
    with pytest.raises(ValueError, match="interrupts a temporal slice"):
        build_segmented_layout(torch.tensor([[2, 0, 2, 2, 2]]), [(2, 1, 2)], slices_may_split=True)
    with pytest.raises(ValueError, match="sample ends after 4"):
        build_segmented_layout(torch.tensor([[2, 2, 0, 2, 2, 0]]), [(3, 1, 2)], slices_may_split=True)
    with pytest.raises(ValueError, match="more video tokens"):
        build_segmented_layout(torch.tensor([[2, 2, 2]]), [(1, 1, 2)])
    with pytest.raises(ValueError, match="describes 2 videos but the sequence holds 1"):
        build_segmented_layout(torch.tensor([[2, 2]]), [(1, 1, 2), (1, 1, 2)])
    with pytest.raises(ValueError, match="interrupted by image tokens"):
        build_segmented_layout(torch.tensor([[2, 2, 1, 2, 2]]), [(2, 1, 2)], slices_may_split=True)
    with pytest.raises(ValueError, match="trailing token"):
        build_segmented_layout(
            torch.tensor([[2, 2, 0, 2]]), [(1, 1, 2)], video_trailing_tokens=1, slices_may_split=True
        )
