"""Files written whole, appended to and read, as the one place that decides where seedslot may
write and how much it reads: :func:`atomic_write` leaves, at any instant of a crash, either the
old file or the complete new one, never a mix, and only ever replaces a regular file (never a
device, a FIFO, a directory or a symlink); :func:`append_text` appends without following a
symlink; :func:`read_regular` reads a regular file of bounded size. Checkpoints, exports,
summaries, metrics, sweep tables and benchmark results all go through them."""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Sequence, Union

__all__ = ["atomic_write", "append_text", "read_regular", "check_writable", "fsync_dir", "remove_stale_temporaries",
           "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"

Buffer = Union[bytes, bytearray, memoryview]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_writable(path: str | os.PathLike) -> None:
    """ValueError naming ``path`` unless it is a regular file or nothing: seedslot never replaces
    or writes through a device (``/dev/stdout``, ``/dev/null``), a FIFO, a directory or a symlink."""
    path = os.fspath(path)
    if not path or os.path.basename(path) in ("", ".", ".."):
        raise ValueError(f"{path!r}: not a file path")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is {_kind(mode)}; seedslot writes only regular files (pass a file path)")


def atomic_write(path: str | os.PathLike, data: str | Buffer | Sequence[Buffer]) -> None:
    """Write ``data`` (text as UTF-8, bytes, or a sequence of byte buffers written one after
    another, so that a large body is never copied) to ``path`` atomically: a temporary file in the
    same directory (``.NAME.XXXX.tmp``) is written, fsynced and renamed over ``path``, then the
    directory is fsynced. An existing file's permissions are kept; a failed write removes the
    temporary file and leaves ``path`` as it was. ValueError, before anything is written, when
    ``path`` is anything but a regular file or nothing (:func:`check_writable`); an OSError names
    ``path``, never the temporary file."""
    path = os.fspath(path)
    check_writable(path)
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=directory)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                f.write(p)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        check_writable(path)  # again, just before the rename: what appeared meanwhile is not replaced
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is not None:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
        raise
    fsync_dir(directory)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (UTF-8) to the regular file ``path``, creating it; never through a symlink
    (``O_NOFOLLOW``) nor into a device or FIFO: ValueError naming ``path`` then."""
    path = os.fspath(path)
    check_writable(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise ValueError(f"{path} is a symlink; seedslot writes only regular files (pass a file path)") from None
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path} is {_kind(mode)}; seedslot writes only regular files (pass a file path)")
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def read_regular(path: str | os.PathLike, max_bytes: int | None = None, what: str = "file") -> bytes:
    """The content of the regular file ``path``, read in bounded memory: a device, FIFO or
    directory (which could stream without end) is refused, and so is a file larger than
    ``max_bytes``; ValueError naming ``path`` and the limit."""
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO does not block the open
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is {_kind(st.st_mode)}; a {what} must be a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ValueError(f"{path} has {st.st_size} bytes; a {what} may have at most {max_bytes}")
        chunks, left = [], st.st_size + 1  # one byte more: a file that grows while read is noticed
        while left:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > st.st_size:
            raise ValueError(f"{path} grew while it was read; a {what} must not change meanwhile")
        return data
    finally:
        os.close(fd)


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
