"""Write to a temporary name, rename at the end: an interrupted write never leaves a
half file (or folder) at the target path.

The data is fsynced before the rename and the folder after it, so after a power cut the
target is the old version or the new one, never an empty file. A killed run leaves its
temporary file behind (hidden, and an export's is as large as the model): the next write
of the same target removes it. A failed write names the target: an ``OSError`` without a
file name (a full disk: ``write`` says only ENOSPC) or naming the temporary gets the target's.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# tempfile's random part: 8 of these characters
_RANDOM = "[a-z0-9_]{8}"


def temp_file_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.stem)}\.tmp-{_RANDOM}{re.escape(target.suffix)}")


def temp_dir_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.{_RANDOM}\.tmp")


def old_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Removes what a killed write of ``target`` (by ``atomic_file`` or ``atomic_dir``) left
    beside it; returns what it removed. A folder killed between its two renames has its
    previous version only as ``.NAME.old``: that is put back, not removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    file_pattern, dir_pattern = temp_file_pattern(target), temp_dir_pattern(target)
    removed = []
    for entry in target.parent.iterdir():
        folder = entry.is_dir() and not entry.is_symlink()
        if folder and dir_pattern.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif not folder and file_pattern.fullmatch(entry.name):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    old = old_dir(target)
    if old.is_dir() and not old.is_symlink():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        else:
            os.replace(old, target)
    return removed


def fsync_path(path: Path) -> None:
    """Flushes a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # some file systems cannot fsync a folder; a file's failed fsync is a failed write
        if not (path.is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        for name in dirs:
            fsync_path(Path(root) / name)
    fsync_path(folder)


def _make_parent(target: Path) -> None:
    """``target``'s folder, made if needed; a file in the way is ENOTDIR, as ``open`` says it
    (``mkdir`` would say EEXIST, which reads as if the target existed)."""
    for folder in (target.parent, *target.parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
            break
    target.parent.mkdir(parents=True, exist_ok=True)


def _raise_naming_target(exc: OSError, target: Path, tmp: Path) -> None:
    """Re-raises a system error (it has an errno) that names no file, or the temporary, named
    after the target instead: the same class (``OSError`` picks it from the errno) and reason."""
    names_other = exc.filename is not None and not str(exc.filename).startswith(str(tmp))
    if exc.errno is None or names_other:
        raise exc
    raise OSError(exc.errno, exc.strerror, str(target)) from exc


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``target``; on success it replaces ``target``."""
    target = Path(target)
    tmp_path, made = target, False
    try:
        _make_parent(target)
        remove_stale_temps(target)
        # Keep the suffix: some writers (mx.save_safetensors) append theirs when it is missing.
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent)
        os.close(fd)
        tmp_path, made = Path(tmp), True
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, target)
        fsync_path(target.parent)
    except OSError as exc:
        _raise_naming_target(exc, target, tmp_path)
    finally:
        if made:
            tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yields a temporary folder beside ``target``; on success it becomes ``target``
    (an existing ``target`` is replaced)."""
    target = Path(target)
    tmp, made = target, False
    try:
        _make_parent(target)
        remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        made = True
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = old_dir(target)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_path(target.parent)
    except OSError as exc:
        _raise_naming_target(exc, target, tmp)
    finally:
        if made:
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(text)
