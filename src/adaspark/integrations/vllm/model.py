"""The AdaSpark model class for vLLM: Qwen2.5-VL whose video prompts run AdaS-Attn and AdaS-FFN.

:class:`AdaSparkQwen2_5_VLForConditionalGeneration` is vLLM's own ``Qwen2_5_VLForConditionalGeneration``
(same weights, processor and multimodal pipeline; registered under its own architecture name by
:func:`adaspark.integrations.vllm.register`) with four changes, all made per instance:

* ``get_mrope_input_positions`` returns transformers' M-RoPE positions
  (:mod:`adaspark.integrations.vllm.positions`), so a model trained with transformers sees the
  positions it was trained with;
* ``embed_input_ids`` keeps the step's token ids (which rows are video) for the forward;
* each decoder layer's attention implementation is wrapped (:class:`AdaSparkAttentionImpl`): vLLM's
  kernel writes the paged KV cache and attends every request as before; then the rows of each
  whole-prompt video prefill are replaced by AdaS-Attn over that prompt's keys
  (:func:`adaspark.ops.cube_sparse_attention`), and the prompt's cube mean keys are kept beside
  the paged cache (a :class:`~adaspark.integrations.vllm.step.VideoContext` per request in the
  model's :class:`~adaspark.integrations.vllm.step.DecodeStore`); the rows of each later decode
  step of that request are replaced by AdaS-Attn too: the new query selects its Top-p cubes from
  those mean keys and attends the kept cubes and every text position, with the request's K/V read
  from vLLM's paged cache through its block table (the same call as transformers' sparse decoding,
  so the ``decode`` backend or what ``backend`` names);
* each decoder layer's MLP runs AdaS-FFN with mean compensation on those rows
  (:func:`adaspark.ops.cube_sparse_ffn`), scored by the residual stream entering the FFN sub-layer.

Text requests (prefill and decoding) run vLLM's kernels unchanged. A request's video context is
dropped at the first step that does not run it (it finished) or that starts a new prompt under its
KV blocks, and its decoding is then reported (a ``"kind": "decode"`` record); the store holds at
most the requests of the last step. The paged cache is read in the layout of vLLM's CPU attention
(checked once per layer against the keys written; another layout leaves that layer's decoding
dense, with a warning).
The settings are an :class:`~adaspark.config.AdaSparkConfig` given as the ``adaspark`` entry of
``hf_overrides`` (:func:`adaspark.integrations.vllm.hf_overrides`); an invalid field, chunked
prefill, prefix caching, tensor/pipeline parallelism or ``images_as_video`` stop the engine at start
with one error line.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from functools import partial

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.utils import extract_layer_index
from vllm.multimodal import MULTIMODAL_REGISTRY

from adaspark.config import AdaSparkConfig
from adaspark.core.accounting import LayerDims
from adaspark.integrations.vllm.options import OPTIONS_KEY, read_options
from adaspark.integrations.vllm.paged import read_paged_kv
from adaspark.integrations.vllm.positions import transformers_mrope_positions
from adaspark.integrations.vllm.step import (
    DecodeStore,
    SparseDecode,
    Step,
    VideoContext,
    plan_step,
    record_dense_attention,
)
from adaspark.ops.attention import backend_after_cache, cube_sparse_attention
from adaspark.ops.cubes import cube_mean_keys
from adaspark.ops.ffn import cube_sparse_ffn, token_scores

__all__ = ["AdaSparkAttentionImpl", "AdaSparkQwen2_5_VLForConditionalGeneration"]

#: under vLLM's logger, so the lines appear in its log (with its format and level)
logger = logging.getLogger("vllm.adaspark")

#: reports kept in memory per model (``model.adaspark_reports``; read them with ``LLM.apply_model``)
KEEP_REPORTS = 1024


class _Runtime:
    """What one model instance shares with its wrapped attention and MLP modules."""

    def __init__(self, config: AdaSparkConfig, dims: LayerDims, num_layers: int, merge: int, video_id: int):
        self.config = config
        self.dims = dims
        self.num_layers = num_layers
        self.merge = merge
        self.video_id = video_id
        self.dense_layers = {i for i in range(num_layers) if config.is_dense_layer(i, num_layers)}
        self.attn_policy = config.attn_policy()
        self.ffn_policy = config.ffn_policy()
        #: token ids of the step being embedded / run (set by embed_input_ids)
        self.input_ids: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.step: Step | None = None
        #: the video contexts of the live requests (what their decoding needs)
        self.store = DecodeStore()
        #: layer -> whether its paged KV cache reads back as written (AdaSparkAttentionImpl._cache_readable)
        self.cache_checked: dict[int, bool] = {}

    @property
    def attn_keeps_all(self) -> bool:
        return self.attn_policy.keeps_all and self.config.backend == "auto"

    def plan(self, attn_metadata) -> Step | None:
        """The step's plan, made once from the first attention layer's metadata."""
        if self.step is None and self.input_ids is not None and self.positions is not None:
            qsl = getattr(attn_metadata, "query_start_loc", None)
            lens = getattr(attn_metadata, "seq_lens", None)
            if qsl is None or lens is None:
                return None
            ids = self.input_ids[: int(qsl[-1])].cpu()
            table = getattr(attn_metadata, "block_table", None)
            keys = table[: qsl.numel() - 1, 0].cpu() if isinstance(table, torch.Tensor) else None
            self.step = plan_step(
                video_rows=ids == self.video_id,
                positions=self.positions.cpu(),
                query_start_loc=qsl.cpu(),
                seq_lens=lens.cpu()[: qsl.numel() - 1],
                input_ids=ids,
                config=self.config,
                merge=self.merge,
                num_layers=self.num_layers,
                dims=self.dims,
                store=self.store,
                keys=keys,
            )
        return self.step


class AdaSparkAttentionImpl:
    """vLLM's attention implementation of one layer, followed by AdaS-Attn on the rows of video
    prefills and of the decode steps after them.

    vLLM calls ``do_kv_cache_update`` (the paged cache write) and ``forward``; both run the wrapped
    implementation first, so the KV cache and every row of other requests are exactly vLLM's.
    """

    def __init__(self, inner, runtime: _Runtime, layer_idx: int) -> None:
        self._inner = inner
        self._runtime = runtime
        self._layer_idx = layer_idx

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = self._inner.forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        rt = self._runtime
        step = rt.plan(attn_metadata) if attn_metadata is not None else None
        if step is None or not (step.prefills or step.decodes):
            return out
        li = self._layer_idx
        cfg = rt.config
        dense = li in rt.dense_layers or not cfg.sparse_attn or rt.attn_keeps_all
        for pf in step.prefills:
            st = pf.attn_stats[li]
            if dense or pf.index.max_cubes == 0:
                record_dense_attention(st, pf.length, key.shape[1])
                continue
            s, e = pf.start, pf.end
            q = query[s:e].transpose(0, 1).unsqueeze(0)
            k = key[s:e].transpose(0, 1).unsqueeze(0)
            v = value[s:e].transpose(0, 1).unsqueeze(0)
            with torch.no_grad():
                mk = cube_mean_keys(k, pf.index)
            st.mean_key_tokens += pf.video_tokens  # what the kernel counts when it averages itself
            if self._cache_readable(kv_cache, attn_metadata, pf, k, v):
                pf.context.mean_keys[li] = mk
            o = cube_sparse_attention(
                q,
                k,
                v,
                pf.cube_ids,
                policy=rt.attn_policy,
                scale=self._inner.scale,
                backend=cfg.backend,
                mean_keys=mk,
                index=pf.index,
                stats=st,
                **cfg.attention_options(),
            )
            output[s:e] = o[0].transpose(0, 1).to(output.dtype)
        for sd in step.decodes:
            self._decode(sd, query, kv_cache, attn_metadata, output)
        return output

    def _decode(self, sd: SparseDecode, query, kv_cache, attn_metadata, output) -> None:
        """AdaS-Attn for the rows of one request decoding after its video prompt: the Top-p cubes
        of the stored cube mean keys, attended with the request's K/V read from the paged cache."""
        rt = self._runtime
        cfg = rt.config
        ctx = sd.context
        li = self._layer_idx
        st = ctx.attn_stats[li]
        nq = sd.end - sd.start
        mk = ctx.mean_keys.get(li)
        hkv = self._inner.num_kv_heads
        if mk is None:  # a dense layer (or one whose prefill kept everything): vLLM's rows stay
            record_dense_attention(st, nq, hkv, past=sd.seq_len - nq)
            return
        k, v = read_paged_kv(kv_cache, attn_metadata.block_table[sd.request], sd.seq_len)
        q = query[sd.start : sd.end].transpose(0, 1).unsqueeze(0)
        o = cube_sparse_attention(
            q,
            k,
            v,
            ctx.cube_ids_for(sd.seq_len).to(q.device),
            policy=rt.attn_policy,
            scale=self._inner.scale,
            backend=backend_after_cache(cfg.backend, nq, sd.seq_len),
            mean_keys=mk,
            index=ctx.index,
            stats=st,
            **cfg.attention_options(),
        )
        output[sd.start : sd.end] = o[0].transpose(0, 1).to(output.dtype)

    def _cache_readable(self, kv_cache, attn_metadata, pf, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether this layer's paged KV cache reads back as the keys just written (checked once
        per layer on the first video prefill). Where it does not (another attention backend's
        layout), the layer keeps no mean keys and its decoding stays dense, with one warning."""
        rt = self._runtime
        li = self._layer_idx
        ok = rt.cache_checked.get(li)
        if ok is None:
            table = getattr(attn_metadata, "block_table", None)
            try:
                got_k, got_v = read_paged_kv(kv_cache, table[pf.request], pf.length)
                ok = bool(torch.equal(got_k, k)) and bool(torch.equal(got_v, v))
            except (RuntimeError, TypeError, IndexError, ValueError):
                ok = False
            rt.cache_checked[li] = ok
            if not ok:
                logger.warning(
                    "AdaSpark: layer %d's KV cache (%s, shape %s) does not read back in the layout "
                    "AdaSpark reads (vLLM's CPU attention, ISA vec / vec16); decoding after a video "
                    "prompt stays dense in this layer",
                    li, type(self._inner).__name__, tuple(getattr(kv_cache, "shape", ())),
                )  # fmt: skip
        return ok


class _SparseMLP:
    """Instance-level ``forward`` of one decoder MLP: AdaS-FFN on the video prefill rows of a step.

    Each prefill's rows run :func:`~adaspark.ops.cube_sparse_ffn` (its own cube ids and counters);
    the other rows of the step (text requests, decode steps) go through the MLP in one call.
    """

    def __init__(self, runtime: _Runtime, layer_idx: int, dense_forward) -> None:
        self.runtime = runtime
        self.layer_idx = layer_idx
        self.dense_forward = dense_forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        step = rt.step
        residual = None if step is None else step.residual.pop(self.layer_idx, None)
        if step is None or not step.prefills or residual is None:
            return self.dense_forward(x)
        cfg = rt.config
        parts = []
        for pf in step.prefills:
            s, e = pf.start, pf.end
            delta = cube_sparse_ffn(
                x[s:e].unsqueeze(0),
                self.dense_forward,
                pf.cube_ids.to(x.device),
                policy=rt.ffn_policy,
                scores=token_scores(residual[s:e].unsqueeze(0)),
                mean_compensation=cfg.mean_compensation,
                backend=cfg.backend,
                index=pf.index,
                stats=pf.ffn_stats[self.layer_idx],
                ffn_sum_chunk=cfg.ffn_sum_chunk,
            )
            parts.append((s, e, delta[0]))
        other = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for s, e, _ in parts:
            other[s:e] = False
        out = None
        if bool(other.any()):
            rows = other.nonzero().squeeze(1)
            y = self.dense_forward(x.index_select(0, rows))
            out = y.new_empty(x.shape[0], y.shape[-1])
            out.index_copy_(0, rows, y)
        for s, e, delta in parts:
            if out is None:
                out = delta.new_empty(x.shape[0], delta.shape[-1])
            out[s:e] = delta
        return out


def _check_engine(vllm_config: VllmConfig, config: AdaSparkConfig) -> None:
    """The engine settings AdaSpark cannot honour, refused at start."""
    sched = vllm_config.scheduler_config
    cache = vllm_config.cache_config
    par = vllm_config.parallel_config
    problems = []
    if getattr(sched, "enable_chunked_prefill", False):
        problems.append(
            "chunked prefill is on (pass enable_chunked_prefill=False / --no-enable-chunked-prefill)"
        )
    if getattr(cache, "enable_prefix_caching", False):
        problems.append(
            "prefix caching is on (pass enable_prefix_caching=False / --no-enable-prefix-caching)"
        )
    if getattr(par, "tensor_parallel_size", 1) != 1 or getattr(par, "pipeline_parallel_size", 1) != 1:
        problems.append("tensor / pipeline parallelism is not supported yet (use tensor_parallel_size=1)")
    if config.images_as_video:
        problems.append("AdaSparkConfig.images_as_video is not supported in vLLM (images stay dense)")
    if config.budget is not None:
        problems.append(
            "AdaSparkConfig.budget (budget mode) is not supported in vLLM yet (set p / p_attn / p_ffn)"
        )
    if config.cube_mode != "fixed":
        problems.append(
            f"AdaSparkConfig.cube_mode={config.cube_mode!r} is not supported in vLLM yet (use 'fixed')"
        )
    if problems:
        raise ValueError("AdaSpark in vLLM: " + "; ".join(problems))


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class AdaSparkQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with AdaSpark on whole-prompt video prefills (see the module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf = vllm_config.model_config.hf_config
        options = read_options(getattr(hf, OPTIONS_KEY, None))
        config = options.config
        _check_engine(vllm_config, config)
        tc = hf.get_text_config()
        layers = self.language_model.model.layers
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        dims = LayerDims(
            hidden=tc.hidden_size,
            heads=tc.num_attention_heads,
            kv_heads=tc.num_key_value_heads,
            head_dim=head_dim,
            intermediate=tc.intermediate_size,
        )
        bad = [i for i in config.dense_layers if not -len(layers) <= i < len(layers)]
        if bad:
            raise ValueError(
                f"AdaSparkConfig.dense_layers {bad} out of range for a model with {len(layers)} layers"
            )
        rt = _Runtime(
            config, dims, len(layers), int(hf.vision_config.spatial_merge_size), int(hf.video_token_id)
        )
        self.adaspark_config = config
        self.adaspark_report_path = options.report_path
        self.adaspark_reports: collections.deque = collections.deque(maxlen=KEEP_REPORTS)
        self._adaspark = rt
        #: the video contexts of the live requests (``len()``: how many are kept)
        self.adaspark_store = rt.store
        for layer in layers:
            attn = layer.self_attn.attn
            li = extract_layer_index(attn.layer_name)
            attn.impl = AdaSparkAttentionImpl(attn.impl, rt, li)
            if config.sparse_ffn and li not in rt.dense_layers:
                norm = layer.post_attention_layernorm
                norm.register_forward_hook(partial(_keep_residual, rt, li))
                mlp = layer.mlp
                mlp.forward = _SparseMLP(rt, li, partial(type(mlp).forward, mlp))
        logger.info("AdaSpark on: %s", config)

    def get_mrope_input_positions(self, input_tokens, mm_features):
        return transformers_mrope_positions(len(input_tokens), list(self.iter_mm_grid_thw(mm_features)))

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        self._adaspark.input_ids = input_ids
        return super().embed_input_ids(
            input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs
        )

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        rt = self._adaspark
        rt.positions = positions if positions.dim() == 2 else None
        rt.step = None
        try:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        finally:
            step = rt.step
            rt.step = rt.input_ids = rt.positions = None
            if step is not None:
                for ctx in step.dropped:
                    self._emit_decode(ctx)
                for pf in step.prefills:
                    self._emit(pf)

    def _emit(self, pf) -> None:
        rep = pf.report(self.adaspark_config, self._adaspark.dense_layers)
        record = {
            "kind": "prefill",
            "prompt_digest": pf.digest,
            "tokens": pf.length,
            "video_tokens": pf.video_tokens,
            "decoder_flops_dense": rep.llm_flops_dense,
            "decoder_flops_adaspark": rep.llm_flops_sparse,
            "decoder_flops_ideal": rep.llm_flops_sparse_ideal,
            "decoder_saved": rep.llm_saved,
            "decoder_saved_ideal": rep.llm_saved_ideal,
            "attn_density": rep.attn_density,
            "ffn_active": rep.ffn_active,
        }
        self._write(record)
        logger.info(
            "AdaSpark prefill %s: %d tokens (%d video), decoder FLOPs saved %.1f%% (ideal %.1f%%), "
            "attention density %.3f, FFN active %.3f",
            pf.digest, pf.length, pf.video_tokens, 100 * rep.llm_saved, 100 * rep.llm_saved_ideal,
            rep.attn_density, rep.ffn_active,
        )  # fmt: skip

    def _emit_decode(self, ctx: VideoContext) -> None:
        """The report of one request's decoding, when its context leaves the store."""
        rep = ctx.report()
        if rep is None:
            return
        record = {
            "kind": "decode",
            "prompt_digest": ctx.digest,
            "decode_tokens": ctx.decode_tokens,
            "prompt_tokens": ctx.prompt_length,
            "decoder_flops_dense": rep.llm_flops_dense,
            "decoder_flops_adaspark": rep.llm_flops_sparse,
            "decoder_flops_ideal": rep.llm_flops_sparse_ideal,
            "decoder_saved": rep.llm_saved,
            "decoder_saved_ideal": rep.llm_saved_ideal,
            "attn_density": rep.attn_density,
        }
        self._write(record)
        logger.info(
            "AdaSpark decode %s: %d tokens after %d, decoder FLOPs saved %.1f%% (ideal %.1f%%), "
            "attention density %.3f",
            ctx.digest, ctx.decode_tokens, ctx.prompt_length, 100 * rep.llm_saved,
            100 * rep.llm_saved_ideal, rep.attn_density,
        )  # fmt: skip

    def _write(self, record: dict) -> None:
        self.adaspark_reports.append(record)
        if self.adaspark_report_path:
            with open(os.path.expanduser(self.adaspark_report_path), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


def _keep_residual(rt: _Runtime, layer_idx: int, module, args, output) -> None:
    step = rt.step
    if step is not None and step.prefills and isinstance(output, tuple) and len(output) == 2:
        step.residual[layer_idx] = output[1]
