"""Property tests (hypothesis): selection, cube index, layout and the attention/FFN ops on random inputs.

Each test states an invariant of the semantics (documented in ``adaspark.ops``) and lets hypothesis
search small random grids, lengths, paddings and policies for a counterexample. Budgets are modest
(``max_examples`` per test; about 20 s of CPU for the file) and the example database is off
(hypothesis still keeps a small cache in ``.hypothesis/``, which ignores itself in git). The random
tensors of a case are drawn from a seed inside the case, so a failure report stays a few lines long.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaspark.core.layout import build_layout
from adaspark.ops import SelectionPolicy, cube_sparse_ffn_gathered, cube_sparse_ffn_reference
from adaspark.ops.attention import ATTENTION_BACKENDS, BACKEND_GRANULARITIES, reference_attention_mask
from adaspark.ops.cubes import NEVER, build_cube_index, cube_mean_keys
from adaspark.ops.selection import keep_from_probs, masked_softmax


def fast(n: int, **kw):
    """Settings of every property here: ``n`` examples, no deadline, no example database."""
    return settings(max_examples=n, deadline=None, database=None, **kw)


# ============================================================================ selection

policies = st.one_of(
    st.builds(
        SelectionPolicy,
        kind=st.just("top_p"),
        p=st.floats(0.01, 1.0),
        min_keep=st.integers(0, 3),
        max_keep=st.none() | st.integers(1, 5),
    ),
    st.builds(SelectionPolicy, kind=st.just("top_k"), k=st.integers(1, 6), min_keep=st.integers(0, 3)),
    st.builds(SelectionPolicy, kind=st.just("ratio"), ratio=st.floats(0.05, 1.0), min_keep=st.integers(0, 3)),
)


@st.composite
def distributions(draw, max_c: int = 12):
    """``(probs, valid)`` rows ``[R, C]`` in float64: ties are likely (weights from a small set)."""
    rows = draw(st.integers(1, 4))
    c = draw(st.integers(1, max_c))
    pool = st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.0]) | st.floats(0.0, 10.0)
    w = torch.tensor(draw(st.lists(pool, min_size=rows * c, max_size=rows * c)), dtype=torch.float64)
    w = w.view(rows, c)
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * c, max_size=rows * c))).view(rows, c)
    w = w * valid
    tot = w.sum(-1, keepdim=True)
    uniform = valid.double() / valid.sum(-1, keepdim=True).clamp_min(1)
    probs = torch.where(tot > 0, w / torch.where(tot > 0, tot, torch.ones_like(tot)), uniform)
    return probs, valid


def _stable_order(probs: list[float], valid: list[bool]) -> list[int]:
    return sorted((i for i in range(len(probs)) if valid[i]), key=lambda i: -probs[i])


@fast(150)
@given(distributions(), policies)
def test_keep_is_a_stable_prefix_with_the_policy_count(dist, pol):
    probs, valid = dist
    keep = keep_from_probs(probs, valid, pol)
    assert keep.dtype == torch.bool and keep.shape == probs.shape
    for row in range(probs.shape[0]):
        pr, va, ke = probs[row].tolist(), valid[row].tolist(), keep[row].tolist()
        order = _stable_order(pr, va)
        n, r = len(order), sum(ke)
        assert not any(k and not v for k, v in zip(ke, va, strict=True)), "kept a non-candidate"
        assert ke == [i in set(order[:r]) for i in range(len(pr))], "not a prefix of the stable order"
        cap = n if pol.max_keep is None else min(n, pol.max_keep)
        floor = min(n, max(pol.min_keep, 1), cap)
        assert floor <= r <= cap  # a row without candidates keeps none; the checks below hold for it too
        if pol.kind == "top_p":
            if pol.p >= 1.0 and pol.max_keep is None:
                assert r == n
            mass = math.fsum(pr[i] for i in order[:r])
            if r < cap:
                assert mass >= pol.p - 1e-9, "stopped before reaching p"
            if r > floor:
                assert mass - pr[order[r - 1]] < pol.p + 1e-9, "kept more than the shortest prefix"
        elif pol.kind == "top_k":
            assert r == min(max(min(pol.k, n), floor), cap)
        else:
            assert r == min(max(math.ceil(pol.ratio * n - 1e-9), floor), cap)


@fast(100)
@given(distributions(), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_top_p_is_monotone_in_p_and_p1_keeps_every_candidate(dist, p1, p2):
    probs, valid = dist
    lo, hi = sorted((p1, p2))
    k_lo = keep_from_probs(probs, valid, SelectionPolicy(p=lo))
    k_hi = keep_from_probs(probs, valid, SelectionPolicy(p=hi))
    assert not (k_lo & ~k_hi).any(), "a larger p dropped a candidate"
    assert torch.equal(keep_from_probs(probs, valid, SelectionPolicy(p=1.0)), valid)
    # at least one whenever a candidate exists
    assert torch.equal(k_lo.any(-1), valid.any(-1))


special = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@fast(150)
@given(
    st.integers(1, 10).flatmap(
        lambda c: st.tuples(
            st.lists(st.floats(-30, 30) | special, min_size=c, max_size=c),
            st.lists(st.booleans(), min_size=c, max_size=c),
        )
    )
)
def test_masked_softmax_is_defined_for_any_scores(row):
    scores, valid = torch.tensor(row[0]), torch.tensor(row[1])
    probs = masked_softmax(scores, valid)
    assert probs.dtype == torch.float32 and not probs.isnan().any()
    assert (probs >= 0).all() and (probs[~valid] == 0).all()
    s = scores.masked_fill(~valid, float("-inf"))
    usable = valid & ~scores.isnan() & (s > float("-inf"))
    top = valid & (scores == float("inf"))
    if top.any():  # +inf entries share the mass
        expect = top.float() / top.sum()
    elif usable.any():  # NaN and -inf are excluded, the rest is an ordinary softmax
        expect = torch.zeros(len(row[0]))
        expect[usable] = torch.softmax(scores[usable].double(), 0).float()
    else:
        expect = torch.zeros(len(row[0]))
    torch.testing.assert_close(probs, expect, atol=1e-6, rtol=1e-5)


# ============================================================================ cube index


@st.composite
def cube_id_batches(draw):
    """``[B, N]`` cube ids in any arrangement (cubes need not be contiguous), ids without gaps."""
    bsz = draw(st.integers(1, 3))
    n = draw(st.integers(0, 40))
    rows = []
    for _ in range(bsz):
        c = draw(st.integers(0, 6))
        raw = draw(st.lists(st.integers(-1, c - 1), min_size=n, max_size=n))
        relabel: dict[int, int] = {}
        for x in raw:  # number the cubes by first appearance: 0..C_b-1 without gaps
            if x >= 0 and x not in relabel:
                relabel[x] = len(relabel)
        rows.append([relabel.get(x, -1) for x in raw])
    return torch.tensor(rows, dtype=torch.long).view(bsz, n)


@fast(100)
@given(cube_id_batches(), st.integers(1, 3), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_cube_index_and_mean_keys_equal_brute_force(ids, hkv, d, seed):
    bsz, n = ids.shape
    index = build_cube_index(ids)
    assert index.seq_len == n
    for b in range(bsz):
        row = ids[b].tolist()
        nc = max(row, default=-1) + 1
        assert int(index.num_cubes[b]) == nc
        listed = [t for t in index.token_idx[b].reshape(-1).tolist() if t >= 0]
        video = [i for i, c in enumerate(row) if c >= 0]
        assert sorted(listed) == video, "a video token is missing or listed twice"
        for c in range(index.max_cubes):
            members = [i for i, x in enumerate(row) if x == c]
            slots = index.token_idx[b, c].tolist()
            assert slots[: len(members)] == members and all(s == -1 for s in slots[len(members) :])
            assert int(index.counts[b, c]) == len(members)
            assert int(index.first_pos[b, c]) == (members[0] if members else NEVER)
    k = torch.randn(bsz, hkv, n, d, generator=torch.Generator().manual_seed(seed))
    mk = cube_mean_keys(k, index)
    assert mk.dtype == torch.float32 and mk.shape == (bsz, hkv, index.max_cubes, d)
    for b in range(bsz):
        for c in range(index.max_cubes):
            members = (ids[b] == c).nonzero().squeeze(1)
            want = k[b][:, members].double().mean(1) if members.numel() else torch.zeros(hkv, d)
            torch.testing.assert_close(mk[b, :, c].double(), want.double(), atol=1e-6, rtol=1e-5)


# ============================================================================ layout

TEXT, IMAGE, VIDEO = 0, 1, 2

segments = st.one_of(
    st.tuples(st.just("text"), st.integers(0, 4)),
    st.tuples(st.just("video"), st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4))),
    st.tuples(st.just("image"), st.tuples(st.just(1), st.integers(1, 3), st.integers(1, 3))),
)


@st.composite
def layout_batches(draw):
    """A padded batch of samples made of text, videos and images, and everything needed to check it."""
    merge = draw(st.sampled_from([1, 2]))
    cube = draw(st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))
    samples = draw(st.lists(st.lists(segments, max_size=5), min_size=1, max_size=3))
    n = max(sum(x if kind == "text" else math.prod(x) for kind, x in s) for s in samples)
    n += draw(st.integers(0, 4))
    bsz = len(samples)
    types = torch.zeros(bsz, n, dtype=torch.long)
    am = torch.zeros(bsz, n, dtype=torch.long)
    starts = []
    for b, segs in enumerate(samples):
        seq = []
        for kind, x in segs:
            if kind == "text":
                seq += [TEXT] * x
            else:
                seq += [VIDEO if kind == "video" else IMAGE] * math.prod(x)
        off = n - len(seq) if draw(st.booleans()) else 0  # left or right padding
        # padding carries an arbitrary type id: the attention mask alone must make it non-video
        types[b] = draw(st.sampled_from([TEXT, IMAGE, VIDEO]))
        types[b, off : off + len(seq)] = torch.tensor(seq, dtype=torch.long)
        am[b, off : off + len(seq)] = 1
        starts.append(off)
    images_as_video = draw(st.booleans())
    has_images = any(kind == "image" for s in samples for kind, _ in s)
    give_image_grids = has_images and (images_as_video or draw(st.booleans()))
    return samples, types, am, starts, merge, cube, images_as_video and has_images, give_image_grids


def _grids(samples, kind, merge):
    """``[num, 3]`` patch grids of every ``kind`` segment of the batch, in order (None if there is none)."""
    g = [(x[0], x[1] * merge, x[2] * merge) for segs in samples for k, x in segs if k == kind]
    return torch.tensor(g, dtype=torch.long).view(-1, 3) if g else None


def _layout(samples, types, am, merge, cube, as_video, give_images):
    return build_layout(
        types,
        _grids(samples, "video", merge),
        cube=cube,
        spatial_merge_size=merge,
        attention_mask=am,
        image_grid_thw=_grids(samples, "image", merge) if give_images else None,
        images_as_video=as_video,
    )


def _check_cubed_span(span: list[int], grid: tuple[int, int, int], cube, first_id: int) -> int:
    """Assert that the cube ids of one video span tile its grid in aligned, maximal boxes numbered in
    time-major order from ``first_id``; returns the number of cubes."""
    t, h, w = grid
    ct, ch, cw = cube
    n_cubes = -(-t // ct) * -(-h // ch) * -(-w // cw)
    assert sorted(set(span)) == list(range(first_id, first_id + n_cubes)), "ids not consecutive"
    boxes = {}
    for i, c in enumerate(span):  # token i of the video sits at (ti, y, xx) in raster order
        boxes.setdefault(c, []).append((i // (h * w), (i // w) % h, i % w))
    firsts = []
    for c in range(first_id, first_id + n_cubes):
        pts = boxes[c]
        lo = [min(p[a] for p in pts) for a in range(3)]
        hi = [max(p[a] for p in pts) for a in range(3)]
        ext = [hi[a] - lo[a] + 1 for a in range(3)]
        assert len(pts) == math.prod(ext) and len(set(pts)) == len(pts), "cube is not a full box"
        assert ext[0] <= ct and ext[1] <= ch and ext[2] <= cw, "cube larger than the cube shape"
        assert lo[0] % ct == 0 and lo[1] % ch == 0 and lo[2] % cw == 0, "cube not on the cube grid"
        # a box is maximal: it reaches the next grid line or the edge of the video
        assert [h_ + 1 for h_ in hi] == [min(lo[0] + ct, t), min(lo[1] + ch, h), min(lo[2] + cw, w)]
        firsts.append(tuple(lo))
    assert firsts == sorted(firsts), "cubes not numbered in time-major raster order"
    return n_cubes


@fast(120)
@given(layout_batches())
def test_layout_cubes_are_aligned_boxes_in_time_major_order(batch):
    samples, types, am, starts, merge, cube, as_video, give_images = batch
    lay = _layout(samples, types, am, merge, cube, as_video, give_images)
    ids = lay.cube_ids
    assert ids.dtype == torch.long and ids.shape == types.shape
    assert (ids[am == 0] == -1).all(), "a padding token got a cube"
    for b, segs in enumerate(samples):
        pos, next_cube = starts[b], 0
        for kind, x in segs:
            n_tok = x if kind == "text" else math.prod(x)
            span = ids[b, pos : pos + n_tok].tolist()
            pos += n_tok
            if kind == "text":
                assert all(c == -1 for c in span), "a text token got a cube"
            elif kind == "image" and not as_video:
                assert all(c == -1 for c in span), "an image was cubed without images_as_video"
            else:
                next_cube += _check_cubed_span(span, x, cube, next_cube)
    spans_ok = [(s.sample, s.kind, s.grid) for s in lay.spans]
    want = [
        (b, kind, x)
        for b, segs in enumerate(samples)
        for kind, x in segs
        if kind == "video" or (kind == "image" and as_video)
    ]
    assert spans_ok == want


@fast(80)
@given(layout_batches())
def test_layout_of_a_sample_does_not_depend_on_padding_or_batch(batch):
    samples, types, am, starts, merge, cube, as_video, give_images = batch
    lay = _layout(samples, types, am, merge, cube, as_video, give_images)
    for b, segs in enumerate(samples):
        real = am[b].bool()
        alone = _layout([segs], types[b, real][None], None, merge, cube, as_video, give_images)
        assert torch.equal(lay.cube_ids[b, real], alone.cube_ids[0]), f"sample {b} depends on padding"
        for s_batch, s_alone in zip([s for s in lay.spans if s.sample == b], alone.spans, strict=True):
            assert torch.equal(s_batch.positions - starts[b], s_alone.positions)
            assert (s_batch.first_cube, s_batch.num_cubes) == (s_alone.first_cube, s_alone.num_cubes)


@fast(60)
@given(layout_batches(), st.integers(1, 3))
def test_cube_index_of_a_layout_covers_every_video_token_once(batch, hkv):
    samples, types, am, _starts, merge, cube, as_video, give_images = batch
    lay = _layout(samples, types, am, merge, cube, as_video, give_images)
    index = build_cube_index(lay.cube_ids)
    vid = (lay.cube_ids >= 0).nonzero().tolist()
    listed = [
        (b, t)
        for b in range(index.token_idx.shape[0])
        for t in index.token_idx[b].reshape(-1).tolist()
        if t >= 0
    ]
    assert sorted(listed) == sorted(map(tuple, vid))
    assert (index.counts <= math.prod(cube)).all()
    assert torch.equal(index.num_cubes, lay.num_cubes)


# ============================================================================ attention

attention_policies = st.one_of(
    st.builds(SelectionPolicy, kind=st.just("top_p"), p=st.floats(0.05, 1.0)),
    st.builds(SelectionPolicy, kind=st.just("top_k"), k=st.integers(1, 4)),
    st.builds(SelectionPolicy, kind=st.just("ratio"), ratio=st.floats(0.1, 1.0), min_keep=st.integers(0, 2)),
)


@st.composite
def video_rows(draw, n: int):
    """Cube ids ``[N]`` of one sample: text, then one or two videos cut into cubes (fixed, or
    content-adaptive from random features), then text."""
    from adaspark.core.layout import adaptive_grid_cube_ids, grid_cube_ids

    row = [-1] * draw(st.integers(0, 6))
    next_cube = 0
    for _ in range(draw(st.integers(0, 2))):
        t, h, w = draw(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)))
        cube = draw(st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)))
        if draw(st.booleans()):
            g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
            feats = torch.randn(t * h * w, 6, generator=g)
            local = adaptive_grid_cube_ids(feats, (t, h, w), cube)
        else:
            local = grid_cube_ids(t, h, w, cube)
        row += (local + next_cube).tolist()
        next_cube += int(local.max()) + 1
        row += [-1] * draw(st.integers(0, 4))
    row = row[:n] + [-1] * max(0, n - len(row))
    # a cut may have removed whole cubes at the end: renumber without gaps
    relabel: dict[int, int] = {}
    return [relabel.setdefault(c, len(relabel)) if c >= 0 else -1 for c in row]


@dataclass(frozen=True)
class AttentionCase:
    """A random attention problem, kept small in reports: the tensors are drawn from ``seed``."""

    ids: torch.Tensor  # [B, Nk] cube ids
    key_mask: torch.Tensor | None  # [B, Nk] bool, None without padding
    hq: int
    hkv: int
    d: int
    nq: int
    seed: int
    policy: SelectionPolicy

    def tensors(self):
        bsz, n = self.ids.shape
        g = torch.Generator().manual_seed(self.seed)
        q = torch.randn(bsz, self.hq, self.nq, self.d, generator=g) * 1.5
        k = torch.randn(bsz, self.hkv, n, self.d, generator=g) * 1.5
        v = torch.randn(bsz, self.hkv, n, self.d, generator=g)
        return q, k, v


@st.composite
def attention_cases(draw):
    bsz = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    n = draw(st.integers(1, 80))
    ids = torch.full((bsz, n), -1, dtype=torch.long)
    km = torch.ones(bsz, n, dtype=torch.bool)
    for b in range(bsz):
        pad = draw(st.integers(0, n // 3))
        real = n - pad
        off = pad if draw(st.booleans()) else 0  # left or right padding
        ids[b, off : off + real] = torch.tensor(draw(video_rows(real)), dtype=torch.long)
        km[b] = False
        km[b, off : off + real] = True
    nq = n if draw(st.booleans()) else draw(st.integers(1, n))
    return AttentionCase(
        ids=ids,
        key_mask=None if bool(km.all()) else km,
        hq=hq,
        hkv=hkv,
        d=draw(st.sampled_from([4, 8])),
        nq=nq,
        seed=draw(st.integers(0, 2**31 - 1)),
        policy=draw(attention_policies),
    )


def _attend(backend: str, q, k, v, case: AttentionCase, granularity: str, **kw):
    fn = ATTENTION_BACKENDS[backend]
    if "granularity" in inspect.signature(fn).parameters:
        kw["granularity"] = granularity
    return fn(q, k, v, case.ids, policy=case.policy, key_mask=case.key_mask, **kw)


#: (backend, granularity) of every path but ``flex``, which compiles per shape, so random shapes
#: would recompile on every example (minutes on CPU), and ``triton``, which runs on CPU only in
#: Triton's (slow) interpreter; their own tests cover them on fixed awkward shapes
FAST = [
    (name, gran)
    for name in sorted(ATTENTION_BACKENDS)
    if name not in ("reference", "flex", "triton")
    for gran in BACKEND_GRANULARITIES[name]
]
REFERENCE = [("reference", gran) for gran in BACKEND_GRANULARITIES["reference"]]
with_fixture = {"suppress_health_check": [HealthCheck.function_scoped_fixture]}


@pytest.mark.parametrize(("backend", "granularity"), FAST)
@fast(30, **with_fixture)
@given(case=attention_cases())
def test_attention_backends_equal_the_reference(backend, granularity, case, nan_empty):
    q, k, v = case.tensors()
    ref = _attend("reference", q, k, v, case, granularity)
    out = _attend(backend, q, k, v, case, granularity, query_block=64)
    assert nan_empty.poisoned(out), f"the {backend} kernel's output allocation escapes the NaN poison"
    assert not out.isnan().any(), "an output row was left unwritten"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("granularity", [g for _, g in REFERENCE])
@fast(40)
@given(case=attention_cases())
def test_own_cube_and_text_always_attended_and_causal(granularity, case):
    q, k, _v = case.tensors()
    ids, km, pol = case.ids, case.key_mask, case.policy
    kw = {"granularity": granularity} if granularity != "token" else {}
    mask = reference_attention_mask(q, k, ids, policy=pol, key_mask=km, **kw)
    bsz, _hq, nq, nk = mask.shape
    kmask = torch.ones(bsz, nk, dtype=torch.bool) if km is None else km
    qpos = torch.arange(nk - nq, nk)
    causal = torch.arange(nk)[None, :] <= qpos[:, None]  # [Nq, Nk]
    valid = causal[None] & kmask[:, None, :] & kmask[:, nk - nq :, None]  # [B, Nq, Nk]
    assert not (mask & ~valid[:, None]).any(), "a query attends a later key or padding"
    text = (ids < 0)[:, None, :] & valid
    assert (mask | ~text[:, None]).all(), "a non-video key was dropped"
    qc = ids[:, nk - nq :]
    own = (qc[:, :, None] == ids[:, None, :]) & (ids[:, None, :] >= 0) & valid
    assert (mask | ~own[:, None]).all(), "a key of the query's own cube was dropped"
    if pol.kind == "top_p" and pol.p >= 1.0:
        assert torch.equal(mask, valid[:, None].expand_as(mask)), "p = 1 is not dense"


@pytest.mark.parametrize(("backend", "granularity"), REFERENCE + FAST)
@fast(20)
@given(case=attention_cases(), data=st.data())
def test_attention_never_reads_later_values_or_text(backend, granularity, case, data):
    """Values after a position, and non-video keys after it, never change outputs before it (future
    video keys may: cube mean keys average the whole cube, by design)."""
    q, k, v = case.tensors()
    ids = case.ids
    nq, nk = q.shape[2], k.shape[2]
    cut = data.draw(st.integers(nk - nq, nk), label="cut")  # first changed position
    out = _attend(backend, q, k, v, case, granularity)
    v2, k2 = v.clone(), k.clone()
    v2[:, :, cut:] += 100.0
    text_after = (ids[:, cut:] < 0)[:, None, :, None]
    k2[:, :, cut:] = torch.where(text_after, k2[:, :, cut:] * -7.0, k2[:, :, cut:])
    out2 = _attend(backend, q, k2, v2, case, granularity)
    before = cut - (nk - nq)  # queries before the cut
    torch.testing.assert_close(out2[:, :, :before], out[:, :, :before], atol=1e-6, rtol=1e-6)


# ============================================================================ FFN


@dataclass(frozen=True)
class FFNCase:
    """A random FFN problem, kept small in reports: ``x`` and the weights are drawn from ``seed``."""

    ids: torch.Tensor  # [B, N] cube ids
    d: int
    d_out: int
    unit_norms: bool  # every token has norm 1: ties in every cube
    seed: int
    policy: SelectionPolicy
    compensation: bool

    def tensors(self):
        bsz, n = self.ids.shape
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(bsz, n, self.d, generator=g) * torch.rand(bsz, n, 1, generator=g) * 3
        if self.unit_norms:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        f = torch.nn.Linear(self.d, self.d_out)
        with torch.no_grad():
            for prm in f.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))
        return x, f


@st.composite
def ffn_cases(draw):
    bsz = draw(st.integers(1, 2))
    n = draw(st.integers(1, 70))
    d = draw(st.sampled_from([3, 8]))
    return FFNCase(
        ids=torch.tensor([draw(video_rows(n)) for _ in range(bsz)], dtype=torch.long).view(bsz, n),
        d=d,
        d_out=draw(st.sampled_from([d, 5])),
        unit_norms=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        policy=draw(attention_policies),
        compensation=draw(st.booleans()),
    )


@fast(60, **with_fixture)
@given(case=ffn_cases())
def test_ffn_gathered_equals_reference_and_text_stays_dense(case, nan_empty):
    x, f = case.tensors()
    ids, pol, comp = case.ids, case.policy, case.compensation
    with torch.no_grad():
        ref = cube_sparse_ffn_reference(x, f, ids, policy=pol, mean_compensation=comp)
        out = cube_sparse_ffn_gathered(x, f, ids, policy=pol, mean_compensation=comp)
        dense = f(x)
    assert nan_empty.poisoned(out), "the gathered FFN's output allocation escapes the NaN poison"
    assert not out.isnan().any(), "an output row was left unwritten"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    text = ids < 0
    torch.testing.assert_close(out[text], dense[text], atol=1e-5, rtol=1e-5)
    if pol.kind == "top_p" and pol.p >= 1.0:
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
