"""Whole-model prefill of a real model on needle videos, dense vs AdaSpark, side by side (not a test).

The model is SmolVL (``--model smolvl``: Qwen2.5-VL with SmolLM2-135M-Instruct and the shipped vision
tower; its LM weights come from ``python -m adaspark.needle fetch``) or the shipped tiny needle model
(``--model needle``). For every frame count a held-out needle item (test split) is rendered and the
prompt prefilled (LM head on the last position, no cache: what answering starts with), the dense
model and each AdaSpark setting interleaved ``--repeats`` times. Per setting the table has the
medians, the whole-model FLOPs the kernels executed relative to dense (from AdaSpark's own report),
the ideal speed-up ``1 / (1 - executed FLOPs saved)``, the speed-up achieved, achieved/ideal, and
the decoder layers whose attention ran sparse (the cost model runs the others dense).

    python benchmarks/model_prefill.py --frames 512 1024 2048 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
from pathlib import Path

import torch

from adaspark import AdaSparkConfig, patch

from _bench import interleaved, machine, markdown_table, write_outputs


def load(name: str):
    """``(model, encode(item) -> inputs)`` for ``smolvl`` or ``needle``."""
    from adaspark.needle import model as nm
    from adaspark.needle import render_frames

    if name == "smolvl":
        from adaspark.needle import smolvl as sv

        model, tok = sv.load_smolvl()

        def encode(item):
            video = nm.preprocess_frames(render_frames(item), item.fps)
            return sv.encode_prompt(tok, video, item.question, item.options)

        return model, encode
    loaded = nm.load_model()

    def encode(item):
        video = nm.preprocess_frames(render_frames(item), item.fps)
        return nm.encode_prompt(loaded, video, item.question, item.options)

    return loaded.model, encode


def _layers(rep) -> str:
    """Sparse-attention layers as ranges (``0-3,7``)."""
    ids = rep.sparse_attention_layers
    if not ids:
        return "none"
    out, start = [], ids[0]
    for a, b in zip(ids, [*ids[1:], None], strict=True):
        if b != a + 1:
            out.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ",".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smolvl", choices=["smolvl", "needle"])
    ap.add_argument("--frames", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--task", default="retrieval")
    ap.add_argument("--p", type=float, nargs="+", default=[0.9, 0.5], help="AdaSpark thresholds")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="model_prefill")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from adaspark.needle.spec import make_item

    print(f"machine: {machine()}", flush=True)
    model, encode = load(args.model)
    n_layers = model.config.get_text_config().num_hidden_layers
    rows = []
    warm = encode(make_item(args.task, 16, 0, split="test"))
    for frames in args.frames:
        item = make_item(args.task, frames, 0, split="test")
        inputs = {k: v for k, v in encode(item).items() if isinstance(v, torch.Tensor)}
        ntok = inputs["input_ids"].shape[1]
        cfgs = {f"p={p}": AdaSparkConfig(p=p) for p in args.p}
        reports = {}

        def run_dense(inputs=inputs):
            return model(**inputs, logits_to_keep=1, use_cache=False)

        def make(cfg, name, inputs=inputs, reports=reports):
            def run():
                with patch(model, cfg) as h:
                    model(**inputs, logits_to_keep=1, use_cache=False)
                    reports[name] = h.report()

            return run

        fns = {"dense": run_dense, **{name: make(cfg, name) for name, cfg in cfgs.items()}}
        for cfg in cfgs.values():  # warm-up: the native kernel's build, the cost model's calibration
            with patch(model, cfg):
                model(**{k: v for k, v in warm.items() if isinstance(v, torch.Tensor)}, logits_to_keep=1)
        # one patched run at this length first: it measures the vision tower's FLOPs for this video
        # shape (FlopCounterMode, cached for every later run), which no timed run should pay
        fns[next(iter(cfgs))]()
        timing = interleaved(fns, args.repeats)
        td = timing["dense"]["median"]
        for name in cfgs:
            rep = reports[name]
            t_s = timing[name]["median"]
            ideal = 1 / max(1e-9, 1 - rep.saved)
            row = {
                "model": args.model,
                "frames": frames,
                "tokens": ntok,
                "setting": name,
                "dense_s": td,
                "adaspark_s": t_s,
                "speedup": td / t_s,
                "flops_saved_executed": rep.saved,
                "decoder_flops_saved_executed": rep.llm_saved,
                "ideal_speedup": ideal,
                "achieved_over_ideal": (td / t_s) / ideal,
                "sparse_layers": _layers(rep),
                "n_sparse_layers": len(rep.sparse_attention_layers),
                # layers that paid for a selection and then ran dense (the cost model's "after")
                "selected_then_dense": sum(
                    1 for lr in rep.layers if lr.attn_dense_calls and any(k > 0 for k in lr.cubes_kept)
                ),
                "layers": n_layers,
                "attn_density": rep.attn_density,
                "ffn_active": rep.ffn_active,
                "noisy": timing[name]["noisy"] or timing["dense"]["noisy"],
                "dense_times": timing["dense"]["times"],
                "adaspark_times": timing[name]["times"],
            }
            rows.append(row)
            print(
                f"{args.model} frames={frames} N={ntok:6d} {name:6s} dense {td:7.2f}s  adaspark {t_s:7.2f}s  "
                f"speedup {td / t_s:5.2f}x  FLOPs saved (executed) {rep.saved:.1%}  ideal {ideal:4.2f}x  "
                f"achieved/ideal {(td / t_s) / ideal:4.2f}  sparse attention in layers {_layers(rep)} "
                f"of {n_layers} (selected, then dense: {row['selected_then_dense']})"
                + ("  NOISY" if row["noisy"] else ""),
                flush=True,
            )
        del inputs
        gc.collect()
    cols = [
        ("tokens", "tokens", "d"),
        ("setting", "AdaSpark", ""),
        ("dense_s", "dense s", ".2f"),
        ("adaspark_s", "AdaSpark s", ".2f"),
        ("speedup", "speed-up", ".2f"),
        ("flops_saved_executed", "FLOPs saved (executed)", ".1%"),
        ("ideal_speedup", "ideal", ".2f"),
        ("achieved_over_ideal", "achieved/ideal", ".2f"),
        ("sparse_layers", "sparse-attention layers", ""),
        ("selected_then_dense", "selected, then dense", "d"),
        ("ffn_active", "FFN active", ".3f"),
        ("noisy", "noisy", ""),
    ]
    table = f"## Whole-model prefill ({args.model}, {args.task} items, test split)\n\n" + markdown_table(
        rows, cols
    )
    print()
    print(table)
    meta = {
        "title": f"Whole-model prefill, {args.model}, dense vs AdaSpark",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    for pth in write_outputs(args.out, args.name, meta, rows, table, None):
        print(f"wrote {pth}")


if __name__ == "__main__":
    main()
