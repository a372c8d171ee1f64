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
        ("backend", "triton"),
        ("query_block", 0),
        ("sparse_attn", 1),
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
