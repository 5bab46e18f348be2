"""Writing files so that a reader (a resumed job, another rank, a user) sees either the old file or
the whole new one, never a part: the one way the project replaces files in place; and the one way
it fingerprints a file's content (SHA-256)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is flushed, renamed over
    ``path`` and the folder flushed. On failure the temporary file is removed and ``path`` untouched.
    Each process writes its own temporary, so processes writing one file at once never mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_plain_name(name: str) -> bool:
    """A name that stays one entry of the folder it is joined to: not empty, no separator, not
    ``.`` or ``..`` (names that come from users or files and become paths)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def escapes(root: Path, relative: str) -> bool:
    """Whether ``root / relative`` (a path a file names) would lead outside ``root``: absolute,
    through ``..``, or through a symbolic link."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        return True
    return not (root / path).resolve().is_relative_to(root.resolve())


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's content, read in blocks (checkpoint manifests, model cards)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
