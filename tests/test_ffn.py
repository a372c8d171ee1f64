"""AdaS-FFN: the gathered path equals the reference; mean compensation; text stays dense."""

from __future__ import annotations

import pytest
import torch

from adaspark.ops import (
    FFNStats,
    SelectionPolicy,
    cube_sparse_ffn,
    cube_sparse_ffn_gathered,
    cube_sparse_ffn_reference,
)
from adaspark.ops.ffn import select_ffn_tokens, select_ffn_tokens_reference, token_scores

from conftest import make_cube_ids


class SwiGLU(torch.nn.Module):
    def __init__(self, d=16, i=40, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate = torch.nn.Linear(d, i, bias=False)
        self.up = torch.nn.Linear(d, i, bias=False)
        self.down = torch.nn.Linear(i, d, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


CASES = [
    ("n1", 1, 1, [[(0, (1, 1, 1), (4, 4, 4))]]),
    ("ragged", 1, 130, [[(3, (3, 5, 7), (2, 2, 3))]]),
    (
        "batch_two_videos",
        2,
        160,
        [[(2, (2, 4, 4), (2, 2, 2)), (50, (3, 6, 5), (2, 3, 2))], [(10, (4, 4, 8), (4, 4, 4))]],
    ),
    ("text_only", 2, 20, [[], []]),
]
POLICIES = [
    SelectionPolicy(p=0.3),
    SelectionPolicy(p=0.7),
    SelectionPolicy(p=0.95),
    SelectionPolicy(kind="top_k", k=3),
    SelectionPolicy(kind="ratio", ratio=0.25),
]


def make(case, dtype=torch.float32, seed=0):
    _, bsz, n, videos = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(bsz, n, 16, generator=g) * torch.rand(bsz, n, 1, generator=g) * 3).to(dtype)
    return x, make_cube_ids(bsz, n, videos)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("pol", POLICIES, ids=lambda p: f"{p.kind}-{p.p if p.kind == 'top_p' else p.k}")
@pytest.mark.parametrize("comp", [True, False])
def test_gathered_equals_reference(case, pol, comp, nan_empty):
    x, ids = make(case)
    f = SwiGLU()
    with torch.no_grad():
        ref = cube_sparse_ffn_reference(x, f, ids, policy=pol, mean_compensation=comp)
        out = cube_sparse_ffn_gathered(x, f, ids, policy=pol, mean_compensation=comp)
    assert nan_empty.poisoned(out), "the gathered FFN's output allocation escapes the NaN poison"
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pol", POLICIES, ids=lambda p: p.kind)
def test_vectorised_selection_equals_loop(pol):
    x, ids = make(CASES[2])
    s = torch.linalg.vector_norm(x, dim=-1)
    assert torch.equal(select_ffn_tokens(s, ids, pol), select_ffn_tokens_reference(s, ids, pol))


def test_mean_compensation_formula_and_text_dense():
    # one cube of 4 tokens with clearly ordered norms, text around it
    x = torch.zeros(1, 6, 2)
    x[0, 0] = torch.tensor([0.5, 0.5])  # text
    x[0, 1] = torch.tensor([10.0, 0.0])  # video, norm 10
    x[0, 2] = torch.tensor([0.0, 6.0])  # video, norm 6
    x[0, 3] = torch.tensor([1.0, 0.0])  # video, norm 1
    x[0, 4] = torch.tensor([0.0, 1.0])  # video, norm 1
    x[0, 5] = torch.tensor([-0.1, 0.2])  # text, tiny norm
    ids = torch.tensor([[-1, 0, 0, 0, 0, -1]])
    w = torch.tensor([[2.0, -1.0], [0.5, 3.0]])

    def f(t):
        return torch.tanh(t @ w)

    st = FFNStats()
    # distribution 10/18, 6/18, 1/18, 1/18: p = 0.8 keeps the first two (mass before #3 = 16/18 >= 0.8)
    delta = cube_sparse_ffn(x, f, ids, 0.8, stats=st)
    fx = f(x)
    mean_active = (fx[0, 1] + fx[0, 2]) / 2
    torch.testing.assert_close(delta[0, 1], fx[0, 1])
    torch.testing.assert_close(delta[0, 2], fx[0, 2])
    torch.testing.assert_close(delta[0, 3], mean_active)
    torch.testing.assert_close(delta[0, 4], mean_active)
    torch.testing.assert_close(delta[0, 0], fx[0, 0])  # text: dense
    torch.testing.assert_close(delta[0, 5], fx[0, 5])  # text with the smallest norm: still dense
    assert (st.video_tokens, st.active_video, st.ffn_rows, st.compensated) == (4, 2, 4, 2)
    assert st.active_fraction == 0.5
    no_comp = cube_sparse_ffn(x, f, ids, 0.8, mean_compensation=False)
    assert (no_comp[0, 3:5] == 0).all()


def test_p1_is_dense_ffn():
    x, ids = make(CASES[2])
    f = SwiGLU()
    with torch.no_grad():
        out = cube_sparse_ffn(x, f, ids, 1.0)
        torch.testing.assert_close(out, f(x), atol=1e-6, rtol=1e-5)


def test_bf16_error_within_twice_pytorch():
    x, ids = make(CASES[2], dtype=torch.bfloat16, seed=4)
    f32 = SwiGLU(seed=2)
    f16 = SwiGLU(seed=2).to(torch.bfloat16)
    s = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)  # same ranking for every run
    with torch.no_grad():
        truth = cube_sparse_ffn_reference(x.float(), f32, ids, 0.6, scores=s)
        own = cube_sparse_ffn_reference(x, f16, ids, 0.6, scores=s)
        fast = cube_sparse_ffn_gathered(x, f16, ids, 0.6, scores=s)
    assert fast.dtype == torch.bfloat16
    err_own = (own.float() - truth).abs().max().item()
    err_fast = (fast.float() - truth).abs().max().item()
    assert err_own > 0 and err_fast <= 2 * err_own, (err_fast, err_own)


def test_gradients_flow_through_kept_tokens_and_compensation():
    x, ids = make(CASES[1])
    f = SwiGLU()
    grads = []
    for fn in (cube_sparse_ffn_reference, cube_sparse_ffn_gathered):
        f.zero_grad()
        xx = x.clone().requires_grad_()
        fn(xx, f, ids, 0.5).pow(2).sum().backward()
        grads.append((xx.grad, f.gate.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)


def test_half_precision_norms_do_not_overflow():
    """Squares of fp16 activations overflow fp16; scores are accumulated in float32."""
    x = torch.full((1, 4, 8), 6.0e4, dtype=torch.float16)
    x[0, 2] = 3.0e4
    ids = torch.tensor([[0, 0, 0, 0]])
    s = token_scores(x)
    assert torch.isfinite(s).all() and s[0, 0].item() == pytest.approx(6.0e4 * 8**0.5, rel=1e-3)
    active = select_ffn_tokens(s, ids, SelectionPolicy(p=0.2))
    assert active.tolist() == [[True, False, False, False]]  # ties: lowest index first; #2 is smaller


def test_bad_inputs():
    x, ids = make(CASES[1])
    with pytest.raises(ValueError, match="p must be in"):
        cube_sparse_ffn(x, torch.nn.Identity(), ids, 1.5)
    with pytest.raises(ValueError, match="cube_ids must be an int64"):
        cube_sparse_ffn(x, torch.nn.Identity(), ids[:, :-1], 0.5)
    with pytest.raises(ValueError, match="x must be a float tensor"):
        cube_sparse_ffn(x[0], torch.nn.Identity(), ids, 0.5)


def test_chunked_cube_means_equal_one_shot():
    x, ids = make(CASES[2])
    f = SwiGLU()
    with torch.no_grad():
        one = cube_sparse_ffn_gathered(x, f, ids, 0.5)
        assert int((ids >= 0).sum()) > 3  # the chunked run really takes several chunks
        chunked = cube_sparse_ffn_gathered(x, f, ids, 0.5, ffn_sum_chunk=3)
        # the dispatcher passes it to the gathered path (the reference has no such knob)
        via = cube_sparse_ffn(x, f, ids, 0.5, ffn_sum_chunk=3)
        ref = cube_sparse_ffn(x, f, ids, 0.5, backend="reference", ffn_sum_chunk=3)
    torch.testing.assert_close(chunked, one, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(via, chunked, atol=0, rtol=0)
    torch.testing.assert_close(ref, one, atol=1e-5, rtol=1e-5)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="ffn_sum_chunk"):
            cube_sparse_ffn_gathered(x, f, ids, 0.5, ffn_sum_chunk=bad)


def test_float64_inputs():
    x, ids = make(CASES[1], dtype=torch.float64)
    f = SwiGLU().double()
    with torch.no_grad():
        torch.testing.assert_close(
            cube_sparse_ffn_gathered(x, f, ids, 0.5), cube_sparse_ffn_reference(x, f, ids, 0.5)
        )


def test_identical_norms_keep_exactly_the_top_p_share():
    """Static frames give a cube identical norms: p = r/n keeps r tokens, not r + 1."""
    ids = torch.zeros(1, 10, dtype=torch.long)
    for dtype in (torch.float32, torch.float64):
        s = torch.ones(1, 10, dtype=dtype)
        for r in range(1, 10):
            active = select_ffn_tokens(s, ids, SelectionPolicy(p=r / 10))
            assert active.sum().item() == r, (dtype, r)
