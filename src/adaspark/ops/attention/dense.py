"""Dense causal attention in the ops layout, with key padding, without an N × N mask when avoidable.

Used for layers kept dense and as the baseline the sparse paths are measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaspark.ops.attention.common import AttentionStats, causal_valid_pairs

__all__ = ["dense_causal_attention"]


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    stats: AttentionStats | None = None,
    query_block: int = 1024,
) -> torch.Tensor:
    """Causal SDPA for ``q`` ``[B, Hq, Nq, D]``, ``k``/``v`` ``[B, Hkv, Nk, D]`` (queries = last Nq keys).

    Without padding and with ``Nq == Nk`` this is one ``is_causal`` SDPA call; otherwise queries are
    processed in blocks of ``query_block`` with a ``[B, 1, bq, Nk]`` mask. Padding queries give 0.
    """
    bsz, hq, nq, _d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    gqa = hq != hkv
    if key_mask is None and nq == nk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        km = torch.ones(bsz, nk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        out = torch.empty_like(q)
        kpos = torch.arange(nk, device=q.device)
        for s in range(0, nq, query_block):
            e = min(s + query_block, nq)
            qpos = kpos[nk - nq + s : nk - nq + e]
            mask = (kpos[None, :] <= qpos[:, None])[None] & km[:, None, :]  # [B, bq, Nk]
            mask = mask & km[:, qpos][:, :, None]
            o = F.scaled_dot_product_attention(
                q[:, :, s:e], k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa
            )
            out[:, :, s:e] = o.masked_fill(~km[:, qpos][:, None, :, None], 0)
    if stats is not None:
        km = torch.ones(bsz, nk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        pairs = int(causal_valid_pairs(km, nq).sum())
        stats.kv_heads = hkv
        stats.queries += int(km[:, nk - nq :].sum())
        stats.causal_pairs += pairs
        stats.attended += float(pairs)
        # the is_causal kernel skips the masked half; the blocked masked calls compute every entry
        stats.executed += (
            pairs * hq if key_mask is None and nq == nk else int(km[:, nk - nq :].sum()) * nk * hq
        )
    return out
