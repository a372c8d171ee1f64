"""The AdaSpark mechanism inside Hugging Face transformers, shared by every supported family.

What :func:`patch` changes, all per instance and undone by ``handle.remove()``:

* the text config's attention implementation becomes ``"adaspark"`` (registered in
  ``AttentionInterface`` and ``AttentionMaskInterface``); each decoder attention module is routed
  to this model's state;
* the family's adapter (``adaspark.integrations.transformers.adapters``) hooks the place where the
  video layout can be read (Qwen-VL: the M-RoPE index, ``get_rope_index``; LLaVA-OneVision: the
  backbone's inputs) — this also works inside ``generate``, which drops the video inputs later on;
* each sparse layer's MLP gets an instance-level ``forward`` running AdaS-FFN, and a pre-hook on
  its ``post_attention_layernorm`` captures the residual stream that ranks the tokens;
* hooks count the vision modules' FLOPs (``FlopCounterMode``) and the LM head's.

No parameter, buffer or state-dict key is touched.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from adaspark.config import AdaSparkConfig
from adaspark.core.accounting import LayerDims, LayerReport, Report, layer_flops
from adaspark.core.layout import Layout
from adaspark.integrations.transformers import attention as attn_backend
from adaspark.integrations.transformers.adapters import (
    SUPPORTED_MODEL_TYPES,
    ModelAdapter,
    ModelParts,
    get_adapter,
)
from adaspark.integrations.transformers.adapters.base import set_instance_attr
from adaspark.ops.attention import AttentionStats, cube_sparse_attention, dense_causal_attention
from adaspark.ops.cubes import CubeIndex, build_cube_index, cube_mean_keys
from adaspark.ops.ffn import FFNStats, cube_sparse_ffn, token_scores

__all__ = ["SUPPORTED_MODEL_TYPES", "AdaSparkHandle", "patch"]

#: model -> live handle (so that patching twice replaces the first patch)
_PATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: vision module -> {call key: FLOPs} measured once with FlopCounterMode
_VISION_FLOPS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Sequence:
    """One prefilled batch of sequences: its layout, cube index and cached cube mean keys."""

    input_ids: torch.Tensor | None
    layout: Layout | None
    cube_ids: torch.Tensor
    index: CubeIndex
    mean_keys: dict


def _past_length(past_key_values) -> int:
    if past_key_values is None:
        return 0
    try:
        return int(past_key_values.get_seq_length())
    except (AttributeError, TypeError):
        return 0


class _State:
    """Per-model AdaSpark state: current layout, cached cube mean keys, counters."""

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
        self.pending: tuple[torch.Tensor, Layout] | None = None
        #: the sequence being processed: layout, cube index and cached mean keys
        self.seq: _Sequence | None = None
        #: KV cache -> the sequence it holds (decoding picks the sequence by its cache)
        self.caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.residual: dict[int, torch.Tensor] = {}
        self.offset = 0
        self.in_generate = False
        #: the running ``generate`` call prefills in chunks (``prefill_chunk_size``)
        self.chunked_prefill = False
        self._fwd_ids: torch.Tensor | None = None
        self._expect_video = False
        #: vision module -> (its FlopCounterMode or None, its call key) while it runs
        self._vision_calls: dict[int, tuple[FlopCounterMode | None, tuple | None]] = {}
        self.reset_stats()

    # ---------------------------------------------------------------- counters
    def reset_stats(self) -> None:
        d = self.dims
        self.attn_stats = {i: AttentionStats(d.heads, d.head_dim, d.kv_heads) for i in range(self.num_layers)}
        self.ffn_stats = {i: FFNStats() for i in range(self.num_layers)}
        self.rows = dict.fromkeys(range(self.num_layers), 0)
        self.vision_flops = 0.0
        self.lm_head_flops = 0.0
        self.calls = 0

    def sparse_ffn_layer(self, i: int) -> bool:
        return self.config.sparse_ffn and i not in self.dense_layers

    # ---------------------------------------------------------------- layout
    def set_pending(self, input_ids: torch.Tensor, layout: Layout) -> None:
        """Called by the adapter's layout capture: the layout of the prefill ``input_ids`` to come."""
        self.pending = (input_ids, layout)

    def on_generate(self, kwargs: dict) -> None:
        """Start of a ``generate`` call: one report covers it (prefill and every decode step)."""
        self.reset_stats()
        gc = kwargs.get("generation_config") or getattr(self.parts.model, "generation_config", None)
        chunk = kwargs.get("prefill_chunk_size", getattr(gc, "prefill_chunk_size", None))
        self.chunked_prefill = chunk is not None

    def on_vl_forward(self, module, args, kwargs) -> None:
        past = _past_length(kwargs.get("past_key_values"))
        if past == 0 and not self.in_generate:
            self.reset_stats()  # a new call
        self.calls += 1
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        types = kwargs.get("mm_token_type_ids")
        p = self.parts
        self._fwd_ids = input_ids
        expect = (input_ids is not None and bool((input_ids == p.video_token_id).any())) or (
            types is not None and bool((types == 2).any())
        )
        if self.config.images_as_video:
            expect = expect or (input_ids is not None and bool((input_ids == p.image_token_id).any()))
        self._expect_video = expect

    def on_lm_forward(self, module, args, kwargs) -> None:
        emb = kwargs.get("inputs_embeds")
        ref = emb if emb is not None else kwargs.get("input_ids", args[0] if args else None)
        bsz, n = ref.shape[:2]
        cache = kwargs.get("past_key_values")
        self.residual = {}
        if _past_length(cache):
            seq = self.caches.get(cache)
            if seq is None:
                raise ValueError(
                    "AdaSpark: past_key_values was not filled by a prefill of this patched model, so the "
                    "video layout of its tokens is unknown; run the prefill with AdaSpark on"
                )
            if seq is not self.seq and not self.in_generate:
                self.reset_stats()  # continuing another sequence: a new call
                self.calls = 1
            self.seq = seq
            return
        self.seq = self._new_sequence(bsz, n, ref.device)
        if cache is not None:
            self.caches[cache] = self.seq

    def on_lm_output(self, module, args, kwargs, output) -> None:
        cache = getattr(output, "past_key_values", None)
        if cache is not None and self.seq is not None and cache not in self.caches:
            self.caches[cache] = self.seq

    def _new_sequence(self, bsz: int, n: int, device) -> _Sequence:
        """Resolve the layout of a prefill of ``bsz × n`` tokens."""
        ids = self._fwd_ids
        layout = None
        pend_ids, pend_layout = self.pending if self.pending is not None else (None, None)
        if pend_layout is not None and ids is not None and ids.shape[0] % pend_ids.shape[0] == 0:
            reps = ids.shape[0] // pend_ids.shape[0]
            want = pend_ids.to(ids.device)
            if reps > 1:
                want = want.repeat_interleave(reps, dim=0)
            if want.shape == ids.shape and torch.equal(want, ids):
                # the ids the M-RoPE index was computed for (expanded by generate for
                # num_return_sequences / beams)
                layout = pend_layout if reps == 1 else pend_layout.repeat_samples(reps)
        if layout is None and self.seq is not None and self.seq.input_ids is not None and ids is not None:
            prev = self.seq.input_ids
            n0 = prev.shape[1]
            tail = ids[:, n0:]
            if (
                prev.shape[0] == bsz
                and n0 <= n
                and torch.equal(ids[:, :n0], prev.to(ids.device))
                and not bool(
                    ((tail == self.parts.video_token_id) | (tail == self.parts.image_token_id)).any()
                )
                and self.seq.layout is not None
            ):
                # the previous sequence plus text (generate without a cache re-runs the whole prompt)
                layout = self.seq.layout.extend_to(n)
        if layout is None and self._expect_video:
            if pend_ids is not None and pend_ids.shape[1] > n:
                raise ValueError(
                    "AdaSpark does not support chunked prefill (generate(prefill_chunk_size=...)): "
                    f"the prompt has {pend_ids.shape[1]} tokens but this forward got {n}"
                )
            raise ValueError(
                "AdaSpark could not capture the video layout of this input: the sequence holds video "
                f"tokens but the {self.adapter.name} model did not receive what describes them. "
                f"{self.adapter.layout_hint}"
            )
        self.pending = None
        cube_ids = (
            layout.cube_ids.to(device)
            if layout is not None
            else torch.full((bsz, n), -1, dtype=torch.long, device=device)
        )
        return _Sequence(
            input_ids=ids, layout=layout, cube_ids=cube_ids, index=build_cube_index(cube_ids), mean_keys={}
        )

    @property
    def layout(self) -> Layout | None:
        return None if self.seq is None else self.seq.layout

    def cube_ids_for(self, bsz: int, nk: int, device) -> torch.Tensor:
        seq = self.seq
        if seq is None:
            return torch.full((bsz, nk), -1, dtype=torch.long, device=device)
        if seq.cube_ids.shape[0] != bsz:
            raise ValueError(
                f"AdaSpark: batch size changed from {seq.cube_ids.shape[0]} to {bsz} within one sequence"
            )
        n0 = seq.cube_ids.shape[1]
        if nk < n0:
            raise ValueError(f"AdaSpark: key length {nk} is shorter than the prefilled sequence {n0}")
        if nk == n0:
            return seq.cube_ids
        return torch.cat([seq.cube_ids, seq.cube_ids.new_full((bsz, nk - n0), -1)], dim=1)

    def has_cubes(self) -> bool:
        return self.seq is not None and self.seq.index.max_cubes > 0

    # ---------------------------------------------------------------- compute
    def attention(self, module, q, k, v, key_valid, scaling):
        li = int(module.layer_idx)
        bsz, _, nq, _ = q.shape
        nk = k.shape[2]
        self.rows[li] += bsz * nq
        self.offset = nk - nq
        st = self.attn_stats[li]
        cfg = self.config
        if li in self.dense_layers or not cfg.sparse_attn or not self.has_cubes():
            return dense_causal_attention(q, k, v, scale=scaling, key_mask=key_valid, stats=st)
        cube_ids = self.cube_ids_for(bsz, nk, q.device)
        seq = self.seq
        mk = seq.mean_keys.get(li)
        if mk is None:
            with torch.no_grad():
                mk = cube_mean_keys(k, seq.index)
            seq.mean_keys[li] = mk
            st.mean_key_tokens += int((seq.cube_ids >= 0).sum())
        return cube_sparse_attention(
            q,
            k,
            v,
            cube_ids,
            policy=self.attn_policy,
            scale=scaling,
            key_mask=key_valid,
            backend=cfg.backend,
            mean_keys=mk,
            index=seq.index,
            stats=st,
            query_block=cfg.query_block,
            granularity=cfg.granularity,
            dense_fallback=cfg.dense_fallback,
        )

    def ffn(self, li: int, dense_forward, h: torch.Tensor) -> torch.Tensor:
        x = self.residual.pop(li, None)
        bsz, n = h.shape[:2]
        st = self.ffn_stats[li]
        ids = None
        if x is not None and self.has_cubes() and h.dim() == 3:
            ids = self.cube_ids_for(bsz, self.offset + n, h.device)[:, self.offset : self.offset + n]
            if not bool((ids >= 0).any()):
                ids = None
        if ids is None:
            st.tokens += bsz * n
            st.ffn_rows += bsz * n
            return dense_forward(h)
        index = self.seq.index if (self.offset == 0 and n == self.seq.index.seq_len) else None
        return cube_sparse_ffn(
            h,
            dense_forward,
            ids,
            policy=self.ffn_policy,
            scores=token_scores(x),
            mean_compensation=self.config.mean_compensation,
            backend=self.config.backend,
            index=index,
            stats=st,
        )

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
        layers = []
        tot_d = tot_s = tot_i = 0.0
        for i in range(self.num_layers):
            st = self.attn_stats[i]
            sparse = i not in self.dense_layers
            ffn = self.ffn_stats[i] if self.sparse_ffn_layer(i) else None
            fd, fs, fi, bd = layer_flops(self.dims, self.rows[i], st, ffn, sparse=sparse)
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
                )
            )
        extra = self.vision_flops + self.lm_head_flops
        return Report(
            layers=layers,
            flops_dense=tot_d + extra,
            flops_sparse=tot_s + extra,
            flops_sparse_ideal=tot_i + extra,
            llm_flops_dense=tot_d,
            llm_flops_sparse=tot_s,
            llm_flops_sparse_ideal=tot_i,
            vision_flops=self.vision_flops,
            lm_head_flops=self.lm_head_flops,
            tokens=self.rows[0] if self.num_layers else 0,
            video_tokens=self.layout.num_video_tokens if self.layout is not None else 0,
            forward_calls=self.calls,
        )


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
        if self._state is None:
            raise RuntimeError("this AdaSpark handle has been removed; patch the model again")
        return self._state.report()

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
    """
    if config is None:
        config = AdaSparkConfig()
    if not isinstance(config, AdaSparkConfig):
        raise ValueError(f"config must be an AdaSparkConfig, got {type(config).__name__}")
    adapter = get_adapter(model)
    parts = adapter.find_parts(model)
    adapter.check(config, parts)
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
    prev_impl = tc._attn_implementation
    tc._attn_implementation = attn_backend.ATTN_NAME
    undo.append(lambda: setattr(tc, "_attn_implementation", prev_impl))

    hooks = [
        parts.vl.register_forward_pre_hook(state.on_vl_forward, with_kwargs=True),
        parts.language_model.register_forward_pre_hook(state.on_lm_forward, with_kwargs=True),
        parts.language_model.register_forward_hook(state.on_lm_output, with_kwargs=True),
    ]
    adapter.install(state, parts, undo, hooks)
    for module in parts.vision:
        hooks.append(module.register_forward_pre_hook(state.vision_pre, with_kwargs=True))
        hooks.append(module.register_forward_hook(state.vision_post, with_kwargs=True, always_call=True))
    if isinstance(parts.lm_head, torch.nn.Linear):
        hooks.append(parts.lm_head.register_forward_hook(state.lm_head_post))

    gen = getattr(model, "generate", None)
    if callable(gen) and hasattr(model, "_prepare_position_ids_for_generation"):
        original_generate = gen

        def generate(*args, **kwargs):
            state.on_generate(kwargs)
            state.in_generate = True
            try:
                return original_generate(*args, **kwargs)
            finally:
                state.in_generate = False
                state.chunked_prefill = False

        set_instance_attr(model, "generate", generate, undo)

    for i, layer in enumerate(parts.layers):
        attn = layer.self_attn
        attn_backend.route(attn, state)
        undo.append(partial(attn_backend.unroute, attn))
        if not state.sparse_ffn_layer(i):
            continue
        mlp = layer.mlp

        def keep_residual(module, args, i=i):
            state.residual[i] = args[0]

        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(keep_residual))
        dense_forward = mlp.__dict__.get("forward", partial(type(mlp).forward, mlp))
        set_instance_attr(mlp, "forward", _SparseMLPForward(state, i, dense_forward), undo)
    undo.extend(h.remove for h in hooks)
    handle = AdaSparkHandle(state, undo)
    _PATCHED[model] = handle
    return handle
