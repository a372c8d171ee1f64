"""Atomic writes (adaspark.core.io): the target is the whole new file or the untouched old one."""

from __future__ import annotations

import json
import os
import stat

import pytest

from adaspark.core import io as aio
from adaspark.core.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_api():
    assert aio.__all__ == ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def test_write_text_bytes_json_roundtrip(tmp_path):
    t = atomic_write_text(tmp_path / "a.txt", "héllo\r\nworld")
    assert t == tmp_path / "a.txt"
    assert (tmp_path / "a.txt").read_bytes() == "héllo\r\nworld".encode()  # no newline translation
    atomic_write_bytes(tmp_path / "b.bin", bytes(range(256)))
    assert (tmp_path / "b.bin").read_bytes() == bytes(range(256))
    data = {"p": 0.5, "layers": [1, 2, 3], "name": "×"}
    atomic_write_json(str(tmp_path / "c.json"), data)
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert json.loads(text) == data
    assert _listing(tmp_path) == ["a.txt", "b.bin", "c.json"]


def test_replaces_existing_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    atomic_write_json(target, [1])
    assert json.loads(target.read_text()) == [1]
    assert _listing(tmp_path) == ["r.json"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_old_file(tmp_path, exc):
    target = tmp_path / "result.json"
    target.write_text("old contents")
    with pytest.raises(type(exc)), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists()
        with open(tmp, "w") as f:
            f.write("half of the new")
            f.flush()
            raise exc
    assert target.read_text() == "old contents"
    assert _listing(tmp_path) == ["result.json"]


def test_fsync_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["x.bin"]


def test_replace_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.txt"
    target.write_text("old")

    def broken_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(aio.os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["x.txt"]


def test_unserialisable_json_touches_nothing(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")}, allow_nan=False)
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["r.json"]


def test_atomic_path_keeps_suffix_for_format_sniffing_writers(tmp_path):
    seen = []
    with atomic_path(tmp_path / "plot.png") as tmp:
        seen.append(tmp)
        assert tmp.suffix == ".png" and tmp.name.startswith(".plot.png.")
        tmp.write_bytes(b"\x89PNG")
    assert not seen[0].exists()
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
    assert _listing(tmp_path) == ["plot.png"]


def test_clear_errors_for_bad_targets(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_text(tmp_path / "missing" / "r.txt", "x")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write_text(tmp_path / "d", "x")
    assert _listing(tmp_path) == ["d"]
    assert _listing(tmp_path / "d") == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and symlinks")
def test_permissions_and_symlinks(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    new = atomic_write_text(tmp_path / "new.txt", "x")
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    old = tmp_path / "old.txt"
    old.write_text("x")
    old.chmod(0o640)
    atomic_write_text(old, "y")
    assert stat.S_IMODE(old.stat().st_mode) == 0o640
    link = tmp_path / "link.txt"
    link.symlink_to(old)
    atomic_write_text(link, "through the link")
    assert link.is_symlink()
    assert old.read_text() == "through the link"


def test_umask_reader_matches_os(tmp_path):
    mask = os.umask(0o027)
    try:
        assert aio._umask() == 0o027
    finally:
        os.umask(mask)
