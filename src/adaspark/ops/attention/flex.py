"""Flex AdaS-Attn: compiled ``flex_attention`` with a ``BlockMask`` built from the selection.

Same selection and block pattern as :mod:`adaspark.ops.attention.gather`; the kernel is PyTorch's
``flex_attention`` compiled by inductor (CPU: C++ with AMX for bfloat16; CUDA: Triton). The
``BlockMask`` is assembled directly from the block pattern (``BlockMask.from_kv_blocks``): full blocks
run without a mask, partial blocks evaluate a ``mask_mod`` that looks the pair up in the selection
table with the original positions (so causality and the exact per-head semantics hold), skipped
blocks cost nothing.

Compilation: ``dynamic=False`` (dynamic shapes hit a C++ codegen error on CPU when the mask_mod
captures tensors), one compile per (padded length, block, dtype, heads, head dim, device). Lengths
are padded up to a bucket (:func:`bucket_length`) and the selection table to a power of two, so a
new prompt length rarely recompiles. While the compiled kernel runs (and only then), dynamo's
recompile limit is raised to :data:`RECOMPILE_LIMIT`; the process-wide setting the user chose is
left as it was. Never runs flex_attention eagerly (eager flex on CPU materialises the full score
matrix). ``torch.nn.attention.flex_attention`` is imported lazily.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from adaspark.ops.attention.blocks import BlockPlan, plan_blocks, rows_from_slots, rows_to_slots, run_blocks
from adaspark.ops.attention.common import AttentionStats, prepare_inputs
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy

__all__ = ["FLEX_BLOCK", "bucket_length", "cube_sparse_attention_flex", "flex_available", "flex_kernel"]

#: default block size of the flex path: one 4×4×4 cube (measured on CPU at 8k tokens, density 0.14:
#: 64-token blocks 3.5 s, 128-token blocks 10.3 s — two cubes per block share their kept sets)
FLEX_BLOCK = 64
#: compiled variants of the flex kernel dynamo may keep (its default is 8), set only around the call
RECOMPILE_LIMIT = 64


def flex_available(device: torch.device | str) -> bool:
    """Whether compiled flex_attention can run here (PyTorch ≥ 2.5; CPU needs a C++ compiler)."""
    try:
        import torch.nn.attention.flex_attention
    except ImportError:  # pragma: no cover - old PyTorch
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "cpu":
        import shutil

        return shutil.which("g++") is not None or shutil.which("c++") is not None
    return False


def bucket_length(n: int, block: int) -> int:
    """Padded length for ``n`` tokens: the next of ``2^k · {1, 1.25, 1.5, 1.75}``, a block multiple."""
    n = max(int(n), 1)
    if n <= 4 * block:
        return -(-n // block) * block
    e = 2 ** math.floor(math.log2(n))
    for f in (1.0, 1.25, 1.5, 1.75, 2.0):
        cand = int(e * f)
        if cand >= n:
            return -(-cand // block) * block
    return -(-n // block) * block  # pragma: no cover


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _recompile_limit():
    """A context raising dynamo's recompile limit to :data:`RECOMPILE_LIMIT` (never lowering it) for
    its duration only; a no-op while dynamo traces (inside a user's compiled region)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    # ``recompile_limit`` since PyTorch 2.6, ``cache_size_limit`` before (now an alias of it)
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if torch.compiler.is_compiling() or getattr(cfg, name) >= RECOMPILE_LIMIT:
        return contextlib.nullcontext()
    return cfg.patch({name: RECOMPILE_LIMIT})


def _kv_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num, indices)`` int32 of a ``[B, H, nQ, nK]`` bool block map (kept blocks first, ascending)."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx.contiguous()


def _pad_to(x: torch.Tensor, size: int, dim: int, value=0) -> torch.Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def cube_sparse_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    mean_keys: torch.Tensor | None = None,
    index: CubeIndex | None = None,
    stats: AttentionStats | None = None,
    query_block: int = FLEX_BLOCK,
    granularity: str = "token",
) -> torch.Tensor:
    """AdaS-Attn with compiled flex_attention (same signature as the reference).

    ``query_block`` is the block size of the ``BlockMask`` (default 64). Needs ``Nq == Nk``
    (prefill); the dispatcher sends decoding elsewhere. The two steps,
    :func:`~adaspark.ops.attention.blocks.plan_blocks` then
    :func:`~adaspark.ops.attention.blocks.run_blocks` with :func:`flex_kernel`, are public.
    """
    inp = prepare_inputs(
        q, k, v, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
        mean_keys=mean_keys, index=index, granularity=granularity,
    )  # fmt: skip
    _check_prefill(inp.nq, inp.nk)
    plan = plan_blocks(q, inp, block=query_block, stats=stats)
    return run_blocks(q, k, v, plan, kernel=flex_kernel, stats=stats)


def _check_prefill(nq: int, nk: int) -> None:
    if nq != nk:
        raise ValueError(f"the flex path needs Nq == Nk (prefill), got Nq={nq}, Nk={nk}")


def flex_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    stats: AttentionStats | None = None,
) -> torch.Tensor:
    """Compiled flex_attention for a :class:`~adaspark.ops.attention.blocks.BlockPlan` (prefill,
    ``Nq == Nk``; adds ``executed`` to ``stats``)."""
    from torch.nn.attention.flex_attention import BlockMask

    sel, pat, scale = plan.selection, plan.pattern, plan.inputs.scale
    bsz, hq, nq, _d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    _check_prefill(nq, nk)
    block = pat.block
    n = bucket_length(pat.k_pos.shape[1], block)  # the slots (cubes aligned to blocks), bucketed
    nb = n // block
    kept = _pad_to(_pad_to(pat.kept, nb, 2, False), nb, 3, False)
    full = _pad_to(_pad_to(pat.full, nb, 2, False), nb, 3, False)
    part_num, part_idx = _kv_lists(kept & ~full)
    full_num, full_idx = _kv_lists(full)

    # metadata of the mask_mod, padded to the bucket (padded keys invalid, padded queries unit 0)
    _, hq_, n_units, ncls = sel.table.shape
    table = sel.table.permute(0, 2, 1, 3).reshape(-1)  # [B, U, Hq, ncls] flattened
    table = _pad_to(table, 1 << max(10, (table.numel() - 1).bit_length()), 0, False)
    ncls_t = torch.tensor(ncls, device=q.device)
    q_row = _pad_to((torch.arange(bsz, device=q.device)[:, None] * n_units + pat.q_unit) * (hq_ * ncls), n, 1)
    q_pos = _pad_to(pat.q_pos, n, 1, -1)
    k_pos = _pad_to(pat.k_pos, n, 1, torch.iinfo(torch.int64).max // 2)
    k_cls = _pad_to(pat.k_cls, n, 1)
    k_valid = _pad_to(pat.k_valid, n, 1, False)

    def mask_mod(b, h, qi, ki):
        hit = table[q_row[b, qi] + h * ncls_t + k_cls[b, ki]]
        return hit & (k_pos[b, ki] <= q_pos[b, qi]) & k_valid[b, ki]

    bm = BlockMask.from_kv_blocks(
        part_num, part_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(n, n)
    )

    qp = _pad_to(rows_to_slots(q, pat.q_perm), n, 2)
    kp = _pad_to(rows_to_slots(k, pat.k_perm), n, 2)
    vp = _pad_to(rows_to_slots(v, pat.k_perm), n, 2)
    with _recompile_limit():
        outp = _compiled_flex()(qp, kp, vp, block_mask=bm, scale=scale, enable_gqa=hkv != hq)
    outp = outp[:, :, : pat.q_pos.shape[1]].masked_fill(~pat.q_valid[:, None, :, None], 0)
    out = rows_from_slots(outp, pat.q_slot)
    if stats is not None:
        stats.executed += pat.executed
    return out
