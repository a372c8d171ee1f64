"""FLOPs and sparsity accounting: per layer, dense baseline vs what AdaSpark kept and executed.

Conventions (one multiply-add = 2 FLOPs; only matrix products and the listed overheads count):

* projections: ``2·T·d·(Hq·D + 2·Hkv·D)`` for q/k/v plus ``2·T·Hq·D·d`` for the output projection,
  ``T`` = token rows processed by the layer (padding rows included: they run in both modes);
* attention: ``4·D`` per attended (query, key) pair and head (``QKᵀ`` and ``AV``); dense counts every
  causal pair between real tokens, sparse counts the pairs the semantics keep (ideal) or the score
  entries the kernel really computed (executed);
* selection: ``Hkv·D`` per token averaged into cube mean keys, ``2·D + 5 + ceil(log2 C̄)`` per
  (query, head, candidate cube) for the score, softmax and sort (``C̄`` = mean candidates per
  selection), and ``2·d`` per video token for the FFN norm score;
* FFN (SwiGLU): ``6·d·I`` per row through the FFN; compensation ``d`` per active video token
  (cube sums) and per skipped token (the copy of the mean).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from adaspark.ops.attention.common import AttentionStats
from adaspark.ops.ffn.common import FFNStats

__all__ = [
    "LayerDims",
    "LayerReport",
    "Report",
    "attention_flops",
    "build_report",
    "ffn_flops",
    "ffn_overhead_flops",
    "layer_flops",
    "proj_flops",
    "selection_flops",
]


@dataclass(frozen=True)
class LayerDims:
    """Shapes of one decoder layer: hidden ``d``, heads, kv heads, head dim ``D``, FFN width ``I``."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


@dataclass
class LayerReport:
    """What one decoder layer did in the last call.

    Attributes:
        index: layer index.
        dense: the layer was configured dense.
        attn_density: fraction of causal (query, key) pairs attended (ideal, semantics).
        attn_density_executed: score entries computed by the kernel / causal pairs.
        ffn_active: fraction of video tokens that went through the FFN.
        entropy: per query head, mean entropy (nats) of the cube distributions.
        cubes_kept: per query head, mean number of candidate cubes kept.
        candidates: per query head, mean number of candidate cubes.
        attn_sparse_calls: attention calls that ran a sparse kernel.
        attn_dense_calls: attention calls run dense because sparse would not pay (the cost model's
            decision, or the fixed ``dense_fallback`` rule).
        flops_dense / flops_sparse / flops_sparse_ideal: FLOPs of this layer.
        breakdown: sparse (executed) FLOPs by component.
        p_attn / p_ffn: budget mode: the Top-p thresholds the last prefill chose for this layer
            (None outside budget mode, for dense layers, or where that module was not steered).
    """

    index: int
    dense: bool
    attn_density: float
    attn_density_executed: float
    ffn_active: float
    entropy: list[float]
    cubes_kept: list[float]
    candidates: list[float]
    flops_dense: float
    flops_sparse: float
    flops_sparse_ideal: float
    breakdown: dict = field(default_factory=dict)
    attn_sparse_calls: int = 0
    attn_dense_calls: int = 0
    p_attn: float | None = None
    p_ffn: float | None = None


@dataclass
class Report:
    """Whole-model numbers for the last call (``generate``: prefill plus every decode step).

    ``flops_*`` include the vision encoder and the LM head; ``llm_flops_*`` are the decoder layers
    only (the paper's 57% is about the LLM). ``saved = 1 - flops_sparse / flops_dense`` with the
    FLOPs the kernels really executed; ``saved_ideal`` uses the pairs the semantics keep.
    ``decode_steps`` counts the forwards that continued a KV cache (decode steps, draft
    verification, later prefill chunks), ``sparse_decode_steps`` those of them in which at least
    one layer ran AdaS-Attn's sparse path (not dense attention).

    Budget mode (``AdaSparkConfig.budget``): ``budget`` is the target fraction of the dense decoder
    FLOPs, ``budget_floor`` the least fraction the last prefill could have executed (``None``
    without a steered prefill), ``budget_search_flops`` the selection work its threshold searches
    probed (included in ``llm_flops_sparse`` and ``flops_sparse``: the budget pays for its own
    search); :attr:`budget_reachable` compares the two.
    """

    layers: list[LayerReport]
    flops_dense: float
    flops_sparse: float
    flops_sparse_ideal: float
    llm_flops_dense: float
    llm_flops_sparse: float
    llm_flops_sparse_ideal: float
    vision_flops: float
    lm_head_flops: float
    tokens: int
    video_tokens: int
    forward_calls: int
    decode_steps: int = 0
    sparse_decode_steps: int = 0
    budget: float | None = None
    budget_floor: float | None = None
    budget_search_flops: float = 0.0

    @property
    def budget_reachable(self) -> bool | None:
        """Budget mode: whether the budget lies at or above the floor (None outside budget mode)."""
        if self.budget is None or self.budget_floor is None:
            return None
        return self.budget >= self.budget_floor

    @property
    def llm_fraction(self) -> float:
        """Executed over dense decoder FLOPs (1.0 when nothing ran)."""
        return self.llm_flops_sparse / self.llm_flops_dense if self.llm_flops_dense else 1.0

    @property
    def saved(self) -> float:
        return 1.0 - self.flops_sparse / self.flops_dense if self.flops_dense else 0.0

    @property
    def saved_ideal(self) -> float:
        return 1.0 - self.flops_sparse_ideal / self.flops_dense if self.flops_dense else 0.0

    @property
    def llm_saved(self) -> float:
        return 1.0 - self.llm_flops_sparse / self.llm_flops_dense if self.llm_flops_dense else 0.0

    @property
    def llm_saved_ideal(self) -> float:
        return 1.0 - self.llm_flops_sparse_ideal / self.llm_flops_dense if self.llm_flops_dense else 0.0

    @property
    def attn_density(self) -> float:
        """Mean attention density over the layers."""
        return sum(lr.attn_density for lr in self.layers) / len(self.layers) if self.layers else 1.0

    @property
    def sparse_attention_layers(self) -> list[int]:
        """Indices of the layers whose attention ran a sparse kernel in at least one call."""
        return [lr.index for lr in self.layers if lr.attn_sparse_calls > 0]

    @property
    def ffn_active(self) -> float:
        """Mean FFN active fraction over the layers."""
        return sum(lr.ffn_active for lr in self.layers) / len(self.layers) if self.layers else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            saved=self.saved,
            saved_ideal=self.saved_ideal,
            llm_saved=self.llm_saved,
            llm_saved_ideal=self.llm_saved_ideal,
            budget_reachable=self.budget_reachable,
        )
        return d

    def summary(self) -> str:
        """A short human-readable account."""
        lines = [
            f"tokens {self.tokens} (video {self.video_tokens}), forward calls {self.forward_calls} "
            f"(decode steps {self.decode_steps}, sparse {self.sparse_decode_steps})",
            f"FLOPs dense {self.flops_dense:.3e}  AdaSpark {self.flops_sparse:.3e}  saved {self.saved:.1%} "
            f"(ideal {self.saved_ideal:.1%}; decoder only {self.llm_saved:.1%})",
        ]
        fallbacks = sum(lr.attn_dense_calls for lr in self.layers)
        if self.layers:
            lines.append(
                f"attention sparse in {len(self.sparse_attention_layers)} of {len(self.layers)} layers"
                + (f" ({fallbacks} layer calls ran dense: sparse would not pay)" if fallbacks else "")
            )
        if self.budget is not None:
            line = f"budget {self.budget:.2f} of dense decoder FLOPs: executed {self.llm_fraction:.2f}"
            if self.budget_reachable is False:
                line += f" (not reachable: floor {self.budget_floor:.2f})"
            elif self.budget_floor is None:
                line += " (no video prefill to steer)"
            if self.budget_search_flops and self.llm_flops_dense:
                share = self.budget_search_flops / self.llm_flops_dense
                line += f" (its threshold search included: {share:.1%} of dense)"
            lines.append(line)
        return "\n".join(lines)


def proj_flops(dims: LayerDims, rows: int) -> float:
    """q/k/v and output projections of ``rows`` token rows."""
    d, hq, hkv, hd = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
    return 2.0 * rows * d * (hq * hd + 2 * hkv * hd) + 2.0 * rows * hq * hd * d


def attention_flops(dims: LayerDims, entries: float) -> float:
    """``QKᵀ`` and ``AV`` of ``entries`` score entries (summed over heads)."""
    return 4.0 * dims.head_dim * entries


def ffn_flops(dims: LayerDims, rows: float) -> float:
    """The SwiGLU FFN of ``rows`` rows."""
    return 6.0 * dims.hidden * dims.intermediate * rows


def selection_flops(dims: LayerDims, mean_key_tokens: int, candidates: float, selections: float) -> float:
    """Cube mean keys of ``mean_key_tokens`` keys and the score/softmax/sort of ``candidates``
    (query, head, candidate cube) entries over ``selections`` selections."""
    hd = dims.head_dim
    avg_c = max(2.0, candidates / selections) if selections else 2.0
    per_candidate = 2 * hd + 5 + math.ceil(math.log2(avg_c))
    return float(dims.kv_heads * hd * mean_key_tokens) + candidates * per_candidate


def ffn_overhead_flops(dims: LayerDims, video_tokens: int, active_video: int, compensated: int) -> float:
    """AdaS-FFN's own work: the norm score of every video token and, when some token was skipped,
    the cube sums and the copies of the mean."""
    comp = float(dims.hidden) * (active_video + compensated) if compensated else 0.0
    return 2.0 * dims.hidden * video_tokens + comp


def layer_flops(
    dims: LayerDims,
    rows: int,
    attn: AttentionStats,
    ffn: FFNStats | None,
    *,
    sparse: bool,
) -> tuple[float, float, float, dict]:
    """``(dense, sparse_executed, sparse_ideal, breakdown)`` FLOPs of one layer from its counters.

    ``ffn`` is None when the FFN ran densely (then ``rows`` rows went through it).
    """
    proj = proj_flops(dims, rows)
    attn_dense = attention_flops(dims, dims.heads * attn.causal_pairs)
    ffn_dense = ffn_flops(dims, rows)
    dense = proj + attn_dense + ffn_dense
    if not sparse:
        bd = {"proj": proj, "attn": attn_dense, "select": 0.0, "ffn": ffn_dense, "compensation": 0.0}
        return dense, dense, dense, bd
    attn_exec = attention_flops(dims, attn.executed)
    attn_ideal = attention_flops(dims, float(attn.attended.sum()))
    select = selection_flops(
        dims, attn.mean_key_tokens, float(attn.candidates_sum.sum()), float(attn.selections.sum())
    )
    if ffn is None:
        ffn_sparse, comp = ffn_dense, 0.0
    else:
        ffn_sparse = ffn_flops(dims, ffn.ffn_rows)
        over = ffn_overhead_flops(dims, ffn.video_tokens, ffn.active_video, ffn.compensated)
        select += 2.0 * dims.hidden * ffn.video_tokens
        comp = over - 2.0 * dims.hidden * ffn.video_tokens
    sparse_exec = proj + attn_exec + select + ffn_sparse + comp
    sparse_ideal = proj + attn_ideal + select + ffn_sparse + comp
    bd = {"proj": proj, "attn": attn_exec, "select": select, "ffn": ffn_sparse, "compensation": comp}
    return dense, sparse_exec, sparse_ideal, bd


def build_report(
    dims: LayerDims,
    attn_stats: dict[int, AttentionStats],
    ffn_stats: dict[int, FFNStats],
    rows: dict[int, int],
    *,
    sparse_layers: set[int],
    sparse_ffn_layers: set[int],
    vision_flops: float = 0.0,
    lm_head_flops: float = 0.0,
    video_tokens: int = 0,
    forward_calls: int = 0,
    decode_steps: int = 0,
    sparse_decode_steps: int = 0,
    budget: float | None = None,
    budget_floor: float | None = None,
    budget_search_flops: float = 0.0,
    thresholds: dict[int, tuple[float | None, float | None]] | None = None,
) -> Report:
    """The :class:`Report` of one call from the counters of every decoder layer.

    ``rows[i]`` token rows went through layer ``i``; ``sparse_layers`` are the layers not kept dense,
    ``sparse_ffn_layers`` those whose FFN ran AdaS-FFN (their ``ffn_stats`` count). The vision encoder
    and the LM head, which AdaSpark does not change, are added to the whole-model figures.
    ``budget``, ``budget_floor``, ``budget_search_flops`` and ``thresholds`` (layer -> ``(p_attn,
    p_ffn)``) are budget mode's (see :class:`Report`).
    """
    layers = []
    tot_d = tot_s = tot_i = 0.0
    for i in sorted(attn_stats):
        st = attn_stats[i]
        sparse = i in sparse_layers
        ffn = ffn_stats[i] if i in sparse_ffn_layers else None
        fd, fs, fi, bd = layer_flops(dims, rows[i], st, ffn, sparse=sparse)
        tot_d, tot_s, tot_i = tot_d + fd, tot_s + fs, tot_i + fi
        sel = st.selections.clamp_min(1)
        layers.append(
            LayerReport(
                index=i,
                dense=not sparse,
                attn_density=st.density,
                attn_density_executed=st.executed_density,
                ffn_active=ffn.active_fraction if ffn is not None else 1.0,
                entropy=(st.entropy_sum / sel).tolist(),
                cubes_kept=(st.kept_sum / sel).tolist(),
                candidates=(st.candidates_sum / sel).tolist(),
                flops_dense=fd,
                flops_sparse=fs,
                flops_sparse_ideal=fi,
                breakdown=bd,
                attn_sparse_calls=st.sparse_calls if sparse else 0,
                attn_dense_calls=st.dense_fallbacks if sparse else 0,
                p_attn=(thresholds or {}).get(i, (None, None))[0],
                p_ffn=(thresholds or {}).get(i, (None, None))[1],
            )
        )
    extra = vision_flops + lm_head_flops
    tot_s += budget_search_flops  # budget mode's threshold search: work done, counted as executed
    tot_i += budget_search_flops
    return Report(
        layers=layers,
        flops_dense=tot_d + extra,
        flops_sparse=tot_s + extra,
        flops_sparse_ideal=tot_i + extra,
        llm_flops_dense=tot_d,
        llm_flops_sparse=tot_s,
        llm_flops_sparse_ideal=tot_i,
        vision_flops=vision_flops,
        lm_head_flops=lm_head_flops,
        tokens=rows[min(rows)] if rows else 0,
        video_tokens=video_tokens,
        forward_calls=forward_calls,
        decode_steps=decode_steps,
        sparse_decode_steps=sparse_decode_steps,
        budget=budget,
        budget_floor=budget_floor,
        budget_search_flops=budget_search_flops,
    )
