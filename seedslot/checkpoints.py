"""Training checkpoints: atomic writes, a content hash, and loading that never unpickles code.

A checkpoint file is a fixed 56-byte header followed by a body::

    magic (8 bytes) | format version (u32) | flags (u32, 0) | body length (u64) | SHA-256 (32 bytes)

all little-endian; the SHA-256 covers the header fields before it and the body, so any flipped
byte or missing tail is detected before the body is parsed. The body is ``torch.save`` of a dict
of tensors and plain Python values, read back with ``torch.load(weights_only=True)``. Writes go
to a temporary file in the same directory that is fsynced and then renamed over the target, so a
crash at any instant leaves either the old or the new checkpoint, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import zipfile
from typing import Any, Sequence, Union

import torch

from .files import atomic_write, read_regular
from .rng import STREAM_VERSION

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_state_into", "frame", "unframe",
           "read_bytes", "check_stream_version"]

CHECKPOINT_MAGIC = b"SEEDSLOT"
CHECKPOINT_VERSION = 1

_HEAD = struct.Struct("<8sIIQ")  # magic, version, flags, body length
_DIGEST = 32
HEADER_BYTES = _HEAD.size + _DIGEST

Buffer = Union[bytes, bytearray, memoryview]


class CheckpointError(Exception):
    """A checkpoint or export that cannot be used: truncated, corrupted or tampered, written by a
    newer format version, not a seedslot file, or not fitting the model. The message says which,
    on one line."""

    def __init__(self, message: str = "") -> None:
        super().__init__(" ".join(str(message).split()))


def check_stream_version(version, source: str) -> None:
    """CheckpointError unless a file's random stream version is the one this seedslot generates:
    its seeds would regenerate other weights."""
    if type(version) is not int or version != STREAM_VERSION:
        raise CheckpointError(f"{source}: written for random stream version {version!r:.40}; this seedslot "
                              f"generates stream version {STREAM_VERSION}, so its seeds would give other weights")


# ---------------------------------------------------------------- framing (shared with export)


def frame(magic: bytes, version: int, parts: Sequence[Buffer]) -> list[Buffer]:
    """The header followed by ``parts`` (the body, in pieces, so large bodies are never copied)."""
    length = sum(memoryview(p).nbytes for p in parts)
    head = _HEAD.pack(magic, version, 0, length)
    digest = hashlib.sha256(head)
    for p in parts:
        digest.update(p)
    return [head + digest.digest(), *parts]


def unframe(data: bytes, magic: bytes, max_version: int, what: str, source: str) -> tuple[int, memoryview]:
    """``(version, body)`` of a framed file, after checking magic, version, length and hash."""
    if len(data) < len(magic) and magic.startswith(data):
        raise CheckpointError(f"{source}: truncated: {len(data)} bytes, shorter than the {what} header")
    if data[: len(magic)] != magic:
        raise CheckpointError(f"{source}: not a {what}: it does not start with {magic!r}")
    if len(data) < HEADER_BYTES:
        raise CheckpointError(f"{source}: truncated: {len(data)} bytes, shorter than the {what} header")
    _, version, flags, length = _HEAD.unpack_from(data)
    if version > max_version:
        raise CheckpointError(
            f"{source}: written by a newer format version {version} (this seedslot reads {what} "
            f"versions up to {max_version}); upgrade seedslot, or the header is corrupted"
        )
    if version < 1 or flags != 0:
        raise CheckpointError(f"{source}: corrupted: header has version {version} and flags {flags:#x}")
    end = HEADER_BYTES + length
    if len(data) < end:
        raise CheckpointError(f"{source}: truncated: {len(data)} bytes, the header announces {end}")
    if len(data) > end:
        raise CheckpointError(f"{source}: corrupted: {len(data) - end} unexpected bytes after the body")
    digest = hashlib.sha256(memoryview(data)[: _HEAD.size])
    digest.update(memoryview(data)[HEADER_BYTES:])
    if digest.digest() != data[_HEAD.size : HEADER_BYTES]:
        raise CheckpointError(f"{source}: corrupted or tampered: SHA-256 of the content does not match the header")
    return version, memoryview(data)[HEADER_BYTES:]


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole content of the regular file ``path`` (a device or FIFO, which could stream without
    end, is a CheckpointError naming it)."""
    try:
        return read_regular(path, what="seedslot file")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def check_archive(body: Buffer, source: str) -> None:
    """CheckpointError unless ``body`` is a zip archive as ``torch.save`` writes it: every record
    stored (not compressed) and lying inside the body. Read from the central directory alone, so
    a zip bomb (records that inflate to far more than the file holds) is refused before anything
    is inflated or allocated."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, OverflowError, EOFError, NotImplementedError) as e:
        raise CheckpointError(f"{source}: tampered: the body is not a torch archive ({type(e).__name__}: {e})") from None
    size = memoryview(body).nbytes
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise CheckpointError(f"{source}: tampered: archive record {info.filename!r:.80} is compressed; torch.save "
                                  "stores records uncompressed")
        total += info.file_size
        if info.header_offset + info.file_size > size or total > size:
            raise CheckpointError(f"{source}: tampered: archive record {info.filename!r:.80} declares "
                                  f"{info.file_size} bytes; the file holds {size}")


# ---------------------------------------------------------------- checkpoints

_LEAVES = (torch.Tensor, int, float, str, bool, bytes, type(None), torch.dtype, torch.device)


def _check_payload(value: Any, where: str) -> None:
    """Reject values that ``torch.load(weights_only=True)`` would refuse, naming where they are."""
    if isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise ValueError(f"payload{where}: dict keys must be str or int; got {type(key).__name__}")
            _check_payload(v, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_payload(v, f"{where}[{i}]")
    elif not isinstance(value, _LEAVES):
        raise ValueError(
            f"payload{where}: must hold only tensors, int, float, str, bool, None, lists, tuples and "
            f"dicts; got {type(value).__name__}"
        )


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Atomically write ``payload`` (state_dicts, RNG state tensors, counters, config) to ``path``.

    Raises ValueError, before touching the file system, if the payload holds anything but tensors
    and plain values (it could not be loaded back without unpickling code).
    """
    if not isinstance(payload, dict):
        raise ValueError(f"payload must be a dict; got {type(payload).__name__}")
    _check_payload(payload, "")
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, frame(CHECKPOINT_MAGIC, CHECKPOINT_VERSION, [buf.getbuffer()]))


def _safe_load(body: Buffer, map_location, source: str):
    check_archive(body, source)
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as e:  # the hash matched, so the file was written with this content on purpose
        raise CheckpointError(f"{source}: tampered or unsafe: refusing to load it ({type(e).__name__}: {e})") from e


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The payload saved by :func:`save_checkpoint`, after verifying header and hash.

    Only tensors and plain values are ever reconstructed (``weights_only=True``). Raises
    :class:`CheckpointError` for a truncated, corrupted, tampered, newer or foreign file.
    """
    source = os.fspath(path)
    _, body = unframe(read_bytes(path), CHECKPOINT_MAGIC, CHECKPOINT_VERSION, "seedslot checkpoint", source)
    payload = _safe_load(body, map_location, source)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{source}: tampered: the body is a {type(payload).__name__}, not a dict")
    return payload


def _stored(t: torch.Tensor) -> torch.Tensor:
    """The elements ``t``'s storage really holds, flat: a stride-0 view of a huge shape is checked
    in the memory of the few values behind it, not materialised."""
    if t.is_contiguous():
        return t.reshape(-1)
    s = t.untyped_storage()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(s, 0, (s.nbytes() // t.element_size(),))


def _check_numbers(value: Any, where: str) -> None:
    """CheckpointError naming the first float that is NaN or infinite (floating tensors included)."""
    if isinstance(value, dict):
        for key, v in value.items():
            _check_numbers(v, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_numbers(v, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value) or (
            isinstance(value, torch.Tensor) and value.dtype.is_floating_point and not bool(torch.isfinite(
                _stored(value)).all())):
        raise CheckpointError(f"does not fit the model: state{where} must be finite")


def _check_optimizer_state(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """CheckpointError unless the saved groups match ``opt``'s and each saved per-parameter tensor
    (momentum buffers, ...) has its parameter's shape."""
    groups, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(opt.param_groups):
        raise CheckpointError(f"does not fit the model: optimizer state must hold 'state' and "
                              f"{len(opt.param_groups)} 'param_groups'")
    for gi, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            raise CheckpointError(f"does not fit the model: optimizer param group {gi} has another parameter count")
        for pi, (pid, p) in enumerate(zip(ids, group["params"])):
            entry = state.get(pid, {})
            if not isinstance(entry, dict):
                raise CheckpointError(f"does not fit the model: optimizer state of parameter {pi} of param group "
                                      f"{gi} must be a dict; got {type(entry).__name__}")
            for key, v in entry.items():
                if isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape:
                    raise CheckpointError(
                        f"does not fit the model: optimizer {key} of parameter {pi} of param group {gi} has shape "
                        f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")


def load_state_into(obj: Any, state_dict: dict, *, strict: bool = True) -> None:
    """``obj.load_state_dict(state_dict)`` for a module, optimizer or scheduler, turning a
    mismatch into ``CheckpointError("does not fit the model: ...")``.

    For modules it also refuses a dtype change (``load_state_dict`` would silently cast, e.g.
    fp32 scores into an int8 score buffer).
    """
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"does not fit the model: expected a state_dict, got {type(state_dict).__name__}")
    if isinstance(obj, torch.nn.Module):
        own = obj.state_dict()
        for key, value in state_dict.items():
            mine = own.get(key)
            if isinstance(mine, torch.Tensor) and isinstance(value, torch.Tensor) and mine.dtype != value.dtype:
                raise CheckpointError(
                    f"does not fit the model: {key} is {value.dtype} in the checkpoint, {mine.dtype} in the model"
                )
    else:  # optimizer or scheduler: every number finite, every per-parameter tensor of its parameter's shape
        _check_numbers(state_dict, "")
        if isinstance(obj, torch.optim.Optimizer):
            _check_optimizer_state(obj, state_dict)
    try:
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict(state_dict, strict=strict)
        else:
            obj.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"does not fit the model: {e}") from e
