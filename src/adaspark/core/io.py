"""Atomic file writes: a result file is either the complete new version or the old one, never half.

Every helper writes to a temporary file in the target's own directory (so the final rename never
crosses a filesystem), flushes it to disk with ``fsync``, and moves it onto the target with
:func:`os.replace`, which is atomic on POSIX and Windows. If anything fails before the rename —
serialisation, a full disk, ``KeyboardInterrupt`` — the temporary file is removed and the old file
(if any) is left exactly as it was.

* :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json` for content you
  hold in memory;
* :func:`atomic_path` for writers that insist on a path of their own (``matplotlib``'s ``savefig``,
  ``safetensors``' ``save_file``, ``numpy.save``, ``torch.save``): it yields a temporary path with
  the target's suffix (so format-from-extension writers pick the right format) and renames it onto
  the target when the ``with`` block ends without an exception.

Conventions: a target that is a symbolic link is resolved first, so the file it points to is
replaced and the link survives. A new file gets the usual permissions (``0o666`` minus the umask);
a replaced file keeps its old permission bits. Every failure to write is an :class:`OSError`, whose
message reads well after a prefix: ``f"cannot write {path!r}: {err}"`` is a good one-line report.

Example::

    from adaspark.core.io import atomic_path, atomic_write_json

    atomic_write_json("result.json", {"p": 0.5, "flops_saved": 0.195})
    with atomic_path("plot.png") as tmp:  # any writer that takes a path
        fig.savefig(tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]

PathLike = str | os.PathLike


def _resolve_target(path: PathLike) -> Path:
    """The real path to replace; a clear error when its directory is missing or it is a directory."""
    target = Path(os.path.realpath(Path(path).expanduser()))
    if target.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"directory {str(target.parent)!r} does not exist")
    return target


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ≥ 4.7)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    # Elsewhere the only portable way is set-and-restore (briefly visible to other threads).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    """Permission bits for the new file: those of the file it replaces, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX only; some filesystems refuse, which is harmless)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit, move it onto ``path`` atomically.

    The temporary file already exists (empty) when yielded, in the same directory as ``path``, with a
    hidden name ending in ``path``'s suffix (``.result.json.k3x9a.tmp.json``). Write it with any
    writer; when the ``with`` block exits normally it is fsynced and renamed onto ``path``. When the
    block raises (anything, ``KeyboardInterrupt`` included), the temporary file is deleted, ``path``
    is untouched and the exception propagates.

    Args:
        path: the file to create or replace. Its directory must exist.
        fsync: flush the file and the directory entry to disk (default). ``False`` keeps the
            atomicity against crashes of the process but not against power loss.

    Raises:
        FileNotFoundError: the directory of ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        OSError: creating, syncing or renaming the file failed (as reported by the OS).

    Example::

        with atomic_path("plot.png") as tmp:
            fig.savefig(tmp)
    """
    target = _resolve_target(path)
    mode = _mode_for(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    tmp = Path(name)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        _fsync_dir(target.parent)


def atomic_write_bytes(path: PathLike, data: bytes | bytearray | memoryview, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; return the path written (symlinks resolved).

    Example::

        atomic_write_bytes("cubes.bin", tensor.numpy().tobytes())
    """
    target = _resolve_target(path)
    with atomic_path(target, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return target


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding``; return the path written.

    The text is written as is: no newline translation on any platform. An encoding error is raised
    before anything touches the disk.
    """
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_write_json(
    path: PathLike,
    data: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    allow_nan: bool = True,
    default: Any = None,
    fsync: bool = True,
) -> Path:
    """Write ``data`` as JSON (UTF-8, trailing newline) to ``path`` atomically; return the path written.

    The document is serialised in memory first, so data that cannot be serialised raises
    ``TypeError`` (or ``ValueError`` for NaN/inf with ``allow_nan=False``) before any file is
    created. ``indent``, ``sort_keys``, ``allow_nan`` and ``default`` are those of :func:`json.dumps`;
    ``allow_nan=True`` (the default, as in :mod:`json`) writes ``NaN``/``Infinity``, which Python
    reads back but strict JSON parsers reject.

    Example::

        atomic_write_json("result.json", {"flops_saved": 0.195, "p": 0.5})
    """
    text = json.dumps(
        data, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default, ensure_ascii=False
    )
    return atomic_write_text(path, text + "\n", fsync=fsync)
