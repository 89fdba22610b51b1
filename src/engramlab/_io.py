"""Atomic writes, output locks, text reading and the cache directory.

Edited models, deltas and caches must never be left half-written: a crash, a full disk or
Ctrl-C leaves either the old content or the new one. Everything is written into a temporary
sibling and moved into place with ``os.replace`` (atomic on POSIX within one file system); what
lands gets the permissions any new file would (the temporary ones are private while written).
Two runs writing the same output at once are told apart by a lock file beside it; two processes
that need the same cache entry take turns building it (:func:`build_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from .errors import CacheError, InputError, OutputError

log = logging.getLogger(__name__)
T = TypeVar("T")


def cache_root() -> Path:
    """Where engramlab caches: ``$ENGRAMLAB_CACHE`` or ``~/.cache/engramlab`` (not created)."""
    return Path(os.environ.get("ENGRAMLAB_CACHE") or Path.home() / ".cache" / "engramlab")


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root, created and checked writable."""
    path = cache_root().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError("not writable")
    except OSError as exc:
        raise CacheError(f"the cache folder {path} cannot be used ({exc.strerror or exc}); set "
                         "ENGRAMLAB_CACHE to a writable folder") from None
    return path


def keyed_path(kind: str, name: str, key: Any, suffix: str) -> Path:
    """Where the cache keeps the ``kind`` entry made under ``key`` (anything JSON can write):
    ``<cache>/<kind>/<name>-<digest of key><suffix>``. A changed key is another file, so a
    stale entry is never read for a new one."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    return cache_dir(kind) / f"{name}-{digest.hexdigest()[:16]}{suffix}"


def read_cached(path: Path, load: Callable[[Path], T]) -> T | None:
    """``load(path)``, or None when the entry is absent; an entry that ``load`` rejects
    (:class:`CacheError`: corrupt, or made under another key) is deleted with a warning, so
    the caller rebuilds it."""
    if not path.is_file():
        return None
    try:
        return load(path)
    except CacheError as exc:
        log.warning("%s; rebuilding it", exc)
        path.unlink(missing_ok=True)
        return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path) -> None:
    """Give a finished temporary file or folder (tree) the permissions of a new one."""
    mask = _umask()
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def check_writable(target: str | os.PathLike[str], what: str = "--out") -> Path:
    """Refuse an output path whose folder cannot be created or written, before any work."""
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{what} {target}: its folder {parent} cannot be created "
                          f"({exc.strerror or exc}); choose a writable location") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {target}: the folder {parent} is not writable; choose a "
                          "writable location")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"{what} {target} exists and is not writable; choose another path")
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str], what: str = "--out") -> Iterator[Path]:
    """Hold ``.<name>.lock`` beside ``target`` while writing it; a second writer is refused.

    A lock left by a process that no longer runs (killed with SIGKILL) is taken over.
    """
    target = check_writable(target, what)
    lock = target.with_name(f".{target.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                raise OutputError(f"{what} {target} is being written by another run (process "
                                  f"{pid}); wait for it to finish or choose another path"
                                  ) from None
            lock.unlink(missing_ok=True)  # stale: its writer is gone
    else:
        raise OutputError(f"{what} {target}: could not take the lock {lock}; remove it if no "
                          "other run is writing there")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield target
    finally:
        lock.unlink(missing_ok=True)


def read_text(path: str | os.PathLike[str], what: str = "file") -> str:
    """A UTF-8 text file, or an error that names the file and the fix."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {exc.start}: "
                         f"{exc.reason}); save it as UTF-8") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder; give a file") from None


@contextlib.contextmanager
def build_lock(target: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``.<name>.build.lock`` beside ``target`` exclusively, waiting for any other holder:
    a process that finds a cache entry missing builds it under this lock, and one that needed
    it at the same time waits and then finds it made, instead of building it again and
    replacing it under the first one's feet. (Where ``fcntl`` is missing, no lock is taken.)"""
    try:
        import fcntl
    except ImportError:  # Windows: builds may repeat, each still atomic
        yield
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.build.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; choose another path or allow overwriting")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _publish(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``target`` only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            _publish(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, streamed so multi-GB GGUF files do not load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
