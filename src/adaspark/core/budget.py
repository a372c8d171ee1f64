"""Budget mode: steer one prefill's executed decoder FLOPs onto a fraction of dense.

One :class:`BudgetController` lives for one prefill forward. Layer by layer (in the order the decoder
runs them) the caller asks it for

1. :meth:`BudgetController.attention_fraction`: the share of the candidate (query cube, key cube)
   pair weight AdaS-Attn should keep, so that attention and FFN see the same reduction of their
   reducible work (video-to-candidate-cube pairs; video FFN rows beyond one per cube) and the layer
   lands on its target (its share of the budget plus what earlier layers over- or under-spent);
2. after attention ran, :meth:`BudgetController.ffn_fraction`: the fraction of video tokens the FFN
   must keep to land on the target given the attention FLOPs the kernel really executed;
3. :meth:`BudgetController.finish`: the layer's executed FLOPs (from its counters), which move the
   carried difference to the next layers.

The FLOPs are those of :mod:`adaspark.core.accounting` (the same formulas). Layers configured dense
spend their dense FLOPs; the other layers share the rest of the budget equally (all layers of a
prefill have the same dense FLOPs). The thresholds themselves come from
:func:`adaspark.ops.budget.top_p_for_fraction`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adaspark.core.accounting import (
    LayerDims,
    attention_flops,
    ffn_flops,
    ffn_overhead_flops,
    layer_flops,
    proj_flops,
)
from adaspark.ops.attention.common import AttentionStats
from adaspark.ops.budget import P_MIN
from adaspark.ops.ffn.common import FFNStats

__all__ = ["BudgetController", "BudgetLayer", "Snapshot", "search_threshold"]


@dataclass
class BudgetLayer:
    """What budget mode did in one layer of a prefill (FLOPs as :mod:`~adaspark.core.accounting`).

    Attributes:
        dense: the layer's dense FLOPs.
        target: the FLOPs it aimed at (its share of the budget plus the carried difference).
        floor: the least it could have executed (estimated: its fixed work, one candidate cube per
            query cube at the measured kernel-to-estimate ratio, one token per cube).
        executed: what it executed.
        p_attn / p_ffn: the thresholds chosen (None where that module ran dense or was not asked).
        search_flops: the selections the attention threshold search probed (part of ``executed``:
            the search is work the budget pays for), each charged as a full selection — an upper
            bound where the block paths compute a layer's distributions once for every probe.
    """

    dense: float
    target: float
    floor: float = 0.0
    executed: float = 0.0
    p_attn: float | None = None
    p_ffn: float | None = None
    #: selection work of the threshold search (included in ``executed``)
    search_flops: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """A layer's counters before it runs in this forward (to read what it adds)."""

    attn: AttentionStats
    ffn: FFNStats

    @classmethod
    def take(cls, attn: AttentionStats, ffn: FFNStats) -> Snapshot:
        return cls(_attn_copy(attn), FFNStats(**vars(ffn)))

    def attn_delta(self, now: AttentionStats) -> AttentionStats:
        then = self.attn
        return AttentionStats(
            now.num_heads,
            now.head_dim,
            now.kv_heads,
            queries=now.queries - then.queries,
            causal_pairs=now.causal_pairs - then.causal_pairs,
            executed=now.executed - then.executed,
            mean_key_tokens=now.mean_key_tokens - then.mean_key_tokens,
            dense_fallbacks=now.dense_fallbacks - then.dense_fallbacks,
            sparse_calls=now.sparse_calls - then.sparse_calls,
            attended=now.attended - then.attended,
            selections=now.selections - then.selections,
            entropy_sum=now.entropy_sum - then.entropy_sum,
            kept_sum=now.kept_sum - then.kept_sum,
            candidates_sum=now.candidates_sum - then.candidates_sum,
        )

    def ffn_delta(self, now: FFNStats) -> FFNStats:
        return FFNStats(**{k: getattr(now, k) - v for k, v in vars(self.ffn).items()})


def _attn_copy(st: AttentionStats) -> AttentionStats:
    return AttentionStats(
        st.num_heads,
        st.head_dim,
        st.kv_heads,
        queries=st.queries,
        causal_pairs=st.causal_pairs,
        executed=st.executed,
        mean_key_tokens=st.mean_key_tokens,
        dense_fallbacks=st.dense_fallbacks,
        sparse_calls=st.sparse_calls,
        attended=st.attended.clone(),
        selections=st.selections.clone(),
        entropy_sum=st.entropy_sum.clone(),
        kept_sum=st.kept_sum.clone(),
        candidates_sum=st.candidates_sum.clone(),
    )


#: an interpolated probe stays at least this fraction of the bracket away from either end
INTERPOLATION_GUARD = 0.1


def search_threshold(
    executed: Callable[[float], float],
    want: float,
    guess: float,
    *,
    steps: int = 7,
    at_one: float | None = None,
) -> float:
    """The threshold in ``[P_MIN, 1)`` whose ``executed(p)`` (non-decreasing in ``p``) is closest
    to ``want``, found by a search of ``steps`` probes whose first probe is ``guess``.

    Once both ends of the bracket have a count (``at_one`` gives the upper one before any probe
    does), the next probe interpolates between them instead of halving.

    Returns :data:`~adaspark.ops.budget.P_MIN` when even that executes ``want``; when no probe
    below 1 reaches it, the last probe below ``want`` — or ``1.0`` if ``at_one`` (what ``p = 1``,
    dense, executes) is given and closer to ``want``; otherwise the closer of the two probes that
    bracket ``want``. Every returned threshold below 1 was probed.
    """
    lo, hi = P_MIN, 1.0
    e_lo = executed(lo)
    if e_lo >= want:
        return lo
    e_hi = at_one
    mid = guess
    for _ in range(steps):
        if not lo < mid < hi:
            mid = (lo + hi) / 2
        e = executed(mid)
        if e >= want:
            hi, e_hi = mid, e
        else:
            lo, e_lo = mid, e
        if e_hi is not None and e_hi > e_lo:
            # interpolate between the bracket's counts, kept off its ends (a safeguarded regula falsi)
            t = min(max((want - e_lo) / (e_hi - e_lo), INTERPOLATION_GUARD), 1.0 - INTERPOLATION_GUARD)
            mid = lo + t * (hi - lo)
        else:
            mid = (lo + hi) / 2
    if hi >= 1.0:
        return 1.0 if at_one is not None and at_one - want < want - e_lo else lo
    return lo if want - e_lo <= e_hi - want else hi


def _clamp01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


class BudgetController:
    """The budget of one prefill (see the module docstring).

    Args:
        budget: target fraction of the dense decoder FLOPs, in (0, 1].
        dims: the decoder layer shapes.
        num_layers: decoder layers.
        dense_layers: the layers configured dense (they spend their dense FLOPs).
    """

    def __init__(self, budget: float, dims: LayerDims, num_layers: int, dense_layers: set[int]) -> None:
        self.budget = float(budget)
        self.dims = dims
        n_sparse = num_layers - len(dense_layers)
        #: the fraction of its dense FLOPs each non-dense layer aims at
        self.layer_fraction = (
            (self.budget * num_layers - len(dense_layers)) / n_sparse if n_sparse else self.budget
        )
        self.num_layers = num_layers
        self.dense_layers = set(dense_layers)
        #: budget share minus executed FLOPs of the layers finished so far
        self.carry = 0.0
        #: score entries the attention kernel executed over what its probe predicted, last layer
        self.attn_ratio = 1.0
        #: whether ``attn_ratio`` has been measured (a steered layer ran its kernel)
        self.ratio_measured = False
        #: the threshold search's FLOPs in the last finished layer (what the next one expects to pay)
        self.last_search = 0.0
        self.layers: dict[int, BudgetLayer] = {}
        self._rows: dict[int, int] = {}
        self._pairs: dict[int, int] = {}

    # ------------------------------------------------------------------ per layer
    def start(self, li: int, *, rows: int, causal_pairs: int) -> BudgetLayer:
        """Open layer ``li`` (``rows`` token rows, ``causal_pairs`` per head over the batch)."""
        d = self.dims
        dense = proj_flops(d, rows) + attention_flops(d, d.heads * causal_pairs) + ffn_flops(d, rows)
        lay = BudgetLayer(dense=dense, target=self.layer_fraction * dense + self.carry)
        self.layers[li] = lay
        self._rows[li] = rows
        self._pairs[li] = causal_pairs
        return lay

    def wants_dense(self, li: int) -> bool:
        """The budget is the whole dense model, or the layer's target is at least its dense FLOPs:
        run it dense (``p = 1``)."""
        lay = self.layers[li]
        return self.layer_fraction >= 1.0 or lay.target >= lay.dense

    def attention_fraction(
        self,
        li: int,
        *,
        other_entries: float,
        candidate_entries: float,
        ffn_fixed_rows: float,
        ffn_free_rows: float,
        ffn_overhead: float,
    ) -> float:
        """Share of the candidate pair weight to keep (in [0, 1]).

        ``other_entries``: score entries outside the candidate pairs (estimated, over heads);
        ``candidate_entries``: the candidate pairs' entries; ``ffn_fixed_rows``: FFN rows that run
        whatever the threshold (non-video tokens, one per cube); ``ffn_free_rows``: the video rows
        the FFN threshold decides; ``ffn_overhead``: AdaS-FFN's own FLOPs.
        """
        d, lay = self.dims, self.layers[li]
        fixed = (
            proj_flops(d, self._rows[li])
            + attention_flops(d, other_entries)
            + ffn_flops(d, ffn_fixed_rows)
            + ffn_overhead
            + max(self.last_search, lay.search_flops)  # the search this layer is about to pay for
        )
        reducible = attention_flops(d, candidate_entries) + ffn_flops(d, ffn_free_rows)
        if reducible <= 0:
            return 1.0
        return _clamp01((lay.target - fixed) / reducible)

    def ffn_fraction(
        self,
        li: int,
        *,
        attention: AttentionStats,
        nonvideo_rows: int,
        video_tokens: int,
    ) -> float:
        """Fraction of the video tokens the FFN should keep, given what attention executed
        (``attention``: the layer's counters of this forward)."""
        d, lay = self.dims, self.layers[li]
        rows = self._rows[li]
        _, attn_spent, _, bd = layer_flops(d, rows, attention, None, sparse=True)
        spent = attn_spent - bd["ffn"] + lay.search_flops  # projections, attention, selection, search
        # norm scores, and (some token skipped) the cube sums and copies of every video token
        overhead = ffn_overhead_flops(d, video_tokens, max(video_tokens - 1, 0), 1)
        left = lay.target - spent - overhead
        if not video_tokens:
            return 1.0
        rows_left = left / ffn_flops(d, 1) - nonvideo_rows
        return _clamp01(rows_left / video_tokens)

    def finish(
        self,
        li: int,
        *,
        attention: AttentionStats,
        ffn: FFNStats | None,
        attn_floor_entries: float | None = None,
        ffn_min_rows: float | None = None,
    ) -> None:
        """Close layer ``li`` with its counters of this forward (``ffn`` None: the FFN ran dense).

        ``attn_floor_entries``: the least score entries its attention could have executed (None:
        what it executed); ``ffn_min_rows``: the least FFN rows (None: what it ran).
        """
        d, lay = self.dims, self.layers[li]
        _, executed, _, bd = layer_flops(d, self._rows[li], attention, ffn, sparse=True)
        executed += lay.search_flops  # the threshold search is work the budget pays for
        floor = executed
        if attn_floor_entries is not None:
            floor += min(attention_flops(d, attn_floor_entries) - bd["attn"], 0.0)
        if ffn_min_rows is not None:
            floor += min(ffn_flops(d, ffn_min_rows) - bd["ffn"], 0.0)
        lay.executed = executed
        lay.floor = floor
        self.last_search = lay.search_flops
        self.carry += self.layer_fraction * lay.dense - executed

    # ------------------------------------------------------------------ whole prefill
    @property
    def search_flops(self) -> float:
        """Selection work the attention threshold searches probed, over the layers."""
        return sum(lay.search_flops for lay in self.layers.values())

    @property
    def floor_fraction(self) -> float:
        """Least executed / dense FLOPs of the layers run so far (dense layers at 1)."""
        dense = floor = 0.0
        for li in range(self.num_layers):
            lay = self.layers.get(li)
            if lay is None:
                continue
            dense += lay.dense
            floor += lay.floor
        if not dense:
            return 1.0
        # dense layers spend as much as any sparse layer's dense FLOPs (same shapes, same tokens)
        per_layer = dense / len(self.layers)
        n_dense = len(self.dense_layers)
        return (floor + n_dense * per_layer) / (dense + n_dense * per_layer)
