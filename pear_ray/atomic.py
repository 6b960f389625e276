"""Writing files and folders so that a reader never sees half of one: everything is written under a temporary name
beside its target (`<name>.partial`, same folder, so the move is a rename on one filesystem), flushed to disk, and
moved into place only when complete. A process killed or a disk filled mid-write leaves the old version (or none)
plus a `.partial` that the next write replaces."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_name(path: Path) -> Path:
    """Where `path` is written before it is complete."""
    return path.with_name(path.name + ".partial")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """Flush a file, or every file and folder under a folder, to disk (so a rename that follows cannot reach the
    disk before the data it names)."""
    if path.is_dir():
        for parent, _, files in os.walk(path):
            for name in files:
                _fsync(Path(parent) / name)
            _fsync(Path(parent))
    else:
        _fsync(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def move_into_place(partial: Path, path: Path) -> None:
    """Flush a finished file or folder and rename it to `path`, replacing what was there. A folder cannot replace
    a folder in one rename: the old one goes first, so a crash in between leaves no folder rather than half of
    one."""
    sync_tree(partial)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(partial, path)
    _fsync(path.parent)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write `path`'s new content to (a file or a folder, which the caller creates);
    on success it moves into place, on an error it is removed and the old `path` stays untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_name(path)
    _remove(partial)  # left by a writer that was killed
    try:
        yield partial
        move_into_place(partial, path)
    except BaseException:
        _remove(partial)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with replacing(path) as partial:
        partial.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
