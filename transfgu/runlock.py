"""One run per run directory: ``<run>/_lock.json`` is locked (``flock``) while a run uses the directory.

Two runs of the same ``run.name`` started together would otherwise interleave their files: one prints its own
mIoU while the directory holds the other's config, model and metrics. The lock is taken after preflight and before
the first write (the run's config, the random backbone, Ray), by both executors; a second run is refused with the
holder's host and pid and exit code 2, having written nothing.

* The lock is the kernel's (``fcntl.flock`` on the open file): it goes with the holder's process, so the lock of
  a run that was killed (SIGKILL, a lost node) is free again and the next run takes it over, noting in the log
  whose it was. Linux maps ``flock`` to POSIX locks on NFS, so runs on two hosts of a shared run root exclude each
  other too. Where the file system has no locks at all (``ENOLCK``), the holder's host and pid in the file decide:
  a live process on this host keeps the directory, anything else is taken over.
* The file is kept after the run (deleting it would let a third run lock a fresh inode while a second still waits
  on the old one); it names the last holder and, once released, when.
* Re-entrant in one thread: the Ray executor holds the lock around Ray's start and calls the shared orchestration,
  which takes it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from transfgu.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"

_held: dict[str, tuple[int, int, IO[str] | None]] = {}  # resolved run dir -> (thread, depth, open lock file)
_guard = threading.Lock()


class RunDirLocked(ConfigError):
    """Another run uses this run directory."""


def _holder_text(info: dict[str, Any]) -> str:
    since = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {when}"


def _read(fh: IO[str]) -> dict[str, Any]:
    fh.seek(0)
    try:
        info = json.loads(fh.read() or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _write(fh: IO[str], info: dict[str, Any]) -> None:
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(info) + "\n")
    fh.flush()


def _alive_here(info: dict[str, Any]) -> bool:
    """True when ``info`` names a live process on this host (the no-``flock`` fallback's test)."""
    pid = info.get("pid")
    if info.get("released") or info.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _refusal(run_dir: Path, info: dict[str, Any]) -> RunDirLocked:
    return RunDirLocked(f"run directory {run_dir} is in use by another run ({_holder_text(info)}); wait for it to "
                        "finish, or give this run another run.name")


def _acquire(run_dir: Path) -> IO[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fh = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666), "r+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = _read(fh)
        fh.close()
        raise _refusal(run_dir, info) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            fh.close()
            raise
        info = _read(fh)
        if _alive_here(info):
            fh.close()
            raise _refusal(run_dir, info) from None
        log.warning("run lock: %s has no file locks; deciding by the recorded holder's pid", run_dir)
    previous = _read(fh)
    if previous.get("pid") is not None and not previous.get("released"):
        log.warning("run lock: taking over the lock of a run that ended without releasing it (%s)",
                    _holder_text(previous))
    _write(fh, {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
    return fh


def _release(fh: IO[str]) -> None:
    try:
        info = _read(fh)
        _write(fh, {**info, "released": time.time()})
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)  # closing releases it too; explicit for the NFS mapping
        fh.close()


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``<run_dir>/_lock.json`` for the block (creating the directory); :class:`RunDirLocked` when another
    run (another process, or another thread of this one) holds it."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    me = threading.get_ident()
    with _guard:
        held = _held.get(key)
        if held is not None and held[0] != me:
            raise RunDirLocked(f"run directory {run_dir} is in use by another run of this process (host "
                               f"{socket.gethostname()}, pid {os.getpid()})")
        if held is not None:
            _held[key] = (me, held[1] + 1, held[2])
        else:
            _held[key] = (me, 1, None)  # reserved while the file lock is taken
    if held is None:
        try:
            fh = _acquire(run_dir)
        except BaseException:
            with _guard:
                _held.pop(key, None)
            raise
        with _guard:
            _held[key] = (me, 1, fh)
    try:
        yield
    finally:
        with _guard:
            thread, depth, fh_held = _held[key]
            if depth > 1:
                _held[key] = (thread, depth - 1, fh_held)
                fh_held = None
            else:
                del _held[key]
        if fh_held is not None:
            _release(fh_held)
