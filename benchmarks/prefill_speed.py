"""Whole-model prefill (and one decode step), dense vs AdaSpark, side by side (not a test).

The model is the real transformers ``Qwen2_5_VLForConditionalGeneration`` with Qwen2.5-VL-7B-shaped
decoder layers (hidden 3584, 28 heads, 4 KV heads, d 128, FFN 18944), fewer of them (``--layers``),
randomly initialised; the vision tower is tiny (its cost is counted but negligible) and the vocabulary
small (the prefill computes logits for the last position only, as ``generate`` does). The input is a
video of ``T × 16 × 16`` LM tokens (448×448 frames) between a short prompt and question.

For every (length, dtype) the dense model and each AdaSpark setting run interleaved; the table has
medians, the whole-model FLOPs saved from AdaSpark's own report (what the semantics keep, and what
the kernels executed), the ideal speed-up ``1 / (1 - FLOPs saved)``, the speed-up achieved and the
ratio achieved/ideal. With ``--decode`` one new token is timed after a dense / AdaSpark prefill.

Random weights give flat cube distributions, so Top-p keeps more than a trained model would; the
ideal speed-up is computed from the FLOPs this run really saved, so the ratio is meaningful anyway.

    python benchmarks/prefill_speed.py --lengths 8192 16384 32768 --dtypes bfloat16 --layers 2
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
from pathlib import Path

import torch

from adaspark import AdaSparkConfig, patch
from adaspark.integrations.transformers.tiny import build_inputs, tiny_qwen2_5_vl

from _bench import interleaved, machine, markdown_table, write_outputs

SEVEN_B = dict(hidden_size=3584, intermediate_size=18944, num_heads=28, num_kv_heads=4)
SIDE = 32  # patches per frame side -> 16 × 16 LM tokens per temporal step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"])
    ap.add_argument("--p", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--granularity", default="cube", choices=["cube", "token"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", action="store_true", help="also time one decode step after the prefill")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="prefill_speed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"machine: {machine()}", flush=True)
    rows, dec_rows = [], []
    for dt_name in args.dtypes:
        dtype = getattr(torch, dt_name)
        model = tiny_qwen2_5_vl(
            num_layers=args.layers, vision_hidden=32, vision_depth=1, dtype=dtype, **SEVEN_B
        )
        for n in args.lengths:
            t = max(1, n // 256)
            inputs = build_inputs([[(t, SIDE, SIDE)]], prefix=32, suffix=32)
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
            ntok = inputs["input_ids"].shape[1]
            cfgs = {
                f"p={p}": AdaSparkConfig(p=p, granularity=args.granularity, backend=args.backend)
                for p in args.p
            }
            reports = {}
            fns = prefill_fns(model, inputs, cfgs, reports)
            for f in fns.values():  # warm-up: compiles, caches the vision FLOPs
                f()
            timing = interleaved(fns, args.repeats)
            td = timing["dense"]["median"]
            for name in cfgs:
                rep = reports[name]
                t_s = timing[name]["median"]
                ideal = 1 / max(1e-9, 1 - rep.saved_ideal)
                row = {
                    "dtype": dt_name,
                    "tokens": ntok,
                    "setting": name,
                    "layers": args.layers,
                    "dense_s": td,
                    "adaspark_s": t_s,
                    "speedup": td / t_s,
                    "flops_saved": rep.saved_ideal,
                    "flops_saved_executed": rep.saved,
                    "decoder_flops_saved": rep.llm_saved_ideal,
                    "attn_density": rep.attn_density,
                    "ffn_active": rep.ffn_active,
                    "ideal_speedup": ideal,
                    "achieved_over_ideal": (td / t_s) / ideal,
                    "noisy": timing[name]["noisy"] or timing["dense"]["noisy"],
                    "dense_times": timing["dense"]["times"],
                    "adaspark_times": timing[name]["times"],
                }
                rows.append(row)
                print(
                    f"{dt_name:8s} N={ntok:6d} {name:6s} dense {td:7.2f}s  adaspark {t_s:7.2f}s  speedup "
                    f"{td / t_s:5.2f}x  FLOPs saved {rep.saved_ideal:.1%} (executed {rep.saved:.1%})  "
                    f"attn density {rep.attn_density:.3f}  ffn active {rep.ffn_active:.3f}  "
                    f"ideal {ideal:4.2f}x  achieved/ideal {(td / t_s) / ideal:4.2f}"
                    + ("  NOISY" if row["noisy"] else ""),
                    flush=True,
                )
            if args.decode:
                dec_rows += decode_step(model, inputs, cfgs, dt_name, ntok, max(args.repeats, 5))
            del inputs
            gc.collect()
        del model
        gc.collect()
    cols = [
        ("dtype", "dtype", ""),
        ("tokens", "tokens", "d"),
        ("setting", "AdaSpark", ""),
        ("dense_s", "dense s", ".2f"),
        ("adaspark_s", "AdaSpark s", ".2f"),
        ("speedup", "speed-up", ".2f"),
        ("flops_saved", "FLOPs saved", ".1%"),
        ("flops_saved_executed", "executed", ".1%"),
        ("attn_density", "attn density", ".3f"),
        ("ffn_active", "FFN active", ".3f"),
        ("ideal_speedup", "ideal", ".2f"),
        ("achieved_over_ideal", "achieved/ideal", ".2f"),
        ("noisy", "noisy", ""),
    ]
    title = f"## Prefill, whole model ({args.layers} Qwen2.5-VL-7B-shaped layers)\n\n"
    table = title + markdown_table(rows, cols)
    if dec_rows:
        dcols = [
            ("dtype", "dtype", ""),
            ("context", "context", "d"),
            ("setting", "AdaSpark", ""),
            ("dense_ms", "dense ms", ".1f"),
            ("adaspark_ms", "AdaSpark ms", ".1f"),
            ("speedup", "speed-up", ".2f"),
            ("noisy", "noisy", ""),
        ]
        table += "\n## One decode step (whole model)\n\n" + markdown_table(dec_rows, dcols)
    print()
    print(table)

    def plot(path):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for dt_name in args.dtypes:
            for p in args.p:
                rs = [r for r in rows if r["dtype"] == dt_name and r["setting"] == f"p={p}"]
                if not rs:
                    continue
                x = [r["tokens"] for r in rs]
                (line,) = ax.plot(x, [r["speedup"] for r in rs], marker="o", label=f"{dt_name} p={p}")
                ax.plot(x, [r["ideal_speedup"] for r in rs], ls=":", color=line.get_color())
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("prefill speed-up over dense (dotted: ideal)")
        ax.set_title(f"Whole-model prefill, {args.layers} Qwen2.5-VL-7B-shaped layers")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)

    meta = {
        "title": "Whole-model prefill, dense vs AdaSpark",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "decode": dec_rows,
    }
    for pth in write_outputs(args.out, args.name, meta, rows, table, plot):
        print(f"wrote {pth}")


def prefill_fns(model, inputs, cfgs, reports) -> dict:
    """Timed callables: the dense prefill and one per AdaSpark setting (which stores its report)."""

    def run_dense():
        return model(**inputs, logits_to_keep=1, use_cache=False)

    def make(cfg, name):
        def run():
            with patch(model, cfg) as h:
                model(**inputs, logits_to_keep=1, use_cache=False)
                reports[name] = h.report()

        return run

    fns = {"dense": run_dense}
    fns.update({name: make(cfg, name) for name, cfg in cfgs.items()})
    return fns


def decode_step(model, inputs, cfgs, dt_name, ntok, repeats) -> list[dict]:
    """Per-token decode time: (generate 9 new tokens − generate 1) / 8, dense and with AdaSpark.

    Greedy, ``min_new_tokens`` forces the length; both runs include the same prefill, so the
    difference is eight decode steps at a context of ``ntok`` + a few tokens.
    """
    import statistics

    def gen(n, cfg=None):
        def run():
            kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
            if cfg is None:
                model.generate(**inputs, **kw)
            else:
                with patch(model, cfg):
                    model.generate(**inputs, **kw)

        return run

    fns = {"dense/1": gen(1), "dense/9": gen(9)}
    for name, cfg in cfgs.items():
        fns[f"{name}/1"] = gen(1, cfg)
        fns[f"{name}/9"] = gen(9, cfg)
    timing = interleaved(fns, repeats)

    def per_token(name):
        long_, short = timing[f"{name}/9"]["times"], timing[f"{name}/1"]["times"]
        return statistics.median([(a - b) / 8 for a, b in zip(long_, short, strict=True)])

    td = per_token("dense")
    out_rows = []
    for name in cfgs:
        ta = per_token(name)
        noisy = any(timing[k]["noisy"] for k in (f"{name}/1", f"{name}/9", "dense/1", "dense/9"))
        out_rows.append(
            {
                "dtype": dt_name,
                "context": ntok,
                "setting": name,
                "dense_ms": td * 1e3,
                "adaspark_ms": ta * 1e3,
                "speedup": td / ta,
                "noisy": noisy,
            }
        )
        print(
            f"decode {dt_name} ctx={ntok}: {name} dense {td * 1e3:.1f} ms/token  "
            f"adaspark {ta * 1e3:.1f} ms/token  speedup {td / ta:.2f}x" + ("  NOISY" if noisy else ""),
            flush=True,
        )
    return out_rows


if __name__ == "__main__":
    main()
