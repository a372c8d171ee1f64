"""Shards: the split is deterministic, disjoint, covering and balanced; i/n and the launcher's
environment are parsed strictly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspark.core.sharding import Shard, from_environment, parse_shard, split


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4096), max_size=60), st.integers(1, 9))
def test_split_is_disjoint_covering_and_balanced(costs, count):
    owners = split(costs, count)
    assert owners == split(list(costs), count)  # deterministic
    assert len(owners) == len(costs) and all(0 <= s < count for s in owners)  # one shard each
    # what the shards select, together, is every unit exactly once
    picked = [i for k in range(count) for i in Shard(k, count).select(list(range(len(costs))), costs)]
    assert sorted(picked) == list(range(len(costs)))
    loads = [sum(c for c, s in zip(costs, owners, strict=True) if s == k) for k in range(count)]
    assert max(loads) - min(loads) <= max(costs, default=0)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_equal_costs_are_dealt_round_robin(count):
    owners = split([64] * 20, count)
    assert owners == [i % count for i in range(20)]
    sizes = [owners.count(k) for k in range(count)]
    assert max(sizes) - min(sizes) <= 1


def test_long_units_are_spread_first():
    # one 1024-frame item and eight 64-frame items: the long one alone on a shard is not balanced;
    # the split puts the short ones around it
    costs = [64, 64, 64, 64, 1024, 64, 64, 64, 64]
    owners = split(costs, 2)
    loads = [sum(c for c, s in zip(costs, owners, strict=True) if s == k) for k in range(2)]
    assert owners[4] == 0 and loads == [1024, 512]
    assert Shard(1, 2).select(list("abcdefghi"), costs) == list("abcdfghi")


@pytest.mark.parametrize(
    ("text", "shard"), [("0/1", Shard(0, 1)), ("1/2", Shard(1, 2)), (" 3 / 8 ", Shard(3, 8))]
)
def test_parse_shard(text, shard):
    assert parse_shard(text) == shard and str(shard) == f"{shard.index}/{shard.count}"


@pytest.mark.parametrize("text", ["2/2", "3/2", "-1/2", "0/0", "1", "a/b", "1/2/3", "1.0/2", ""])
def test_bad_shards(text):
    with pytest.raises(ValueError, match=r"a shard is i/n with 0 <= i < n"):
        parse_shard(text)


def test_shard_and_split_arguments():
    with pytest.raises(ValueError, match="integers 0 <= i < n"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="integers 0 <= i < n"):
        Shard(True, 2)
    with pytest.raises(ValueError, match="shard count must be an integer >= 1"):
        split([1, 2], 0)
    with pytest.raises(ValueError, match="costs must be numbers >= 0"):
        split([1, float("nan")], 2)
    with pytest.raises(ValueError, match="3 units but 2 costs"):
        Shard(0, 2).select([1, 2, 3], [1, 1])


@pytest.mark.parametrize(
    ("env", "shard"),
    [
        ({}, None),
        ({"RANK": "0", "WORLD_SIZE": "1"}, None),  # one process: no sharding
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, Shard(1, 4)),
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, Shard(1, 2)),
        ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3"}, Shard(2, 3)),
        ({"LOCAL_RANK": "0"}, None),  # a rank without a world size is no shard
    ],
)
def test_from_environment(env, shard):
    assert from_environment(env) == shard


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK/WORLD_SIZE = 2/2 is not a shard"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but neither RANK nor LOCAL_RANK is set"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, r"RANK='x' is not a non-negative integer"),
        ({"RANK": "0", "WORLD_SIZE": "-2"}, r"WORLD_SIZE='-2' is not a non-negative integer"),
    ],
)
def test_bad_environment(env, match):
    with pytest.raises(ValueError, match=match):
        from_environment(env)
