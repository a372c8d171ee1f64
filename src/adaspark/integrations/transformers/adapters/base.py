"""What a model family tells the shared AdaSpark mechanism: where its pieces are, how to read its layout.

The mechanism (``adaspark.integrations.transformers.patching``) is the same for every family: the
``"adaspark"`` attention backend, AdaS-FFN on each decoder MLP, cached cube mean keys for decoding,
FLOPs counters. An adapter only answers the family-specific questions:

* :meth:`ModelAdapter.find_parts` — the multimodal backbone, its language model and decoder layers,
  the vision modules (for FLOPs), the LM head and the placeholder token ids;
* :meth:`ModelAdapter.layout_from_call` — the video layout (which LM tokens are video, their cube
  ids) of a call's inputs: the backbone's forward or ``generate`` (both take what the processor
  returns); None when the call does not describe a video;
* :meth:`ModelAdapter.check` — configuration options the family cannot honour;
* for the loader (``adaspark.integrations.transformers.loading``): the family's video
  preprocessing (:meth:`ModelAdapter.preprocess_video`) and how a video and a question become a
  chat prompt (:meth:`ModelAdapter.prompt`; the family part is :meth:`ModelAdapter.video_block`).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch

from adaspark.config import AdaSparkConfig

__all__ = ["ModelAdapter", "ModelParts", "bind_call", "encode_text", "set_instance_attr", "special_id"]


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
    def layout_from_call(self, config: AdaSparkConfig, parts: ModelParts, bound: dict):
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

    # ---------------------------------------------------------------- inputs (for the loader)
    def default_video_settings(self, model: torch.nn.Module, base):
        """``base`` (a ``VideoSettings``) with the patch geometry of the model's vision config."""
        vcfg = getattr(model.config, "vision_config", None)
        upd = {}
        for key, attr in (
            ("patch_size", "patch_size"),
            ("temporal_patch_size", "temporal_patch_size"),
            ("merge_size", "spatial_merge_size"),
        ):
            value = getattr(vcfg, attr, None)
            if isinstance(value, int) and value > 0:
                upd[key] = value
        return replace(base, **upd)

    def preprocess_video(self, model: torch.nn.Module, frames, fps: float, settings):
        """``(T, H, W, 3)`` uint8 frames at ``fps`` → ``VideoInputs`` (default: the Qwen2-VL way)."""
        from adaspark.video import preprocess_video

        return preprocess_video(frames, fps=fps, **settings.video_kwargs())

    def video_block(self, model: torch.nn.Module, video, encode) -> tuple[list[int], list[int]]:
        """Token ids and types of one video in the prompt (default: ``<|vision_start|>``, the video
        placeholders, ``<|vision_end|>``). ``encode(text) -> ids`` encodes plain text."""
        cfg = model.config
        vs, vid, ve = int(cfg.vision_start_token_id), int(cfg.video_token_id), int(cfg.vision_end_token_id)
        n = int(video.num_llm_tokens)
        return [vs, *([vid] * n), ve], [0, *([2] * n), 0]

    def prompt(self, model: torch.nn.Module, tokenizer, video, question: str) -> dict:
        """``input_ids``, ``attention_mask`` and ``mm_token_type_ids`` (``[1, N]``) of a one-video prompt.

        With a tokenizer that has a chat template, the template renders a user turn holding the video
        and the question (and the assistant's generation prompt); its video placeholder (with the
        vision start/end tokens around it, if any) becomes :meth:`video_block`. A tokenizer without a
        template but with ``<|im_start|>`` / ``<|im_end|>`` gets the Qwen chat layout written out;
        any other gets the video block followed by the question. Without a tokenizer text becomes
        UTF-8 byte ids (``1 + byte``).
        """
        cfg = model.config
        vid = int(cfg.video_token_id)
        special = {vid, int(getattr(cfg, "image_token_id", vid))}
        for name in ("vision_start_token_id", "vision_end_token_id"):
            if getattr(cfg, name, None) is not None:
                special.add(int(getattr(cfg, name)))
        text_cfg = getattr(cfg, "text_config", cfg)
        vocab = int(getattr(text_cfg, "vocab_size", 0) or getattr(cfg, "vocab_size", 0))

        def encode(text: str) -> list[int]:
            if tokenizer is not None:
                return encode_text(tokenizer, text)
            return _byte_ids(text, vocab, special)

        block, block_types = self.video_block(model, video, encode)
        ids = types = None
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            for text in _chat_renderings(tokenizer, cfg, vid, question):
                rendered = encode_text(tokenizer, text)
                if rendered.count(vid) == 1:
                    at = rendered.index(vid)
                    lo, hi = at, at + 1
                    if block[0] != vid and at > 0 and rendered[at - 1] == block[0]:
                        lo = at - 1
                    if block[-1] != vid and hi < len(rendered) and rendered[hi] == block[-1]:
                        hi += 1
                    ids = rendered[:lo] + block + rendered[hi:]
                    types = [0] * lo + block_types + [0] * (len(rendered) - hi)
                    break
        if ids is None:
            q = encode(question)
            im_start = special_id(tokenizer, "<|im_start|>") if tokenizer is not None else None
            im_end = special_id(tokenizer, "<|im_end|>") if tokenizer is not None else None
            if im_start is not None and im_end is not None:  # the Qwen chat layout, written out
                user = [im_start, *encode("user\n")]
                assistant = [im_end, *encode("\n"), im_start, *encode("assistant\n")]
                ids = user + block + q + assistant
                types = [0] * len(user) + block_types + [0] * (len(q) + len(assistant))
            else:
                ids = block + q
                types = block_types + [0] * len(q)
        input_ids = torch.tensor([ids], dtype=torch.long)
        if int((input_ids == vid).sum()) != block.count(vid):
            raise ValueError("the question text contains the video placeholder token; remove it")
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": torch.tensor([types], dtype=torch.long),
        }

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


def _chat_renderings(tokenizer, cfg, vid: int, question: str):
    """The chat template's renderings of a user turn with one video and ``question``, best first: the
    multimodal form (content parts, as Qwen's templates take them), then, for a text-only template
    (e.g. a Llama / SmolLM2 one), the video block's tokens written into the text before the question."""
    parts = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    placeholder = ""
    if convert is not None:
        ids = [getattr(cfg, "vision_start_token_id", None), vid, getattr(cfg, "vision_end_token_id", None)]
        placeholder = "".join(str(convert(int(i))) for i in ids if i is not None)
    plain = [{"role": "user", "content": placeholder + question}] if placeholder else None
    for messages in (parts, plain):
        if messages is None:
            continue
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that cannot render this turn: try the next form
            continue
        if isinstance(text, str):
            yield text


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without special tokens added."""
    if not text:
        return []
    if callable(tokenizer):
        out = tokenizer(text, add_special_tokens=False)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(text)]


def special_id(tokenizer, token: str) -> int | None:
    """Id of a special token the tokenizer knows as one token, else None."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is None:
        return None
    try:
        tid = convert(token)
    except (KeyError, ValueError, TypeError):
        return None
    if not isinstance(tid, int) or tid < 0 or tid == getattr(tokenizer, "unk_token_id", None):
        return None
    return tid


def _byte_ids(text: str, vocab_size: int, reserved: set[int]) -> list[int]:
    """Plain ids for a model without a tokenizer: UTF-8 byte ``b`` becomes id ``1 + b``."""
    ids = [1 + b for b in text.encode("utf-8")]
    bad = [i for i in ids if i >= vocab_size or i in reserved]
    if bad:
        raise ValueError(
            f"the model has no tokenizer and its vocabulary ({vocab_size} ids) cannot hold the question "
            "as byte ids; use a checkpoint with a tokenizer"
        )
    return ids
