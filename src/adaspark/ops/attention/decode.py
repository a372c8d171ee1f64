"""Decode AdaS-Attn: a few new tokens after a KV cache read only the K/V of the cubes they keep.

Per query and head, the cubes are selected from the cached cube mean keys (the per-token selection
of :mod:`adaspark.ops.attention.common`, bit-identical to the other paths). Then, per KV head, the
keys some query head of its GQA group may attend — the non-video keys, the kept cubes, the queries'
own cubes — are read once for the whole group:

* on CPU without gradients, by the native kernel (``torch.ops.adaspark.rows_attention``): it
  collects those rows from the per-head class table in one pass, then reads them in place in tiles
  with the group's query rows register-blocked (each K/V row loaded once per group, prefetched
  ahead), applying each head's classes and causality as a mask, split over the threads and merged
  as flash-decoding does; Python only selects;
* elsewhere they are gathered (one index per KV head, padded to the longest), and one SDPA call runs
  with the group's query heads stacked along the query axis and a small ``[Hkv, G·Nq, M]`` additive
  mask for the per-head differences, padding and causality.

Nothing of size ``Nk`` is computed per head. Layout: see :mod:`adaspark.ops.attention.common`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adaspark.ops.attention.common import AttentionStats, check_fraction, prepare_inputs, select_range
from adaspark.ops.attention.native import native_available
from adaspark.ops.attention.units import token_selection
from adaspark.ops.cubes import CubeIndex
from adaspark.ops.selection import SelectionPolicy

__all__ = ["DECODE_MAX_QUERIES", "GATHER_FRACTION", "cube_sparse_attention_decode"]

#: ``auto`` sends calls with at most this many new queries after a cache here
DECODE_MAX_QUERIES = 64
#: gather the kept K/V only when they are at most this fraction of the causal prefix; above it the
#: prefix is attended in place under the mask. Decoding is memory-bound on CPU: a gather reads and
#: writes the kept rows before SDPA reads them again, so it pays only below ~0.4 (measured at 32k,
#: bf16, 28/4 heads: 0.42 of the prefix gathered took as long as dense). The default of
#: ``decode_gather_fraction``.
GATHER_FRACTION = 0.35


def cube_sparse_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cube_ids: torch.Tensor,
    p: float | SelectionPolicy = 0.9,
    *,
    policy: SelectionPolicy | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    mean_keys: torch.Tensor | None = None,
    index: CubeIndex | None = None,
    stats: AttentionStats | None = None,
    query_block: int = 128,
    granularity: str = "token",
    decode_gather_fraction: float = GATHER_FRACTION,
) -> torch.Tensor:
    """AdaS-Attn for a few queries (same signature as the reference, plus its threshold;
    ``query_block`` is unused).

    Selection is per token; ``granularity="cube"`` is accepted when no query is a video token
    (generated tokens never are) and raises otherwise. The kept K/V are gathered when they are at
    most ``decode_gather_fraction`` of the causal prefix, else the prefix is attended in place under
    the mask (same result; a speed trade-off, :data:`GATHER_FRACTION`).
    """
    inp = prepare_inputs(
        q, k, v, cube_ids, p, policy=policy, scale=scale, key_mask=key_mask,
        mean_keys=mean_keys, index=index, granularity=granularity,
    )  # fmt: skip
    check_fraction("decode_gather_fraction", decode_gather_fraction)
    bsz, hq, q_offset = inp.bsz, inp.hq, inp.q_offset
    if granularity == "cube" and bool((cube_ids[:, q_offset:] >= 0).any()):
        raise ValueError(
            "the 'decode' backend selects per token; use 'gather' for video queries at cube granularity"
        )
    pol, scale, index, mean_keys, km = inp.policy, inp.scale, inp.index, inp.mean_keys, inp.key_mask
    record = stats is not None and stats.record
    out = torch.empty_like(q)  # every row is written below (the NaN-poison tests check it)
    # the C++ row kernel reads the kept K/V rows in place (no copy): CPU, no gradients
    native = (
        q.device.type == "cpu"
        and k.dtype in (torch.float32, torch.bfloat16)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        and native_available(q.device)
    )
    per_sample = [
        _class_table(q, mean_keys, cube_ids, km, index, b, q_offset, pol, scale, stats) for b in range(bsz)
    ]
    tables, kept = [t for t, _ in per_sample], [s for _, s in per_sample]
    if native:
        table = torch.stack(tables).to(torch.uint8)
        o, counts, attended = torch.ops.adaspark.rows_attention(
            q.float().contiguous(), k, v, table, cube_ids, km, km[:, q_offset:], q_offset, float(scale)
        )
        out.copy_(o)
        n_qv = km[:, q_offset:].sum(1)
        executed = int((n_qv * counts.amax(1)).sum()) * hq
        if stats is not None:
            stats.attended += attended.sum(0)
    else:
        executed = _gather_sdpa(
            q, k, v, cube_ids, km, tables, q_offset, scale, decode_gather_fraction, stats, out
        )
    inp.count_call(stats)
    inp.count_mean_keys(stats)
    if stats is not None:
        stats.executed += executed
    if record:
        stats.log_selection(token_selection(torch.stack(kept), cube_ids, km))
    return out


def _class_table(q, mean_keys, cube_ids, km, index: CubeIndex, b: int, q_offset: int, pol, scale, stats):
    """``([Hq, Nq, C+1], [Hq, Nq, C])`` bool: the key classes each head's query of sample ``b``
    attends — its kept cubes (per-token selection), its own cube and the non-video class ``C``, none
    for padding — and the selection alone (what is recorded)."""
    hq, nq = q.shape[1], q.shape[2]
    c = index.max_cubes
    table = torch.zeros(hq, nq, c + 1, dtype=torch.bool, device=q.device)
    kc = cube_ids[b]
    kept = torch.zeros(hq, nq, c, dtype=torch.bool, device=q.device)
    if c and nq:
        kept = select_range(q[b], mean_keys[b], 0, nq, q_offset, kc, index, b, pol, scale, km[b], stats)
        table[..., :c] = kept
    qc = kc[q_offset:]
    vq = (qc >= 0).nonzero().squeeze(1)
    table[:, vq, qc[vq]] = True
    table[..., c] = True
    table &= km[b, q_offset:][None, :, None]
    return table, kept


def _gather_sdpa(
    q, k, v, cube_ids, km, tables, q_offset: int, scale: float, gather_fraction: float, stats, out
):
    """The portable path: per sample and KV head, SDPA on the gathered kept K/V (or the prefix in
    place under the mask) with the group's heads stacked; writes ``out``, returns the executed entries."""
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    c = tables[0].shape[-1] - 1
    neg = float("-inf")
    executed = 0
    kpos = torch.arange(nk, device=q.device)
    qpos = kpos[q_offset:]
    for b in range(bsz):
        kc = cube_ids[b]
        kcls = torch.where(kc >= 0, kc, torch.full_like(kc, c))
        qv = km[b, q_offset:]
        table = tables[b]
        # per KV head: positions some query head of the group may attend
        grp = table.view(hkv, g * nq, c + 1).any(1)  # [Hkv, C+1]
        last = int(qpos[qv].max()) if bool(qv.any()) else -1
        ok = grp[:, kcls] & km[b][None] & (kpos <= last)[None]  # [Hkv, Nk]
        cnt = ok.sum(1)
        m = int(cnt.max())
        if m == 0:  # no valid query in this sample (all padding)
            out[b] = 0
            continue
        if m > gather_fraction * (last + 1):
            # most of the prefix is kept: copying it would cost more than reading it in place
            m = last + 1
            gpos = kpos[:m].expand(hkv, m)
            slot_ok = ok[:, :m]
            kg, vg = k[b][:, :m], v[b][:, :m]
        else:
            order = torch.argsort(ok.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]
            slot_ok = torch.arange(m, device=q.device)[None] < cnt[:, None]
            flat = (order + torch.arange(hkv, device=q.device)[:, None] * nk).view(-1)
            kg = k[b].reshape(hkv * nk, d).index_select(0, flat).view(hkv, m, d)
            vg = v[b].reshape(hkv * nk, d).index_select(0, flat).view(hkv, m, d)
            gpos = order  # [Hkv, M] positions, ascending
        allowed = table.view(hkv, g * nq, c + 1).gather(2, kcls[gpos][:, None, :].expand(hkv, g * nq, m))
        causal = gpos[:, None, :] <= qpos.repeat(g)[None, :, None]
        allowed &= causal & slot_ok[:, None, :]
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, neg)
        qg = q[b].reshape(1, hkv, g * nq, d)
        o = F.scaled_dot_product_attention(qg, kg[None], vg[None], attn_mask=bias[None], scale=scale)
        out[b] = o.view(hq, nq, d).masked_fill(~qv[None, :, None], 0)
        executed += int(qv.sum()) * m * hq
        if stats is not None:
            stats.attended += allowed.view(hq, nq, m).sum(dim=(1, 2)).double()
    return executed
