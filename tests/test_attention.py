"""AdaS-Attn: the blocked path equals the reference on awkward shapes; invariants of the semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaspark.ops import (
    AttentionStats,
    SelectionPolicy,
    cube_sparse_attention,
    cube_sparse_attention_blocked,
    cube_sparse_attention_reference,
    dense_causal_attention,
    reference_attention_mask,
)
from adaspark.ops.attention import reference_cube_keep
from adaspark.ops.cubes import build_cube_index, cube_mean_keys

from conftest import make_cube_ids

# (name, B, Hq, Hkv, N, D, videos per sample [(start, (t,h,w), cube)], padding per sample ("l"/"r", n))
CASES = [
    ("n1_text", 1, 2, 1, 1, 8, [[]], None),
    ("n1_video", 1, 2, 2, 1, 8, [[(0, (1, 1, 1), (4, 4, 4))]], None),
    ("ragged_cubes", 1, 4, 4, 120, 16, [[(6, (3, 5, 7), (2, 2, 3))]], None),
    ("gqa", 1, 6, 2, 150, 16, [[(10, (4, 4, 8), (2, 2, 2))]], None),
    (
        "batch_padding",
        2,
        4,
        2,
        140,
        16,
        [[(20, (4, 4, 6), (2, 2, 2))], [(5, (2, 6, 6), (2, 3, 3))]],
        [("l", 17), ("r", 40)],
    ),
    (
        "two_videos_text",
        1,
        4,
        2,
        230,
        16,
        [[(8, (4, 4, 4), (2, 2, 2)), (80, (3, 6, 8), (2, 3, 4))]],
        None,
    ),
]

POLICIES = [
    SelectionPolicy(p=0.3),
    SelectionPolicy(p=0.7),
    SelectionPolicy(p=0.95),
    SelectionPolicy(kind="top_k", k=2),
    SelectionPolicy(kind="ratio", ratio=0.5, min_keep=1),
]


def make_case(case, dtype=torch.float32, seed=0):
    _, bsz, hq, hkv, n, d, videos, pad = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, n, d, generator=g).to(dtype)
    k = (torch.randn(bsz, hkv, n, d, generator=g) * 1.5).to(dtype)
    v = torch.randn(bsz, hkv, n, d, generator=g).to(dtype)
    ids = make_cube_ids(bsz, n, videos)
    km = None
    if pad is not None:
        km = torch.ones(bsz, n, dtype=torch.bool)
        for b, (side, m) in enumerate(pad):
            if side == "l":
                km[b, :m] = False
            else:
                km[b, n - m :] = False
        ids = ids.masked_fill(~km, -1)
    return q, k, v, ids, km


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("pol", POLICIES, ids=lambda p: f"{p.kind}-{p.p if p.kind == 'top_p' else p.k}")
def test_blocked_equals_reference(case, pol, nan_empty):
    q, k, v, ids, km = make_case(case)
    ref = cube_sparse_attention_reference(q, k, v, ids, policy=pol, key_mask=km)
    for qb in (64, 128):
        out = cube_sparse_attention_blocked(q, k, v, ids, policy=pol, key_mask=km, query_block=qb)
        assert nan_empty.poisoned(out), "the blocked kernel's output allocation escapes the NaN poison"
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_p1_is_dense(case):
    q, k, v, ids, km = make_case(case)
    dense = dense_causal_attention(q, k, v, key_mask=km)
    # the straightforward SDPA with an explicit causal+padding mask
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    if km is not None:
        mask = mask & km[:, None, None, :] & km[:, None, :, None]
    g = q.shape[1] // k.shape[1]
    sd = F.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask
    ).nan_to_num(0.0)
    if km is not None:
        sd = sd * km[:, None, :, None]
    torch.testing.assert_close(dense, sd, atol=2e-6, rtol=1e-5)
    for backend in ("reference", "blocked"):
        out = cube_sparse_attention(q, k, v, ids, 1.0, key_mask=km, backend=backend)
        torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case", CASES[2:], ids=[c[0] for c in CASES[2:]])
def test_own_cube_and_text_always_attended_and_causal(case):
    q, k, _v, ids, km = make_case(case)
    mask = reference_attention_mask(q, k, ids, 0.05, key_mask=km)  # very sparse
    bsz, _hq, n, _ = mask.shape
    kmask = torch.ones(bsz, n, dtype=torch.bool) if km is None else km
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    valid = causal[None] & kmask[:, None, :] & kmask[:, :, None]  # [B, N, N]
    assert not (mask & ~causal).any(), "a query attends a later token"
    text_key = (ids < 0)[:, None, :] & valid
    assert (mask | ~text_key[:, None]).all(), "a non-video key was dropped"
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0) & valid
    assert (mask | ~same[:, None]).all(), "a key of the query's own cube was dropped"
    assert mask.float().mean() < valid.float().mean(), "nothing was skipped at p=0.05"


@pytest.mark.parametrize("case", CASES[2:], ids=[c[0] for c in CASES[2:]])
def test_blocked_never_reads_the_future(case):
    """Values (which do not steer selection) and non-video keys after a query never change its output."""
    q, k, v, ids, km = make_case(case)
    n = q.shape[2]
    cut = n // 2
    out = cube_sparse_attention_blocked(q, k, v, ids, 0.5, key_mask=km)
    v2, k2 = v.clone(), k.clone()
    v2[:, :, cut:] += 100.0
    text_after = (ids[:, cut:] < 0)[:, None, :, None]
    k2[:, :, cut:] = torch.where(text_after, k2[:, :, cut:] * -7.0, k2[:, :, cut:])
    out2 = cube_sparse_attention_blocked(q, k2, v2, ids, 0.5, key_mask=km)
    torch.testing.assert_close(out2[:, :, :cut], out[:, :, :cut], atol=0, rtol=0)


@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=["gqa", "two_videos_text"])
def test_bf16_error_within_twice_pytorch(case):
    q, k, v, ids, km = make_case(case, dtype=torch.bfloat16, seed=3)
    truth = cube_sparse_attention_reference(q.float(), k.float(), v.float(), ids, 0.7, key_mask=km)
    own = cube_sparse_attention_reference(q, k, v, ids, 0.7, key_mask=km)
    fast = cube_sparse_attention_blocked(q, k, v, ids, 0.7, key_mask=km)
    assert fast.dtype == torch.bfloat16
    err_own = (own.float() - truth).abs().max().item()
    err_fast = (fast.float() - truth).abs().max().item()
    assert err_own > 0
    assert err_fast <= 2 * err_own, (err_fast, err_own)


def test_gradients_match_reference():
    q, k, v, ids, km = make_case(CASES[4])
    grads = []
    for fn in (cube_sparse_attention_reference, cube_sparse_attention_blocked):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, ids, 0.6, key_mask=km)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_stats_equal_brute_force_counts(backend):
    q, k, v, ids, km = make_case(CASES[4])
    st = AttentionStats(q.shape[1], q.shape[3])
    cube_sparse_attention(q, k, v, ids, 0.6, key_mask=km, backend=backend, stats=st)
    mask = reference_attention_mask(q, k, ids, 0.6, key_mask=km)
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    valid = causal[None] & km[:, None, :] & km[:, :, None]
    assert st.causal_pairs == int(valid.sum())
    assert st.attended.tolist() == mask.sum(dim=(0, 2, 3)).double().tolist()
    assert st.density == pytest.approx(mask.sum().item() / (valid.sum().item() * q.shape[1]))
    assert st.executed >= st.attended.sum()
    keep = reference_cube_keep(q, k, ids, 0.6, key_mask=km) & km[:, None, :, None]  # real queries
    assert st.kept_sum.sum().item() == keep.sum().item()
    # every real query with a candidate cube ran a selection and kept at least one cube
    assert st.selections.sum().item() == keep.any(-1).sum().item()


def test_decode_selects_like_the_reference():
    """A new (text) token scores cached cube mean keys and selects what the full reference selects."""
    q, k, v, ids, _km = make_case(CASES[5], seed=5)
    n = q.shape[2]
    pre = build_cube_index(ids[:, : n - 1])
    cached = cube_mean_keys(k[:, :, : n - 1], pre)
    full_ids = ids.clone()
    full_ids[:, -1] = -1  # the generated token is non-video
    keep_full = reference_cube_keep(q, k, full_ids, 0.6)[:, :, -1:]
    keep_dec = reference_cube_keep(q[:, :, -1:], k, full_ids, 0.6, mean_keys=cached, index=pre)
    assert torch.equal(keep_full, keep_dec)
    full = cube_sparse_attention_reference(q, k, v, full_ids, 0.6)[:, :, -1:]
    dec = cube_sparse_attention_blocked(q[:, :, -1:], k, v, full_ids, 0.6, mean_keys=cached, index=pre)
    torch.testing.assert_close(dec, full, atol=2e-6, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    q, k, v, ids, _ = make_case(CASES[3])
    with pytest.raises(ValueError, match="p must be in"):
        cube_sparse_attention(q, k, v, ids, 0.0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        cube_sparse_attention(q[:, :5], k, v, ids, 0.5)
    with pytest.raises(ValueError, match="cube_ids must have shape"):
        cube_sparse_attention(q, k, v, ids[:, :-1], 0.5)
    with pytest.raises(ValueError, match="int64"):
        cube_sparse_attention(q, k, v, ids.int(), 0.5)
    with pytest.raises(ValueError, match="4-D"):
        cube_sparse_attention(q[0], k, v, ids, 0.5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        cube_sparse_attention(q, k, v, ids, 0.5, backend="cuda-magic")


def test_backend_after_cache_sends_new_tokens_off_flex():
    from adaspark.ops.attention import backend_after_cache

    assert backend_after_cache("flex", 1, 300) == "auto"  # flex is a prefill kernel
    assert backend_after_cache("flex", 300, 300) == "flex"
    for name in ("auto", "gather", "decode", "native", "reference"):
        assert backend_after_cache(name, 1, 300) == name
