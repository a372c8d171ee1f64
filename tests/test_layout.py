import pytest
import torch

from adaspark.core.layout import build_layout, grid_cube_ids, token_types_from_ids
from adaspark.ops.cubes import build_cube_index, cube_mean_keys


def brute_cube(t, h, w, cube):
    ct, ch, cw = cube
    nh, nw = -(-h // ch), -(-w // cw)
    return [
        (ti // ct) * nh * nw + (y // ch) * nw + (x // cw)
        for ti in range(t)
        for y in range(h)
        for x in range(w)
    ]


@pytest.mark.parametrize(
    ("grid", "cube"), [((4, 4, 4), (4, 4, 4)), ((5, 3, 7), (2, 2, 3)), ((1, 1, 1), (4, 4, 4))]
)
def test_grid_cube_ids_time_major_raster(grid, cube):
    assert grid_cube_ids(*grid, cube).tolist() == brute_cube(*grid, cube)


def test_edge_cubes_are_smaller():
    ids = grid_cube_ids(3, 5, 5, (2, 4, 4))
    counts = torch.bincount(ids).tolist()
    assert counts == [2 * 4 * 4, 2 * 4 * 1, 2 * 1 * 4, 2 * 1 * 1, 1 * 4 * 4, 1 * 4 * 1, 1 * 1 * 4, 1]


def _types(seq):
    return torch.tensor([seq])


def test_two_videos_and_image_with_padding():
    # sample 0: right padded; sample 1: left padded, an image and two videos
    v1, v2, v3 = (1, 4, 4), (2, 4, 8), (2, 2, 2)  # patch grids -> 4, 16, 2 LM tokens (merge 2)
    s0 = [0, 0] + [2] * 4 + [0, 0, 0]
    s1 = [0] + [1] * 1 + [0] + [2] * 16 + [0] + [2] * 2 + [0]
    n = max(len(s0), len(s1))
    types = torch.zeros(2, n, dtype=torch.long)
    am = torch.zeros(2, n, dtype=torch.long)
    types[0, : len(s0)] = torch.tensor(s0)
    am[0, : len(s0)] = 1
    types[1, n - len(s1) :] = torch.tensor(s1)
    am[1, n - len(s1) :] = 1
    grids = torch.tensor([v1, v2, v3])
    lay = build_layout(
        types, grids, cube=(1, 2, 2), attention_mask=am, image_grid_thw=torch.tensor([[1, 2, 2]])
    )
    ids = lay.cube_ids
    assert ids[0, 2:6].tolist() == [0, 0, 0, 0]
    assert (ids[0, 6:] == -1).all() and (ids[0, :2] == -1).all()
    off = n - len(s1)
    # image is not cubed by default
    assert ids[1, off + 1] == -1
    assert ids[1, off + 3 : off + 19].tolist() == grid_cube_ids(2, 2, 4, (1, 2, 2)).tolist()
    assert ids[1, off + 20 : off + 22].tolist() == [4, 5]  # the next video continues the numbering
    assert len(lay.spans) == 3
    # images as one-frame videos
    lay2 = build_layout(
        types,
        grids,
        cube=(1, 2, 2),
        attention_mask=am,
        image_grid_thw=torch.tensor([[1, 2, 2]]),
        images_as_video=True,
    )
    assert lay2.cube_ids[1, off + 1] == 0 and lay2.cube_ids[1, off + 3] == 1


def test_layout_errors_are_clear():
    types = _types([0] + [2] * 4 + [0])
    with pytest.raises(ValueError, match="do not match"):
        build_layout(types, torch.tensor([[2, 4, 8]]))  # implies 8 tokens, 4 present
    with pytest.raises(ValueError, match="more video tokens"):
        build_layout(types, None)
    with pytest.raises(ValueError, match="describes 2 videos"):
        build_layout(types, torch.tensor([[1, 4, 4], [1, 4, 4]]))
    with pytest.raises(ValueError, match="divisible"):
        build_layout(types, torch.tensor([[1, 3, 4]]))


def test_token_types_from_ids():
    ids = torch.tensor([[1, 7, 7, 8, 2]])
    assert token_types_from_ids(ids, image_token_id=8, video_token_id=7).tolist() == [[0, 2, 2, 1, 0]]


def test_cube_index_and_mean_keys():
    ids = torch.tensor([[-1, 0, 1, 0, 1, 2, -1], [2, 1, 0, -1, -1, -1, -1]])
    idx = build_cube_index(ids)
    assert idx.counts.tolist() == [[2, 2, 1], [1, 1, 1]]
    assert idx.first_pos.tolist() == [[1, 2, 5], [2, 1, 0]]
    k = torch.randn(2, 3, 7, 4)
    mk = cube_mean_keys(k, idx)
    assert torch.allclose(mk[0, :, 0], (k[0, :, 1] + k[0, :, 3]) / 2)
    assert torch.allclose(mk[1, :, 2], k[1, :, 0])
    with pytest.raises(ValueError, match="skip cube id"):
        build_cube_index(torch.tensor([[0, 2, -1]]))
