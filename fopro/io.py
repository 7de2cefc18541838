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
    """Hold FOLDER/.fopro.lock (with this process id) while the block runs: a second fopro process that wants the
    same folder stops with one line. A lock left by a process that no longer runs is taken over. A folder this
    call created and left empty is removed again."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and _running(owner):
                raise FoproError(f"{option} {folder} is in use by fopro process {owner}: wait for it to finish or choose another folder") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise FoproError(f"{option} {folder}: cannot take its lock {lock}: choose another folder")
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()


LOCK_NAME = ".fopro.lock"


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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
