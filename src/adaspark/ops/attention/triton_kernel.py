"""Triton AdaS-Attn: a block-sparse flash-attention program for the GPU (the ``triton`` backend).

Same selection and block pattern as :mod:`adaspark.ops.attention.native` (cube-major order, 64-token
blocks). The kept key blocks of every (sample, query head, query block) are compacted in PyTorch
into one int32 list (:func:`kept_block_lists`: ``2 * key_block + full``, CSR row offsets), so a
program visits only its kept blocks: one program per (query block, sample × query head) loads its
``BLOCK`` query rows straight from ``q`` through the cube-major permutation, walks its list —
``S = Q Kᵀ`` by ``tl.dot`` on the permuted K tile, the token mask only on partial blocks, an online
softmax in float32, ``O += P V`` — and writes its rows back in the original query order. GQA: query
head ``h`` reads KV head ``h // (Hq // Hkv)``; K/V are never repeated.

Queries may be fewer than keys (new tokens after a cache). No gradients. The program runs
compiled for CUDA tensors and, with ``TRITON_INTERPRET=1``, in Triton's interpreter for CPU tensors
(the tests do that, in float32: the interpreter multiplies bfloat16 bit patterns in ``tl.dot``,
triton issue #11584, so bfloat16 is checked on a GPU only). ``triton`` is an optional dependency
(``pip install 'adaspark[triton]'``), imported only when this backend runs.
"""

from __future__ import annotations

import functools
import os
import threading

import torch

from adaspark.ops.attention.blocks import BlockPlan, plan_blocks, rows_to_slots, run_blocks
from adaspark.ops.attention.common import AttentionStats, prepare_inputs
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy

__all__ = [
    "TRITON_BLOCK",
    "cube_sparse_attention_triton",
    "kept_block_lists",
    "triton_available",
    "triton_error",
    "triton_kernel",
]

#: block size of the triton path (one 4×4×4 cube); a power of two from 16 to 128 (``tl.dot`` tiles)
TRITON_BLOCK = 64
_BLOCKS = (16, 32, 64, 128)
_TRUE = ("1", "true", "on", "yes")
_LOCK = threading.Lock()


@functools.cache
def _import_error() -> str | None:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as e:  # not installed, or a broken install: the other backends remain
        return f"{type(e).__name__}: {e}"
    return None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def triton_error(device: torch.device | str = "cuda") -> str | None:
    """Why the triton kernel cannot run for ``device`` (``None`` if it can)."""
    dev = torch.device(device)
    if dev.type == "cpu" and not _interpret_env():
        return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1)"
    if dev.type not in ("cpu", "cuda"):
        return f"no Triton backend for device type {dev.type!r}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    err = _import_error()
    if err is not None:
        return f"triton is not importable ({err}); pip install 'adaspark[triton]'"
    return None


def triton_available(device: torch.device | str = "cuda") -> bool:
    """Whether the triton kernel runs for ``device``: triton importable and a CUDA device, or CPU
    tensors with ``TRITON_INTERPRET=1`` (the interpreter; slow, for tests)."""
    return triton_error(device) is None


@functools.cache
def _jit(interpret: bool):
    """The program, ``triton.jit``-wrapped in the given mode (whatever ``TRITON_INTERPRET`` says)."""
    import triton

    from adaspark.ops.attention import _triton_fwd

    with _LOCK:
        knobs = getattr(triton, "knobs", None)
        if knobs is not None and hasattr(knobs.runtime, "scope"):  # triton >= 3.4
            with knobs.runtime.scope():
                knobs.runtime.interpret = interpret
                return triton.jit(_triton_fwd.block_sparse_attention_fwd)
        old = os.environ.get("TRITON_INTERPRET")  # older triton reads the variable when wrapping
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            return triton.jit(_triton_fwd.block_sparse_attention_fwd)
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old


def kept_block_lists(kept: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept key blocks of every query block as compact lists (pure PyTorch).

    Args:
        kept: ``[B, H, nQ, nK]`` bool, blocks holding an attended pair.
        full: ``[B, H, nQ, nK]`` bool, kept blocks without a skipped pair.

    Returns:
        ``(row_ptr, blocks)``: ``row_ptr`` ``[B·H·nQ + 1]`` int64 offsets, ``blocks`` int32
        ``2 * key_block + full`` for the kept blocks of row ``r = (b·H + h)·nQ + qb`` at
        ``blocks[row_ptr[r]:row_ptr[r + 1]]``, key blocks ascending.
    """
    nk = kept.shape[-1]
    flat = kept.reshape(-1, nk)
    row_ptr = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=kept.device)
    torch.cumsum(flat.sum(1), 0, out=row_ptr[1:])
    idx = flat.reshape(-1).nonzero().squeeze(1)  # row-major: each row's key blocks ascending
    blocks = ((idx % max(nk, 1)) * 2 + full.reshape(-1)[idx].long()).to(torch.int32)
    return row_ptr, blocks


def triton_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    stats: AttentionStats | None = None,
) -> torch.Tensor:
    """The Triton block loop for a :class:`~adaspark.ops.attention.blocks.BlockPlan` (adds
    ``executed`` to ``stats``). Queries may be fewer than keys (new tokens after a cache)."""
    err = triton_error(q.device)
    if err is not None:
        raise RuntimeError(f"the triton attention kernel cannot run here: {err}")
    sel, pat, scale = plan.selection, plan.pattern, plan.inputs.scale
    block = pat.block
    if block not in _BLOCKS:
        raise ValueError(f"the triton kernel needs query_block in {_BLOCKS}, got {block}")
    bsz, hq, nq, d = q.shape
    hkv = k.shape[1]
    sq, sk = pat.q_pos.shape[1], pat.k_pos.shape[1]
    n_qb = sq // block
    k, v = k.to(q.dtype), v.to(q.dtype)
    kp = rows_to_slots(k, pat.k_perm).contiguous()
    vp = rows_to_slots(v, pat.k_perm).contiguous()
    q_perm = pat.q_perm.contiguous()  # -1 at empty slots: nothing loaded or stored there
    table = sel.table.to(torch.uint8).contiguous()
    row_ptr, blocks = kept_block_lists(pat.kept, pat.full)
    out = torch.empty(bsz, hq, nq, d, dtype=q.dtype, device=q.device)
    if out.numel():
        bd = max(16, 1 << (d - 1).bit_length())
        _jit(q.device.type == "cpu")[(n_qb, bsz * hq)](
            q, kp, vp, out,
            q_perm, pat.q_pos.contiguous(), pat.q_unit.contiguous(), pat.q_valid.to(torch.uint8),
            pat.k_pos.contiguous(), pat.k_cls.contiguous(), pat.k_valid.to(torch.uint8),
            table, row_ptr, blocks,
            float(scale) * 1.4426950408889634,
            *q.stride(), *out.stride(), *kp.stride()[:3], *vp.stride()[:3],
            hq, hq // hkv, nq, sq, sk, n_qb, table.shape[2], table.shape[3], d,
            BLOCK=block, BLOCK_D=bd, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=4 if block <= 64 else 8, num_stages=2,
        )  # fmt: skip
    if stats is not None:
        stats.executed += pat.executed
    return out


def cube_sparse_attention_triton(
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
    query_block: int = TRITON_BLOCK,
    granularity: str = "token",
) -> torch.Tensor:
    """AdaS-Attn with the Triton kernel (same signature as the reference).

    ``query_block`` is the block size in tokens (queries and keys; 16, 32, 64 or 128), default one
    4×4×4 cube. The two steps, :func:`~adaspark.ops.attention.blocks.plan_blocks` then
    :func:`~adaspark.ops.attention.blocks.run_blocks` with :func:`triton_kernel`, are public.
    """
    inp = prepare_inputs(
        q, k, v, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
        mean_keys=mean_keys, index=index, granularity=granularity,
    )  # fmt: skip
    plan = plan_blocks(q, inp, block=query_block, stats=stats)
    return run_blocks(q, k, v, plan, kernel=triton_kernel, stats=stats)
