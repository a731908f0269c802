"""Atomic file writes: a crash leaves the old file or the new one, never half of either."""

from __future__ import annotations

import errno
import io
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fedtl.shared.errors import FedtlError, StorageError

# What np.load raises on a torn, truncated or foreign .npz file (a cache that catches them recomputes the file).
NPZ_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)

_FIXES = {
    errno.ENOSPC: "the disk is full: free space there, or point FEDTL_HOME / the policy's folders elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space there, or point FEDTL_HOME / the policy's folders elsewhere",
    errno.EROFS: "the file system is read-only: point FEDTL_HOME / the policy's folders at a writable one",
    errno.EACCES: "this user may not write there: fix the folder's permissions or point fedtl elsewhere",
    errno.EPERM: "this user may not write there: fix the folder's permissions or point fedtl elsewhere",
}


def storage_error(path: str | Path, exc: OSError) -> StorageError:
    """Return a StorageError naming `path`, what went wrong and the fix, for an OSError raised writing it."""
    fix = _FIXES.get(exc.errno or 0, "check that the folder exists and is writable")
    return StorageError(f"cannot write {path}: {exc.strerror or exc}; {fix}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a fsynced temporary file in the same folder, then rename it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise storage_error(path, exc) from exc
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)  # nothing half-written is left behind
        raise storage_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write `arrays` as an .npz file at `path` atomically (atomic_write_bytes) and return the path."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def _umask() -> int:
    """Return the process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def installed_script(name: str) -> str:
    """Return the path of console script `name` (Flower's `flower-supernode`, ...) of this Python's environment.

    The one beside `sys.executable` comes first: `.venv/bin/fedtl` runs without `.venv/bin` on PATH, where a bare
    name would miss the environment's own Flower or find another installation first. Then PATH.

    Raises:
        FedtlError: neither has it.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedtlError(
            f"`{name}` is neither beside this Python ({beside.parent}) nor on PATH; fix: install fedtl into this "
            f"environment (`pip install -e .` brings Flower, which provides {name})"
        )
    return found


def existing_file(path: str | Path, option: str, fix: str) -> Path:
    """Return `path` (user and links resolved) if it is a file; else raise a FedtlError naming `option` and `fix`."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FedtlError(f"{option} {resolved}: no such file; fix: {fix}")
    return resolved
