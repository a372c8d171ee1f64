"""AdaS-Attn: adaptive cube-selective attention and dense causal attention.

Backends (all exact: same mask as the reference, errors within 2× PyTorch's own at the dtype):

* ``reference`` – materialises the token mask (tests, small inputs);
* ``blocked`` – per query block of the original order, gathers the union of kept keys (per-token
  selection only);
* ``decode`` – a few new tokens after a cache: per KV head, only the K/V of the cubes some head of
  its group keeps are gathered; one SDPA call with the group's heads stacked;
* ``gather`` – cube-major blocks, kept key blocks gathered per GQA group, one SDPA per block;
* ``flex`` – compiled ``flex_attention`` with a ``BlockMask`` from the selection (prefill);
* ``native`` – the C++ block-sparse loop for the CPU (:mod:`.native`);
* ``triton`` – the Triton block-sparse program for CUDA (:mod:`.triton_kernel`; CPU tensors only in
  Triton's interpreter, ``TRITON_INTERPRET=1``; ``pip install 'adaspark[triton]'``);
* ``auto`` – dense SDPA when the policy keeps everything (only ``auto`` takes this short cut: a
  backend chosen by name runs its own kernel at ``p = 1`` too), ``decode`` for up to 64 new tokens
  after a cache (``blocked`` for more; ``gather`` for video queries at cube granularity),
  ``native`` for prefill on CPU when it builds, ``triton`` for prefill on CUDA when triton is
  installed (no gradients), else ``flex`` for prefill from ``flex_min_tokens``
  (:data:`FLEX_MIN_TOKENS`, 4096) tokens on CUDA and on CPU (bfloat16, float32) when a C++ compiler
  is there, ``gather`` otherwise. (The gather loop
  was meant for float32 on CPU; flex is preferred there too. No results file backs that comparison:
  ``benchmarks/attention_speed.py --backends gather flex`` measures it.)

The block backends (``gather``, ``flex``) have two public steps, :func:`plan_blocks` (selection and
block pattern, a :class:`BlockPlan`) and :func:`run_blocks` (a kernel of :data:`BLOCK_KERNELS`);
the dispatcher's ``dense_fallback`` reads the plan before deciding which attention to run.
"""

from __future__ import annotations

import torch

from adaspark.ops.attention.blocked import DENSE_BLOCK_FRACTION, cube_sparse_attention_blocked
from adaspark.ops.attention.blocks import BlockPlan, plan_blocks, run_blocks
from adaspark.ops.attention.common import (
    GRANULARITIES,
    SELECT_BLOCK,
    AttentionInputs,
    AttentionStats,
    causal_valid_pairs,
    check_attention_inputs,
    check_granularity,
    prepare_inputs,
)
from adaspark.ops.attention.cost import CostFit, CostModel, estimate_executed
from adaspark.ops.attention.decode import DECODE_MAX_QUERIES, GATHER_FRACTION, cube_sparse_attention_decode
from adaspark.ops.attention.dense import dense_causal_attention
from adaspark.ops.attention.flex import FLEX_BLOCK, cube_sparse_attention_flex, flex_available, flex_kernel
from adaspark.ops.attention.gather import GATHER_BLOCK, cube_sparse_attention_gather, gather_kernel
from adaspark.ops.attention.native import (
    NATIVE_BLOCK,
    cube_sparse_attention_native,
    native_available,
    native_kernel,
)
from adaspark.ops.attention.reference import (
    cube_sparse_attention_reference,
    reference_attention_mask,
    reference_cube_keep,
)
from adaspark.ops.attention.triton_kernel import (
    TRITON_BLOCK,
    cube_sparse_attention_triton,
    triton_available,
    triton_kernel,
)
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy, as_policy

__all__ = [
    "ATTENTION_BACKENDS",
    "BACKEND_GRANULARITIES",
    "BLOCK_KERNELS",
    "DENSE_BLOCK_FRACTION",
    "FLEX_MIN_TOKENS",
    "GATHER_FRACTION",
    "GRANULARITIES",
    "SELECT_BLOCK",
    "AttentionInputs",
    "AttentionStats",
    "BlockPlan",
    "CostFit",
    "CostModel",
    "backend_after_cache",
    "cube_sparse_attention",
    "cube_sparse_attention_blocked",
    "cube_sparse_attention_decode",
    "cube_sparse_attention_flex",
    "cube_sparse_attention_gather",
    "cube_sparse_attention_reference",
    "cube_sparse_attention_triton",
    "dense_causal_attention",
    "plan_blocks",
    "prepare_inputs",
    "reference_attention_mask",
    "reference_cube_keep",
    "resolve_attention_backend",
    "run_blocks",
]

#: shortest prefill for which ``auto`` compiles flex_attention, and from which ``dense_fallback`` is
#: decided (the default of ``flex_min_tokens``)
FLEX_MIN_TOKENS = 4096

ATTENTION_BACKENDS = {
    "reference": cube_sparse_attention_reference,
    "blocked": cube_sparse_attention_blocked,
    "decode": cube_sparse_attention_decode,
    "gather": cube_sparse_attention_gather,
    "flex": cube_sparse_attention_flex,
    "native": cube_sparse_attention_native,
    "triton": cube_sparse_attention_triton,
}

#: the kernels of the block backends, for :func:`~adaspark.ops.attention.blocks.run_blocks`
BLOCK_KERNELS = {
    "gather": gather_kernel,
    "flex": flex_kernel,
    "native": native_kernel,
    "triton": triton_kernel,
}
#: the default block size of each block backend
_BLOCK_SIZES = {"gather": GATHER_BLOCK, "flex": FLEX_BLOCK, "native": NATIVE_BLOCK, "triton": TRITON_BLOCK}

#: the selection granularities each backend implements for video queries. ``blocked`` and
#: ``decode`` select per token; they accept ``granularity="cube"`` only for calls without video
#: queries (new text tokens after a cache), where both granularities coincide, and raise otherwise.
BACKEND_GRANULARITIES: dict[str, tuple[str, ...]] = {
    "auto": GRANULARITIES,
    "reference": GRANULARITIES,
    "blocked": ("token",),
    "decode": ("token",),
    "gather": GRANULARITIES,
    "flex": GRANULARITIES,
    "native": GRANULARITIES,
    "triton": GRANULARITIES,
}


def backend_after_cache(backend: str, nq: int, nk: int) -> str:
    """The backend to name for ``nq`` queries over ``nk`` keys when ``backend`` is configured:
    ``flex`` is a prefill kernel, so new tokens after a cache (``nq < nk``) take ``auto``'s path;
    every other backend is kept."""
    return "auto" if backend == "flex" and nq != nk else backend


def resolve_attention_backend(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    prefill: bool = True,
    granularity: str = "token",
    video_queries: bool = True,
    num_tokens: int = FLEX_MIN_TOKENS,
    num_queries: int = 1,
    flex_min_tokens: int = FLEX_MIN_TOKENS,
    needs_grad: bool = False,
) -> str:
    """The concrete backend ``"auto"`` stands for on this device/dtype and call shape.

    On CPU, ``native`` (the C++ kernel) for prefill and for chunks with video queries whenever it
    can be built and no gradient is needed; on CUDA, ``triton`` for prefill when triton is
    installed and no gradient is needed (never on CPU: there it would run interpreted); otherwise
    flex (CUDA, or CPU with a compiler and no gradient) from ``flex_min_tokens``
    (:data:`FLEX_MIN_TOKENS`) tokens on — below that, its compile time (seconds per new shape) is
    not paid back — and gather below.
    """
    if backend != "auto":
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"unknown attention backend {backend!r}; choose from 'auto', {sorted(ATTENTION_BACKENDS)}"
            )
        return backend
    dev = torch.device(device)
    native = dev.type == "cpu" and not needs_grad and native_available(dev)
    if not prefill:
        # new tokens after a cache: per-token selection, only the kept cubes' K/V are read
        if granularity == "cube" and video_queries:
            return "native" if native else "gather"
        return "decode" if num_queries <= DECODE_MAX_QUERIES else "blocked"
    if native:
        return "native"
    if dev.type == "cuda" and not needs_grad and triton_available(dev):
        return "triton"
    # FlexAttention has no backward on CPU: a training step there takes gather
    cpu_ok = dev.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and not needs_grad
    if (dev.type == "cuda" or cpu_ok) and num_tokens >= flex_min_tokens and flex_available(dev):
        return "flex"
    return "gather"


def cube_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
    mean_keys: torch.Tensor | None = None,
    index: CubeIndex | None = None,
    stats: AttentionStats | None = None,
    query_block: int | None = None,
    granularity: str = "token",
    dense_fallback: float | None = None,
    flex_min_tokens: int = FLEX_MIN_TOKENS,
    decode_gather_fraction: float = GATHER_FRACTION,
    blocked_dense_fraction: float = DENSE_BLOCK_FRACTION,
    cost_model: CostModel | None = None,
) -> torch.Tensor:
    """Adaptive cube-selective causal attention (AdaS-Attn).

    Each query scores every earlier cube ``j`` other than its own by ``q · k̄_j · scale`` (``k̄_j``
    = mean key of cube ``j``), softmaxes over those candidates, keeps the Top-p set (per query head),
    and attends: all non-video keys, its own cube, and the kept cubes — always causally. With
    ``granularity="cube"`` all video queries of a cube share one kept set, the Top-p set of the
    average of their distributions (non-video queries still select per token).

    Args:
        q: ``[B, Hq, Nq, D]`` queries; they are the last ``Nq`` positions of the keys.
        k: ``[B, Hkv, Nk, D]`` keys (``Hq % Hkv == 0``; GQA without repeating K/V).
        v: ``[B, Hkv, Nk, D]`` values.
        cube_ids: ``[B, Nk]`` int64 cube id of every key position, ``-1`` = not video.
        p: Top-p threshold in (0, 1] (ignored when ``policy`` is given). ``p = 1`` is dense.
        policy: A :class:`~adaspark.ops.selection.SelectionPolicy` (top_p / top_k / ratio).
        scale: Score scale, default ``D ** -0.5``.
        key_mask: ``[B, Nk]`` bool, False for padding (padding queries return zeros).
        backend: ``"auto"``, ``"reference"``, ``"blocked"``, ``"decode"``, ``"gather"`` or ``"flex"``.
            Only ``"auto"`` runs dense SDPA when the policy keeps everything; a backend given by name
            runs its own kernel at ``p = 1`` too (what the "p = 1 equals dense" tests rely on).
        mean_keys: Optional cached ``[B, Hkv, C, D]`` float32 cube mean keys (decoding).
        index: Optional precomputed :class:`~adaspark.ops.cubes.CubeIndex` of ``cube_ids``.
        stats: Optional :class:`AttentionStats` to accumulate densities and selection statistics.
        query_block: Block size of the chosen path (``None``: its default — 128 for ``blocked``,
            64 (one 4×4×4 cube) for ``gather`` and ``flex``).
        granularity: ``"token"`` (the reference semantics, :mod:`.reference`) or ``"cube"``.
        dense_fallback: With the block paths (``gather``/``flex``, also when ``auto`` picks them):
            if the kept blocks make up more than this fraction of the causal (query, key) pairs,
            run dense causal attention instead (the sparse kernel would not pay). Decided only from
            ``flex_min_tokens`` keys on (shorter inputs always run the exact sparse path). The
            result is then dense attention — a superset of what AdaS-Attn attends, recorded as density 1 in
            ``stats`` (``stats.dense_fallbacks`` counts such calls; the selection that was made is
            still recorded). ``None`` (default) never falls back, so the output always follows the
            AdaS-Attn semantics exactly.
        flex_min_tokens: ``auto`` picks ``flex`` for prefills from this many tokens on (compiling
            does not pay below), and ``dense_fallback`` is decided from this many keys on
            (default :data:`FLEX_MIN_TOKENS`).
        decode_gather_fraction: ``decode`` gathers the kept K/V up to this fraction of the causal
            prefix and reads the prefix in place above it (default :data:`GATHER_FRACTION`).
        blocked_dense_fraction: ``blocked`` attends a query block's causal prefix in place when it
            keeps at least this fraction of it (default :data:`DENSE_BLOCK_FRACTION`).
            These three are speed trade-offs: none changes which keys are attended.

    Returns:
        ``[B, Hq, Nq, D]`` in the dtype of ``q``.

    Example:
        >>> q = torch.randn(1, 4, 96, 16); k = torch.randn(1, 2, 96, 16); v = torch.randn(1, 2, 96, 16)
        >>> cube_ids = torch.full((1, 96), -1); cube_ids[0, 8:72] = torch.arange(64) // 8
        >>> cube_sparse_attention(q, k, v, cube_ids, p=0.5).shape
        torch.Size([1, 4, 96, 16])
    """
    if isinstance(p, (int, float)) and not isinstance(p, bool) and policy is None and not (0.0 < p <= 1.0):
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    check_granularity(granularity)
    if isinstance(flex_min_tokens, bool) or not isinstance(flex_min_tokens, int) or flex_min_tokens < 0:
        raise ValueError(f"flex_min_tokens must be an integer >= 0, got {flex_min_tokens!r}")
    nq, nk = q.shape[-2], k.shape[-2]
    video_queries = nq == nk or bool((cube_ids[:, nk - nq :] >= 0).any())
    name = resolve_attention_backend(
        backend,
        q.device,
        q.dtype,
        prefill=nq == nk,
        granularity=granularity,
        video_queries=video_queries,
        num_tokens=nk,
        num_queries=nq,
        flex_min_tokens=flex_min_tokens,
        needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
    )
    pol = as_policy(p, policy)
    # the dense short cut is auto's alone: a named backend must run its kernel (tests force it)
    if backend == "auto" and pol.keeps_all:
        check_attention_inputs(q, k, v, cube_ids, key_mask)
        return dense_causal_attention(q, k, v, scale=scale, key_mask=key_mask, stats=stats)
    if name == "flex" and nq != nk:
        raise ValueError(
            f"the 'flex' backend runs prefill only (Nq == Nk), got Nq={nq}, Nk={nk}: new tokens after a "
            "cache need another backend ('auto' picks 'decode' or 'gather' for them)"
        )
    if cost_model is not None and name in BLOCK_KERNELS and nq == nk:
        return _cost_decided(
            q, k, v, cube_ids, p, name, cost_model,
            policy=policy, scale=scale, key_mask=key_mask, mean_keys=mean_keys, index=index,
            granularity=granularity, stats=stats, block=query_block or _BLOCK_SIZES[name],
        )  # fmt: skip
    if dense_fallback is not None and name in BLOCK_KERNELS and nk >= flex_min_tokens:
        if not (0.0 < dense_fallback <= 1.0):
            raise ValueError(f"dense_fallback must be None or in (0, 1], got {dense_fallback!r}")
        inputs = prepare_inputs(
            q, k, v, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
            mean_keys=mean_keys, index=index, granularity=granularity,
        )  # fmt: skip
        plan = plan_blocks(q, inputs, block=query_block or _BLOCK_SIZES[name], stats=stats)
        if plan.executed > dense_fallback * plan.causal_pairs * inputs.hq:
            if stats is not None:
                stats.dense_fallbacks += 1
            return dense_causal_attention(q, k, v, scale=scale, key_mask=key_mask, stats=stats)
        return run_blocks(q, k, v, plan, kernel=BLOCK_KERNELS[name], stats=stats)
    kwargs = {} if query_block is None else {"query_block": query_block}
    if name == "decode":
        kwargs["decode_gather_fraction"] = decode_gather_fraction
    elif name == "blocked":
        kwargs["blocked_dense_fraction"] = blocked_dense_fraction
    return ATTENTION_BACKENDS[name](
        q,
        k,
        v,
        cube_ids,
        p,
        policy=policy,
        scale=scale,
        key_mask=key_mask,
        mean_keys=mean_keys,
        index=index,
        stats=stats,
        granularity=granularity,
        **kwargs,
    )


def _cost_decided(q, k, v, cube_ids, p, name, cost_model, *, stats, block, **kw) -> torch.Tensor:
    """A prefill through block kernel ``name``, or dense where ``cost_model`` says sparse would not pay."""
    inputs = prepare_inputs(q, k, v, cube_ids, p, **kw)
    key = CostModel.key(
        hq=inputs.hq, hkv=inputs.hkv, d=inputs.d, dtype=q.dtype, device=q.device,
        granularity=inputs.granularity, kernel=name,
    )  # fmt: skip
    pairs = float(causal_valid_pairs(inputs.key_mask, inputs.nq).sum())  # over the batch, per head
    cubes = max(inputs.index.max_cubes, 1)
    shape = {"hq": inputs.hq, "d": inputs.d}
    dense = {"scale": inputs.scale, "key_mask": kw.get("key_mask"), "stats": stats}
    estimate = estimate_executed(q, inputs, pairs)
    if cost_model.before(
        key, pairs=pairs, nq=inputs.bsz * inputs.nq, cubes=cubes, estimate=estimate, **shape
    ):
        if stats is not None:
            stats.dense_fallbacks += 1
        return dense_causal_attention(q, k, v, **dense)
    plan = plan_blocks(q, inputs, block=block, stats=stats)
    if cost_model.after(key, pairs=pairs, executed=plan.executed, **shape):
        if stats is not None:
            stats.dense_fallbacks += 1
        return dense_causal_attention(q, k, v, **dense)
    return run_blocks(q, k, v, plan, kernel=BLOCK_KERNELS[name], stats=stats)
