"""Atomic file writes: a reader sees the old file or the whole new one, never a partial one.

A write that fails for want of space (ENOSPC, EDQUOT, or torch's serializer failing on a full disk)
becomes one `DiskFullError` line naming the folder, the bytes needed and the bytes free; the partial
temp file is removed.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_SPACE_MESSAGES = ("unexpected pos", "file write failed", "No space left", "Disk quota exceeded")
LOW_SPACE_BYTES = 64 << 20


class DiskFullError(OSError):
    """A file could not be written for want of space (or quota); the message says where and how much."""


def free_bytes(folder: Path) -> int:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 if it does not exist)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) if Path(folder).is_dir() else 0


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TB"


def is_out_of_space(error: BaseException, folder: Path, *, needed: int = 0) -> bool:
    """ENOSPC/EDQUOT, or a serializer error on a folder with (almost) no room left."""
    if isinstance(error, OSError) and error.errno in _SPACE_ERRNOS:
        return True
    if isinstance(error, (OSError, RuntimeError)) and any(text in str(error) for text in _SPACE_MESSAGES):
        return free_bytes(folder) < max(needed, LOW_SPACE_BYTES)
    return False


def disk_full_error(folder: Path, *, what: str, needed: int, advice: str = "") -> DiskFullError:
    """The one-line error: what, where, the bytes needed and free, then `advice` (e.g. what is kept)."""
    folder = Path(folder)
    free = free_bytes(folder)
    need = f"needs about {human_bytes(needed)}" if needed else "needs more room"
    return DiskFullError(errno.ENOSPC, f"{what} could not be written to {folder}: no space left on the device or "
                                       f"quota exceeded ({need}, {human_bytes(free)} free){advice}")


def fsync_dir(folder: Path) -> None:
    """Makes a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder → fsync → rename → fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if is_out_of_space(error, path.parent, needed=len(data)):
            raise disk_full_error(path.parent, what=path.name, needed=len(data)) from error
        raise
    fsync_dir(path.parent)


def atomic_torch_save(path: Path, obj: object) -> None:
    """`torch.save` with the same guarantee: the file is complete or absent."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
