"""Content-adaptive cubes (``AdaSparkConfig.cube_mode="adaptive"``): the partition against its naive
reference, its guarantees, and a patched model running on them. (The sparse kernels' invariants on
adaptive cube ids — p = 1 dense, own cube and text kept, causality, every backend equal to the
reference — are in tests/test_properties.py, whose random layouts include adaptive cubes.)"""

from __future__ import annotations

import pytest
import torch

from adaspark import AdaSparkConfig
from adaspark.core.layout import (
    adaptive_cube_bounds,
    adaptive_grid_cube_ids,
    adaptive_grid_cube_ids_reference,
    adaptive_layout,
    build_layout,
    grid_cube_ids,
)


def _boxes(ids: torch.Tensor, grid):
    """Per cube: its bounding box and whether the cube fills it."""
    g = ids.view(*grid)
    out = []
    for c in range(int(ids.max()) + 1):
        idx = (g == c).nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values + 1
        volume = int(torch.prod(hi - lo))
        out.append((tuple(lo.tolist()), tuple(hi.tolist()), volume == len(idx)))
    return out


AWKWARD = [
    ((1, 1, 1), (4, 4, 4), 5),
    ((1, 4, 4), (4, 4, 4), 7),
    ((3, 5, 7), (4, 4, 4), 100),  # ragged: grid smaller than a cube, odd sides
    ((9, 6, 10), (2, 3, 3), 3),
    ((33, 4, 4), (4, 4, 4), 576),  # the projection path (D > 64)
    ((16, 8, 8), (4, 4, 4), 32),
    ((7, 2, 9), (1, 2, 2), 4),
]


@pytest.mark.parametrize(("grid", "cube", "d"), AWKWARD)
def test_fast_partition_equals_the_reference(grid, cube, d):
    for seed in range(3):
        f = torch.randn(grid[0] * grid[1] * grid[2], d, generator=torch.Generator().manual_seed(seed))
        fast = adaptive_grid_cube_ids(f, grid, cube)
        ref = adaptive_grid_cube_ids_reference(f, grid, cube)
        assert torch.equal(fast, ref), (grid, cube, seed)
        # an explicit target and explicit bounds take the same path
        kw = {"num_cubes": 5, "max_cube": tuple(2 * c for c in cube), "min_cube": (1, 1, 1)}
        assert torch.equal(
            adaptive_grid_cube_ids(f, grid, cube, **kw), adaptive_grid_cube_ids_reference(f, grid, cube, **kw)
        )


@pytest.mark.parametrize(("grid", "cube", "d"), AWKWARD)
def test_cubes_are_boxes_within_bounds_numbered_by_first_token(grid, cube, d):
    f = torch.randn(grid[0] * grid[1] * grid[2], d, generator=torch.Generator().manual_seed(1))
    ids = adaptive_grid_cube_ids(f, grid, cube)
    fixed = grid_cube_ids(*grid, cube)
    assert int(ids.max()) + 1 == int(fixed.max()) + 1  # as many cubes as the fixed tiling
    assert set(ids.tolist()) == set(range(int(ids.max()) + 1))
    big, small = adaptive_cube_bounds(cube)
    boxes = _boxes(ids, grid)
    for lo, hi, full in boxes:
        assert full, "a cube is not a box"
        for a in range(3):
            side = hi[a] - lo[a]
            assert side <= big[a]
            # a side below the minimum only where the grid itself is that short there
            assert side >= small[a] or side == grid[a] or hi[a] == grid[a] or lo[a] % big[a] == 0
    firsts = [lo for lo, _, _ in boxes]
    assert firsts == sorted(firsts), "cubes are not numbered in time-major raster order of their first token"


def test_a_distinct_object_gets_its_own_cube_and_static_time_merges():
    """A 2×2-token object shown in 2 slices of a static 64-slice video ends up alone in a cube; the
    static rest is covered by few large cubes (longer than the fixed 4 slices)."""
    g = torch.Generator().manual_seed(0)
    t = 64
    f = torch.randn(32, generator=g).expand(t, 4, 4, 32).clone()
    f[20:22, 1:3, 1:3] = torch.randn(32, generator=g) * 5
    f = f + 0.01 * torch.randn(t, 4, 4, 32, generator=g)
    ids = adaptive_grid_cube_ids(f.reshape(-1, 32), (t, 4, 4), (4, 4, 4)).view(t, 4, 4)
    obj = ids[20:22, 1:3, 1:3]
    assert (obj == obj[0, 0, 0]).all() and int((ids == obj[0, 0, 0]).sum()) == 8
    sizes = torch.bincount(ids.reshape(-1))
    assert len(sizes) == 16 and int(sizes.max()) > 64


def test_constant_video_and_deterministic():
    f = torch.ones(8 * 4 * 4, 16)
    a = adaptive_grid_cube_ids(f, (8, 4, 4), (4, 4, 4))
    assert torch.equal(a, adaptive_grid_cube_ids(f, (8, 4, 4), (4, 4, 4)))
    assert int(a.max()) + 1 == 2


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="features must be"):
        adaptive_grid_cube_ids(torch.randn(10, 4), (2, 2, 2), (2, 2, 2))
    with pytest.raises(ValueError, match="min_cube"):
        adaptive_cube_bounds((4, 4, 4), min_cube=(8, 1, 1))
    with pytest.raises(ValueError, match="cube_mode"):
        AdaSparkConfig(cube_mode="octree")
    with pytest.raises(ValueError, match="adaptive_max_cube"):
        AdaSparkConfig(adaptive_max_cube=(2, 2, 2))


def test_adaptive_layout_keeps_spans_positions_and_per_sample_numbering():
    # sample 0: right padded, one video; sample 1: an image (not cubed) and two videos
    v1, v2, v3 = (2, 4, 4), (4, 4, 4), (1, 2, 2)  # patch grids -> 8, 16, 1 LM tokens (merge 2)
    s0 = [0, 0] + [2] * 8 + [0, 0, 0]
    s1 = [0, 1, 0] + [2] * 16 + [0] + [2] * 1 + [0]
    n = max(len(s0), len(s1))
    types = torch.tensor([s0 + [0] * (n - len(s0)), s1 + [0] * (n - len(s1))])
    mask = torch.tensor([[1] * len(s0) + [0] * (n - len(s0)), [1] * len(s1) + [0] * (n - len(s1))])
    grids = torch.tensor([v1, v2, v3])
    fixed = build_layout(types, grids, cube=(1, 2, 2), attention_mask=mask)
    feats = torch.randn(2, n, 24, generator=torch.Generator().manual_seed(3))
    lay = adaptive_layout(fixed, feats)
    assert torch.equal(lay.cube_ids < 0, fixed.cube_ids < 0)  # the same tokens are video
    assert torch.equal(lay.num_cubes, fixed.num_cubes)
    for s_fixed, s in zip(fixed.spans, lay.spans, strict=True):
        assert torch.equal(s.positions, s_fixed.positions) and s.grid == s_fixed.grid
        assert (s.first_cube, s.num_cubes) == (s_fixed.first_cube, s_fixed.num_cubes)
        ids = lay.cube_ids[s.sample, s.positions]
        assert set(ids.tolist()) == set(range(s.first_cube, s.first_cube + s.num_cubes))
    with pytest.raises(ValueError, match="features"):
        adaptive_layout(fixed, feats[:, :-1])


# ------------------------------------------------------------------------ in a patched model
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    from adaspark.integrations.transformers.tiny import tiny_qwen2_5_vl

    return tiny_qwen2_5_vl(num_layers=2)


@pytest.fixture(scope="module")
def inputs():
    from adaspark.integrations.transformers.tiny import build_inputs

    return build_inputs([[(8, 8, 8)], [(4, 8, 8), (2, 4, 8)]], padding_side="left")


@torch.inference_mode()
@pytest.mark.parametrize("backend", ["reference", "gather", "native"])
def test_p1_on_adaptive_cubes_equals_dense(model, inputs, backend):
    ref = model(**inputs).logits
    gen_ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    cfg = AdaSparkConfig(p=1.0, cube=(2, 2, 2), cube_mode="adaptive", backend=backend, cost_model=False)
    from adaspark import patch

    with patch(model, cfg) as h:
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        lay = h.layout
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, gen_ref)
    fixed = build_layout(
        inputs["mm_token_type_ids"],
        inputs["video_grid_thw"],
        cube=(2, 2, 2),
        attention_mask=inputs["attention_mask"],
    )
    assert torch.equal(lay.num_cubes, fixed.num_cubes)
    assert not torch.equal(lay.cube_ids, fixed.cube_ids), "the cubes were not adapted"


@torch.inference_mode()
def test_sparse_on_adaptive_cubes_runs_and_decodes_sparse(model, inputs):
    from adaspark import patch

    cfg = AdaSparkConfig(p=0.5, cube=(2, 2, 2), cube_mode="adaptive", cost_model=False)
    with patch(model, cfg) as h:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        rep = h.report()
    assert 0 < rep.layers[0].attn_density < 1 and 0 < rep.layers[0].ffn_active < 1
    assert rep.sparse_decode_steps > 0


@torch.inference_mode()
def test_chunked_prefill_is_refused_with_adaptive_cubes(model, inputs):
    from adaspark import patch

    cfg = AdaSparkConfig(p=0.5, cube=(2, 2, 2), cube_mode="adaptive", cost_model=False)
    with patch(model, cfg), pytest.raises(ValueError, match="cube_mode='adaptive'"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, prefill_chunk_size=16)
