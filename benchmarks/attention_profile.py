"""Where a sparse prefill's time goes: selection + block pattern vs the kernel, against dense (not a test).

For each length, on the synthetic cube-structured inputs of ``attention_speed.py``: dense SDPA,
``plan_blocks`` (cube mean keys are given; scoring, Top-p, block pattern) and the block kernel on
that plan, each the median of ``--repeats`` runs after a warm-up, in one process. Printed per row:
the executed fraction of dense's score entries, the kernel's time per executed entry relative to
dense SDPA's per causal pair (``kernel/dense per entry``), and the selection's share of the sparse
time::

    python benchmarks/attention_profile.py --lengths 32768 --heads 7 --kv-heads 1 --head-dim 128 --threads 1
    python benchmarks/attention_profile.py --lengths 1024 2048 4096 8192 --heads 9 --kv-heads 3 --head-dim 64
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from adaspark.ops.attention import BLOCK_KERNELS, plan_blocks, prepare_inputs, run_blocks

from _bench import machine, markdown_table, median_time, write_outputs
from attention_speed import synthetic


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--p", type=float, nargs="+", default=[0.5])
    ap.add_argument("--heads", type=int, default=7)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kernel", default="native", choices=sorted(BLOCK_KERNELS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="attention_profile")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"machine: {machine()}", flush=True)
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    rows = []
    for n in args.lengths:
        q, k, v, ids = synthetic(n, hq, hkv, d, 0.5, 3, torch.float32, "cpu")[:4]
        ntok = ids.shape[1]
        td = median_time(
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=hq != hkv
            ),
            args.repeats,
        )
        for p in args.p:
            inp = prepare_inputs(q, k, v, ids, p, granularity="cube")
            ts = median_time(lambda q=q, inp=inp: plan_blocks(q, inp, block=64), args.repeats)
            plan = plan_blocks(q, inp, block=64)
            tk = median_time(
                lambda q=q, k=k, v=v, plan=plan: run_blocks(q, k, v, plan, kernel=BLOCK_KERNELS[args.kernel]),
                args.repeats,
            )
            frac = plan.executed_fraction
            row = {
                "tokens": ntok,
                "heads": f"{hq}/{hkv}, d {d}",
                "p": p,
                "dense_s": td,
                "select_s": ts,
                "kernel_s": tk,
                "executed_fraction": frac,
                "kernel_over_dense_per_entry": (tk / frac) / td,
                "select_share": ts / (ts + tk),
            }
            rows.append(row)
            print(
                f"N={ntok:6d} p={p}: dense {td:.3f}s  selection {ts:.3f}s  kernel {tk:.3f}s  executed "
                f"{frac:.3f}  kernel/dense per entry {row['kernel_over_dense_per_entry']:.2f}  "
                f"selection share {row['select_share']:.0%}",
                flush=True,
            )
    cols = [
        ("tokens", "tokens", "d"),
        ("heads", "heads (q/kv), head dim", ""),
        ("p", "p", ".2f"),
        ("dense_s", "dense s", ".3f"),
        ("select_s", "selection + pattern s", ".3f"),
        ("kernel_s", f"{args.kernel} kernel s", ".3f"),
        ("executed_fraction", "executed fraction", ".3f"),
        ("kernel_over_dense_per_entry", "kernel/dense per entry", ".2f"),
        ("select_share", "selection share", ".0%"),
    ]
    table = "## Sparse prefill: selection vs kernel\n\n" + markdown_table(rows, cols)
    print()
    print(table)
    meta = {
        "title": "Where a sparse prefill's time goes",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    for pth in write_outputs(args.out, args.name, meta, rows, table, None):
        print(f"wrote {pth}")


if __name__ == "__main__":
    main()
