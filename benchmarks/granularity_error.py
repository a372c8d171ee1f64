"""How far AdaS-Attn moves the attention output from dense, per granularity and p (not a test).

On the synthetic cube-structured inputs of ``attention_speed.py`` (one GQA group of a Qwen2.5-VL-7B
layer), prints the kept density and the mean relative error ``||out - dense|| / ||dense||`` of
video and text queries, for ``granularity="token"`` and ``"cube"``: the accuracy side of the
granularity choice (the time side is in ``attention_speed.py``).

    python benchmarks/granularity_error.py --n 8192
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from adaspark.ops import AttentionStats, cube_sparse_attention

from attention_speed import synthetic


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--p", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--focus", type=float, default=0.5)
    args = ap.parse_args(argv)
    q, k, v, ids = synthetic(args.n, 7, 1, 128, args.focus, 3, torch.float32, "cpu")
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    vid = ids[0] >= 0
    print("| granularity | p | density | rel. error, video queries | rel. error, text queries |")
    print("|---|---|---|---|---|")
    for gran in ("token", "cube"):
        for p in args.p:
            st = AttentionStats(q.shape[1], q.shape[-1])
            out = cube_sparse_attention(q, k, v, ids, p, backend="gather", granularity=gran, stats=st)
            err = ((out - dense).norm(dim=-1) / dense.norm(dim=-1))[0]
            print(
                f"| {gran} | {p} | {st.density:.3f} | {err[:, vid].mean():.3f} | {err[:, ~vid].mean():.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
