"""Qwen2-VL / Qwen2.5-VL M-RoPE positions as transformers computes them (vLLM-free).

vLLM and transformers place the text *after* a video differently: vLLM restarts it at the largest
position of the video plus one (``max(t, h, w) + 1`` relative to the video's start), transformers
(5.19 to 5.24, ``Qwen2_5_VLModel.get_rope_index``) at the video's start plus ``max(h, w)`` (LM grid,
after the spatial merge). The temporal positions of a video are ``start + floor(t · interval)`` with
``interval = tokens_per_second · second_per_grid_t`` in float32, its height and width positions
``start + y`` and ``start + x``. A model trained with transformers must see transformers' positions,
so the AdaSpark model class of :mod:`adaspark.integrations.vllm.model` computes them here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["transformers_mrope_positions"]


def transformers_mrope_positions(
    num_tokens: int, visuals: Iterable[tuple[int, int, int, int, float]]
) -> tuple[torch.Tensor, int]:
    """``(positions [3, num_tokens] int64, delta)`` of one prompt.

    Args:
        num_tokens: prompt length.
        visuals: ``(offset, t, h, w, interval)`` of every image / video in prompt order: its first
            placeholder token, its LM grid (after the spatial merge) and its temporal interval
            (1.0 for images), as vLLM's ``iter_mm_grid_thw`` yields them.

    Returns:
        The positions and ``delta = max(positions) + 1 - num_tokens`` (where decoding continues).
    """
    parts: list[torch.Tensor] = []
    pos = 0  # the next text position
    st = 0  # the next token not yet placed
    for offset, t, h, w, interval in sorted(visuals, key=lambda v: v[0]):
        if offset < st:
            raise ValueError(f"visual inputs overlap: one starts at token {offset}, before token {st}")
        text = offset - st
        parts.append(torch.arange(text, dtype=torch.long).expand(3, -1) + pos)
        pos += text
        tt = (torch.arange(t, dtype=torch.long) * torch.tensor(float(interval), dtype=torch.float32)).long()
        grid = torch.stack(
            torch.meshgrid(
                tt, torch.arange(h, dtype=torch.long), torch.arange(w, dtype=torch.long), indexing="ij"
            )
        ).reshape(3, -1)
        parts.append(grid + pos)
        pos += max(h, w)
        st = offset + t * h * w
    if st > num_tokens:
        raise ValueError(f"the visual inputs end at token {st}, after the prompt's {num_tokens} tokens")
    parts.append(torch.arange(num_tokens - st, dtype=torch.long).expand(3, -1) + pos)
    positions = torch.cat(parts, dim=1)
    delta = int(positions.max()) + 1 - num_tokens if positions.numel() else 0
    return positions, delta
