"""The shipped needle model: a tiny Qwen2.5-VL trained here on the needle benchmark, and how to use it.

The model is the real ``Qwen2_5_VLForConditionalGeneration`` with a small config (see
:func:`needle_config`), a word-level tokenizer built locally with the ``tokenizers`` library
(:func:`build_tokenizer`) and Qwen-style processor configs. It is saved with ``save_pretrained``
under :data:`DEFAULT_MODEL_DIR` (shipped inside the package) and loaded with ``from_pretrained``
(:func:`load_model`): the same loading path as a real checkpoint. ``scripts/train_needle_model.py``
reproduces it; the model card (``README.md`` in that directory) states data, steps, time and accuracy.

Prompt (the Qwen chat layout, one video then the question) and answer::

    <|im_start|> user <|vision_start|> <|video_pad|> × N <|vision_end|>
    what shape appeared in the video ? <|im_end|> <|im_start|> assistant  circle <|im_end|>

The model answers with the words of the right option. A multiple-choice question is scored by
option likelihood (:func:`run_model`): every option's words are scored as the answer and the most
likely option is the prediction — the usual way to score multiple choice with a small language
model. (The model was first trained to answer with the option *letter* after a lettered list of
options; matching an answer to its letter did not form within the CPU training budget, see the
model card, so the letter is not used.)

Video preprocessing uses :mod:`adaspark.video` (no torchvision) with the sizes of the checkpoint's
``video_preprocessor_config.json`` (:func:`video_settings`), which is what transformers'
``Qwen2VLVideoProcessor`` would read from the same directory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adaspark.config import AdaSparkConfig
from adaspark.integrations.transformers import compat

if TYPE_CHECKING:  # pragma: no cover
    from adaspark.bench.needle import NeedleItem
    from adaspark.video import VideoInputs

__all__ = [
    "ANSWER_LETTERS",
    "DEFAULT_MODEL_DIR",
    "SPECIAL_TOKENS",
    "VideoSettings",
    "answer_item",
    "build_tokenizer",
    "encode_prompt",
    "letter_token_ids",
    "load_model",
    "needle_config",
    "option_token_ids",
    "preprocess_frames",
    "prompt_text",
    "run_model",
    "unknown_words",
    "video_settings",
    "write_processor_configs",
]

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parents[2] / "assets" / "needle-qwen2_5_vl"
"""The shipped checkpoint (package data of ``adaspark``)."""

ANSWER_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

#: Qwen's chat and vision special tokens (the ids follow this order), plus the unknown-word token
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|unk|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: words of the chat template besides the benchmark's vocabulary
_CHAT_WORDS: tuple[str, ...] = ("system", "user", "assistant")
#: the word pattern of ``adaspark.bench.needle.tokenize`` (lower-case words and single marks)
_WORD_PATTERN = r"[a-z0-9]+|[^\sa-z0-9]"

#: frame size the model is trained on; every video is resized to at most this many pixels per frame
TRAIN_SIZE = 112
DEFAULT_VIDEO_FPS = 2.0


# ---------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(words):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` plus :data:`SPECIAL_TOKENS`.

    Text is lower-cased and split into runs of ``[a-z0-9]`` and single other characters (the units
    of :func:`adaspark.bench.needle.tokenize`); a unit outside the vocabulary becomes ``<|unk|>``.
    Ids: the special tokens first (``<|endoftext|>`` = 0, the padding), then the sorted words.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words) | set(_CHAT_WORDS)):
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<|unk|>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        model_max_length=65536,
        padding_side="left",
    )


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of the answer letters A–D (lower-cased by the tokenizer's normaliser)."""
    ids = []
    for letter in ANSWER_LETTERS:
        enc = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(enc) != 1 or enc[0] == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no single token for the answer letter {letter!r}")
        ids.append(enc[0])
    return ids


# ---------------------------------------------------------------------------------------- config
def needle_config(
    tokenizer,
    *,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 64,
    vision_depth: int = 2,
    vision_heads: int = 2,
    tokens_per_second: int = 2,
    rope_theta: float = 10000.0,
    tie_embeddings: bool = False,
):
    """The ``Qwen2_5_VLConfig`` of the needle model (special-token ids from ``tokenizer``)."""
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden_size // num_heads
    half = head_dim // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=65536,
        rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": rope_theta},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=tie_embeddings,
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        num_heads=vision_heads,
        intermediate_size=2 * vision_hidden,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=[vision_depth - 1],
        window_size=56,
        tokens_per_second=tokens_per_second,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_embeddings,
    )


# ---------------------------------------------------------------------------------------- processor
@dataclass(frozen=True)
class VideoSettings:
    """What ``video_preprocessor_config.json`` fixes: pixel bounds, geometry, normalisation, fps."""

    min_pixels: int = 4 * 28 * 28
    max_pixels: int = TRAIN_SIZE * TRAIN_SIZE
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    fps: float = DEFAULT_VIDEO_FPS

    def to_processor_json(self, kind: str) -> dict:
        """The JSON transformers' ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` would save."""
        d = {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "merge_size": self.merge_size,
            "patch_size": self.patch_size,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": self.max_pixels, "shortest_edge": self.min_pixels},
            "temporal_patch_size": self.temporal_patch_size,
        }
        if kind == "image":
            d["image_processor_type"] = "Qwen2VLImageProcessor"
        else:
            d.update(
                video_processor_type="Qwen2VLVideoProcessor",
                do_sample_frames=False,
                fps=self.fps,
                min_frames=4,
                max_frames=768,
            )
        return d


def write_processor_configs(directory: str | os.PathLike, settings: VideoSettings | None = None) -> None:
    """Write ``preprocessor_config.json``, ``video_preprocessor_config.json`` and
    ``processor_config.json`` as transformers' Qwen2.5-VL processor would (atomically)."""
    from adaspark.core.io import atomic_write_json

    settings = settings or VideoSettings()
    directory = Path(directory)
    atomic_write_json(directory / "preprocessor_config.json", settings.to_processor_json("image"))
    atomic_write_json(directory / "video_preprocessor_config.json", settings.to_processor_json("video"))
    atomic_write_json(directory / "processor_config.json", {"processor_class": "Qwen2_5_VLProcessor"})


def video_settings(path: str | os.PathLike | None = None) -> VideoSettings:
    """Preprocessing settings of the checkpoint at ``path`` (default: the shipped model).

    Reads ``video_preprocessor_config.json`` (or ``preprocessor_config.json``); a checkpoint
    without either gets the settings the shipped model was trained with.
    """
    directory = Path(path) if path is not None else DEFAULT_MODEL_DIR
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        f = directory / name
        if f.is_file():
            d = json.loads(f.read_text(encoding="utf-8"))
            size = d.get("size") or {}
            base = VideoSettings()
            return VideoSettings(
                min_pixels=int(size.get("shortest_edge", d.get("min_pixels", base.min_pixels))),
                max_pixels=int(size.get("longest_edge", d.get("max_pixels", base.max_pixels))),
                patch_size=int(d.get("patch_size", base.patch_size)),
                temporal_patch_size=int(d.get("temporal_patch_size", base.temporal_patch_size)),
                merge_size=int(d.get("merge_size", base.merge_size)),
                image_mean=tuple(float(x) for x in d.get("image_mean", base.image_mean)),
                image_std=tuple(float(x) for x in d.get("image_std", base.image_std)),
                fps=float(d.get("fps") or base.fps),
            )
    return VideoSettings()


def preprocess_frames(frames, fps: float, settings: VideoSettings | None = None) -> VideoInputs:
    """``(T, H, W, 3)`` uint8 frames at ``fps`` → :class:`~adaspark.video.VideoInputs` for the model."""
    from adaspark.video import preprocess_video

    s = settings or VideoSettings()
    return preprocess_video(
        frames,
        patch_size=s.patch_size,
        temporal_patch_size=s.temporal_patch_size,
        merge_size=s.merge_size,
        min_pixels=s.min_pixels,
        max_pixels=s.max_pixels,
        image_mean=s.image_mean,
        image_std=s.image_std,
        fps=fps,
    )


# ---------------------------------------------------------------------------------------- prompt
def prompt_text(question: str, options) -> str:
    """The question with lettered options and an instruction, as plain text (the benchmark's
    multiple-choice form, for models that answer with a letter; ``options=None``: the question alone).

    The shipped needle model is prompted with the question alone and scored by option likelihood
    (:func:`run_model`); this form is what letter-answering models and the lmms-eval task use.
    """
    if options is None:
        return question.strip()
    if not 2 <= len(options) <= len(ANSWER_LETTERS):
        raise ValueError(f"a question needs 2 to {len(ANSWER_LETTERS)} options, got {len(options)}")
    lines = [question.strip()]
    lines += [f"{letter}. {str(opt).strip()}" for letter, opt in zip(ANSWER_LETTERS, options, strict=False)]
    lines.append("Answer with the letter.")
    return "\n".join(lines)


def unknown_words(tokenizer, texts) -> list[str]:
    """The words of ``texts`` that ``tokenizer`` does not know (they would become ``<|unk|>``)."""
    unk = tokenizer.unk_token_id
    found = set()
    for text in texts:
        for word, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(str(text).lower()):
            if tokenizer.convert_tokens_to_ids(word) == unk:
                found.add(word)
    return sorted(found)


def encode_prompt(tokenizer, video: VideoInputs, question: str, options=None) -> dict:
    """Model inputs (batch of one) for ``video`` and ``question`` in the Qwen chat layout::

        <|im_start|> user <|vision_start|> <|video_pad|> x N <|vision_end|> QUESTION <|im_end|>
        <|im_start|> assistant

    The answer (an option's text, then ``<|im_end|>``) follows. ``options`` are not written into the
    prompt; they only count for ``unknown_words``. Returns ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids``, ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts`` and
    ``unknown_words`` (words of the question and options the tokenizer does not know).
    """
    before = tokenizer.convert_tokens_to_ids(["<|im_start|>", "user", "<|vision_start|>"])
    body = tokenizer(question.strip(), add_special_tokens=False)["input_ids"]
    after = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "assistant"])
    vid = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    n = int(video.num_llm_tokens)
    ids = [*before, *([vid] * n), end, *body, *after]
    types = [0] * len(before) + [2] * n + [0] * (1 + len(body) + len(after))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "mm_token_type_ids": torch.tensor([types], dtype=torch.long),
        **video.as_model_kwargs(),
        "unknown_words": unknown_words(tokenizer, [question, *(options or [])]),
    }


def option_token_ids(tokenizer, options) -> list[list[int]]:
    """The answer tokens of every option: its words, then ``<|im_end|>``."""
    if not 2 <= len(options) <= len(ANSWER_LETTERS):
        raise ValueError(f"a question needs 2 to {len(ANSWER_LETTERS)} options, got {len(options)}")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for opt in options:
        ids = tokenizer(str(opt), add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"option {opt!r} has no words")
        out.append([*ids, end])
    return out


# ---------------------------------------------------------------------------------------- loading
def load_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a checkpoint directory (default: the shipped model), in eval mode.

    Raises:
        FileNotFoundError: ``path`` is not a directory holding ``config.json``.
        ImportError: transformers is not installed.
    """
    directory = Path(path).expanduser() if path is not None else DEFAULT_MODEL_DIR
    if not (directory / "config.json").is_file():
        what = "the shipped needle model" if path is None else "a model checkpoint"
        raise FileNotFoundError(f"{str(directory)!r} is not {what} directory (no config.json)")
    try:
        from transformers import AutoModelForImageTextToText, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the model needs transformers 5.x: pip install 'adaspark[hf]' ({e})") from None
    from transformers.utils import logging as hf_logging

    bar_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny model loads at once: no "Loading weights" bar on stderr
    try:
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    finally:
        if bar_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------- answering
def run_model(model, inputs: dict, options_ids, config: AdaSparkConfig | None) -> dict:
    """Score every option by its likelihood as the answer; FLOPs and wall time of the whole scoring.

    One prefill forward over the prompt (with a KV cache) gives the first answer token's
    distribution; each option's remaining tokens are scored by one short forward that continues
    from the cache (cropped back after it). An option's score is the mean log-probability of its
    tokens (``<|im_end|>`` included); ``pred`` is the best. ``config=None`` runs dense (through
    :func:`adaspark.patch` with both modules off, so that the same counters report the dense
    FLOPs); otherwise AdaSpark with ``config``. The report covers the prefill and the continuations.
    """
    import adaspark

    cfg = config if config is not None else AdaSparkConfig(sparse_attn=False, sparse_ffn=False)
    kwargs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.inference_mode(), adaspark.patch(model, cfg) as handle:
        start = time.perf_counter()
        out = model(**kwargs, use_cache=True, logits_to_keep=1)
        cache = compat.output_cache(out)
        cache_kw = compat.cache_keyword(model)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        scores = []
        for ids in options_ids:
            logp = [first[ids[0]]]
            if len(ids) > 1:
                cont = torch.tensor([ids[:-1]], dtype=torch.long, device=kwargs["input_ids"].device)
                step = model(input_ids=cont, use_cache=True, **{cache_kw: cache})
                lp = torch.log_softmax(step.logits[0].float(), dim=-1)
                logp += [lp[j, ids[j + 1]] for j in range(len(ids) - 1)]
                cache.crop(-(len(ids) - 1))
            scores.append(float(torch.stack(logp).mean()))
        seconds = time.perf_counter() - start
        rep = handle.report()
    probs = torch.softmax(torch.tensor(scores), dim=0)
    firsts = {ids[0] for ids in options_ids}
    flops_sparse = rep.flops_sparse if config is not None else rep.flops_dense
    llm_sparse = rep.llm_flops_sparse if config is not None else rep.llm_flops_dense
    return {
        "pred": int(torch.tensor(scores).argmax()),
        "option_scores": scores,
        "option_probs": [float(x) for x in probs],
        "top_token_in_options": int(first.argmax()) in firsts,
        "flops": float(flops_sparse),
        "flops_dense": float(rep.flops_dense),
        "flops_ideal": float(rep.flops_sparse_ideal if config is not None else rep.flops_dense),
        "decoder_flops": float(llm_sparse),
        "decoder_flops_dense": float(rep.llm_flops_dense),
        "decoder_flops_ideal": float(
            rep.llm_flops_sparse_ideal if config is not None else rep.llm_flops_dense
        ),
        "seconds": seconds,
        "tokens": int(rep.tokens),
        "video_tokens": int(rep.video_tokens),
        "attn_density": float(rep.attn_density) if config is not None else 1.0,
        "ffn_active": float(rep.ffn_active) if config is not None else 1.0,
        "report": rep,
    }


def answer_item(
    model, tokenizer, item: NeedleItem, config: AdaSparkConfig | None, *, frames=None, settings=None
) -> dict:
    """Answer one needle item: the ``AnswerFn`` result of :mod:`adaspark.bench.evaluate`.

    Args:
        model / tokenizer: from :func:`load_model`.
        item: the question (and the recipe of its video).
        config: AdaSpark settings, or ``None`` for the dense model.
        frames: the item's frames ``(T, H, W, 3)`` uint8 if already at hand (else rendered).
        settings: preprocessing settings (default: those of the shipped model).

    Returns:
        ``{"pred", "flops", "flops_dense", "decoder_flops", "decoder_flops_dense", "seconds", ...}``
        (``pred`` indexes ``item.options``: the option the model finds most likely as its answer;
        the option scores, ideal FLOPs, token counts and mean densities are extras).
    """
    if frames is None:
        from adaspark.bench.needle import render_frames

        frames = render_frames(item)
    video = preprocess_frames(frames, item.fps, settings)
    inputs = encode_prompt(tokenizer, video, item.question)
    result = run_model(model, inputs, option_token_ids(tokenizer, item.options), config)
    result.pop("report")
    result["correct"] = result["pred"] == item.answer
    return result
