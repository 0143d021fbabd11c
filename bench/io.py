"""File I/O that every stage shares: atomic writes, one advisory lock, safe names, hashes, and OS
errors in words. One helper per job; nothing else in the tree opens a temp file and renames it.

    atomic_write(path, fn)        fn(tmp_path) writes the content; fsync, then rename onto `path`
    atomic_write_text(path, s)    text file (config, plan, row)
    atomic_torch_save(obj, path)  torch.save (checkpoints, samples)
    atomic_savez(path, **arrays)  numpy .npz (reference statistics, ADM sample batches)
    file_lock(path, wait=...)     exclusive flock; released when the holder exits or dies
    slug(s)                       a string as a file-name component
    sha256_file(path)             hex digest, streamed
    read_state(path, load, what)  stored state, or None (missing; unreadable: moved aside, redone)
    move_aside(path)              keep an unreadable file for a post-mortem under another name
    gzip_file(path)               replace a file by its deterministic `<name>.gz` (a record that is done)
    read_text(path)               a text file, or its `<name>.gz` where gzip_file compressed it
    stored(path)                  the path as stored: itself, else its `<name>.gz`, else None

A reader never sees half a file: the content goes to a temp file in the same folder and is
renamed onto the target (POSIX rename is atomic). A failed write removes its temp file and raises
an OSError that names the target and the cause (a full disk included: torch's zip writer reports
ENOSPC as "unexpected pos", which is turned back into ENOSPC here).
"""
from __future__ import annotations


import errno
import gzip
import hashlib
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

# a write that fails with this little room left is reported as a full disk whatever the library said
_LOW_SPACE_BYTES = 1 << 20


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < _LOW_SPACE_BYTES
    except OSError:
        return False


def os_error_message(e: OSError, path=None) -> str:
    """One line naming the path and what to do: full disk, no permission, read-only, missing folder."""
    where = path or e.filename or "?"
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {where}; free space there or point paths.results / " \
               "paths.artifacts (BENCH_ARTIFACTS) at a larger disk"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied writing {where}; make it writable or point paths.results / paths.artifacts elsewhere"
    if code == errno.EROFS:
        return f"{where} is on a read-only file system; point paths.results / paths.artifacts at a writable folder"
    if code == errno.ENOENT:
        return f"{where} does not exist: {e.strerror}"
    return f"{where}: {e.strerror or e}"


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temp file next to it, which is fsynced and
    renamed onto `path`. On failure the temp file is removed and an OSError naming `path` is raised
    (ENOSPC when the disk is full, whatever the writer's own error was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        if isinstance(e, Exception) and _disk_full(path.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)


def atomic_torch_save(obj, path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_savez(path, **arrays) -> Path:
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(path, write)


class LockHeld(Exception):
    """file_lock(wait=False) found the lock taken; the message names the holder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


@contextmanager
def file_lock(path, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator["HeldLock"]:
    """Hold an exclusive advisory lock (flock) on `path` for the block. The kernel releases it when
    the holder exits or is killed, so a lock never outlives its process. The file records the
    holder (host, pid) for the message of whoever waits. `wait=False` raises LockHeld instead of
    waiting; `on_wait(holder)` is called once before waiting. Yields a HeldLock, whose `released()`
    lets go of the lock for a block and takes it back after (waiting for it)."""
    import fcntl
    import socket

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise LockHeld(f"{path} is held by {holder}") from None
            if on_wait:
                on_wait(holder)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            try:  # who holds it, for the message of whoever waits (best effort: a full disk must not stop a run here)
                f.seek(0)
                f.truncate()
                f.write(f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                f.flush()
            except OSError:
                pass
            yield HeldLock(f)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class HeldLock:
    """The lock file_lock holds: `with held.released():` runs a block without it (others may take it)
    and waits to hold it again after."""

    def __init__(self, f):
        self._f = f

    @contextmanager
    def released(self):
        import fcntl

        fcntl.flock(self._f, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._f, fcntl.LOCK_EX)


def slug(s) -> str:
    """`s` as one file-name component: letters, digits and -_. kept, anything else becomes '-'."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(s))


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def move_aside(path, why: str = "corrupt") -> Path:
    """Rename a file that cannot be read to `<name>.<why>-<time>` next to it (kept for a post-mortem,
    never read again as state); returns the new path."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, dest)
    return dest


def read_state(path, load: Callable[[Path], T], what: str, on_moved: Callable[[Path, Path], None] | None = None
               ) -> T | None:
    """Stored state a stage skips on: `load(path)` if the file exists and reads; None if it does not
    exist. A file that cannot be read (cut short by a kill or a full disk, corrupted, or failing
    `load`'s own checks) is moved aside with a warning and None is returned, so the stage is redone;
    it is never trusted and never blocks a rerun. OS errors (permissions, I/O) are raised."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 (any reader's failure means the same: not usable state)
        dest = move_aside(path)
        cause = str(e).splitlines()[0][:160] if str(e) else ""
        print(f"[bench] warning: {what} {path} cannot be read ({type(e).__name__}{': ' + cause if cause else ''}); "
              f"moved aside to {dest.name} and redone", file=sys.stderr, flush=True)
        if on_moved:
            on_moved(path, dest)
        return None


def gzip_file(path) -> Path:
    """Replace `path` by `<path>.gz` (atomic; mtime 0 and no name in the header, so the same file always
    gives the same bytes and a re-run changes nothing in git). Returns the new path."""
    path = Path(path)
    data = path.read_bytes()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(data)

    out = atomic_write(path.with_name(path.name + ".gz"), write)
    path.unlink()
    return out


def stored(path) -> Path | None:
    """`path` where it exists, else its gzip_file'd `<name>.gz`, else None."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".gz")):
        if p.is_file():
            return p
    return None


def read_text(path) -> str:
    """The text of `path`, or of its `<name>.gz` (a `.gz` path is decompressed too). FileNotFoundError
    names `path` when neither exists."""
    p = stored(path)
    if p is None:
        raise FileNotFoundError(errno.ENOENT, "no such file (nor a .gz of it)", str(path))
    return gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
