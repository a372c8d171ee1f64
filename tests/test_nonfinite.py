"""NaN, inf and half-precision overflow: every case has a defined, documented and tested result.

* Cube scores (``masked_softmax``): NaN counts as ``-inf`` (probability 0, the other cubes are
  normalised without it), ``+inf`` entries share the mass, the result never holds NaN.
* Attention outputs: non-finite q/k/v are never silently dropped: every query that attends a
  non-finite key or value under the semantics, or has a non-finite query, gives NaN. (Queries that do
  not attend it may also give NaN: kernels that mask by adding ``-inf`` or multiply zero weights by
  values spread it, as PyTorch's own SDPA does.)
* FFN: a video token whose score (residual-stream norm) is not finite is never selected; the NaN/inf
  stays in the rows where ``x`` holds it, as in the row-wise dense FFN.
* Norms: accumulated in float32, with a float64 rescue for rows whose float32 norm overflows, so no
  finite fp16/bf16/float32 input scores ``inf``.
"""

from __future__ import annotations

import pytest
import torch

from adaspark.ops import SelectionPolicy, cube_sparse_ffn_gathered, cube_sparse_ffn_reference
from adaspark.ops.attention import ATTENTION_BACKENDS, reference_attention_mask, reference_cube_keep
from adaspark.ops.cubes import build_cube_index, cube_mean_keys
from adaspark.ops.ffn import select_ffn_tokens, select_ffn_tokens_reference, token_scores
from adaspark.ops.selection import keep_from_probs, masked_softmax

from conftest import make_cube_ids

NAN, INF = float("nan"), float("inf")

# ============================================================================ selection


def test_masked_softmax_nan_is_excluded_and_inf_takes_the_mass():
    valid = torch.tensor([True, True, True, False])
    s = torch.tensor([1.0, NAN, 2.0, 5.0])
    expect = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    torch.testing.assert_close(masked_softmax(s, valid), torch.tensor([expect[0], 0.0, expect[1], 0.0]))
    s = torch.tensor([INF, 3.0, INF, INF])  # the invalid +inf takes nothing
    assert masked_softmax(s, valid).tolist() == [0.5, 0.0, 0.5, 0.0]
    s = torch.tensor([NAN, -INF, NAN, 1.0])  # nothing usable among the valid entries
    assert masked_softmax(s, valid).tolist() == [0.0, 0.0, 0.0, 0.0]
    s = torch.tensor([[NAN, INF, -INF, 0.0], [0.0, 1.0, 2.0, 3.0]])  # a bad row leaves the next alone
    out = masked_softmax(s, valid)
    assert out[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(out[1], masked_softmax(s[1], valid))


def _video_case(seed=0, hq=2, n=72):
    """Text, a 2×4×6-token video in 2×2×3 cubes (8 cubes), text; q, k, v ``[1, H, N, 8]``."""
    ids = make_cube_ids(1, n, [[(6, (2, 4, 6), (2, 2, 3))]])
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, hq, n, 8, generator=g) for _ in range(3))
    return q, k, v, ids


def test_nan_mean_key_does_not_derail_the_selection_of_the_other_cubes():
    q, k, _v, ids = _video_case()
    bad = 2
    k_nan = k.clone()
    k_nan[0, :, int((ids[0] == bad).nonzero()[0]), 3] = NAN  # one key of cube 2
    pol = SelectionPolicy(p=0.6)
    keep = reference_cube_keep(q, k_nan, ids, policy=pol)[0]  # [H, N, C]
    # by hand: softmax over the candidates whose score is a number, Top-p over all candidates
    index = build_cube_index(ids)
    mk = cube_mean_keys(k_nan, index)[0]  # [H, C, D], NaN in row `bad`
    assert mk[:, bad].isnan().any() and not mk[:, :bad].isnan().any()
    scores = torch.einsum("hnd,hcd->hnc", q[0], mk) * 8**-0.5
    c = index.max_cubes
    cand = (index.first_pos[0][None, :] <= torch.arange(ids.shape[1])[:, None]) & (
        torch.arange(c)[None, :] != ids[0][:, None]
    )
    usable = cand[None] & ~scores.isnan()
    probs = torch.softmax(scores.masked_fill(~usable, -INF), -1).nan_to_num(0.0)
    assert torch.equal(keep, keep_from_probs(probs, cand[None].expand_as(probs), pol))
    has_other = usable.any(-1)  # queries with a candidate other than the bad cube
    assert has_other.sum() > 20
    assert not keep[..., bad][has_other].any(), "Top-p kept a cube whose score is NaN"


def test_nan_mean_key_cube_is_never_kept_even_by_count_policies():
    q, k, _v, ids = _video_case()
    k_nan = k.clone()
    k_nan[0, :, int((ids[0] == 0).nonzero()[0]), 0] = NAN
    keep = reference_cube_keep(q, k_nan, ids, policy=SelectionPolicy(kind="top_k", k=8))[0]
    assert not keep[..., 0].any()


def test_score_overflow_gives_the_overflowing_cubes_the_mass():
    """Finite bf16 queries times float32 mean keys can overflow float32: the +inf cubes share the mass."""
    ids = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    q = torch.full((1, 1, 8, 4), 1.0e10, dtype=torch.bfloat16)
    mk = torch.ones(1, 1, 4, 4)
    mk[0, 0, :2] = 1.0e30  # cubes 0 and 1 score 4e40 -> +inf
    for p, want in ((0.4, [True, False, False]), (0.9, [True, True, False])):
        keep = reference_cube_keep(q, q, ids, p, mean_keys=mk)  # keys unused: mean keys given
        assert keep[0, 0, -1, :3].tolist() == want  # last query (cube 3): candidates 0, 1, 2


# ============================================================================ attention outputs


def _attention_backends():
    """Every backend but ``flex`` (compiled; covered by its own tests); ``triton`` runs interpreted."""
    return sorted(name for name in ATTENTION_BACKENDS if name != "flex")


@pytest.mark.parametrize(
    ("backend", "where"),
    [pytest.param(b, w) for b in _attention_backends() for w in ("q", "k", "text k", "v", "v inf")],
)
def test_nonfinite_inputs_are_never_silently_dropped(backend, where, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")  # skips without triton
    q, k, v, ids = _video_case(seed=1, n=96)
    pos = {"q": 40, "k": 30, "text k": 3, "v": 30, "v inf": 60}[where]
    q, k, v = q.clone(), k.clone(), v.clone()
    target = {"q": q, "k": k, "text k": k}.get(where, v)
    target[0, :, pos, 1] = INF if where == "v inf" else NAN
    out = ATTENTION_BACKENDS[backend](q, k, v, ids, 0.5)
    if where == "q":
        affected = torch.zeros(1, q.shape[1], q.shape[2], dtype=torch.bool)
        affected[..., pos] = True
    else:
        affected = reference_attention_mask(q, k, ids, 0.5)[..., pos]  # [1, H, N]: queries attending pos
    assert affected.sum() >= 2
    assert not torch.isfinite(out[affected]).all(dim=-1).any(), "a non-finite input was silently dropped"


# ============================================================================ FFN


class _MLP(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = torch.nn.Parameter(torch.randn(d, 12, generator=g))
        self.down = torch.nn.Parameter(torch.randn(12, d, generator=g))

    def forward(self, x):
        return torch.nn.functional.silu(x @ self.up) @ self.down


def _ffn_case(value):
    ids = make_cube_ids(2, 40, [[(2, (2, 4, 4), (2, 2, 2))], [(5, (1, 4, 6), (1, 2, 3))]])
    x = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(2))
    bad = [(0, 3), (0, 9), (0, 20), (1, 6), (1, 0)]  # video rows (cubes of 8 and 6 tokens), one text row
    for b, t in bad:
        x[b, t, t % 8] = value
    return x, ids, bad


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize(
    "pol",
    [SelectionPolicy(p=0.5), SelectionPolicy(p=1.0), SelectionPolicy(kind="top_k", k=8)],
    ids=["p0.5", "p1", "top_k8"],
)
def test_ffn_nonfinite_rows_are_skipped_and_stay_in_their_row(value, pol):
    x, ids, bad = _ffn_case(value)
    f = _MLP()
    scores = token_scores(x)
    active = select_ffn_tokens(scores, ids, pol)
    assert torch.equal(active, select_ffn_tokens_reference(scores, ids, pol))
    for b, t in bad:
        assert bool(active[b, t]) == (ids[b, t] < 0), "a non-finite video token went through the FFN"
    bad_rows = ~torch.isfinite(x).all(-1)
    with torch.no_grad():
        out = cube_sparse_ffn_gathered(x, f, ids, policy=pol)
        ref = cube_sparse_ffn_reference(x, f, ids, policy=pol)
        dense = f(x)
    torch.testing.assert_close(out, ref, equal_nan=True)
    y = x + out
    assert torch.equal(~torch.isfinite(y).all(-1), bad_rows), "NaN/inf spread beyond its own rows"
    assert torch.equal(~torch.isfinite(x + dense).all(-1), bad_rows)  # the dense FFN does the same
    if pol.p >= 1.0 and pol.kind == "top_p":  # p = 1: every finite row is exactly dense
        fin = ~bad_rows
        torch.testing.assert_close(out[fin], dense[fin])


def test_ffn_cube_without_a_finite_score_gets_a_zero_update():
    ids = torch.tensor([[-1, 0, 0, 0, 1, 1, 1, -1]])
    x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(3))
    x[0, 1:4, 0] = NAN  # every token of cube 0
    f = _MLP()
    with torch.no_grad():
        for fn in (cube_sparse_ffn_gathered, cube_sparse_ffn_reference):
            out = fn(x, f, ids, 0.5)
            assert (out[0, 1:4] == 0).all()
            assert torch.isfinite(out[0, 4:]).all()
            torch.testing.assert_close(out[0, [0, 7]], f(x[0, [0, 7]]))


# ============================================================================ norm overflow


@pytest.mark.parametrize(
    ("dtype", "big"), [(torch.bfloat16, 1.0e20), (torch.float32, 1.0e20), (torch.float16, 6.0e4)]
)
def test_token_scores_of_finite_inputs_never_overflow(dtype, big):
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    x[0, 1] = big
    x[0, 2] = big / 2
    x[0, 3, 5] = INF
    x[0, 4, 7] = NAN
    s = token_scores(x)
    assert s.dtype == torch.float32
    exact = torch.linalg.vector_norm(x.double(), dim=-1)
    torch.testing.assert_close(s[0, [0, 1, 2, 5]].double(), exact[0, [0, 1, 2, 5]], rtol=1e-6, atol=0)
    assert s[0, 3].item() == INF and s[0, 4].isnan()
    # ordinary rows are left exactly as the one-pass float32 norm gives them
    plain = torch.linalg.vector_norm(x[0, [0, 5]], dim=-1, dtype=torch.float32)
    assert torch.equal(s[0, [0, 5]], plain)
    # the ranking sees the true order of the huge rows: the larger one is kept first
    ids = torch.tensor([[-1, 0, 0, -1, -1, -1]])
    assert select_ffn_tokens(s, ids, SelectionPolicy(p=0.5)).tolist() == [
        [True, True, False, True, True, True]
    ]


def test_token_scores_float64_rescue():
    x = torch.full((1, 2, 16), 1.0e200, dtype=torch.float64)
    x[0, 1] = 1.0
    s = token_scores(x)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, torch.tensor([[4.0e200, 4.0]], dtype=torch.float64))
