"""Atomic file writes: a kill at any moment leaves the old file or the new one, never a broken one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fopro.errors import FoproError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise FoproError(f"cannot write {path}: {err.strerror}; choose a writable output path") from err
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        # mkstemp makes 0600 files, and some writers (safetensors) replace the file with another 0600 one:
        # give the finished file the usual permissions
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except OSError as err:  # a full disk, a quota, a folder removed under the run: the old file is kept
        raise FoproError(f"cannot write {path}: {err.strerror or err}; free some space or choose another output path") from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def folder_lock(folder: str | Path, option: str) -> Iterator[None]:
    """Hold FOLDER/.fopro.lock while the block runs: a second fopro process that wants the same folder stops with one
    line naming the holder's process id. The lock is the operating system's (flock), so it dies with its process,
    kill -9 included, and a process id reused after a restart (a container's) never keeps a folder locked. A folder
    this call created and left empty is removed again."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    fd = _take_lock(lock, option, folder)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        _release_lock(fd, lock)
        if created and not any(folder.iterdir()):
            folder.rmdir()


LOCK_NAME = ".fopro.lock"


def _take_lock(lock: Path, option: str, folder: Path) -> int:
    for _ in range(10):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            owner = _lock_owner(lock)
            holder = f"fopro process {owner}" if owner is not None else "another fopro process"
            raise FoproError(f"{option} {folder} is in use by {holder}: wait for it to finish or choose another folder")
        if _is_same_file(fd, lock):
            return fd
        os.close(fd)  # its holder removed it between our open and our lock: take the new one
    raise FoproError(f"{option} {folder}: cannot take its lock {lock}: choose another folder")


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError (flock), PermissionError (msvcrt): another process holds it
        return False
    return True


def _release_lock(fd: int, lock: Path) -> None:
    if fcntl is not None:  # removed while still held, so that no one can lock the removed file
        lock.unlink(missing_ok=True)
        os.close(fd)
    else:  # Windows removes no open file
        os.close(fd)
        with contextlib.suppress(OSError):
            lock.unlink(missing_ok=True)


def _is_same_file(fd: int, lock: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(lock))
    except FileNotFoundError:
        return False


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def check_output_folder(folder: str | Path, option: str, data_folders: Iterable[str | Path | None] = ()) -> None:
    """Fail before the work when an output folder cannot hold files: it (or a folder above it) is a file, or it lies
    inside a data folder, where the next run would read its plots and files as images."""
    folder = Path(folder)
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                what = "is a file" if existing == folder else f"is under {existing}, which is a file"
                raise FoproError(f"{option} {folder} {what}: give a folder for the output")
            break
    resolved = folder.resolve()
    for data in data_folders:
        if data is None or not Path(data).is_dir():
            continue
        root = Path(data).resolve()
        if resolved == root or root in resolved.parents:
            raise FoproError(f"{option} {folder} is inside the data folder {data}: its files would be read as data; choose a folder outside it")
