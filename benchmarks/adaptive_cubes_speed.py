"""Time of the content-adaptive cube partition (``adaptive_grid_cube_ids``) on SmolVL-shaped video grids
(4 × 4 LM tokens per temporal slice, features of width 576), one thread (not a test).

    python benchmarks/adaptive_cubes_speed.py --slices 64 256 512
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from adaspark.core.layout import adaptive_grid_cube_ids

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[64, 256, 512], help="temporal slices T")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "adaptive_cubes_speed.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["| video tokens | cubes | partition ms (median) |", "|---:|---:|---:|"]
    for t in args.slices:
        feats = torch.randn(t * 16, args.dim, generator=torch.Generator().manual_seed(t))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ids = adaptive_grid_cube_ids(feats, (t, 4, 4), (4, 4, 4))
            times.append(time.perf_counter() - t0)
        lines.append(f"| {t * 16} | {int(ids.max()) + 1} | {1000 * statistics.median(times):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.write_text(
        f"# Adaptive cube partition, time\n\nCommand: `python benchmarks/adaptive_cubes_speed.py "
        f"--slices {' '.join(map(str, args.slices))}`, one thread, random features.\n\n{text}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
