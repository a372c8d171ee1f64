"""`AdaSparkConfig`: the one place where every AdaSpark default lives.

The config is a frozen dataclass. Every field is validated in ``__post_init__``; an invalid value
raises ``ValueError`` naming the field and the allowed range. Use :meth:`AdaSparkConfig.replace` to
derive a variant (it validates again).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from adaspark.core.layout import adaptive_cube_bounds
from adaspark.ops.attention import (
    ATTENTION_BACKENDS,
    BACKEND_GRANULARITIES,
    DENSE_BLOCK_FRACTION,
    FLEX_MIN_TOKENS,
    GATHER_FRACTION,
    GRANULARITIES,
)
from adaspark.ops.ffn import SUM_CHUNK
from adaspark.ops.selection import SelectionPolicy

Policy = Literal["top_p", "top_k", "ratio"]
Backend = Literal["auto", "reference", "blocked", "decode", "gather", "flex", "native", "triton"]
Granularity = Literal["token", "cube"]
CubeMode = Literal["fixed", "adaptive"]

POLICIES: tuple[str, ...] = ("top_p", "top_k", "ratio")
CUBE_MODES: tuple[str, ...] = ("fixed", "adaptive")
BACKENDS: tuple[str, ...] = ("auto", *ATTENTION_BACKENDS)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(name: str, value, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"AdaSparkConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _check_unit_interval(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ValueError(f"AdaSparkConfig.{name} must be a number in [0, 1], got {value!r}")


def _check_fraction(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"AdaSparkConfig.{name} must be a number in (0, 1], got {value!r}")
    if not (0.0 < float(value) <= 1.0):
        raise ValueError(f"AdaSparkConfig.{name} must be in (0, 1], got {value!r}")


def _set_cube(config, name: str, *, allow_none: bool) -> None:
    """Check the cube-shaped field ``name`` (three positive integers (t, h, w)) and store it as a tuple."""
    value = getattr(config, name)
    if value is None and allow_none:
        return
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 3
        or not all(_is_int(c) and c >= 1 for c in value)
    ):
        what = "None or three" if allow_none else "three"
        raise ValueError(
            f"AdaSparkConfig.{name} must be {what} positive integers (t, h, w) in LM tokens, got {value!r}"
        )
    object.__setattr__(config, name, tuple(int(c) for c in value))


@dataclass(frozen=True)
class AdaSparkConfig:
    """Settings of AdaSpark (adaptive cube-selective attention + token-selective FFN).

    Attributes:
        p: Top-p threshold shared by both modules, ``0 < p <= 1``. ``p = 1`` keeps everything and
            reproduces the dense model.
        p_attn: Optional override of ``p`` for AdaS-Attn (cube selection).
        p_ffn: Optional override of ``p`` for AdaS-FFN (token selection inside cubes).
        cube: Cube size ``(t, h, w)`` in LM tokens (after the 2×2 spatial merge). Edge cubes may
            be smaller.
        cube_mode: ``"fixed"`` (default): every video is tiled by ``cube``. ``"adaptive"``: each
            video gets as many cubes as that tiling, shaped by its content
            (:func:`adaspark.core.layout.adaptive_grid_cube_ids`, from the decoder's input
            embeddings): tiled by ``adaptive_max_cube`` first, then the cube whose cut in two best
            lowers the spread of its tokens' features is cut, until the count is reached — static
            regions keep long, large cubes, busy ones small cubes. Every cube is a box; the
            guarantees of fixed cubes hold unchanged (own cube, causality, p = 1 equals dense). It
            needs the whole prompt in one prefill (no chunked prefill) and transformers (not vLLM).
        adaptive_max_cube / adaptive_min_cube: Largest and smallest adaptive cube ``(t, h, w)``;
            ``None``: ``(4·ct, 2·ch, 2·cw)`` and ``(⌈ct/4⌉, ⌈ch/4⌉, ⌈cw/4⌉)`` around ``cube``.
        dense_layers: Decoder layer indices that stay fully dense (attention and FFN). Negative
            indices count from the end.
        policy: Selection policy for both modules: ``"top_p"`` (default, the paper's adaptive
            nucleus), ``"top_k"`` (keep a fixed number, ablation) or ``"ratio"`` (keep a fixed
            fraction, ablation).
        top_k: Number of cubes kept per query (attention) under ``policy="top_k"``.
        top_k_tokens: Number of tokens kept per cube (FFN) under ``policy="top_k"``.
        ratio: Fraction of candidate cubes / cube tokens kept under ``policy="ratio"``
            (rounded up, at least one).
        min_cubes: Every query keeps at least this many candidate cubes (besides its own cube),
            when that many exist.
        max_cubes: Optional cap on the number of candidate cubes a query keeps.
        sparse_attn: Switch AdaS-Attn on/off (off: dense attention everywhere).
        sparse_ffn: Switch AdaS-FFN on/off (off: dense FFN everywhere).
        mean_compensation: Give skipped FFN tokens the mean FFN update of the active tokens of
            their cube (the paper's method). ``False`` gives them a zero update (ablation).
        images_as_video: Treat each image as a one-frame video (cubed, sparse). Default: images
            are non-video tokens (always attended, dense FFN).
        granularity: Granularity of the cube selection. ``"token"``: every query selects its own
            cubes (the paper's formulation, the reference semantics of
            :mod:`adaspark.ops.attention.reference`). ``"cube"``: all video
            queries of a cube share one set, the Top-p set of the average of their distributions;
            costs ~1/cube-size of the per-token selection and lets the kernels skip whole blocks
            (non-video queries still select per token).
        backend: ``"reference"`` (naive, materialises masks; for testing), ``"blocked"``
            (per-token selection, gathers the kept keys per query block), ``"decode"`` (a few new
            tokens after a cache read only the kept cubes' K/V; per-token selection),
            ``"gather"`` (cube-major blocks, kept key blocks gathered per GQA group), ``"flex"``
            (compiled ``flex_attention`` with a block mask from the selection; prefill),
            ``"native"`` (the C++ block-sparse kernel for the CPU, built on first use; no
            gradients), ``"triton"`` (the Triton block-sparse kernel for CUDA; needs
            ``adaspark[triton]``; no gradients) or ``"auto"`` (picks the efficient path for the
            device, dtype and call: native on CPU when it builds and no gradient is needed, triton
            for prefills on CUDA when installed, else flex for long prefills on CUDA,
            gather otherwise, decode for new tokens, dense SDPA when the policy keeps everything).
            ``blocked`` and ``decode`` select per token, so they need ``granularity="token"`` (the
            pair is checked here, naming both fields).
        cost_model: Decide per layer and call whether sparse attention pays, from a cost model of
            this machine (:mod:`adaspark.ops.attention.cost`: dense SDPA, the selection and the
            block kernel timed once per machine, dtype and head shape, cached in
            ``$ADASPARK_CACHE/attention_costs.json``): a prefill runs dense attention where the
            selection alone would cost more than it could save, or where the kept blocks would not
            beat dense. Such calls are dense attention (a superset of AdaS-Attn's keys), reported
            as such (``LayerReport.attn_dense_calls``). ``False``: the ``dense_fallback`` rule.
        dense_fallback: With ``cost_model=False``: when the block kernels would compute more than
            this fraction of a layer's causal (query, key) pairs, the layer runs dense attention
            instead (prefills of at least ``flex_min_tokens`` tokens). ``None`` (with
            ``cost_model=False``) keeps the exact AdaS-Attn semantics always.
        query_block: Block size (tokens) of the attention path; ``None`` = the path's default
            (128 for blocked, 64 for gather and flex).
        flex_min_tokens: ``backend="auto"`` compiles flex_attention (CUDA; CPU without the native
            kernel) for prefills of at least this many tokens (below, the compile time is not paid
            back; gather runs instead), and the fixed ``dense_fallback`` rule is decided from this
            many tokens on. Integer ``>= 0``; default :data:`adaspark.ops.attention.FLEX_MIN_TOKENS`
            (4096).
        decode_gather_fraction: The ``decode`` backend gathers the kept K/V when they are at most
            this fraction of the causal prefix and attends the prefix in place (masked) above it.
            In ``[0, 1]``; default :data:`adaspark.ops.attention.decode.GATHER_FRACTION` (0.35).
        blocked_dense_fraction: The ``blocked`` backend attends a query block's causal prefix in
            place (masked) when the block keeps at least this fraction of it, instead of gathering
            the kept keys. In ``[0, 1]``; default
            :data:`adaspark.ops.attention.blocked.DENSE_BLOCK_FRACTION` (0.75).
        ffn_sum_chunk: The gathered FFN upcasts at most this many FFN output rows at a time to
            float32 for the cube means (a memory bound). Integer ``>= 1``; default
            :data:`adaspark.ops.ffn.gathered.SUM_CHUNK` (4096).

        budget: Budget mode: a target fraction in ``(0, 1]`` of the dense *decoder* FLOPs that
            a prefill executes (``Report.llm_flops_sparse / Report.llm_flops_dense``, as
            :mod:`adaspark.core.accounting` counts them). Each prefill chooses, layer by layer,
            the Top-p thresholds of AdaS-Attn and AdaS-FFN that land its executed FLOPs on the
            target (within a few percent); later forwards on its cache (decode steps, later
            chunks) reuse each layer's thresholds (``p`` where none was chosen). Below the floor
            that projections, text tokens and own cubes set, it does the most it can and the
            report says the budget was not reachable. Needs ``policy="top_p"``,
            ``p_attn = p_ffn = None`` and ``dense_fallback = None``; the cost model's run-dense
            decisions are not applied in budget mode (a dense layer would spend the budget).
            ``None`` (default): the thresholds are ``p`` / ``p_attn`` / ``p_ffn``.

    The four kernel thresholds (``flex_min_tokens`` to ``ffn_sum_chunk``) are speed trade-offs:
    none changes what AdaS-Attn or AdaS-FFN computes (except that ``flex_min_tokens`` also sets
    where ``dense_fallback`` starts). Their defaults are the constants of :mod:`adaspark.ops`, where
    each number is written once.
    """

    p: float = 0.9
    p_attn: float | None = None
    p_ffn: float | None = None
    cube: tuple[int, int, int] = (4, 4, 4)
    cube_mode: CubeMode = "fixed"
    adaptive_max_cube: tuple[int, int, int] | None = None
    adaptive_min_cube: tuple[int, int, int] | None = None
    dense_layers: tuple[int, ...] = ()
    policy: Policy = "top_p"
    top_k: int = 8
    top_k_tokens: int = 16
    ratio: float = 0.25
    min_cubes: int = 0
    max_cubes: int | None = None
    sparse_attn: bool = True
    sparse_ffn: bool = True
    mean_compensation: bool = True
    images_as_video: bool = False
    granularity: Granularity = "cube"
    backend: Backend = "auto"
    cost_model: bool = True
    dense_fallback: float | None = None
    query_block: int | None = None
    flex_min_tokens: int = FLEX_MIN_TOKENS
    decode_gather_fraction: float = GATHER_FRACTION
    blocked_dense_fraction: float = DENSE_BLOCK_FRACTION
    ffn_sum_chunk: int = SUM_CHUNK
    budget: float | None = None

    def __post_init__(self) -> None:
        _check_fraction("p", self.p)
        _check_fraction("p_attn", self.p_attn, allow_none=True)
        _check_fraction("p_ffn", self.p_ffn, allow_none=True)
        _set_cube(self, "cube", allow_none=False)
        if self.cube_mode not in CUBE_MODES:
            raise ValueError(f"AdaSparkConfig.cube_mode must be one of {CUBE_MODES}, got {self.cube_mode!r}")
        _set_cube(self, "adaptive_max_cube", allow_none=True)
        _set_cube(self, "adaptive_min_cube", allow_none=True)
        try:
            adaptive_cube_bounds(self.cube, self.adaptive_max_cube, self.adaptive_min_cube)
        except ValueError as e:
            raise ValueError(f"AdaSparkConfig.adaptive_max_cube / adaptive_min_cube: {e}") from None
        layers = self.dense_layers
        if isinstance(layers, int) or not all(_is_int(i) for i in layers):
            raise ValueError(
                f"AdaSparkConfig.dense_layers must be a sequence of layer indices (ints), got {layers!r}"
            )
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in layers))
        if self.policy not in POLICIES:
            raise ValueError(f"AdaSparkConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ValueError(f"AdaSparkConfig.top_k must be an integer >= 1, got {self.top_k!r}")
        if not _is_int(self.top_k_tokens) or self.top_k_tokens < 1:
            raise ValueError(
                f"AdaSparkConfig.top_k_tokens must be an integer >= 1, got {self.top_k_tokens!r}"
            )
        _check_fraction("ratio", self.ratio)
        if not _is_int(self.min_cubes) or self.min_cubes < 0:
            raise ValueError(f"AdaSparkConfig.min_cubes must be an integer >= 0, got {self.min_cubes!r}")
        if self.max_cubes is not None and (not _is_int(self.max_cubes) or self.max_cubes < 1):
            raise ValueError(
                f"AdaSparkConfig.max_cubes must be None or an integer >= 1, got {self.max_cubes!r}"
            )
        if self.max_cubes is not None and self.max_cubes < self.min_cubes:
            raise ValueError(
                f"AdaSparkConfig.max_cubes ({self.max_cubes}) must be >= min_cubes ({self.min_cubes})"
            )
        for name in ("sparse_attn", "sparse_ffn", "mean_compensation", "images_as_video", "cost_model"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AdaSparkConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"AdaSparkConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"AdaSparkConfig.granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        supported = BACKEND_GRANULARITIES[self.backend]
        if self.granularity not in supported:
            others = [b for b, g in BACKEND_GRANULARITIES.items() if self.granularity in g]
            raise ValueError(
                f"AdaSparkConfig.backend={self.backend!r} does not support "
                f"AdaSparkConfig.granularity={self.granularity!r} (it selects per {supported[0]}); "
                f"use granularity={supported[0]!r}, or one of the backends {others} for "
                f"granularity={self.granularity!r}"
            )
        _check_fraction("dense_fallback", self.dense_fallback, allow_none=True)
        if self.cost_model and self.dense_fallback is not None:
            raise ValueError(
                f"AdaSparkConfig.dense_fallback={self.dense_fallback!r} is the fixed rule of "
                "cost_model=False; with cost_model=True the measured cost model decides: set one"
            )
        if self.query_block is not None and (not _is_int(self.query_block) or self.query_block < 1):
            raise ValueError(
                f"AdaSparkConfig.query_block must be None or an integer >= 1, got {self.query_block!r}"
            )
        _check_int("flex_min_tokens", self.flex_min_tokens, 0)
        _check_unit_interval("decode_gather_fraction", self.decode_gather_fraction)
        _check_unit_interval("blocked_dense_fraction", self.blocked_dense_fraction)
        _check_int("ffn_sum_chunk", self.ffn_sum_chunk, 1)
        _check_fraction("budget", self.budget, allow_none=True)
        if self.budget is not None:
            if self.policy != "top_p":
                raise ValueError(
                    f"AdaSparkConfig.budget needs policy='top_p' (it chooses the Top-p thresholds), "
                    f"got policy={self.policy!r}"
                )
            for name in ("p_attn", "p_ffn"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"AdaSparkConfig.{name}={getattr(self, name)!r} cannot be combined with "
                        f"AdaSparkConfig.budget={self.budget!r}: budget mode chooses the thresholds; "
                        f"set {name}=None"
                    )
            if self.dense_fallback is not None:
                raise ValueError(
                    f"AdaSparkConfig.dense_fallback={self.dense_fallback!r} cannot be combined with "
                    f"AdaSparkConfig.budget={self.budget!r}: a dense layer would spend the budget; "
                    "set dense_fallback=None"
                )

    # ------------------------------------------------------------------ derived values
    @property
    def attn_p(self) -> float:
        """Threshold used by AdaS-Attn (``p_attn`` if set, else ``p``)."""
        return float(self.p if self.p_attn is None else self.p_attn)

    @property
    def ffn_p(self) -> float:
        """Threshold used by AdaS-FFN (``p_ffn`` if set, else ``p``)."""
        return float(self.p if self.p_ffn is None else self.p_ffn)

    def attn_policy(self) -> SelectionPolicy:
        """The cube-selection policy of AdaS-Attn as an ops-level :class:`SelectionPolicy`."""
        return SelectionPolicy(
            kind=self.policy,
            p=self.attn_p,
            k=self.top_k,
            ratio=self.ratio,
            min_keep=self.min_cubes,
            max_keep=self.max_cubes,
        )

    def ffn_policy(self) -> SelectionPolicy:
        """The token-selection policy of AdaS-FFN as an ops-level :class:`SelectionPolicy`."""
        return SelectionPolicy(kind=self.policy, p=self.ffn_p, k=self.top_k_tokens, ratio=self.ratio)

    def attention_options(self) -> dict:
        """The keyword arguments of :func:`~adaspark.ops.attention.cube_sparse_attention` that come
        straight from this config (path, granularity and the speed thresholds), for its callers."""
        return {
            "query_block": self.query_block,
            "granularity": self.granularity,
            "dense_fallback": self.dense_fallback,
            "flex_min_tokens": self.flex_min_tokens,
            "decode_gather_fraction": self.decode_gather_fraction,
            "blocked_dense_fraction": self.blocked_dense_fraction,
        }

    def is_dense_layer(self, layer_idx: int, num_layers: int) -> bool:
        """Whether decoder layer ``layer_idx`` (of ``num_layers``) is kept dense."""
        return any((i % num_layers) == layer_idx for i in self.dense_layers if -num_layers <= i < num_layers)

    def replace(self, **changes) -> AdaSparkConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------ fields as options
@dataclass(frozen=True)
class FieldSpec:
    """How one :class:`AdaSparkConfig` field is written as an option (CLI flag, ``key=value``).

    Attributes:
        name: the field name.
        kind: ``"float"``, ``"int"``, ``"bool"``, ``"choice"``, ``"ints"`` (a sequence of ints) or
            ``"int3"`` (exactly three ints, the cube).
        optional: ``None`` is a valid value.
        choices: the allowed values of a ``"choice"`` field.
        default: the field's default.
    """

    name: str
    kind: str
    optional: bool
    choices: tuple[str, ...] = ()
    default: object = None


def config_fields() -> dict[str, FieldSpec]:
    """Every field of :class:`AdaSparkConfig` with how it is parsed, derived from its type hints
    (one source for the CLI flags of every command and for the lmms-eval ``model_args``)."""
    import typing

    hints = typing.get_type_hints(AdaSparkConfig)
    out: dict[str, FieldSpec] = {}
    for f in dataclasses.fields(AdaSparkConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if optional else hint
        origin = typing.get_origin(base)
        if origin is typing.Literal:
            spec = FieldSpec(f.name, "choice", optional, tuple(typing.get_args(base)), f.default)
        elif base is bool:
            spec = FieldSpec(f.name, "bool", optional, default=f.default)
        elif base is int:
            spec = FieldSpec(f.name, "int", optional, default=f.default)
        elif base is float:
            spec = FieldSpec(f.name, "float", optional, default=f.default)
        elif origin is tuple and typing.get_args(base)[-1:] == (Ellipsis,):
            spec = FieldSpec(f.name, "ints", optional, default=f.default)
        elif origin is tuple:
            spec = FieldSpec(f.name, "int3", optional, default=f.default)
        else:  # pragma: no cover - a new field of a type nobody taught this function
            raise TypeError(f"AdaSparkConfig.{f.name}: no option form for the type {hint!r}")
        out[f.name] = spec
    return out


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_field(name: str, value, *, what: str | None = None):
    """``value`` (a string such as ``"0.5"``, ``"4x4x4"``, ``"true"``, ``"none"``, or an already typed
    value) as the value of field ``name``; a ``ValueError`` names ``what name`` (default
    ``AdaSparkConfig.name``)."""
    specs = config_fields()
    label = f"{what} {name}" if what else f"AdaSparkConfig.{name}"
    if name not in specs:
        raise ValueError(f"{label}: not an AdaSparkConfig field; fields: {', '.join(specs)}")
    spec = specs[name]
    text = value.strip() if isinstance(value, str) else None
    if spec.optional and (value is None or (text is not None and text.lower() in {"none", "null", ""})):
        return None
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if text is not None and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{label}={value!r}: expected true or false")
    if spec.kind == "choice":
        if value not in spec.choices:
            raise ValueError(f"{label}={value!r}: expected one of {', '.join(spec.choices)}")
        return value
    if spec.kind in ("int", "float"):
        expected = "an integer" if spec.kind == "int" else "a number"
        try:
            num = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            num = math.nan
        if not math.isfinite(num) or (spec.kind == "int" and not num.is_integer()):
            raise ValueError(f"{label}={value!r}: expected {expected}")
        return int(num) if spec.kind == "int" else num
    # int sequences: "4x4x4", "4,4,4", "0;-1" (lmms-eval's model_args split on commas), or a sequence
    if spec.kind == "ints" and (value is None or (text is not None and text.lower() in {"none", "null", ""})):
        return ()
    if text is not None:
        parts = [p for p in text.replace("x", ",").replace(";", ",").replace(" ", ",").split(",") if p]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    else:
        parts = list(value)
    try:
        ints = [parse_field_int(p) for p in parts]
    except ValueError:
        raise ValueError(f"{label}={value!r}: expected integers such as 4x4x4 or 0,1") from None
    if spec.kind == "int3" and len(ints) == 1:
        ints = ints * 3  # one size for t, h and w
    if spec.kind == "int3" and len(ints) != 3:
        raise ValueError(f"{label}={value!r}: expected three integers such as 4x4x4")
    return tuple(ints)


def parse_field_int(value) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    num = float(value)
    if not num.is_integer():
        raise ValueError(value)
    return int(num)


def config_from_options(
    options: dict, *, base: AdaSparkConfig | None = None, what: str = "option"
) -> AdaSparkConfig:
    """An :class:`AdaSparkConfig` from ``{field: value}`` with string or typed values (unknown keys
    raise ``ValueError``); the fields not given keep ``base`` (default: the defaults)."""
    parsed = {k: parse_field(k, v, what=what) for k, v in options.items()}
    return (base or AdaSparkConfig()).replace(**parsed)
