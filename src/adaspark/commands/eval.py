"""``adaspark eval``: the needle benchmark for the dense model and a sweep of AdaSpark variants.

Variants (:func:`adaspark.needle.evaluate.standard_variants`): dense; Top-p at every ``--ps`` value;
the fixed ``top_k`` and ``ratio`` policies at (approximately) the FLOPs of Top-p at the same p (the
``p²`` prior, or measured with ``--calibrate``); Top-p without mean compensation. Items come from
the generator (``--split``, ``--lengths``, ``--n``) or from a stored split (``--data DIR``).

Results go to ``--out``: ``results.jsonl`` (one line per item and variant, written as it comes),
``summary.csv``, ``summary.md`` and ``accuracy_vs_flops.png`` (:func:`adaspark.needle.evaluate.run_eval`)
and ``eval_config.json``. A killed run resumes where it stopped when the same command is run again.

Data parallel: ``--shard i/n`` runs shard ``i`` of ``n`` (whole items, dealt by frame count:
:func:`adaspark.needle.evaluate.shard_items`). Without ``--shard``, a process started by ``torchrun``
or ``accelerate launch`` takes its shard from ``RANK`` / ``WORLD_SIZE`` (else ``LOCAL_RANK`` /
``LOCAL_WORLD_SIZE``; :func:`adaspark.core.sharding.from_environment`). Shards may share one
``--out`` (rows are appended under a file lock; the summary covers every row present when a shard
finishes) or use their own, combined afterwards by ``--merge DIR ... --out DIR``
(:func:`adaspark.needle.evaluate.merge_results`).

Exit codes: 0 success, 2 bad input (one line on stderr), 130 interrupted (results so far are kept).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from adaspark import __version__
from adaspark.commands.common import (
    MODEL_HELP,
    NEEDLE_TASKS,
    add_config_arguments,
    check_model,
    config_from_args,
    fraction,
    positive_int,
)
from adaspark.commands.errors import UsageError, fail
from adaspark.needle.evaluate import DEFAULT_FAMILIES, FAMILIES

#: the AdaSparkConfig fields eval takes as flags (the base of every variant)
CONFIG_FLAGS = ("backend", "granularity", "cube", "cube_mode", "cost_model")

__all__ = ["DEFAULT_LENGTHS", "DEFAULT_PS", "add_parser", "make_answer_fn", "run"]

DEFAULT_LENGTHS = (64, 256, 1024)
DEFAULT_PS = (0.9, 0.7, 0.5, 0.3)


# ---------------------------------------------------------------------------------------- parser
def add_parser(commands) -> argparse.ArgumentParser:
    """Register ``eval`` on the ``adaspark`` sub-command parser."""

    parser = commands.add_parser(
        "eval",
        help="run the needle benchmark dense and for a sweep of AdaSpark variants (JSONL, CSV, "
        "Markdown, PNG; resumable)",
        description=(
            "Answer the needle-in-a-video-haystack benchmark with SmolVL (or --model), dense, "
            "with Top-p at every --ps value, with the top_k and ratio policies at matched FLOPs and "
            "without mean compensation. Writes results.jsonl as it goes (a killed run resumes when the "
            "same command is run again), then summary.csv, summary.md and accuracy_vs_flops.png."
        ),
    )
    parser.add_argument("--split", choices=("test", "val", "train"), default="test", help="(default test)")
    parser.add_argument(
        "--lengths",
        type=positive_int,
        nargs="+",
        default=list(DEFAULT_LENGTHS),
        metavar="FRAMES",
        help=f"video lengths in frames (default {' '.join(map(str, DEFAULT_LENGTHS))})",
    )
    parser.add_argument(
        "--n", type=positive_int, default=4, help="items per (length, task) cell (default %(default)s)"
    )
    parser.add_argument(
        "--tasks", choices=NEEDLE_TASKS, nargs="+", default=list(NEEDLE_TASKS), help="(default: all of them)"
    )
    parser.add_argument("--seed", type=int, default=0, help="first item seed of the split (default 0)")
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="a stored split (write_split: questions.jsonl + videos) instead of generating",
    )
    parser.add_argument(
        "--ps",
        type=fraction,
        nargs="+",
        default=list(DEFAULT_PS),
        metavar="P",
        help=f"Top-p values of the sweep (default {' '.join(map(str, DEFAULT_PS))})",
    )
    parser.add_argument(
        "--budgets",
        type=fraction,
        nargs="+",
        default=[],
        metavar="B",
        help="also run budget mode at each B, a fraction in (0, 1] of the dense decoder FLOPs "
        "(one budget@B variant each; default none)",
    )
    parser.add_argument(
        "--families",
        choices=FAMILIES,
        nargs="+",
        default=list(DEFAULT_FAMILIES),
        help="variant families besides dense (default: top_p top_k ratio no_comp; adaptive: Top-p, and "
        "budget mode with --budgets, on content-adaptive cubes)",
    )
    parser.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="K",
        help="match the top_k / ratio budgets to Top-p's measured FLOPs on K items of the longest length "
        "(default 0: the p^2 prior)",
    )
    parser.add_argument("--model", metavar="PATH", help=MODEL_HELP)
    add_config_arguments(parser, CONFIG_FLAGS)
    parser.add_argument(
        "--out", metavar="DIR", default="adaspark-eval", help="output directory (default %(default)s)"
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="run shard I of N (0-based; whole items, balanced by frames); default: from RANK/WORLD_SIZE "
        "(torchrun, accelerate launch) when set, else everything",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="run nothing: add the results of these eval directories to --out (no pair twice) and "
        "write its summary",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(handler=run)
    return parser


# ---------------------------------------------------------------------------------------- answers
def make_answer_fn(loaded, settings=None, data_dir=None):
    """An ``AnswerFn`` for :func:`adaspark.needle.evaluate.run_eval` that keeps the current item's inputs
    (the harness runs all variants of one item in a row)."""
    from adaspark.needle import load_frames
    from adaspark.needle.model import (
        encode_prompt,
        option_token_ids,
        run_model,
    )

    cache: dict = {}

    def answer_fn(item, variant) -> dict:
        if cache.get("id") != item.id:
            frames = load_frames(item, data_dir)
            video = loaded.adapter.preprocess_video(
                loaded.model, frames, item.fps, settings or loaded.settings
            )
            cache.clear()
            cache.update(
                id=item.id,
                inputs=encode_prompt(loaded, video, item.question),
                options=option_token_ids(loaded.tokenizer, item.options),
            )
        r = run_model(loaded.model, cache["inputs"], cache["options"], variant.config)
        r.pop("report")
        return r

    return answer_fn


# ---------------------------------------------------------------------------------------- run
def _check(args: argparse.Namespace):

    base = config_from_args(args, CONFIG_FLAGS)
    for length in args.lengths:
        if length < 16 or length % 2:
            raise UsageError(f"--lengths: every length must be an even number >= 16, got {length}")
    if len(set(args.lengths)) != len(args.lengths):
        raise UsageError("--lengths: duplicate lengths")
    if len(set(args.ps)) != len(args.ps):
        raise UsageError("--ps: duplicate values")
    if args.calibrate < 0:
        raise UsageError(f"--calibrate must be >= 0, got {args.calibrate}")
    if not args.seed >= 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    check_model(args.model)
    if args.data is not None and not Path(args.data).expanduser().is_dir():
        raise UsageError(f"--data {args.data!r} is not a directory")
    for d in args.merge or ():
        if not (Path(d).expanduser() / "results.jsonl").is_file():
            raise UsageError(f"--merge {d!r} holds no results.jsonl")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a directory")
    if not args.no_plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(
                "the accuracy-vs-FLOPs plot needs matplotlib: pip install matplotlib (or use --no-plot)"
            )
    return base


def _shard(args: argparse.Namespace):
    """``--shard``, else the launcher's environment, else ``None`` (everything)."""
    import os

    from adaspark.core.sharding import from_environment, parse_shard

    if args.shard is not None:
        if args.merge:
            raise UsageError("--shard and --merge exclude each other (--merge runs nothing)")
        try:
            return parse_shard(args.shard)
        except ValueError:
            raise UsageError(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}") from None
    if args.merge:
        return None
    shard = from_environment(os.environ)
    if shard is not None:
        print(f"adaspark eval: shard {shard} from the launcher's environment", file=sys.stderr)
    return shard


def _items(args):
    from adaspark.needle import make_split, read_split

    if args.data is not None:
        items = read_split(Path(args.data).expanduser())
        if not items:
            raise UsageError(f"--data {args.data!r} holds no items")
        return items
    return make_split(args.split, args.n, args.lengths, args.tasks, seed=args.seed)


def _overall_table(out: Path) -> str:
    """The 'all lengths and tasks' table of summary.md, for the terminal."""
    text = (out / "summary.md").read_text(encoding="utf-8")
    part = text.split("## All lengths and tasks", 1)[-1].split("## By length", 1)[0]
    return part.strip()


def _merge(args: argparse.Namespace) -> int:
    from adaspark.needle.evaluate import merge_results

    out = Path(args.out).expanduser()
    try:
        added, skipped = merge_results([Path(d).expanduser() for d in args.merge], out, plot=not args.no_plot)
    except (ValueError, RuntimeError, OSError) as e:
        return fail(e)
    n = len({(r["item_id"], r["variant"]) for r in _rows_of(out)})
    print(
        f"AdaSpark {__version__} eval --merge: {added} rows added from {len(args.merge)} directories "
        f"({skipped} already present); {out / 'results.jsonl'} holds {n}\n"
    )
    print(_overall_table(out))
    return 0


def _rows_of(out: Path) -> list[dict]:
    from adaspark.needle.evaluate import load_results

    return load_results(out / "results.jsonl")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``adaspark eval``."""
    try:
        base = _check(args)
        shard = _shard(args)
        if args.merge:
            return _merge(args)
        items = _items(args)
    except (ValueError, FileNotFoundError) as e:
        return fail(e)
    from adaspark.core.io import atomic_write_json
    from adaspark.needle.evaluate import calibrate_budgets, run_eval, standard_variants
    from adaspark.needle.model import load_model

    try:
        loaded = load_model(args.model)
        settings = loaded.settings
    except (OSError, ValueError, ImportError) as e:
        return fail(f"cannot load the model: {e}")
    out = Path(args.out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return fail(f"--out {args.out!r}: cannot create the directory ({e})")
    data_dir = Path(args.data).expanduser() if args.data is not None else None
    answer_fn = make_answer_fn(loaded, settings, data_dir)
    start = time.perf_counter()
    try:
        budgets = None
        if args.calibrate and ("top_k" in args.families or "ratio" in args.families):
            longest = max(it.num_frames for it in items)
            cal = [it for it in items if it.num_frames == longest][: args.calibrate]
            print(
                f"calibrating top_k / ratio budgets on {len(cal)} item(s) of {longest} frames",
                file=sys.stderr,
            )
            budgets = calibrate_budgets(cal, answer_fn, args.ps, base=base)
        variants = standard_variants(
            args.ps, base=base, budgets=budgets, families=args.families, flop_budgets=args.budgets
        )
        atomic_write_json(
            out / "eval_config.json",
            {
                "adaspark_version": __version__,
                "model": str(args.model) if args.model else "default",
                "model_source": loaded.source,
                "split": args.split if args.data is None else None,
                "data": str(data_dir) if data_dir else None,
                "lengths": sorted({it.num_frames for it in items}),
                "n_items": len(items),
                "variants": [{"name": v.name, "config": v.config_dict()} for v in variants],
                "budgets": {str(p): vars(b) for p, b in (budgets or {}).items()},
            },
            indent=2,
        )
        run_eval(
            items, variants, answer_fn, out, progress=not args.no_progress, plot=not args.no_plot, shard=shard
        )
    except KeyboardInterrupt:
        print(
            f"\nadaspark: interrupted; the results so far are in {out / 'results.jsonl'} — run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        return fail(e)
    from adaspark.needle.evaluate import shard_items

    seconds = time.perf_counter() - start
    if shard is None:
        print(
            f"AdaSpark {__version__} eval: {len(items)} items x {len(variants)} variants in {seconds:.0f} s\n"
        )
    else:
        names = {v.name for v in variants}
        ids = {it.id for it in items}
        present = {(r["item_id"], r["variant"]) for r in _rows_of(out)}
        have = sum(1 for iid, name in present if iid in ids and name in names)
        print(
            f"AdaSpark {__version__} eval, shard {shard}: {len(shard_items(items, shard))} of {len(items)} "
            f"items x {len(variants)} variants in {seconds:.0f} s; {out / 'results.jsonl'} holds {have} of "
            f"the run's {len(items) * len(variants)} answers (the table covers them)\n"
        )
    print(_overall_table(out))
    names = ["results.jsonl", "summary.csv", "summary.md"] + (
        [] if args.no_plot else ["accuracy_vs_flops.png"]
    )
    print("\nWrote " + ", ".join(str(out / n) for n in names))
    return 0
