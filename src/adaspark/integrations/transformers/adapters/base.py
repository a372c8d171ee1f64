"""What a model family tells the shared AdaSpark mechanism: where its pieces are, how to read its layout.

The mechanism (``adaspark.integrations.transformers.patching``) is the same for every family: the
``"adaspark"`` attention backend, AdaS-FFN on each decoder MLP, cached cube mean keys for decoding,
FLOPs counters. An adapter only answers the family-specific questions:

* :meth:`ModelAdapter.find_parts` — the multimodal backbone, its language model and decoder layers,
  the vision modules (for FLOPs), the LM head and the placeholder token ids;
* :meth:`ModelAdapter.layout_from_call` — the video layout (which LM tokens are video, their cube
  ids) of a call's inputs: the backbone's forward or ``generate`` (both take what the processor
  returns); None when the call does not describe a video;
* :meth:`ModelAdapter.check` — configuration options the family cannot honour.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from adaspark.config import AdaSparkConfig

__all__ = ["ModelAdapter", "ModelParts", "bind_call", "set_instance_attr"]


@dataclass
class ModelParts:
    """The modules AdaSpark hooks into.

    Attributes:
        model: what the user passed to ``patch``.
        vl: the multimodal backbone that embeds the video and calls the language model.
        language_model: the decoder stack (``.layers``, each with ``self_attn``, ``mlp`` and
            ``post_attention_layernorm``).
        layers: its decoder layers.
        vision: modules whose FLOPs count as the vision encoder (encoder, projector).
        lm_head: the output projection, or None for a backbone.
        text_config: the language model's config (its ``_attn_implementation`` is switched).
        video_token_id / image_token_id: placeholder token ids in ``input_ids``.
    """

    model: torch.nn.Module
    vl: torch.nn.Module
    language_model: torch.nn.Module
    layers: list
    vision: tuple[torch.nn.Module, ...]
    lm_head: torch.nn.Module | None
    text_config: object
    video_token_id: int
    image_token_id: int


class ModelAdapter(ABC):
    """Base class of the per-family adapters (one small subclass or instance per family).

    Attributes:
        name: family name shown to users, e.g. ``"Qwen2.5-VL"``.
        model_type: ``config.model_type`` of the family.
        class_names: transformers classes (names in ``transformers``) it handles; subclasses of them
            match too.
    """

    name: str = ""
    model_type: str = ""
    class_names: tuple[str, ...] = ()
    #: how to give the model what it needs for its video layout (shown when it cannot be captured)
    layout_hint: str = ""

    def classes(self) -> tuple[type, ...]:
        """The transformers classes of :attr:`class_names` that the installed version has."""
        import transformers

        found = []
        for name in self.class_names:
            try:
                cls = getattr(transformers, name)
            except (AttributeError, ImportError):
                continue
            found.append(cls)
        return tuple(found)

    def matches(self, model: torch.nn.Module) -> bool:
        classes = self.classes()
        return bool(classes) and isinstance(model, classes)

    def describe(self) -> str:
        return f"{self.name} ({' / '.join(self.class_names)})"

    # ---------------------------------------------------------------- to implement per family
    @abstractmethod
    def find_parts(self, model: torch.nn.Module) -> ModelParts:
        """The modules AdaSpark hooks into; ``ValueError`` when the structure is not the expected one."""

    @abstractmethod
    def layout_from_call(self, state, parts: ModelParts, bound: dict):
        """``(input_ids, Layout)`` of a call's inputs (``bound``: its arguments by name), or None.

        ``bound`` are the arguments of the backbone's ``forward`` or of ``generate``. None when they
        do not describe a video (no grids, no pixel values); ``ValueError`` when they describe one
        that does not fit the tokens.
        """

    def install(self, state, parts: ModelParts, undo: list, hooks: list) -> None:
        """Family-specific hooks beyond the shared ones (default: none); append undo / hook handles."""
        return None

    def check(self, config: AdaSparkConfig, parts: ModelParts) -> None:
        """Raise ``ValueError`` for options this family cannot honour (default: none)."""
        return None

    def vision_key(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Cache key of one vision-module call whose FLOPs depend only on the key (None: do not cache).

        Default: shapes and dtypes of the tensor arguments.
        """
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not tensors:
            return None
        return tuple((tuple(t.shape), t.dtype) for t in tensors)

    # ---------------------------------------------------------------- shared helpers
    def _backbone(self, model: torch.nn.Module, attr: str) -> torch.nn.Module:
        """The module holding ``language_model`` and ``attr`` (the model's ``.model`` or the model)."""
        for cand in (getattr(model, "model", None), model):
            if cand is not None and hasattr(cand, attr) and hasattr(cand, "language_model"):
                return cand
        raise ValueError(
            f"{type(model).__name__} does not have the {self.name} structure AdaSpark expects "
            f"({attr}, language_model.layers); is this transformers >= 5?"
        )

    def _language_model(self, vl: torch.nn.Module) -> torch.nn.Module:
        lm = getattr(vl, "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise ValueError(
                f"{type(vl).__name__} has no language_model.layers; AdaSpark expects the {self.name} "
                "structure of transformers >= 5"
            )
        return lm


def bind_call(fn, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call to ``fn`` by parameter name (positional ones included)."""
    try:
        return dict(inspect.signature(fn).bind_partial(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return dict(kwargs)


def set_instance_attr(obj, name: str, value, undo: list) -> None:
    """Set ``obj.name`` on the instance (shadowing the class attribute); ``undo`` gets the restore."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    object.__setattr__(obj, name, value)

    def restore() -> None:
        if had:
            object.__setattr__(obj, name, old)
        else:
            obj.__dict__.pop(name, None)

    undo.append(restore)
