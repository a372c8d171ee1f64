"""The vLLM-free parts of ``adaspark.integrations.vllm``: positions, step plans, options."""

from __future__ import annotations

import pytest
import torch

from adaspark import AdaSparkConfig
from adaspark.core.accounting import LayerDims
from adaspark.core.layout import build_layout
from adaspark.integrations.vllm import ARCHITECTURE, hf_overrides, read_options, transformers_mrope_positions
from adaspark.integrations.vllm.step import plan_step

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
