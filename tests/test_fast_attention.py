"""The block paths (gather, flex) and cube-granularity selection equal their references."""

from __future__ import annotations

import pytest
import torch

from adaspark.ops import AttentionStats, SelectionPolicy, cube_sparse_attention
from adaspark.ops.attention import (
    ATTENTION_BACKENDS,
    BACKEND_GRANULARITIES,
    BLOCK_KERNELS,
    FLEX_MIN_TOKENS,
    cube_sparse_attention_flex,
    cube_sparse_attention_gather,
    cube_sparse_attention_reference,
    reference_attention_mask,
    reference_cube_keep,
    resolve_attention_backend,
)
from adaspark.ops.attention.blocks import block_pattern, cube_major_order, plan_blocks, run_blocks
from adaspark.ops.attention.common import prepare_inputs
from adaspark.ops.attention.flex import bucket_length, flex_available
from adaspark.ops.attention.native import cube_sparse_attention_native, native_available
from adaspark.ops.attention.units import (
    attended_pairs,
    cube_unit_probs,
    cube_unit_probs_reference,
    select_units,
    unit_scores,
)
from adaspark.ops.cubes import build_cube_index, cube_mean_keys

from test_attention import CASES, make_case

GRANS = ["token", "cube"]
POLS = [SelectionPolicy(p=0.3), SelectionPolicy(p=0.8), SelectionPolicy(kind="top_k", k=2)]
needs_flex = pytest.mark.skipif(
    not flex_available("cpu"), reason="compiled flex_attention needs a C++ compiler"
)
needs_native = pytest.mark.skipif(
    not native_available("cpu"), reason="the native kernel needs a C++ compiler and ninja"
)
# flex compiles once per shape: a few representative cases
FLEX_CASES = [CASES[1], CASES[3], CASES[4], CASES[5]]


def _pol_id(p):
    return f"{p.kind}-{p.p if p.kind == 'top_p' else p.k}"


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("pol", POLS, ids=_pol_id)
def test_gather_equals_reference(case, gran, pol, nan_empty):
    q, k, v, ids, km = make_case(case)
    ref = cube_sparse_attention_reference(q, k, v, ids, policy=pol, key_mask=km, granularity=gran)
    for blk in (16, 64):
        out = cube_sparse_attention_gather(
            q, k, v, ids, policy=pol, key_mask=km, granularity=gran, query_block=blk
        )
        assert nan_empty.poisoned(out), "the gather kernel's output allocation escapes the NaN poison"
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("pol", POLS, ids=_pol_id)
def test_native_equals_reference(case, gran, pol, nan_empty):
    q, k, v, ids, km = make_case(case)
    ref = cube_sparse_attention_reference(q, k, v, ids, policy=pol, key_mask=km, granularity=gran)
    for blk in (16, 64):
        for nq in sorted({q.shape[2], 1, 5} - {0}):  # prefill, and new tokens after a cache
            if nq > q.shape[2]:
                continue
            qs = q[:, :, q.shape[2] - nq :]
            want = ref[:, :, ref.shape[2] - nq :]
            out = cube_sparse_attention_native(
                qs, k, v, ids, policy=pol, key_mask=km, granularity=gran, query_block=blk
            )
            assert nan_empty.poisoned(out), "the native kernel's output allocation escapes the NaN poison"
            assert not torch.isnan(out).any()
            torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)


@needs_native
def test_native_stacks_gqa_heads_for_few_queries_and_equals_per_head(monkeypatch):
    """Decoding stacks a GQA group's heads into one task; per-head tasks give the same result."""
    import adaspark.ops.attention.native as native

    q, k, v, ids, km = make_case(CASES[3], seed=2)
    qs = q[:, :, -2:]
    ref = cube_sparse_attention_reference(qs, k, v, ids, 0.5, key_mask=km)
    stacked = cube_sparse_attention_native(qs, k, v, ids, 0.5, key_mask=km)
    monkeypatch.setattr(native, "STACK_MAX_ROWS", 0)
    per_head = cube_sparse_attention_native(qs, k, v, ids, 0.5, key_mask=km)
    torch.testing.assert_close(stacked, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(per_head, ref, atol=2e-6, rtol=1e-5)


_ATEN_PATH_CHECK = """
import torch
from adaspark.ops.attention.native import _exports_sgemm, cube_sparse_attention_native, native_error
from adaspark.ops.attention.reference import cube_sparse_attention_reference
from test_attention import CASES, make_case

assert not _exports_sgemm()
for case in CASES:
    q, k, v, ids, km = make_case(case)
    for nq in sorted({q.shape[2], 1} - {0}):
        qs = q[:, :, q.shape[2] - nq :]
        ref = cube_sparse_attention_reference(q, k, v, ids, 0.5, key_mask=km)[:, :, q.shape[2] - nq :]
        out = cube_sparse_attention_native(qs, k, v, ids, 0.5, key_mask=km, query_block=16)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
print("ok", native_error())
"""


@needs_native
def test_native_without_direct_blas_equals_reference(tmp_path):
    """The kernel's ATen path (built where libtorch exports no ``sgemm_``) computes the same: built
    in a fresh extension directory with the direct BLAS calls turned off (about 40 s)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {
        **os.environ,
        "ADASPARK_NATIVE_NO_SGEMM": "1",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _ATEN_PATH_CHECK], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok None"


@needs_flex
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("case", FLEX_CASES, ids=[c[0] for c in FLEX_CASES])
def test_flex_equals_reference(case, gran):
    q, k, v, ids, km = make_case(case)
    for pol in POLS[:2]:
        ref = cube_sparse_attention_reference(q, k, v, ids, policy=pol, key_mask=km, granularity=gran)
        out = cube_sparse_attention_flex(
            q, k, v, ids, policy=pol, key_mask=km, granularity=gran, query_block=32
        )
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "backend",
    ["gather", pytest.param("flex", marks=needs_flex), pytest.param("native", marks=needs_native), "auto"],
)
def test_p1_is_dense_on_every_path(backend):
    q, k, v, ids, km = make_case(CASES[4])
    dense = cube_sparse_attention_reference(q, k, v, ids, 1.0, key_mask=km)
    for gran in GRANS:
        out = cube_sparse_attention(
            q, k, v, ids, 1.0, key_mask=km, backend=backend, granularity=gran, query_block=32
        )
        torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES[2:], ids=[c[0] for c in CASES[2:]])
def test_cube_granularity_invariants(case):
    """Own cube and text always attended, nothing later read, one kept set per cube."""
    q, k, _v, ids, km = make_case(case)
    mask = reference_attention_mask(q, k, ids, 0.05, key_mask=km, granularity="cube")
    bsz, _hq, n, _ = mask.shape
    kmask = torch.ones(bsz, n, dtype=torch.bool) if km is None else km
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    valid = causal[None] & kmask[:, None, :] & kmask[:, :, None]
    assert not (mask & ~causal).any()
    assert (mask | ~((ids < 0)[:, None, :] & valid)[:, None]).all()
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0) & valid
    assert (mask | ~same[:, None]).all()
    keep = reference_cube_keep(q, k, ids, 0.05, key_mask=km, granularity="cube")
    for b in range(bsz):
        for c in range(int(ids[b].max()) + 1):
            rows = keep[b][:, ((ids[b] == c) & kmask[b]).nonzero().squeeze(1)]  # [Hq, n_c, C]
            assert (rows == rows[:, :1]).all(), "the queries of one cube selected differently"
    assert mask.float().mean() < valid.float().mean()


@pytest.mark.parametrize("case", CASES[1:], ids=[c[0] for c in CASES[1:]])
def test_cube_unit_probs_equal_naive(case):
    q, k, _v, ids, km = make_case(case)
    index = build_cube_index(ids)
    means = cube_mean_keys(k, index)
    kmask = torch.ones_like(ids, dtype=torch.bool) if km is None else km
    for b in range(q.shape[0]):
        args = (q[b], means[b], ids[b], kmask[b], 0, index.first_pos[b], q.shape[-1] ** -0.5)
        fast, naive = cube_unit_probs(*args), cube_unit_probs_reference(*args)
        torch.testing.assert_close(fast[0], naive[0], atol=1e-6, rtol=1e-5)
        assert torch.equal(fast[1], naive[1]) and torch.equal(fast[2], naive[2])
        has = fast[2] > 0
        torch.testing.assert_close(fast[0].sum(-1)[:, has], torch.ones_like(fast[0].sum(-1)[:, has]))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_selection_from_reused_scores_equals_a_fresh_one(case):
    """Budget mode plans several thresholds from one call's :func:`unit_scores`: every policy cut
    from them gives the very selection (and statistics) a fresh :func:`select_units` gives."""
    q, k, _v, ids, km = make_case(case)
    kmask = torch.ones_like(ids, dtype=torch.bool) if km is None else km
    index = build_cube_index(ids)
    means, scale = cube_mean_keys(k, index), q.shape[-1] ** -0.5
    scores = unit_scores(q, means, ids, kmask, index, scale)
    for pol in [*POLS, SelectionPolicy(kind="ratio", ratio=0.4), SelectionPolicy(p=1.0)]:
        st_fresh, st_reused = (AttentionStats(q.shape[1], q.shape[-1]) for _ in range(2))
        fresh = select_units(q, means, ids, kmask, index, pol, scale, "cube", st_fresh)
        reused = select_units(q, means, ids, kmask, index, pol, scale, "cube", st_reused, scores)
        assert torch.equal(fresh.unit, reused.unit) and torch.equal(fresh.table, reused.table), pol
        for name in ("selections", "entropy_sum", "kept_sum", "candidates_sum"):
            assert torch.equal(getattr(st_fresh, name), getattr(st_reused, name)), (pol, name)


@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize(
    "case", [CASES[2], CASES[4], CASES[5]], ids=["ragged", "batch_padding", "two_videos"]
)
def test_block_pattern_covers_the_mask_exactly(case, gran):
    """Attended pairs lie only in kept blocks; 'full' blocks hold only attended pairs and valid keys."""
    q, k, _v, ids, km = make_case(case)
    bsz, hq, n, _ = q.shape
    kmask = torch.ones(bsz, n, dtype=torch.bool) if km is None else km
    index = build_cube_index(ids)
    pol = SelectionPolicy(p=0.5)
    sel = select_units(q, cube_mean_keys(k, index), ids, kmask, index, pol, q.shape[-1] ** -0.5, gran)
    mask = reference_attention_mask(q, k, ids, pol, key_mask=km, granularity=gran)
    blk = 16
    pat = block_pattern(sel, ids, kmask, index, blk)
    for b in range(bsz):
        perm, slot = pat.k_perm[b], pat.k_slot[b]
        real = perm >= 0
        assert torch.equal(torch.sort(perm[real]).values, torch.arange(n)), "not a permutation"
        assert torch.equal(perm[slot], torch.arange(n)), "k_slot is not the inverse of k_perm"
        assert not (pat.k_valid[b] & ~real).any(), "an empty key slot is valid"
        assert not (pat.q_valid[b] & ~real).any(), "an empty query slot is valid"
        sp = perm.numel()
        assert sp % blk == 0
        mp = torch.zeros(hq, sp, sp, dtype=torch.bool)  # the mask in slot space, queries and keys
        mp[:, slot[:, None], slot[None, :]] = mask[b]
        blocks = mp.view(hq, sp // blk, blk, sp // blk, blk)
        anyb = blocks.any(4).any(2)
        assert not (anyb & ~pat.kept[b]).any(), "an attended pair outside the kept blocks"
        qv = pat.q_valid[b].view(-1, blk)
        allb = (blocks | ~qv[None, :, :, None, None]).all(4).all(2)
        assert not (pat.full[b] & ~allb).any(), "a 'full' block holds a skipped pair"
    # attended pairs counted by class equal the brute-force count
    assert attended_pairs(sel, ids, kmask).tolist() == mask.sum(dim=(0, 2, 3)).double().tolist()


def test_aligned_slots_put_each_cube_in_the_fewest_blocks():
    """A cube that fits one block never straddles two; order and text runs are kept."""
    from adaspark.ops.attention.blocks import aligned_slots

    # 5 text tokens, then a 2-frame video of 4 x 4 tokens in 2 x 2 x 2 cubes (8 tokens each), text
    _t, h, w = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    vid = ((h // 2) * 2 + w // 2).reshape(-1)
    ids = torch.cat([torch.full((5,), -1), vid, torch.full((3,), -1)])[None]
    index = build_cube_index(ids)
    order = cube_major_order(ids, index)
    for blk in (8, 16, 64):
        slots = aligned_slots(ids, index, order, blk)[0]
        assert torch.equal(torch.argsort(slots), order[0]), "cube-major order changed"
        for c in range(4):
            s = slots[ids[0] == c]
            assert int(s.max() - s.min()) == 7, "a cube is not contiguous"
            assert int(s.min()) // blk == int(s.max()) // blk, f"cube {c} straddles a {blk}-block"
        text = slots[ids[0] < 0]
        assert text[:5].tolist() == list(range(5)), "the text prefix moved"
        assert (text[5:].diff() == 1).all(), "the text suffix was split"
    # block 8: every cube starts on a boundary (3 empty slots after the prefix, none between cubes)
    assert aligned_slots(ids, index, order, 8)[0][ids[0] >= 0].min() == 8


def test_aligned_layout_halves_the_executed_work_after_a_text_prefix():
    """A 64-token-cube video after a 25-token prefix: aligned, the kernel computes 1.24x the
    attended pairs (the causal diagonal blocks); cube-major alone it computed 2.6x."""
    g = torch.Generator().manual_seed(0)
    t, h, w = torch.meshgrid(torch.arange(32), torch.arange(8), torch.arange(8), indexing="ij")
    vid = ((t // 4) * 4 + (h // 4) * 2 + w // 4).reshape(-1)
    ids = torch.cat([torch.full((25,), -1), vid, torch.full((7,), -1)])[None]
    n = ids.shape[1]
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    inp = prepare_inputs(q, k, v, ids, 0.3, granularity="cube")
    plan = plan_blocks(q, inp, block=64)
    attended = float(attended_pairs(plan.selection, ids, torch.ones(1, n, dtype=torch.bool)).sum())
    assert plan.executed <= 1.4 * attended, (plan.executed, attended)
    out = run_blocks(q, k, v, plan, kernel=BLOCK_KERNELS["gather"])
    ref = cube_sparse_attention_reference(q, k, v, ids, 0.3, granularity="cube")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cube_major_order_makes_cubes_contiguous():
    ids = torch.tensor([[-1, 0, 0, 1, 1, 0, 0, 1, 1, -1, 2, 3, 2, 3, -1]])
    perm = cube_major_order(ids, build_cube_index(ids))[0]
    assert perm.tolist() == [0, 1, 2, 5, 6, 3, 4, 7, 8, 9, 10, 12, 11, 13, 14]


@pytest.mark.parametrize(
    "backend", ["gather", pytest.param("flex", marks=needs_flex), pytest.param("native", marks=needs_native)]
)
@pytest.mark.parametrize("gran", GRANS)
def test_stats_equal_brute_force(backend, gran):
    q, k, v, ids, km = make_case(CASES[4])
    st = AttentionStats(q.shape[1], q.shape[3])
    cube_sparse_attention(
        q, k, v, ids, 0.6, key_mask=km, backend=backend, granularity=gran, stats=st, query_block=32
    )
    ref = AttentionStats(q.shape[1], q.shape[3])
    cube_sparse_attention(q, k, v, ids, 0.6, key_mask=km, backend="reference", granularity=gran, stats=ref)
    mask = reference_attention_mask(q, k, ids, 0.6, key_mask=km, granularity=gran)
    assert st.attended.tolist() == ref.attended.tolist() == mask.sum(dim=(0, 2, 3)).double().tolist()
    assert st.causal_pairs == ref.causal_pairs and st.queries == ref.queries
    assert st.kept_sum.tolist() == ref.kept_sum.tolist()
    assert st.entropy_sum.tolist() == pytest.approx(ref.entropy_sum.tolist())
    assert st.executed >= st.attended.sum()


@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=["gqa", "two_videos_text"])
@pytest.mark.parametrize(
    "backend", ["gather", pytest.param("flex", marks=needs_flex), pytest.param("native", marks=needs_native)]
)
def test_bf16_error_within_twice_pytorch(case, backend):
    q, k, v, ids, km = make_case(case, dtype=torch.bfloat16, seed=3)
    for gran in GRANS:
        truth = cube_sparse_attention_reference(
            q.float(), k.float(), v.float(), ids, 0.7, key_mask=km, granularity=gran
        )
        own = cube_sparse_attention_reference(q, k, v, ids, 0.7, key_mask=km, granularity=gran)
        fast = cube_sparse_attention(
            q, k, v, ids, 0.7, key_mask=km, backend=backend, granularity=gran, query_block=32
        )
        assert fast.dtype == torch.bfloat16
        err_own = (own.float() - truth).abs().max().item()
        err_fast = (fast.float() - truth).abs().max().item()
        assert err_fast <= 2 * err_own, (gran, err_fast, err_own)


def test_gather_gradients_match_reference():
    q, k, v, ids, km = make_case(CASES[4])
    for gran in GRANS:
        grads = []
        for be in ("reference", "gather"):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            out = cube_sparse_attention(qq, kk, vv, ids, 0.6, key_mask=km, backend=be, granularity=gran)
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            grads.append((qq.grad, kk.grad, vv.grad))
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


#: (granularity, new tokens, backend) of the calls after a cache; the last 40 positions of the case
#: hold video queries, which ``decode`` refuses at cube granularity (its own test below)
AFTER_CACHE = [
    (gran, m, be)
    for gran in GRANS
    for m in (1, 3, 40)
    for be in ("auto", "gather", "decode")
    if not (be == "decode" and gran == "cube" and m == 40)
]


@pytest.mark.parametrize(("gran", "m", "be"), AFTER_CACHE)
def test_new_tokens_after_a_cache(gran, m, be):
    """Decoding (text queries) and a chunk with video queries, both against the reference."""
    q, k, v, ids, km = make_case(CASES[5], seed=7)
    qs = q[:, :, -m:]
    ref = cube_sparse_attention_reference(qs, k, v, ids, 0.5, key_mask=km, granularity=gran)
    out = cube_sparse_attention(qs, k, v, ids, 0.5, key_mask=km, backend=be, granularity=gran)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_decode_refuses_video_queries_at_cube_granularity():
    q, k, v, ids, km = make_case(CASES[5], seed=7)
    assert bool((ids[:, -40:] >= 0).any())
    with pytest.raises(ValueError, match="selects per token"):
        cube_sparse_attention(
            q[:, :, -40:], k, v, ids, 0.5, key_mask=km, backend="decode", granularity="cube"
        )


def test_auto_backend_trains_on_long_inputs():
    """A training step (gradients on) at FLEX_MIN_TOKENS tokens and more runs on CPU: auto must not
    pick a kernel without a backward there (FlexAttention on CPU, the C++ kernel)."""
    n, grid = FLEX_MIN_TOKENS + 64, (16, 16, 16)
    ids = torch.full((1, n), -1, dtype=torch.long)
    t, h, w = torch.meshgrid(*(torch.arange(x) for x in grid), indexing="ij")
    ids[0, 32 : 32 + 4096] = ((t // 4) * 16 + (h // 4) * 4 + w // 4).flatten()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g).requires_grad_() for _ in range(3))
    out = cube_sparse_attention(q[:, :, :], k, v, ids, 0.5, granularity="cube")
    out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_backend_resolution_and_errors(monkeypatch):
    import adaspark.ops.attention as attn

    cpu = torch.device("cpu")
    if native_available(cpu):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            assert resolve_attention_backend("auto", cpu, dt, num_tokens=100) == "native"
        f32 = torch.float32
        assert resolve_attention_backend("auto", cpu, f32, prefill=False, granularity="cube") == "native"
        # no gradients through the C++ kernel, nor through FlexAttention on CPU (a long training step)
        for n in (100, FLEX_MIN_TOKENS, 4 * FLEX_MIN_TOKENS):
            assert resolve_attention_backend("auto", cpu, f32, num_tokens=n, needs_grad=True) == "gather"
    monkeypatch.setattr(attn, "native_available", lambda dev: False)
    assert resolve_attention_backend("auto", cpu, torch.float16) == "gather"
    assert resolve_attention_backend("auto", cpu, torch.float32, num_tokens=100) == "gather"
    assert resolve_attention_backend("auto", cpu, torch.float32, prefill=False) == "decode"
    assert resolve_attention_backend("auto", cpu, torch.float32, prefill=False, num_queries=500) == "blocked"
    if flex_available(cpu):
        assert resolve_attention_backend("auto", cpu, torch.bfloat16) == "flex"
        assert resolve_attention_backend("auto", cpu, torch.float32) == "flex"
    assert resolve_attention_backend("auto", cpu, torch.float32, needs_grad=True) == "gather"
    q, k, v, ids, _ = make_case(CASES[3])
    with pytest.raises(ValueError, match="granularity"):
        cube_sparse_attention(q, k, v, ids, 0.5, granularity="frame")
    with pytest.raises(ValueError, match="selects per token"):
        cube_sparse_attention(q, k, v, ids, 0.5, backend="blocked", granularity="cube")
    with pytest.raises(ValueError, match="prefill only"):
        cube_sparse_attention(q[:, :, -2:], k, v, ids, 0.5, backend="flex")


def test_bucket_length():
    assert bucket_length(1, 128) == 128
    assert bucket_length(500, 128) == 512
    for n in (600, 1000, 5000, 33000, 100_000):
        b = bucket_length(n, 128)
        assert b >= n and b % 128 == 0 and b <= 1.25 * n + 128


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gran", GRANS)
def test_cuda_flex_equals_reference(gran):
    q, k, v, ids, km = (t.cuda() if t is not None else None for t in make_case(CASES[4]))
    ref = cube_sparse_attention_reference(q, k, v, ids, 0.6, key_mask=km, granularity=gran)
    for be in ("flex", "gather", "auto"):
        out = cube_sparse_attention(q, k, v, ids, 0.6, key_mask=km, backend=be, granularity=gran)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["gather", "auto"])
def test_dense_fallback_runs_dense_attention_when_the_blocks_do_not_pay(backend, monkeypatch):
    import functools

    import adaspark.ops.attention as attn

    monkeypatch.setattr(attn, "flex_available", lambda dev: False)  # auto -> gather, no compile
    monkeypatch.setattr(attn, "native_available", lambda dev: False)
    # decide the fallback on this short input too
    cube_sparse_attention = functools.partial(attn.cube_sparse_attention, flex_min_tokens=1)
    q, k, v, ids, km = make_case(CASES[4])
    dense = cube_sparse_attention_reference(q, k, v, ids, 1.0, key_mask=km)
    exact = cube_sparse_attention_reference(q, k, v, ids, 0.5, key_mask=km, granularity="cube")
    # a threshold every selection exceeds: dense attention, counted as dense, selection still recorded
    st = AttentionStats(q.shape[1], q.shape[3])
    out = cube_sparse_attention(
        q, k, v, ids, 0.5, key_mask=km, backend=backend, granularity="cube", dense_fallback=1e-6, stats=st
    )
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)
    assert st.dense_fallbacks == 1 and st.density == 1.0 and st.selections.sum() > 0
    # no fallback: the exact AdaS-Attn result (on this short input the padded blocks exceed any threshold)
    st = AttentionStats(q.shape[1], q.shape[3])
    out = cube_sparse_attention(
        q, k, v, ids, 0.5, key_mask=km, backend=backend, granularity="cube", dense_fallback=None, stats=st
    )
    assert st.dense_fallbacks == 0 and st.density < 1.0
    torch.testing.assert_close(out, exact, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="dense_fallback"):
        cube_sparse_attention(q, k, v, ids, 0.5, backend=backend, dense_fallback=1.5)


# --------------------------------------------------------------------------- p = 1 through every kernel
def _dense_truth(q, k, v, km):
    """Causal softmax attention in float64 (queries = the last Nq keys; padding rows and queries 0)."""
    bsz, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    kr = k.double().repeat_interleave(hq // hkv, 1)
    vr = v.double().repeat_interleave(hq // hkv, 1)
    s = q.double() @ kr.transpose(-1, -2) * q.shape[-1] ** -0.5
    kpos = torch.arange(nk)
    allowed = (kpos[None, :] <= kpos[nk - nq :, None])[None]  # [1, Nq, Nk]
    valid = torch.ones(bsz, nk, dtype=torch.bool) if km is None else km
    allowed = allowed & valid[:, None, :] & valid[:, nk - nq :, None]  # [B, Nq, Nk]
    w = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    return w @ vr


def _has_video_query(case, nq: int) -> bool:
    ids = make_case(case)[3]
    return bool((ids[:, ids.shape[1] - nq :] >= 0).any())


def _p1_params():
    """(case, backend, granularity, queries) for every kernel on every awkward shape: the whole
    sequence (prefill; flex runs only this) and the last query (decoding). ``blocked`` and ``decode``
    select per token; they take ``granularity="cube"`` exactly when no query is a video token."""
    out = []
    for case in CASES:
        n = case[4]
        for backend in ("reference", "blocked", "decode", "gather", "flex", "native"):
            marks = {"flex": [needs_flex], "native": [needs_native]}.get(backend, [])
            for nq in (n,) if backend == "flex" else sorted({n, 1}):
                text_only = not _has_video_query(case, nq)
                grans = [g for g in GRANS if g in BACKEND_GRANULARITIES[backend] or text_only]
                out += [
                    pytest.param(case, backend, gran, nq, marks=marks, id=f"{case[0]}-{backend}-{gran}-q{nq}")
                    for gran in grans
                ]
    return out


@pytest.mark.parametrize(("case", "backend", "gran", "nq"), _p1_params())
def test_p1_equals_dense_through_the_kernel(case, backend, gran, nq, nan_empty, monkeypatch):
    """p = 1 keeps every cube: the named kernel itself (never the dense short cut of ``auto``) must give
    dense causal attention, with every output row written."""
    import adaspark.ops.attention as attn

    q, k, v, ids, km = make_case(case, seed=5)
    q = q[:, :, q.shape[2] - nq :]
    truth = _dense_truth(q, k, v, km)

    def no_dense(*a, **kw):
        raise AssertionError(f"backend={backend!r} took the dense short cut at p = 1")

    monkeypatch.setattr(attn, "dense_causal_attention", no_dense)
    st = AttentionStats(q.shape[1], q.shape[3])
    kw = {"query_block": 32} if backend in ("gather", "flex", "native") else {}
    out = cube_sparse_attention(
        q, k, v, ids, 1.0, key_mask=km, backend=backend, granularity=gran, stats=st, **kw
    )
    assert not out.isnan().any(), "an output row was left unwritten"
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=1e-5)
    assert st.density == 1.0 and st.dense_fallbacks == 0
    if backend != "reference":  # the fast kernels allocate their output where the poison reaches it
        assert nan_empty.poisoned(out), f"the {backend} kernel's output allocation escapes the NaN poison"


def test_auto_takes_the_dense_short_cut_at_p1_only(monkeypatch):
    import adaspark.ops.attention as attn

    q, k, v, ids, km = make_case(CASES[4])
    calls = []
    real = attn.dense_causal_attention
    monkeypatch.setattr(attn, "dense_causal_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cube_sparse_attention(q, k, v, ids, 1.0, key_mask=km, backend="auto")
    assert calls == [1]
    cube_sparse_attention(q, k, v, ids, 0.5, key_mask=km, backend="auto")
    cube_sparse_attention(q, k, v, ids, 1.0, key_mask=km, backend="gather")
    assert calls == [1]


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(b, marks={"flex": [needs_flex], "native": [needs_native]}.get(b, []))
        for b in sorted(ATTENTION_BACKENDS)
    ],
)
@pytest.mark.parametrize("gran", GRANS)
def test_granularity_table_is_what_the_kernels_do(backend, gran, request):
    """``BACKEND_GRANULARITIES`` (what AdaSparkConfig validates against) matches the kernels: a listed
    pair runs a prefill with video queries, an unlisted one raises a ValueError naming the granularity."""
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")  # Triton's interpreter; skips without triton
    q, k, v, ids, km = make_case(CASES[3])
    assert bool((ids >= 0).any())
    if gran in BACKEND_GRANULARITIES[backend]:
        out = cube_sparse_attention(q, k, v, ids, 0.5, key_mask=km, backend=backend, granularity=gran)
        assert out.shape == q.shape
    else:
        with pytest.raises(ValueError, match="granularity"):
            cube_sparse_attention(q, k, v, ids, 0.5, key_mask=km, backend=backend, granularity=gran)


# --------------------------------------------------------------------------- the kernels' thresholds
def test_flex_min_tokens_decides_autos_backend(monkeypatch):
    import adaspark.ops.attention as attn

    q, k, v, ids, km = make_case(CASES[4])
    n = q.shape[2]
    cpu = torch.device("cpu")
    monkeypatch.setattr(attn, "flex_available", lambda dev: True)
    monkeypatch.setattr(attn, "native_available", lambda dev: False)
    assert resolve_attention_backend("auto", cpu, torch.float32, num_tokens=n) == "gather"
    assert resolve_attention_backend("auto", cpu, torch.float32, num_tokens=n, flex_min_tokens=n) == "flex"
    calls = []
    for name in ("gather", "flex"):  # spies: which kernel the dispatcher runs (no compile here)
        monkeypatch.setitem(attn.ATTENTION_BACKENDS, name, lambda *a, _n=name, **kw: calls.append(_n) or a[0])
    cube_sparse_attention(q, k, v, ids, 0.5, key_mask=km)
    cube_sparse_attention(q, k, v, ids, 0.5, key_mask=km, flex_min_tokens=n + 1)
    cube_sparse_attention(q, k, v, ids, 0.5, key_mask=km, flex_min_tokens=n)
    assert calls == ["gather", "gather", "flex"]
    with pytest.raises(ValueError, match="flex_min_tokens"):
        cube_sparse_attention(q, k, v, ids, 0.5, flex_min_tokens=-1)


def test_flex_min_tokens_decides_where_dense_fallback_starts():
    q, k, v, ids, km = make_case(CASES[4])
    n = q.shape[2]
    for min_tokens, fallbacks in ((n + 1, 0), (n, 1)):
        st = AttentionStats(q.shape[1], q.shape[3])
        cube_sparse_attention(
            q, k, v, ids, 0.5, key_mask=km, backend="gather", dense_fallback=1e-6, stats=st,
            flex_min_tokens=min_tokens,
        )  # fmt: skip
        assert st.dense_fallbacks == fallbacks


@pytest.mark.parametrize(
    ("backend", "knob", "nq"),
    [("decode", "decode_gather_fraction", 3), ("blocked", "blocked_dense_fraction", 3)],
)
def test_in_place_or_gathered_is_decided_by_the_threshold(backend, knob, nq, monkeypatch):
    """0 reads the causal prefix in place (every key scored), 1 gathers the kept keys (fewer scored):
    same output, different work, visible in ``stats.executed`` (the torch path of ``decode``: the
    native row kernel reads only the kept rows either way)."""
    import adaspark.ops.attention.decode as decode_mod

    monkeypatch.setattr(decode_mod, "native_available", lambda dev: False)
    q, k, v, ids, km = make_case(CASES[5], seed=2)
    q = q[:, :, -nq:]  # new tokens after a cache
    executed, outs = {}, {}
    for frac in (0.0, 1.0):
        st = AttentionStats(q.shape[1], q.shape[3])
        outs[frac] = cube_sparse_attention(
            q, k, v, ids, 0.3, key_mask=km, backend=backend, stats=st, **{knob: frac}
        )
        executed[frac] = st.executed
    assert executed[1.0] < executed[0.0]
    torch.testing.assert_close(outs[1.0], outs[0.0], atol=2e-6, rtol=1e-5)
    ref = cube_sparse_attention_reference(q, k, v, ids, 0.3, key_mask=km)
    torch.testing.assert_close(outs[1.0], ref, atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=knob):
        cube_sparse_attention(q, k, v, ids, 0.3, key_mask=km, backend=backend, **{knob: 1.5})


@needs_flex
def test_flex_leaves_the_users_recompile_limit_alone(monkeypatch):
    import torch._dynamo

    import adaspark.ops.attention.flex as flex_mod

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    before = getattr(cfg, name)
    real = flex_mod._compiled_flex()
    during = []

    def spy(*a, **kw):
        during.append(getattr(cfg, name))
        return real(*a, **kw)

    monkeypatch.setattr(flex_mod, "_compiled_flex", lambda: spy)
    q, k, v, ids, km = make_case(CASES[4])
    # the user's own setting (dynamo's config is set through its own patch: monkeypatch breaks it)
    with cfg.patch({name: 5}):
        out = cube_sparse_attention_flex(q, k, v, ids, 0.6, key_mask=km, query_block=32)
        assert getattr(cfg, name) == 5  # untouched after the call ...
    assert during == [flex_mod.RECOMPILE_LIMIT]  # ... raised only while flex ran
    assert getattr(cfg, name) == before
    out_default = cube_sparse_attention_flex(q, k, v, ids, 0.6, key_mask=km, query_block=32)
    assert getattr(cfg, name) == before  # the same with dynamo's default
    ref = cube_sparse_attention_reference(q, k, v, ids, 0.6, key_mask=km)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out_default, ref, atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------- kernels return their selection
def _recorded(backend, gran, nq, **kw):
    q, k, v, ids, km = make_case(CASES[4], seed=4)  # batch 2, GQA, left and right padding, ragged cubes
    q = q[:, :, q.shape[2] - nq :]
    st = AttentionStats(q.shape[1], q.shape[3], record=True)
    cube_sparse_attention(q, k, v, ids, 0.5, key_mask=km, backend=backend, granularity=gran, stats=st, **kw)
    assert len(st.selections_log) == 1
    return st.selections_log[0], q, k, ids, km


RECORD_PARAMS = [
    (be, gran, nq)
    for be in ("reference", "blocked", "decode", "gather", "flex", "fallback")
    for gran in GRANS
    for nq in (140, 3)
    if not (be == "flex" and nq != 140)
    if gran in BACKEND_GRANULARITIES.get(be, GRANS) or nq == 3  # the last 3 positions are text
]


@pytest.mark.parametrize(
    ("backend", "gran", "nq"),
    [pytest.param(*p, marks=[needs_flex] if p[0] == "flex" else []) for p in RECORD_PARAMS],
    ids=["-".join(map(str, p)) for p in RECORD_PARAMS],
)
def test_each_backend_records_the_selection_it_used(backend, gran, nq):
    kw = {}
    if backend == "fallback":  # the dispatcher's plan, read before running dense attention
        backend, kw = "gather", {"dense_fallback": 1e-6, "flex_min_tokens": 1}
    if backend in ("gather", "flex"):
        kw["query_block"] = 32
    sel, q, k, ids, km = _recorded(backend, gran, nq, **kw)
    # blocked and decode select per token (with text queries only, "cube" is the same selection)
    assert sel.granularity == ("token" if backend in ("blocked", "decode") else gran)
    assert sel.table.shape[:2] == (2, q.shape[1])
    valid = km[:, km.shape[1] - nq :][:, None, :, None]
    truth = reference_cube_keep(q, k, ids, 0.5, key_mask=km, granularity=gran) & valid
    kept = sel.kept_cubes(ids)
    assert kept.any() and torch.equal(kept & valid, truth)
    assert not (kept & ~valid).any()  # padding queries keep nothing


@pytest.mark.parametrize("nq", [140, 3])
def test_the_recorded_selection_is_one_object_for_every_backend(nq):
    """Per-token kernels (blocked, decode, reference) log the very table ``select_units`` builds."""
    sels = {be: _recorded(be, "token", nq)[0] for be in ("reference", "blocked", "decode", "gather")}
    for be in ("reference", "blocked", "decode"):
        assert torch.equal(sels[be].unit, sels["gather"].unit), be
        assert torch.equal(sels[be].table, sels["gather"].table), be
    # off by default, and auto's dense short cut at p = 1 selects nothing
    q, k, v, ids, km = make_case(CASES[4])
    st = AttentionStats(q.shape[1], q.shape[3])
    cube_sparse_attention(q, k, v, ids, 0.5, key_mask=km, stats=st)
    assert st.selections_log == []
    st = AttentionStats(q.shape[1], q.shape[3], record=True)
    cube_sparse_attention(q, k, v, ids, 1.0, key_mask=km, stats=st)
    assert st.selections_log == []
