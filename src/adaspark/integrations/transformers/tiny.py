"""A small randomly initialised Qwen2.5-VL built locally (no download), and inputs for it.

Used by the tests and by ``adaspark demo``. The model is the real transformers class with a small
config; inputs are laid out like the Qwen processor's: ``<|vision_start|>``, the video placeholder
tokens (``T·H·W / m²`` of them), ``<|vision_end|>``, with ``mm_token_type_ids`` = 2 on the video.
"""

from __future__ import annotations

import torch

__all__ = ["TINY_IDS", "build_inputs", "tiny_qwen2_5_vl", "tiny_qwen2_5_vl_config", "tiny_qwen2_vl"]

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
) -> dict:
    """Processor-like inputs for a batch: ``video_grids[b]`` lists the ``(T, H, W)`` patch grids of
    sample ``b``'s videos. Text around and between videos is random token ids.

    ``image_grids[b]`` optionally lists image grids ``(1, H, W)`` placed before sample ``b``'s videos.

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
            n = t * h * w // merge**2
            ids += [TINY_IDS["vision_start"]] + [TINY_IDS["video"]] * n + [TINY_IDS["vision_end"]]
            tt += [0] + [2] * n + [0]
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
    n_max = max(len(s) for s in seqs)
    bsz = len(seqs)
    input_ids = torch.full((bsz, n_max), TINY_IDS["pad"], dtype=torch.long)
    mm = torch.zeros(bsz, n_max, dtype=torch.long)
    am = torch.zeros(bsz, n_max, dtype=torch.long)
    for b, (s, t) in enumerate(zip(seqs, types, strict=False)):
        sl = slice(n_max - len(s), n_max) if padding_side == "left" else slice(0, len(s))
        input_ids[b, sl] = torch.tensor(s)
        mm[b, sl] = torch.tensor(t)
        am[b, sl] = 1
    out = {"input_ids": input_ids, "attention_mask": am, "mm_token_type_ids": mm}
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
