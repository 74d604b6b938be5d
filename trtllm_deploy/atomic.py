"""Files that appear whole or not at all: written beside their destination, flushed to disk, then
renamed over it, so a crash or a concurrent reader sees the old file or the new one, never half.

A written file gets the permissions a plain ``open(path, "w")`` would give it (``0o666`` less the
umask) unless ``mode`` says otherwise; a copy keeps its source's, as ``shutil.copy2`` does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data``, creating its folder if needed."""
    with replacing(path) as temporary:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            if mode is not None:
                os.fchmod(handle.fileno(), mode)


def write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` (UTF-8), creating its folder if needed."""
    write_bytes(path, text.encode(), mode=mode)


def copy(source: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy a file, or a folder with everything under it (symlinks as symlinks), over ``dest``."""
    source = Path(source)
    with replacing(dest) as temporary:
        if source.is_dir():
            shutil.copytree(source, temporary, symlinks=True)
            for folder, _, files in os.walk(temporary):
                for name in files:
                    _fsync(Path(folder) / name)
            # os.replace puts a folder only over an empty folder: what is there goes first.
            there = Path(dest)
            if there.is_dir() and not there.is_symlink():
                shutil.rmtree(there)
            elif there.exists() or there.is_symlink():
                there.unlink()
        else:
            shutil.copy2(source, temporary)


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path``: what the block puts there (a file, a folder, a
    symlink) replaces ``path`` when the block ends, a file flushed to disk first; if the block
    raises, it is removed and ``path`` stays."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Unique per call: two writers of one file never share a temporary.
    temporary = dest.with_name(f".{dest.name}.part-{secrets.token_hex(4)}")
    try:
        yield temporary
        if temporary.is_file() and not temporary.is_symlink():
            _fsync(temporary)
        os.replace(temporary, dest)
        _fsync_folder(dest.parent)
    finally:
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists() or temporary.is_symlink():
            temporary.unlink()


def _fsync(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except PermissionError:  # a file its mode keeps us from reading: it is written all the same
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_folder(folder: Path) -> None:
    # The rename itself is durable only once the folder's entry is on disk.
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems do not sync folders; the rename has still happened
        pass
    finally:
        os.close(descriptor)
