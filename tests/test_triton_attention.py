"""The ``triton`` backend equals the reference.

Without a GPU the Triton program runs in Triton's interpreter (``TRITON_INTERPRET=1``, set per test
by the ``triton_interpreter`` fixture) on CPU tensors, in float32 only: the interpreter multiplies
bfloat16 bit patterns in ``tl.dot`` (triton issue #11584), so bfloat16 is tested on CUDA
(``cuda``-marked tests). The same program is compiled ahead of time for an sm_90 target here (no
GPU needed), so a GPU-only compile error cannot hide. Without triton installed these tests skip,
except the ones proving that the package works without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

from adaspark.ops import AttentionStats, SelectionPolicy, cube_sparse_attention
from adaspark.ops.attention import (
    cube_sparse_attention_reference,
    plan_blocks,
    prepare_inputs,
    reference_attention_mask,
    resolve_attention_backend,
    run_blocks,
)
from adaspark.ops.attention.triton_kernel import (
    cube_sparse_attention_triton,
    kept_block_lists,
    triton_available,
    triton_kernel,
)

from test_attention import CASES, make_case

GRANS = ["token", "cube"]
POLS = [SelectionPolicy(p=0.3), SelectionPolicy(p=0.8), SelectionPolicy(kind="top_k", k=2)]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and triton"
)


def _pol_id(p):
    return f"{p.kind}-{p.p if p.kind == 'top_p' else p.k}"


def _dense_truth(q, k, v, km):
    """Causal softmax attention in float64 (queries = the last Nq keys; padding rows and queries 0)."""
    bsz, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    kr = k.double().repeat_interleave(hq // hkv, 1)
    vr = v.double().repeat_interleave(hq // hkv, 1)
    s = q.double() @ kr.transpose(-1, -2) * q.shape[-1] ** -0.5
    kpos = torch.arange(nk)
    allowed = (kpos[None, :] <= kpos[nk - nq :, None])[None]
    valid = torch.ones(bsz, nk, dtype=torch.bool) if km is None else km
    allowed = allowed & valid[:, None, :] & valid[:, nk - nq :, None]
    w = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    return w @ vr


# --------------------------------------------------------------------------- without triton
def test_kept_block_lists_hold_exactly_the_kept_blocks():
    g = torch.Generator().manual_seed(0)
    kept = torch.rand(2, 3, 5, 7, generator=g) < 0.4
    kept[0, 1, 2] = False  # an empty row
    full = kept & (torch.rand(2, 3, 5, 7, generator=g) < 0.5)
    row_ptr, blocks = kept_block_lists(kept, full)
    assert row_ptr.dtype == torch.int64 and blocks.dtype == torch.int32
    assert row_ptr.shape == (2 * 3 * 5 + 1,) and int(row_ptr[-1]) == int(kept.sum())
    for r, (kr, fr) in enumerate(zip(kept.reshape(-1, 7), full.reshape(-1, 7), strict=True)):
        got = blocks[row_ptr[r] : row_ptr[r + 1]].tolist()
        assert got == [2 * kb + int(fr[kb]) for kb in kr.nonzero().squeeze(1).tolist()]


def test_auto_picks_triton_on_cuda_prefill_only(monkeypatch):
    import adaspark.ops.attention as attn

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(attn, "native_available", lambda dev: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even with the interpreter on, never on CPU
    monkeypatch.setattr(attn, "triton_available", lambda dev: True)
    for dt in (torch.float32, torch.bfloat16):
        assert resolve_attention_backend("auto", cpu, dt, num_tokens=8192) != "triton"
        assert resolve_attention_backend("auto", cuda, dt, num_tokens=100) == "triton"
        assert resolve_attention_backend("auto", cuda, dt, num_tokens=100, needs_grad=True) != "triton"
        assert resolve_attention_backend("auto", cuda, dt, prefill=False, granularity="cube") != "triton"
    monkeypatch.setattr(attn, "triton_available", lambda dev: False)
    monkeypatch.setattr(attn, "flex_available", lambda dev: True)
    assert resolve_attention_backend("auto", cuda, torch.bfloat16, num_tokens=8192) == "flex"


def test_every_attention_backend_has_an_ffn_path():
    """A config's ``backend`` also names the FFN path: every attention backend must map to one."""
    from adaspark.ops.attention import ATTENTION_BACKENDS
    from adaspark.ops.ffn import resolve_ffn_backend

    for name in ("auto", *ATTENTION_BACKENDS):
        assert resolve_ffn_backend(name) == ("reference" if name == "reference" else "gathered"), name


def test_cpu_without_the_interpreter_raises_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available("cpu")
    q, k, v, ids, km = make_case(CASES[3])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cube_sparse_attention_triton(q, k, v, ids, 0.5, key_mask=km)


def test_package_works_without_triton():
    """``import adaspark`` and every other backend work when triton cannot be imported; the triton
    backend says why it cannot run (a fresh interpreter with ``import triton`` blocked)."""
    code = textwrap.dedent(
        """
        import importlib.abc, os, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("blocked for the test")

        sys.meta_path.insert(0, Block())
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        import adaspark
        from adaspark.ops import cube_sparse_attention
        from adaspark.ops.attention import resolve_attention_backend, triton_available

        assert "triton" not in sys.modules
        assert not triton_available("cpu") and not triton_available("cuda")
        assert resolve_attention_backend("auto", torch.device("cuda"), torch.bfloat16) != "triton"
        q = torch.randn(1, 2, 20, 8); ids = torch.full((1, 20), -1); ids[0, 2:18] = torch.arange(16) // 4
        cube_sparse_attention(q, q[:, :1], q[:, :1], ids, 0.5, backend="gather")
        try:
            cube_sparse_attention(q, q[:, :1], q[:, :1], ids, 0.5, backend="triton")
        except RuntimeError as e:
            assert "pip install" in str(e), e
        else:
            raise AssertionError("the triton backend ran without triton")
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


# --------------------------------------------------------------------------- the interpreter (CPU)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("pol", POLS, ids=_pol_id)
def test_triton_equals_reference(case, gran, pol, triton_interpreter, nan_empty):
    """Prefill and new tokens after a cache (1 and 5 queries), 64-token blocks."""
    q, k, v, ids, km = make_case(case)
    ref = cube_sparse_attention_reference(q, k, v, ids, policy=pol, key_mask=km, granularity=gran)
    for nq in sorted({q.shape[2], 1, 5}):
        if nq > q.shape[2]:
            continue
        qs = q[:, :, q.shape[2] - nq :]
        out = cube_sparse_attention_triton(qs, k, v, ids, policy=pol, key_mask=km, granularity=gran)
        assert nan_empty.poisoned(out), "the triton kernel's output allocation escapes the NaN poison"
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, ref[:, :, ref.shape[2] - nq :], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("case", [CASES[3], CASES[4]], ids=["gqa", "batch_padding"])
def test_small_blocks_mix_skipped_partial_and_full(case, gran, triton_interpreter, nan_empty):
    """16-token blocks: the plan holds skipped, partial and full blocks, and the kernel is exact."""
    q, k, v, ids, km = make_case(case, seed=1)
    ref = cube_sparse_attention_reference(q, k, v, ids, 0.9, key_mask=km, granularity=gran)
    plan = plan_blocks(q, prepare_inputs(q, k, v, ids, 0.9, key_mask=km, granularity=gran), block=16)
    kept, full = plan.pattern.kept, plan.pattern.full
    assert full.any() and (kept & ~full).any() and (~kept).any()
    out = run_blocks(q, k, v, plan, kernel=triton_kernel)
    assert nan_empty.poisoned(out) and not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_kernel_visits_only_the_kept_blocks_and_masks_only_partial_ones(triton_interpreter):
    """Doctor the block map: a kept block dropped from the list must be skipped, a partial block
    flagged full must be attended whole (future keys too). The output must follow the doctored map
    (computed here in PyTorch), not the reference — so neither step can be a no-op."""
    q, k, v, ids, _km = make_case(CASES[2], seed=4)
    blk, hq = 16, q.shape[1]
    plan = plan_blocks(q, prepare_inputs(q, k, v, ids, 0.8), block=blk)
    pat = plan.pattern
    kept, full = pat.kept.clone(), pat.full.clone()
    n_kb = kept.shape[-1]
    partial = (kept & ~full)[0, 0].nonzero().tolist()  # head 0
    diag = [(i, j) for i, j in partial if i == j and j < n_kb - 1]  # holds future keys, no padding
    qb, kb = diag[len(diag) // 2]
    full[0, 0, qb, kb] = True
    drop = next((i, j) for i, j in kept[0, 1].nonzero().tolist() if j < i)  # head 1, an earlier block
    kept[0, 1, drop[0], drop[1]] = False
    full[0, 1, drop[0], drop[1]] = False
    doctored = dataclasses.replace(plan, pattern=dataclasses.replace(pat, kept=kept, full=full))
    out = triton_kernel(q, k, v, doctored)
    # the doctored map at token level, in the kernel's slot order (cube-major, block-aligned)
    slot = pat.k_slot[0]  # slot of every token
    s = pat.k_perm.shape[1]
    tok = torch.zeros(hq, s, s, dtype=torch.bool)
    tok[:, slot[:, None], slot[None, :]] = reference_attention_mask(q, k, ids, 0.8)[0]
    up = lambda m: m[0].repeat_interleave(blk, -1).repeat_interleave(blk, -2)  # noqa: E731
    allowed = (up(kept) & (tok | up(full)))[:, slot][:, :, slot]  # back in token order
    qd, kd, vd = q[0].double(), k[0].double(), v[0].double()
    sc = (qd @ kd.transpose(-1, -2)) * q.shape[-1] ** -0.5
    want = torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1) @ vd
    ref = cube_sparse_attention_reference(q, k, v, ids, 0.8)
    changed = (want[None].float() - ref).abs().amax(-1) > 1e-3  # [1, Hq, N]
    assert changed[0, 0].any() and changed[0, 1].any() and not changed[0, 2:].any()
    torch.testing.assert_close(out.double(), want[None], atol=1e-5, rtol=1e-5)
    assert hq == 4


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("case", CASES[1:], ids=[c[0] for c in CASES[1:]])
def test_p1_equals_dense_through_the_kernel(case, gran, triton_interpreter, nan_empty, monkeypatch):
    """p = 1 through the kernel itself (never the dense short cut): prefill and 3 new tokens."""
    import adaspark.ops.attention as attn

    def no_dense(*a, **kw):
        raise AssertionError("the triton backend took the dense short cut at p = 1")

    monkeypatch.setattr(attn, "dense_causal_attention", no_dense)
    q, k, v, ids, km = make_case(case, seed=5)
    for nq in sorted({q.shape[2], min(3, q.shape[2])}):
        qs = q[:, :, q.shape[2] - nq :]
        st = AttentionStats(q.shape[1], q.shape[3])
        out = cube_sparse_attention(
            qs, k, v, ids, 1.0, key_mask=km, backend="triton", granularity=gran, stats=st, query_block=32
        )
        assert nan_empty.poisoned(out) and not out.isnan().any()
        torch.testing.assert_close(out.double(), _dense_truth(qs, k, v, km), atol=1e-5, rtol=1e-5)
        assert st.density == 1.0 and st.dense_fallbacks == 0


@pytest.mark.parametrize("gran", GRANS)
def test_stats_equal_brute_force(gran, triton_interpreter):
    q, k, v, ids, km = make_case(CASES[4])
    st = AttentionStats(q.shape[1], q.shape[3])
    cube_sparse_attention(
        q, k, v, ids, 0.6, key_mask=km, backend="triton", granularity=gran, stats=st, query_block=32
    )
    mask = reference_attention_mask(q, k, ids, 0.6, key_mask=km, granularity=gran)
    plan = plan_blocks(q, prepare_inputs(q, k, v, ids, 0.6, key_mask=km, granularity=gran), block=32)
    assert st.attended.tolist() == mask.sum(dim=(0, 2, 3)).double().tolist()
    assert st.executed == plan.executed >= st.attended.sum() > 0
    every_block = int(plan.pattern.q_valid.sum()) * plan.pattern.k_pos.shape[1] * q.shape[1]
    assert st.executed < every_block  # the skipped blocks are not counted


@pytest.mark.parametrize("where", ["q", "k", "text k", "v"])
def test_nonfinite_inputs_are_never_silently_dropped(where, triton_interpreter):
    """The rule of tests/test_nonfinite.py: every query attending a NaN (or holding one) gives NaN."""
    q, k, v, ids, _km = make_case(CASES[5], seed=2)
    pos = {"q": 100, "k": 90, "text k": 3, "v": 90}[where]
    q, k, v = q.clone(), k.clone(), v.clone()
    {"q": q, "k": k, "text k": k, "v": v}[where][0, :, pos, 1] = float("nan")
    out = cube_sparse_attention_triton(q, k, v, ids, 0.5, query_block=32)
    if where == "q":
        affected = torch.zeros(1, q.shape[1], q.shape[2], dtype=torch.bool)
        affected[..., pos] = True
    else:
        affected = reference_attention_mask(q, k, ids, 0.5)[..., pos]  # [1, Hq, N]: queries attending pos
    assert affected.sum() >= 2
    assert out[affected].isnan().any(dim=-1).all(), "a NaN input was silently dropped"


def test_rejects_block_sizes_tl_dot_cannot_tile(triton_interpreter):
    q, k, v, ids, _km = make_case(CASES[3])
    with pytest.raises(ValueError, match="query_block"):
        cube_sparse_attention_triton(q, k, v, ids, 0.5, query_block=24)


# --------------------------------------------------------------------------- the GPU program
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'adaspark[triton]')")
@pytest.mark.parametrize(
    ("dtype", "block", "head_dim"), [("bf16", 64, 128), ("fp32", 32, 16)], ids=["bf16-64-d128", "fp32-32-d16"]
)
def test_program_compiles_for_sm90(dtype, block, head_dim):
    """Ahead-of-time compile to an sm_90 cubin (no GPU needed): the compiled path type-checks."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from adaspark.ops.attention.triton_kernel import _jit

    fn = _jit(False)
    ptrs = {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")}
    ptrs |= {n: "*i64" for n in ("q_perm", "q_pos", "q_unit", "k_pos", "k_cls", "row_ptr")}
    ptrs |= {"q_valid": "*u8", "k_valid": "*u8", "table": "*u8", "blocks": "*i32", "sm_scale": "fp32"}
    const = {"BLOCK": block, "BLOCK_D": head_dim, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in fn.arg_names}
    try:
        compiled = triton.compile(
            ASTSource(fn, sig, constexprs=const),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4, "num_stages": 2},
        )
    except RuntimeError as e:  # no ptxas with this triton build: nothing to check here
        if "ptxas" in str(e).lower():
            pytest.skip(f"no ptxas: {e}")
        raise
    assert compiled.asm["cubin"] and "block_sparse_attention_fwd" in compiled.asm["ptx"]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("gran", GRANS)
def test_cuda_equals_reference_and_auto_picks_triton(gran):
    q, k, v, ids, km = (t.cuda() if t is not None else None for t in make_case(CASES[4]))
    assert resolve_attention_backend("auto", q.device, q.dtype, num_tokens=q.shape[2]) == "triton"
    ref = cube_sparse_attention_reference(q, k, v, ids, 0.6, key_mask=km, granularity=gran)
    for be, blk in (("triton", 16), ("triton", 64), ("auto", None)):
        out = cube_sparse_attention(
            q, k, v, ids, 0.6, key_mask=km, backend=be, granularity=gran, query_block=blk
        )
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        out = cube_sparse_attention(
            q[:, :, -5:],
            k,
            v,
            ids,
            0.6,
            key_mask=km,
            backend="triton",
            granularity=gran,
            query_block=blk or 64,
        )
        torch.testing.assert_close(out, ref[:, :, -5:], atol=2e-5, rtol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=["gqa", "two_videos_text"])
def test_cuda_bf16_error_within_twice_pytorch(case):
    q, k, v, ids, km = (
        t.cuda() if t is not None else None for t in make_case(case, dtype=torch.bfloat16, seed=3)
    )
    for gran in GRANS:
        truth = cube_sparse_attention_reference(
            q.float(), k.float(), v.float(), ids, 0.7, key_mask=km, granularity=gran
        )
        own = cube_sparse_attention_reference(q, k, v, ids, 0.7, key_mask=km, granularity=gran)
        for blk in (32, 64):
            fast = cube_sparse_attention(
                q, k, v, ids, 0.7, key_mask=km, backend="triton", granularity=gran, query_block=blk
            )
            assert fast.dtype == torch.bfloat16
            err_own = (own.float() - truth).abs().max().item()
            err_fast = (fast.float() - truth).abs().max().item()
            assert err_fast <= 2 * err_own, (gran, blk, err_fast, err_own)
