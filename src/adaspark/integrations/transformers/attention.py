"""The ``"adaspark"`` attention backend and mask function for transformers' registries.

transformers calls every attention backend as ``fn(module, query, key, value, attention_mask,
scaling, dropout, **kwargs) -> (out [B, N, Hq, D], weights)`` with query ``[B, Hq, Nq, D]`` and the
cached key/value ``[B, Hkv, Nk, D]`` — already the ops layout. The mask function registered beside
it returns a compact :class:`PaddingMask` (key validity ``[B, Nk]``) instead of an ``N × N`` tensor.
Modules that belong to no patched model run plain causal attention.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from adaspark.ops.attention import dense_causal_attention

ATTN_NAME = "adaspark"

#: attention module -> per-model AdaSpark state (weak: a deleted model leaves nothing behind)
_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class PaddingMask:
    """Compact causal mask: token-level causality is implied; ``key_valid`` ``[B, Nk]`` marks real
    tokens (None: no padding)."""

    key_valid: torch.Tensor | None
    q_length: int
    kv_length: int


def adaspark_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> PaddingMask:
    """Mask-interface function: keeps only the padding information (no ``N × N`` tensor)."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is not None and mask_function is not causal_mask_function:
        name = getattr(mask_function, "__name__", repr(mask_function))
        raise NotImplementedError(
            f"AdaSpark supports plain causal masks with padding; got the mask function {name!r} "
            "(packed sequences or custom masks). Pass an explicit 2-D attention_mask instead."
        )
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset)
    if q_offset + q_length != kv_offset + kv_length:
        raise NotImplementedError(
            "AdaSpark needs the queries to be the last positions of the key cache (DynamicCache); "
            f"got q_offset={q_offset}, q_length={q_length}, kv_offset={kv_offset}, kv_length={kv_length} "
            "(a static or sliding cache)."
        )
    key_valid = None
    if attention_mask is not None:
        am = attention_mask.bool()
        if am.shape[-1] < kv_offset + kv_length:
            am = torch.nn.functional.pad(am, (0, kv_offset + kv_length - am.shape[-1]), value=True)
        am = am[:, kv_offset : kv_offset + kv_length]
        if not bool(am.all()):
            key_valid = am
    return PaddingMask(key_valid=key_valid, q_length=q_length, kv_length=kv_length)


def _key_valid(attention_mask, bsz: int, nk: int, device) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if isinstance(attention_mask, PaddingMask):
        kv = attention_mask.key_valid
        return None if kv is None else kv.to(device)
    raise NotImplementedError(
        "AdaSpark received a prepared 4-D attention mask; it supports 2-D padding masks only "
        f"(got {type(attention_mask).__name__} of shape {tuple(getattr(attention_mask, 'shape', ()))})."
    )


def adaspark_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention-interface function: AdaS-Attn for layers of a patched model, causal SDPA otherwise."""
    if dropout:
        raise NotImplementedError("AdaSpark attention does not implement attention dropout (set it to 0)")
    bsz, nk = key.shape[0], key.shape[2]
    key_valid = _key_valid(attention_mask, bsz, nk, key.device)
    state = _ROUTES.get(module)
    if state is None:
        out = dense_causal_attention(query, key, value, scale=scaling, key_mask=key_valid)
    else:
        out = state.attention(module, query, key, value, key_valid, scaling)
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def register() -> None:
    """Register ``"adaspark"`` in transformers' attention and mask registries (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, adaspark_attention)
    AttentionMaskInterface.register(ATTN_NAME, adaspark_mask)
    _REGISTERED = True


def route(module: torch.nn.Module, state) -> None:
    _ROUTES[module] = state


def unroute(module: torch.nn.Module) -> None:
    _ROUTES.pop(module, None)
