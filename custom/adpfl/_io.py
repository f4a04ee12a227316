"""One atomic JSON writer and reader for every file the bundle writes (ledgers, reports,
datalists, progress, state), and an exclusive file lock for read-modify-write of files that
several processes share (the site's privacy ledgers).

A write goes to a temporary file in the same folder, is flushed and fsynced, then
``os.replace``-d over the target: a crash leaves the old file or the new one, never half
of one.

Locking: :func:`file_lock` takes an exclusive ``fcntl.flock`` on a sidecar file
``<path>.lock`` next to the file (not on the file itself, which ``os.replace`` swaps for a
new inode at every write). ``flock`` is the operating system's advisory lock (Linux,
macOS); it is released by the kernel when the holder exits or crashes, so a dead job never
leaves the file locked. Every process that writes the file must take the lock (all the
bundle's ledger writers do). :func:`json_transaction` is the read-modify-write step under
that lock. The standard library's ``fcntl`` does the locking; only the timeout loop and the
transaction are written here.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["FileLockError", "JsonTransaction", "LOCK_TIMEOUT_S", "file_lock", "json_transaction", "read_json",
           "write_json_atomic"]

#: how long a writer waits for another process's lock before failing (seconds)
LOCK_TIMEOUT_S = 120.0
_LOCK_POLL_S = 0.02


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2, default=None) -> None:
    """Write ``data`` as JSON to ``path`` atomically (creates the folder if needed)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent, default=default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (a reserved ledger entry must survive a power loss
    once the release it pays for may have left). Not every platform can open a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; errors name the file (``ValueError`` for bad JSON, ``OSError`` as raised)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc


# ------------------------------------------------------------------------- locking
class FileLockError(OSError):
    """The lock on a shared file could not be taken (timeout, or no OS lock available)."""


@contextmanager
def file_lock(path: str | os.PathLike, timeout: float | None = None) -> Iterator[str]:
    """Hold an exclusive OS lock for ``path`` (on the sidecar ``<path>.lock``) for the
    ``with`` block; yields the lock file's path.

    Blocks up to ``timeout`` seconds (default :data:`LOCK_TIMEOUT_S`), then raises
    :class:`FileLockError` naming the file (fail closed: the caller must not go on without the lock). Exclusive between
    processes and between threads that enter separately (each entry opens its own file
    description). Not re-entrant: do not nest two locks on the same path in one thread.
    """
    try:
        import fcntl
    except ImportError as exc:  # Windows: no flock; refusing is safer than an unlocked ledger
        raise FileLockError(f"cannot lock {os.fspath(path)}: file locking needs fcntl (Linux or macOS)") from exc
    timeout = LOCK_TIMEOUT_S if timeout is None else float(timeout)
    path = os.fspath(path)
    lock_path = path + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FileLockError(f"cannot open the lock file {lock_path} for {path}: {exc}") from exc
    try:
        deadline = time.monotonic() + float(timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FileLockError(
                        f"could not lock {path} within {timeout:g} s: another process holds {lock_path}"
                    ) from None
                time.sleep(_LOCK_POLL_S)
            except OSError as exc:
                raise FileLockError(f"cannot lock {path} (lock file {lock_path}): {exc}") from exc
        try:
            yield lock_path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class JsonTransaction:
    """What :func:`json_transaction` yields: ``data`` as read from disk under the lock
    (``None`` when the file does not exist); :meth:`write` sets what is saved at the end."""

    def __init__(self, path: str, data: Any):
        self.path = path
        self.data = data
        self._pending: Any = None
        self._write = False

    def write(self, data: Any) -> None:
        self._pending, self._write = data, True


@contextmanager
def json_transaction(path: str | os.PathLike, timeout: float | None = None) -> Iterator[JsonTransaction]:
    """Lock ``path``, re-read it from disk, let the caller check and modify, write it
    atomically, unlock.

    The caller reads ``tx.data`` and calls ``tx.write(new_data)``; the new data is written
    (atomically, still under the lock) only when the ``with`` block ends without an
    exception. On an exception nothing is written and the exception propagates. Errors of
    the lock, the read (bad JSON names the file) or the write propagate: callers fail
    closed on them.
    """
    path = os.fspath(path)
    with file_lock(path, timeout=timeout):
        tx = JsonTransaction(path, read_json(path) if os.path.exists(path) else None)
        yield tx
        if tx._write:
            write_json_atomic(path, tx._pending)
