"""AdaS-Attn op vs dense SDPA, side by side: prefill at several lengths, dtypes and p (not a test).

For every (length, dtype) the dense baseline — ``scaled_dot_product_attention(is_causal=True,
enable_gqa=True)``, what a user would run instead — and every AdaSpark variant (granularity × p)
are timed interleaved; the table has medians, the kept density (over all causal pairs and heads,
what the semantics attend), the ideal speed-up 1/density, the speed-up achieved and the ratio
achieved/ideal. AdaSpark's time includes everything it does: cube mean keys, scoring, Top-p, the
block mask and the kernel. A decode table (one new token at a long context) follows.

Inputs are synthetic with a controlled structure (a trained model's attention is not available
here): a Qwen2.5-VL-7B-shaped layer (28 query heads, 4 KV heads, d 128), a video of ``T × 16 × 16``
LM tokens (cubes 4×4×4) between a short system prompt and question; every cube has a random
direction in key space, its keys are that direction plus noise, and the queries of a cube point
at the directions of a few cubes it "looks at" (the cube at the same place one time step earlier
and a few random earlier ones, per head) plus per-token noise. ``--focus`` scales how peaked the
resulting cube distributions are.

    python benchmarks/attention_speed.py --lengths 8192 16384 32768 --dtypes bfloat16 float32
"""

from __future__ import annotations

import argparse
import shlex
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from adaspark.core.layout import grid_cube_ids
from adaspark.ops import AttentionStats, cube_sparse_attention
from adaspark.ops.attention import resolve_attention_backend
from adaspark.ops.cubes import build_cube_index, cube_mean_keys

from _bench import interleaved, machine, markdown_table, write_outputs

PRE, POST = 64, 64  # text tokens before / after the video
SIDE = 16  # LM tokens per frame side (a 448×448 frame after the 2×2 merge)


def synthetic(n: int, hq: int, hkv: int, d: int, focus: float, looks: int, dtype, device, seed=0):
    """q/k/v ``[1, H, N, D]`` and cube ids for a ``T × 16 × 16`` video filling about ``n`` tokens."""
    g = torch.Generator().manual_seed(seed)
    t = max(4, (n - PRE - POST) // (SIDE * SIDE))
    vid = grid_cube_ids(t, SIDE, SIDE, (4, 4, 4))
    ids = torch.cat([torch.full((PRE,), -1), vid, torch.full((POST,), -1)])[None]
    n = ids.shape[1]
    c = int(vid.max()) + 1
    per_t = (SIDE // 4) ** 2
    topics = torch.randn(hkv, c, d, generator=g)
    cls = ids[0].clamp_min(0)
    k = topics[:, cls] + torch.randn(hkv, n, d, generator=g)
    k[:, ids[0] < 0] = torch.randn(hkv, int((ids[0] < 0).sum()), d, generator=g)
    # each (head, cube) looks at the cube one time step earlier and `looks` random earlier cubes
    grp = hq // hkv
    q = torch.randn(hq, n, d, generator=g)
    cube_t = torch.arange(c) // per_t
    for h in range(hq):
        tgt = torch.zeros(c, d)
        prev = torch.where(cube_t > 0, torch.arange(c) - per_t, torch.arange(c))
        tgt += topics[h // grp, prev]
        for _ in range(looks):
            r = (torch.rand(c, generator=g) * (cube_t * per_t).clamp_min(1)).long()
            tgt += topics[h // grp, r]
        q[h, ids[0] >= 0] += focus * tgt[cls[ids[0] >= 0]] / (looks + 1) ** 0.5
    v = torch.randn(hkv, n, d, generator=g)
    return (
        q[None].to(device=device, dtype=dtype),
        k[None].to(device=device, dtype=dtype),
        v[None].to(device=device, dtype=dtype),
        ids.to(device),
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--p", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--granularity", nargs="+", default=["cube", "token"], choices=["cube", "token"])
    ap.add_argument("--backends", nargs="+", default=["auto"], help="AdaSpark backends (default auto)")
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--focus", type=float, default=0.5, help="how peaked the synthetic distributions are")
    ap.add_argument("--looks", type=int, default=3, help="random earlier cubes each cube's queries look at")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-lengths", type=int, nargs="*", default=[8192, 32768])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="attention_speed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, dec_rows = [], []
    print(f"machine: {machine()}")
    for dt_name in args.dtypes:
        dtype = getattr(torch, dt_name)
        for n in args.lengths:
            q, k, v, ids = synthetic(
                n, args.heads, args.kv_heads, args.head_dim, args.focus, args.looks, dtype, args.device
            )
            nn = ids.shape[1]
            fns = {"dense": partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)}
            stats = {}
            for be_name in args.backends:
                for gran in args.granularity:
                    for p in args.p:
                        name = f"{gran} p={p}" + ("" if be_name == "auto" else f" [{be_name}]")
                        st = AttentionStats(args.heads, args.head_dim)
                        # warm-up (compiles flex once per shape) and statistics
                        cube_sparse_attention(q, k, v, ids, p, backend=be_name, granularity=gran, stats=st)
                        stats[name] = (gran, p, st, be_name)
                        fns[name] = partial(
                            cube_sparse_attention, q, k, v, ids, p, backend=be_name, granularity=gran
                        )
            fns["dense"]()
            timing = interleaved(fns, args.repeats, args.device)
            td = timing["dense"]["median"]
            for name, (gran, p, st, be_name) in stats.items():
                be = resolve_attention_backend(be_name, q.device, dtype, num_tokens=nn)
                t = timing[name]["median"]
                ideal = 1 / st.density
                row = {
                    "dtype": dt_name,
                    "tokens": nn,
                    "granularity": gran,
                    "p": p,
                    "backend": be,
                    "dense_s": td,
                    "adaspark_s": t,
                    "speedup": td / t,
                    "density": st.density,
                    "executed_density": st.executed_density,
                    "flops_saved": 1 - st.density,
                    "ideal_speedup": ideal,
                    "achieved_over_ideal": (td / t) / ideal,
                    "noisy": timing[name]["noisy"] or timing["dense"]["noisy"],
                    "dense_times": timing["dense"]["times"],
                    "adaspark_times": timing[name]["times"],
                }
                rows.append(row)
                print(
                    f"{dt_name:8s} N={nn:6d} {name:14s} dense {td:7.3f}s  adaspark {t:7.3f}s  "
                    f"speedup {td / t:5.2f}x  density {st.density:.3f} (exec {st.executed_density:.3f})  "
                    f"ideal {ideal:5.2f}x  achieved/ideal {(td / t) / ideal:4.2f}"
                    + ("  NOISY" if row["noisy"] else ""),
                    flush=True,
                )
            del q, k, v
        # decoding: one new (text) token at a long context, with cached cube mean keys
        for n in args.decode_lengths:
            q, k, v, ids = synthetic(
                n, args.heads, args.kv_heads, args.head_dim, args.focus, args.looks, dtype, args.device
            )
            q1 = q[:, :, -1:]
            index = build_cube_index(ids)
            means = cube_mean_keys(k, index)
            g = args.heads // args.kv_heads
            q1s = q1.reshape(1, args.kv_heads, g, args.head_dim)
            fns = {
                "dense": partial(F.scaled_dot_product_attention, q1, k, v, enable_gqa=True),
                # the same attention with each GQA group's query heads stacked (no K/V repeat)
                "dense_stacked": partial(F.scaled_dot_product_attention, q1s, k, v),
            }
            stats = {}
            for p in args.p:
                st = AttentionStats(args.heads, args.head_dim)
                cube_sparse_attention(q1, k, v, ids, p, mean_keys=means, index=index, stats=st)
                stats[p] = st
                fns[f"p={p}"] = partial(cube_sparse_attention, q1, k, v, ids, p, mean_keys=means, index=index)
            for f in fns.values():
                f()
            timing = interleaved(fns, max(args.repeats, 20), args.device)
            td = timing["dense"]["median"]
            tds = timing["dense_stacked"]["median"]
            for p, st in stats.items():
                t = timing[f"p={p}"]["median"]
                row = {
                    "dtype": dt_name,
                    "context": ids.shape[1],
                    "p": p,
                    "dense_ms": td * 1e3,
                    "dense_stacked_ms": tds * 1e3,
                    "adaspark_ms": t * 1e3,
                    "speedup": td / t,
                    "speedup_vs_stacked": tds / t,
                    "density": st.density,
                    "noisy": timing[f"p={p}"]["noisy"] or timing["dense"]["noisy"],
                }
                dec_rows.append(row)
                print(
                    f"decode {dt_name:8s} ctx={ids.shape[1]:6d} p={p}: dense {td * 1e3:7.2f} ms (stacked "
                    f"{tds * 1e3:7.2f})  adaspark {t * 1e3:7.2f} ms  speedup {td / t:5.2f}x "
                    f"({tds / t:5.2f}x vs stacked)  density {st.density:.3f}"
                    + ("  NOISY" if row["noisy"] else ""),
                    flush=True,
                )
    cols = [
        ("dtype", "dtype", ""),
        ("tokens", "tokens", "d"),
        ("granularity", "granularity", ""),
        ("p", "p", ".2f"),
        ("backend", "backend", ""),
        ("dense_s", "dense s", ".3f"),
        ("adaspark_s", "AdaSpark s", ".3f"),
        ("speedup", "speed-up", ".2f"),
        ("flops_saved", "attn FLOPs saved", ".1%"),
        ("ideal_speedup", "ideal 1/density", ".2f"),
        ("achieved_over_ideal", "achieved/ideal", ".2f"),
        ("noisy", "noisy", ""),
    ]
    table = "## Prefill (attention op)\n\n" + markdown_table(rows, cols)
    if dec_rows:
        dcols = [
            ("dtype", "dtype", ""),
            ("context", "context", "d"),
            ("p", "p", ".2f"),
            ("dense_ms", "SDPA enable_gqa ms", ".2f"),
            ("dense_stacked_ms", "SDPA heads stacked ms", ".2f"),
            ("adaspark_ms", "AdaSpark ms", ".2f"),
            ("speedup", "speed-up vs enable_gqa", ".2f"),
            ("speedup_vs_stacked", "vs stacked", ".2f"),
            ("density", "density", ".3f"),
            ("noisy", "noisy", ""),
        ]
        table += "\n## Decode (one new token, attention op)\n\n" + markdown_table(dec_rows, dcols)
    print()
    print(table)

    def plot(path):
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.dtypes), figsize=(6 * len(args.dtypes), 4.2), squeeze=False)
        for ax, dt_name in zip(axes[0], args.dtypes, strict=True):
            for gran in args.granularity:
                for p in args.p:
                    rs = [
                        r for r in rows if r["dtype"] == dt_name and r["granularity"] == gran and r["p"] == p
                    ]
                    if not rs:
                        continue
                    x = [r["tokens"] for r in rs]
                    (line,) = ax.plot(x, [r["speedup"] for r in rs], marker="o", label=f"{gran} p={p}")
                    ax.plot(x, [r["ideal_speedup"] for r in rs], ls=":", color=line.get_color())
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
            ax.set_ylabel("speed-up over dense SDPA (dotted: ideal 1/density)")
            ax.set_title(f"AdaS-Attn, {dt_name}, {args.heads}q/{args.kv_heads}kv heads, d {args.head_dim}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)

    meta = {
        "title": "AdaS-Attn op vs dense SDPA",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "machine": machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "decode": dec_rows,
    }
    for pth in write_outputs(args.out, args.name, meta, rows, table, plot):
        print(f"wrote {pth}")


if __name__ == "__main__":
    main()
