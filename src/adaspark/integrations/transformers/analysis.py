"""Measurements inside a supported Video-LLM's forward: the paper's preliminary analysis
(``adaspark analyze``) and the cubes and tokens AdaSpark selects (``adaspark show``).

Nothing here rewrites a model's forward. Two taps observe it:

* :func:`record_attention` routes every decoder attention module through the ``"adaspark"``
  attention backend (the same registry entry :func:`adaspark.patch` uses) and hands the
  post-RoPE queries and keys of each layer to a callback, one layer at a time; the attention output
  itself comes from dense causal attention, or from AdaSpark when the model is patched;
* :func:`record_ffn` hooks each layer's ``post_attention_layernorm`` (the residual stream ``x``
  entering the FFN sub-layer) and ``mlp`` (its update ``y``).

:func:`analyze_model` turns one dense prefill into the statistics of
:mod:`adaspark.core.analysis`, layer by layer, so memory stays at one layer's worth.
:func:`capture_selection` runs the model patched with AdaSpark and reads the cube sets the kernels
used in that very run (``handle.record_selections()``: the kernels return their selection through
their stats); the FFN tokens are selected from the residual streams of the run with the library's own
:func:`~adaspark.ops.ffn.common.select_ffn_tokens`. The pictures show exactly what AdaSpark did; the
per-layer means equal those of ``handle.report()``.

Models are opened with :func:`adaspark.integrations.transformers.loading.load_model` (the one
loader); every family of the adapter registry works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from adaspark.config import AdaSparkConfig
from adaspark.core.analysis import (
    DEFAULT_P_VALUES,
    DEFAULT_THRESHOLDS,
    attention_layer_stats,
    choose_queries,
    ffn_kept_fraction,
    ffn_ratio,
    summarize,
)
from adaspark.core.layout import Layout
from adaspark.integrations.transformers import attention as attn_backend
from adaspark.integrations.transformers import compat
from adaspark.integrations.transformers.adapters import get_adapter
from adaspark.ops.attention.common import select_block
from adaspark.ops.attention.units import cube_unit_probs
from adaspark.ops.cubes import CubeIndex, build_cube_index, cube_mean_keys
from adaspark.ops.ffn.common import select_ffn_tokens, token_scores

__all__ = [
    "SelectionCapture",
    "analyze_model",
    "capture_selection",
    "decoder_layers",
    "record_attention",
    "record_ffn",
    "video_layout",
]


def decoder_layers(model: torch.nn.Module) -> list:
    """The decoder layers of a supported model (the family adapter's ``language_model.layers``)."""
    return list(get_adapter(model).find_parts(model).layers)


def _text_config(model: torch.nn.Module):
    cfg = model.config
    return getattr(cfg, "text_config", cfg)


def video_layout(model: torch.nn.Module, inputs: dict, cube: tuple[int, int, int]) -> Layout:
    """The cube layout AdaSpark computes for ``inputs`` (through the family adapter)."""
    adapter = get_adapter(model)
    captured = adapter.layout_from_call(AdaSparkConfig(cube=tuple(cube)), adapter.find_parts(model), inputs)
    if captured is None:
        raise ValueError("the inputs hold no video (no video grids or frames)")
    return captured[1]


# --------------------------------------------------------------------------------------- taps
AttentionCallback = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], None]
FFNCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class _AttentionTap:
    """A route of the ``"adaspark"`` backend: the real attention (AdaSpark's state when the model is
    patched, dense causal attention otherwise), then the callback with ``q``/``k`` of the layer."""

    def __init__(self, inner, callback: AttentionCallback) -> None:
        self.inner = inner
        self.callback = callback

    def attention(self, module, q, k, v, key_valid, scaling, **kw):
        if self.inner is None:
            out = attn_backend.dense_attention(q, k, v, scaling, key_valid, **kw)
        else:
            out = self.inner.attention(module, q, k, v, key_valid, scaling, **kw)
        scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
        with torch.no_grad():
            self.callback(int(module.layer_idx), q.detach(), k.detach(), key_valid, scale)
        return out


@contextlib.contextmanager
def record_attention(model: torch.nn.Module, callback: AttentionCallback) -> Iterator[None]:
    """Call ``callback(layer, q, k, key_valid, scale)`` from every decoder attention call.

    ``q`` ``[B, Hq, Nq, D]`` and ``k`` ``[B, Hkv, Nk, D]`` are the post-RoPE queries and (cached)
    keys; ``key_valid`` ``[B, Nk]`` bool or None. Works on a plain model (dense attention) and on
    one patched with :func:`adaspark.patch` (AdaSpark attention); everything is restored on exit.
    """
    layers = decoder_layers(model)
    attn_backend.register()
    tc = _text_config(model)
    previous_impl = compat.attn_implementation(tc)
    routes = getattr(attn_backend, "_ROUTES", {})
    saved = []
    try:
        compat.set_attn_implementation(tc, attn_backend.ATTN_NAME)
        for layer in layers:
            module = layer.self_attn
            inner = routes.get(module)
            saved.append((module, inner))
            attn_backend.route(module, _AttentionTap(inner, callback))
        yield
    finally:
        for module, inner in saved:
            if inner is None:
                attn_backend.unroute(module)
            else:
                attn_backend.route(module, inner)
        compat.set_attn_implementation(tc, previous_impl)


@contextlib.contextmanager
def record_ffn(model: torch.nn.Module, callback: FFNCallback) -> Iterator[None]:
    """Call ``callback(layer, x, y)`` after every FFN sub-layer: ``x`` ``[B, N, d]`` is the residual
    stream entering it (before ``post_attention_layernorm``), ``y`` the MLP's output (the update the
    layer adds to ``x``)."""
    layers = decoder_layers(model)
    pending: dict[int, torch.Tensor] = {}
    hooks = []

    def make(i: int):
        def keep_input(module, args):
            pending[i] = args[0].detach()

        def on_output(module, args, output):
            x = pending.pop(i, None)
            if x is not None and isinstance(output, torch.Tensor) and output.shape == x.shape:
                with torch.no_grad():
                    callback(i, x, output.detach())

        return keep_input, on_output

    try:
        for i, layer in enumerate(layers):
            keep_input, on_output = make(i)
            hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(keep_input))
            hooks.append(layer.mlp.register_forward_hook(on_output))
        yield
    finally:
        for h in hooks:
            h.remove()


def _forward(model: torch.nn.Module, inputs: dict):
    return model(**inputs, use_cache=False, logits_to_keep=1)


# ------------------------------------------------------------------------------------ analyze
@torch.no_grad()
def analyze_model(
    model: torch.nn.Module,
    inputs: dict,
    *,
    cube: tuple[int, int, int] = (4, 4, 4),
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    p_values: Sequence[float] = DEFAULT_P_VALUES,
    max_video_queries: int | None = 512,
    max_text_queries: int | None = 256,
    on_layer: Callable[[int], None] | None = None,
) -> dict:
    """One dense prefill of ``model`` on ``inputs``, measured layer by layer.

    Args:
        model: a model of a supported family (not patched: the analysis is of the dense model).
        inputs: model inputs of one sample (``input_ids``, ``attention_mask``, ``mm_token_type_ids``,
            ``pixel_values_videos``, ``video_grid_thw``, ...).
        cube: cube size ``(t, h, w)`` in LM tokens.
        thresholds: attention-mass shares whose key / cube counts are measured.
        p_values: Top-p values at which kept cubes and FFN tokens are counted.
        max_video_queries / max_text_queries: evenly spread query positions analysed (None = all);
            the attention statistics cost ``O(queries · N)`` per layer and head.
        on_layer: called with each layer index when its attention statistics are done.

    Returns:
        A JSON-ready dict: ``tokens``, ``video_tokens``, ``cubes``, ``queries`` (video / text counts),
        ``thresholds``, ``p_values``, ``cube`` and ``layers`` — per layer ``index``, ``attention``
        (:meth:`~adaspark.core.analysis.AttentionLayerStats.summary`), ``ffn`` (``video`` and
        ``text`` summaries of ``||FFN(x)|| / ||x||``) and ``ffn_tokens_kept`` (fraction of video
        tokens AdaS-FFN keeps at each ``p``).
    """
    layers = decoder_layers(model)
    n_layers = len(layers)
    routes = getattr(attn_backend, "_ROUTES", {})
    if any(routes.get(layer.self_attn) is not None for layer in layers):
        raise ValueError("analyze_model measures the dense model: remove the AdaSpark patch first")
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("analyze_model takes one sample (batch size 1)")
    layout = video_layout(model, inputs, cube)
    cube_ids = layout.cube_ids.to(device)
    valid = inputs["attention_mask"].bool()
    index = build_cube_index(cube_ids)
    queries = [choose_queries(cube_ids[0], valid[0], max_video=max_video_queries, max_text=max_text_queries)]
    per_layer: dict[int, dict] = {i: {"index": i} for i in range(n_layers)}

    def on_attention(li: int, q, k, key_valid, scale: float) -> None:
        if q.shape[2] != k.shape[2]:
            return  # only the prefill is analysed
        st = attention_layer_stats(
            q,
            k,
            cube_ids,
            scale=scale,
            key_mask=valid,
            queries=queries,
            thresholds=thresholds,
            p_values=p_values,
            index=index,
        )
        per_layer[li]["attention"] = st.summary()
        if on_layer is not None:
            on_layer(li)

    def on_ffn(li: int, x, y) -> None:
        r = ffn_ratio(x, y)[valid]
        video = (cube_ids >= 0)[valid]
        per_layer[li]["ffn"] = {"video": summarize(r[video]), "text": summarize(r[~video])}
        per_layer[li]["ffn_tokens_kept"] = ffn_kept_fraction(x, cube_ids, p_values, index=index)

    with record_attention(model, on_attention), record_ffn(model, on_ffn):
        _forward(model, inputs)
    missing = [i for i, d in per_layer.items() if "attention" not in d or "ffn" not in d]
    if missing:
        raise RuntimeError(f"layers {missing} were not observed during the forward")
    qv = queries[0]
    return {
        "tokens": int(valid.sum()),
        "video_tokens": int((cube_ids >= 0).sum()),
        "cubes": int(index.max_cubes),
        "queries": {
            "video": int((cube_ids[0, qv] >= 0).sum()),
            "text": int((cube_ids[0, qv] < 0).sum()),
        },
        "thresholds": [float(t) for t in thresholds],
        "p_values": [float(p) for p in p_values],
        "cube": list(cube),
        "layers": [per_layer[i] for i in range(n_layers)],
    }


# -------------------------------------------------------------------------------------- show
@dataclass
class SelectionCapture:
    """What AdaSpark selected during one prefill (batch size 1).

    Attributes:
        layout: the cube layout of the sequence.
        num_layers / num_heads: model geometry.
        sparse_attn_layers: layers that ran cube selection (the others are dense).
        sparse_ffn_layers: layers that ran AdaS-FFN.
        kept: ``[L, 2, C]`` float64, over (query, head) pairs: how often cube ``c`` was kept while it
            was a candidate of the query (an earlier cube, not its own), for video queries (index 0)
            and non-video queries (index 1).
        candidates: ``[L, 2, C]`` float64, how often cube ``c`` was a candidate.
        kept_per_head: ``[L, H]`` mean number of kept cubes per selection (the statistic
            ``handle.report().layers[l].cubes_kept`` reports; under ``granularity="cube"`` a
            cube's shared selection counts once per query of the cube).
        query_pos: position of the chosen query.
        query_layer: layer of the recorded query distribution.
        query_probs: ``[H, C]`` float32 cube distribution of the chosen query (0 off candidates);
            under ``granularity="cube"`` a video query's is its cube's (the average of the
            distributions of the cube's queries), with the union of their candidates.
        query_keep: ``[H, C]`` bool cubes kept (own cube excluded).
        query_candidates: ``[C]`` bool candidate cubes.
        query_cube: cube of the chosen query (-1 for a non-video query).
        ffn_active: ``{layer: [N] bool}`` tokens that went through the FFN (sparse FFN layers).
        token_norms: ``{layer: [N]}`` L2 norms of the residual stream entering the FFN.
        report: ``handle.report()`` of the run.
        answer_token: the greedy first answer token when the query is the first answer token.
        input_ids: ``[N]`` the sequence that was run.
    """

    layout: Layout
    num_layers: int
    num_heads: int
    sparse_attn_layers: list[int]
    sparse_ffn_layers: list[int]
    kept: torch.Tensor
    candidates: torch.Tensor
    kept_per_head: torch.Tensor
    query_pos: int
    query_layer: int
    query_probs: torch.Tensor | None = None
    query_keep: torch.Tensor | None = None
    query_candidates: torch.Tensor | None = None
    query_cube: int = -1
    ffn_active: dict[int, torch.Tensor] = field(default_factory=dict)
    token_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    report: object = None
    answer_token: int | None = None
    input_ids: torch.Tensor | None = None

    @property
    def cube_ids(self) -> torch.Tensor:
        """``[N]`` cube id of every position (``-1`` = not video)."""
        return self.layout.cube_ids[0]


def _extend(inputs: dict, token: int) -> dict:
    out = dict(inputs)
    one = torch.tensor([[int(token)]], dtype=torch.long, device=inputs["input_ids"].device)
    out["input_ids"] = torch.cat([inputs["input_ids"], one], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(one)], dim=1)
    out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(one)], dim=1)
    return out


@torch.no_grad()
def capture_selection(
    model: torch.nn.Module,
    inputs: dict,
    config: AdaSparkConfig,
    *,
    query: str | int = "answer",
    layer: int | None = None,
) -> SelectionCapture:
    """Run ``model`` patched with AdaSpark (``config``) and record what it selected.

    Args:
        model: a model of a supported family (unpatched; it is patched for the run and restored).
        inputs: one sample's model inputs.
        config: AdaSpark settings.
        query: ``"answer"``: the first answer token (greedy under AdaSpark; one extra forward
            computes it and the run is repeated with it appended); ``"last"``: the last prompt
            position (the one that emits the first answer token); an int: that position (negative
            counts from the end).
        layer: layer whose distribution of the chosen query is recorded (default: the middle one;
            negative counts from the end).

    Returns:
        :class:`SelectionCapture`.
    """
    import adaspark

    layers = decoder_layers(model)
    n_layers = len(layers)
    tc = _text_config(model)
    hq = int(tc.num_attention_heads)
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("capture_selection takes one sample (batch size 1)")
    if config.cube_mode != "fixed":
        raise ValueError(
            f"capture_selection draws fixed cubes; AdaSparkConfig.cube_mode={config.cube_mode!r} is not "
            "supported here yet (use cube_mode='fixed')"
        )
    li_query = n_layers // 2 if layer is None else int(layer)
    if not -n_layers <= li_query < n_layers:
        raise ValueError(f"--layer {layer} is out of range for a model with {n_layers} layers")
    li_query %= n_layers
    answer = None
    if query == "answer":
        with adaspark.patch(model, config):
            logits = _forward(model, inputs).logits
        answer = int(logits[0, -1].argmax())
        inputs = _extend(inputs, answer)
    n = int(inputs["input_ids"].shape[1])
    if query in ("answer", "last"):
        qpos = n - 1
    else:
        try:
            qpos = int(query)
        except (TypeError, ValueError):
            raise ValueError(f"--query must be 'answer', 'last' or a position, got {query!r}") from None
        if not -n <= qpos < n:
            raise ValueError(f"--query position {query} is out of range for a {n}-token prompt")
        qpos %= n
    layout = video_layout(model, inputs, config.cube)
    cube_ids = layout.cube_ids.to(device)
    index: CubeIndex = build_cube_index(cube_ids)
    c = index.max_cubes
    attn_policy, ffn_policy = config.attn_policy(), config.ffn_policy()
    granularity = getattr(config, "granularity", "token")
    sparse_attn = [
        i for i in range(n_layers) if config.sparse_attn and not config.is_dense_layer(i, n_layers)
    ]
    sparse_ffn = [i for i in range(n_layers) if config.sparse_ffn and not config.is_dense_layer(i, n_layers)]
    cap = SelectionCapture(
        layout=layout,
        num_layers=n_layers,
        num_heads=hq,
        sparse_attn_layers=sparse_attn,
        sparse_ffn_layers=sparse_ffn,
        kept=torch.zeros(n_layers, 2, c, dtype=torch.float64),
        candidates=torch.zeros(n_layers, 2, c, dtype=torch.float64),
        kept_per_head=torch.zeros(n_layers, hq, dtype=torch.float64),
        query_pos=qpos,
        query_layer=li_query,
        query_cube=int(cube_ids[0, qpos]),
        answer_token=answer,
        input_ids=inputs["input_ids"][0].cpu(),
    )

    run: dict = {}

    def on_attention(li: int, q, k, key_valid, scale: float) -> None:
        if q.shape[2] != n or k.shape[2] != n or li not in sparse_attn or c == 0:
            return
        dev = q.device
        km = key_valid if key_valid is not None else torch.ones(1, n, dtype=torch.bool, device=dev)
        # the selection the kernel used in this very call (recorded by the patch), not a recomputation
        log = run["handle"].selections()[li]
        if not log:
            return
        sel = log[-1]
        ids, first, qvalid = cube_ids[0], index.first_pos[0], km[0]
        cids = torch.arange(c, device=dev)
        for s in range(0, n, 256):
            pos = torch.arange(s, min(s + 256, n), device=dev)
            cand = (first[None, :] <= pos[:, None]) & (cids[None, :] != ids[pos][:, None])  # [m, C]
            keep = sel.table[0][:, sel.unit[0, pos], :c] & cand[None]  # [Hq, m, C]
            use = qvalid[pos] & cand.any(-1)
            text = ids[pos] < 0
            for kind, chosen in ((0, use & ~text), (1, use & text)):
                if bool(chosen.any()):
                    cap.kept[li, kind] += keep[:, chosen].sum(dim=(0, 1)).double().cpu()
                    cap.candidates[li, kind] += cand[chosen].sum(0).double().cpu() * hq
        if li != li_query:
            return
        own = int(ids[qpos])
        mean_keys = cube_mean_keys(k, index)  # the distribution of one query, for its picture
        if granularity == "cube" and own >= 0:
            # a video query shares its cube's selection: the average of its queries' distributions
            probs, ucand, _ = cube_unit_probs(q[0], mean_keys[0], ids, qvalid, 0, first, scale)
            cap.query_probs = probs[:, own].float().cpu()
            cap.query_candidates = ucand[own].cpu()
        else:
            p1 = torch.tensor([qpos], device=dev)
            _, probs, cand1 = select_block(
                q[0][:, p1], mean_keys[0], p1, ids[p1], index, 0, attn_policy, scale
            )
            cap.query_probs = probs[:, 0].float().cpu()
            cap.query_candidates = cand1[0].cpu()
        cap.query_keep = sel.table[0][:, sel.unit[0, qpos], :c].cpu() & cap.query_candidates[None]

    def on_ffn(li: int, x, y) -> None:
        if x.shape[1] != n:
            return
        scores = token_scores(x)
        cap.token_norms[li] = scores[0].float().cpu()
        if li in sparse_ffn and c:
            active = select_ffn_tokens(scores, cube_ids, ffn_policy, index=index)
            cap.ffn_active[li] = active[0].cpu()

    with adaspark.patch(model, config) as handle:
        handle.record_selections()
        run["handle"] = handle
        with record_attention(model, on_attention), record_ffn(model, on_ffn):
            _forward(model, inputs)
        cap.report = handle.report()
    for li in sparse_attn:
        cap.kept_per_head[li] = torch.tensor(cap.report.layers[li].cubes_kept, dtype=torch.float64)
    return cap
