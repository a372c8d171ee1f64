"""The needle-in-a-haystack generator: deterministic, and its answers are right by construction.

The strongest check reads the answer back from the rendered pixels alone: an oracle finds the
saturated (needle) pixels of every frame, identifies each needle by matching its mask against every
shape/digit sprite at every grid position, groups frames into appearances, and answers the question
from that. It must pick the option the generator marked as correct.
"""

from __future__ import annotations

import collections
import itertools
import json
import time

import numpy as np
import pytest

from adaspark.needle import (
    COLORS,
    CORE_TASKS,
    DIGITS,
    SHAPES,
    SPLIT_SIZE,
    TASKS,
    VOCABULARY,
    NeedleItem,
    cell_seed,
    format_prompt,
    global_seed,
    load_frames,
    make_item,
    make_split,
    needle_mask,
    read_split,
    render_frames,
    time_range,
    tokenize,
    video_path,
    write_split,
)

pytest.importorskip("av")
pytest.importorskip("PIL")

# Needle colours have an RGB spread (max - min channel) >= 170; toned-down footage at most 62.
SATURATED = 120


def _saturated(frames: np.ndarray) -> np.ndarray:
    f = frames.astype(np.int16)
    return (f.max(-1) - f.min(-1)) > SATURATED


def _identify(mask: np.ndarray, rgb: np.ndarray, size: int) -> tuple[str, str, str, int, int]:
    """(kind, label, colour, y, x) of the one needle whose sprite equals ``mask`` exactly."""
    H, W = mask.shape
    found = []
    for kind, labels in (("shape", SHAPES), ("digit", DIGITS)):
        for label in labels:
            sprite = needle_mask({"kind": kind, "label": label, "size": size})
            for y in range(0, H - size + 1, 28):
                for x in range(0, W - size + 1, 28):
                    placed = np.zeros_like(mask)
                    placed[y : y + size, x : x + size] = sprite
                    if np.array_equal(placed, mask):
                        found.append((kind, label, y, x))
    assert len(found) == 1, f"mask matches {len(found)} needles: {found}"
    kind, label, y, x = found[0]
    colours = {tuple(c) for c in rgb[mask].tolist()}
    assert len(colours) == 1, f"needle drawn in several colours {colours}"
    (drawn,) = colours
    (colour,) = [name for name, c in COLORS.items() if tuple(c) == drawn]
    return kind, label, colour, y, x


def _oracle(item: NeedleItem, frames: np.ndarray) -> int:
    """Answer ``item`` from its pixels only; returns the option index."""
    sat = _saturated(frames)
    events: list[dict] = []
    t = 0
    while t < len(frames):  # runs of frames with the same saturated pixels
        start = t
        while t < len(frames) and np.array_equal(sat[t], sat[start]):
            t += 1
        if sat[start].any():  # a needle (runs of plain haystack carry none)
            assert t == len(frames) or not sat[t].any(), "two needles touch in time"
            kind, label, colour, _, _ = _identify(sat[start], frames[start], 56)
            # A temporal patch (2 frames) always sees a needle whole: it starts on an even frame, lasts >= 2.
            assert start % 2 == 0 and t - start >= 2
            events.append({"kind": kind, "label": label, "colour": colour, "frame": start})
    q = item.question
    if q == "What shape appeared in the video?":
        (e,) = events
        truth = e["label"]
    elif q == "What colour was the shape in the video?":
        (e,) = events
        truth = e["colour"]
    elif q == "What digit appeared in the video?":
        (e,) = events
        assert e["kind"] == "digit"
        truth = e["label"]
    elif q == "Which shape appeared first?":
        truth = events[0]["label"]
    elif q == "Which shape appeared last?":
        truth = events[-1]["label"]
    elif q == "In which order did the shapes appear?":
        truth = ", ".join(e["label"] for e in events)
    elif q.startswith("When did the "):
        shape = q.removeprefix("When did the ").removesuffix(" appear?")
        (e,) = [e for e in events if e["label"] == shape]
        second = e["frame"] / item.fps
        ranges = [time_range(o) for o in item.options]
        assert ranges == sorted(ranges) and all(a < b for a, b in ranges), item.options
        hits = [o for o, (a, b) in zip(item.options, ranges, strict=True) if a <= second < b]
        assert len(hits) == 1, (second, item.options)
        truth = hits[0]
    else:
        shape = q.removeprefix("How many times did the ").removesuffix(" appear?")
        assert shape in SHAPES, q
        truth = str(sum(e["label"] == shape for e in events))
    assert item.options.count(truth) == 1, (truth, item.options)
    return item.options.index(truth)


@pytest.mark.parametrize("task", TASKS)
def test_answers_read_back_from_pixels(task):
    for seed in range(12):
        item = make_item(task, 64 if seed % 2 else 96, seed, split="val")
        frames = render_frames(item)
        assert frames.shape == (item.num_frames, 112, 112, 3) and frames.dtype == np.uint8
        assert _oracle(item, frames) == item.answer, item.id


def test_needle_pixels_and_clean_haystack():
    """Needle pixels carry the exact colour; frames without a needle never show a needle colour there."""
    for task in TASKS:
        for seed in range(4):
            item = make_item(task, 64, seed)
            frames = render_frames(item)
            on = np.zeros(len(frames), dtype=bool)
            for n in item.needles:
                on[n["frame"] : n["frame"] + n["frames"]] = True
            for n in item.needles:
                mask = needle_mask(n)
                rgb = np.array(n["rgb"], dtype=np.uint8)
                assert tuple(n["rgb"]) == COLORS[n["color"]]
                y, x = slice(n["y"], n["y"] + 56), slice(n["x"], n["x"] + 56)
                box = frames[n["frame"] : n["frame"] + n["frames"], y, x]
                assert (box[:, mask] == rgb).all()
                assert not np.all(frames[~on, y, x] == rgb, axis=-1).any()
            # Frames without needles are pure (toned-down) footage: nowhere near saturated.
            f = frames[~on].astype(np.int16)
            assert (f.max(-1) - f.min(-1)).max() <= 62
            assert not _saturated(frames[~on]).any()


def test_deterministic_and_seed_dependent():
    a = make_item("ordering", 128, 5, split="train")
    b = make_item("ordering", 128, 5, split="train")
    assert a == b
    assert np.array_equal(render_frames(a), render_frames(b))
    c = make_item("ordering", 128, 6, split="train")
    assert c != a and not np.array_equal(render_frames(a), render_frames(c))
    # The same seed in another split is another item (held-out splits draw from disjoint seed ranges).
    d = make_item("ordering", 128, 5, split="test")
    assert d.id != a.id and (d.needles, d.question) != (a.needles, a.question)
    assert not np.array_equal(render_frames(a), render_frames(d))
    assert global_seed("train", SPLIT_SIZE - 1) < global_seed("val", 0) < global_seed("test", 0)


def test_json_round_trip():
    for task in TASKS:
        item = make_item(task, 64, 3)
        back = NeedleItem.from_json(json.loads(json.dumps(item.to_json())))
        assert back == item
        assert back.answer_letter == "ABCD"[item.answer]
    with pytest.raises(ValueError, match="lacks the key 'options'"):
        d = make_item("counting", 64, 0).to_json()
        del d["options"]
        NeedleItem.from_json(d)


def test_split_is_balanced_and_disjoint():
    items = make_split("train", 8, (64, 128))
    assert len(items) == 2 * len(TASKS) * 8 and len({i.id for i in items}) == len(items)
    assert len({i.seed for i in items}) == len(items)
    cells = collections.Counter((i.num_frames, i.task, i.answer) for i in items)
    assert set(cells.values()) == {2}  # every letter twice in every (length, task) cell
    test = make_split("test", 8, (64, 128))
    train_seeds = {global_seed(i.split, i.seed) for i in items}
    test_seeds = {global_seed(i.split, i.seed) for i in test}
    assert not train_seeds & test_seeds
    # Question forms and needle counts vary.
    assert len({i.question for i in items if i.task == "retrieval"}) == 3
    assert {len(i.needles) for i in items if i.task == "ordering"} == {2, 3}


def test_vocabulary_covers_every_prompt():
    vocab = set(VOCABULARY)
    for item in make_split("val", 8, (64,)):
        words = tokenize(format_prompt(item))
        if item.task == "localization":  # seconds are numbers of any size
            words = [w for w in words if not w.isdigit()]
        assert set(words) <= vocab, set(words) - vocab
    assert tokenize("Which shape appeared first?") == ["which", "shape", "appeared", "first", "?"]


@pytest.mark.parametrize("num_frames", [16, 18, 30, 64, 250, 1024, 4096])
def test_localization_ranges(num_frames):
    """The four offered ranges are among the video's equal segments, in time order, the target's
    neighbours offered where the letter allows; letters balanced per block of 4 seeds."""
    letters = collections.Counter()
    for seed in range(16):
        item = make_item("localization", num_frames, seed, split="train")
        ranges = [time_range(o) for o in item.options]
        duration = item.num_frames / item.fps
        assert all(0 <= a < b <= duration + 1e-9 for a, b in ranges)
        assert ranges == sorted(ranges) and len(set(ranges)) == 4
        (target,) = [n for n in item.needles if n["role"] == "target"]
        t = target["frame"] / item.fps
        a, b = ranges[item.answer]
        assert a <= t and (target["frame"] + target["frames"]) / item.fps <= b + 1e-9
        if item.answer > 0:  # the range just before the right one is offered
            assert ranges[item.answer - 1][1] == a
        if item.answer < 3:
            assert ranges[item.answer + 1][0] == b
        slots = sorted(n["frame"] // n["frames"] for n in item.needles)
        assert all(y - x >= 2 for x, y in itertools.pairwise(slots))  # needles never touch in time
        assert all(n["label"] != target["label"] for n in item.needles if n["role"] == "distractor")
        letters[item.answer_letter] += 1
    assert set(letters.values()) == {4}


def test_time_range():
    assert time_range("12 s to 16 s") == (12.0, 16.0)
    assert time_range("0.5 s to 2.25 s") == (0.5, 2.25)
    with pytest.raises(ValueError, match="not a time range"):
        time_range("circle")


def test_cell_seed_keeps_core_seeds_and_never_collides():
    lengths = (64, 256, 1024)
    for li in range(3):
        for ti, task in enumerate(CORE_TASKS):
            assert cell_seed(lengths, TASKS, li, task, 5) == (li * 3 + ti) * 5
            assert cell_seed(lengths, CORE_TASKS, li, task, 5) == (li * 3 + ti) * 5
    starts = [cell_seed(lengths, TASKS, li, t, 5) for li in range(3) for t in TASKS]
    assert sorted(starts) == list(range(0, 3 * len(TASKS) * 5, 5))
    assert cell_seed(lengths, ["localization"], 1, "localization", 4) == 4
    assert cell_seed(lengths, ["counting", "retrieval"], 1, "retrieval", 4) == 3 * 4
    # make_split: adding localization leaves the core items as they were
    core = make_split("test", 4, (64, 128), CORE_TASKS)
    every = make_split("test", 4, (64, 128))
    assert [i for i in every if i.task != "localization"] == core
    assert len({i.seed for i in every}) == len(every) == 2 * len(TASKS) * 4
    assert max(i.seed for i in every) == len(every) - 1
    with pytest.raises(ValueError, match="not among"):
        cell_seed(lengths, CORE_TASKS, 0, "localization", 4)


def test_long_video_and_speed():
    warm = make_item("counting", 256, 1)
    render_frames(warm)  # decodes the footage once
    t0 = time.perf_counter()
    frames = render_frames(make_item("retrieval", 256, 2))
    assert time.perf_counter() - t0 < 1.0  # measured ~0.015 s on a 2-core CPU
    assert frames.shape == (256, 112, 112, 3)
    long = make_item("ordering", 2048, 7)
    frames = render_frames(long)
    assert frames.shape == (2048, 112, 112, 3)
    assert _oracle(long, frames) == long.answer
    # Haystacks are real, varied footage: not a frozen frame.
    assert np.abs(np.diff(frames[::64].astype(np.int16), axis=0)).mean() > 5


def test_other_frame_sizes():
    item = make_item("retrieval", 32, 4, height=56, width=112)  # reuses the footage cache of 112 x 112
    frames = render_frames(item)
    assert frames.shape == (32, 56, 112, 3)
    assert _oracle(item, frames) == item.answer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "sorting"}, "task must be one of"),
        ({"num_frames": 63}, "num_frames must be even"),
        ({"num_frames": 8}, "num_frames must be an integer >= 16"),
        ({"seed": -1}, "seed must be an integer"),
        ({"seed": SPLIT_SIZE}, "seed must be an integer"),
        ({"split": "dev"}, "split must be one of"),
        ({"height": 100}, "height must be a multiple of 28"),
        ({"needle_size": 200}, "needle_size must be"),
        ({"needle_frames": 3}, "needle_frames must be"),
        ({"fps": 0}, "fps must be a positive number"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"task": "retrieval", "num_frames": 64, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_item(args.pop("task"), args.pop("num_frames"), args.pop("seed"), **args)


def test_write_and_read_split(tmp_path):
    items = make_split("val", 1, (32,), seed=40)
    write_split(items, tmp_path / "split")
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["questions.jsonl", "videos"]
    assert not [p for p in (tmp_path / "split" / "videos").iterdir() if p.name.startswith(".")]
    back = read_split(tmp_path / "split")
    assert back == items
    for item in back:
        assert video_path(item, tmp_path / "split").is_file()
        assert np.array_equal(load_frames(item, tmp_path / "split"), render_frames(item))  # lossless
    # Questions only.
    write_split(items, tmp_path / "q", videos=False)
    assert read_split(tmp_path / "q") == items
    assert np.array_equal(load_frames(items[0], tmp_path / "q"), render_frames(items[0]))
    with pytest.raises(ValueError, match="duplicate item id"):
        write_split([items[0], items[0]], tmp_path / "dup", videos=False)


def test_read_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no questions\.jsonl"):
        read_split(tmp_path)
    (tmp_path / "questions.jsonl").write_text(
        json.dumps(make_item("counting", 64, 0).to_json()) + "\n{oops\n"
    )
    with pytest.raises(ValueError, match=r"questions.jsonl:2: not a needle item"):
        read_split(tmp_path)
