"""Files replaced whole: written under an unpredictable temporary name in the
same directory, then renamed into place, so a reader never sees half a file
and nobody who can write to the directory can redirect the write.

A predictable temporary name (``path.PID.new``) opened with ``O_CREAT`` lets
anyone plant a symlink there and have the server truncate the link's target;
``tempfile.mkstemp`` creates the file exclusively (``O_EXCL``), which fails
on a link instead of following it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def replace_file(path: str, data: bytes, *, durable: bool = False, mode: int = 0o644) -> None:
    """Make ``path`` hold ``data`` with permissions ``mode``, atomically. With
    ``durable``, the data and the rename are on disk when this returns (the
    file and its directory are synced). OSError as the system raised it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if durable:
        sync_directory(directory)


def sync_directory(directory: str) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
