"""What SmolVL (Qwen2.5-VL + SmolLM2-135M-Instruct, :mod:`adaspark.needle.smolvl`) costs on this CPU.

For every total sequence length (prompt + video tokens, 112×112 frames = 8 LM tokens per frame) it
times, in fp32 with ``--threads`` torch threads (default 1):

* ``forward``: one inference forward of the whole model (vision tower + decoder, LM head on the
  last position only — what answering a question needs before the option continuations), and
* ``train step``: forward + backward with the language model frozen (gradients flow through it to
  the vision tower, merger and embeddings), loss on the last position — the cost of one training
  item of ``scripts/train_smolvl.py``.

Each number is the median of ``--repeats`` runs after one warm-up run at the shortest length.
Writes ``--json`` and prints a Markdown table. Reproduce::

    OMP_NUM_THREADS=1 python benchmarks/smolvl_cost.py --json benchmarks/results/smolvl_cost.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import resource
import sys

import torch

from adaspark.needle import model as nm
from adaspark.needle import smolvl as sv
from adaspark.needle.smollm2 import load_smollm2

from _bench import median_time

TOKENS_PER_FRAME = 8  # 112×112 frames: 4×4 LM tokens per 2-frame temporal patch


def inputs_for(tokenizer, total: int) -> dict:
    """A prompt of about ``total`` tokens: a 112×112 video (frames a multiple of 2) and a question."""
    g = torch.Generator().manual_seed(total)
    base = sv.encode_prompt(
        tokenizer,
        nm.preprocess_frames(torch.zeros(2, 112, 112, 3, dtype=torch.uint8).numpy(), 2.0),
        "What shape appeared in the video?",
        ["circle", "square", "triangle", "cross"],
    )
    text = base["input_ids"].shape[1] - 2 * TOKENS_PER_FRAME
    frames = max(2, 2 * round((total - text) / (2 * TOKENS_PER_FRAME)))
    video = torch.randint(0, 256, (frames, 112, 112, 3), dtype=torch.uint8, generator=g).numpy()
    enc = sv.encode_prompt(
        tokenizer,
        nm.preprocess_frames(video, 2.0),
        "What shape appeared in the video?",
        ["circle", "square", "triangle", "cross"],
    )
    enc["frames"] = frames
    return enc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llama, tok = load_smollm2()
    model, vtok = sv.build_smolvl(llama, tok)
    del llama
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.language_model.") and name != "lm_head.weight")
    model.model.language_model.embed_tokens.weight.requires_grad_(True)  # the new rows learn
    rows = []
    warm = inputs_for(vtok, min(args.lengths))
    for length in args.lengths:
        enc = inputs_for(vtok, length)
        kw = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        n = kw["input_ids"].shape[1]

        def fwd(kw=kw):
            with torch.inference_mode():
                model(**kw, use_cache=False, logits_to_keep=1)

        def vision(kw=kw):
            with torch.inference_mode():
                model.model.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"])

        def step(kw=kw):
            model.zero_grad(set_to_none=True)
            out = model(**kw, use_cache=False, logits_to_keep=1)
            out.logits.float().logsumexp(-1).sum().backward()

        if length == args.lengths[0]:
            wk = {k: v for k, v in warm.items() if isinstance(v, torch.Tensor)}
            fwd(wk), step(wk)
        row = {
            "tokens": n,
            "video_tokens": int((kw["mm_token_type_ids"] == 2).sum()),
            "frames": enc["frames"],
            "vision_forward_s": median_time(vision, args.repeats, warmup=False),
            "forward_s": median_time(fwd, args.repeats, warmup=False),
            "train_step_s": median_time(step, args.repeats, warmup=False),
            "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": "float32",
        "vision_parameters": sum(p.numel() for p in model.model.visual.parameters()),
        "vision": sv.VisionSize().__dict__,
    }
    if args.json:
        from adaspark.core.io import atomic_write_json

        atomic_write_json(args.json, {"machine": machine, "rows": rows})
    print("| tokens (video) | frames | vision fwd | forward | fwd + bwd, LM frozen | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} ({r['video_tokens']}) | {r['frames']} | {r['vision_forward_s']:.2f} s "
            f"| {r['forward_s']:.2f} s | {r['train_step_s']:.2f} s | {r['max_rss_gib']:.1f} GiB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
