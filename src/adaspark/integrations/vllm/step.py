"""One engine step of vLLM: which requests run AdaSpark, their cube ids, their counters (vLLM-free).

vLLM runs the tokens of every scheduled request in one flat batch: ``N`` rows, request ``r`` owning
rows ``query_start_loc[r] : query_start_loc[r + 1]`` with ``seq_lens[r]`` tokens in its context
after the step. A request whose rows hold video tokens and that starts from an empty context
(``seq_lens[r]`` equals its row count) is a *whole-prompt prefill*: it runs AdaS-Attn and AdaS-FFN
(a :class:`SparsePrefill`), and what its decoding needs is kept in a :class:`DecodeStore` (a
:class:`VideoContext`: the prompt's cube ids and cube index, per layer the cube mean keys). A later
step that decodes that request (a :class:`SparseDecode`) runs AdaS-Attn from those mean keys. Text
requests run vLLM's own kernels. A video request that continues a context without a stored
video context (a later chunk of a chunked prefill, or a prefix-cache hit) is refused: its cube mean
keys would miss the cached keys.

Requests are told apart by the first physical KV-cache block of their block table (vLLM passes the
model no request ids): a live request keeps its blocks, and no two live requests share a first
block (prefix caching, the only sharing, is refused). Every request's first step is a whole-prompt
prefill, which replaces what the store held under its block; a stored context whose request is not
in a step is dropped then (the request finished, or was preempted and will be prefilled anew), so the
store holds at most the requests of the last step.

The layout of a request is read from what the model's forward receives: the rows holding the video
placeholder token and their M-RoPE positions. Qwen2-VL / Qwen2.5-VL place a video of LM grid
``(t, h, w)`` in time-major raster order with height and width positions ``start + y`` and
``start + x``, so ``h`` and ``w`` are the spans of those positions and ``t = tokens / (h · w)``; the
cube ids then come from :func:`adaspark.core.layout.build_layout`, the one layout builder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from adaspark.config import AdaSparkConfig
from adaspark.core.accounting import LayerDims, Report, build_report
from adaspark.core.layout import TEXT, VIDEO, build_layout
from adaspark.ops.attention import AttentionStats
from adaspark.ops.cubes import CubeIndex, build_cube_index
from adaspark.ops.ffn import FFNStats

__all__ = [
    "DecodeStore",
    "SparseDecode",
    "SparsePrefill",
    "Step",
    "VideoContext",
    "plan_step",
    "prompt_digest",
    "record_dense_attention",
]


def prompt_digest(token_ids) -> str:
    """A short digest of a prompt's token ids (what a request's report is matched by: vLLM's
    ``RequestOutput.prompt_token_ids`` give the same digest)."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.int64)
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


@dataclass
class SparsePrefill:
    """One request's whole-prompt prefill with video in this step, and what AdaSpark did in it."""

    request: int
    start: int
    end: int
    cube_ids: torch.Tensor  # [1, n]
    index: CubeIndex
    digest: str
    num_layers: int
    dims: LayerDims
    attn_stats: dict = field(default_factory=dict)
    ffn_stats: dict = field(default_factory=dict)
    #: what decoding this request needs (its mean keys are filled by the prefill's sparse layers)
    context: VideoContext | None = None

    def __post_init__(self) -> None:
        d = self.dims
        self.attn_stats = {i: AttentionStats(d.heads, d.head_dim, d.kv_heads) for i in range(self.num_layers)}
        self.ffn_stats = {i: FFNStats() for i in range(self.num_layers)}
        if self.context is None:
            self.context = VideoContext(self.digest, self.cube_ids, self.index, self.num_layers, self.dims)

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def video_tokens(self) -> int:
        return int((self.cube_ids >= 0).sum())

    def report(self, config: AdaSparkConfig, dense_layers: set[int]) -> Report:
        """The FLOPs report of this prefill (decoder layers; vision tower and LM head not counted)."""
        layers = set(range(self.num_layers)) - dense_layers
        return build_report(
            self.dims,
            self.attn_stats,
            self.ffn_stats,
            dict.fromkeys(range(self.num_layers), self.length),
            sparse_layers=layers if config.sparse_attn else set(),
            sparse_ffn_layers=layers if config.sparse_ffn else set(),
            video_tokens=self.video_tokens,
            forward_calls=1,
        )


@dataclass
class VideoContext:
    """What decoding after one request's video prompt needs, kept from its prefill.

    ``cube_ids`` ``[1, n]`` and ``index`` are the prompt's; ``mean_keys`` maps each layer whose
    prefill ran AdaS-Attn to its ``[1, Hkv, C, D]`` float32 cube mean keys (layers without them
    decode dense). ``attn_stats`` and ``decode_tokens`` count the decoding (see :meth:`report`).
    """

    digest: str
    cube_ids: torch.Tensor
    index: CubeIndex
    num_layers: int
    dims: LayerDims
    mean_keys: dict = field(default_factory=dict)
    attn_stats: dict = field(default_factory=dict)
    decode_tokens: int = 0

    def __post_init__(self) -> None:
        d = self.dims
        self.attn_stats = {i: AttentionStats(d.heads, d.head_dim, d.kv_heads) for i in range(self.num_layers)}

    @property
    def prompt_length(self) -> int:
        return int(self.cube_ids.shape[1])

    def cube_ids_for(self, nk: int) -> torch.Tensor:
        """``[1, nk]`` cube ids of the first ``nk`` positions (generated tokens are text: -1)."""
        n = self.prompt_length
        if nk < n:
            raise ValueError(f"a decode step over {nk} positions of a prompt of {n}")
        return torch.cat([self.cube_ids, self.cube_ids.new_full((1, nk - n), -1)], dim=1)

    def report(self) -> Report | None:
        """The FLOPs report of the decoding so far (decoder layers; ``None`` when nothing decoded
        sparse). The layers with mean keys count as sparse; the FFN of generated tokens is dense."""
        if not self.mean_keys or not self.decode_tokens:
            return None
        return build_report(
            self.dims,
            self.attn_stats,
            {i: FFNStats() for i in range(self.num_layers)},
            dict.fromkeys(range(self.num_layers), self.decode_tokens),
            sparse_layers=set(self.mean_keys),
            sparse_ffn_layers=set(),
            video_tokens=int((self.cube_ids >= 0).sum()),
        )


@dataclass
class SparseDecode:
    """Rows ``start:end`` of one request decoding after a video prompt: queries at the last
    ``end - start`` of its ``seq_len`` positions."""

    request: int
    start: int
    end: int
    seq_len: int
    context: VideoContext


class DecodeStore:
    """The :class:`VideoContext` of each live request whose prompt had a video, keyed by request
    (the first KV-cache block of its block table, see the module docstring)."""

    def __init__(self) -> None:
        self._contexts: dict[int, VideoContext] = {}

    def __len__(self) -> int:
        return len(self._contexts)

    def get(self, key: int) -> VideoContext | None:
        return self._contexts.get(key)

    def put(self, key: int, context: VideoContext) -> None:
        self._contexts[key] = context

    def begin_step(self, keys: list[int], whole_prompt: list[bool]) -> list[VideoContext]:
        """Drop the contexts of requests not in this step and of requests starting anew here (a
        whole-prompt prefill under a stored key: the block was freed and given to a new request, or
        a preempted request is recomputed). Returns what was dropped, in key order."""
        fresh = {k for k, w in zip(keys, whole_prompt, strict=True) if w}
        live = set(keys) - fresh
        gone = sorted(k for k in self._contexts if k not in live)
        return [self._contexts.pop(k) for k in gone]

    def clear(self) -> list[VideoContext]:
        gone = list(self._contexts.values())
        self._contexts.clear()
        return gone


@dataclass
class Step:
    """The requests of one engine step that run AdaSpark (empty: the step runs as stock vLLM)."""

    prefills: list[SparsePrefill]
    num_rows: int
    #: layer -> residual stream entering its FFN sub-layer (the AdaS-FFN scores)
    residual: dict = field(default_factory=dict)
    #: requests decoding after a video prompt
    decodes: list[SparseDecode] = field(default_factory=list)
    #: contexts dropped at the start of this step (their requests finished)
    dropped: list[VideoContext] = field(default_factory=list)


def _video_grid(positions: torch.Tensor, rows: torch.Tensor, merge: int, where: str) -> tuple[int, int, int]:
    """The patch grid ``(T, H·m, W·m)`` of one run of video rows from their M-RoPE positions."""
    n = int(rows.numel())
    hy = positions[1, rows] - positions[1, rows].min()
    wx = positions[2, rows] - positions[2, rows].min()
    h, w = int(hy.max()) + 1, int(wx.max()) + 1
    if n % (h * w):
        raise ValueError(f"{where}: {n} video tokens do not fill a grid of height {h} and width {w}")
    t = n // (h * w)
    raster = torch.arange(n)
    if not (torch.equal(hy, (raster // w) % h) and torch.equal(wx, raster % w)):
        raise ValueError(f"{where}: the video tokens' M-RoPE positions are not in raster order")
    return t, h * merge, w * merge


def plan_step(
    *,
    video_rows: torch.Tensor,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    input_ids: torch.Tensor,
    config: AdaSparkConfig,
    merge: int,
    num_layers: int,
    dims: LayerDims,
    store: DecodeStore | None = None,
    keys: torch.Tensor | None = None,
) -> Step:
    """The :class:`Step` of one forward.

    Args:
        video_rows: ``[N]`` bool, the rows holding the video placeholder token.
        positions: ``[3, N']`` M-RoPE positions (``N' >= N``: vLLM may pad the batch).
        query_start_loc: ``[R + 1]`` row offsets of the requests; seq_lens: ``[R]`` context lengths.
        input_ids: ``[N]`` token ids (for the report digest).
        config, merge: AdaSpark settings and the spatial merge size.
        num_layers, dims: decoder depth and shapes (for the counters).
        store, keys: the video contexts of earlier prompts and ``[R]`` the key of each request (the
            first block of its block table); without them decode steps stay dense.

    Raises:
        NotImplementedError: a video request continues a context (chunked prefill, prefix caching).
        ValueError: video rows whose positions do not form a video grid.
    """
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    n = int(video_rows.shape[0])
    prefills = []
    decodes = []
    dropped = []
    key_list = None
    if store is not None and keys is not None:
        key_list = [int(x) for x in keys.tolist()[: len(lens)]]
        whole = [int(lens[r]) == int(qsl[r + 1]) - int(qsl[r]) for r in range(len(lens))]
        dropped = store.begin_step(key_list, whole)
    for r in range(len(lens)):
        s, e = int(qsl[r]), int(qsl[r + 1])
        ctx = store.get(key_list[r]) if key_list is not None and int(lens[r]) > e - s else None
        if ctx is not None and s < e:
            ctx.decode_tokens += e - s
            decodes.append(SparseDecode(request=r, start=s, end=e, seq_len=int(lens[r]), context=ctx))
            continue
        if s >= e or not bool(video_rows[s:e].any()):
            continue
        if int(lens[r]) != e - s:
            raise NotImplementedError(
                f"AdaSpark in vLLM: request {r} of this step runs {e - s} prompt tokens with video after "
                f"{int(lens[r]) - (e - s)} tokens already in its KV cache (a chunked prefill or a "
                "prefix-cache hit); AdaSpark needs the whole prompt in one prefill: start vLLM with "
                "enable_chunked_prefill=False and enable_prefix_caching=False"
            )
        vid = video_rows[s:e]
        types = torch.where(vid, VIDEO, TEXT).long()
        grids = []
        rows = torch.arange(s, e)
        run_start = None
        flags = [*vid.tolist(), False]
        for i, f in enumerate(flags):
            if f and run_start is None:
                run_start = i
            elif not f and run_start is not None:
                grids.append(_video_grid(positions, rows[run_start:i], merge, f"request {r}"))
                run_start = None
        layout = build_layout(
            types[None], torch.tensor(grids, dtype=torch.long), cube=config.cube, spatial_merge_size=merge
        )
        pf = SparsePrefill(
            request=r,
            start=s,
            end=e,
            cube_ids=layout.cube_ids,
            index=build_cube_index(layout.cube_ids),
            digest=prompt_digest(input_ids[s:e].tolist()),
            num_layers=num_layers,
            dims=dims,
        )
        if key_list is not None:
            store.put(key_list[r], pf.context)
        prefills.append(pf)
    return Step(prefills=prefills, num_rows=n, decodes=decodes, dropped=dropped)


def record_dense_attention(stats: AttentionStats, n: int, kv_heads: int, past: int = 0) -> None:
    """Count ``n`` causal queries after ``past`` cached tokens that ran dense (a layer kept dense;
    ``past = 0``: a prefill)."""
    pairs = n * (n + 1) // 2 + n * past
    stats.kv_heads = kv_heads
    stats.queries += n
    stats.causal_pairs += pairs
    stats.attended += float(pairs)
    stats.executed += pairs * stats.num_heads
