import dataclasses

import pytest

from adaspark import AdaSparkConfig
from adaspark.config import BACKENDS, GRANULARITIES
from adaspark.ops.attention import BACKEND_GRANULARITIES


def test_defaults_and_overrides():
    c = AdaSparkConfig()
    assert c.p == 0.9 and c.cube == (4, 4, 4) and c.policy == "top_p"
    c2 = c.replace(p=0.5, p_ffn=0.8)
    assert c2.attn_p == 0.5 and c2.ffn_p == 0.8
    assert c2.attn_policy().p == 0.5 and c2.ffn_policy().p == 0.8
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.p = 0.3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("p", 0.0),
        ("p", 1.2),
        ("p", -0.1),
        ("p", float("nan")),
        ("p", "0.5"),
        ("p_attn", 2.0),
        ("p_ffn", 0.0),
        ("cube", (4, 4)),
        ("cube", (4, 0, 4)),
        ("cube", (4.0, 4, 4)),
        ("dense_layers", 3),
        ("dense_layers", ("a",)),
        ("policy", "nucleus"),
        ("top_k", 0),
        ("top_k_tokens", 0),
        ("ratio", 0.0),
        ("min_cubes", -1),
        ("max_cubes", 0),
        ("backend", "cutlass"),
        ("query_block", 0),
        ("sparse_attn", 1),
        ("flex_min_tokens", -1),
        ("flex_min_tokens", 4096.0),
        ("flex_min_tokens", True),
        ("decode_gather_fraction", -0.1),
        ("decode_gather_fraction", 1.5),
        ("decode_gather_fraction", float("nan")),
        ("decode_gather_fraction", "0.3"),
        ("blocked_dense_fraction", 2.0),
        ("blocked_dense_fraction", None),
        ("ffn_sum_chunk", 0),
        ("ffn_sum_chunk", 1.5),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdaSparkConfig(**{field: value})


def test_max_cubes_not_below_min():
    with pytest.raises(ValueError, match="max_cubes"):
        AdaSparkConfig(min_cubes=4, max_cubes=2)


def test_dense_layers_negative_indices():
    c = AdaSparkConfig(dense_layers=(0, -1))
    assert c.is_dense_layer(0, 4) and c.is_dense_layer(3, 4) and not c.is_dense_layer(1, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_backend_granularity_pairs_the_kernels_refuse_are_rejected(backend, granularity):
    """``blocked`` and ``decode`` select per token: with ``granularity="cube"`` they would fail on the
    first prefill, so the config refuses the pair up front, naming both fields."""
    if granularity in BACKEND_GRANULARITIES[backend]:
        assert AdaSparkConfig(backend=backend, granularity=granularity).backend == backend
    else:
        with pytest.raises(ValueError) as e:
            AdaSparkConfig(backend=backend, granularity=granularity)
        msg = str(e.value)
        assert "AdaSparkConfig.backend" in msg and "AdaSparkConfig.granularity" in msg
        assert repr(backend) in msg and repr(granularity) in msg and "\n" not in msg


def test_every_refused_pair_is_listed():
    refused = {(b, g) for b in BACKENDS for g in GRANULARITIES if g not in BACKEND_GRANULARITIES[b]}
    assert refused == {("blocked", "cube"), ("decode", "cube")}
    assert set(BACKEND_GRANULARITIES) == set(BACKENDS)


def test_kernel_thresholds_default_to_the_ops_constants():
    """The number is written once, in ops; the config takes it from there and accepts the range ends."""
    from adaspark.ops.attention import DENSE_BLOCK_FRACTION, FLEX_MIN_TOKENS, GATHER_FRACTION
    from adaspark.ops.ffn.gathered import SUM_CHUNK

    c = AdaSparkConfig()
    assert c.flex_min_tokens == FLEX_MIN_TOKENS == 4096
    assert c.decode_gather_fraction == GATHER_FRACTION == 0.35
    assert c.blocked_dense_fraction == DENSE_BLOCK_FRACTION == 0.75
    assert c.ffn_sum_chunk == SUM_CHUNK == 4096
    c = c.replace(flex_min_tokens=0, decode_gather_fraction=0.0, blocked_dense_fraction=1, ffn_sum_chunk=1)
    assert c.flex_min_tokens == 0 and c.ffn_sum_chunk == 1
    for name in ("flex_min_tokens", "decode_gather_fraction", "blocked_dense_fraction", "ffn_sum_chunk"):
        assert name in (AdaSparkConfig.__doc__ or ""), name  # documented with the other fields


def test_backend_and_granularity_names_come_from_ops():
    from adaspark.ops.attention import ATTENTION_BACKENDS
    from adaspark.ops.attention import GRANULARITIES as OPS_GRANULARITIES

    assert BACKENDS[0] == "auto" and BACKENDS[1:] == tuple(ATTENTION_BACKENDS)
    assert GRANULARITIES is OPS_GRANULARITIES
