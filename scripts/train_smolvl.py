"""Train SmolVL on the needle benchmark: stage 1 the vision side with SmolLM2-135M-Instruct frozen;
stage 2 also a LoRA adapter on the LM; stage 3 the same with AdaSpark on (the paper's light fine-tuning).

The model is :func:`adaspark.needle.smolvl.build_smolvl` (Qwen2.5-VL with SmolLM2-135M-Instruct as
its decoder). Stage 1 aligns the vision tower, its merger and the new embedding rows of Qwen's vision
tokens with the frozen language model; nothing of the LM changes (gradients pass through it). Data:
the needle benchmark's train split (:mod:`adaspark.needle`), generated on the fly; the items
of step ``s`` are a pure function of ``s`` (item seeds ``64 s ...``), and a curriculum in frames
(``--curriculum``: short videos first) fixes the length of each step.

Loss: cross-entropy of the answer (the right option's tokens and ``<|im_end|>``) after the prompt of
:func:`adaspark.needle.smolvl.encode_prompt` (question and options), plus ``--map-weight`` × a
needle-map loss: every video token showing a needle predicts, through the frozen LM and its head,
the first token of the needle's label and of its colour (the LM head runs on those rows only), plus
``--embed-map-weight`` × the same map in the LM's input-embedding space (:class:`EmbedMap`: the vision
feature of a needle token should point towards the embeddings of the words naming it).

Files in ``--out`` (default ``runs/smolvl``): ``checkpoint.pt`` (trained parts, optimiser, step;
written atomically every ``--checkpoint-every`` steps: rerunning the same command resumes from it,
and log lines written after it are dropped), ``trained.safetensors`` + ``smolvl.json`` (the trained
parts alone, see :func:`adaspark.needle.smolvl.save_trained`), ``training_config.json`` and
``training_log.jsonl``. With ``--ship DIR`` these four files are also copied to ``DIR`` (a tracked
folder, e.g. ``src/adaspark/assets/smolvl-needle``) and committed with git every
``--commit-every-min`` minutes, so stopped work is never lost.

Usage (1 thread leaves the second core free)::

    OMP_NUM_THREADS=1 python scripts/train_smolvl.py --out runs/smolvl \\
        --ship src/adaspark/assets/smolvl-needle
    # held-out accuracy of the latest trained parts (dense, val or test split)
    OMP_NUM_THREADS=1 python scripts/train_smolvl.py --out runs/smolvl --eval-only --eval-split test \\
        --eval-lengths 32 64 --eval-n 4
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adaspark.core.io import atomic_path, atomic_write_json
from adaspark.needle import COLORS, DIGITS, SHAPES, TASKS, cell_seed, make_item, render_frames
from adaspark.needle import model as nm
from adaspark.needle import smolvl as sv
from adaspark.needle.smollm2 import WHEEL_REQUIREMENT, WHEEL_SHA256, load_smollm2
from adaspark.needle.spec import GENERATOR_VERSION
from adaspark.needle.training import answer_batch, needle_map

TOKENS_PER_FRAME = 8  # 112×112 frames: 4×4 LM tokens per 2-frame temporal patch


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/smolvl"), help="run directory (resumes from it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--stage",
        type=int,
        default=1,
        choices=[1, 2, 3],
        help="1: vision side only, LM frozen; 2: also a LoRA adapter on every LM linear layer; "
        "3: as 2 with AdaSpark on in the forward (the paper's light fine-tuning with sparsity on)",
    )
    ap.add_argument(
        "--sparse-ps",
        type=float,
        nargs="+",
        default=[0.3, 0.5, 0.7],
        help="stage 3: each step's Top-p p is drawn from these",
    )
    ap.add_argument(
        "--sparse-dense-every",
        type=int,
        default=4,
        help="stage 3: every N-th step runs dense (0: never), so the dense model is not forgotten",
    )
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="directory of trained parts (save_trained) to start from when OUT has no checkpoint",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--steps", type=int, default=3000, help="length of the LR schedule (training stops there)"
    )
    ap.add_argument(
        "--curriculum",
        nargs="+",
        default=["0:16", "150:16,32", "400:32,64", "1000:64,128"],
        help="STEP:LEN,LEN,...: from STEP on, each step's video length is drawn from the LENs",
    )
    ap.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=["retrieval", "retrieval", "ordering", "counting"],
        help="task of each item, drawn uniformly from this list (repeat to weight)",
    )
    ap.add_argument(
        "--video-tokens-per-step",
        type=int,
        default=512,
        help="batch size of a step = this // video tokens of one item (at least 1)",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--map-weight", type=float, default=0.5)
    ap.add_argument(
        "--embed-map-weight",
        type=float,
        default=1.0,
        help="weight of the needle map in the LM's input-embedding space (vision features vs words)",
    )
    ap.add_argument("--embed-map-temperature", type=float, default=0.1)
    ap.add_argument("--vision-hidden", type=int, default=sv.VisionSize.hidden)
    ap.add_argument("--vision-depth", type=int, default=sv.VisionSize.depth)
    ap.add_argument("--vision-heads", type=int, default=sv.VisionSize.heads)
    ap.add_argument("--vision-intermediate", type=int, default=sv.VisionSize.intermediate)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--val-lengths", type=int, nargs="+", default=[32])
    ap.add_argument("--val-n", type=int, default=4, help="val items per (length, task)")
    ap.add_argument(
        "--ship", type=Path, default=None, help="tracked folder to copy the latest trained parts to"
    )
    ap.add_argument("--commit-every-min", type=float, default=15.0)
    ap.add_argument("--eval-only", action="store_true", help="held-out accuracy of OUT's trained parts")
    ap.add_argument(
        "--untrained", action="store_true", help="with --eval-only: the untrained model (a reference)"
    )
    ap.add_argument("--eval-split", default="val", choices=["val", "test"])
    ap.add_argument("--eval-lengths", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--eval-n", type=int, default=4)
    ap.add_argument("--eval-tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument(
        "--eval-name", default=None, help="file name of the --eval-only result (default eval_SPLIT.json)"
    )
    return ap.parse_args(argv)


def vision_size(args) -> sv.VisionSize:
    return sv.VisionSize(
        hidden=args.vision_hidden,
        depth=args.vision_depth,
        heads=args.vision_heads,
        intermediate=args.vision_intermediate,
    )


# ---------------------------------------------------------------------------------------- data
def curriculum(args) -> list[tuple[int, list[int]]]:
    out = []
    for part in args.curriculum:
        start, lengths = part.split(":")
        out.append((int(start), [int(x) for x in lengths.split(",")]))
    return sorted(out)


def step_plan(args, step: int) -> tuple[int, list[tuple[str, int]]]:
    """``(length, [(task, item seed), ...])`` of training step ``step`` (a pure function of it)."""
    rng = random.Random(args.seed * 1_000_003 + step)
    lengths = [ls for start, ls in curriculum(args) if start <= step][-1]
    length = lengths[rng.randrange(len(lengths))]
    batch = max(1, args.video_tokens_per_step // (length * TOKENS_PER_FRAME))
    return length, [(args.tasks[rng.randrange(len(args.tasks))], step * 64 + j) for j in range(batch)]


def first_token(tokenizer, word: str) -> int:
    return tokenizer(word, add_special_tokens=False)["input_ids"][0]


def batch_inputs(tokenizer, items, settings):
    """Right-padded prompt + answer batch, answer targets ``(B, N)`` and needle-map labels ``(B, N, 2)``."""
    none_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    seqs = []
    for it in items:
        video = nm.preprocess_frames(render_frames(it), it.fps, settings)
        enc = sv.encode_prompt(tokenizer, video, it.question, it.options)
        answer = nm.option_token_ids(tokenizer, it.options)[it.answer]
        seqs.append((enc, answer, needle_map(it, video, lambda w: first_token(tokenizer, w), none_id)))
    return (*answer_batch(seqs, tokenizer.pad_token_id), none_id)


def map_loss_fn(logits, labels) -> torch.Tensor:
    """Mean cross-entropy of the label and colour tokens over the video tokens showing a needle."""
    if logits.shape[0] == 0:
        return logits.sum() * 0
    return 0.5 * (F.cross_entropy(logits, labels[:, 0]) + F.cross_entropy(logits, labels[:, 1]))


class EmbedMap:
    """The needle map in the LM's input-embedding space: the vision feature of a video token showing a
    needle should point (cosine) towards the embedding of the needle's label word rather than the
    other labels', and towards its colour word rather than the other colours' — so that the frozen LM
    reads a needle like the words that name it. Features are captured from the vision tower's output
    (a forward hook), in the order of the video tokens of the batch."""

    def __init__(self, model, tokenizer, temperature: float):
        self.labels = [first_token(tokenizer, w) for w in (*SHAPES, *DIGITS)]
        self.colours = [first_token(tokenizer, w) for w in COLORS]
        self.emb = model.model.language_model.embed_tokens.weight
        self.temperature = temperature
        self.features = None
        self._hook = model.model.visual.register_forward_hook(self._capture)

    def _capture(self, module, args, output) -> None:
        self.features = output.pooler_output

    def remove(self) -> None:
        self._hook.remove()

    def loss(self, labels: torch.Tensor, none_id: int) -> torch.Tensor:
        video = labels[labels[..., 0] >= 0]  # (N_video, 2), batch and token order
        feats = self.features
        if feats is None or feats.shape[0] != video.shape[0]:
            raise RuntimeError("the captured vision features do not match the video tokens")
        hit = video[:, 0] != none_id
        if not bool(hit.any()):
            return feats.sum() * 0
        f = F.normalize(feats[hit].float(), dim=-1)
        total = feats.new_zeros(())
        for ids, col in ((self.labels, 0), (self.colours, 1)):
            words = F.normalize(self.emb.detach()[ids].float(), dim=-1)
            index = {t: i for i, t in enumerate(ids)}
            target = torch.tensor([index[int(t)] for t in video[hit, col]], dtype=torch.long)
            total = total + 0.5 * F.cross_entropy(f @ words.T / self.temperature, target)
        return total


# ---------------------------------------------------------------------------------------- model
class Trainable:
    """The parameters trained: the vision tower + merger, the new embedding rows and (stage 2) the LoRA
    adapters of the language model.

    The embedding matrix is shared with the frozen vocabulary (and tied to the LM head), so the new
    rows live in their own parameter ``rows``: after each backward its gradient is read from the
    matrix's gradient, and after each optimiser step the rows are written back into the matrix.
    """

    def __init__(self, model, adapters=()):
        self.model = model
        self.adapters = list(adapters)
        self.base = model.config.vision_start_token_id
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.model.visual.parameters():
            p.requires_grad_(True)
        self.emb = model.model.language_model.embed_tokens.weight
        self.emb.requires_grad_(True)
        self.rows = torch.nn.Parameter(self.emb.detach()[self.base :].clone())
        for a in self.adapters:
            a.A.requires_grad_(True)
            a.B.requires_grad_(True)

    def params(self):
        lora = [p for a in self.adapters for p in (a.A, a.B)]
        return [*self.model.model.visual.parameters(), self.rows, *lora]

    def after_backward(self) -> None:
        self.rows.grad = self.emb.grad[self.base :].clone() if self.emb.grad is not None else None
        self.emb.grad = None

    def after_step(self) -> None:
        with torch.no_grad():
            self.emb[self.base :] = self.rows


def answer_logits(model, inputs, targets, labels, none_id: int):
    """Logits (LM head on those rows only) at the answer positions and at the needle tokens."""
    out = model.model(**inputs, use_cache=False)
    h = out.last_hidden_state
    at = targets >= 0
    keep = (labels[..., 0] >= 0) & (labels[..., 0] != none_id)  # video tokens that show a needle
    return model.lm_head(h[at]), targets[at], model.lm_head(h[keep]), labels[keep]


def sparse_config(args, step: int):
    """Stage 3: the AdaSpark config of step ``step`` (a pure function of it), or None for a dense step.
    Always sparse where it is on (no cost model: the semantics are what is trained)."""
    if args.stage != 3 or (args.sparse_dense_every and step % args.sparse_dense_every == 0):
        return None
    from adaspark import AdaSparkConfig

    rng = random.Random(args.seed * 7_919 + step)
    return AdaSparkConfig(p=args.sparse_ps[rng.randrange(len(args.sparse_ps))], cost_model=False)


def forward_logits(model, args, step: int, inputs, targets, labels, none_id: int):
    """:func:`answer_logits` plus the AdaSpark report (None on a dense step); under ``adaspark.patch``
    on the sparse steps of stage 3."""
    cfg = sparse_config(args, step)
    if cfg is None:
        return (*answer_logits(model, inputs, targets, labels, none_id), None)
    import adaspark

    with adaspark.patch(model, cfg) as handle:
        out = answer_logits(model, inputs, targets, labels, none_id)
        return (*out, handle.report())


# ---------------------------------------------------------------------------------------- eval
def eval_items(split: str, lengths, n: int, tasks=TASKS):
    """``n`` items per (length, task); the core tasks' seeds are those of earlier runs (``cell_seed``)."""
    items = []
    for li, length in enumerate(lengths):
        for task in tasks:
            base = cell_seed(lengths, tasks, li, task, n)
            items += [make_item(task, length, base + j, split=split) for j in range(n)]
    return items


@torch.inference_mode()
def accuracy(model, tokenizer, items, settings) -> dict:
    cells: dict[str, list[int]] = {}
    for it in items:
        r = sv.answer_item(model, tokenizer, it, None, settings=settings)
        for key in (f"{it.num_frames}/{it.task}", f"{it.num_frames}/all", "all"):
            cells.setdefault(key, []).append(int(r["correct"]))
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(cells.items())} | {"n": len(items)}


# ---------------------------------------------------------------------------------------- files
def log(path: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def trim_log(path: Path, step: int) -> None:
    """Drop log lines of steps after ``step`` (written after the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if rec.get("step", 0) <= step:
            keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")


def run_info(args, trainable, elapsed: float, step: int) -> dict:
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "stage": args.stage,
        "trained": "vision tower + merger + new embedding rows; SmolLM2 frozen"
        if args.stage == 1
        else f"vision tower + merger + new embedding rows + LoRA rank {args.lora_rank} "
        f"(alpha {args.lora_alpha}) on SmolLM2's {', '.join(sv.LORA_TARGETS)}"
        + (
            f"; AdaSpark on (p from {args.sparse_ps}, every {args.sparse_dense_every}th step dense)"
            if args.stage == 3
            else ""
        ),
        "trained_parameters": sum(p.numel() for p in trainable.params()),
        "lm": {"wheel": WHEEL_REQUIREMENT, "wheel_sha256": WHEEL_SHA256},
        "vision": asdict(vision_size(args)),
        "step": step,
        "train_seconds": round(elapsed, 1),
        "generator_version": GENERATOR_VERSION,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


SHIPPED = (sv.TRAINED_FILE, sv.META_FILE, "training_config.json", "training_log.jsonl")


def ship(out: Path, dest: Path, step: int, stage: int) -> None:
    """Copy the trained parts and their logs to ``dest`` and commit that folder (only it) with git."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in SHIPPED:
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(out / name, tmp)
    root = subprocess.run(
        ["git", "-C", str(dest), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False
    )
    if root.returncode != 0:
        print(f"warning: {dest} is not in a git work tree; copied, not committed", file=sys.stderr)
        return
    for cmd in (
        ["git", "add", "--", str(dest.resolve())],
        [
            "git",
            "commit",
            "-q",
            "-m",
            f"smolvl stage {stage}: trained parts at step {step}",
            "--",
            str(dest.resolve()),
        ],
    ):
        r = subprocess.run(cmd, cwd=root.stdout.strip(), capture_output=True, text=True, check=False)
        if r.returncode != 0:
            print(f"warning: {' '.join(cmd[:2])} failed: {(r.stderr or r.stdout).strip()}", file=sys.stderr)
            return


def lr_at(args, step: int) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    frac = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logf, ckpt_path = out / "training_log.jsonl", out / "checkpoint.pt"
    settings = nm.NEEDLE_VIDEO
    llama, tok = load_smollm2()
    torch.manual_seed(args.seed)
    model, vtok = sv.build_smolvl(llama, tok, vision_size(args), seed=args.seed)
    del llama
    if args.eval_only:
        step = 0
        if not args.untrained:
            sv.load_trained(model, out)
            step = json.loads((out / "training_config.json").read_text(encoding="utf-8")).get("step")
        items = eval_items(args.eval_split, args.eval_lengths, args.eval_n, args.eval_tasks)
        t0 = time.perf_counter()
        acc = accuracy(model, vtok, items, settings)
        rec = {
            "split": args.eval_split,
            "lengths": args.eval_lengths,
            "n_per_cell": args.eval_n,
            "dense": acc,
            "step": step,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(json.dumps(rec, indent=1))
        name = args.eval_name or f"eval_{args.eval_split}{'_untrained' if args.untrained else ''}.json"
        atomic_write_json(out / name, rec)
        return 0
    adapters = sv.add_lora(model, args.lora_rank, args.lora_alpha, seed=args.seed) if args.stage >= 2 else []
    if args.init is not None and not ckpt_path.is_file():
        # an earlier stage's result: an adapter in it is loaded into the adapters (not merged away)
        sv.load_trained(model, args.init)
    trainable = Trainable(model, adapters)
    opt = torch.optim.AdamW(trainable.params(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    step, elapsed = 0, 0.0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        sv.load_trained_state(model, ck["trained"])
        with torch.no_grad():
            trainable.rows.copy_(ck["trained"]["new_embedding_rows"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck["elapsed"]
        trim_log(logf, step)
        now_args = {k: str(v) for k, v in vars(args).items()}
        changed = {k: [ck["args"].get(k), v] for k, v in now_args.items() if ck["args"].get(k) != v}
        log(logf, {"step": step, "resumed": True, "changed_args": changed})  # [before, now]
    atomic_write_json(out / "training_config.json", run_info(args, trainable, elapsed, step))
    val = eval_items("val", args.val_lengths, args.val_n)
    render_frames(val[0])  # decode the haystack footage once, outside the timed steps
    embed_map = EmbedMap(model, vtok, args.embed_map_temperature) if args.embed_map_weight > 0 else None
    run = {"loss": 0.0, "map": 0.0, "emap": 0.0, "acc": 0.0, "n": 0, "saved": [], "sparse_loss": []}
    last_commit = time.monotonic()
    t_last = time.perf_counter()
    model.train()
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step)
        length, plan = step_plan(args, step)
        items = [make_item(task, length, seed, split="train") for task, seed in plan]
        inputs, targets, labels, none_id = batch_inputs(vtok, items, settings)
        logits, target, map_logits, map_labels, report = forward_logits(
            model, args, step, inputs, targets, labels, none_id
        )
        ans = F.cross_entropy(logits.float(), target)
        mloss = map_loss_fn(map_logits.float(), map_labels) if args.map_weight > 0 else torch.zeros(())
        emap = embed_map.loss(labels, none_id) if embed_map is not None else torch.zeros(())
        loss = ans + args.map_weight * mloss + args.embed_map_weight * emap
        opt.zero_grad(set_to_none=True)
        loss.backward()
        trainable.after_backward()
        torch.nn.utils.clip_grad_norm_(trainable.params(), 1.0)
        opt.step()
        trainable.after_step()
        step += 1
        run["loss"] += ans.item() * len(items)
        run["map"] += mloss.item() * len(items)
        run["emap"] += emap.item() * len(items)
        run["acc"] += float((logits.argmax(-1) == target).float().mean()) * len(items)
        run["n"] += len(items)
        if report is not None:
            run["saved"].append(report.llm_saved)
            run["sparse_loss"].append(ans.item())
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        if step % args.log_every == 0 or step == args.steps:
            n = max(1, run["n"])
            log(
                logf,
                {
                    "step": step,
                    "length": length,
                    "loss": round(run["loss"] / n, 4),
                    "map_loss": round(run["map"] / n, 4),
                    "embed_map_loss": round(run["emap"] / n, 4),
                    "train_token_acc": round(run["acc"] / n, 4),
                    "lr": lr_at(args, step - 1),
                    "elapsed_s": round(elapsed, 1),
                    **(
                        {
                            "sparse_steps": len(run["saved"]),
                            "sparse_decoder_saved": round(sum(run["saved"]) / len(run["saved"]), 4),
                            "sparse_loss": round(sum(run["sparse_loss"]) / len(run["sparse_loss"]), 4),
                        }
                        if run["saved"]
                        else {}
                    ),
                },
            )
            run = {"loss": 0.0, "map": 0.0, "emap": 0.0, "acc": 0.0, "n": 0, "saved": [], "sparse_loss": []}
        if step % args.val_every == 0 or step == args.steps:
            model.eval()
            t0 = time.perf_counter()
            log(
                logf,
                {
                    "step": step,
                    "val_dense": accuracy(model, vtok, val, settings),
                    "val_s": round(time.perf_counter() - t0, 1),
                },
            )
            model.train()
            t_last = time.perf_counter()
        if step % args.checkpoint_every == 0 or step == args.steps:
            with atomic_path(ckpt_path) as tmp:
                torch.save(
                    {
                        "trained": sv.trained_state_dict(model),
                        "opt": opt.state_dict(),
                        "step": step,
                        "elapsed": elapsed,
                        "args": {k: str(v) for k, v in vars(args).items()},
                    },
                    tmp,
                )
            sv.save_trained(model, out, vision=vision_size(args), extra={"step": step})
            atomic_write_json(out / "training_config.json", run_info(args, trainable, elapsed, step))
            if args.ship is not None and (
                time.monotonic() - last_commit >= 60 * args.commit_every_min or step == args.steps
            ):
                ship(out, args.ship, step, args.stage)
                last_commit = time.monotonic()
            t_last = time.perf_counter()
    print(f"done: {step} steps, {elapsed:.0f} s of training", flush=True)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
