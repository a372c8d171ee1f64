"""Every part of transformers' surface that AdaSpark leans on, in one place.

The rest of the integration never names a transformers attribute, keyword or private function
directly: it asks this module. When upstream changes one of them, the test suite goes red here
(``tests/test_compat.py`` checks each name against the installed version), and at run time the
integration raises :class:`TransformersCompatError` naming the installed version and the tested
range — it never falls back to a silent dense run.

What is used, and why:

* ``transformers.cache_utils.Cache`` — the KV cache is found by its type among a forward's
  arguments, never by keyword name (5.24 renamed ``past_key_values`` to ``cache``).
* ``Cache.get_seq_length()`` — how many tokens a cache already holds.
* the output field of the cache (``cache`` from 5.24, ``past_key_values`` before) — read under
  either name.
* ``AttentionInterface`` / ``AttentionMaskInterface`` (public registries) — the ``"adaspark"``
  backend and its mask function.
* ``transformers.masking_utils.causal_mask_function`` — only as a fast path: any other mask function
  is probed (see ``attention.py``), so packed sequences work without knowing how transformers builds
  their mask.
* ``config._attn_implementation`` — which attention the text model runs; ``patch`` switches it and
  every patched forward checks it (a ``set_attn_implementation`` after ``patch`` is an error, not a
  half-sparse model).
"""

from __future__ import annotations

import inspect
import warnings

import torch

__all__ = [
    "TESTED_MAX",
    "TESTED_MIN",
    "TransformersCompatError",
    "attn_implementation",
    "cache_keyword",
    "cache_length",
    "check_version",
    "compat_error",
    "find_cache",
    "is_cache",
    "is_plain_causal",
    "output_cache",
    "register_attention",
    "set_attn_implementation",
    "transformers_version",
    "version_tuple",
]

#: the oldest transformers release the integration is tested with (SGLang 0.5.23 pins it)
TESTED_MIN = "5.19.0"
#: the newest transformers release the integration is tested with
TESTED_MAX = "5.24.0"


class TransformersCompatError(RuntimeError, ValueError):
    """transformers does not behave as the integration expects (a renamed or removed surface), or a
    call does not carry what the integration needs; a ``ValueError`` too, so that commands report it
    as one line."""


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"5.24.0"`` -> ``(5, 24, 0)``; suffixes such as ``.dev0`` or ``rc1`` are dropped."""
    out = []
    for part in version.split(".")[:3]:
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        out.append(int(digits or 0))
    while len(out) < 3:
        out.append(0)
    return tuple(out)


def tested_range() -> str:
    return f"{TESTED_MIN} to {TESTED_MAX}"


def compat_error(what: str) -> TransformersCompatError:
    """An error that names the installed transformers and the tested range."""
    return TransformersCompatError(
        f"AdaSpark: {what} (transformers {transformers_version()}; AdaSpark is tested with "
        f"transformers {tested_range()})"
    )


_WARNED: set[str] = set()


def check_version() -> bool:
    """Warn once per process when the installed transformers is outside the tested range.

    Returns True inside the range.
    """
    ver = transformers_version()
    inside = version_tuple(TESTED_MIN) <= version_tuple(ver) <= version_tuple(TESTED_MAX)
    if not inside and ver not in _WARNED:
        _WARNED.add(ver)
        warnings.warn(
            f"AdaSpark is tested with transformers {tested_range()}, but {ver} is installed; "
            "patch() checks every hook it needs and raises if one is missing, but behaviour outside "
            "the tested range is not verified",
            stacklevel=3,
        )
    return inside


# ------------------------------------------------------------------------------------------ caches
def _cache_type() -> type:
    try:
        from transformers.cache_utils import Cache
    except ImportError as err:  # pragma: no cover - only on an unsupported transformers
        raise compat_error("transformers.cache_utils.Cache is missing") from err
    return Cache


def is_cache(value) -> bool:
    return isinstance(value, _cache_type())


def find_cache(args: tuple, kwargs: dict):
    """The KV cache among a call's arguments (by type, whatever its keyword), or None."""
    cache_t = _cache_type()
    for v in kwargs.values():
        if isinstance(v, cache_t):
            return v
    for v in args:
        if isinstance(v, cache_t):
            return v
    return None


def cache_length(cache) -> int:
    """Tokens the cache already holds (0 for None)."""
    if cache is None:
        return 0
    fn = getattr(cache, "get_seq_length", None)
    if fn is None:
        raise compat_error(f"the KV cache {type(cache).__name__} has no get_seq_length()")
    n = fn()
    return int(n.item()) if isinstance(n, torch.Tensor) else int(n)


def output_cache(output):
    """The KV cache a model output returns (``cache`` from 5.24, ``past_key_values`` before).

    An output class that declares ``cache`` is read under that name only: on 5.24 reading
    ``past_key_values`` (even when ``cache`` is None, ``use_cache=False``) logs transformers'
    deprecation warning in the user's run."""
    declared = getattr(output, "__dataclass_fields__", None) or {}
    names = ("cache",) if "cache" in declared else ("cache", "past_key_values")
    for name in names:
        try:
            value = output[name] if isinstance(output, dict) else getattr(output, name, None)
        except KeyError:
            value = None
        if value is not None and is_cache(value):
            return value
    return None


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword under which ``module.forward`` takes its KV cache in the installed transformers."""
    params = inspect.signature(type(module).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise compat_error(
        f"{type(module).__name__}.forward takes neither `cache` nor `past_key_values`; cannot pass a KV cache"
    )


# ------------------------------------------------------------------------------------------ attention
def register_attention(name: str, attention_fn, mask_fn) -> None:
    """Register an attention backend and its mask function (public registries, idempotent)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:
        raise compat_error("AttentionInterface / AttentionMaskInterface cannot be imported") from err
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, mask_fn)


def is_plain_causal(mask_function) -> bool:
    """True when ``mask_function`` is transformers' own plain causal mask (the common case)."""
    if mask_function is None:
        return True
    try:
        from transformers.masking_utils import causal_mask_function
    except ImportError:
        return False
    return mask_function is causal_mask_function


def attn_implementation(config) -> str | None:
    """The attention implementation a (text) config selects."""
    return getattr(config, "_attn_implementation", None)


def set_attn_implementation(config, name: str | None) -> None:
    """Select ``name`` for the layers that read ``config`` (what ``patch`` switches and restores)."""
    if not hasattr(config, "_attn_implementation"):
        raise compat_error(f"{type(config).__name__} has no _attn_implementation; cannot route attention")
    config._attn_implementation = name
