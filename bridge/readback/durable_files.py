"""The files `consume` and `replay` write: created readable by their owner only, and made durable in order.

A replay's checkpoint (and a group's commit) says which records are handled; after a power loss it must
not be ahead of the data it covers. So a data file is fsynced before the checkpoint is written, the
checkpoint goes to a temporary file that is fsynced before it replaces the old one, and the directory is
fsynced after the rename (and after a data file is created), so the new names survive too.

New files are 0600: they hold callbacks (user messages), and a checkpoint holds the `--to-url`, credentials
included when the URL has them. An existing file keeps the mode its owner gave it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO, BinaryIO

PRIVATE = 0o600


def open_append(path: str | Path) -> BinaryIO:
    """`path` opened to append, created 0600 (and its directory entry made durable) if it is new."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, PRIVATE)
    except FileExistsError:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    else:
        try:
            sync_directory(Path(path).parent)
        except OSError:
            os.close(fd)
            raise
    return os.fdopen(fd, "ab")


def sync(file: IO[bytes]) -> None:
    """Flush `file` and, if it is a regular file, fsync it (a pipe or a terminal cannot be synced)."""
    file.flush()
    fd = file.fileno()
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.fsync(fd)


def replace(path: Path, data: bytes) -> None:
    """Make `data` the content of `path` atomically and durably: a crash leaves the old or the new file."""
    temporary = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE), "wb") as file:
        os.fchmod(file.fileno(), PRIVATE)  # a temporary file left behind by an older version may be 0644
        file.write(data)
        sync(file)
    os.replace(temporary, path)
    sync_directory(path.parent)


def check_writable(path: Path) -> None:
    """Raise `OSError` now if `replace(path, ...)` could not write its temporary file later."""
    temporary = path.with_name(path.name + ".tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE))
    temporary.unlink()


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
