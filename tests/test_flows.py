"""Every generation and training flow of transformers under ``adaspark.patch``, with a video prompt.

Each flow: at p = 1 it gives what the unpatched model gives (through the sparse kernels — the
backend is forced, so the dense short cut of ``auto`` is not what is compared); at p < 1 it runs
sparse (the report says so) and, where the flow is only another way to compute the same thing,
gives what the plain flow gives with AdaSpark on.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from adaspark import AdaSparkConfig, patch
from adaspark.integrations.transformers import TransformersCompatError
from adaspark.integrations.transformers.attention import probe_segments
from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl

CUBE = (2, 2, 2)
#: p = 1 through a sparse kernel (not auto's dense short cut)
P1 = AdaSparkConfig(p=1.0, cube=CUBE, backend="gather", dense_fallback=None, cost_model=False)
SPARSE = AdaSparkConfig(p=0.5, cube=CUBE)
#: one video of 4 × 8 × 8 patches (64 LM tokens at positions 6..69) in a 78-token prompt
GRIDS = [[(4, 8, 8)]]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl(num_layers=2)


@pytest.fixture(scope="module")
def inputs():
    return build_inputs(GRIDS, seed=3)


@pytest.fixture(scope="module")
def batch():
    return build_inputs([[(4, 8, 8)], [(2, 8, 8)]], padding_side="left", seed=4)


def _gen(model, inputs, **kw):
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("do_sample", False)
    return model.generate(**inputs, **kw)


def _ran_sparse(rep, decode=True):
    assert rep.layers[0].attn_density < 1.0 and rep.layers[0].ffn_active < 1.0
    if decode:
        assert rep.decode_steps > 0 and rep.sparse_decode_steps == rep.decode_steps


# ------------------------------------------------------------------------------------------ caches
@torch.inference_mode()
def test_static_cache(model, inputs):
    ref = _gen(model, inputs, cache_implementation="static")
    with patch(model, P1):
        assert torch.equal(_gen(model, inputs, cache_implementation="static"), ref)
    with patch(model, SPARSE) as h:
        dyn = _gen(model, inputs)
        static = _gen(model, inputs, cache_implementation="static")
        _ran_sparse(h.report())
    assert torch.equal(static, dyn)


@pytest.mark.slow
def test_compiled_generate(model, inputs):
    """generate with a static cache and torch.compile (transformers' compile_config)."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    cc._compile_all_devices = True  # transformers compiles only on accelerators unless told
    with torch.no_grad():
        ref = _gen(model, inputs, cache_implementation="static")
        with patch(model, SPARSE) as h:
            eager = _gen(model, inputs, cache_implementation="static")
            compiled = _gen(model, inputs, cache_implementation="static", compile_config=cc)
            rep = h.report()
            assert torch.equal(compiled, eager)
            _ran_sparse(rep)
        with patch(model, P1):
            assert torch.equal(_gen(model, inputs, cache_implementation="static", compile_config=cc), ref)


# ------------------------------------------------------------------------------------------ drafts
@pytest.fixture(scope="module")
def assistant():
    return tiny_qwen2_5_vl(num_layers=1, seed=5)


@torch.inference_mode()
@pytest.mark.parametrize("patch_assistant", [False, True])
def test_assisted_decoding(model, inputs, assistant, patch_assistant):
    """Assisted (speculative) decoding gives the main model's greedy tokens, dense and sparse."""
    ref = _gen(model, inputs, max_new_tokens=6)
    assert torch.equal(_gen(model, inputs, max_new_tokens=6, assistant_model=assistant), ref)
    extra = patch(assistant, SPARSE) if patch_assistant else None
    try:
        with patch(model, P1):
            assert torch.equal(_gen(model, inputs, max_new_tokens=6, assistant_model=assistant), ref)
        with patch(model, SPARSE) as h:
            plain = _gen(model, inputs, max_new_tokens=6)
            assisted = _gen(model, inputs, max_new_tokens=6, assistant_model=assistant)
            _ran_sparse(h.report())
    finally:
        if extra is not None:
            extra.remove()
    assert torch.equal(assisted, plain)


@torch.inference_mode()
def test_prompt_lookup_decoding(model, inputs):
    ref = _gen(model, inputs, max_new_tokens=6)
    with patch(model, P1):
        assert torch.equal(_gen(model, inputs, max_new_tokens=6, prompt_lookup_num_tokens=3), ref)
    with patch(model, SPARSE) as h:
        plain = _gen(model, inputs, max_new_tokens=6)
        lookup = _gen(model, inputs, max_new_tokens=6, prompt_lookup_num_tokens=3)
        _ran_sparse(h.report())
    assert torch.equal(lookup, plain)


# ------------------------------------------------------------------------------------------ beams
@torch.inference_mode()
def test_beam_search_without_cache(model, batch):
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=4)
    ref = _gen(model, batch, use_cache=False, **kw)
    with patch(model, P1):
        assert torch.equal(_gen(model, batch, use_cache=False, **kw), ref)
    with patch(model, SPARSE) as h:
        cached = _gen(model, batch, **kw)
        uncached = _gen(model, batch, use_cache=False, **kw)
        rep = h.report()
    assert rep.decode_steps == 0 and rep.forward_calls == 4  # every step a fresh forward
    _ran_sparse(rep, decode=False)
    assert torch.equal(uncached, cached)


@torch.inference_mode()
def test_beam_sampling_without_cache(model, batch):
    kw = dict(num_beams=2, do_sample=True, max_new_tokens=4, use_cache=False)
    torch.manual_seed(0)
    ref = _gen(model, batch, **kw)
    with patch(model, P1):
        torch.manual_seed(0)
        assert torch.equal(_gen(model, batch, **kw), ref)
    with patch(model, SPARSE) as h:
        torch.manual_seed(0)
        out = _gen(model, batch, **kw)
        _ran_sparse(h.report(), decode=False)
    assert out.shape == ref.shape


# ------------------------------------------------------------------------------------------ chunks
@torch.inference_mode()
def test_chunked_prefill(model, inputs):
    whole_ref = _gen(model, inputs)
    ref = {k: _gen(model, inputs, prefill_chunk_size=k) for k in (20, 38)}
    with patch(model, P1):
        for k, r in ref.items():
            assert torch.equal(_gen(model, inputs, prefill_chunk_size=k), r)
    with patch(model, SPARSE) as h:
        whole = _gen(model, inputs)
        # chunks that end where a time slice of cubes ends (6 text tokens + 32 video tokens): every
        # cube a query can select is complete, so the selection is that of the whole prefill
        aligned = _gen(model, inputs, prefill_chunk_size=38)
        rep = h.report()
        assert rep.decode_steps == 2 + 3 and rep.sparse_decode_steps == rep.decode_steps  # 2 chunks + 3 steps
        odd = _gen(model, inputs, prefill_chunk_size=20)  # cubes split across chunks: still sparse
        _ran_sparse(h.report())
    assert odd.shape == whole.shape
    if torch.equal(ref[38], whole_ref):
        assert torch.equal(aligned, whole)
    else:
        # transformers 5.19's own chunked prefill of Qwen2.5-VL differs from its whole prefill
        # (dense, unpatched); AdaSpark then follows the chunked computation it is given
        assert not torch.equal(aligned, whole)


# ------------------------------------------------------------------------------------------ inspection
@torch.inference_mode()
def test_output_attentions(model, inputs):
    eager = tiny_qwen2_5_vl(num_layers=2)
    eager.set_attn_implementation("eager")
    ref = eager(**inputs, output_attentions=True).attentions
    with patch(model, P1):
        got = model(**inputs, output_attentions=True).attentions
    assert len(got) == len(ref) == 2
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with patch(model, SPARSE) as h:
        out = model(**inputs, output_attentions=True)
        plain = model(**inputs).logits
        rep = h.report()
    w = out.attentions[1]
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5, rtol=0)
    zero = (w == 0).float().mean()
    assert float(zero) > 0.5 + 0.05  # causal half plus the skipped cubes
    assert float(torch.triu(w[0, 0], diagonal=1).abs().max()) == 0.0
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-4)
    assert rep.layers[1].attn_density < 1.0


# ------------------------------------------------------------------------------------------ training
def _packed(model, samples: list[dict]) -> dict:
    """Several samples in one row, padding-free, with the 4-row position ids a collator makes."""
    rows, types, grids, pix, pos = [], [], [], [], []
    for s in samples:
        p3, _ = model.model.get_rope_index(
            s["input_ids"],
            video_grid_thw=s["video_grid_thw"],
            attention_mask=s["attention_mask"],
            mm_token_type_ids=s["mm_token_type_ids"],
        )
        n = s["input_ids"].shape[1]
        pos.append(torch.cat([torch.arange(n).view(1, 1, n), p3], dim=0))
        rows.append(s["input_ids"])
        types.append(s["mm_token_type_ids"])
        grids.append(s["video_grid_thw"])
        pix.append(s["pixel_values_videos"])
    return {
        "input_ids": torch.cat(rows, 1),
        "mm_token_type_ids": torch.cat(types, 1),
        "video_grid_thw": torch.cat(grids, 0),
        "pixel_values_videos": torch.cat(pix, 0),
        "position_ids": torch.cat(pos, 2),
    }


@pytest.mark.parametrize("cfg", [P1, SPARSE], ids=["p1", "sparse"])
def test_packed_batch(model, cfg):
    """A padding-free packed row equals its samples run one by one; loss and gradients flow."""
    samples = [build_inputs([[(4, 8, 8)]], seed=6), build_inputs([[(2, 8, 8)]], seed=7, prefix=9)]
    packed = _packed(model, samples)
    with torch.no_grad():
        ref = [model(**s).logits for s in samples]
    with patch(model, cfg) as h:
        with torch.no_grad():
            alone = [model(**s).logits for s in samples]
            out = model(**packed, use_cache=False).logits
        rep = h.report()
        n0 = samples[0]["input_ids"].shape[1]
        torch.testing.assert_close(out[:, :n0], alone[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[:, n0:], alone[1], atol=2e-5, rtol=1e-4)
        if cfg is P1:
            torch.testing.assert_close(out[:, :n0], ref[0], atol=2e-5, rtol=1e-4)
        else:
            assert rep.layers[0].attn_density < 1.0
        model.zero_grad()
        labels = packed["input_ids"].clone()
        loss = model(**packed, labels=labels, use_cache=False).loss
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


@torch.inference_mode()
def test_precomputed_mrope_positions(model, batch):
    """3-D M-RoPE position ids passed in (get_rope_index is not called): the same as without them."""
    pos, _ = model.model.get_rope_index(
        batch["input_ids"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
    )
    valid = batch["attention_mask"].bool()
    with patch(model, SPARSE) as h:
        plain = model(**batch).logits
        given = model(**batch, position_ids=pos).logits
        assert h.report().layers[0].attn_density < 1.0
    torch.testing.assert_close(given[valid], plain[valid], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ loud errors
@torch.inference_mode()
def test_set_attn_implementation_after_patch_is_an_error(model, inputs):
    with patch(model, SPARSE):
        model.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match=r"attention implementation .* changed to 'sdpa'"):
            model(**inputs)
    model.set_attn_implementation("sdpa")


@torch.inference_mode()
def test_untracked_cache_and_missing_layout_name_the_version(model, inputs):
    import transformers
    from transformers import DynamicCache

    with patch(model, SPARSE):
        foreign = DynamicCache()
        k = torch.zeros(1, 2, 5, 16)
        for i in range(model.config.text_config.num_hidden_layers):
            foreign.update(k, k, i)
        with pytest.raises(TransformersCompatError, match=f"transformers {transformers.__version__}"):
            model(input_ids=inputs["input_ids"][:, :1], past_key_values=foreign)
        with pytest.raises(TransformersCompatError, match="video layout could not be read"):
            model(input_ids=inputs["input_ids"] + 0 * inputs["input_ids"], use_cache=False)


def test_probe_segments_reads_packing_and_refuses_other_masks():
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        sliding_window_causal_mask_function,
    )

    seg = torch.tensor([[0, 0, 0, 1, 1, 2]])

    def same_segment(b, h, q, kv):
        return seg[b, q] == seg[b, kv]

    got = probe_segments(and_masks(causal_mask_function, same_segment), 1, 6, "cpu")
    assert got.tolist() == seg.tolist()
    assert probe_segments(causal_mask_function, 2, 7, "cpu") is None
    with pytest.raises(NotImplementedError, match="sliding window"):
        probe_segments(sliding_window_causal_mask_function(2), 1, 8, "cpu")
    with pytest.raises(NotImplementedError, match="later one"):
        probe_segments(lambda b, h, q, kv: kv >= 0, 1, 4, "cpu")
