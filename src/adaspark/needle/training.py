"""What the training scripts of the needle models share: the needle map and the answer batch.

``scripts/train_needle_model.py`` (the shipped tiny model) and ``scripts/train_smolvl.py`` (SmolVL)
both train on prompt + answer sequences with an auxiliary needle-map target; the token ids of a
word are the only thing that differs (a word-level tokenizer, or the first token of a word).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adaspark.needle.spec import GRID, TEMPORAL_PATCH, NeedleItem

__all__ = ["answer_batch", "needle_map"]


def needle_map(item: NeedleItem, video, word_id: Callable[[str], int], none_id: int) -> torch.Tensor:
    """``(N, 2)``: the ids (``word_id``) of the label and colour word of the needle every video
    token of ``item`` shows (both ``none_id`` where it shows none), in the time-major raster order
    of the LM token grid."""
    gt, gh, gw = (int(x) for x in video.video_grid_thw[0])
    m = 2  # spatial merge
    th, tw = gh // m, gw // m
    if (th * GRID, tw * GRID) != (item.height, item.width):
        raise ValueError("the needle map needs frames at their native size")
    grid = torch.full((gt, th, tw, 2), none_id, dtype=torch.long)
    for nd in item.needles:
        t0, t1 = nd["frame"] // TEMPORAL_PATCH, (nd["frame"] + nd["frames"] - 1) // TEMPORAL_PATCH
        r0, r1 = nd["y"] // GRID, (nd["y"] + nd["size"] - 1) // GRID
        c0, c1 = nd["x"] // GRID, (nd["x"] + nd["size"] - 1) // GRID
        ids = [word_id(str(nd["label"])), word_id(str(nd["color"]))]
        grid[t0 : t1 + 1, r0 : r1 + 1, c0 : c1 + 1] = torch.tensor(ids)
    return grid.reshape(-1, 2)


def answer_batch(seqs, pad_id: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Right-padded batch of prompt + answer (no attention mask needed: causal attention never looks
    right) from ``(encoded prompt, answer ids, needle map)`` triples.

    Returns the model inputs, the next-token targets ``(B, N)`` (the answer's tokens, -100
    elsewhere) and the needle-map labels ``(B, N, 2)`` (-100 at text positions).
    """
    n = max(e["input_ids"].shape[1] + len(a) for e, a, _ in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    types = torch.zeros(len(seqs), n, dtype=torch.long)
    targets = torch.full((len(seqs), n), -100, dtype=torch.long)
    labels = torch.full((len(seqs), n, 2), -100, dtype=torch.long)
    for b, (e, answer, m) in enumerate(seqs):
        k = e["input_ids"].shape[1]
        ids[b, :k] = e["input_ids"][0]
        ids[b, k : k + len(answer)] = torch.tensor(answer)
        types[b, :k] = e["mm_token_type_ids"][0]
        targets[b, k - 1 : k - 1 + len(answer)] = torch.tensor(answer)  # position i predicts token i + 1
        labels[b, :k][types[b, :k] == 2] = m
    inputs = {
        "input_ids": ids,
        "mm_token_type_ids": types,
        "pixel_values_videos": torch.cat([e["pixel_values_videos"] for e, _, _ in seqs]),
        "video_grid_thw": torch.cat([e["video_grid_thw"] for e, _, _ in seqs]),
        "second_per_grid_ts": torch.cat([e["second_per_grid_ts"] for e, _, _ in seqs]),
    }
    return inputs, targets, labels
