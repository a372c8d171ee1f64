"""Command line: ``adaspark ask`` (alias ``demo``), ``adaspark eval``, ``adaspark analyze``,
``adaspark show`` (also ``python -m adaspark ...``).

This module only parses and dispatches; each command lives in :mod:`adaspark.commands`
(``add_parser`` registers it, ``run`` executes it).

Exit codes: 0 success, 2 bad input (unreadable video, invalid setting, missing optional
dependency), with a one-line message on stderr instead of a traceback. :func:`main` is the one
error boundary of every command: an exception of :data:`adaspark.commands.errors.BAD_INPUT` that a
command lets through becomes ``adaspark: error: ...`` and exit code 2; anything else is a bug and
keeps its traceback (files a command wrote before it stay on disk).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from adaspark import __version__

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaspark",
        description=(
            "AdaSpark: adaptive sparsity for efficient long-video understanding with Video-LLMs "
            "(adaspark.patch supports Qwen2.5-VL, Qwen2-VL, Qwen3-VL and LLaVA-OneVision; the commands "
            "run the shipped Qwen2.5-VL needle model or a --model checkpoint)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"adaspark {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # the main job: answer a question dense and with AdaSpark (`demo` = `ask` on a generated sample)
    from adaspark.commands import ask as ask_command
    from adaspark.commands import eval as eval_command

    ask_command.add_parser(commands)
    eval_command.add_parser(commands)
    # the paper's preliminary analysis and pictures of the selection (adaspark.commands)
    from adaspark.commands import analyze as analyze_command
    from adaspark.commands import show as show_command

    analyze_command.add_parser(commands)
    show_command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad input)."""
    from adaspark.commands.errors import BAD_INPUT, fail

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse reports usage errors (code 2) and --help (code 0) this way
        return int(e.code or 0)
    try:
        return args.handler(args)
    except BAD_INPUT as e:
        return fail(e)
