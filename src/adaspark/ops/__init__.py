"""Model-agnostic AdaSpark operators on plain tensors (no transformers import here).

Layout: q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``, residual stream ``[B, N, d]``, ``cube_ids``
``[B, N]`` int64 with ``-1`` for non-video tokens.
"""

from adaspark.ops.attention import (
    AttentionStats,
    cube_sparse_attention,
    cube_sparse_attention_blocked,
    cube_sparse_attention_decode,
    cube_sparse_attention_flex,
    cube_sparse_attention_gather,
    cube_sparse_attention_reference,
    dense_causal_attention,
    reference_attention_mask,
)
from adaspark.ops.cubes import CubeIndex, build_cube_index, cube_mean_keys
from adaspark.ops.ffn import FFNStats, cube_sparse_ffn, cube_sparse_ffn_gathered, cube_sparse_ffn_reference
from adaspark.ops.selection import SelectionPolicy, entropy, keep_from_probs

__all__ = [
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
]
