"""Evaluation harness: run a benchmark for dense and AdaSpark variants, resumably.

The harness knows nothing about models. An *answer function* takes an item and a :class:`Variant`
and returns the model's choice and what it cost::

    def answer_fn(item, variant) -> dict:
        # {"pred": int, "flops": float, "flops_dense": float, "decoder_flops": float,
        #  "decoder_flops_dense": float, "seconds": float, ...anything extra (JSON-able)}

:func:`run_eval` calls it for every (item, variant) pair — item-major: all variants of one item in a
row, so an answer function may cache the item's frames — and appends one JSON line per pair to
``out_dir/results.jsonl``, flushed and fsynced before the next call. A killed run resumes where it
stopped: pairs already in the file are skipped, and a torn last line (a write cut short) is cut off
and recomputed, never duplicated. At the end it writes, each atomically, ``summary.csv`` and
``summary.md`` (accuracy and FLOPs saved per variant × length × task, with "all" rows) and
``accuracy_vs_flops.png`` (matplotlib, drawn without pyplot or a global backend switch).

Variants (:func:`standard_variants`): dense; ``top_p`` at each ``p``; the fixed-budget policies
``top_k`` and ``ratio`` at (approximately) the FLOPs of ``top_p`` at the same ``p``; and ``top_p``
without mean compensation. The harness cannot know FLOPs before running, so the fixed budgets come
from one of two rules:

* default (no measurement): kept fraction ``f = p²`` — a prior for the peaked distributions of a
  trained model (top-p keeps about ``p`` of a flat distribution, far less of a peaked one);
  ``ratio = f``, ``top_k_tokens = ceil(f · cube volume)``, ``top_k = ceil(f · reference_cubes)``
  where ``reference_cubes`` is the cube count of a reference video (256 frames of 112×112 by
  default: 32 cubes of 4×4×4 tokens). The FLOPs every variant really spent are measured and
  reported, so the plot shows how close the match came.
* :func:`calibrate_budgets` (measured): runs ``top_p`` on a few calibration items, then bisects
  ``ratio`` and ``top_k`` until their mean decoder FLOPs match; pass its result as ``budgets=``.

Example::

    from adaspark.needle.evaluate import run_eval, standard_variants
    from adaspark.needle import make_split

    items = make_split("test", 8, (64, 256))
    run_eval(items, standard_variants(), answer_fn, "runs/needle")
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adaspark.needle import TASKS, NeedleItem

if TYPE_CHECKING:
    from adaspark.config import AdaSparkConfig
    from adaspark.core.sharding import Shard

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "REQUIRED_KEYS",
    "AnswerFn",
    "Budget",
    "Variant",
    "calibrate_budgets",
    "load_results",
    "merge_results",
    "run_eval",
    "shard_items",
    "standard_variants",
    "summarize",
    "write_summary",
]

RESULTS_FILE = "results.jsonl"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PLOT_FILE = "accuracy_vs_flops.png"

REQUIRED_KEYS: tuple[str, ...] = ("flops", "flops_dense", "decoder_flops", "decoder_flops_dense", "seconds")
"""Numeric keys every answer function must return, besides ``pred``."""


@dataclass(frozen=True)
class Variant:
    """One way of running the model: ``config=None`` is the dense model."""

    name: str
    config: AdaSparkConfig | None = None

    def config_dict(self) -> dict | None:
        return None if self.config is None else _jsonable(self.config.to_dict())


AnswerFn = Callable[[NeedleItem, Variant], dict]


@dataclass(frozen=True)
class Budget:
    """Fixed budgets that stand in for ``top_p`` at one ``p``.

    Attributes:
        ratio: ``AdaSparkConfig.ratio`` of the ``ratio`` variant.
        top_k: ``AdaSparkConfig.top_k`` (cubes per query) of the ``top_k`` variant.
        top_k_tokens: ``AdaSparkConfig.top_k_tokens`` (FFN tokens per cube) of the ``top_k`` variant.
        source: How the numbers were found (``"prior p^2"`` or ``"calibrated on N items"``).
    """

    ratio: float
    top_k: int
    top_k_tokens: int
    source: str = "prior p^2"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _prior_budget(p: float, cube: Sequence[int], reference_cubes: int) -> Budget:
    f = p * p
    vol = math.prod(cube)
    return Budget(
        ratio=f,
        top_k=max(1, math.ceil(f * reference_cubes)),
        top_k_tokens=max(1, min(vol, math.ceil(f * vol))),
    )


def _reference_cubes(cube: Sequence[int], frames: int, height: int, width: int) -> int:
    t = math.ceil(frames / 2 / cube[0])
    h = math.ceil(height / 28 / cube[1])
    w = math.ceil(width / 28 / cube[2])
    return t * h * w


def _check_ps(ps) -> list[float]:
    ps = [ps] if isinstance(ps, (int, float)) else list(ps)
    if not ps:
        raise ValueError("need at least one p")
    for p in ps:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"every p must be a number in (0, 1], got {p!r}")
    if len(set(ps)) != len(ps):
        raise ValueError(f"duplicate p values in {ps}")
    return [float(p) for p in ps]


#: variant families of :func:`standard_variants`; the default sweep runs the first four
FAMILIES: tuple[str, ...] = ("top_p", "top_k", "ratio", "no_comp", "adaptive")
DEFAULT_FAMILIES: tuple[str, ...] = FAMILIES[:4]


def standard_variants(
    ps: Sequence[float] = (0.9, 0.7, 0.5, 0.3),
    *,
    base: AdaSparkConfig | None = None,
    budgets: Mapping[float, Budget] | None = None,
    families: Sequence[str] = DEFAULT_FAMILIES,
    reference_frames: int = 256,
    reference_size: tuple[int, int] = (112, 112),
    flop_budgets: Sequence[float] = (),
) -> list[Variant]:
    """Dense plus, for every ``p``, the requested families (in this order per ``p``).

    Families: ``"top_p"`` (``top_p@p``, the paper's method), ``"top_k"`` (``top_k@p``) and
    ``"ratio"`` (``ratio@p``) at the budget matched to ``top_p@p``, ``"no_comp"``
    (``top_p@p-nocomp``: AdaS-FFN without mean compensation) and ``"adaptive"``
    (``top_p@p-adaptive``: content-adaptive cubes, ``cube_mode="adaptive"``; with ``flop_budgets``
    also ``budget@B-adaptive``, the comparison with fixed cubes at matched FLOPs).

    Args:
        ps: Top-p thresholds, each in (0, 1].
        base: Config the variants derive from (cube size, backend, dense layers, ...); default
            ``AdaSparkConfig()``.
        budgets: Measured budgets per ``p`` (from :func:`calibrate_budgets`); missing ``p`` values
            use the ``p²`` prior (see the module docstring).
        reference_frames / reference_size: The video whose cube count scales ``top_k`` in the prior.
        flop_budgets: Budget-mode targets (``AdaSparkConfig.budget``, fractions of the dense decoder
            FLOPs), one ``budget@B`` variant each, after the others.

    Raises:
        ValueError: a bad ``p`` or an unknown family.
    """
    from adaspark.config import AdaSparkConfig

    ps = _check_ps(ps)
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown variant families {sorted(unknown)}; use {', '.join(FAMILIES)}")
    base = AdaSparkConfig() if base is None else base
    ref = _reference_cubes(base.cube, reference_frames, *reference_size)
    budgets = dict(budgets or {})
    out = [Variant("dense", None)]
    for p in ps:
        b = budgets.get(p) or _prior_budget(p, base.cube, ref)
        for fam in families:
            if fam == "top_p":
                out.append(Variant(f"top_p@{p:g}", base.replace(policy="top_p", p=p)))
            elif fam == "top_k":
                cfg = base.replace(policy="top_k", p=p, top_k=b.top_k, top_k_tokens=b.top_k_tokens)
                out.append(Variant(f"top_k@{p:g}", cfg))
            elif fam == "ratio":
                out.append(Variant(f"ratio@{p:g}", base.replace(policy="ratio", p=p, ratio=b.ratio)))
            elif fam == "adaptive":
                cfg = base.replace(policy="top_p", p=p, cube_mode="adaptive")
                out.append(Variant(f"top_p@{p:g}-adaptive", cfg))
            else:
                cfg = base.replace(policy="top_p", p=p, mean_compensation=False)
                out.append(Variant(f"top_p@{p:g}-nocomp", cfg))
    for b in flop_budgets:
        out.append(Variant(f"budget@{b:g}", base.replace(policy="top_p", budget=b)))
        if "adaptive" in families:
            cfg = base.replace(policy="top_p", budget=b, cube_mode="adaptive")
            out.append(Variant(f"budget@{b:g}-adaptive", cfg))
    return out


def _mean_decoder_fraction(items, answer_fn, variant) -> float:
    total = dense = 0.0
    for item in items:
        r = _check_answer(answer_fn(item, variant), item, variant)
        total += float(r["decoder_flops"])
        dense += float(r["decoder_flops_dense"])
    if dense <= 0:
        raise ValueError(f"answer function reported decoder_flops_dense <= 0 for variant {variant.name!r}")
    return total / dense


def calibrate_budgets(
    items: Sequence[NeedleItem],
    answer_fn: AnswerFn,
    ps: Sequence[float] = (0.9, 0.7, 0.5, 0.3),
    *,
    base: AdaSparkConfig | None = None,
    iterations: int = 7,
    max_top_k: int = 4096,
) -> dict[float, Budget]:
    """Measure fixed budgets whose mean decoder FLOPs match those of ``top_p`` at each ``p``.

    For each ``p``: the target is the mean decoder-FLOPs fraction of ``top_p@p`` over ``items``;
    ``ratio`` is bisected ``iterations`` times on (0, 1]; then ``top_k_tokens`` is set to
    ``round(ratio · cube volume)`` and ``top_k`` (cubes) is found by doubling and integer bisection.
    The candidate closest to the target wins. Costs about ``len(items) · (1 + iterations + 2·log2(k))``
    answer calls per ``p``; two or three items of the length you care about are enough (the fixed
    policies cost nearly the same on every item of one length).
    """
    from adaspark.config import AdaSparkConfig

    ps = _check_ps(ps)
    items = list(items)
    if not items:
        raise ValueError("calibrate_budgets needs at least one item")
    base = AdaSparkConfig() if base is None else base
    return {p: _calibrate_one(items, answer_fn, base, p, iterations, max_top_k) for p in ps}


def _calibrate_one(items, answer_fn, base, p: float, iterations: int, max_top_k: int) -> Budget:
    def frac(**changes) -> float:
        return _mean_decoder_fraction(items, answer_fn, Variant("calibration", base.replace(p=p, **changes)))

    target = frac(policy="top_p")
    lo, hi = 0.0, 1.0
    best_r, best_err = 1.0, math.inf
    for _ in range(iterations):
        mid = (lo + hi) / 2
        err = frac(policy="ratio", ratio=mid) - target
        if abs(err) < best_err:
            best_r, best_err = mid, abs(err)
        lo, hi = (mid, hi) if err < 0 else (lo, mid)
    vol = math.prod(base.cube)
    k_tokens = max(1, min(vol, round(best_r * vol)))
    seen: dict[int, float] = {}

    def at(k: int) -> float:
        if k not in seen:
            seen[k] = frac(policy="top_k", top_k=k, top_k_tokens=k_tokens)
        return seen[k]

    hi_k = 1  # double until the target is reached or more cubes stop adding FLOPs
    while at(hi_k) < target and hi_k < max_top_k and (hi_k == 1 or at(hi_k) > at(hi_k // 2)):
        hi_k *= 2
    lo_k = max(1, hi_k // 2)
    while hi_k - lo_k > 1:
        mid = (lo_k + hi_k) // 2
        lo_k, hi_k = (mid, hi_k) if at(mid) < target else (lo_k, mid)
    best_k = min(seen, key=lambda k: (abs(seen[k] - target), k))
    return Budget(best_r, best_k, k_tokens, source=f"calibrated on {len(items)} items")


# --------------------------------------------------------------------------------- the run
def _check_answer(result, item: NeedleItem, variant: Variant) -> dict:
    where = f"answer function on item {item.id!r}, variant {variant.name!r}"
    if not isinstance(result, Mapping):
        raise ValueError(f"{where}: must return a dict, got {type(result).__name__}")
    pred = result.get("pred")
    if isinstance(pred, bool) or not hasattr(pred, "__index__"):
        raise ValueError(f"{where}: 'pred' must be an option index (int), got {pred!r}")
    if not 0 <= int(pred) < len(item.options):
        raise ValueError(f"{where}: 'pred' = {pred} is not an option index 0..{len(item.options) - 1}")
    for key in REQUIRED_KEYS:
        v = result.get(key)
        if isinstance(v, bool) or not (isinstance(v, (int, float)) or hasattr(v, "__float__")):
            raise ValueError(f"{where}: {key!r} must be a number, got {v!r}")
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"{where}: {key!r} must be finite and >= 0, got {v!r}")
    return dict(result)


def _json_default(obj):
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _make_row(item: NeedleItem, variant: Variant, result: dict, shard: Shard | None = None) -> dict:
    row = {
        "item_id": item.id,
        "variant": variant.name,
        "split": item.split,
        "seed": item.seed,
        "task": item.task,
        "num_frames": item.num_frames,
        "answer": item.answer,
        "pred": int(result["pred"]),
        "correct": int(result["pred"]) == item.answer,
        "config": variant.config_dict(),
        "shard": None if shard is None else str(shard),
    }
    for key in REQUIRED_KEYS:
        row[key] = float(result[key])
    for key, value in result.items():
        if key not in row and key != "pred":
            row[key] = value
    return row


def _scan(path: Path, start: int = 0, first_line: int = 1) -> tuple[list[dict], int, int]:
    """Complete rows of ``path`` from byte ``start`` (line ``first_line``), the byte offset where they
    end (a torn tail lies beyond it) and the number of the next line."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    rows = []
    lines = data[:end].split(b"\n")[:-1]
    for lineno, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: corrupt results line ({e}); fix or move the file") from None
        if not isinstance(row, dict) or "item_id" not in row or "variant" not in row:
            raise ValueError(f"{path}:{lineno}: not a results row (needs item_id and variant)")
        rows.append(row)
    return rows, start + end, first_line + len(lines)


def load_results(results_jsonl: str | os.PathLike) -> list[dict]:
    """The complete rows of a ``results.jsonl`` (a torn last line is ignored; duplicates kept once)."""
    path = Path(results_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"no results file {str(path)!r}")
    rows, _, _ = _scan(path)
    seen, out = set(), []
    for row in rows:
        key = (row["item_id"], row["variant"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


_LOCK_TIMEOUT_S = 600.0


class _ResultsFile:
    """``results.jsonl`` shared by any number of processes (shards, resumed runs, merges).

    Every read-check-append happens under ``results.jsonl.lock`` (``filelock``; the OS drops it when
    its holder dies), so rows from concurrent writers never interleave and a pair is never written
    twice: before appending, the rows other processes added since the last look are read. A torn
    tail (a writer killed mid-line) is cut off under the lock before anything is appended.
    """

    def __init__(self, path: Path, configs: Mapping[str, dict | None], answers: Mapping[str, int]):
        from filelock import FileLock

        self.path = path
        self.configs, self.answers = configs, answers
        self.lock = FileLock(f"{path}.lock")
        self.done: set[tuple[str, str]] = set()
        self.pos, self.next_line = 0, 1
        path.touch(exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        from filelock import Timeout

        try:
            self.lock.acquire(timeout=_LOCK_TIMEOUT_S)
        except Timeout:
            raise RuntimeError(
                f"{self.lock.lock_file} has been held by another process for {_LOCK_TIMEOUT_S:.0f} s"
            ) from None
        try:
            yield
        finally:
            self.lock.release()

    def refresh(self) -> list[dict]:
        """(Under the lock.) Read the rows added since the last call, check them, cut a torn tail."""
        rows, end, self.next_line = _scan(self.path, self.pos, self.next_line)
        if end != self.path.stat().st_size:  # a torn last line: cut it off, it is recomputed
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        self.pos = end
        for row in rows:
            name, iid = row["variant"], row["item_id"]
            if name in self.configs and row.get("config") != self.configs[name]:
                raise ValueError(
                    f"{self.path} holds variant {name!r} with config {row.get('config')} but this run "
                    f"defines it as {self.configs[name]}: use another out_dir or rename the variant"
                )
            if iid in self.answers and row.get("answer") != self.answers[iid]:
                raise ValueError(
                    f"{self.path} holds item {iid!r} with answer {row.get('answer')} but this run's item has "
                    f"answer {self.answers[iid]}: the items changed, use another out_dir"
                )
            self.done.add((iid, name))
        return rows

    def append(self, rows: Sequence[dict]) -> int:
        """(Under the lock.) Append the rows whose pair is not in the file yet; returns how many."""
        self.refresh()
        data = b""
        for row in rows:
            key = (row["item_id"], row["variant"])
            if key not in self.done:
                self.done.add(key)
                data += (json.dumps(row, default=_json_default) + "\n").encode("utf-8")
        if data:
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.pos += len(data)
            self.next_line += data.count(b"\n")
        return data.count(b"\n")


def shard_items(items: Sequence[NeedleItem], shard: Shard | None) -> list[NeedleItem]:
    """The items of ``shard`` (all of them for ``None``): whole items, with all their variants, dealt by
    :func:`adaspark.core.sharding.split` with the frame count as the cost (an item's video is rendered
    and preprocessed once per shard that has it, so items are not split across shards)."""
    items = list(items)
    return items if shard is None else shard.select(items, [it.num_frames for it in items])


def run_eval(
    items: Sequence[NeedleItem],
    variants: Sequence[Variant],
    answer_fn: AnswerFn,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    plot: bool = True,
    shard: Shard | None = None,
) -> Path:
    """Answer every (item, variant) pair, appending rows to ``out_dir/results.jsonl``; resumable.

    Each row holds ``item_id``, ``variant``, ``split``, ``seed``, ``task``, ``num_frames``,
    ``answer``, ``pred``, ``correct``, ``config`` (the variant's config dict, ``null`` = dense),
    ``shard`` (``"i/n"`` of the process that wrote it, ``null`` unsharded), the :data:`REQUIRED_KEYS`
    and the answer function's extra keys. A row is written (flush + fsync)
    as soon as its answer is in. On restart the pairs already present are skipped; a torn trailing
    line is truncated away first. When every pair is done, ``summary.csv``, ``summary.md`` and
    (``plot=True``) ``accuracy_vs_flops.png`` are written atomically from *all* rows of the file.
    Returns ``out_dir``.

    ``shard`` (:class:`adaspark.core.sharding.Shard`) runs only that shard's items
    (:func:`shard_items`). Any number of processes may share one ``out_dir``: rows are appended under
    a file lock, a pair another process has written meanwhile is not written again, and the summary
    (written under the lock as well) covers every row in the file when the process finishes — the
    last shard to finish writes the complete one. Shards run into separate directories are combined
    with :func:`merge_results`.

    Raises:
        ValueError: duplicate item ids or variant names, a bad answer-function result (nothing is
            written for that pair), or a results file whose rows disagree with this run (same
            variant name with another config, same item id with another answer).
        RuntimeError: another process held ``results.jsonl.lock`` for 10 minutes.
        ImportError: ``plot=True`` without matplotlib (the CSV and Markdown are written first).
    """
    items = list(items)
    variants = list(variants)
    for what, names in (("item id", [i.id for i in items]), ("variant name", [v.name for v in variants])):
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"run_eval: duplicate {what} {dup!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = _ResultsFile(
        out / RESULTS_FILE, {v.name: v.config_dict() for v in variants}, {i.id: i.answer for i in items}
    )
    mine = shard_items(items, shard)
    with results.locked():
        results.refresh()
    todo = [(i, v) for i in mine for v in variants if (i.id, v.name) not in results.done]
    total = len(mine) * len(variants)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=total - len(todo), desc="eval", unit="answer", disable=not progress)
    with bar:
        for item, variant in todo:
            if (item.id, variant.name) in results.done:  # another process answered it meanwhile
                bar.update(1)
                continue
            bar.set_postfix_str(f"{variant.name} {item.num_frames}f", refresh=False)
            result = _check_answer(answer_fn(item, variant), item, variant)
            with results.locked():
                results.append([_make_row(item, variant, result, shard)])
            bar.update(1)
    with results.locked():  # the last writer to get here sees every row
        write_summary(out, plot=plot)
    return out


def merge_results(
    sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, plot: bool = True
) -> tuple[int, int]:
    """Add the rows of the ``results.jsonl`` in each of ``sources`` (directories) to
    ``out_dir/results.jsonl`` and rewrite the summaries from all its rows.

    A pair (item id, variant) already in ``out_dir`` or in an earlier source is not added again, so
    merging is idempotent and ``out_dir`` may be one of the sources. Rows that disagree about a
    variant's config or an item's answer (two different runs, not two shards of one) are refused
    before anything is written. Returns ``(rows added, duplicate rows skipped)``.

    Raises:
        FileNotFoundError: a source without ``results.jsonl``.
        ValueError: conflicting rows, a corrupt results line.
    """
    out = Path(out_dir)
    rows: list[tuple[Path, dict]] = []
    for src in sources:
        path = Path(src) / RESULTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{str(src)!r} holds no {RESULTS_FILE}")
        rows += [(path, r) for r in _scan(path)[0]]
    configs: dict[str, tuple[Path, dict | None]] = {}
    answers: dict[str, tuple[Path, int]] = {}
    for path, row in rows:
        for key, seen, what in ((row["variant"], configs, "config"), (row["item_id"], answers, "answer")):
            value = row.get(what)
            first = seen.setdefault(key, (path, value))
            if first[1] != value:
                kind = "variant" if what == "config" else "item"
                raise ValueError(
                    f"cannot merge: {kind} {key!r} has {what} {first[1]} in {first[0]} but {value} in {path} "
                    "(results of different runs)"
                )
    out.mkdir(parents=True, exist_ok=True)
    results = _ResultsFile(
        out / RESULTS_FILE, {k: v for k, (_, v) in configs.items()}, {k: v for k, (_, v) in answers.items()}
    )
    with results.locked():
        added = results.append([r for _, r in rows])
        write_summary(out, plot=plot)
    return added, len(rows) - added


# --------------------------------------------------------------------------------- summaries
def _variant_info(row: dict) -> dict:
    cfg = row.get("config")
    if cfg is None:
        return {"family": "dense", "policy": "dense", "p": 1.0, "ratio": "", "top_k": "", "top_k_tokens": ""}
    comp = cfg.get("mean_compensation", True)
    policy = cfg.get("policy", "top_p")
    family = policy if comp else f"{policy}, no mean comp."
    if cfg.get("budget") is not None:
        family = "budget" if comp else "budget, no mean comp."
    if cfg.get("cube_mode", "fixed") == "adaptive":
        family += ", adaptive cubes"
    return {
        "family": family,
        "policy": policy,
        "p": cfg.get("p"),
        "ratio": cfg.get("ratio") if policy == "ratio" else "",
        "top_k": cfg.get("top_k") if policy == "top_k" else "",
        "top_k_tokens": cfg.get("top_k_tokens") if policy == "top_k" else "",
    }


def _aggregate(rows: list[dict]) -> dict:
    n = len(rows)
    correct = sum(bool(r["correct"]) for r in rows)
    acc = correct / n
    sums = {k: sum(float(r[k]) for r in rows) for k in REQUIRED_KEYS}

    def saved(a: str, b: str) -> float:
        return 1.0 - sums[a] / sums[b] if sums[b] > 0 else 0.0

    return {
        "n": n,
        "correct": correct,
        "accuracy": acc,
        "accuracy_se": math.sqrt(acc * (1 - acc) / n),
        "flops": sums["flops"] / n,
        "flops_dense": sums["flops_dense"] / n,
        "flops_saved": saved("flops", "flops_dense"),
        "decoder_flops": sums["decoder_flops"] / n,
        "decoder_flops_dense": sums["decoder_flops_dense"] / n,
        "decoder_flops_saved": saved("decoder_flops", "decoder_flops_dense"),
        "seconds": sums["seconds"] / n,
    }


SUMMARY_COLUMNS = (
    "variant", "family", "policy", "p", "ratio", "top_k", "top_k_tokens", "num_frames", "task", "n",
    "correct", "accuracy", "accuracy_se", "flops", "flops_dense", "flops_saved", "decoder_flops",
    "decoder_flops_dense", "decoder_flops_saved", "seconds",
)  # fmt: skip


def summarize(results_jsonl: str | os.PathLike) -> list[dict]:
    """One dict per (variant, num_frames, task), plus ``"all"`` rows over lengths and/or tasks.

    Keys: :data:`SUMMARY_COLUMNS`. ``accuracy`` is the fraction correct, ``accuracy_se`` its
    binomial standard error; ``flops`` / ``flops_dense`` are means per item; ``flops_saved`` is
    ``1 - sum(flops) / sum(flops_dense)`` (likewise for the decoder); ``seconds`` is the mean per
    answer. Variants keep the order of their first row; lengths ascend; tasks follow :data:`TASKS`.
    """
    rows = load_results(results_jsonl)
    variants: dict[str, list[dict]] = {}
    for row in rows:
        variants.setdefault(row["variant"], []).append(row)
    out = []
    for name, vrows in variants.items():
        info = _variant_info(vrows[0])
        lengths = sorted({int(r["num_frames"]) for r in vrows})
        tasks = [t for t in TASKS if any(r["task"] == t for r in vrows)]
        tasks += sorted({r["task"] for r in vrows} - set(tasks))
        for length in [*lengths, "all"]:
            for task in [*tasks, "all"]:
                sel = [
                    r
                    for r in vrows
                    if (length == "all" or int(r["num_frames"]) == length)
                    and (task == "all" or r["task"] == task)
                ]
                if sel:
                    out.append(
                        {"variant": name, **info, "num_frames": length, "task": task, **_aggregate(sel)}
                    )
    return out


def _fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def _markdown(summary: list[dict]) -> str:
    overall = [s for s in summary if s["num_frames"] == "all" and s["task"] == "all"]
    lines = [
        "# Needle-in-a-haystack results",
        "",
        "Accuracy: fraction of questions answered correctly (± binomial standard error; chance is 25%).",
        "FLOPs saved: 1 − AdaSpark FLOPs / dense FLOPs, summed over the items (whole model; decoder only).",
        "",
        "## All lengths and tasks",
        "",
        "| variant | n | accuracy | FLOPs / item | FLOPs saved | decoder FLOPs saved | s / answer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in overall:
        lines.append(
            f"| {s['variant']} | {s['n']} | {s['accuracy']:.1%} ± {s['accuracy_se']:.1%} | "
            f"{_fmt_flops(s['flops'])} | {s['flops_saved']:.1%} | {s['decoder_flops_saved']:.1%} | "
            f"{s['seconds']:.3f} |"
        )
    lines += [
        "",
        "## By length and task",
        "",
        "| variant | frames | task | n | accuracy | FLOPs saved | decoder FLOPs saved |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        if s["num_frames"] == "all" and s["task"] == "all":
            continue
        lines.append(
            f"| {s['variant']} | {s['num_frames']} | {s['task']} | {s['n']} | "
            f"{s['accuracy']:.1%} ± {s['accuracy_se']:.1%} | {s['flops_saved']:.1%} | "
            f"{s['decoder_flops_saved']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def _csv(summary: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for s in summary:
        writer.writerow({k: s.get(k, "") for k in SUMMARY_COLUMNS})
    return buf.getvalue()


def _plot(summary: list[dict], path: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "the accuracy-vs-FLOPs plot needs matplotlib: pip install matplotlib "
            "(or pip install 'adaspark[bench]')"
        ) from e
    from adaspark.core.io import atomic_path

    overall = [s for s in summary if s["num_frames"] == "all" and s["task"] == "all"]
    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    markers = {"dense": "*", "top_p": "o", "top_k": "s", "ratio": "^", "budget": "v"}
    for ax, key, title in zip(
        fig.subplots(1, 2), ("flops", "decoder_flops"), ("whole model", "decoder only"), strict=True
    ):
        families: dict[str, list[dict]] = {}
        for s in overall:
            families.setdefault(s["family"], []).append(s)
        for fam, pts in families.items():
            pts = sorted(pts, key=lambda s: s[key] / s[f"{key}_dense"] if s[f"{key}_dense"] else 1.0)
            xs = [100 * s[key] / s[f"{key}_dense"] if s[f"{key}_dense"] else 100.0 for s in pts]
            ys = [100 * s["accuracy"] for s in pts]
            se = [100 * s["accuracy_se"] for s in pts]
            marker = markers.get(fam.split(",")[0], "D")
            style = "--" if "no mean comp" in fam else (":" if "adaptive" in fam else "-")
            ax.errorbar(
                xs, ys, yerr=se, fmt=style, marker=marker, markersize=10 if fam == "dense" else 6,
                capsize=2, elinewidth=0.7, label=fam,
            )  # fmt: skip
            if fam == "top_p":
                for s, x, y in zip(pts, xs, ys, strict=True):
                    ax.annotate(
                        f"p={s['p']:g}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=7
                    )
        ax.axhline(25.0, color="0.6", linewidth=0.8, linestyle=":", label="chance")
        ax.set_xlabel(f"FLOPs, % of dense ({title})")
        ax.set_ylabel("accuracy, %")
        ax.set_ylim(0, 103)
        ax.set_title(f"Accuracy (± s.e.) vs executed FLOPs, {title}")
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_summary(out_dir: str | os.PathLike, *, plot: bool = True) -> list[dict]:
    """(Re)write ``summary.csv``, ``summary.md`` and (``plot``) the PNG from ``out_dir/results.jsonl``."""
    from adaspark.core.io import atomic_write_text

    out = Path(out_dir)
    summary = summarize(out / RESULTS_FILE)
    atomic_write_text(out / SUMMARY_CSV, _csv(summary))
    atomic_write_text(out / SUMMARY_MD, _markdown(summary))
    if plot and summary:
        _plot(summary, out / PLOT_FILE)
    return summary
