"""The ``"adaspark"`` attention backend and mask function for transformers' registries.

transformers calls every attention backend as ``fn(module, query, key, value, attention_mask,
scaling, dropout, **kwargs) -> (out [B, N, Hq, D], weights)`` with query ``[B, Hq, Nq, D]`` and the
cached key/value ``[B, Hkv, Nk, D]`` — already the ops layout. The mask function registered beside
it returns a compact :class:`SparseMask` instead of an ``N × N`` tensor:

* ``key_valid`` ``[B, Nk]`` — padding;
* ``kv_end`` — how many key positions are filled: a static cache hands every layer its whole
  pre-allocated buffer, and only the first ``kv_end`` positions hold keys;
* ``segments`` ``[B, N]`` — packed sequences (padding-free batches): tokens attend only within
  their own segment. Any mask function other than transformers' plain causal one is *probed*
  (:func:`probe_segments`): it must be causal within segments, or the call is refused with a clear
  error (sliding windows, bidirectional blocks and other custom masks are not AdaSpark's).

With ``output_attentions=True`` the backend returns the attention probabilities of what it
attended (zero on skipped keys), so a patched model can be inspected like an eager one.
Modules that belong to no patched model run plain causal attention.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch

from adaspark.integrations.transformers import compat
from adaspark.ops.attention import dense_causal_attention

ATTN_NAME = "adaspark"

#: attention module -> per-model AdaSpark state (weak: a deleted model leaves nothing behind)
_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: random (query, key) pairs checked when a mask function is probed
PROBE_PAIRS = 4096


@dataclass(frozen=True)
class SparseMask:
    """Compact causal mask (token-level causality is implied).

    Attributes:
        key_valid: ``[B, kv_end]`` bool, False for padding (None: no padding).
        q_length: queries of the call.
        kv_end: filled key positions; the queries are the last ``q_length`` of them.
        segments: ``[B, N]`` int64 packed-sequence ids (None: one sequence per row).
    """

    key_valid: torch.Tensor | None
    q_length: int
    kv_end: int
    segments: torch.Tensor | None = None

    def contiguous(self) -> SparseMask:
        """transformers (5.19 - 5.23) calls this on masks that ``generate`` prepares."""
        return self


def probe_segments(mask_function, batch_size: int, length: int, device) -> torch.Tensor | None:
    """Segments of a causal-within-segments mask function, or ``NotImplementedError``.

    transformers' mask functions take broadcastable index tensors ``(batch, head, q, kv)`` and return
    booleans. A packed batch's mask is "causal and same segment": query ``q`` sees ``q - 1`` iff both
    are in one segment, which gives the segments; then the diagonal, the next key, the segment start
    and :data:`PROBE_PAIRS` random pairs are checked against that reading.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    b = torch.arange(batch_size, device=dev)[:, None]
    h = torch.zeros((), dtype=torch.long, device=dev)
    q = torch.arange(length, device=dev)[None, :].expand(batch_size, -1)

    def f(qi, ki):
        out = mask_function(b, h, qi, ki)
        return torch.as_tensor(out, device=dev).bool().expand(batch_size, qi.shape[-1])

    def refuse(why: str):
        return NotImplementedError(
            "AdaSpark attention supports causal masks with padding and packed sequences; this forward "
            f"uses another mask ({why}: a sliding window, bidirectional blocks or a custom mask "
            "function). Run such a model without AdaSpark, or with attn_implementation='sdpa'."
        )

    if not bool(f(q, q).all()):
        raise refuse("a token does not attend to itself")
    if length == 1:
        return None
    if bool(f(q[:, :-1], q[:, :-1] + 1).any()):
        raise refuse("a token attends to a later one")
    same_prev = f(q[:, 1:], q[:, 1:] - 1)
    boundary = torch.cat([torch.ones(batch_size, 1, dtype=torch.bool, device=dev), ~same_prev], dim=1)
    seg = boundary.long().cumsum(1) - 1
    start = torch.where(boundary, q, torch.zeros_like(q)).cummax(dim=1).values
    if not bool(f(q, start).all()):
        raise refuse("a token does not attend to the start of its sequence")
    gen = torch.Generator(device="cpu").manual_seed(0)
    qi = torch.randint(0, length, (batch_size, PROBE_PAIRS), generator=gen).to(dev)
    ki = torch.randint(0, length, (batch_size, PROBE_PAIRS), generator=gen).to(dev)
    want = (ki <= qi) & (seg.gather(1, qi) == seg.gather(1, ki))
    if not torch.equal(f(qi, ki), want):
        raise refuse("it is not causal within packed sequences")
    if not bool(boundary[:, 1:].any()):
        return None
    return seg


def adaspark_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> SparseMask:
    """Mask-interface function: keeps only padding, the filled cache length and packed segments."""
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset)
    if isinstance(kv_offset, torch.Tensor):
        kv_offset = int(kv_offset)
    if kv_offset != 0:
        raise NotImplementedError(
            "AdaSpark needs every layer's KV cache to start at the first token (a full-attention cache); "
            f"got kv_offset={kv_offset} (a sliding-window cache)"
        )
    kv_end = q_offset + q_length
    if kv_end > kv_length:
        raise compat.compat_error(
            f"the attention mask covers {kv_length} keys but the queries end at position {kv_end}"
        )
    segments = None
    if not compat.is_plain_causal(mask_function):
        if q_offset != 0 or kv_length != q_length:
            raise NotImplementedError(
                "AdaSpark supports packed sequences (a non-causal mask function) only in a forward "
                "without a KV cache"
            )
        segments = probe_segments(mask_function, batch_size, q_length, kwargs.get("device"))
    key_valid = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(
                "AdaSpark supports 2-D padding masks; got a prepared mask of shape "
                f"{tuple(attention_mask.shape)}"
            )
        am = attention_mask.bool()
        if am.shape[-1] < kv_end:
            am = torch.nn.functional.pad(am, (0, kv_end - am.shape[-1]), value=True)
        am = am[:, :kv_end]
        if not bool(am.all()):
            key_valid = am
    return SparseMask(key_valid=key_valid, q_length=q_length, kv_end=kv_end, segments=segments)


def _unpack_mask(attention_mask, nk: int, device) -> SparseMask:
    if attention_mask is None:
        return SparseMask(key_valid=None, q_length=0, kv_end=nk)
    if isinstance(attention_mask, SparseMask):
        if attention_mask.key_valid is not None and attention_mask.key_valid.device != device:
            return SparseMask(
                key_valid=attention_mask.key_valid.to(device),
                q_length=attention_mask.q_length,
                kv_end=attention_mask.kv_end,
                segments=None if attention_mask.segments is None else attention_mask.segments.to(device),
            )
        return attention_mask
    raise NotImplementedError(
        "AdaSpark received a prepared attention mask; it supports 2-D padding masks only "
        f"(got {type(attention_mask).__name__} of shape {tuple(getattr(attention_mask, 'shape', ()))}). "
        "Pass the 2-D attention_mask the processor returns."
    )


def causal_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None,
    keep: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities ``[B, Hq, Nq, Nk]`` (float32) of causal attention over ``keep``.

    ``keep`` ``[B, Hq, Nq, Nk]`` bool (None: every key); causality and ``key_valid`` always apply.
    Rows without any visible key (padding queries) are zero.
    """
    bsz, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    sc = d**-0.5 if scale is None else float(scale)
    kk = k.float().repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q.float(), kk.transpose(-1, -2)) * sc
    pos = torch.arange(nk, device=q.device)
    allowed = (pos[None, :] <= pos[nk - nq :, None])[None, None].expand(bsz, hq, nq, nk)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :] & key_valid[:, None, nk - nq :, None]
    if keep is not None:
        allowed = allowed & keep
    scores = scores.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(w, nan=0.0)


def dense_attention(q, k, v, scaling, key_valid, *, segments=None, want_weights=False, stats=None):
    """Dense causal attention (with packed segments and optional weights); the unpatched route."""
    if segments is not None:
        return per_segment(
            lambda qs, ks, vs, kv, _s, _e: dense_attention(
                qs, ks, vs, scaling, kv, want_weights=want_weights, stats=stats
            ),
            q,
            k,
            v,
            key_valid,
            segments,
            want_weights,
        )
    if want_weights:
        w = causal_weights(q, k, scaling, key_valid=key_valid)
        out = dense_causal_attention(q, k, v, scale=scaling, key_mask=key_valid, stats=stats)
        return out, w.to(q.dtype)
    return dense_causal_attention(q, k, v, scale=scaling, key_mask=key_valid, stats=stats), None


def per_segment(fn, q, k, v, key_valid, segments, want_weights):
    """Run ``fn(q, k, v, key_valid, start, end)`` on every packed segment of every row; reassemble.

    Only for forwards without a cache (``Nq == Nk``). Weights are block-diagonal.
    """
    bsz, hq, n, _ = q.shape
    out = torch.zeros_like(q)
    weights = q.new_zeros(bsz, hq, n, n) if want_weights else None
    for b in range(bsz):
        seg = segments[b]
        bounds = [*torch.nonzero(torch.diff(seg, prepend=seg[:1] - 1) != 0).flatten().tolist(), n]
        for s, e in itertools.pairwise(bounds):
            kv = None if key_valid is None else key_valid[b : b + 1, s:e]
            o, w = fn(q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], kv, s, e)
            out[b : b + 1, :, s:e] = o
            if weights is not None and w is not None:
                weights[b : b + 1, :, s:e, s:e] = w
    return out, weights


def adaspark_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention-interface function: AdaS-Attn for layers of a patched model, causal SDPA otherwise."""
    if dropout:
        raise NotImplementedError("AdaSpark attention does not implement attention dropout (set it to 0)")
    mask = _unpack_mask(attention_mask, key.shape[2], key.device)
    if mask.kv_end < key.shape[2]:
        # a static cache: only the first kv_end positions of its buffers hold keys
        key, value = key[:, :, : mask.kv_end], value[:, :, : mask.kv_end]
    if key.shape[2] < query.shape[2]:
        raise compat.compat_error(f"attention got {query.shape[2]} queries but only {key.shape[2]} keys")
    want = bool(kwargs.get("output_attentions", False))
    state = _ROUTES.get(module)
    if state is None:
        out, weights = dense_attention(
            query, key, value, scaling, mask.key_valid, segments=mask.segments, want_weights=want
        )
    else:
        out, weights = state.attention(
            module, query, key, value, mask.key_valid, scaling, segments=mask.segments, want_weights=want
        )
    return out.transpose(1, 2).contiguous(), weights


_REGISTERED = False


def register() -> None:
    """Register ``"adaspark"`` in transformers' attention and mask registries (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    compat.register_attention(ATTN_NAME, adaspark_attention, adaspark_mask)
    _REGISTERED = True


def route(module: torch.nn.Module, state) -> None:
    _ROUTES[module] = state


def unroute(module: torch.nn.Module) -> None:
    _ROUTES.pop(module, None)


def route_of(module: torch.nn.Module):
    return _ROUTES.get(module)
