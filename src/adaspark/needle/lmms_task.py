"""A small lmms-eval task built from the needle benchmark (multiple choice, exact match on the letter).

``python -m adaspark.needle.lmms_task DIR`` renders a few needle items
(:mod:`adaspark.needle`) into ``DIR`` (``questions.jsonl`` + ``videos/*.mp4``, as
:func:`~adaspark.needle.write_split` stores a split), writes the documents lmms-eval reads
(``lmms_eval_docs.jsonl``: prompt, answer letter, absolute video path) and the task file
``adaspark_needle.yaml``. Then::

    python -m lmms_eval --model adaspark_qwen2_5_vl --model_args pretrained=PATH,p=0.5 \\
        --tasks adaspark_needle --include_path DIR

The YAML refers to the functions below by their module path (lmms-eval's ``!function`` falls back
to an absolute import), so the task directory holds data only. Metric: ``exact_match``, the mean of
1/0 for "the answer's option letter equals the correct one" (case-insensitive; ``A``, ``a``,
``(A)``, ``A.``, ``A. circle`` all read as A).

Exit codes of the command: 0 success, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

__all__ = [
    "DOCS_FILE",
    "TASK_NAME",
    "doc_to_text",
    "doc_to_visual",
    "extract_letter",
    "main",
    "process_results",
    "write_task",
]

TASK_NAME = "adaspark_needle"
DOCS_FILE = "lmms_eval_docs.jsonl"
_LETTERS = "ABCD"
_MODULE = __name__ if __name__ != "__main__" else "adaspark.needle.lmms_task"

_YAML = """\
# lmms-eval task written by adaspark.needle.lmms_task ({n} needle items)
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function {module}.doc_to_visual
doc_to_text: !function {module}.doc_to_text
doc_to_target: answer
process_results: !function {module}.process_results
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: ""
metadata:
  version: 1.0
"""


# ------------------------------------------------------------------------------ task functions
def doc_to_visual(doc: dict) -> list[str]:
    """The document's video: a one-element list with the mp4's absolute path."""
    path = Path(doc["video"])
    if not path.is_file():
        raise FileNotFoundError(f"needle task video {str(path)!r} is missing (write the task again)")
    return [str(path)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """Question, lettered options and "Answer with the letter." (``pre_prompt`` / ``post_prompt`` around)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['prompt']}{kw.get('post_prompt', '')}"


def extract_letter(text: str) -> str | None:
    """The option letter an answer starts with (upper case), or None.

    ``"A"``, ``"a"``, ``"(B)"``, ``"C."``, ``"D. triangle"`` give a letter; ``"circle"`` or
    ``"All of them"`` give None.
    """
    m = re.match(r"\s*\(?\s*([A-Da-d])(?![A-Za-z0-9])", text or "")
    return m.group(1).upper() if m else None


def process_results(doc: dict, results: list) -> dict:
    """``{"exact_match": 1.0 or 0.0}``: does the answer's letter equal the correct one?"""
    pred = extract_letter(str(results[0]) if results else "")
    return {"exact_match": float(pred == doc["answer"])}


# ------------------------------------------------------------------------------ writing a task
def write_task(
    directory: str | Path,
    *,
    items: int = 4,
    frames: int = 16,
    seed: int = 0,
    split: str = "test",
    tasks=None,
    name: str = TASK_NAME,
) -> Path:
    """Render ``items`` needle items into ``directory`` and write the lmms-eval task; returns the YAML path.

    Items cycle through ``tasks`` (default: all of :data:`adaspark.needle.TASKS`) with seeds
    ``seed, seed + 1, ...`` of ``split``. Every file is written atomically; running it again on the
    same directory rewrites the task.

    Raises:
        ValueError: bad ``items``, ``frames``, ``seed``, ``split``, ``tasks`` or ``name``.
    """
    from adaspark.core.io import atomic_write_text
    from adaspark.needle import TASKS, make_item, video_path, write_split

    if isinstance(items, bool) or not isinstance(items, int) or items < 1:
        raise ValueError(f"items must be a positive integer, got {items!r}")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name or ""):
        raise ValueError(
            f"task name {name!r} must be letters, digits and underscores, starting with a letter"
        )
    tasks = list(TASKS if tasks is None else ([tasks] if isinstance(tasks, str) else tasks))
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be among {TASKS}, got {tasks!r}")
    chosen = [make_item(tasks[i % len(tasks)], frames, seed + i, split=split) for i in range(items)]
    directory = Path(directory).expanduser().resolve()
    write_split(chosen, directory)
    docs = []
    for item in chosen:
        docs.append(
            {
                "id": item.id,
                "task": item.task,
                "prompt": _prompt(item),
                "options": list(item.options),
                "answer": item.answer_letter,
                "video": str(video_path(item, directory)),
                "num_frames": item.num_frames,
            }
        )
    docs_path = directory / DOCS_FILE
    atomic_write_text(docs_path, "".join(json.dumps(d) + "\n" for d in docs))
    yaml_path = directory / f"{name}.yaml"
    text = _YAML.format(n=len(docs), name=name, docs=json.dumps(str(docs_path)), module=_MODULE)
    atomic_write_text(yaml_path, text)
    return yaml_path


def _prompt(item) -> str:
    from adaspark.needle import format_prompt

    return format_prompt(item)


# ------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaspark.needle.lmms_task",
        description="Write a small lmms-eval task (multiple choice) from the AdaSpark needle benchmark.",
    )
    parser.add_argument("directory", help="where the videos, documents and task YAML go")
    parser.add_argument("--items", type=int, default=4, help="number of questions (default 4)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video, even, >= 16 (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="first item seed (default 0)")
    parser.add_argument("--split", default="test", help="benchmark split: train, val or test (default test)")
    parser.add_argument("--tasks", nargs="+", default=None, help="needle tasks (default: all of them)")
    parser.add_argument("--name", default=TASK_NAME, help=f"lmms-eval task name (default {TASK_NAME})")
    args = parser.parse_args(argv)
    try:
        yaml_path = write_task(
            args.directory,
            items=args.items,
            frames=args.frames,
            seed=args.seed,
            split=args.split,
            tasks=args.tasks,
            name=args.name,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {yaml_path}")
    print(
        "run: python -m lmms_eval --model adaspark_qwen2_5_vl --model_args pretrained=PATH,p=0.5 "
        f"--tasks {args.name} --include_path {yaml_path.parent}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
