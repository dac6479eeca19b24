"""One atomic write for everything the package writes (bytes, text, JSON, numpy, torch).

A file is written into a temporary file in the same folder, flushed and ``fsync``-ed, then
moved into place with ``os.replace``: a reader sees the old file or the new one, never half a
file, and a killed writer leaves at most a hidden ``.NAME.*.tmp`` file. Parent folders are
created. torch and numpy are imported only by the helpers that need them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "remove_stale_temporaries", "write_bytes", "write_json", "write_npy",
           "write_text", "write_torch"]


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``writer(handle)`` on a binary temporary file next to ``path``, then move it into
    place. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask like open()
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(exc, path):
            from siamese_detr.errors import UserError

            raise UserError(f"no space left on the device writing {path}; the previous "
                            f"{path.name} (if any) is intact; free space and resume") from exc
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(exc: BaseException, path: Path) -> bool:
    """ENOSPC, or a writer's own error (torch: ``RuntimeError``) while the disk is full."""
    import errno
    import shutil

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, RuntimeError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        try:
            return shutil.disk_usage(path.parent).free < 1 << 20
        except OSError:
            return False
    return False


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the hidden ``.NAME.*.tmp`` files a killed writer left in ``folder``."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda h: h.write(data))


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, *, indent: int | None = None,
               sort_keys: bool = False) -> Path:
    """``obj`` as JSON (``json.dumps(obj, indent=indent, sort_keys=sort_keys)``)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


def write_npy(path: str | Path, array: Any) -> Path:
    import numpy as np

    return atomic_write(path, lambda h: np.save(h, array))


def write_torch(path: str | Path, obj: Any) -> Path:
    """``torch.save(obj)``: the checkpoint writer (see ``engine.checkpoint.save_checkpoint``)."""
    import torch

    return atomic_write(path, lambda h: torch.save(obj, h))
