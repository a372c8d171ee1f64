"""Native AdaS-Attn: a C++ block-sparse flash-attention loop for the CPU (``csrc/block_attention.cpp``).

Same selection and block pattern as :mod:`adaspark.ops.attention.gather` (cube-major order, 64-token
blocks); the kernel walks, per (sample, GQA group, query block), only the key blocks its heads keep,
in chunks: one matrix product per chunk (keys read in place when the chunk's blocks are consecutive),
the token mask only on partial blocks, an online softmax, and ``O += P V``. Tasks run on the intra-op
threads. No score matrix larger than a chunk and no additive bias are materialised, which is where
the gather loop spends its time.

Computation is in float32 (bfloat16/float16 inputs are converted once, with the cube-major
permutation, and the output converted back): on CPUs without native bf16 that is also the fast way.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (g++ and ninja;
about a minute, cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and
registers ``torch.ops.adaspark.block_attention``. :func:`native_available` says whether it can be
built here; ``auto`` uses it only then (:func:`~adaspark.ops.attention.resolve_attention_backend`).
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from pathlib import Path

import torch

from adaspark.ops.attention.blocks import BlockPlan, plan_blocks, rows_from_slots, rows_to_slots, run_blocks
from adaspark.ops.attention.common import AttentionStats, prepare_inputs
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy

__all__ = [
    "NATIVE_BLOCK",
    "NATIVE_CHUNK_KEYS",
    "cube_sparse_attention_native",
    "load_native",
    "native_available",
    "native_kernel",
]

#: block size of the native path (one 4×4×4 cube)
NATIVE_BLOCK = 64
#: keys per step of the online softmax (a chunk of key blocks: one matrix product)
NATIVE_CHUNK_KEYS = 1024
#: with at most this many query rows per GQA group (queries × heads per group: decoding), the group's
#: heads are stacked into one task (longer inputs: one task per query head and block, measured faster
#: at 16k tokens: the score chunk of one head stays in the L2 cache)
STACK_MAX_ROWS = 64
#: ... unless the busiest head keeps fewer than this fraction of the blocks of the group's union
STACK_FRACTION = 0.7

_SOURCE = Path(__file__).with_name("csrc") / "block_attention.cpp"
_LOCK = threading.Lock()
_ERROR: list[str] = []
_LOADED: list[bool] = []


@functools.cache
def _compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


@functools.cache
def _ninja() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except ImportError:  # pragma: no cover - old PyTorch
        return False
    return is_ninja_available()


@functools.cache
def kernel_version() -> str:
    """A short hash of the kernel's C++ source: measured costs of one build do not carry over to
    another (the cost model's cache keys include it)."""
    import hashlib

    return hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]


@functools.cache
def _exports_sgemm() -> bool:
    """Whether libtorch exports the BLAS ``sgemm_`` it was linked with (x86 wheels: MKL), so that the
    kernel can call it on strided tiles directly (otherwise it uses ATen products;
    ``ADASPARK_NATIVE_NO_SGEMM=1`` forces that path)."""
    import ctypes

    if os.environ.get("ADASPARK_NATIVE_NO_SGEMM") == "1":
        return False

    lib = Path(torch.__file__).with_name("lib") / "libtorch_cpu.so"
    try:
        return hasattr(ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL), "sgemm_")
    except OSError:
        return False


@functools.cache
def _build() -> bool:
    from torch.utils.cpp_extension import load

    flags = ["-O3", "-march=native", "-fopenmp"]
    if _exports_sgemm():
        flags.append("-DADASPARK_SGEMM")
    try:
        load(
            name="adaspark_block_attention",
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a failed build leaves the other backends
        _ERROR.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
        return False
    return hasattr(torch.ops.adaspark, "block_attention")


def load_native() -> bool:
    """Build (once per process; cached on disk) and load the extension; ``False`` if it cannot be
    built here (no C++ compiler or ninja, or the build failed: :func:`native_error` says why)."""
    if _LOADED:
        return _LOADED[0]
    if not (_compiler() and _ninja()):
        return False
    with _LOCK:
        ok = _build()
    _LOADED.append(ok)
    return ok


def native_error() -> str | None:
    """Why the extension is not available (``None`` if it is, or was never tried)."""
    if not _compiler():
        return "no C++ compiler (g++) on PATH"
    if not _ninja():
        return "ninja is not installed (pip install ninja)"
    return _ERROR[0] if _ERROR else None


def native_available(device: torch.device | str = "cpu") -> bool:
    """Whether the native kernel runs for ``device`` (CPU only; builds the extension on first call)."""
    if torch.device(device).type != "cpu":
        return False
    if os.environ.get("ADASPARK_NATIVE", "1") == "0":
        return False
    return load_native()


def native_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    stats: AttentionStats | None = None,
) -> torch.Tensor:
    """The C++ block loop for a :class:`~adaspark.ops.attention.blocks.BlockPlan` (adds ``executed``
    to ``stats``). Queries may be fewer than keys (new tokens after a cache)."""
    if not load_native():
        raise RuntimeError(f"the native attention kernel is not available: {native_error()}")
    sel, pat, scale = plan.selection, plan.pattern, plan.inputs.scale
    bsz, hq, nq, _d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    block = pat.block
    kept, full = pat.kept, pat.full
    kind = kept.to(torch.uint8) + full.to(torch.uint8)  # 0 skip, 1 partial, 2 full
    group, executed = 1, pat.executed
    if g > 1 and nq * g <= STACK_MAX_ROWS:
        # few queries (decoding): stack a group's heads into one task, unless they keep very
        # different blocks (their union would cost more than each head's own set)
        union = kept.view(bsz, hkv, g, *kept.shape[2:]).any(2).sum(-1)  # [B, Hkv, nQ]
        busiest = kept.sum(-1).view(bsz, hkv, g, -1).amax(2)
        if not bool((busiest < STACK_FRACTION * union).any()):
            group = g
            n_qv = pat.q_valid.view(bsz, -1, block).sum(-1)  # [B, nQ]
            executed = int((union * n_qv[:, None]).sum()) * block * g
    qp = rows_to_slots(q, pat.q_perm).float().contiguous()
    kp = rows_to_slots(k, pat.k_perm).float().contiguous()
    vp = rows_to_slots(v, pat.k_perm).float().contiguous()
    chunk = max(1, NATIVE_CHUNK_KEYS // block)
    outp = torch.ops.adaspark.block_attention(
        qp, kp, vp, kind.contiguous(), sel.table.to(torch.uint8).contiguous(),
        pat.q_unit, pat.k_cls, pat.q_pos, pat.k_pos,
        pat.k_valid.to(torch.uint8), pat.q_valid.to(torch.uint8),
        block, group, chunk, float(scale),
    )  # fmt: skip
    out = rows_from_slots(outp.to(q.dtype), pat.q_slot)
    if stats is not None:
        stats.executed += executed
    return out


def cube_sparse_attention_native(
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
    query_block: int = NATIVE_BLOCK,
    granularity: str = "token",
) -> torch.Tensor:
    """AdaS-Attn with the native C++ kernel (same signature as the reference).

    ``query_block`` is the block size in tokens (queries and keys), default one 4×4×4 cube. The two
    steps, :func:`~adaspark.ops.attention.blocks.plan_blocks` then
    :func:`~adaspark.ops.attention.blocks.run_blocks` with :func:`native_kernel`, are public.
    """
    inp = prepare_inputs(
        q, k, v, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
        mean_keys=mean_keys, index=index, granularity=granularity,
    )  # fmt: skip
    plan = plan_blocks(q, inp, block=query_block, stats=stats)
    return run_blocks(q, k, v, plan, kernel=native_kernel, stats=stats)
