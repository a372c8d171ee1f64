"""Cube bookkeeping on plain tensors: which tokens form each cube, and cube mean keys.

Ops convention: ``cube_ids`` is an int64 tensor ``[B, N]`` with ``-1`` for every token
that is not a video token (text, images by default, generated tokens, padding) and ids
``0 .. C_b - 1`` for the cubes of sample ``b``. Ids are per sample; the cubes of different videos of
one sample have distinct ids. A cube's tokens need not be contiguous (cubes interleave in raster
order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NEVER", "CubeIndex", "build_cube_index", "cube_mean_keys"]

#: first position of a cube that does not exist
NEVER = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class CubeIndex:
    """Per-cube token lists of a batch, padded to a rectangle.

    Attributes:
        token_idx: ``[B, C, S]`` int64 token positions of each cube (ascending), ``-1`` padded.
            ``C`` is the largest cube count in the batch, ``S`` the largest cube size.
        counts: ``[B, C]`` int64 number of tokens of each cube (0 for cubes a sample lacks).
        first_pos: ``[B, C]`` int64 position of each cube's first token (:data:`NEVER` for cubes
            a sample lacks, so that no query ever sees them as candidates).
        num_cubes: ``[B]`` int64 cube count of each sample.
        seq_len: ``N``.
    """

    token_idx: torch.Tensor
    counts: torch.Tensor
    first_pos: torch.Tensor
    num_cubes: torch.Tensor
    seq_len: int

    @property
    def max_cubes(self) -> int:
        return int(self.token_idx.shape[1])


def build_cube_index(cube_ids: torch.Tensor) -> CubeIndex:
    """Group token positions by cube.

    Args:
        cube_ids: ``[B, N]`` int64, ``-1`` = not video.

    Returns:
        A :class:`CubeIndex`. Cube ids of a sample must be ``0 .. C_b - 1`` without gaps.
    """
    if cube_ids.dim() != 2:
        raise ValueError(f"cube_ids must have shape [B, N], got {tuple(cube_ids.shape)}")
    if cube_ids.dtype != torch.int64:
        raise ValueError(f"cube_ids must be int64, got {cube_ids.dtype}")
    bsz, n = cube_ids.shape
    dev = cube_ids.device
    num_cubes = (cube_ids.max(dim=1).values + 1).clamp_min(0) if n > 0 else torch.zeros(bsz, dtype=torch.long)
    c_max = int(num_cubes.max().item()) if bsz > 0 else 0
    counts = torch.zeros(bsz, c_max, dtype=torch.long, device=dev)
    first_pos = torch.full((bsz, c_max), NEVER, dtype=torch.long, device=dev)
    if c_max == 0:
        return CubeIndex(
            token_idx=torch.full((bsz, 0, 1), -1, dtype=torch.long, device=dev),
            counts=counts,
            first_pos=first_pos,
            num_cubes=num_cubes,
            seq_len=n,
        )
    pos = torch.arange(n, device=dev)
    per_sample = []
    s_max = 1
    for b in range(bsz):
        ids = cube_ids[b]
        vid = ids >= 0
        vpos = pos[vid]
        vcid = ids[vid]
        cnt = torch.bincount(vcid, minlength=c_max)
        counts[b] = cnt
        if vpos.numel():
            first_pos[b].scatter_reduce_(0, vcid, vpos, reduce="amin", include_self=True)
            s_max = max(s_max, int(cnt.max().item()))
        per_sample.append((vpos, vcid, cnt))
    nc = num_cubes.tolist()
    for b, (_, _, cnt) in enumerate(per_sample):
        if nc[b] > 0 and bool((cnt[: nc[b]] == 0).any()):
            missing = int((cnt[: nc[b]] == 0).nonzero()[0].item())
            raise ValueError(
                f"cube_ids of sample {b} skip cube id {missing}: ids must be 0..C-1 without gaps"
            )
    token_idx = torch.full((bsz, c_max, s_max), -1, dtype=torch.long, device=dev)
    for b, (vpos, vcid, cnt) in enumerate(per_sample):
        if vpos.numel() == 0:
            continue
        order = torch.sort(vcid, stable=True).indices  # positions ascending within each cube
        sc = vcid[order]
        starts = torch.cumsum(cnt, 0) - cnt
        slot = torch.arange(sc.numel(), device=dev) - starts[sc]
        token_idx[b, sc, slot] = vpos[order]
    return CubeIndex(token_idx=token_idx, counts=counts, first_pos=first_pos, num_cubes=num_cubes, seq_len=n)


@torch.no_grad()
def cube_mean_keys(k: torch.Tensor, index: CubeIndex) -> torch.Tensor:
    """Mean key of every cube, accumulated in float32.

    Args:
        k: ``[B, Hkv, N, D]`` keys (any float dtype). Only positions listed in ``index`` are read.
        index: cube index of the same batch (``index.seq_len <= N``).

    Returns:
        ``[B, Hkv, C, D]`` float32 mean keys; zeros for cubes a sample lacks.
    """
    bsz, hkv, _, d = k.shape
    c, s = index.token_idx.shape[1], index.token_idx.shape[2]
    out = torch.zeros(bsz, hkv, c, d, dtype=torch.float32, device=k.device)
    if c == 0:
        return out
    for b in range(bsz):
        idx = index.token_idx[b]  # [C, S]
        valid = idx >= 0
        g = k[b].index_select(1, idx.clamp_min(0).reshape(-1)).view(hkv, c, s, d)
        g = g.masked_fill(~valid.view(1, c, s, 1), 0)
        tot = g.sum(dim=2, dtype=torch.float32)
        out[b] = tot / index.counts[b].clamp_min(1).to(torch.float32).view(1, c, 1)
    return out
