"""Bad input on the command line: one exception type, one message format, one boundary.

Every command raises (or lets through) the exceptions of :data:`BAD_INPUT` for input it cannot use;
:func:`adaspark.cli.main` is the one boundary that turns them into a single line on stderr,
``adaspark: error: ...``, and exit code 2 (:func:`fail`). Commands that add context to a message
(``cannot load the model: ...``) call :func:`fail` themselves. Anything else is a bug and keeps
its traceback; what a command has written before it (JSON lines, atomic files) stays on disk.
"""

from __future__ import annotations

import sys

__all__ = ["BAD_INPUT", "UsageError", "fail"]


class UsageError(ValueError):
    """Bad command-line input found after parsing (exit code 2)."""


#: exceptions that mean the input (arguments, files, installed extras) is unusable, not a bug:
#: ValueError (AdaSparkConfig, UsageError, VideoDecodeError, a layout that does not fit),
#: OSError (missing / unreadable / unwritable files), ImportError (an optional dependency)
BAD_INPUT: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


def fail(message: object) -> int:
    """Print ``adaspark: error: message`` as one line on stderr; returns exit code 2."""
    print(f"adaspark: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
