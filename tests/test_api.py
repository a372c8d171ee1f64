"""The public API is pinned: names other code (and later issues) rely on."""

import adaspark
import adaspark.ops


def test_top_level_api():
    assert set(adaspark.__all__) == {"AdaSparkConfig", "__version__", "patch"}


def test_ops_api():
    expected = {
        "AttentionStats",
        "CubeIndex",
        "FFNStats",
        "SelectionPolicy",
        "build_cube_index",
        "cube_mean_keys",
        "cube_sparse_attention",
        "cube_sparse_attention_blocked",
        "cube_sparse_attention_decode",
        "cube_sparse_attention_flex",
        "cube_sparse_attention_gather",
        "cube_sparse_attention_reference",
        "cube_sparse_ffn",
        "cube_sparse_ffn_gathered",
        "cube_sparse_ffn_reference",
        "dense_causal_attention",
        "entropy",
        "keep_from_probs",
        "reference_attention_mask",
    }
    assert set(adaspark.ops.__all__) == expected
    for name in expected:
        assert hasattr(adaspark.ops, name)


def test_fast_paths_share_the_reference_signature():
    import inspect

    from adaspark.ops import (
        cube_sparse_attention_blocked,
        cube_sparse_attention_decode,
        cube_sparse_attention_flex,
        cube_sparse_attention_gather,
        cube_sparse_attention_reference,
        cube_sparse_ffn_gathered,
        cube_sparse_ffn_reference,
    )

    def params(f):
        return list(inspect.signature(f).parameters)

    # a fast path takes the reference's parameters, in order, then its own tuning knobs: keyword-only,
    # with the module constant as default (AdaSparkConfig passes them)
    own = {
        cube_sparse_attention_blocked: ["blocked_dense_fraction"],
        cube_sparse_attention_gather: [],
        cube_sparse_attention_decode: ["decode_gather_fraction"],
        cube_sparse_attention_flex: [],
        cube_sparse_ffn_gathered: ["ffn_sum_chunk"],
    }
    for fast, knobs in own.items():
        ref = cube_sparse_ffn_reference if "ffn" in fast.__name__ else cube_sparse_attention_reference
        assert params(fast) == params(ref) + knobs, fast.__name__
        for name in knobs:
            par = inspect.signature(fast).parameters[name]
            assert par.kind is inspect.Parameter.KEYWORD_ONLY and par.default is not inspect.Parameter.empty
