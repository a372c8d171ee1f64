"""AdaSpark inside Hugging Face Qwen2.5-VL / Qwen2-VL (tiny random models built locally)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import adaspark
from adaspark import AdaSparkConfig, patch
from adaspark.core.accounting import layer_flops
from adaspark.integrations.transformers import patching as q2
from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl, tiny_qwen2_vl
from adaspark.ops import AttentionStats, reference_attention_mask
from adaspark.ops.ffn import select_ffn_tokens_reference

# sample 0: one video; sample 1: two videos (different sizes) -> left padding on sample 0
GRIDS = [[(4, 8, 12)], [(2, 8, 8), (4, 4, 8)]]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl(num_layers=3)


@pytest.fixture(scope="module")
def inputs():
    return build_inputs(GRIDS, padding_side="left")


def _valid(inputs):
    return inputs["attention_mask"].bool()


#: p = 1 through each sparse kernel (a forced backend: not the dense short cut ``auto`` takes at p = 1)
P1_BACKENDS = [
    AdaSparkConfig(p=1.0),
    AdaSparkConfig(p=1.0, backend="reference"),
    AdaSparkConfig(p=1.0, backend="gather", dense_fallback=None, cost_model=False),
    AdaSparkConfig(p=1.0, backend="flex", dense_fallback=None, cost_model=False),
    AdaSparkConfig(p=1.0, backend="blocked", granularity="token"),
    AdaSparkConfig(p=1.0, backend="reference", granularity="token"),
]


@torch.inference_mode()
@pytest.mark.parametrize("cfg", P1_BACKENDS, ids=lambda c: f"{c.backend}-{c.granularity}")
def test_p1_reproduces_dense_logits_and_generate(model, inputs, cfg):
    ref = model(**inputs).logits
    gen_ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with patch(model, cfg) as h:
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        rep = h.report()
    valid = _valid(inputs)
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, gen_ref)
    assert all(lr.attn_density == pytest.approx(1.0) for lr in rep.layers)
    assert all(lr.ffn_active == 1.0 for lr in rep.layers)
    assert rep.forward_calls == 6  # prefill + 5 decode steps


@torch.inference_mode()
def test_sparse_prefill_and_decode_run_and_report(model, inputs):
    with patch(model, AdaSparkConfig(p=0.5, cube=(2, 2, 2))) as h:
        out = model(**inputs).logits
        rep = h.report()
        assert torch.isfinite(out[_valid(inputs)]).all()
        assert 0 < rep.layers[0].attn_density < 1 and 0 < rep.layers[0].ffn_active < 1
        assert rep.flops_sparse_ideal < rep.flops_dense
        assert rep.vision_flops > 0 and rep.lm_head_flops > 0
        assert rep.flops_dense == pytest.approx(rep.llm_flops_dense + rep.vision_flops + rep.lm_head_flops)
        assert rep.video_tokens == sum(t * h_ * w // 4 for g in GRIDS for (t, h_, w) in g)
        assert len(rep.layers[0].entropy) == model.config.text_config.num_attention_heads
        assert all(k > 0 for k in rep.layers[0].cubes_kept)
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        rep_gen = h.report()
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4
    assert rep_gen.forward_calls == 4 and rep_gen.tokens == rep.tokens + 3 * gen.shape[0]
    assert rep_gen.vision_flops == pytest.approx(rep.vision_flops)  # generate pre-encodes the video


@torch.inference_mode()
def test_remove_restores_the_model_exactly(model, inputs):
    keys = list(model.state_dict().keys())
    ref = model(**inputs).logits
    impl = model.config.text_config._attn_implementation
    h = patch(model, AdaSparkConfig(p=0.3))
    assert list(model.state_dict().keys()) == keys
    assert not torch.allclose(model(**inputs).logits[_valid(inputs)], ref[_valid(inputs)])
    h.remove()
    h.remove()  # idempotent
    assert model.config.text_config._attn_implementation == impl
    assert list(model.state_dict().keys()) == keys
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
        assert not {"forward", "get_rope_index", "generate"} & set(mod.__dict__)
    assert torch.equal(model(**inputs).logits, ref)
    with pytest.raises(RuntimeError, match="removed"):
        h.report()


@torch.inference_mode()
def test_patching_twice_equals_patching_once(model, inputs):
    h1 = patch(model, AdaSparkConfig(p=0.9))
    h2 = patch(model, AdaSparkConfig(p=0.4))
    assert not h1.active and h2.active
    twice = model(**inputs).logits
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    h2.remove()
    with patch(model, AdaSparkConfig(p=0.4)):
        once = model(**inputs).logits
        assert n_hooks == sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert torch.equal(twice, once)


@torch.inference_mode()
def test_padding_and_batching_change_nothing(model):
    """Each sample of a left-padded batch gives the logits it gives alone (cube ids are per sample)."""
    cfg = AdaSparkConfig(p=0.5, cube=(2, 2, 2))
    batch = build_inputs(GRIDS, padding_side="left", seed=1)
    with patch(model, cfg):
        out = model(**batch).logits
        n = batch["input_ids"].shape[1]
        patches = [t * h * w for g in GRIDS for (t, h, w) in g]
        start = 0
        for b, grids in enumerate(GRIDS):
            cnt = sum(t * h * w for (t, h, w) in grids)
            pix = batch["pixel_values_videos"][start : start + cnt]
            start += cnt
            valid = batch["attention_mask"][b].bool()
            single = {
                "input_ids": batch["input_ids"][b : b + 1, valid],
                "attention_mask": batch["attention_mask"][b : b + 1, valid],
                "mm_token_type_ids": batch["mm_token_type_ids"][b : b + 1, valid],
                "pixel_values_videos": pix,
                "video_grid_thw": torch.tensor(grids),
            }
            alone = model(**single).logits[0]
            torch.testing.assert_close(out[b, valid], alone, atol=3e-5, rtol=1e-4)
        assert len(patches) == 3 and n > 0


@torch.inference_mode()
def test_right_padding_is_supported(model):
    batch = build_inputs(GRIDS, padding_side="right", seed=2)
    ref = model(**batch).logits
    with patch(model, AdaSparkConfig(p=1.0)):
        out = model(**batch).logits
    valid = _valid(batch)
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)


@torch.inference_mode()
def test_decoding_selects_like_a_full_prefill(model):
    """Prefill N tokens + decode token N+1 from the cache == one forward over N+1 tokens."""
    cfg = AdaSparkConfig(p=0.5, cube=(2, 2, 2))
    inp = build_inputs([GRIDS[1]], seed=3)
    nxt = torch.tensor([[123]])
    full = {**inp}
    full["input_ids"] = torch.cat([inp["input_ids"], nxt], 1)
    full["attention_mask"] = torch.cat([inp["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    full["mm_token_type_ids"] = torch.cat([inp["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)
    with patch(model, cfg) as h:
        want = model(**full).logits[0, -1]
        pre = model(**inp, use_cache=True)
        # the M-RoPE position the full forward gives the extra token (generate() would use
        # max(position) + 1, which can differ when video positions run past the text's)
        pos, _ = model.model.get_rope_index(
            full["input_ids"],
            mm_token_type_ids=full["mm_token_type_ids"],
            video_grid_thw=full["video_grid_thw"],
            attention_mask=full["attention_mask"],
        )
        pos = pos[:, :, -1:]
        step = model(
            input_ids=nxt,
            attention_mask=full["attention_mask"],
            past_key_values=pre.past_key_values,
            position_ids=pos,
            use_cache=True,
        )
        rep = h.report()
    torch.testing.assert_close(step.logits[0, -1], want, atol=3e-5, rtol=1e-4)
    assert rep.forward_calls == 2


@torch.inference_mode()
def test_report_equals_brute_force_counts(model, inputs, monkeypatch):
    """Per-layer density and FLOPs equal counts made from the reference masks of the same inputs."""
    cfg = AdaSparkConfig(p=0.6, cube=(2, 2, 2), dense_fallback=None, cost_model=False)
    seen_attn, seen_ffn = [], []
    real_attn, real_ffn = q2.cube_sparse_attention, q2.cube_sparse_ffn

    def spy_attn(q, k, v, cube_ids, p=0.9, **kw):
        seen_attn.append((q, k, cube_ids, kw))
        return real_attn(q, k, v, cube_ids, p, **kw)

    def spy_ffn(x, f, cube_ids, p=0.9, **kw):
        seen_ffn.append((cube_ids, kw["scores"], kw["policy"]))
        return real_ffn(x, f, cube_ids, p, **kw)

    monkeypatch.setattr(q2, "cube_sparse_attention", spy_attn)
    monkeypatch.setattr(q2, "cube_sparse_ffn", spy_ffn)
    with patch(model, cfg) as h:
        model(**inputs)
        rep = h.report()
        dims = h._state.dims
    n_layers = model.config.text_config.num_hidden_layers
    assert len(seen_attn) == n_layers and len(seen_ffn) == n_layers
    km = _valid(inputs)
    nq = km.shape[1]
    causal = torch.ones(nq, nq, dtype=torch.bool).tril()
    valid_pairs = int((causal[None] & km[:, None, :] & km[:, :, None]).sum())
    for i, ((q, k, ids, kw), (fids, scores, fpol)) in enumerate(zip(seen_attn, seen_ffn, strict=True)):
        mask = reference_attention_mask(
            q, k, ids, policy=kw["policy"], scale=kw["scale"], key_mask=km, granularity=kw["granularity"]
        )
        attended = mask.sum(dim=(0, 2, 3)).double()
        lr = rep.layers[i]
        assert lr.attn_density == pytest.approx(attended.sum().item() / (valid_pairs * q.shape[1]))
        active = select_ffn_tokens_reference(scores, fids, fpol)
        video = fids >= 0
        assert lr.ffn_active == pytest.approx((active & video).sum().item() / video.sum().item())
        # FLOPs from brute-force counts with the documented formula
        st = AttentionStats(q.shape[1], q.shape[3], k.shape[1])
        st.causal_pairs = valid_pairs
        st.attended = attended
        st.executed = h_exec = round(lr.attn_density_executed * valid_pairs * q.shape[1])
        st.mean_key_tokens = int(video.sum())
        keep_stats = AttentionStats(q.shape[1], q.shape[3])
        reference_attention_mask(
            q,
            k,
            ids,
            policy=kw["policy"],
            scale=kw["scale"],
            key_mask=km,
            stats=keep_stats,
            granularity=kw["granularity"],
        )
        st.selections, st.candidates_sum = keep_stats.selections, keep_stats.candidates_sum
        ffn_st = q2.FFNStats(
            tokens=fids.numel(),
            video_tokens=int(video.sum()),
            active_video=int((active & video).sum()),
            ffn_rows=int(active.sum()),
            compensated=int((video & ~active).sum()),
        )
        fd, fs, fi, _ = layer_flops(dims, q.shape[0] * nq, st, ffn_st, sparse=True)
        assert lr.flops_dense == pytest.approx(fd)
        assert lr.flops_sparse_ideal == pytest.approx(fi)
        assert lr.flops_sparse == pytest.approx(fs)
        assert h_exec >= attended.sum().item()
    assert rep.flops_sparse == pytest.approx(
        sum(lr.flops_sparse for lr in rep.layers) + rep.vision_flops + rep.lm_head_flops
    )


@torch.inference_mode()
def test_dense_layers_and_module_switches(model, inputs):
    with patch(model, AdaSparkConfig(p=0.3, cube=(2, 2, 2), dense_layers=(0, -1))) as h:
        model(**inputs)
        rep = h.report()
    assert rep.layers[0].dense and rep.layers[2].dense and not rep.layers[1].dense
    assert rep.layers[0].attn_density == pytest.approx(1.0) and rep.layers[0].ffn_active == 1.0
    assert rep.layers[1].attn_density < 1
    with patch(model, AdaSparkConfig(p=0.3, cube=(2, 2, 2), sparse_ffn=False)) as h:
        model(**inputs)
        assert all(lr.ffn_active == 1.0 for lr in h.report().layers)
    with patch(model, AdaSparkConfig(p=0.3, cube=(2, 2, 2), sparse_attn=False)) as h:
        model(**inputs)
        rep = h.report()
        assert all(lr.attn_density == pytest.approx(1.0) for lr in rep.layers)
        assert rep.layers[1].ffn_active < 1


@torch.inference_mode()
@pytest.mark.parametrize(
    "granularity, backends",
    [("token", ("reference", "blocked", "gather")), ("cube", ("reference", "gather", "flex"))],
)
def test_reference_backend_matches_fast_paths_in_the_model(model, inputs, granularity, backends):
    valid = _valid(inputs)
    outs = []
    for backend in backends:
        cfg = AdaSparkConfig(p=0.5, cube=(2, 2, 2), backend=backend, granularity=granularity)
        with patch(model, cfg):
            outs.append(model(**inputs).logits[valid])
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=3e-5, rtol=1e-4)


@torch.inference_mode()
def test_qwen2_vl_is_supported():
    m = tiny_qwen2_vl(num_layers=2)
    inp = build_inputs([[(4, 8, 8)], [(2, 8, 16)]])
    ref = m(**inp).logits
    gen_ref = m.generate(**inp, max_new_tokens=4, do_sample=False)
    valid = _valid(inp)
    with patch(m, AdaSparkConfig(p=1.0)):
        torch.testing.assert_close(m(**inp).logits[valid], ref[valid], atol=2e-5, rtol=1e-4)
        assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False), gen_ref)
    with patch(m, AdaSparkConfig(p=0.4, cube=(2, 2, 2))) as h:
        m.generate(**inp, max_new_tokens=3, do_sample=False)
        assert h.report().layers[0].attn_density < 1


@torch.inference_mode()
def test_bf16_model_runs_sparse():
    m = tiny_qwen2_5_vl(num_layers=2, dtype=torch.bfloat16)
    inp = build_inputs([[(4, 8, 12)]])
    inp["pixel_values_videos"] = inp["pixel_values_videos"].bfloat16()
    with patch(m, AdaSparkConfig(p=0.5, cube=(2, 2, 2))) as h:
        out = m(**inp).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        assert h.report().saved_ideal > 0


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match=r"Supported models: Qwen2\.5-VL"):
        patch(torch.nn.Linear(2, 2), AdaSparkConfig())
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(ValueError, match="model_type 'llama'"):
        patch(llama)


def test_invalid_config_and_dense_layers(model):
    with pytest.raises(ValueError, match="config must be an AdaSparkConfig"):
        patch(model, {"p": 0.5})
    with pytest.raises(ValueError, match="dense_layers"):
        patch(model, AdaSparkConfig(dense_layers=(7,)))


@torch.inference_mode()
def test_grid_token_mismatch_is_a_clear_error(model, inputs):
    """Token types that disagree with video_grid_thw get our message, not a shape error from M-RoPE."""
    bad = dict(inputs)
    types = inputs["mm_token_type_ids"].clone()
    first_video = int((types[0] == 2).nonzero()[5])
    types[0, first_video] = 0  # one video token too few in sample 0
    bad["mm_token_type_ids"] = types
    with (
        patch(model, AdaSparkConfig(p=0.5)),
        pytest.raises(ValueError, match="grid and token count do not match"),
    ):
        model(**bad)


@torch.inference_mode()
def test_missing_layout_is_a_clear_error(model, inputs):
    """Video tokens whose M-RoPE index was never computed (no grid, no token types) are refused."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with patch(model, AdaSparkConfig(p=0.5)), pytest.raises(ValueError, match="mm_token_type_ids"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert embeds.shape[0] == 2


def test_import_does_not_pull_transformers():
    import subprocess
    import sys

    code = "import adaspark, adaspark.ops, sys; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert adaspark.__version__


@torch.inference_mode()
def test_images_are_dense_by_default_and_cubed_on_request(model):
    inp = build_inputs(GRIDS, image_grids=[[(1, 8, 8)], []], seed=4)
    ref = model(**inp).logits
    valid = _valid(inp)
    with patch(model, AdaSparkConfig(p=1.0)):
        torch.testing.assert_close(model(**inp).logits[valid], ref[valid], atol=2e-5, rtol=1e-4)
    with patch(model, AdaSparkConfig(p=0.5, cube=(2, 2, 2))) as h:
        model(**inp)
        plain = h.layout
        assert plain.num_video_tokens == h.report().video_tokens
    with patch(model, AdaSparkConfig(p=0.5, cube=(2, 2, 2), images_as_video=True)) as h:
        model(**inp)
        cubed = h.layout
    image_tokens = int((inp["mm_token_type_ids"] == 1).sum())
    assert image_tokens == 16
    assert cubed.num_video_tokens == plain.num_video_tokens + image_tokens
    assert all(s.kind == "video" for s in plain.spans) and any(s.kind == "image" for s in cubed.spans)


def test_training_backward_with_sparsity_on(model, inputs):
    """Fine-tuning with AdaSpark on: the loss backpropagates through kept tokens and the compensation."""
    model.train()
    try:
        with patch(model, AdaSparkConfig(p=0.5, cube=(2, 2, 2))):
            labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
            loss = model(**inputs, labels=labels).loss
            loss.backward()
        mlp = model.model.language_model.layers[1].mlp
        assert torch.isfinite(loss) and mlp.up_proj.weight.grad is not None
        assert mlp.up_proj.weight.grad.abs().sum() > 0
        assert model.model.language_model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@torch.inference_mode()
def test_generate_with_batch_expansion(model):
    """num_return_sequences / beams expand the batch after the M-RoPE index is computed."""
    inp = build_inputs([GRIDS[0]], seed=5)
    for kw in ({"num_beams": 2, "do_sample": False}, {"num_return_sequences": 2, "do_sample": True}):
        torch.manual_seed(0)
        ref = model.generate(**inp, max_new_tokens=3, **kw)
        with patch(model, AdaSparkConfig(p=1.0)):
            torch.manual_seed(0)
            assert torch.equal(model.generate(**inp, max_new_tokens=3, **kw), ref)
        with patch(model, AdaSparkConfig(p=0.5, cube=(2, 2, 2))) as h:
            out = model.generate(**inp, max_new_tokens=3, **kw)
            assert out.shape[0] == kw.get("num_return_sequences", 1)
            assert h.report().layers[0].attn_density < 1


@torch.inference_mode()
def test_generate_without_cache_matches_cached_decoding(model, inputs):
    """Without a cache every step re-runs the prompt; the layout is extended, the tokens agree."""
    with patch(model, AdaSparkConfig(p=0.5, cube=(2, 2, 2))) as h:
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
        rep = h.report()
    assert torch.equal(cached, uncached)
    assert rep.forward_calls == 4 and rep.layers[0].attn_density < 1


@torch.inference_mode()
def test_a_cache_keeps_its_own_layout(model):
    """Continuing sequence A from its cache after a request B uses A's layout and mean keys."""
    cfg = AdaSparkConfig(p=0.4, cube=(2, 2, 2))
    a = build_inputs([GRIDS[0]], seed=11)
    b = build_inputs([[(2, 8, 8)]], prefix=40, seed=12)
    nxt = torch.tensor([[77]])
    with patch(model, cfg):
        pre = model(**a, use_cache=True)
        deltas = model.model.rope_deltas.clone()
        model(**b, use_cache=True)  # another request in between
        model.model.rope_deltas = deltas  # transformers keeps M-RoPE deltas on the model
        full = dict(a)
        full["input_ids"] = torch.cat([a["input_ids"], nxt], 1)
        full["attention_mask"] = torch.cat([a["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
        full["mm_token_type_ids"] = torch.cat(
            [a["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1
        )
        pos, _ = model.model.get_rope_index(
            full["input_ids"],
            mm_token_type_ids=full["mm_token_type_ids"],
            video_grid_thw=full["video_grid_thw"],
            attention_mask=full["attention_mask"],
        )
        step = model(
            input_ids=nxt,
            attention_mask=full["attention_mask"],
            past_key_values=pre.past_key_values,
            position_ids=pos[:, :, -1:],
        )
        want = model(**full).logits[0, -1]
    torch.testing.assert_close(step.logits[0, -1], want, atol=3e-5, rtol=1e-4)


@torch.inference_mode()
def test_a_foreign_cache_fails_clearly(model, inputs):
    from transformers import DynamicCache

    with patch(model, AdaSparkConfig(p=0.5)):
        foreign = DynamicCache()
        k = torch.zeros(2, 2, 5, 16)
        for i in range(model.config.text_config.num_hidden_layers):
            foreign.update(k, k, i)
        with pytest.raises(ValueError, match="that no forward of this patched model filled"):
            model(input_ids=inputs["input_ids"][:, :1], past_key_values=foreign)


@torch.inference_mode()
def test_the_handle_returns_the_selections_the_kernels_used(model, inputs):
    cfg = AdaSparkConfig(p=0.5, cube=(2, 2, 2), dense_layers=(0,))
    with patch(model, cfg) as h:
        model(**inputs)
        assert all(not v for v in h.selections().values())  # off by default
        h.record_selections()
        model(**inputs)
        got = h.selections()
        assert got[0] == [] and len(got[1]) == len(got[2]) == 1
        layout = h.layout
        sel = got[1][0]
        kept = sel.kept_cubes(layout.cube_ids)
        assert kept.dtype == torch.bool and kept.shape[1] == model.config.text_config.num_attention_heads
        h.record_selections(False)
        model(**inputs)
        assert all(not v for v in h.selections().values())
