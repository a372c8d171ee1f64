"""The AdaSpark mechanism inside Hugging Face transformers, shared by every supported family.

What :func:`patch` changes, all per instance and undone by ``handle.remove()``:

* the text config's attention implementation becomes ``"adaspark"`` (registered in
  ``AttentionInterface`` and ``AttentionMaskInterface``); each decoder attention module is routed
  to this model's state;
* a forward pre-hook on the multimodal backbone reads the video layout from the call's own inputs
  (through the family's adapter, ``adaspark.integrations.transformers.adapters``), and ``generate``
  is wrapped on the instance so that the layout of its prompt is read from *its* inputs (generate
  pre-encodes the video and drops the grids before the first forward);
* pre/post hooks on the language model open one :class:`_Forward` per forward: which sequence
  (KV cache) it continues, from which offset, with which cube ids;
* each sparse layer's MLP gets an instance-level ``forward`` running AdaS-FFN, and a pre-hook on
  its ``post_attention_layernorm`` captures the residual stream that ranks the tokens;
* hooks count the vision modules' FLOPs (``FlopCounterMode``) and the LM head's.

No parameter, buffer or state-dict key is touched.

How a forward finds its layout. A *sequence* is what one KV cache holds: its cube ids and the cube
mean keys of every layer. A forward that continues a filled cache uses that cache's sequence (a
cache the patch never saw is an error, never a silent dense run). A forward that starts afresh
(no cache, or an empty one) takes the layout of the latest *prompt* — the inputs of the running
``generate`` call, or of the last forward that came with its video grids — when its ids begin with
that prompt's ids (repeated per sample for beams and ``num_return_sequences``) and the tokens after
it are text (draft tokens of assisted decoding, tokens generated without a cache); a forward that
covers only the start of the prompt is the first chunk of a chunked prefill. A fresh forward with
video tokens and no such prompt is an error.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from adaspark.config import AdaSparkConfig
from adaspark.core import calibration
from adaspark.core.accounting import LayerDims, Report, build_report, selection_flops
from adaspark.core.budget import BudgetController, Snapshot, search_threshold
from adaspark.core.layout import VIDEO, Layout, adaptive_layout
from adaspark.integrations.transformers import attention as attn_backend
from adaspark.integrations.transformers import compat
from adaspark.integrations.transformers.adapters import (
    SUPPORTED_MODEL_TYPES,
    ModelAdapter,
    ModelParts,
    get_adapter,
)
from adaspark.integrations.transformers.adapters.base import bind_call, set_instance_attr
from adaspark.ops.attention import _BLOCK_SIZES as BLOCK_SIZES
from adaspark.ops.attention import (
    BLOCK_KERNELS,
    AttentionStats,
    backend_after_cache,
    cube_sparse_attention,
    reference_attention_mask,
    resolve_attention_backend,
)
from adaspark.ops.attention.blocks import plan_blocks, run_blocks
from adaspark.ops.attention.common import causal_valid_pairs, prepare_inputs
from adaspark.ops.attention.cost import cube_estimate
from adaspark.ops.attention.units import unit_scores
from adaspark.ops.budget import P_MIN, top_p_for_fraction
from adaspark.ops.cubes import CubeIndex, build_cube_index, cube_mean_keys
from adaspark.ops.ffn import FFNStats, cube_sparse_ffn, token_scores
from adaspark.ops.ffn.common import cube_token_probs
from adaspark.ops.selection import SelectionPolicy, keep_from_probs

__all__ = ["SUPPORTED_MODEL_TYPES", "AdaSparkHandle", "patch"]

#: model -> live handle (so that patching twice replaces the first patch)
_PATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: vision module -> {call key: FLOPs} measured once with FlopCounterMode
_VISION_FLOPS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: budget mode: search steps of a layer's attention threshold (probes of the block plan). Two
#: suffice: the FFN threshold, found exactly after attention ran, absorbs what attention missed
#: (benchmarks/budget_error.py: errors of 0.0000 at 2 steps as at 7 on the tiny model at 512 frames,
#: with 1.8% instead of 4.9% of dense spent on the search; 1 step missed by up to 0.029) — as long
#: as the kernel executes what its plan says; a kernel seen to differ from its plan by more than
#: BUDGET_PLAN_TOLERANCE (gather: the union of a GQA group's blocks) gets BUDGET_SEARCH_STEPS_INEXACT
BUDGET_SEARCH_STEPS = 2
BUDGET_SEARCH_STEPS_INEXACT = 7
BUDGET_PLAN_TOLERANCE = 0.02

#: the inputs of the patched ``generate`` calls running now, innermost last (an assistant model's
#: own ``generate`` runs inside the main model's and sees its prompt without the video grids)
_RUNNING_GENERATES: list[dict] = []


def _eager(fn):
    """Run ``fn`` outside any ``torch.compile`` graph (a compiled ``generate`` calls the hooks)."""
    return torch.compiler.disable(fn, recursive=True)


@dataclass
class _Prompt:
    """Token ids and cube layout of the prompt the next fresh forwards start with."""

    input_ids: torch.Tensor
    layout: Layout


@dataclass
class _Sequence:
    """What one KV cache holds: cube ids up to the last video token, cube index, mean keys."""

    layout: Layout | None
    cube_ids: torch.Tensor
    index: CubeIndex
    #: layer -> cube mean keys of the complete cubes (filled once every video token is in the cache)
    mean_keys: dict = field(default_factory=dict)

    @property
    def video_end(self) -> int:
        return int(self.cube_ids.shape[1])

    @classmethod
    def build(cls, layout: Layout | None, bsz: int, device) -> _Sequence:
        if layout is None:
            ids = torch.full((bsz, 0), -1, dtype=torch.long, device=device)
        else:
            ids = layout.cube_ids.to(device)
            video = (ids >= 0).any(dim=0).nonzero()
            end = int(video.max()) + 1 if video.numel() else 0
            ids = ids[:, :end]
        return cls(layout=layout, cube_ids=ids, index=build_cube_index(ids))

    def cube_ids_for(self, bsz: int, nk: int) -> torch.Tensor:
        """Cube ids of the first ``nk`` positions (text, i.e. -1, past the last video token)."""
        if self.cube_ids.shape[0] != bsz:
            raise ValueError(
                f"AdaSpark: batch size changed from {self.cube_ids.shape[0]} to {bsz} within one sequence"
            )
        n0 = self.video_end
        if nk <= n0:
            return self.cube_ids[:, :nk]
        return torch.cat([self.cube_ids, self.cube_ids.new_full((bsz, nk - n0), -1)], dim=1)

    def index_for(self, nk: int) -> CubeIndex:
        return self.index if nk >= self.video_end else build_cube_index(self.cube_ids[:, :nk])


@dataclass
class _Forward:
    """One language-model forward: the sequence it extends and where its tokens start."""

    seq: _Sequence
    offset: int
    length: int
    bsz: int
    #: layer -> residual stream entering its FFN sub-layer
    residual: dict = field(default_factory=dict)
    #: some layer of this forward ran AdaS-Attn's sparse path
    ran_sparse: bool = False
    #: budget mode, a prefill: the controller choosing this forward's thresholds
    budget: BudgetController | None = None
    #: budget mode: layer -> its counters before this forward, its attention floor (FLOPs)
    budget_open: dict = field(default_factory=dict)
    _ffn_ids: torch.Tensor | None = None
    _ffn_index: CubeIndex | None = None

    def ffn_ids(self, device) -> tuple[torch.Tensor, CubeIndex | None]:
        """Cube ids of this forward's own tokens (and their index when any is video)."""
        if self._ffn_ids is None:
            ids = self.seq.cube_ids_for(self.bsz, self.offset + self.length)[:, self.offset :]
            if self.offset:  # a later prefill chunk: its cubes, numbered from 0
                ids = _renumber(ids)
            self._ffn_ids = ids.to(device)
            self._ffn_index = build_cube_index(self._ffn_ids) if bool((ids >= 0).any()) else None
        return self._ffn_ids, self._ffn_index


class _State:
    """Per-model AdaSpark state: the prompt, the sequences of the KV caches, the forward, counters."""

    def __init__(self, config: AdaSparkConfig, parts: ModelParts, adapter: ModelAdapter) -> None:
        self.config = config
        self.parts = parts
        self.adapter = adapter
        tc = parts.text_config
        n_layers = len(parts.layers)
        self.num_layers = n_layers
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.dims = LayerDims(
            hidden=tc.hidden_size,
            heads=tc.num_attention_heads,
            kv_heads=tc.num_key_value_heads,
            head_dim=head_dim,
            intermediate=tc.intermediate_size,
        )
        self.dense_layers = {i for i in range(n_layers) if config.is_dense_layer(i, n_layers)}
        self.attn_policy = config.attn_policy()
        self.ffn_policy = config.ffn_policy()
        #: dense-or-sparse decisions per layer from this machine's measured costs (config.cost_model;
        #: not applied in budget mode: a dense layer would spend the budget)
        use_costs = config.cost_model and config.budget is None
        self.cost_model = calibration.cost_model() if use_costs else None
        #: budget mode: layer -> (p_attn, p_ffn) of the last prefill, which later forwards reuse
        self.budget_p: dict[int, tuple[float | None, float | None]] = {}
        #: budget mode: the controller of the last prefill (for the report)
        self.budget_last: BudgetController | None = None
        self.prompt: _Prompt | None = None
        #: KV cache -> the sequence it holds
        self.caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        #: the sequence of the last forward (the layout ``handle.layout`` shows)
        self.seq: _Sequence | None = None
        self.fwd: _Forward | None = None
        self.in_generate = False
        #: the multimodal forward running now: its input ids, whether its new tokens hold video
        self._vl_ids: torch.Tensor | None = None
        self._vl_video = False
        #: vision module -> (its FlopCounterMode or None, its call key) while it runs
        self._vision_calls: dict[int, tuple[FlopCounterMode | None, tuple | None]] = {}
        self.reset_stats()

    # ---------------------------------------------------------------- counters
    def reset_stats(self) -> None:
        d = self.dims
        rec = getattr(self, "record_selection", False)
        self.attn_stats = {
            i: AttentionStats(d.heads, d.head_dim, d.kv_heads, record=rec) for i in range(self.num_layers)
        }
        self.ffn_stats = {i: FFNStats() for i in range(self.num_layers)}
        self.rows = dict.fromkeys(range(self.num_layers), 0)
        self.vision_flops = 0.0
        self.lm_head_flops = 0.0
        self.calls = 0
        self.decode_steps = 0
        self.sparse_decode_steps = 0
        self.budget_last = None  # a new call: its own prefill (if any) steers the budget

    def sparse_ffn_layer(self, i: int) -> bool:
        return self.config.sparse_ffn and i not in self.dense_layers

    # ---------------------------------------------------------------- layout of prompts
    def set_prompt(self, captured) -> None:
        if captured is not None:
            ids, layout = captured
            self.prompt = _Prompt(ids, layout)

    def on_generate(self, args: tuple, kwargs: dict, generate) -> None:
        """Start of a ``generate`` call: one report covers it; its prompt's layout is read here."""
        self.reset_stats()
        bound = bind_call(generate, args, kwargs)
        bound = {**bound.pop("kwargs", {}), **bound}
        if bound.get("input_ids") is None and isinstance(bound.get("inputs"), torch.Tensor):
            bound["input_ids"] = bound["inputs"]
        self.set_prompt(self.adapter.layout_from_call(self.config, self.parts, bound))
        return bound

    def on_vl_forward(self, module, args, kwargs) -> None:
        bound = bind_call(module.forward, args, kwargs)
        bound = {**bound.pop("kwargs", {}), **bound}
        past = compat.cache_length(compat.find_cache(args, kwargs))
        if past == 0 and not self.in_generate:
            self.reset_stats()  # a new call
        self.calls += 1
        if past > 0:
            self.decode_steps += 1
        ids = bound.get("input_ids")
        self._vl_ids = ids
        p = self.parts
        video = ids is not None and bool((ids == p.video_token_id).any())
        types = bound.get("mm_token_type_ids")
        emb = bound.get("inputs_embeds")
        n = ids.shape[-1] if ids is not None else (emb.shape[1] if isinstance(emb, torch.Tensor) else 0)
        if isinstance(types, torch.Tensor) and n:
            # the types of this call's own tokens (generate hands a cached step the last ones only)
            video = video or bool((types[..., -n:] == VIDEO).any())
        if self.config.images_as_video and ids is not None:
            video = video or bool((ids == p.image_token_id).any())
        self._vl_video = video
        if past == 0 and not (self.in_generate and ids is not None and self._match_one(self.prompt, ids, n)):
            # (a forward of the running generate over its prompt, or a first prefill chunk of it,
            # is described by generate's inputs; a chunk alone cannot be read)
            self.set_prompt(self.adapter.layout_from_call(self.config, p, bound))

    def _match_prompt(self, ids: torch.Tensor | None, n: int) -> Layout | None:
        """The layout of the prompt a fresh forward over ``ids`` starts with, if any.

        This model's latest prompt first, then those of the ``generate`` calls around this one (an
        assistant model drafting for a main model), read with this model's own adapter and config.
        """
        found = self._match_one(self.prompt, ids, n)
        for bound in reversed(_RUNNING_GENERATES):
            if found is not None:
                break
            try:
                captured = self.adapter.layout_from_call(self.config, self.parts, bound)
            except ValueError:
                captured = None
            if captured is not None:
                found = self._match_one(_Prompt(*captured), ids, n)
        return found

    def _match_one(self, pr: _Prompt | None, ids: torch.Tensor | None, n: int) -> Layout | None:
        if pr is None or ids is None or ids.shape[0] % pr.input_ids.shape[0]:
            return None
        reps = ids.shape[0] // pr.input_ids.shape[0]
        want = pr.input_ids.to(ids.device)
        if reps > 1:
            want = want.repeat_interleave(reps, dim=0)
        n0 = want.shape[1]
        m = min(n, n0)
        if not torch.equal(ids[:, :m], want[:, :m]):
            return None
        if n > n0:
            tail = ids[:, n0:]
            p = self.parts
            if bool(((tail == p.video_token_id) | (tail == p.image_token_id)).any()):
                return None  # new visual tokens after the prompt: not this prompt's layout
        return pr.layout if reps == 1 else pr.layout.repeat_samples(reps)

    # ---------------------------------------------------------------- one forward
    def on_lm_forward(self, module, args, kwargs) -> None:
        impl = compat.attn_implementation(self.parts.text_config)
        if impl != attn_backend.ATTN_NAME:
            raise RuntimeError(
                f"AdaSpark: the attention implementation of this patched model was changed to {impl!r} "
                "after adaspark.patch(), which would run AdaS-FFN without AdaS-Attn; call handle.remove() "
                "before set_attn_implementation(...), and patch again afterwards"
            )
        emb = kwargs.get("inputs_embeds")
        ref = emb if emb is not None else kwargs.get("input_ids", args[0] if args else None)
        bsz, n = ref.shape[:2]
        cache = compat.find_cache(args, kwargs)
        past = compat.cache_length(cache)
        ids = self._vl_ids if self._vl_ids is not None and self._vl_ids.shape[:2] == (bsz, n) else None
        self._vl_ids = None
        if past:
            seq = self.caches.get(cache)
            if seq is None:
                raise compat.compat_error(
                    f"this forward continues a KV cache of {past} tokens ({type(cache).__name__}) that no "
                    "forward of this patched model filled, so the video layout of its tokens is unknown; "
                    "run the prefill with AdaSpark on"
                )
            covered = 0 if seq.layout is None else seq.layout.cube_ids.shape[1]
            if self._vl_video and past + n > covered and ids is not None:
                new = ids[:, max(0, covered - past) :]
                if bool((new == self.parts.video_token_id).any()):
                    raise ValueError(
                        "AdaSpark cannot add video tokens to a filled KV cache that holds another prompt: "
                        "a video must be part of the prompt's prefill"
                    )
            self.seq = seq
            self.fwd = _Forward(seq=seq, offset=past, length=n, bsz=bsz)
            return
        layout = self._match_prompt(ids, n)
        if layout is None and self._vl_video:
            raise compat.compat_error(
                "the sequence holds video tokens but the video layout could not be read from this call "
                f"or from the running generate() call ({self.adapter.name}). {self.adapter.layout_hint}"
            )
        if layout is not None and layout.cube_ids.shape[0] != bsz:
            raise ValueError(
                f"AdaSpark: the prompt has {layout.cube_ids.shape[0]} samples but the forward {bsz}"
            )
        if layout is not None and layout.spans and self.config.cube_mode == "adaptive":
            layout = self._adaptive(layout, emb)
        seq = _Sequence.build(layout, bsz, ref.device)
        self.seq = seq
        self.fwd = _Forward(seq=seq, offset=0, length=n, bsz=bsz)
        if self.config.budget is not None and seq.index.max_cubes > 0:
            ctl = BudgetController(self.config.budget, self.dims, self.num_layers, self.dense_layers)
            self.fwd.budget = self.budget_last = ctl
            self.budget_p = {}
        if cache is not None:
            self.caches[cache] = seq

    def _adaptive(self, layout: Layout, emb: torch.Tensor | None) -> Layout:
        """The prompt's layout with content-adaptive cubes, from this forward's input embeddings."""
        n0 = layout.cube_ids.shape[1]
        if not isinstance(emb, torch.Tensor) or emb.dim() != 3 or emb.shape[1] < n0:
            got = "none" if not isinstance(emb, torch.Tensor) else f"{emb.shape[1]} of its {n0} tokens"
            raise ValueError(
                "AdaSparkConfig.cube_mode='adaptive' shapes the cubes from the decoder's input embeddings "
                f"of the whole prompt in one forward, but this forward has {got} (a chunked prefill?); "
                "use cube_mode='fixed' there"
            )
        return adaptive_layout(
            layout,
            emb[:, :n0],
            max_cube=self.config.adaptive_max_cube,
            min_cube=self.config.adaptive_min_cube,
        )

    def on_lm_output(self, module, args, kwargs, output) -> None:
        cache = compat.output_cache(output)
        if cache is not None and self.fwd is not None and cache not in self.caches:
            self.caches[cache] = self.fwd.seq

    @property
    def layout(self) -> Layout | None:
        return None if self.seq is None else self.seq.layout

    def _forward(self) -> _Forward:
        if self.fwd is None:
            raise compat.compat_error("a decoder layer ran outside a language-model forward")
        return self.fwd

    # ---------------------------------------------------------------- compute
    def attention(self, module, q, k, v, key_valid, scaling, *, segments=None, want_weights=False):
        li = int(module.layer_idx)
        fwd = self._forward()
        bsz, _, nq, _ = q.shape
        nk = k.shape[2]
        if nk != fwd.offset + nq:
            raise compat.compat_error(
                f"layer {li} got {nk} keys for {nq} queries after a cache of {fwd.offset} tokens: the KV "
                "cache seen by the attention is not the one the forward was given"
            )
        self.rows[li] += bsz * nq
        st = self.attn_stats[li]
        cfg = self.config
        seq = fwd.seq
        ctl = fwd.budget
        if ctl is not None and (li in self.dense_layers or nq != nk or segments is not None or want_weights):
            ctl = None  # budget mode steers whole prefills of the non-dense layers
        if ctl is not None:
            pairs = (
                int(causal_valid_pairs(key_valid, nq).sum())
                if key_valid is not None
                else nq * (nq + 1) // 2 * bsz
            )
            ctl.start(li, rows=bsz * nq, causal_pairs=pairs)
            fwd.budget_open[li] = (Snapshot.take(st, self.ffn_stats[li]), None)
        if li in self.dense_layers or not cfg.sparse_attn or seq.index.max_cubes == 0:
            out = attn_backend.dense_attention(
                q, k, v, scaling, key_valid, segments=segments, want_weights=want_weights, stats=st
            )
            if ctl is not None and not self.sparse_ffn_layer(li):
                self._budget_finish(li, None, None)
            return out
        cube_ids = seq.cube_ids_for(bsz, nk)
        policy = self._attn_policy(li)
        if segments is not None:
            fwd.ran_sparse = True
            return attn_backend.per_segment(
                lambda qs, ks, vs, kv, s, e: self._sparse(
                    qs,
                    ks,
                    vs,
                    _renumber(cube_ids[:, s:e]),
                    kv,
                    scaling,
                    st,
                    want_weights=want_weights,
                    policy=policy,
                ),
                q,
                k,
                v,
                key_valid,
                segments,
                want_weights,
            )
        if nk >= seq.video_end:
            mk = seq.mean_keys.get(li)
            if mk is None and self.cost_model is not None and nq == nk:
                pass  # a prefill the cost model may run dense: the kernel averages the keys if it selects
            elif mk is None:
                with torch.no_grad():
                    mk = cube_mean_keys(k, seq.index)
                seq.mean_keys[li] = mk
                st.mean_key_tokens += int((seq.cube_ids >= 0).sum())
            index = seq.index
        else:  # a chunk of a chunked prefill: the cubes so far, their keys so far
            index = seq.index_for(nk)
            with torch.no_grad():
                mk = cube_mean_keys(k, index)
            st.mean_key_tokens += int((cube_ids >= 0).sum())
        if fwd.offset and not fwd.ran_sparse:
            self.sparse_decode_steps += 1
        fwd.ran_sparse = True
        if ctl is None:
            return self._sparse(q, k, v, cube_ids, key_valid, scaling, st, mk, index, want_weights, policy)
        return self._budget_attention(li, ctl, q, k, v, cube_ids, key_valid, scaling, st, mk, index, policy)

    def _attn_policy(self, li: int) -> SelectionPolicy:
        """AdaS-Attn's policy in layer ``li``: budget mode reuses the last prefill's threshold."""
        p = self.budget_p.get(li, (None, None))[0]
        return self.attn_policy if p is None else dataclasses.replace(self.attn_policy, p=p)

    def _ffn_policy(self, li: int) -> SelectionPolicy:
        p = self.budget_p.get(li, (None, None))[1]
        return self.ffn_policy if p is None else dataclasses.replace(self.ffn_policy, p=p)

    def _budget_attention(self, li, ctl, q, k, v, cube_ids, key_valid, scaling, st, mk, index, policy):
        """A prefill's sparse attention in budget mode: the Top-p threshold whose kernel executes the
        layer's share of the attention work, then the normal sparse attention.

        What a block kernel executes at a threshold is read from its plan (the selection and the
        block pattern, :func:`~adaspark.ops.attention.blocks.plan_blocks`): once at the smallest
        threshold (the floor), then a search (bisection, interpolating once both ends have counts)
        started from the ``C × C`` cube estimate (:func:`~adaspark.ops.attention.cost.cube_estimate`).
        The probes' selection work is reported as the layer's search FLOPs. Paths without a block
        plan use the estimate alone. What the kernel then executed over what its probe said corrects
        the floor and the next layer's aim.
        """
        cfg = self.config
        fwd = self.fwd
        inputs = prepare_inputs(
            q, k, None, cube_ids, policy=policy, scale=scaling, key_mask=key_valid,
            mean_keys=mk, index=index, granularity=cfg.granularity,
        )  # fmt: skip
        est = cube_estimate(q, inputs)
        lay = ctl.layers[li]
        dense_entries = float(inputs.hq * causal_valid_pairs(inputs.key_mask, inputs.nq).sum())
        name = resolve_attention_backend(
            cfg.backend, q.device, q.dtype, prefill=True, granularity=cfg.granularity,
            video_queries=True, num_tokens=inputs.nk, num_queries=inputs.nq,
            flex_min_tokens=cfg.flex_min_tokens,
            needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        )  # fmt: skip
        probes: dict[float, float] = {}
        block = cfg.query_block or BLOCK_SIZES.get(name, 0)
        # the distributions every probe cuts at its threshold, computed once (cube granularity)
        scores = None
        if name in BLOCK_KERNELS and est is not None and cfg.granularity == "cube":
            scores = unit_scores(
                q, inputs.mean_keys, inputs.cube_ids, inputs.key_mask, inputs.index, inputs.scale
            )

        def executed(p: float) -> float:
            if p not in probes:
                pol = dataclasses.replace(policy, p=p)
                if name in BLOCK_KERNELS and est is not None:
                    scratch = AttentionStats(inputs.hq, inputs.d, inputs.hkv)
                    plan = plan_blocks(
                        q, dataclasses.replace(inputs, policy=pol), block=block, stats=scratch, scores=scores
                    )
                    lay.search_flops += selection_flops(
                        self.dims, 0, float(scratch.candidates_sum.sum()), float(scratch.selections.sum())
                    )
                    probes[p] = float(plan.executed)
                elif est is not None:
                    keep = keep_from_probs(est.probs, est.cand.expand_as(est.probs), pol)
                    probes[p] = est.other + float((keep * est.pairs).sum())
                else:
                    probes[p] = dense_entries
            return probes[p]

        p_attn = 1.0
        floor = executed(P_MIN) if est is not None else None
        if est is not None and not ctl.wants_dense(li):
            ids, _ = fwd.ffn_ids(q.device)
            video = int((ids >= 0).sum())
            cubes = int((fwd.seq.index.counts > 0).sum())
            sparse_ffn = self.sparse_ffn_layer(li) and video > 0
            rows = fwd.bsz * fwd.length
            r = ctl.attention_fraction(
                li,
                other_entries=floor,
                candidate_entries=max(dense_entries - floor, 0.0),
                ffn_fixed_rows=rows - video + cubes if sparse_ffn else rows,
                ffn_free_rows=video - cubes if sparse_ffn else 0,
                ffn_overhead=3.0 * self.dims.hidden * video if sparse_ffn else 0.0,
            )
            if r < 1.0:
                want = floor + r * max(dense_entries - floor, 0.0)
                # a kernel may execute other than its plan says (gather: the union of a GQA group's
                # blocks; reference: every entry): aim with the ratio the last layer measured
                guess = top_p_for_fraction(est.probs, est.cand, est.pairs, r)
                # before the first steered layer the kernel's ratio is unknown: search fully
                exact = ctl.ratio_measured and abs(ctl.attn_ratio - 1.0) <= BUDGET_PLAN_TOLERANCE
                steps = BUDGET_SEARCH_STEPS if exact else BUDGET_SEARCH_STEPS_INEXACT
                p_attn = search_threshold(
                    executed, want / ctl.attn_ratio, guess, steps=steps, at_one=dense_entries / ctl.attn_ratio
                )
        policy = dataclasses.replace(policy, p=p_attn)
        before = st.executed
        direct = scores is not None and not policy.keeps_all
        if direct and cfg.dense_fallback is None and self.cost_model is None:
            # what _sparse would run (prepare, plan, kernel), planned from the search's distributions
            final = dataclasses.replace(inputs, policy=policy)
            plan = plan_blocks(q, final, block=block, stats=st, scores=scores)
            out = run_blocks(q, k, v, plan, kernel=BLOCK_KERNELS[name], stats=st)
        else:
            out, _ = self._sparse(q, k, v, cube_ids, key_valid, scaling, st, mk, index, False, policy)
        if floor is not None and p_attn in probes and probes[p_attn] > 0:
            ratio = (st.executed - before) / probes[p_attn]
            ctl.attn_ratio = ratio
            ctl.ratio_measured = True
            # at the smallest threshold the kernel's count is the floor itself
            floor = float(st.executed - before) if p_attn == P_MIN else floor * ratio
        lay.p_attn = p_attn
        snap, _ = fwd.budget_open[li]
        fwd.budget_open[li] = (snap, floor)
        if not self.sparse_ffn_layer(li):
            self._budget_finish(li, None, None)
        return out, None

    def _budget_finish(self, li: int, ffn: FFNStats | None, ffn_min_rows: float | None) -> None:
        fwd = self.fwd
        snap, attn_floor = fwd.budget_open.pop(li)
        lay = fwd.budget.layers[li]
        fwd.budget.finish(
            li,
            attention=snap.attn_delta(self.attn_stats[li]),
            ffn=None if ffn is None else snap.ffn_delta(ffn),
            attn_floor_entries=attn_floor,
            ffn_min_rows=ffn_min_rows,
        )
        self.budget_p[li] = (lay.p_attn, lay.p_ffn)

    def _sparse(
        self, q, k, v, cube_ids, key_valid, scaling, st, mk=None, index=None, want_weights=False, policy=None
    ):
        cfg = self.config
        policy = self.attn_policy if policy is None else policy
        if want_weights:
            # inspection: the reference path, and the probabilities of what it attended
            out = cube_sparse_attention(
                q, k, v, cube_ids, policy=policy, scale=scaling, key_mask=key_valid,
                backend="reference", mean_keys=mk, index=index, stats=st, granularity=cfg.granularity,
            )  # fmt: skip
            keep = reference_attention_mask(
                q, k, cube_ids, policy=policy, scale=scaling,
                key_mask=key_valid, mean_keys=mk, index=index, granularity=cfg.granularity,
            )  # fmt: skip
            w = attn_backend.causal_weights(q, k, scaling, keep=keep, key_valid=key_valid)
            return out, w.to(q.dtype)
        backend = backend_after_cache(cfg.backend, q.shape[2], k.shape[2])
        out = cube_sparse_attention(
            q,
            k,
            v,
            cube_ids,
            policy=policy,
            scale=scaling,
            key_mask=key_valid,
            backend=backend,
            mean_keys=mk,
            index=index,
            stats=st,
            cost_model=self.cost_model,
            **cfg.attention_options(),
        )
        return out, None

    def keep_residual(self, li: int, x: torch.Tensor) -> None:
        if self.fwd is not None:
            self.fwd.residual[li] = x

    def ffn(self, li: int, dense_forward, h: torch.Tensor) -> torch.Tensor:
        fwd = self.fwd
        x = None if fwd is None else fwd.residual.pop(li, None)
        bsz, n = h.shape[:2]
        st = self.ffn_stats[li]
        ids = index = None
        if x is not None and h.dim() == 3 and fwd.seq.index.max_cubes > 0 and n == fwd.length:
            ids, index = fwd.ffn_ids(h.device)
            if index is None:
                ids = None
        budget = fwd is not None and li in fwd.budget_open
        if ids is None:
            st.tokens += bsz * n
            st.ffn_rows += bsz * n
            out = dense_forward(h)
            if budget:
                self._budget_finish(li, st, None)
            return out
        scores = token_scores(x)
        policy = self._ffn_policy(li)
        min_rows = None
        if budget:
            ctl = fwd.budget
            probs, valid = cube_token_probs(scores, index)
            nonvideo, video = int((ids < 0).sum()), int((ids >= 0).sum())
            min_rows = nonvideo + int(valid.any(-1).sum())
            p_ffn = 1.0
            if not ctl.wants_dense(li):
                snap, _ = fwd.budget_open[li]
                f = ctl.ffn_fraction(
                    li,
                    attention=snap.attn_delta(self.attn_stats[li]),
                    nonvideo_rows=nonvideo,
                    video_tokens=video,
                )
                n_valid = int(valid.sum())
                share = f * video / n_valid if n_valid else 1.0
                if share < 1.0:
                    p_ffn = top_p_for_fraction(probs, valid, 1.0, share)
            policy = dataclasses.replace(policy, p=p_ffn)
            ctl.layers[li].p_ffn = p_ffn
        out = cube_sparse_ffn(
            h,
            dense_forward,
            ids,
            policy=policy,
            scores=scores,
            mean_compensation=self.config.mean_compensation,
            backend=self.config.backend,
            index=index,
            stats=st,
            ffn_sum_chunk=self.config.ffn_sum_chunk,
        )
        if budget:
            self._budget_finish(li, st, min_rows)
        return out

    # ---------------------------------------------------------------- FLOPs of the rest
    def vision_pre(self, module, args, kwargs) -> None:
        key = self.adapter.vision_key(module, args, kwargs)
        mode = None
        if key is None or key not in _VISION_FLOPS_CACHE.get(module, {}):
            # count once per call key (FlopCounterMode adds dispatch overhead to every op)
            mode = FlopCounterMode(display=False)
            mode.__enter__()
        self._vision_calls[id(module)] = (mode, key)

    def vision_post(self, module, args, kwargs, output) -> None:
        mode, key = self._vision_calls.pop(id(module), (None, None))
        cache = _VISION_FLOPS_CACHE.setdefault(module, {})
        if mode is not None:
            mode.__exit__(None, None, None)
            flops = float(mode.get_total_flops())
            if key is not None:
                cache[key] = flops
        elif key in cache:
            flops = cache[key]
        else:
            return  # the pre-hook did not run for this call
        self.vision_flops += flops

    def lm_head_post(self, module, args, output) -> None:
        x = args[0]
        rows = x.numel() // x.shape[-1]
        self.lm_head_flops += 2.0 * rows * module.in_features * module.out_features

    # ---------------------------------------------------------------- report
    def report(self) -> Report:
        return build_report(
            self.dims,
            self.attn_stats,
            self.ffn_stats,
            self.rows,
            sparse_layers={i for i in range(self.num_layers) if i not in self.dense_layers},
            sparse_ffn_layers={i for i in range(self.num_layers) if self.sparse_ffn_layer(i)},
            vision_flops=self.vision_flops,
            lm_head_flops=self.lm_head_flops,
            video_tokens=self.layout.num_video_tokens if self.layout is not None else 0,
            forward_calls=self.calls,
            decode_steps=self.decode_steps,
            sparse_decode_steps=self.sparse_decode_steps,
            budget=self.config.budget,
            budget_floor=None if self.budget_last is None else self.budget_last.floor_fraction,
            budget_search_flops=0.0 if self.budget_last is None else self.budget_last.search_flops,
            thresholds=self.budget_p,
        )


def _renumber(cube_ids: torch.Tensor) -> torch.Tensor:
    """Cube ids of a slice renumbered ``0 .. C-1`` per row (in order of appearance), -1 kept."""
    out = cube_ids.clone()
    for b in range(cube_ids.shape[0]):
        row = cube_ids[b]
        vid = row >= 0
        if bool(vid.any()):
            _, inv = torch.unique(row[vid], return_inverse=True)
            out[b, vid] = inv
    return out


class _SparseMLPForward:
    """Instance-level ``forward`` of one MLP: AdaS-FFN through the model's state."""

    def __init__(self, state: _State, layer_idx: int, dense_forward) -> None:
        self.state = state
        self.layer_idx = layer_idx
        self.dense_forward = dense_forward

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.state.ffn(self.layer_idx, self.dense_forward, hidden_states)


class AdaSparkHandle:
    """What :func:`patch` returns: ``report()`` for the last call, ``remove()`` to undo the patch.

    Also a context manager: ``with adaspark.patch(model, cfg) as h: ...`` removes on exit.
    """

    def __init__(self, state: _State, undo: list) -> None:
        self._state: _State | None = state
        self._undo = undo
        self.config = state.config

    @property
    def active(self) -> bool:
        return self._state is not None

    @property
    def layout(self) -> Layout | None:
        """The cube layout of the current sequence (None without video)."""
        return None if self._state is None else self._state.layout

    def report(self) -> Report:
        """FLOPs and sparsity of the last forward / generate call."""
        return self._live().report()

    def record_selections(self, on: bool = True) -> None:
        """Keep (``on``) the cube selection every sparse attention call uses, from the next call on
        (memory: one selection table per layer and call)."""
        st = self._live()
        st.record_selection = bool(on)
        for stats in st.attn_stats.values():
            stats.record = bool(on)

    def selections(self) -> dict[int, list]:
        """The selections the kernels used in the last call, per layer (with :meth:`record_selections`):
        :class:`~adaspark.ops.attention.units.Selection` objects, in call order."""
        return {i: list(s.selections_log) for i, s in self._live().attn_stats.items()}

    def _live(self) -> _State:
        if self._state is None:
            raise RuntimeError("this AdaSpark handle has been removed; patch the model again")
        return self._state

    def remove(self) -> None:
        """Restore the model exactly (idempotent)."""
        if self._state is None:
            return
        for fn in reversed(self._undo):
            fn()
        self._undo = []
        model = self._state.parts.model
        if _PATCHED.get(model) is self:
            del _PATCHED[model]
        self._state = None

    def __enter__(self) -> AdaSparkHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        status = "active" if self.active else "removed"
        return f"AdaSparkHandle({status}, {self.config!r})"


def _check_structure(parts: ModelParts, adapter: ModelAdapter) -> None:
    """Every module a hook goes on exists (else the patch would silently do less)."""
    missing = []
    for i, layer in enumerate(parts.layers):
        for name in ("self_attn", "mlp", "post_attention_layernorm"):
            if not isinstance(getattr(layer, name, None), torch.nn.Module):
                missing.append(f"layers[{i}].{name}")
        if not hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            missing.append(f"layers[{i}].self_attn.layer_idx")
    if missing:
        raise compat.compat_error(
            f"the {adapter.name} decoder lacks what AdaSpark hooks into: {', '.join(missing[:4])}"
        )
    compat.cache_keyword(parts.language_model)


def patch(model: torch.nn.Module, config: AdaSparkConfig | None = None) -> AdaSparkHandle:
    """Switch AdaSpark on for a supported Video-LLM (prefill and decoding).

    Patching an already patched model first removes the earlier patch, so the result is always
    that of one patch with ``config``.

    Args:
        model: a transformers 5.x model of a supported family —
            ``Qwen2_5_VLForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
            ``Qwen3VLForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration`` or their
            ``*Model`` backbones (``adaspark.integrations.transformers.adapters.ADAPTERS``). Any other
            model raises ``ValueError`` listing the supported ones.
        config: settings (default :class:`~adaspark.config.AdaSparkConfig()`).

    Returns:
        An :class:`AdaSparkHandle`.

    Raises:
        ValueError: an unsupported model or an option the family cannot honour.
        TransformersCompatError: the installed transformers lacks a surface AdaSpark needs (the
            message names the version and the tested range; outside that range ``patch`` also warns
            once).
    """
    if config is None:
        config = AdaSparkConfig()
    if not isinstance(config, AdaSparkConfig):
        raise ValueError(f"config must be an AdaSparkConfig, got {type(config).__name__}")
    adapter = get_adapter(model)
    parts = adapter.find_parts(model)
    adapter.check(config, parts)
    compat.check_version()
    _check_structure(parts, adapter)
    n_layers = len(parts.layers)
    bad = [i for i in config.dense_layers if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"AdaSparkConfig.dense_layers {bad} out of range for a model with {n_layers} layers")
    old = _PATCHED.get(model)
    if old is not None:
        old.remove()
    attn_backend.register()
    state = _State(config, parts, adapter)
    undo: list = []

    tc = parts.text_config
    prev_impl = compat.attn_implementation(tc)
    compat.set_attn_implementation(tc, attn_backend.ATTN_NAME)
    undo.append(lambda: compat.set_attn_implementation(tc, prev_impl))

    hooks = [
        parts.vl.register_forward_pre_hook(_eager(state.on_vl_forward), with_kwargs=True),
        parts.language_model.register_forward_pre_hook(_eager(state.on_lm_forward), with_kwargs=True),
        parts.language_model.register_forward_hook(_eager(state.on_lm_output), with_kwargs=True),
    ]
    adapter.install(state, parts, undo, hooks)
    for module in parts.vision:
        hooks.append(module.register_forward_pre_hook(_eager(state.vision_pre), with_kwargs=True))
        hooks.append(
            module.register_forward_hook(_eager(state.vision_post), with_kwargs=True, always_call=True)
        )
    if isinstance(parts.lm_head, torch.nn.Linear):
        hooks.append(parts.lm_head.register_forward_hook(_eager(state.lm_head_post)))

    gen = getattr(model, "generate", None)
    if callable(gen):
        original_generate = gen

        def generate(*args, **kwargs):
            bound = state.on_generate(args, kwargs, original_generate)
            state.in_generate = True
            _RUNNING_GENERATES.append(bound)
            try:
                return original_generate(*args, **kwargs)
            finally:
                state.in_generate = False
                _RUNNING_GENERATES.remove(bound)

        set_instance_attr(model, "generate", generate, undo)

    for i, layer in enumerate(parts.layers):
        attn = layer.self_attn
        attn_backend.route(attn, state)
        undo.append(partial(attn_backend.unroute, attn))
        if not state.sparse_ffn_layer(i):
            continue
        mlp = layer.mlp

        def keep_residual(module, args, i=i):
            state.keep_residual(i, args[0])

        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(_eager(keep_residual)))
        dense_forward = mlp.__dict__.get("forward", partial(type(mlp).forward, mlp))
        sparse_forward = _SparseMLPForward(state, i, dense_forward)
        set_instance_attr(mlp, "forward", _eager(sparse_forward.__call__), undo)
    undo.extend(h.remove for h in hooks)
    handle = AdaSparkHandle(state, undo)
    _PATCHED[model] = handle
    return handle
