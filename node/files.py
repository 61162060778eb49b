"""Files that survive a crash and folders that one process owns.

* :func:`atomic_write`: atomic replacement (write, fsync, rename, fsync the directory).
* :class:`DataDirLock`: one node per data dir.
* :func:`prepare_out_dir`, :func:`check_out_file`: an output path is checked before any work, so
  a bad ``--out`` is one clear line, not a traceback at the end of a long run.

Shared by every driver (the daemon's store and checkpoints, the simulator's outputs, genesis and
key files, the command lines), so it sits below all of them and imports nothing of the project.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path
from types import TracebackType


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of its own (not a fixed name): two writers of one path (two processes
    # pretraining the same cached model) must not truncate each other's half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------------------------
# one node per data dir


class DataDirInUse(Exception):
    """Another process holds the lock of this data dir."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        self.data_dir, self.pid = data_dir, pid
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"data dir {data_dir} is in use by another seedswarm node ({who}); "
                         "stop it or use another --data-dir")


class DataDirLock:
    """An exclusive ``flock`` on ``<data dir>/lock``, held for the life of a node.

    Two daemons on one data dir would run with one identity (peers see one peer id flapping
    between two hosts, and its signatures equivocate) and interleave appends to one chain store.
    ``flock`` is what makes this safe to enforce: the kernel releases the lock when the holder's
    descriptor closes, which includes every kind of death (SIGKILL, OOM kill), so there is never
    a stale lock to clean up and no pid-liveness guess (pids are reused). The file holds the
    holder's pid only to name it in the error. The file is never deleted: unlinking a lock file
    lets a waiter lock an orphaned inode while a newcomer locks a fresh one. The descriptor is
    close-on-exec, so processes a node starts do not inherit the lock. (Network file systems may
    not honour ``flock``; keep data dirs on local disks.)
    """

    NAME = "lock"

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / self.NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DataDirInUse` at once (never waits); OSError if the
        lock file cannot be created."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataDirInUse(self.data_dir, pid) from None
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (also done by the kernel when the process ends, however it ends)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no pid left behind to mislead a reader
        os.close(fd)

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# output paths


class OutPathError(ValueError):
    """An output path that cannot be used (the message says why and what to do)."""


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: the only test that also holds for root, read-only
    mounts and ACLs (``os.access`` answers for none of them)."""
    fd, name = tempfile.mkstemp(prefix=".seedswarm-probe-", dir=folder)
    os.close(fd)
    os.unlink(name)


def prepare_out_dir(path: str | os.PathLike[str], *, force: bool = False, option: str = "--out") -> Path:
    """Create the output folder ``path`` (parents too) and prove it writable, before any work.

    An existing non-empty folder is a previous run's (or someone's files): refused unless
    ``force``, so a run never silently overwrites another. Raises :class:`OutPathError`.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutPathError(f"{option} {out} is a file, not a folder: choose another {option}")
    try:
        existed = out.is_dir()
        if existed and not force and any(out.iterdir()):
            raise OutPathError(f"{option} {out} already holds files (a previous run?): "
                               f"use --force to overwrite it, or choose another {option}")
        try:
            # A folder that did not exist is claimed by this mkdir: a second run started at the
            # same moment with the same --out gets FileExistsError instead of sharing it.
            out.mkdir(parents=True, exist_ok=existed or force)
        except FileExistsError:
            raise OutPathError(f"{option} {out} was just created by another run: choose another {option}") from None
        _probe_writable(out)
    except OSError as e:
        raise OutPathError(f"cannot write to {option} {out}: {_why(e)}") from None
    return out


def new_run_dir(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create and return a new empty folder ``path``, or ``path-2``, ``path-3``, ... (the first
    that can be created), proven writable. The ``mkdir`` itself claims the name, so two runs
    started in the same second never share a default output folder. Raises :class:`OutPathError`."""
    base = Path(path)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutPathError(f"cannot create {base.parent} for the output folder (choose one with {option}): "
                           f"{_why(e)}") from None
    n = 1
    while True:
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            out.mkdir()
            _probe_writable(out)
        except FileExistsError:
            n += 1
            continue
        except OSError as e:
            raise OutPathError(f"cannot create the output folder {out} (choose one with {option}): {_why(e)}") from None
        return out


def fresh_dir(path: str | os.PathLike[str]) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... whichever does not exist yet (default output
    folders are named by the time: two runs in one second must not collide)."""
    base = Path(path)
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def check_out_file(path: str | os.PathLike[str], *, force: bool = False, option: str = "--out") -> Path:
    """Check, writing nothing, that the file ``path`` can be written (missing folders above it
    will be created by the writer), before any work. An existing file needs ``force``. Raises
    :class:`OutPathError`."""
    out = Path(path)
    if out.is_dir():
        raise OutPathError(f"{option} {out} is a folder: give a file name")
    if out.exists() and not force:
        raise OutPathError(f"{out} exists (use --force to overwrite)")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutPathError(f"cannot write {option} {out}: {anc} is a file, not a folder")
    try:
        _probe_writable(anc)
    except OSError as e:
        raise OutPathError(f"cannot write {option} {out}: {anc}: {_why(e)}") from None
    return out
