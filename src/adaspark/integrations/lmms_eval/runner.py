"""What the ``adaspark_qwen2_5_vl`` lmms-eval model does, without importing lmms-eval.

:func:`parse_model_args` turns lmms-eval's ``--model_args`` (``key=value`` pairs, already split and
converted by lmms-eval, or plain strings) into :class:`RunSettings`: an
:class:`~adaspark.config.AdaSparkConfig` (``None`` for the dense model), video sampling and
generation settings. :class:`Runner` loads the checkpoint with transformers, answers one request
(one video + a prompt) with ``model.generate`` under :func:`adaspark.patch`, and keeps one record
per request (FLOPs dense / executed, saved fraction, densities, tokens, seconds), optionally
rewritten atomically to a JSONL file after every request.

Many processes (``accelerate launch -m lmms_eval ...`` or ``torchrun``): lmms-eval's evaluator itself
deals the documents to the ranks (document ``k`` to rank ``k mod world_size``), pads the shorter
ranks with copies of a request (``metadata["__padding_only__"]``) and gathers the answers and
metrics on rank 0. The model's part, as in lmms-eval's own models, is to run on its rank's device
(:func:`rank_device`), to report rank and world size, and to return one answer per request it was
given, in order. :func:`batch_requests` groups a rank's requests into ``batch_size`` batches the way
lmms-eval's models do (the same generation settings, task and split in one batch).

The lmms-eval class in :mod:`adaspark.integrations.lmms_eval.model` is a thin adapter over
:class:`Runner`; everything here can be used and tested without lmms-eval installed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaspark.config import AdaSparkConfig, config_fields, parse_field

__all__ = [
    "MODEL_ARGS",
    "RunSettings",
    "Runner",
    "answer_requests",
    "batch_requests",
    "parse_model_args",
    "rank_device",
    "summarize_records",
]

# ------------------------------------------------------------------------------ model_args
#: the AdaSparkConfig fields, each a model_arg of its own (parsed by adaspark.config.parse_field)
_CONFIG_KEYS = tuple(config_fields())

#: model_args that are not AdaSparkConfig fields, with their meaning
RUN_ARGS: dict[str, str] = {
    "pretrained": "checkpoint directory written by save_pretrained (a supported family)",
    "dense": "true: run the dense model (AdaSpark off; FLOPs are still counted)",
    "dtype": "auto (the checkpoint's), float32, bfloat16 or float16",
    "device": "cpu, cuda, cuda:N (default: cuda when available)",
    "fps": "video sampling rate (default 2.0)",
    "num_frames": "sample this many frames instead of a rate",
    "max_frames": "cap on the sampled frames (default 768)",
    "min_pixels": "per-frame pixel lower bound (default: the checkpoint's video processor, else 100352)",
    "max_pixels": "per-frame pixel upper bound (default: the checkpoint's video processor, else 602112)",
    "max_video_tokens": "cap on the LM tokens of one video (default 128000)",
    "max_new_tokens": "generation cap when the task gives none (default 32)",
    "report_path": "JSONL file that receives one AdaSpark record per request (rewritten atomically)",
    "batch_size": "requests per generate call (lmms-eval's --batch_size; auto = 1; Qwen families, "
    "others run one at a time)",
    "max_batch_size": "accepted for lmms-eval; ignored",
}
MODEL_ARGS: tuple[str, ...] = (*RUN_ARGS, *_CONFIG_KEYS)
"""Every key ``--model_args`` accepts: the run settings above plus the AdaSparkConfig fields."""

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null", ""})


def _as_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"model_args {key}={value!r}: expected true or false")


def _as_float(key: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"model_args {key}={value!r}: expected a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {key}={value!r}: expected a number") from None
    if not math.isfinite(out):
        raise ValueError(f"model_args {key}={value!r}: expected a finite number")
    return out


def _as_int(key: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"model_args {key}={value!r}: expected an integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError(f"model_args {key}={value!r}: expected an integer")


def _config_value(key: str, value):
    """A model_arg that is an AdaSparkConfig field (``cube=4x4x4`` or ``4``, ``dense_layers=0;-1``)."""
    return parse_field(key, value, what="model_args")


@dataclass(frozen=True)
class RunSettings:
    """Parsed ``--model_args`` of ``adaspark_qwen2_5_vl``.

    Attributes:
        pretrained: checkpoint directory.
        config: AdaSpark settings; ``None`` runs the dense model.
        dtype: parameter dtype, ``None`` keeps the checkpoint's.
        device: torch device string.
        video: keyword arguments for :func:`adaspark.video.load_video` given by the user (the
            checkpoint's processor settings fill the rest when the model is loaded).
        max_new_tokens: generation cap when a task gives none.
        report_path: JSONL file for the per-request records, or ``None``.
        batch_size: requests per ``generate`` call.
    """

    pretrained: Path
    config: AdaSparkConfig | None
    dtype: torch.dtype | None = None
    device: str = "cpu"
    video: dict = field(default_factory=dict)
    max_new_tokens: int = 32
    report_path: Path | None = None
    batch_size: int = 1


def parse_model_args(args: dict | str | None) -> RunSettings:
    """``--model_args`` → :class:`RunSettings`; every bad key or value raises ``ValueError`` naming it.

    ``args`` is a dict (lmms-eval has split ``key=value`` pairs and converted numbers and booleans)
    or the raw string ``"pretrained=PATH,p=0.5,cube=4x4x4"``. Keys: :data:`MODEL_ARGS`.
    ``dense=true`` with any AdaSpark setting is refused (they would be ignored silently).
    """
    if args is None:
        args = {}
    if isinstance(args, str):
        pairs = [a for a in args.split(",") if a.strip()]
        bad = [a for a in pairs if "=" not in a]
        if bad:
            raise ValueError(f"model_args {bad[0]!r}: expected key=value")
        args = dict(a.split("=", 1) for a in pairs)
        args = {k.strip(): v.strip() for k, v in args.items()}
    unknown = sorted(k for k in args if k not in MODEL_ARGS)
    if unknown:
        raise ValueError(
            f"unknown model_args {', '.join(unknown)} for adaspark_qwen2_5_vl; "
            f"accepted: {', '.join(MODEL_ARGS)}"
        )
    if _is_none(args.get("pretrained")):
        raise ValueError(
            "model_args pretrained=PATH is required (a checkpoint directory saved with save_pretrained)"
        )
    pretrained = Path(str(args["pretrained"])).expanduser()
    if not pretrained.is_dir():
        raise ValueError(f"model_args pretrained={str(pretrained)!r} is not a directory")
    if not (pretrained / "config.json").is_file():
        raise ValueError(
            f"model_args pretrained={str(pretrained)!r} has no config.json (not a save_pretrained checkpoint)"
        )

    dense = _as_bool("dense", args["dense"]) if "dense" in args else False
    fields = {k: _config_value(k, v) for k, v in args.items() if k in _CONFIG_KEYS}
    if dense and fields:
        raise ValueError(
            f"model_args dense=true cannot be combined with AdaSpark settings ({', '.join(fields)})"
        )
    try:
        config = None if dense else AdaSparkConfig(**fields)
    except ValueError as e:
        raise ValueError(f"model_args: {e}") from None

    dtype_name = str(args.get("dtype", "auto")).strip().lower()
    if dtype_name != "auto" and dtype_name not in _DTYPES:
        raise ValueError(f"model_args dtype={dtype_name!r}: expected auto, {', '.join(_DTYPES)}")
    dtype = None if dtype_name == "auto" else _DTYPES[dtype_name]

    device = args.get("device")
    if _is_none(device):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"model_args device={device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model_args device={device!r}: CUDA is not available on this machine")

    video: dict = {}
    if "fps" in args and not _is_none(args["fps"]):
        video["fps"] = _as_float("fps", args["fps"])
        if video["fps"] <= 0:
            raise ValueError(f"model_args fps={args['fps']!r} must be > 0")
    for key in ("num_frames", "max_frames", "min_pixels", "max_pixels", "max_video_tokens"):
        if key in args and not _is_none(args[key]):
            video[key] = _as_int(key, args[key])
            if video[key] < 1:
                raise ValueError(f"model_args {key}={args[key]!r} must be >= 1")
    if video.get("min_pixels", 0) > video.get("max_pixels", math.inf):
        raise ValueError("model_args min_pixels must not exceed max_pixels")

    max_new_tokens = _as_int("max_new_tokens", args.get("max_new_tokens", 32))
    if max_new_tokens < 1:
        raise ValueError(f"model_args max_new_tokens={max_new_tokens} must be >= 1")
    batch_size = 1
    for key in ("batch_size", "max_batch_size"):
        value = args.get(key)
        if not _is_none(value) and str(value).strip() != "auto":
            if _as_int(key, value) < 1:
                raise ValueError(f"model_args {key}={value!r} must be >= 1")
            if key == "batch_size":
                batch_size = _as_int(key, value)
    report_path = None
    if not _is_none(args.get("report_path")):
        report_path = Path(str(args["report_path"])).expanduser()
        if not report_path.resolve().parent.is_dir():
            raise ValueError(
                f"model_args report_path={str(report_path)!r}: "
                f"directory {str(report_path.resolve().parent)!r} does not exist"
            )
    return RunSettings(
        pretrained=pretrained,
        config=config,
        dtype=dtype,
        device=device,
        video=video,
        max_new_tokens=max_new_tokens,
        report_path=report_path,
        batch_size=batch_size,
    )


def rank_device(device: str, local_rank: int, world_size: int) -> str:
    """The device of one process of a ``world_size``-process run: ``cuda`` (any index) becomes
    ``cuda:local_rank`` when ``world_size > 1`` (one GPU per process, as lmms-eval's own models do);
    anything else, and every single-process device, is kept."""
    if world_size > 1 and torch.device(device).type == "cuda":
        return f"cuda:{local_rank}"
    return device


# ------------------------------------------------------------------------------ records
def summarize_records(records: list[dict]) -> dict:
    """Totals over the records (one per request, or one per batch with its ``requests`` listed):
    requests, FLOPs dense / executed and the saved fraction. lmms-eval's rank padding
    (``"padding": true``) is left out."""
    records = [r for r in records if not r.get("padding")]
    dense = sum(r["flops_dense"] for r in records)
    done = sum(r["flops"] for r in records)
    llm_dense = sum(r["decoder_flops_dense"] for r in records)
    llm_done = sum(r["decoder_flops"] for r in records)
    return {
        "requests": sum(len(r["requests"]) if "requests" in r else 1 for r in records),
        "flops_dense": dense,
        "flops": done,
        "saved": 1.0 - done / dense if dense else 0.0,
        "decoder_saved": 1.0 - llm_done / llm_dense if llm_dense else 0.0,
        "seconds": sum(r["seconds"] for r in records),
    }


def _cut_at_stops(text: str, until) -> str:
    stops = [s for s in (until or []) if isinstance(s, str) and s]
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# ------------------------------------------------------------------------------ the runner
class Runner:
    """A loaded checkpoint that answers video requests, dense or with AdaSpark, and records the cost."""

    def __init__(self, settings: RunSettings) -> None:
        from adaspark.integrations.transformers.loading import load_model

        self.settings = settings
        try:
            loaded = load_model(settings.pretrained, dtype=settings.dtype, device=settings.device)
        except ValueError as e:
            raise ValueError(f"model_args pretrained: {e}") from None
        if loaded.tokenizer is None:
            raise ValueError(
                f"model_args pretrained={str(settings.pretrained)!r} has no tokenizer files; "
                "the lmms-eval model needs one to read prompts and write answers"
            )
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = torch.device(settings.device)
        vs = loaded.settings  # the checkpoint's processor configs, read by the one reader
        self.video_kwargs = {**vs.video_kwargs(), "fps": vs.fps, **settings.video}
        # the dense run still goes through the patch (both modules off), so that the same counters
        # report its FLOPs
        self.config = settings.config or AdaSparkConfig(sparse_attn=False, sparse_ffn=False)
        self.records: list[dict] = []

    # ---------------------------------------------------------------- prompt and video
    def _video(self, visual):
        from adaspark.integrations.transformers.adapters import QWEN2_5_VL, QWEN2_VL
        from adaspark.video import load_video, read_video

        path = Path(str(visual))
        if not path.is_file():
            raise ValueError(f"video {str(path)!r} does not exist")
        if self.loaded.adapter in (QWEN2_5_VL, QWEN2_VL):
            return load_video(path, **self.video_kwargs)
        # other families: the Qwen frame sampling, then the family's own preprocessing
        kw = self.video_kwargs
        frames, meta = read_video(
            path,
            fps=None if kw.get("num_frames") else kw.get("fps"),
            num_frames=kw.get("num_frames"),
            max_frames=kw.get("max_frames"),
            temporal_patch_size=self.loaded.settings.temporal_patch_size,
        )
        bounds = {k: kw[k] for k in ("min_pixels", "max_pixels") if k in kw}
        settings = dataclasses.replace(self.loaded.settings, **bounds)
        return self.loaded.adapter.preprocess_video(self.model, frames, meta.sampled_fps, settings)

    def _inputs(self, text: str, video) -> dict:
        # placeholders of other models' prompt conventions; the video goes where the template puts it
        text = text.replace("<video>", "").replace("<image>", "").strip()
        inputs = self.loaded.inputs(video, text)
        return {k: v.to(self.device) for k, v in inputs.items()}

    # ---------------------------------------------------------------- generation
    def _generate_kwargs(self, gen_kwargs: dict) -> dict:
        out = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.settings.max_new_tokens)}
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        out["do_sample"] = sample
        if sample:
            out["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                out["top_p"] = float(gen_kwargs["top_p"])
        else:  # greedy: do not let the checkpoint's generation_config switch sampling on
            out.update(temperature=None, top_p=None, top_k=None)
        if gen_kwargs.get("num_beams"):
            out["num_beams"] = int(gen_kwargs["num_beams"])
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        if pad is not None:
            out["pad_token_id"] = int(pad)
        return out

    def answer(
        self, context: str, visuals, gen_kwargs: dict | None = None, *, meta: dict | None = None
    ) -> str:
        """Answer one request: ``context`` (the task's prompt) about ``visuals`` (one video path).

        Returns the generated text (cut at the first of ``gen_kwargs["until"]``); appends a record
        with the AdaSpark report to :attr:`records` (and to ``report_path`` when set).

        Raises:
            ValueError: not exactly one video, a video that is not a file path, an unreadable video.
        """
        return self.answer_batch([context], [visuals], gen_kwargs, metas=[meta])[0]

    def _request_inputs(self, context: str, visuals, meta: dict | None):
        visuals = [v for v in (visuals or []) if v is not None]
        where = f" ({meta['task']} doc {meta['doc_id']})" if meta and "task" in meta else ""
        if len(visuals) != 1 or not isinstance(visuals[0], (str, os.PathLike)):
            kinds = ", ".join(type(v).__name__ for v in visuals) or "none"
            raise ValueError(
                f"adaspark_qwen2_5_vl answers requests with exactly one video file; got {kinds}{where}"
            )
        try:
            video = self._video(visuals[0])
        except ValueError as e:  # VideoDecodeError included
            raise ValueError(f"{e}{where}") from None
        return str(visuals[0]), video, self._inputs(context, video)

    @property
    def batches(self) -> bool:
        """Whether requests can share one ``generate`` call (the Qwen families' flat video inputs)."""
        from adaspark.integrations.transformers.adapters import QWEN2_5_VL, QWEN2_VL, QWEN3_VL

        return self.loaded.adapter in (QWEN2_5_VL, QWEN2_VL, QWEN3_VL)

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}

    def answer_batch(
        self,
        contexts: list[str],
        visuals: list,
        gen_kwargs: dict | None = None,
        *,
        metas: list[dict | None] | None = None,
        padding: bool = False,
    ) -> list[str]:
        """Answer several requests with the same ``gen_kwargs`` in one ``generate`` call (left-padded
        prompts; each sample keeps its own cube ids). Returns the texts in order and appends one
        record (:meth:`answer`'s for a single request; for several, the batch's FLOPs and densities
        with the per-request fields under ``requests``). ``padding=True`` marks lmms-eval's rank
        padding in the record (left out of :meth:`summary`)."""
        import adaspark

        if not contexts or len(contexts) != len(visuals):
            raise ValueError("answer_batch needs one visuals list per context, at least one")
        if len(contexts) > 1 and not self.batches:
            return [
                self.answer_batch([c], [v], gen_kwargs, metas=[m], padding=padding)[0]
                for c, v, m in zip(contexts, visuals, metas or [None] * len(contexts), strict=True)
            ]
        gen_kwargs = dict(gen_kwargs or {})
        metas = list(metas or [None] * len(contexts))
        prepared = [self._request_inputs(c, v, m) for c, v, m in zip(contexts, visuals, metas, strict=True)]
        generate_kwargs = self._generate_kwargs(gen_kwargs)
        inputs = _collate([x[2] for x in prepared], generate_kwargs.get("pad_token_id", 0))
        n_prompt = int(inputs["input_ids"].shape[1])
        until = gen_kwargs.get("until")
        until = [until] if isinstance(until, str) else list(until or [])
        with torch.inference_mode(), adaspark.patch(self.model, self.config) as handle:
            start = time.perf_counter()
            out = self.model.generate(**inputs, **generate_kwargs)
            seconds = time.perf_counter() - start
            rep = handle.report()
        eos = self._eos_ids()
        texts, parts = [], []
        for row, (video_path, video, single), meta in zip(out, prepared, metas, strict=True):
            new_ids = row[n_prompt:].tolist()
            stop = next((k for k, t in enumerate(new_ids) if t in eos), None)
            new_ids = new_ids if stop is None else new_ids[: stop + 1]  # what follows is padding
            text = _cut_at_stops(self.tokenizer.decode(new_ids, skip_special_tokens=True), until).strip()
            texts.append(text)
            parts.append(
                {
                    **(meta or {}),
                    "video": video_path,
                    "grid_thw": [int(x) for x in video.video_grid_thw[0].tolist()],
                    "prompt_tokens": int(single["input_ids"].shape[1]),
                    "video_tokens": int(video.num_llm_tokens),
                    "new_tokens": len(new_ids),
                    "response": text,
                }
            )
        sparse = self.settings.config is not None
        cost = {
            "mode": "adaspark" if sparse else "dense",
            "config": self.settings.config.to_dict() if sparse else None,
            "flops_dense": float(rep.flops_dense),
            "flops": float(rep.flops_sparse if sparse else rep.flops_dense),
            "decoder_flops_dense": float(rep.llm_flops_dense),
            "decoder_flops": float(rep.llm_flops_sparse if sparse else rep.llm_flops_dense),
            "saved": float(rep.saved) if sparse else 0.0,
            "decoder_saved": float(rep.llm_saved) if sparse else 0.0,
            "attn_density": float(rep.attn_density) if sparse else 1.0,
            "ffn_active": float(rep.ffn_active) if sparse else 1.0,
            "seconds": seconds,
        }
        if len(parts) == 1:
            response = parts[0].pop("response")
            record = {**parts[0], **cost, "response": response}
        else:
            record = {"batch_size": len(parts), "requests": parts, **cost}
        if padding:
            record["padding"] = True
        self.records.append(record)
        self._write_record(record)
        return texts

    def _write_record(self, record: dict) -> None:
        """Append ``record`` as one line to ``report_path``, under a file lock (ranks of one run may
        share the file); lines already there (earlier runs, other runners) are kept."""
        path = self.settings.report_path
        if path is None:
            return
        from filelock import FileLock

        line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
        with FileLock(f"{path}.lock"), open(path, "a+b") as f:
            if f.seek(0, os.SEEK_END):
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a last line without its newline: keep it, start a new one
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def summary(self) -> dict:
        """:func:`summarize_records` over this runner's requests, with the mode and config."""
        cfg = self.settings.config
        return {
            "mode": "adaspark" if cfg is not None else "dense",
            "config": cfg.to_dict() if cfg is not None else None,
            **summarize_records(self.records),
        }


def _collate(inputs: list[dict], pad_id: int) -> dict:
    """One batch from one-request model inputs: the ``[1, N]`` prompt tensors left-padded (``input_ids``
    with ``pad_id``, masks and type ids with 0), the video tensors concatenated along dim 0."""
    if len(inputs) == 1:
        return inputs[0]
    n = max(int(x["input_ids"].shape[1]) for x in inputs)
    out = {}
    for key in inputs[0]:
        ts = [x[key] for x in inputs]
        if all(t.shape == x["input_ids"].shape for t, x in zip(ts, inputs, strict=True)):
            fill = pad_id if key == "input_ids" else 0
            ts = [torch.nn.functional.pad(t, (n - t.shape[1], 0), value=fill) for t in ts]
        out[key] = torch.cat(ts)
    return out


def batch_requests(args: list[tuple], batch_size: int, padding: list[bool] | None = None) -> list[list[int]]:
    """Group requests into batches of at most ``batch_size``, as lmms-eval's models do: one batch holds
    requests with the same generation settings (``args[1]``), task and split (``args[4:6]``) and
    padding flag; groups in the order of their first request, requests in their order. Returns the
    indices of each batch; every request is in exactly one."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    padding = padding or [False] * len(args)
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(args):
        key = json.dumps([a[1], a[4], a[5], bool(padding[i])], sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    return [g[k : k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]


def answer_requests(
    runner: Runner, requests, task_dict: dict, *, progress: bool = False, batch_size: int | None = None
) -> list[str]:
    """lmms-eval's ``generate_until`` for a "simple" model, on any objects shaped like its requests.

    Each request's ``args`` is ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the
    document is ``task_dict[task][split][doc_id]`` and ``doc_to_visual(doc)`` lists its video. The
    requests are answered in :func:`batch_requests` batches of ``batch_size`` (default: the runner's
    ``batch_size`` model_arg). Returns the answers in request order.
    """
    from tqdm.auto import tqdm

    requests = list(requests)
    size = runner.settings.batch_size if batch_size is None else batch_size
    padding = [bool((getattr(r, "metadata", None) or {}).get("__padding_only__")) for r in requests]
    answers: list[str | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="adaspark_qwen2_5_vl", disable=not (progress and requests))
    with bar:
        for batch in batch_requests([r.args for r in requests], size, padding):
            contexts, visuals, metas = [], [], []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                contexts.append(context)
                visuals.append(doc_to_visual(task_dict[task][split][doc_id]))
                metas.append({"task": task, "split": split, "doc_id": int(doc_id)})
            gen_kwargs = requests[batch[0]].args[1]
            texts = runner.answer_batch(contexts, visuals, gen_kwargs, metas=metas, padding=padding[batch[0]])
            for i, text in zip(batch, texts, strict=True):
                answers[i] = text
            bar.update(len(batch))
    return answers
