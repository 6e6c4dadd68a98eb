"""Exclusive locks for what one process writes for a long time: a run directory, the shards of a feature store.

flock(2) on a lock file, which the holder removes when it is done. The kernel drops the lock when its holder
exits, however it exits, so a killed writer leaves no stale lock behind (only the file, naming its pid, which
the next writer takes over).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from show_attend_tell.errors import InputError


def _lock(path: Path, flags: int) -> IO:
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (the caller keeps it open: the lock lives as long as the file)
        try:
            fcntl.flock(handle, flags)
        except BlockingIOError:
            handle.close()
            raise
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()  # its holder removed it between our open and our lock: lock the file there now


def hold(path: str | Path, what: str, advice: str) -> IO:
    """Lock `path` (created if missing) until `release`. When another process holds it: InputError "{what} is
    being written by another process (pid N); {advice}"."""
    path = Path(path)
    try:
        handle = _lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = path.read_text().strip()
        except OSError:
            holder = ""
        raise InputError(
            f"{what} is being written by another process (pid {holder or 'unknown':.20}); {advice}"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def release(handle: IO) -> None:
    """Remove the lock file, then let go of the lock."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(handle.name)
    handle.close()


@contextlib.contextmanager
def waiting_for(path: str | Path) -> Iterator[None]:
    """A short critical section: wait for the lock on `path`, hold it inside the block."""
    handle = _lock(Path(path), fcntl.LOCK_EX)
    try:
        yield
    finally:
        release(handle)
