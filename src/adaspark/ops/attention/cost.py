"""A cost model of AdaS-Attn's prefill: does the sparse kernel pay on this machine, for this call?

The block kernels compute whole blocks and pay for a selection; dense SDPA computes every causal pair
at its own (high) speed. Whether sparse wins depends on the machine, the dtype, the head shape and
what the selection keeps, so it is *measured*: :func:`measure_costs` times dense SDPA, the selection
(``plan_blocks``) and the block kernel on synthetic inputs of the call's head shape at two lengths
and fits

* dense:  ``t = dense · pairs · Hq · D``                      (causal pairs per head)
* select: ``t = select_fixed + select · Nq · C · Hq · D``      (C = cubes of the call)
* kernel: ``t = kernel_fixed + kernel · executed · D``         (score entries the kernel computes)

:class:`CostModel` holds one fit per (device, dtype, heads, kv heads, head dim, granularity, kernel,
threads) — measured on first use (a second or two) — and decides per call:

1. **before selecting** (:meth:`CostModel.before`): dense if the selection plus the kernel on an
   *estimate* of what it would keep would not stay below :data:`MARGIN` × dense. The estimate
   (:func:`estimate_executed`) runs the policy on each cube's mean query against the cube mean keys
   — ``C × C`` scores instead of ``N × C``. It is deliberately optimistic: it counts attended
   pairs, not the whole blocks a kernel computes (on a trained model the block-aligned plan
   executes 1.1–1.3× the estimate), because the two mistakes cost differently — selecting in vain
   costs the selection (about a tenth of dense attention at 4k tokens), going dense in vain costs
   the whole saving. (A ratio measured on synthetic inputs was tried and misled: 2–4× there, 1.1–1.3×
   on SmolVL, so it sent every layer dense.) A layer that goes dense here selects nothing, so pays
   nothing for it (short inputs, broad attention);
2. **after selecting** (:meth:`CostModel.after`): dense if the plan's kernel time is not below
   :data:`MARGIN` × dense (the selection is spent either way).

Decisions are a function of the fit and the call alone (no history), so a run is reproducible on a
machine whose fits are cached, whatever ran before.

Pure tensor code: caching fits on disk is the caller's (``adaspark.core.calibration``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "MARGIN",
    "CostFit",
    "CostModel",
    "CubeEstimate",
    "cube_estimate",
    "estimate_executed",
    "measure_costs",
]

#: the sparse kernel runs only if its predicted time is below this fraction of dense (noise margin)
MARGIN = 0.9
#: lengths (tokens) the fit is measured at
CALIBRATION_LENGTHS = (2048, 4096)


@dataclass(frozen=True)
class CostFit:
    """Measured seconds per unit of work (see the module docstring) for one call shape."""

    dense: float
    select_fixed: float
    select: float
    kernel_fixed: float
    kernel: float

    def dense_time(self, pairs: float, hq: int, d: int) -> float:
        return self.dense * pairs * hq * d

    def select_time(self, nq: int, cubes: int, hq: int, d: int) -> float:
        return self.select_fixed + self.select * nq * cubes * hq * d

    def kernel_time(self, executed: float, d: int) -> float:
        return self.kernel_fixed + self.kernel * executed * d

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CubeEstimate:
    """The ``C × C`` picture of a prefill's selection that :func:`estimate_executed` scores.

    Attributes:
        probs: ``[B, Hq, C, C]`` float32 distribution of each cube's mean query over the candidate
            cubes (the cubes other than its own that start before it ends).
        cand: ``[B, 1, C, C]`` bool candidates.
        pairs: ``[B, 1, C, C]`` float64 token pairs of each (query cube, key cube), ``n_i · n_j``:
            what a block kernel computes when it keeps the cube.
        total: causal (valid query, valid key) pairs over the batch, times the heads ``Hq``.
        other: entries outside the candidate pairs (text, own cubes), over heads.
    """

    probs: torch.Tensor
    cand: torch.Tensor
    pairs: torch.Tensor
    total: float
    other: float


@torch.no_grad()
def cube_estimate(q: torch.Tensor, inputs, pairs: float | None = None) -> CubeEstimate | None:
    """The :class:`CubeEstimate` of a prefill (``None`` without cubes or for new tokens after a
    cache). ``inputs``: the call's :class:`~adaspark.ops.attention.common.AttentionInputs`;
    ``pairs``: its causal pairs per head over the batch, if the caller has them."""
    from adaspark.ops.attention.common import causal_valid_pairs
    from adaspark.ops.cubes import cube_mean_keys
    from adaspark.ops.selection import masked_softmax

    idx = inputs.index
    c = idx.max_cubes
    if c == 0 or inputs.nq != inputs.nk:
        return None
    if pairs is None:
        pairs = float(causal_valid_pairs(inputs.key_mask, inputs.nq).sum())
    bsz, hq, hkv, d = inputs.bsz, inputs.hq, inputs.hkv, inputs.d
    g = hq // hkv
    qm = cube_mean_keys(q, idx)  # [B, Hq, C, D] mean query of every cube
    scores = torch.matmul(qm.view(bsz, hkv, g * c, d), inputs.mean_keys.transpose(-1, -2))
    scores = scores.view(bsz, hq, c, c) * inputs.scale
    n = idx.counts.to(torch.float64)  # [B, C]
    last = idx.token_idx.amax(-1)  # [B, C]
    present = idx.counts > 0
    cand = (idx.first_pos[:, None, :] <= last[:, :, None]) & present[:, :, None] & present[:, None, :]
    cand &= ~torch.eye(c, dtype=torch.bool, device=cand.device)[None]
    probs = masked_softmax(scores, cand[:, None])
    pair_n = (n[:, :, None] * n[:, None, :])[:, None]  # [B, 1, C, C]
    total = pairs * hq
    other = max(total - float((cand[:, None] * pair_n).sum()) * hq, 0.0)
    return CubeEstimate(probs=probs, cand=cand[:, None], pairs=pair_n, total=total, other=other)


@torch.no_grad()
def estimate_executed(q: torch.Tensor, inputs, pairs: float | None = None) -> float:
    """Score entries a block kernel would compute for a prefill, estimated before selecting.

    Each cube's mean query (per head) is scored against the cube mean keys of its candidates (the
    other cubes that start before it ends) and the call's policy keeps a set; the estimate counts
    every pair that is not a (video query, candidate cube) pair — text, own cube — plus the kept
    candidate pairs, with each cube's queries seeing each kept cube whole
    (:func:`cube_estimate`). ``inputs`` is the call's
    :class:`~adaspark.ops.attention.common.AttentionInputs` (with its mean keys); ``pairs``, its
    causal (valid query, valid key) pairs per head over the batch, if the caller has them.
    """
    from adaspark.ops.attention.common import causal_valid_pairs
    from adaspark.ops.selection import keep_from_probs

    est = cube_estimate(q, inputs, pairs)
    if est is None:
        if pairs is None:
            pairs = float(causal_valid_pairs(inputs.key_mask, inputs.nq).sum())
        return pairs * inputs.hq
    keep = keep_from_probs(est.probs, est.cand.expand_as(est.probs), inputs.policy)
    return est.other + float((keep * est.pairs).sum())


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _synthetic(n: int, hq: int, hkv: int, d: int, dtype, device, seed: int = 0):
    """q/k/v ``[1, H, N, D]`` and cube ids: a short text prefix, then a ``T × 16 × 16`` video in
    4×4×4 cubes whose keys share a per-cube direction (so selections are not uniform) filling about
    ``n`` tokens (``n = 0``: a single cube)."""
    g = torch.Generator().manual_seed(seed)
    pre = 32
    t = max(4, (n - pre) // 256) if n else 0
    side = 16 if t else 4  # n = 0: one 4 × 4 × 4 cube
    t = t or 4
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(side), torch.arange(side), indexing="ij")
    vid = ((tt // 4) * (side // 4) ** 2 + (hh // 4) * (side // 4) + ww // 4).reshape(-1)
    ids = torch.cat([torch.full((pre,), -1), vid])[None]
    n = ids.shape[1]
    c = int(vid.max()) + 1
    topics = torch.randn(hkv, c, d, generator=g) * 2
    k = torch.randn(hkv, n, d, generator=g) + torch.where(
        ids[0, :, None] >= 0, topics[:, ids[0].clamp_min(0)], 0
    )
    q = torch.randn(hq, n, d, generator=g)
    # the queries of a cube point at the topic of one random earlier cube (per head), as a trained
    # model's do (coherent within a cube); text queries each at a random cube
    own = ids[0].clamp_min(0)
    per_cube = (torch.rand(hq, c, generator=g) * (torch.arange(c) + 1)).long().clamp_max(c - 1)
    per_token = (torch.rand(hq, n, generator=g) * c).long().clamp_max(c - 1)
    target = torch.where(ids[0] >= 0, per_cube[:, own], per_token)
    q = q + topics[(torch.arange(hq) // (hq // hkv))[:, None], target]
    v = torch.randn(hkv, n, d, generator=g)
    cast = {"dtype": dtype, "device": device}
    return q[None].to(**cast), k[None].to(**cast), v[None].to(**cast), ids.to(device)


@torch.no_grad()
def measure_costs(
    *,
    hq: int,
    hkv: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device | str,
    granularity: str,
    kernel: str,
    repeats: int = 3,
) -> CostFit:
    """Time dense SDPA, the selection and the block kernel ``kernel`` (a key of
    :data:`~adaspark.ops.attention.BLOCK_KERNELS`) and fit a :class:`CostFit`: the fixed costs from a
    call on a tiny input (one cube), the per-unit costs from :data:`CALIBRATION_LENGTHS` (clamped
    at 0)."""
    from adaspark.ops.attention import _BLOCK_SIZES, BLOCK_KERNELS
    from adaspark.ops.attention.blocks import plan_blocks, run_blocks
    from adaspark.ops.attention.common import prepare_inputs

    block, run = _BLOCK_SIZES[kernel], BLOCK_KERNELS[kernel]
    gqa = hq != hkv

    def sparse_times(n: int, p: float):
        q, k, v, ids = _synthetic(n, hq, hkv, d, dtype, device)
        inp = prepare_inputs(q, k, v, ids, p, granularity=granularity)
        ts = _median_time(lambda: plan_blocks(q, inp, block=block), repeats)
        plan = plan_blocks(q, inp, block=block)
        tk = _median_time(lambda: run_blocks(q, k, v, plan, kernel=run), repeats)
        return ids.shape[1], int(ids.max()) + 1, plan.executed, ts, tk

    _n0, _c0, _e0, select_fixed, kernel_fixed = sparse_times(0, 0.5)  # the tiny input: one cube
    dense_pts, sel_pts, ker_pts = [], [], []
    for n in CALIBRATION_LENGTHS:
        q, k, v, ids = _synthetic(n, hq, hkv, d, dtype, device)
        n = ids.shape[1]
        td = _median_time(
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
            repeats,
        )
        dense_pts.append(td / (n * (n + 1) / 2 * hq * d))
        for p in (0.2, 0.95):
            n, cubes, executed, ts, tk = sparse_times(n, p)
            sel_pts.append(max(ts - select_fixed, 0.0) / (n * cubes * hq * d))
            ker_pts.append(max(tk - kernel_fixed, 0.0) / (executed * d))
    return CostFit(
        dense=statistics.median(dense_pts),
        select_fixed=select_fixed,
        select=statistics.median(sel_pts),
        kernel_fixed=kernel_fixed,
        kernel=statistics.median(ker_pts),
    )


@dataclass
class CostModel:
    """Per-call dense-or-sparse decisions from measured :class:`CostFit` s (see the module docstring).

    ``fits`` maps a shape key to its fit. A missing key is asked of ``load(key)`` (a disk cache), then
    measured with ``measure`` (default :func:`measure_costs`) and handed to ``on_new_fit(key, fit)``.
    ``decisions`` counts ``"dense-before"``, ``"dense-after"`` and ``"sparse"`` calls.
    """

    fits: dict[tuple, CostFit] = field(default_factory=dict)
    measure: Callable[..., CostFit] = measure_costs
    load: Callable[[tuple], CostFit | None] | None = None
    on_new_fit: Callable[[tuple, CostFit], None] | None = None
    margin: float = MARGIN
    decisions: dict[str, int] = field(
        default_factory=lambda: {"dense-before": 0, "dense-after": 0, "sparse": 0}
    )

    @staticmethod
    def key(*, hq, hkv, d, dtype, device, granularity, kernel, **_) -> tuple:
        dev = torch.device(device)
        return (
            dev.type,
            str(dtype).removeprefix("torch."),
            hq,
            hkv,
            d,
            granularity,
            kernel,
            torch.get_num_threads(),
        )

    def fit(self, key: tuple) -> CostFit:
        f = self.fits.get(key)
        if f is None and self.load is not None:
            f = self.load(key)
            if f is not None:
                self.fits[key] = f
        if f is None:
            dev, dtype, hq, hkv, d, gran, kernel, _threads = key
            f = self.measure(
                hq=hq, hkv=hkv, d=d, dtype=getattr(torch, dtype), device=dev, granularity=gran, kernel=kernel
            )
            self.fits[key] = f
            if self.on_new_fit is not None:
                self.on_new_fit(key, f)
        return f

    def before(
        self, key: tuple, *, pairs: float, nq: int, cubes: int, hq: int, d: int, estimate: float = 0.0
    ) -> bool:
        """``True``: run dense without selecting (``estimate``: predicted executed score entries)."""
        f = self.fit(key)
        cost = f.select_time(nq, cubes, hq, d) + f.kernel_time(estimate, d)
        go_dense = cost >= self.margin * f.dense_time(pairs, hq, d)
        if go_dense:
            self.decisions["dense-before"] += 1
        return go_dense

    def after(self, key: tuple, *, pairs: float, executed: float, hq: int, d: int) -> bool:
        """``True``: the plan's kernel would not pay, run dense."""
        f = self.fit(key)
        go_dense = f.kernel_time(executed, d) >= self.margin * f.dense_time(pairs, hq, d)
        self.decisions["dense-after" if go_dense else "sparse"] += 1
        return go_dense
