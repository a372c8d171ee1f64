"""Quick side-by-side timing of the AdaSpark ops against their dense counterparts (not a test).

Dense and sparse runs are interleaved and the median of ``--repeats`` runs is printed, with the
kept density, the ideal speed-up (1 / density) and the ratio achieved / ideal. Inputs are random
(a synthetic video of ``T × 16 × 32`` tokens with a little text around it), so the cube
distributions are flat: this measures the kernels, not a trained model's sparsity.

    python benchmarks/ops_quick.py --n 8192 --dtype bfloat16 --p 0.5 0.9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from adaspark.core.layout import grid_cube_ids
from adaspark.ops import AttentionStats, FFNStats, cube_sparse_attention, cube_sparse_ffn


def video_cube_ids(n: int, cube=(4, 4, 4)) -> torch.Tensor:
    """``[1, n]`` cube ids: text, then a ``T × 16 × 32``-token video filling most of the sequence."""
    ids = torch.full((1, n), -1, dtype=torch.long)
    t = (n - 64) // (16 * 32)
    ids[0, 32 : 32 + t * 512] = grid_cube_ids(t, 16, 32, cube)
    return ids


class SwiGLU(torch.nn.Module):
    def __init__(self, d: int, i: int) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(d, i, bias=False)
        self.up = torch.nn.Linear(d, i, bias=False)
        self.down = torch.nn.Linear(i, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="sequence length")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--p", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    torch.manual_seed(0)
    n, hq, hkv, d = args.n, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(1, hq, n, d).to(dt)
    k = torch.randn(1, hkv, n, d).to(dt)
    v = torch.randn(1, hkv, n, d).to(dt)
    x = (torch.randn(1, n, args.hidden) * torch.rand(1, n, 1) * 2).to(dt)
    f = SwiGLU(args.hidden, args.ffn).to(dt)
    ids = video_cube_ids(n)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={n}, {args.dtype}")
    cols = ["op", "p", "dense s", "AdaSpark s", "speed-up", "density (ideal / executed)", "ideal speed-up"]
    print("| " + " | ".join([*cols, "achieved / ideal"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        F.scaled_dot_product_attention(
            q[:, :, :256], k[:, :, :256], v[:, :, :256], is_causal=True, enable_gqa=True
        )
        f(x[:, :256])
        for p in args.p:
            td, ts, st = [], [], None
            for _ in range(args.repeats):
                td.append(
                    timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
                )
                st = AttentionStats(hq, d)
                ts.append(timed(lambda st=st, p=p: cube_sparse_attention(q, k, v, ids, p, stats=st)))
            a, b = statistics.median(td), statistics.median(ts)
            ideal = 1 / st.density
            print(
                f"| attention | {p} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {st.density:.3f} / "
                f"{st.executed_density:.3f} | {ideal:.2f}x | {a / b / ideal:.2f} |"
            )
            td, ts, fs = [], [], None
            for _ in range(args.repeats):
                td.append(timed(lambda: f(x)))
                fs = FFNStats()
                ts.append(timed(lambda fs=fs, p=p: cube_sparse_ffn(x, f, ids, p, stats=fs)))
            a, b = statistics.median(td), statistics.median(ts)
            dens = fs.ffn_rows / fs.tokens
            print(
                f"| FFN | {p} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {dens:.3f} rows "
                f"(video active {fs.active_fraction:.3f}) | {1 / dens:.2f}x | {a / b * dens:.2f} |"
            )


if __name__ == "__main__":
    main()
