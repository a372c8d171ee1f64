"""Small randomly initialised Video-LLMs built locally (no download), and inputs for them.

Used by the tests and by ``adaspark demo``. Each model is the real transformers class with a small
config. Inputs are laid out like the processors': Qwen2-VL / Qwen2.5-VL put ``<|vision_start|>``,
the video placeholder tokens (``T·H·W / m²`` of them) and ``<|vision_end|>``, with
``mm_token_type_ids`` = 2 on the video; Qwen3-VL writes every temporal slice as its own group
behind timestamp text (:func:`build_qwen3_vl_inputs`); LLaVA-OneVision has ``F·h·w + 1``
``<video>`` tokens per video, the last one for the newline (:func:`build_llava_onevision_inputs`).
"""

from __future__ import annotations

import torch

__all__ = [
    "TINY_IDS",
    "build_inputs",
    "build_llava_onevision_inputs",
    "build_qwen3_vl_inputs",
    "tiny_llava_onevision",
    "tiny_llava_onevision_config",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_5_vl_config",
    "tiny_qwen2_vl",
    "tiny_qwen3_vl",
    "tiny_qwen3_vl_config",
]

#: special token ids of the tiny vocabulary
TINY_IDS = {
    "pad": 0,
    "vision_start": 500,
    "vision_end": 501,
    "video": 502,
    "image": 503,
    "eos": 504,
    "vocab": 512,
}


def tiny_qwen2_5_vl_config(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    model_type: str = "qwen2_5_vl",
):
    """A small Qwen2.5-VL (or Qwen2-VL with ``model_type="qwen2_vl"``) config."""
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    t = half // 4
    mrope = [t, (half - t) // 2, half - t - (half - t) // 2]
    text = dict(
        vocab_size=TINY_IDS["vocab"],
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=TINY_IDS["eos"],
        pad_token_id=TINY_IDS["pad"],
    )
    ids = dict(
        image_token_id=TINY_IDS["image"],
        video_token_id=TINY_IDS["video"],
        vision_start_token_id=TINY_IDS["vision_start"],
        vision_end_token_id=TINY_IDS["vision_end"],
    )
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            num_heads=2,
            intermediate_size=2 * vision_hidden,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[vision_depth - 1],
            window_size=56,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=vision_depth, embed_dim=vision_hidden, num_heads=2, hidden_size=hidden_size, mlp_ratio=2
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"model_type must be 'qwen2_5_vl' or 'qwen2_vl', got {model_type!r}")


def _build(config, seed: int, dtype: torch.dtype):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model.eval()


def tiny_qwen2_5_vl(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` (eval mode)."""
    return _build(tiny_qwen2_5_vl_config(**config_kwargs), seed, dtype)


def tiny_qwen2_vl(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised ``Qwen2VLForConditionalGeneration`` (eval mode)."""
    return _build(tiny_qwen2_5_vl_config(model_type="qwen2_vl", **config_kwargs), seed, dtype)


def tiny_qwen3_vl_config(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    deepstack_layers: tuple[int, ...] = (0, 1),
):
    """A small Qwen3-VL config (patch 16 px, spatial merge 2, temporal patch 2, interleaved M-RoPE).

    ``deepstack_layers`` are the vision blocks whose features DeepStack adds to the hidden states of
    the video tokens after the first ``len(deepstack_layers)`` decoder layers.
    """
    from transformers import Qwen3VLConfig

    head_dim = hidden_size // num_heads
    half = head_dim // 2
    hw = half // 4
    text = dict(
        vocab_size=TINY_IDS["vocab"],
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=32768,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": [half - 2 * hw, hw, hw],
            "mrope_interleaved": True,
            "rope_theta": 10000.0,
        },
        bos_token_id=None,
        eos_token_id=TINY_IDS["eos"],
        pad_token_id=TINY_IDS["pad"],
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        num_heads=2,
        intermediate_size=2 * vision_hidden,
        out_hidden_size=hidden_size,
        patch_size=16,
        num_position_embeddings=64,
        deepstack_visual_indexes=list(deepstack_layers),
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=TINY_IDS["image"],
        video_token_id=TINY_IDS["video"],
        vision_start_token_id=TINY_IDS["vision_start"],
        vision_end_token_id=TINY_IDS["vision_end"],
    )


def tiny_qwen3_vl(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised ``Qwen3VLForConditionalGeneration`` (eval mode)."""
    return _build(tiny_qwen3_vl_config(**config_kwargs), seed, dtype)


def tiny_llava_onevision_config(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    image_size: int = 35,
    patch_size: int = 7,
):
    """A small LLaVA-OneVision config: SigLIP vision tower, Qwen2 language model.

    A frame has ``s × s`` patches (``s = image_size // patch_size``, 5 by default), pooled to
    ``ceil(s/2) × ceil(s/2)`` LM tokens (3 × 3).
    """
    from transformers import LlavaOnevisionConfig

    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_depth,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = dict(
        model_type="qwen2",
        vocab_size=TINY_IDS["vocab"],
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=TINY_IDS["eos"],
        pad_token_id=TINY_IDS["pad"],
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=TINY_IDS["image"],
        video_token_index=TINY_IDS["video"],
    )


def tiny_llava_onevision(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised ``LlavaOnevisionForConditionalGeneration`` (eval mode)."""
    return _build(tiny_llava_onevision_config(**config_kwargs), seed, dtype)


def _pad_batch(seqs: list[list[int]], types: list[list[int]], padding_side: str) -> dict:
    n_max = max(len(s) for s in seqs)
    bsz = len(seqs)
    input_ids = torch.full((bsz, n_max), TINY_IDS["pad"], dtype=torch.long)
    mm = torch.zeros(bsz, n_max, dtype=torch.long)
    am = torch.zeros(bsz, n_max, dtype=torch.long)
    for b, (s, t) in enumerate(zip(seqs, types, strict=True)):
        sl = slice(n_max - len(s), n_max) if padding_side == "left" else slice(0, len(s))
        input_ids[b, sl] = torch.tensor(s)
        mm[b, sl] = torch.tensor(t)
        am[b, sl] = 1
    return {"input_ids": input_ids, "attention_mask": am, "mm_token_type_ids": mm}


def build_inputs(
    video_grids: list[list[tuple[int, int, int]]],
    *,
    prefix: list[int] | int = 5,
    suffix: list[int] | int = 7,
    between: int = 3,
    padding_side: str = "left",
    pixel_values_videos: torch.Tensor | None = None,
    patch_dim: int = 3 * 2 * 14 * 14,
    merge: int = 2,
    seed: int = 0,
    image_grids: list[list[tuple[int, int, int]]] | None = None,
    timestamp_tokens: int | None = None,
) -> dict:
    """Processor-like inputs for a batch: ``video_grids[b]`` lists the ``(T, H, W)`` patch grids of
    sample ``b``'s videos. Text around and between videos is random token ids.

    ``image_grids[b]`` optionally lists image grids ``(1, H, W)`` placed before sample ``b``'s videos.
    ``timestamp_tokens`` switches to the Qwen3-VL arrangement: every temporal slice of a video is
    its own ``<|vision_start|> … <|vision_end|>`` group, preceded by that many (random) text tokens
    standing for its ``<t seconds>`` timestamp.

    Returns a dict with ``input_ids``, ``attention_mask``, ``mm_token_type_ids``,
    ``pixel_values_videos`` (random unless given) and ``video_grid_thw`` (absent without video),
    plus ``pixel_values`` and ``image_grid_thw`` when there are images.
    """
    g = torch.Generator().manual_seed(seed)

    def text(n) -> list[int]:
        if isinstance(n, list):
            return list(n)
        return torch.randint(1, 500, (n,), generator=g).tolist()

    seqs, types = [], []
    all_grids, all_images = [], []
    for b, grids in enumerate(video_grids):
        ids = text(prefix if b == 0 or isinstance(prefix, list) else prefix + b)
        tt = [0] * len(ids)
        for t, h, w in image_grids[b] if image_grids else []:
            n = t * h * w // merge**2
            ids += [TINY_IDS["vision_start"]] + [TINY_IDS["image"]] * n + [TINY_IDS["vision_end"]]
            tt += [0] + [1] * n + [0]
            all_images.append((t, h, w))
        for j, (t, h, w) in enumerate(grids):
            if timestamp_tokens is None:  # one group: the whole video
                groups = [(t * h * w // merge**2, [])]
            else:  # one group per temporal slice, behind its timestamp
                groups = [(h * w // merge**2, text(timestamp_tokens)) for _ in range(t)]
            for n, stamp in groups:
                ids += stamp + [TINY_IDS["vision_start"]] + [TINY_IDS["video"]] * n + [TINY_IDS["vision_end"]]
                tt += [0] * len(stamp) + [0] + [2] * n + [0]
            all_grids.append((t, h, w))
            if j + 1 < len(grids):
                extra = text(between)
                ids += extra
                tt += [0] * len(extra)
        extra = text(suffix)
        ids += extra
        tt += [0] * len(extra)
        seqs.append(ids)
        types.append(tt)
    out = _pad_batch(seqs, types, padding_side)
    if all_grids:
        grid = torch.tensor(all_grids, dtype=torch.long)
        n_patches = int(grid.prod(-1).sum())
        if pixel_values_videos is None:
            pixel_values_videos = torch.randn(n_patches, patch_dim, generator=g)
        elif pixel_values_videos.shape[0] != n_patches:
            raise ValueError(
                f"pixel_values_videos has {pixel_values_videos.shape[0]} patches, the grids need {n_patches}"
            )
        out["pixel_values_videos"] = pixel_values_videos
        out["video_grid_thw"] = grid
    if all_images:
        igrid = torch.tensor(all_images, dtype=torch.long)
        out["pixel_values"] = torch.randn(int(igrid.prod(-1).sum()), patch_dim, generator=g)
        out["image_grid_thw"] = igrid
    return out


def build_qwen3_vl_inputs(video_grids: list[list[tuple[int, int, int]]], **kwargs) -> dict:
    """:func:`build_inputs` in the Qwen3-VL arrangement (3 timestamp tokens per temporal slice,
    16-pixel patches); the same keyword arguments."""
    kwargs.setdefault("timestamp_tokens", 3)
    kwargs.setdefault("patch_dim", 3 * 2 * 16 * 16)
    return build_inputs(video_grids, **kwargs)


def build_llava_onevision_inputs(
    videos: list[int],
    *,
    num_frames: int = 4,
    image_size: int = 35,
    patch_size: int = 7,
    prefix: int = 5,
    suffix: int = 7,
    between: int = 3,
    padding_side: str = "left",
    seed: int = 0,
) -> dict:
    """Processor-like LLaVA-OneVision inputs: sample ``b`` holds ``videos[b]`` videos of
    ``num_frames`` frames each (one frame count for the batch, as ``pixel_values_videos`` is one
    tensor). A video is ``num_frames·g² + 1`` ``<video>`` tokens, ``g = ceil((image_size //
    patch_size) / 2)``, the last one standing for the newline.

    Returns ``input_ids``, ``attention_mask`` and ``pixel_values_videos`` ``[V, F, 3, S, S]``
    (random; absent without video). ``mm_token_type_ids`` is not part of LLaVA-OneVision's inputs.
    """
    g = torch.Generator().manual_seed(seed)
    side = -(-(image_size // patch_size) // 2)
    per_video = num_frames * side * side + 1

    def text(n: int) -> list[int]:
        return torch.randint(1, 500, (n,), generator=g).tolist()

    seqs = []
    for b, count in enumerate(videos):
        ids = text(prefix + b)
        for j in range(count):
            ids += [TINY_IDS["video"]] * per_video
            if j + 1 < count:
                ids += text(between)
        seqs.append(ids + text(suffix))
    out = _pad_batch(seqs, [[0] * len(s) for s in seqs], padding_side)
    del out["mm_token_type_ids"]
    total = sum(videos)
    if total:
        out["pixel_values_videos"] = torch.randn(total, num_frames, 3, image_size, image_size, generator=g)
    return out
