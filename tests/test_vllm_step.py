"""The vLLM-free parts of ``adaspark.integrations.vllm``: positions, step plans, the decode store,
the paged-cache reader, options."""

from __future__ import annotations

import pytest
import torch

from adaspark import AdaSparkConfig
from adaspark.core.accounting import LayerDims
from adaspark.core.layout import build_layout
from adaspark.integrations.vllm import ARCHITECTURE, hf_overrides, read_options, transformers_mrope_positions
from adaspark.integrations.vllm.paged import read_paged_kv
from adaspark.integrations.vllm.step import DecodeStore, VideoContext, plan_step, record_dense_attention

DIMS = LayerDims(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128)


def test_positions_follow_transformers_not_vllm():
    # 3 text tokens, a video of LM grid (3, 2, 3) with interval 2, then 2 text tokens
    pos, delta = transformers_mrope_positions(3 + 18 + 2, [(3, 3, 2, 3, 2.0)])
    assert pos[:, :3].tolist() == [[0, 1, 2]] * 3
    video = pos[:, 3:21]
    assert video[0].tolist() == [3] * 6 + [5] * 6 + [7] * 6  # start + floor(t * interval)
    assert video[1].tolist() == [3, 3, 3, 4, 4, 4] * 3  # start + y
    assert video[2].tolist() == [3, 4, 5] * 6  # start + x
    # transformers: the text restarts at start + max(h, w) = 6 (vLLM: at the largest position + 1 = 8)
    assert pos[:, 21:].tolist() == [[6, 7]] * 3
    assert delta == 7 + 1 - 23


def test_step_plan_reads_the_layout_from_positions():
    cfg = AdaSparkConfig(cube=(1, 2, 2))
    # request 0: text only (decode of something); request 1: a whole prompt with a video of (2, 2, 4)
    pos1, _ = transformers_mrope_positions(2 + 16 + 1, [(2, 2, 2, 4, 1.0)])
    positions = torch.cat([torch.full((3, 1), 40), pos1], dim=1)
    video = torch.zeros(20, dtype=torch.bool)
    video[3:19] = True
    ids = torch.where(video, 8, 1)
    step = plan_step(
        video_rows=video, positions=positions, query_start_loc=torch.tensor([0, 1, 20]),
        seq_lens=torch.tensor([50, 19]), input_ids=ids, config=cfg, merge=2, num_layers=2, dims=DIMS,
    )  # fmt: skip
    assert len(step.prefills) == 1
    pf = step.prefills[0]
    assert (pf.start, pf.end, pf.video_tokens) == (1, 20, 16)
    types = torch.zeros(1, 19, dtype=torch.long)
    types[0, 2:18] = 2
    want = build_layout(types, torch.tensor([[2, 4, 8]]), cube=(1, 2, 2), spatial_merge_size=2).cube_ids
    assert torch.equal(pf.cube_ids, want)


def test_step_plan_refuses_a_continued_video_prefill():
    pos, _ = transformers_mrope_positions(6, [(1, 1, 2, 2, 1.0)])
    video = torch.tensor([False, True, True, True, True, False])
    with pytest.raises(NotImplementedError, match="enable_chunked_prefill=False"):
        plan_step(
            video_rows=video, positions=pos, query_start_loc=torch.tensor([0, 6]), seq_lens=torch.tensor([9]),
            input_ids=torch.where(video, 8, 1), config=AdaSparkConfig(), merge=2, num_layers=1, dims=DIMS,
        )  # fmt: skip


def test_options_round_trip_and_errors():
    cfg = AdaSparkConfig(p=0.5, cube=(2, 2, 2), dense_layers=(0, -1))
    ov = hf_overrides(cfg, report_path="r.jsonl")
    assert ov["architectures"] == [ARCHITECTURE]
    opts = read_options(ov["adaspark"])
    assert opts.config == cfg and opts.report_path == "r.jsonl"
    assert read_options({"cube": "4x4x4", "p": "0.7"}).config == AdaSparkConfig(p=0.7)
    with pytest.raises(ValueError, match=r"AdaSparkConfig\.p must be in"):
        read_options({"p": 2})
    with pytest.raises(ValueError, match="not an AdaSparkConfig field"):
        read_options({"q": 1})
    with pytest.raises(ValueError, match="must be a dict"):
        read_options("p=0.5")


def _video_prompt():
    """19 rows: 2 text, a video of LM grid (2, 2, 4) (16 tokens), 1 text; cube (1, 2, 2)."""
    pos, _ = transformers_mrope_positions(2 + 16 + 1, [(2, 2, 2, 4, 1.0)])
    video = torch.zeros(19, dtype=torch.bool)
    video[2:18] = True
    return pos, video


def test_decode_store_keeps_a_video_prompt_for_its_decode_steps():
    cfg = AdaSparkConfig(cube=(1, 2, 2))
    store = DecodeStore()
    pos, video = _video_prompt()
    plan = dict(config=cfg, merge=2, num_layers=2, dims=DIMS, store=store)
    # step 1: the video prompt (block 7) and a text prompt (block 3), both whole-prompt prefills
    text_pos = torch.arange(4).expand(3, 4)
    step = plan_step(
        video_rows=torch.cat([video, torch.zeros(4, dtype=torch.bool)]),
        positions=torch.cat([pos, text_pos], dim=1), query_start_loc=torch.tensor([0, 19, 23]),
        seq_lens=torch.tensor([19, 4]), input_ids=torch.ones(23, dtype=torch.long),
        keys=torch.tensor([7, 3]), **plan,
    )  # fmt: skip
    assert len(step.prefills) == 1 and not step.decodes and not step.dropped
    ctx = store.get(7)
    assert len(store) == 1 and ctx is step.prefills[0].context and store.get(3) is None
    # step 2: both decode one token (in the other order); only the video request is sparse
    step = plan_step(
        video_rows=torch.zeros(2, dtype=torch.bool), positions=torch.full((3, 2), 30),
        query_start_loc=torch.tensor([0, 1, 2]), seq_lens=torch.tensor([5, 20]),
        input_ids=torch.ones(2, dtype=torch.long), keys=torch.tensor([3, 7]), **plan,
    )  # fmt: skip
    assert not step.prefills and not step.dropped
    (sd,) = step.decodes
    assert (sd.request, sd.start, sd.end, sd.seq_len, sd.context) == (1, 1, 2, 20, ctx)
    assert ctx.decode_tokens == 1
    ids = ctx.cube_ids_for(20)
    assert torch.equal(ids[:, :19], step_cube_ids(cfg)) and ids[0, 19] == -1
    with pytest.raises(ValueError, match="decode step over 18 positions"):
        ctx.cube_ids_for(18)
    # step 3: the video request is gone (finished): its context is dropped, the store is empty
    step = plan_step(
        video_rows=torch.zeros(1, dtype=torch.bool), positions=torch.full((3, 1), 31),
        query_start_loc=torch.tensor([0, 1]), seq_lens=torch.tensor([6]),
        input_ids=torch.ones(1, dtype=torch.long), keys=torch.tensor([3]), **plan,
    )  # fmt: skip
    assert step.dropped == [ctx] and not step.decodes and len(store) == 0


def step_cube_ids(cfg):
    types = torch.zeros(1, 19, dtype=torch.long)
    types[0, 2:18] = 2
    return build_layout(types, torch.tensor([[2, 4, 8]]), cube=cfg.cube, spatial_merge_size=2).cube_ids


def test_decode_store_drops_a_context_when_a_new_prompt_takes_its_block():
    store = DecodeStore()
    ctx = VideoContext("d", torch.tensor([[-1, 0, 0, -1]]), None, 1, DIMS)
    store.put(5, ctx)
    # the same first block, a whole-prompt prefill (a new request, or a preempted one recomputed)
    assert store.begin_step([5, 6], [True, False]) == [ctx]
    assert len(store) == 0
    store.put(5, ctx)
    assert store.begin_step([5], [False]) == [] and store.get(5) is ctx
    assert store.clear() == [ctx] and len(store) == 0


def test_video_context_reports_its_decoding():
    ctx = VideoContext("d", torch.tensor([[-1, 0, 0, 1, 1, -1]]), None, 2, DIMS)
    assert ctx.report() is None  # nothing decoded
    ctx.decode_tokens = 2
    ctx.mean_keys[1] = torch.zeros(1, 2, 2, 16)
    record_dense_attention(ctx.attn_stats[0], 2, 2, past=6)  # layer 0 decoded dense
    st = ctx.attn_stats[1]  # layer 1: as the sparse kernel counts two queries at 7 and 8 keys
    st.kv_heads, st.queries, st.causal_pairs = 2, 2, 15
    st.attended += 5.0
    st.executed = 5 * 4
    rep = ctx.report()
    assert ctx.attn_stats[0].causal_pairs == 7 + 8 and ctx.attn_stats[0].executed == 15 * 4
    assert rep.tokens == 2 and rep.layers[0].dense and not rep.layers[1].dense
    assert rep.layers[1].attn_density == pytest.approx(5 * 4 / (15 * 4))
    assert rep.layers[0].flops_sparse == rep.layers[0].flops_dense
    assert 0 < rep.llm_saved < 1


def test_read_paged_kv_follows_the_cpu_block_layout():
    """Blocks of 4 positions, 2 KV heads, D = 3, written as vLLM's CPU attention keeps them
    (per block and head: the keys transposed, then the values), in a scattered block order."""
    torch.manual_seed(0)
    nb, hkv, bs, d, n = 6, 2, 4, 3, 10
    k = torch.randn(hkv, n, d)
    v = torch.randn(hkv, n, d)
    blocks = torch.tensor([4, 1, 5])
    cache = torch.full((nb, hkv, bs, 2 * d), float("nan"))
    flat = cache.view(nb, hkv, 2 * bs * d)
    for t in range(n):
        b, o = int(blocks[t // bs]), t % bs
        for h in range(hkv):
            for j in range(d):
                flat[b, h, j * bs + o] = k[h, t, j]
                flat[b, h, bs * d + o * d + j] = v[h, t, j]
    got_k, got_v = read_paged_kv(cache, torch.cat([blocks, torch.tensor([0, 0])]), n)
    assert got_k.shape == (1, hkv, n, d) and got_k.is_contiguous() and got_v.is_contiguous()
    assert torch.equal(got_k[0], k) and torch.equal(got_v[0], v)
    assert torch.equal(read_paged_kv(cache, blocks, 5)[0][0], k[:, :5])  # within one block
    assert read_paged_kv(cache, blocks, 3)[1].is_contiguous()
