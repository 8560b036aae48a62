"""Files written whole: :func:`atomic_write` leaves, at any instant of a crash, either the old
file or the complete new one, never a mix. Checkpoints, exports, summaries, metrics rewrites,
sweep tables and benchmark results all go through it."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence, Union

__all__ = ["atomic_write", "fsync_dir", "remove_stale_temporaries", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"

Buffer = Union[bytes, bytearray, memoryview]


def atomic_write(path: str | os.PathLike, data: str | Buffer | Sequence[Buffer]) -> None:
    """Write ``data`` (text as UTF-8, bytes, or a sequence of byte buffers written one after
    another, so that a large body is never copied) to ``path`` atomically: a temporary file in the
    same directory (``.NAME.XXXX.tmp``) is written, fsynced and renamed over ``path``, then the
    directory is fsynced. An existing file's permissions are kept; a failed write removes the
    temporary file and leaves ``path`` as it was."""
    path = os.fspath(path)
    if isinstance(data, str):
        parts: Sequence[Buffer] = [data.encode("utf-8")]
    elif isinstance(data, (bytes, bytearray, memoryview)):
        parts = [data]
    else:
        parts = data
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    # A leading dot and the suffix keep a leftover temporary file from looking like the real one.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                f.write(p)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files that :func:`atomic_write` calls for ``path`` interrupted by a
    kill left in its directory (``.NAME.XXXX.tmp``); returns their paths. Call it only where no
    other process is writing ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    removed = []
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(TMP_SUFFIX):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except FileNotFoundError:
                pass
    return removed


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable; some platforms cannot open directories, which is
    then best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
