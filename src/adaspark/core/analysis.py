"""The paper's preliminary analysis as statistics on plain tensors (no transformers import here).

Two observations of the paper motivate AdaSpark: video attention is sparse — a few keys carry most of a
query's probability mass, and how many varies between layers and inputs — and FFNs are "lazy" on
video tokens — ``||FFN(x)|| / ||x||`` varies much less for video tokens than for text tokens. This
module measures both, plus the entropy of AdaS-Attn's cube distribution and how many cubes Top-p
keeps from it, on the tensors of one decoder layer:

* :func:`mass_count` — for each row of a distribution, how many entries hold a given share of its
  mass (the Top-p count, for several thresholds at once);
* :func:`cube_mass` — a query's attention mass summed per cube;
* :func:`attention_layer_stats` — per query and head of one layer: keys and cubes that hold
  90 / 95 / 99 % of the attention mass, the mass on video keys, and the entropy of the cube
  distribution ``softmax_j(q · k̄_j / sqrt(D))`` with the cubes Top-p keeps at several ``p``
  (computed with :func:`adaspark.ops.attention.common.select_block`, the selection every AdaS-Attn
  path uses). Attention probabilities are formed one head and one query chunk at a time, so no
  ``N × N`` matrix is ever held;
* :func:`ffn_ratio` and :func:`summarize` — the FFN laziness ratio and its mean / variance;
* :func:`ffn_kept_fraction` — video tokens AdaS-FFN keeps at several ``p``;
* :func:`choose_queries` — an evenly spread subset of query positions for long sequences.

Layout: q ``[B, Hq, N, D]``, k ``[B, Hkv, N, D]`` (prefill: queries and keys are the same ``N``
positions), ``cube_ids`` ``[B, N]`` int64 with ``-1`` for non-video tokens, ``key_mask`` ``[B, N]``
bool (False = padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adaspark.ops.attention.common import select_block
from adaspark.ops.cubes import CubeIndex, build_cube_index, cube_mean_keys
from adaspark.ops.ffn.common import select_ffn_tokens, token_scores
from adaspark.ops.selection import SelectionPolicy, entropy, keep_from_probs

__all__ = [
    "DEFAULT_P_VALUES",
    "DEFAULT_THRESHOLDS",
    "AttentionLayerStats",
    "attention_layer_stats",
    "choose_queries",
    "cube_mass",
    "ffn_kept_fraction",
    "ffn_ratio",
    "mass_count",
    "summarize",
]

#: shares of the attention mass whose key / cube counts are measured
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.9, 0.95, 0.99)
#: Top-p thresholds at which the kept cubes (and FFN tokens) are counted
DEFAULT_P_VALUES: tuple[float, ...] = (0.5, 0.7, 0.9, 0.95, 0.99)
#: float32 score entries formed at once per head (queries per chunk = this / N)
CHUNK_ELEMENTS = 1 << 22
#: relative rounding allowance when comparing a cumulative mass with a threshold
_MASS_TOL = 1e-12


def _check_thresholds(name: str, values: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out or not all(0.0 < v <= 1.0 for v in out):
        raise ValueError(f"{name} must be a non-empty list of numbers in (0, 1], got {list(values)!r}")
    return out


def mass_count(probs: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """How many entries of each row hold a share of the row's mass: the smallest ``k`` such that the
    ``k`` largest entries sum to at least ``t · sum(row)``.

    This is the size of the Top-p set of :func:`adaspark.ops.selection.keep_from_probs` with
    ``p = t`` (the row normalised to 1), for several thresholds at once.

    Args:
        probs: ``[..., C]`` non-negative weights (any float dtype; accumulated in float64).
        thresholds: shares ``t`` in (0, 1].

    Returns:
        ``[..., len(thresholds)]`` int64; 0 for rows whose mass is 0.

    Example:
        >>> mass_count(torch.tensor([[0.1, 0.6, 0.3]]), (0.5, 0.9, 1.0)).tolist()
        [[1, 2, 3]]
    """
    ts = _check_thresholds("thresholds", thresholds)
    p = probs.double().clamp_min(0.0)
    total = p.sum(dim=-1, keepdim=True)  # [..., 1]
    sp = torch.sort(p, dim=-1, descending=True).values
    before = torch.cumsum(sp, dim=-1) - sp  # mass strictly before each rank
    positive = sp > 0
    out = []
    for t in ts:
        # rank r is needed iff the mass before it is still short of t · total (up to rounding)
        need = (before < total * (t - _MASS_TOL)) & positive
        out.append(need.sum(dim=-1))
    counts = torch.stack(out, dim=-1)
    has_mass = total > 0
    return torch.where(has_mass, counts.clamp_min(1), torch.zeros_like(counts))


def cube_mass(probs: torch.Tensor, cube_ids: torch.Tensor, num_cubes: int) -> torch.Tensor:
    """Attention mass per cube: ``out[..., c] = sum of probs[..., k] over keys k of cube c``.

    Args:
        probs: ``[..., N]`` attention weights over the keys.
        cube_ids: ``[N]`` int64 cube id of every key (``-1`` = not video; ignored).
        num_cubes: ``C``.

    Returns:
        ``[..., C]`` in the dtype of ``probs``.
    """
    video = cube_ids >= 0
    out = probs.new_zeros(*probs.shape[:-1], num_cubes)
    if num_cubes == 0 or not bool(video.any()):
        return out
    src = probs[..., video]
    idx = cube_ids[video].expand_as(src)
    return out.scatter_add_(-1, idx, src)


def choose_queries(
    cube_ids: torch.Tensor, valid: torch.Tensor, *, max_video: int | None, max_text: int | None
) -> torch.Tensor:
    """Query positions to analyse: evenly spread video and text positions, the last one always in.

    Args:
        cube_ids: ``[N]`` int64 (``-1`` = not video).
        valid: ``[N]`` bool, real tokens.
        max_video / max_text: caps on the video and the non-video positions (None = all).

    Returns:
        ``[Q]`` int64 ascending positions.
    """

    def spread(pos: torch.Tensor, cap: int | None) -> torch.Tensor:
        if cap is None or pos.numel() <= cap:
            return pos
        if cap <= 0:
            return pos[:0]
        pick = torch.linspace(0, pos.numel() - 1, cap).round().long().unique()
        return pos[pick]

    pos = torch.arange(cube_ids.shape[0], device=cube_ids.device)
    video = pos[(cube_ids >= 0) & valid]
    text = pos[(cube_ids < 0) & valid]
    chosen = torch.cat([spread(video, max_video), spread(text, max_text)])
    if valid.any():
        chosen = torch.cat([chosen, pos[valid][-1:]])  # the last real token (it emits the answer)
    return torch.unique(chosen)


@dataclass
class AttentionLayerStats:
    """Per-query measurements of one attention layer (prefill).

    Attributes:
        thresholds: ``T`` mass shares (e.g. 0.9, 0.95, 0.99).
        p_values: ``P`` Top-p thresholds of the cube selection.
        sample: ``[Q]`` batch row of each analysed query.
        position: ``[Q]`` position of each query.
        is_video: ``[Q]`` bool, the query is a video token.
        causal_keys: ``[Q]`` real keys at or before the query.
        keys_needed: ``[Q, H, T]`` keys that hold each share of the query's attention mass.
        visible_cubes: ``[Q]`` cubes with at least one key at or before the query.
        cubes_needed: ``[Q, H, T]`` cubes that hold each share of the query's attention mass *on
            video keys* (renormalised; 0 when the query sees no video key).
        video_mass: ``[Q, H]`` share of the attention mass on video keys.
        candidates: ``[Q]`` candidate cubes of the AdaS-Attn selection (earlier cubes, own excluded).
        cube_entropy: ``[Q, H]`` entropy (nats) of ``softmax_j(q · k̄_j / sqrt(D))`` over the
            candidates (0 without candidates).
        cubes_kept: ``[Q, H, P]`` candidates Top-p keeps at each ``p``.
    """

    thresholds: tuple[float, ...]
    p_values: tuple[float, ...]
    sample: torch.Tensor
    position: torch.Tensor
    is_video: torch.Tensor
    causal_keys: torch.Tensor
    keys_needed: torch.Tensor
    visible_cubes: torch.Tensor
    cubes_needed: torch.Tensor
    video_mass: torch.Tensor
    candidates: torch.Tensor
    cube_entropy: torch.Tensor
    cubes_kept: torch.Tensor

    @property
    def num_heads(self) -> int:
        return int(self.keys_needed.shape[1])

    def summary(self) -> dict:
        """Means, quantiles and per-head means, separately for video and text (non-video) queries.

        Returns a JSON-ready dict ``{"video_queries": {...}, "text_queries": {...}}``; each holds
        ``queries`` and, per threshold ``"0.9"`` etc., ``keys`` / ``keys_fraction`` /
        ``cubes`` / ``cubes_fraction`` summaries (``mean``, ``std``, ``p10``, ``p50``, ``p90``;
        fractions are of the causal keys / visible cubes) with ``per_head`` means, plus
        ``video_mass``, ``candidates``, ``entropy``, ``max_entropy`` (``log`` of the candidate count,
        the entropy of a flat distribution) and, per ``p``, ``cubes_kept`` / ``cubes_kept_fraction``.
        """
        out = {}
        for name, sel in (("video_queries", self.is_video), ("text_queries", ~self.is_video)):
            out[name] = self._summary_of(sel)
        return out

    def _summary_of(self, sel: torch.Tensor) -> dict:
        n = int(sel.sum())
        res: dict = {"queries": n}
        if n == 0:
            return res
        causal = self.causal_keys[sel].double().clamp_min(1)[:, None]  # [n, 1]
        for j, t in enumerate(self.thresholds):
            keys = self.keys_needed[sel][:, :, j].double()  # [n, H]
            entry = {
                "keys": summarize(keys.reshape(-1)),
                "keys_fraction": summarize((keys / causal).reshape(-1)),
                "keys_per_head": keys.mean(0).tolist(),
                "keys_fraction_per_head": (keys / causal).mean(0).tolist(),
            }
            has_video = (self.visible_cubes[sel] > 0)[:, None] & (self.video_mass[sel] > 0)  # [n, H]
            if bool(has_video.any()):
                cubes = self.cubes_needed[sel][:, :, j].double()
                frac = cubes / self.visible_cubes[sel].double().clamp_min(1)[:, None]
                entry["cubes"] = summarize(cubes[has_video])
                entry["cubes_fraction"] = summarize(frac[has_video])
                entry["cubes_fraction_per_head"] = _masked_mean_per_head(frac, has_video)
            res[_key(t)] = entry
        res["video_mass"] = summarize(self.video_mass[sel].double().reshape(-1))
        res["video_mass_per_head"] = self.video_mass[sel].double().mean(0).tolist()
        cand = self.candidates[sel]
        use = cand > 0
        res["selections"] = int(use.sum())
        if bool(use.any()):
            ent = self.cube_entropy[sel][use].double()  # [m, H]
            res["candidates"] = summarize(cand[use].double())
            res["entropy"] = summarize(ent.reshape(-1))
            res["entropy_per_head"] = ent.mean(0).tolist()
            res["max_entropy"] = summarize(torch.log(cand[use].double()))
            kept = self.cubes_kept[sel][use].double()  # [m, H, P]
            kfrac = kept / cand[use].double()[:, None, None]
            res["cubes_kept"] = {
                _key(p): summarize(kept[:, :, i].reshape(-1)) for i, p in enumerate(self.p_values)
            }
            res["cubes_kept_fraction"] = {
                _key(p): summarize(kfrac[:, :, i].reshape(-1)) for i, p in enumerate(self.p_values)
            }
            res["cubes_kept_fraction_per_head"] = {
                _key(p): kfrac[:, :, i].mean(0).tolist() for i, p in enumerate(self.p_values)
            }
        return res


def _key(x: float) -> str:
    """JSON key of a threshold: ``0.9 -> "0.9"``."""
    return f"{x:g}"


def _masked_mean_per_head(values: torch.Tensor, mask: torch.Tensor) -> list[float | None]:
    cnt = mask.sum(0)
    tot = (values * mask).sum(0)
    return [float(t / c) if c > 0 else None for t, c in zip(tot.tolist(), cnt.tolist(), strict=True)]


def summarize(values: torch.Tensor) -> dict:
    """``{"count", "mean", "var", "std", "min", "p10", "p50", "p90", "max"}`` of a 1-D tensor.

    ``var`` is the population variance (divides by the count). An empty tensor gives
    ``{"count": 0}``.
    """
    v = values.detach().double().reshape(-1)
    n = int(v.numel())
    if n == 0:
        return {"count": 0}
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    qs = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)) if n > 1 else v.repeat(3)
    return {
        "count": n,
        "mean": float(mean),
        "var": float(var),
        "std": float(var.sqrt()),
        "min": float(v.min()),
        "p10": float(qs[0]),
        "p50": float(qs[1]),
        "p90": float(qs[2]),
        "max": float(v.max()),
    }


@torch.no_grad()
def attention_layer_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    cube_ids: torch.Tensor,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    queries: Sequence[torch.Tensor] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    p_values: Sequence[float] = DEFAULT_P_VALUES,
    index: CubeIndex | None = None,
    mean_keys: torch.Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> AttentionLayerStats:
    """Attention sparsity and cube-distribution statistics of one layer's prefill.

    For each analysed query ``i`` and query head ``h`` the dense causal attention distribution
    ``softmax(q_i · k_j · scale)`` over the real keys ``j <= i`` is formed (one head and one chunk
    of queries at a time, in float32), and :func:`mass_count` gives the keys that hold each share of
    it; summed per cube with :func:`cube_mass` and renormalised over video keys, it gives the cubes
    that do. Independently, AdaS-Attn's cube distribution of the query (mean keys, candidates and
    softmax exactly as the AdaSpark kernels compute them) gives the entropy and the Top-p counts.

    Args:
        q: ``[B, Hq, N, D]`` queries (after RoPE), ``k``: ``[B, Hkv, N, D]`` keys (GQA allowed).
        cube_ids: ``[B, N]`` int64, ``-1`` = not video.
        scale: score scale (default ``D ** -0.5``).
        key_mask: ``[B, N]`` bool, False for padding (default: all real).
        queries: per batch row, ``[Q_b]`` positions to analyse (default: every real position).
        thresholds: mass shares for the key / cube counts.
        p_values: Top-p thresholds for the cube counts.
        index / mean_keys: optional precomputed cube index and ``[B, Hkv, C, D]`` mean keys.
        chunk_elements: float32 score entries formed at once (memory bound).

    Returns:
        :class:`AttentionLayerStats` (on the CPU).
    """
    ts = _check_thresholds("thresholds", thresholds)
    ps = _check_thresholds("p_values", p_values)
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q [B, Hq, N, D] and k [B, Hkv, N, D] do not match: {tuple(q.shape)}, {tuple(k.shape)}"
        )
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    if k.shape[2] != n:
        raise ValueError(f"prefill only: q has {n} positions, k has {k.shape[2]}")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if cube_ids.shape != (bsz, n) or cube_ids.dtype != torch.int64:
        raise ValueError(
            f"cube_ids must be an int64 tensor [B, N] = [{bsz}, {n}], got {tuple(cube_ids.shape)}"
        )
    dev = q.device
    if key_mask is None:
        key_mask = torch.ones(bsz, n, dtype=torch.bool, device=dev)
    scale = d**-0.5 if scale is None else float(scale)
    if index is None:
        index = build_cube_index(cube_ids)
    if mean_keys is None:
        mean_keys = cube_mean_keys(k, index)
    c = index.max_cubes
    g = hq // hkv
    policies = [SelectionPolicy(kind="top_p", p=p) for p in ps]
    pos_all = torch.arange(n, device=dev)
    rows: dict[str, list[torch.Tensor]] = {
        name: []
        for name in (
            "sample",
            "position",
            "is_video",
            "causal_keys",
            "keys_needed",
            "visible_cubes",
            "cubes_needed",
            "video_mass",
            "candidates",
            "cube_entropy",
            "cubes_kept",
        )
    }
    for b in range(bsz):
        km = key_mask[b]
        ids = cube_ids[b]
        qpos = pos_all[km] if queries is None else queries[b].to(dev).long()
        if qpos.numel() and (int(qpos.min()) < 0 or int(qpos.max()) >= n):
            raise ValueError(f"query positions of sample {b} must be in [0, {n}), got {qpos.tolist()[:8]}...")
        qpos = qpos[km[qpos]]
        if qpos.numel() == 0:
            continue
        cum_valid = torch.cumsum(km.long(), 0)
        first = index.first_pos[b]  # [C]
        m = max(1, min(qpos.numel(), chunk_elements // max(n, 1)))
        for s in range(0, qpos.numel(), m):
            pos = qpos[s : s + m]
            bq = pos.numel()
            causal = (pos_all[None, :] <= pos[:, None]) & km[None, :]  # [bq, N]
            keys = torch.empty(bq, hq, len(ts), dtype=torch.long)
            cubes = torch.zeros(bq, hq, len(ts), dtype=torch.long)
            vmass = torch.zeros(bq, hq, dtype=torch.float64)
            for h in range(hq):
                sc = torch.matmul(q[b, h, pos].float(), k[b, h // g].float().T) * scale  # [bq, N]
                probs = torch.softmax(sc.masked_fill(~causal, float("-inf")), dim=-1)
                keys[:, h] = mass_count(probs, ts).cpu()
                if c:
                    cm = cube_mass(probs, ids, c)  # [bq, C]
                    vm = cm.double().sum(-1)
                    vmass[:, h] = vm.cpu()
                    cubes[:, h] = mass_count(cm, ts).cpu()
            rows["keys_needed"].append(keys)
            rows["cubes_needed"].append(cubes)
            rows["video_mass"].append(vmass)
            rows["causal_keys"].append(cum_valid[pos].cpu())
            rows["visible_cubes"].append((first[None, :] <= pos[:, None]).sum(-1).cpu())
            rows["sample"].append(torch.full((bq,), b, dtype=torch.long))
            rows["position"].append(pos.cpu())
            rows["is_video"].append((ids[pos] >= 0).cpu())
            # AdaS-Attn's own cube distribution (same function as every kernel path)
            keep, probs_c, cand = select_block(
                q[b][:, pos], mean_keys[b], pos, ids[pos], index, b, policies[0], scale
            )
            ncand = cand.sum(-1)  # [bq]
            rows["candidates"].append(ncand.cpu())
            rows["cube_entropy"].append(entropy(probs_c).transpose(0, 1).double().cpu())  # [bq, Hq]
            kept = torch.zeros(bq, hq, len(ps), dtype=torch.long)
            if c:
                cand_h = cand[None].expand(hq, bq, c)
                for i, pol in enumerate(policies):
                    kp = keep if i == 0 else keep_from_probs(probs_c, cand_h, pol)
                    kept[:, :, i] = kp.sum(-1).transpose(0, 1).cpu()
            rows["cubes_kept"].append(kept)
    empty_shapes = {
        "keys_needed": (0, hq, len(ts)),
        "cubes_needed": (0, hq, len(ts)),
        "video_mass": (0, hq),
        "cube_entropy": (0, hq),
        "cubes_kept": (0, hq, len(ps)),
    }
    out = {}
    for name, parts in rows.items():
        if parts:
            out[name] = torch.cat(parts)
        else:
            dtype = torch.bool if name == "is_video" else torch.long
            if name in ("video_mass", "cube_entropy"):
                dtype = torch.float64
            out[name] = torch.zeros(empty_shapes.get(name, (0,)), dtype=dtype)
    return AttentionLayerStats(thresholds=ts, p_values=ps, **out)


def ffn_ratio(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """FFN laziness ratio ``||y|| / ||x||`` per token (float32 or better).

    Args:
        x: ``[..., d]`` residual stream entering the FFN sub-layer.
        y: ``[..., d]`` the sub-layer's update (``MLP(RMSNorm(x))``; the layer adds it to ``x``).

    Returns:
        ``[...]``; tokens with ``||x|| = 0`` give ``||y|| / eps``.
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    nx = token_scores(x)
    ny = token_scores(y)
    return ny / nx.clamp_min(eps)


@torch.no_grad()
def ffn_kept_fraction(
    x: torch.Tensor,
    cube_ids: torch.Tensor,
    p_values: Sequence[float] = DEFAULT_P_VALUES,
    *,
    index: CubeIndex | None = None,
) -> dict[str, float]:
    """Fraction of video tokens AdaS-FFN sends through the FFN at each Top-p ``p``.

    Uses the library's own token selection (:func:`adaspark.ops.ffn.common.select_ffn_tokens` on
    the L2 norms of ``x``). Returns ``{"0.5": fraction, ...}``; ``{}`` without video tokens.
    """
    ps = _check_thresholds("p_values", p_values)
    video = cube_ids >= 0
    nv = int(video.sum())
    if nv == 0:
        return {}
    if index is None:
        index = build_cube_index(cube_ids)
    scores = token_scores(x)
    out = {}
    for p in ps:
        active = select_ffn_tokens(scores, cube_ids, SelectionPolicy(kind="top_p", p=p), index=index)
        out[_key(p)] = int((active & video).sum()) / nv
    return out
