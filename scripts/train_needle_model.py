"""Train the shipped needle model: a tiny Qwen2.5-VL, from scratch, on the needle benchmark's train split.

Phase 1 trains the whole model dense; phase 2 continues with AdaSpark switched on (the paper's
light fine-tuning: each step draws p from ``--phase2-ps``, some steps stay dense so the dense model
stays good). Everything is seeded: the items of step ``s`` are a function of ``s`` (the train split
is generated on the fly, item seeds counting up from 0), and so is phase 2's choice of p. The loss
is the cross-entropy of the answer (the right option's words, then ``<|im_end|>``) after the
question, plus a needle-map loss: every video token predicts the label and colour words of the
needle it shows, or none (the generator knows where every needle is). Multiple-choice accuracy is
measured by option likelihood (:func:`adaspark.needle.model.run_model`).

The run is resumable: a checkpoint (weights, optimiser, step, elapsed time) is written atomically
every ``--checkpoint-every`` steps to ``OUT/checkpoint.pt``; rerunning the same command continues
from it. At the end the model is saved with ``save_pretrained`` (safetensors) together with the
tokenizer, the processor configs, ``training_config.json`` and ``training_log.jsonl``; then
``--final-eval`` measures held-out (test split) accuracy per length and task, dense and with
AdaSpark, and writes ``eval.json`` and the model card ``README.md``.

Usage (the shipped model; about 40 minutes on 2 CPU cores)::

    python scripts/train_needle_model.py --out runs/needle
    cp runs/needle/{config.json,generation_config.json,model.safetensors,tokenizer.json,\\
tokenizer_config.json,*processor_config.json,training_config.json,training_log.jsonl,eval.json,README.md} \\
        src/adaspark/assets/needle-qwen2_5_vl/
"""

from __future__ import annotations

import os

# On a shared CPU, OpenMP threads that spin while waiting slow training down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import adaspark
from adaspark import AdaSparkConfig
from adaspark.core.io import atomic_path, atomic_write_json, atomic_write_text
from adaspark.needle import TASKS, VOCABULARY, make_item, render_frames
from adaspark.needle import model as nm
from adaspark.needle.spec import GENERATOR_VERSION
from adaspark.needle.training import answer_batch, needle_map

#: video tokens per step, roughly (the batch size of a length is this divided by its tokens)
TOKENS_PER_STEP = 1024


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", required=True, type=Path, help="output directory (resumes if it holds a checkpoint)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--phase1-steps", type=int, default=2800)
    ap.add_argument("--phase2-steps", type=int, default=300)
    ap.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[16, 32, 32, 64, 64, 128],
        help="train video lengths (repeat a length to draw it more often)",
    )
    ap.add_argument(
        "--warmup-lengths", type=int, nargs="+", default=[16, 32], help="lengths of the first steps"
    )
    ap.add_argument(
        "--warmup-steps", type=int, default=300, help="steps on --warmup-lengths only (and LR warm-up)"
    )
    ap.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument(
        "--map-weight",
        type=float,
        default=0.5,
        help="weight of the needle-map loss (label of the needle each video token shows; half in phase 2)",
    )
    ap.add_argument("--phase2-lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--phase2-ps", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--phase2-dense-every", type=int, default=4, help="every k-th phase-2 step is dense")
    ap.add_argument("--phase2-lengths", type=int, nargs="+", default=[64, 128])
    ap.add_argument(
        "--backend", default="auto", help="AdaSpark backend of phase 2 and of the final evaluation"
    )
    ap.add_argument("--checkpoint-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--val-every", type=int, default=300)
    ap.add_argument("--val-n", type=int, default=8, help="val items per (length, task) cell")
    ap.add_argument("--val-lengths", type=int, nargs="+", default=[64, 256])
    ap.add_argument(
        "--final-eval", action="store_true", help="held-out accuracy per length and task + model card"
    )
    ap.add_argument("--final-lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--final-n", type=int, default=8, help="test items per (length, task) cell")
    ap.add_argument(
        "--eval-only",
        action="store_true",
        help="only the final evaluation and model card of the model in OUT",
    )
    ap.add_argument("--final-p", type=float, default=0.5, help="AdaSpark p of the final evaluation")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------- data
def step_plan(args, step: int) -> tuple[int, list[tuple[str, int]]]:
    """``(length, [(task, item seed), ...])`` of training step ``step`` (a pure function of it)."""
    rng = random.Random(args.seed * 1_000_003 + step)
    if step >= args.phase1_steps:
        lengths = args.phase2_lengths
    elif step < args.warmup_steps:
        lengths = args.warmup_lengths
    else:
        lengths = args.lengths
    length = lengths[rng.randrange(len(lengths))]
    batch = max(1, args.tokens_per_step // (length * 8))  # 8 LM tokens per frame at 112 x 112
    base = step * 64  # item seeds of step s: [64 s, 64 s + batch), distinct across steps
    return length, [(TASKS[rng.randrange(len(TASKS))], base + j) for j in range(batch)]


def _loaded(model, tokenizer):
    """The model and tokenizer as the library's loader hands them over (prompts are built through it)."""
    from adaspark.integrations.transformers.adapters import get_adapter
    from adaspark.integrations.transformers.loading import LoadedModel

    return LoadedModel(model, tokenizer, get_adapter(model), nm.NEEDLE_VIDEO, "training")


def batch_inputs(model, tokenizer, items, settings) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Right-padded batch of prompt + answer (no attention mask needed: causal attention never looks
    right), the next-token targets ``(B, N)`` (the answer's tokens and ``<|im_end|>``, -100
    elsewhere) and the needle-map labels ``(B, N, 2)``.

    The needle map holds, for every video token, the label word (shape name or digit) and the colour
    word of the needle it shows, ``<|endoftext|>`` where it shows none, and -100 at text positions.
    """
    none_id = tokenizer.pad_token_id
    seqs = []
    for it in items:
        video = nm.preprocess_frames(render_frames(it), it.fps, settings)
        enc = nm.encode_prompt(_loaded(model, tokenizer), video, it.question)
        answer = nm.option_token_ids(tokenizer, it.options)[it.answer]
        seqs.append((enc, answer, needle_map(it, video, tokenizer.convert_tokens_to_ids, none_id)))
    return answer_batch(seqs, tokenizer.pad_token_id)


def answer_logits(model, inputs: dict, targets: torch.Tensor, labels: torch.Tensor):
    """Logits at the answer positions (rows where ``targets >= 0``, LM head on those rows only) and at
    the video positions (for the needle-map loss), with their targets."""
    out = model.model(**inputs, use_cache=False)
    h = out.last_hidden_state
    at = targets >= 0
    keep = labels[..., 0] >= 0
    return model.lm_head(h[at]), targets[at], model.lm_head(h[keep]), labels[keep]


def needle_map_loss(logits: torch.Tensor, labels: torch.Tensor, none_id: int) -> torch.Tensor:
    """Cross-entropy of the needle map: over needle tokens the mean of the label and colour terms,
    plus 0.2 x the mean over the other video tokens (target ``none_id``)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels[:, 0], reduction="none")
    hit = labels[:, 0] != none_id
    loss = 0.2 * ce[~hit].mean() if bool((~hit).any()) else ce.sum() * 0
    if bool(hit.any()):
        colour = F.cross_entropy(logits[hit], labels[hit, 1], reduction="none")
        loss = loss + 0.5 * (ce[hit] + colour).mean()
    return loss


# ---------------------------------------------------------------------------------------- eval
@torch.inference_mode()
def accuracy(model, tokenizer, items, settings, config=None, flops: dict | None = None) -> dict:
    """Accuracy per (length, task) over ``items`` (one forward per item); with ``flops`` (a dict),
    also the summed FLOPs per length (keys ``flops``, ``flops_dense``, ``decoder_flops``, ...)."""
    cells: dict[str, list[int]] = {}
    for it in items:
        r = nm.answer_item(_loaded(model, tokenizer), it, config, settings=settings)
        for key in (f"{it.num_frames}/{it.task}", f"{it.num_frames}/all", "all"):
            cells.setdefault(key, []).append(int(r["correct"]))
        if flops is not None:
            cell = flops.setdefault(str(it.num_frames), {})
            for k in ("flops", "flops_dense", "decoder_flops", "decoder_flops_dense", "seconds"):
                cell[k] = cell.get(k, 0.0) + float(r[k])
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}


def eval_items(split: str, lengths, n: int, seed0: int = 0):
    items = []
    for li, length in enumerate(lengths):
        for ti, task in enumerate(TASKS):
            base = seed0 + (li * len(TASKS) + ti) * n
            items += [make_item(task, length, base + j, split=split) for j in range(n)]
    return items


# ---------------------------------------------------------------------------------------- main
def _cosine(peak: float, frac: float, floor: float) -> float:
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def lr_at(args, step: int) -> float:
    if step < args.phase1_steps:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        frac = (step - args.warmup_steps) / max(1, args.phase1_steps - args.warmup_steps)
        return _cosine(args.lr, frac, 0.05)
    return _cosine(args.phase2_lr, (step - args.phase1_steps) / max(1, args.phase2_steps), 0.1)


def phase2_config(args, step: int) -> AdaSparkConfig | None:
    k = step - args.phase1_steps
    if args.phase2_dense_every and k % args.phase2_dense_every == args.phase2_dense_every - 1:
        return None
    rng = random.Random(args.seed * 7_919 + step)
    return AdaSparkConfig(p=args.phase2_ps[rng.randrange(len(args.phase2_ps))], backend=args.backend)


def build(args):
    tokenizer = nm.build_tokenizer(VOCABULARY)
    config = nm.needle_config(
        tokenizer,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        vision_hidden=args.vision_hidden,
        vision_depth=args.vision_depth,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(args.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model, tokenizer


def log(path: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_final(model, tokenizer, args, out: Path, info: dict) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    nm.write_processor_configs(out)
    for name in ("model.safetensors",):
        os.chmod(out / name, 0o644)
    atomic_write_json(out / "training_config.json", info)


def train_loss(args, model, tokenizer, settings, step: int, run: dict) -> torch.Tensor:
    """The loss of training step ``step``: answer tokens plus the weighted needle map."""
    length, plan = step_plan(args, step)
    items = [make_item(task, length, seed, split="train") for task, seed in plan]
    inputs, targets, labels = batch_inputs(model, tokenizer, items, settings)
    phase2 = step >= args.phase1_steps
    cfg = phase2_config(args, step) if phase2 else None
    handle = adaspark.patch(model, cfg) if cfg is not None else None
    try:
        logits, target, map_logits, map_labels = answer_logits(model, inputs, targets, labels)
    finally:
        if handle is not None:
            handle.remove()
    loss = ans_loss = F.cross_entropy(logits.float(), target)
    map_loss = torch.zeros(())
    map_weight = args.map_weight / 2 if phase2 else args.map_weight
    if map_weight > 0:
        map_loss = needle_map_loss(map_logits, map_labels, tokenizer.pad_token_id)
        loss = loss + map_weight * map_loss
    run["loss"] += ans_loss.item() * len(items)
    run["map"] += map_loss.item() * len(items)
    run["acc"] += float((logits.argmax(-1) == target).float().mean()) * len(items)
    run["n"] += len(items)
    return loss


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logf = out / "training_log.jsonl"
    ckpt_path = out / "checkpoint.pt"
    settings = nm.NEEDLE_VIDEO
    if args.eval_only:
        loaded = nm.load_model(out)
        model, tokenizer = loaded.model, loaded.tokenizer
        info = json.loads((out / "training_config.json").read_text(encoding="utf-8"))
        final_eval(model, tokenizer, args, out, settings, info)
        return 0
    model, tokenizer = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    step, elapsed = 0, 0.0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["args"] != {k: str(v) for k, v in vars(args).items()}:
            print("warning: resuming with different arguments", file=sys.stderr)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck["elapsed"]
        print(f"resumed at step {step} ({elapsed:.0f} s so far)", flush=True)
    total = args.phase1_steps + args.phase2_steps
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; {total} steps", flush=True)
    val = eval_items("val", args.val_lengths, args.val_n)
    render_frames(val[0])  # decode the haystack footage once, outside the timed steps
    model.train()
    run = {"loss": 0.0, "map": 0.0, "acc": 0.0, "n": 0}
    t_last = time.perf_counter()
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step)
        loss = train_loss(args, model, tokenizer, settings, step, run)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        if step % args.log_every == 0 or step == total:
            n = max(1, run["n"])
            log(
                logf,
                {
                    "step": step,
                    "phase": 1 if step <= args.phase1_steps else 2,
                    "loss": run["loss"] / n,
                    "map_loss": run["map"] / n,
                    "train_token_acc": run["acc"] / n,
                    "lr": lr_at(args, step - 1),
                    "elapsed_s": round(elapsed, 1),
                },
            )
            run = {"loss": 0.0, "map": 0.0, "acc": 0.0, "n": 0}
        if step % args.val_every == 0 or step in (args.phase1_steps, total):
            model.eval()
            t0 = time.perf_counter()
            rec = {"step": step, "val_dense": accuracy(model, tokenizer, val, settings)}
            if step > args.phase1_steps:
                rec["val_adaspark_p0.5"] = accuracy(
                    model, tokenizer, val, settings, AdaSparkConfig(p=0.5, backend=args.backend)
                )
            rec["val_s"] = round(time.perf_counter() - t0, 1)
            log(logf, rec)
            model.train()
            t_last = time.perf_counter()  # validation time does not count as training time
        if step % args.checkpoint_every == 0 or step == total:
            with atomic_path(ckpt_path) as tmp:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "opt": opt.state_dict(),
                        "step": step,
                        "elapsed": elapsed,
                        "args": {k: str(v) for k, v in vars(args).items()},
                    },
                    tmp,
                )
    model.eval()
    info = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": n_params,
        "steps": total,
        "train_seconds": round(elapsed, 1),
        "generator_version": GENERATOR_VERSION,
        "phase2_adaspark_config": AdaSparkConfig(p=args.phase2_ps[0], backend=args.backend).to_dict(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    save_final(model, tokenizer, args, out, info)
    print(f"saved to {out} after {elapsed:.0f} s of training", flush=True)
    if args.final_eval:
        final_eval(model, tokenizer, args, out, settings, info)
    return 0


def final_eval(model, tokenizer, args, out: Path, settings, info: dict) -> None:
    items = eval_items("test", args.final_lengths, args.final_n)
    t0 = time.perf_counter()
    dense_flops: dict = {}
    sparse_flops: dict = {}
    dense = accuracy(model, tokenizer, items, settings, flops=dense_flops)
    config = AdaSparkConfig(p=args.final_p, backend=args.backend)
    sparse = accuracy(model, tokenizer, items, settings, config, flops=sparse_flops)
    result = {
        "split": "test",
        "lengths": args.final_lengths,
        "n_per_cell": args.final_n,
        "p": args.final_p,
        "adaspark_config": config.to_dict(),
        "dense": dense,
        "adaspark": sparse,
        "flops_dense_run": dense_flops,
        "flops_adaspark_run": sparse_flops,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_json(out / "eval.json", result)
    print(json.dumps(result, indent=1), flush=True)
    atomic_write_text(out / "README.md", model_card(info, result))


def model_card(info: dict, ev: dict) -> str:
    a = info["args"]
    lines = [
        "# needle-qwen2_5_vl",
        "",
        "A tiny Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, "
        f"{info['parameters'] / 1e6:.2f}M parameters) trained from scratch on the train split of AdaSpark's "
        "needle-in-a-video-haystack benchmark (`adaspark.needle`). It answers four-way multiple-choice "
        "questions about coloured shapes and digits drawn into real footage. It is the default model of "
        "`adaspark ask` and `adaspark eval`; it knows only the benchmark's vocabulary.",
        "",
        "## Architecture",
        "",
        f"- decoder: {a['layers']} layers, hidden {a['hidden']}, FFN {a['intermediate']} (SwiGLU), "
        f"{a['heads']} heads / {a['kv_heads']} KV heads, M-RoPE",
        f"- vision encoder: {a['vision_depth']} blocks, hidden {a['vision_hidden']}, 14-px patches, "
        "2-frame temporal patches, 2×2 merge",
        "- tokenizer: word level (`tokenizers`), the benchmark's vocabulary plus Qwen's special tokens",
        "- input: 112×112 frames (at most 12544 pixels per frame), 16 LM tokens per 2 frames",
        "",
        "## Training (reproduce with `scripts/train_needle_model.py`)",
        "",
        f"- data: train split generated on the fly (generator version {info['generator_version']}), "
        f"item seeds from 0; lengths {a['warmup_lengths']} frames for the first {a['warmup_steps']} steps, "
        f"then {a['lengths']}; about {a['tokens_per_step']} video tokens per step",
        f"- phase 1 (dense): {a['phase1_steps']} steps, AdamW lr {a['lr']} (warm-up "
        f"{a['warmup_steps']} steps, cosine), weight decay {a['weight_decay']}. Loss: cross-entropy of the "
        "answer (the right option's words and `<|im_end|>`), plus "
        f"{a['map_weight']} x a needle-map loss: every video token predicts the label and colour words "
        "of the needle it shows (or none), through the final norm and the LM head",
    ]
    lines += [
        f"- phase 2 (AdaSpark on, backend `{a['backend']}`): {a['phase2_steps']} steps at lengths "
        f"{a['phase2_lengths']}, p drawn from {a['phase2_ps']} per step, every {a['phase2_dense_every']}th "
        f"step dense, lr {a['phase2_lr']}, needle-map weight halved",
        f"- seed {a['seed']}; the item seeds of every step are a function of the step number",
        f"- training wall time {info['train_seconds'] / 60:.1f} min on {info['machine']['cpu_count']} CPU "
        f"cores ({info['machine']['processor']}, torch {info['machine']['torch']}, "
        f"{info['machine']['torch_threads']} threads), validation excluded",
        "",
        f"## Held-out accuracy (test split, {ev['n_per_cell']} items per length and task; chance 25%)",
        "",
        f"| frames | task | dense | AdaSpark p = {ev['p']} | FLOPs saved (whole model / decoder) |",
        "|---|---|---|---|---|",
    ]
    for length in ev["lengths"]:
        f = ev["flops_adaspark_run"][str(length)]
        whole = 1 - f["flops"] / f["flops_dense"]
        saved = f"{whole:.1%} / {1 - f['decoder_flops'] / f['decoder_flops_dense']:.1%}"
        for task in [*TASKS, "all"]:
            key = f"{length}/{task}"
            cost = saved if task == "all" else ""
            lines.append(
                f"| {length} | {task} | {ev['dense'][key]:.1%} | {ev['adaspark'][key]:.1%} | {cost} |"
            )
    lines += [
        f"| all | all | {ev['dense']['all']:.1%} | {ev['adaspark']['all']:.1%} | |",
        "",
        f"Lengths above {max(a['lengths'])} frames were never seen in training. "
        "FLOPs and the full p sweep: `adaspark eval` (see the repository README).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
