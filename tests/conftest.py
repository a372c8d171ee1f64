"""Shared fixtures.

Like flash-linear-attention's suite, freshly allocated float tensors are filled with NaN while the
ops tests run (``nan_empty`` fixture), so a kernel that skips a block and leaves output unwritten
fails loudly instead of passing with whatever memory held.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def nan_empty(monkeypatch):
    orig_empty, orig_empty_like, orig_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(orig_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(orig_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(orig_new_empty(self, *a, **k)))
    yield


def make_cube_ids(
    bsz: int, n: int, videos: list[list[tuple[int, tuple[int, int, int], tuple[int, int, int]]]]
):
    """``[B, N]`` cube ids from per-sample lists of ``(start, (t, h, w) tokens, cube)`` videos."""
    from adaspark.core.layout import grid_cube_ids

    ids = torch.full((bsz, n), -1, dtype=torch.long)
    for b, vids in enumerate(videos):
        nxt = 0
        for start, (t, h, w), cube in vids:
            local = grid_cube_ids(t, h, w, cube)
            ids[b, start : start + local.numel()] = local + nxt
            nxt += int(local.max()) + 1
    return ids
