"""The triton backend on a GPU: correctness first, then prefill times against flex and FlashAttention.

A single prepared run for a CUDA machine (not a test; nothing here runs without a GPU):

1. Correctness at a small size (2k tokens, the same Qwen2.5-VL-7B-like heads) against
   ``cube_sparse_attention_reference``: bfloat16 within twice PyTorch's own error (the rule of
   tests/test_fast_attention.py), float32 close, prefill and 5 new tokens after a cache, both
   granularities. A failure is reported and makes the script exit non-zero (the times are still
   taken, and flagged).
2. Prefill at 16k, 32k, 64k and 128k tokens, bfloat16, cube granularity, p 0.5 and 0.9, the
   synthetic inputs of ``benchmarks/attention_speed.py`` (28 query / 4 KV heads, d 128): AdaSpark
   with ``backend="triton"`` (everything: selection, block pattern, kernel), the triton kernel alone
   on a precomputed plan, AdaSpark with ``backend="flex"``, dense SDPA as PyTorch picks it, and
   SDPA forced onto its FlashAttention backend — timed interleaved, medians.

Writes ``benchmarks/results/gpu_attention.{json,md}``. About 5-10 minutes on an H200 (flex compiles
once per length; the synthetic inputs are built on the CPU)::

    pip install -e ".[triton]"
    python benchmarks/gpu_attention.py
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from adaspark.ops import AttentionStats, cube_sparse_attention
from adaspark.ops.attention import (
    cube_sparse_attention_reference,
    plan_blocks,
    prepare_inputs,
    run_blocks,
)
from adaspark.ops.attention.triton_kernel import TRITON_BLOCK, triton_available, triton_error, triton_kernel

from _bench import interleaved, machine, markdown_table, write_outputs
from attention_speed import synthetic

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def check_correctness(args) -> list[dict]:
    """The triton backend against the reference at a small size (see the module docstring)."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, ids = synthetic(
            args.check_tokens,
            args.heads,
            args.kv_heads,
            args.head_dim,
            args.focus,
            args.looks,
            dtype,
            args.device,
        )
        for gran in ("token", "cube"):
            for p in args.p:
                for nq in (q.shape[2], 5):
                    qs = q[:, :, q.shape[2] - nq :]
                    truth = cube_sparse_attention_reference(
                        qs.float(), k.float(), v.float(), ids, p, granularity=gran
                    )
                    fast = cube_sparse_attention(qs, k, v, ids, p, backend="triton", granularity=gran)
                    err = (fast.float() - truth).abs().max().item()
                    if dtype == torch.bfloat16:
                        own = cube_sparse_attention_reference(qs, k, v, ids, p, granularity=gran)
                        bound = 2 * (own.float() - truth).abs().max().item()
                    else:
                        bound = 2e-5 + 1e-4 * truth.abs().max().item()
                    ok = bool(err <= bound) and not bool(fast.isnan().any())
                    rows.append(
                        {
                            "dtype": str(dtype).removeprefix("torch."),
                            "tokens": ids.shape[1],
                            "queries": nq,
                            "granularity": gran,
                            "p": p,
                            "max_error": err,
                            "bound": bound,
                            "ok": ok,
                        }
                    )
                    log(f"{rows[-1]['dtype']} {gran} p={p} nq={nq}: error {err:.2e}, bound {bound:.2e}: {ok}")
        del q, k, v
    return rows


def flash_sdpa(q, k, v):
    """SDPA forced onto FlashAttention (``None`` if it refuses these inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        run()
    except RuntimeError as e:
        log(f"FlashAttention refused enable_gqa ({str(e).splitlines()[0]}): not timed")
        return None
    return run


def time_lengths(args, correct: bool) -> list[dict]:
    rows = []
    for n in args.lengths:
        log(f"building synthetic inputs, {n} tokens")
        q, k, v, ids = synthetic(
            n, args.heads, args.kv_heads, args.head_dim, args.focus, args.looks, torch.bfloat16, args.device
        )
        nn = ids.shape[1]
        fns = {"sdpa": partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)}
        flash = flash_sdpa(q, k, v)
        if flash is not None:
            fns["flash"] = flash
        info = {}
        for p in args.p:
            st = AttentionStats(args.heads, args.head_dim)
            cube_sparse_attention(q, k, v, ids, p, backend="triton", granularity="cube", stats=st)
            fns[f"triton p={p}"] = partial(
                cube_sparse_attention, q, k, v, ids, p, backend="triton", granularity="cube"
            )
            plan = plan_blocks(q, prepare_inputs(q, k, v, ids, p, granularity="cube"), block=TRITON_BLOCK)
            fns[f"triton kernel p={p}"] = partial(run_blocks, q, k, v, plan, kernel=triton_kernel)
            info[p] = st
            if not args.skip_flex:
                log(f"flex warm-up (compiles), {nn} tokens, p={p}")
                cube_sparse_attention(q, k, v, ids, p, backend="flex", granularity="cube")
                fns[f"flex p={p}"] = partial(
                    cube_sparse_attention, q, k, v, ids, p, backend="flex", granularity="cube"
                )
        for f in fns.values():
            f()
        log(f"timing {len(fns)} variants x {args.repeats} repeats, {nn} tokens")
        timing = interleaved(fns, args.repeats, args.device)
        base = timing["flash" if "flash" in timing else "sdpa"]["median"]
        for name, t in timing.items():
            p = float(name.split("p=")[1]) if "p=" in name else None
            st = info.get(p)
            row = {
                "tokens": nn,
                "variant": name.split(" p=")[0],
                "p": p if p is not None else "",
                "ms": t["median"] * 1e3,
                "speedup_vs_flash": base / t["median"],
                "density": st.density if st is not None else 1.0,
                "executed_density": st.executed_density if st is not None else 1.0,
                "noisy": t["noisy"],
                "checked": correct,
                "times": t["times"],
            }
            rows.append(row)
            log(
                f"N={nn:6d} {name:22s} {row['ms']:9.2f} ms  x{row['speedup_vs_flash']:5.2f} vs flash  "
                f"density {row['density']:.3f} (executed {row['executed_density']:.3f})"
            )
        del q, k, v, fns, plan
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--p", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--focus", type=float, default=0.5, help="how peaked the synthetic distributions are")
    ap.add_argument("--looks", type=int, default=3, help="random earlier cubes each cube's queries look at")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--check-tokens", type=int, default=2048, help="size of the correctness check")
    ap.add_argument("--skip-flex", action="store_true", help="do not time flex (it compiles per length)")
    ap.add_argument(
        "--device",
        default="cuda",
        help="cuda; 'cpu' only as a dry run of this script (TRITON_INTERPRET=1, tiny sizes)",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="gpu_attention")
    args = ap.parse_args(argv)
    if not triton_available(args.device):
        print(f"the triton backend cannot run here: {triton_error(args.device)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"machine: {machine()}")
    checks = check_correctness(args)
    correct = all(r["ok"] for r in checks)
    log("correctness: " + ("all checks passed" if correct else "FAILED (times below are flagged)"))
    rows = time_lengths(args, correct)
    ccols = [
        ("dtype", "dtype", ""),
        ("tokens", "tokens", "d"),
        ("queries", "queries", "d"),
        ("granularity", "granularity", ""),
        ("p", "p", ".2f"),
        ("max_error", "max error", ".2e"),
        ("bound", "bound", ".2e"),
        ("ok", "ok", ""),
    ]
    cols = [
        ("tokens", "tokens", "d"),
        ("variant", "variant", ""),
        ("p", "p", ".2f"),
        ("ms", "ms", ".2f"),
        ("speedup_vs_flash", "speed-up vs flash", ".2f"),
        ("density", "kept density", ".3f"),
        ("executed_density", "executed density", ".3f"),
        ("noisy", "noisy", ""),
    ]
    table = (
        "## Correctness (triton backend vs the reference)\n\n"
        + markdown_table(checks, ccols)
        + "\n## Prefill, bfloat16, cube granularity (attention op)\n\n"
        + "`triton` / `flex`: the whole AdaSpark call (selection, block pattern, kernel); "
        + "`triton kernel`: the kernel alone on a precomputed plan; `sdpa`: PyTorch's choice; "
        + "`flash`: SDPA forced onto FlashAttention.\n\n"
        + markdown_table(rows, cols)
    )
    print()
    print(table)
    meta = {
        "title": "AdaS-Attn triton backend on a GPU",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checks": checks,
        "correct": correct,
    }
    for pth in write_outputs(args.out, args.name, meta, rows, table, None):
        print(f"wrote {pth}")
    log("done")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
