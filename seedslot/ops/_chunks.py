"""The chunk loops in front of the kernels: a call over many connections runs as bounded pieces.

A chunk holds at most CHUNK_VALUES (connection, candidate) values on the eager path (its
temporaries, a few int32/fp32 tensors of a chunk, bound it) and FUSED_CHUNK_VALUES on the fused
one (a fused kernel keeps no temporaries: only its output is chunk-sized, and a larger chunk saves
per-call overhead). Triton kernels make no (rows, K) temporary: one chunk for all rows.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

CHUNK_VALUES = 1 << 19
FUSED_CHUNK_VALUES = 1 << 22


def i32(value: int, device=None) -> torch.Tensor:
    """A 0-dim int32 tensor: how keys and offsets are passed to kernels."""
    # torch.full, not torch.tensor: on CUDA a fill kernel instead of a host-to-device copy, which
    # would block the host until the device is idle
    return torch.full((), value, dtype=torch.int32, device=device)


_CONSTANTS: dict = {}


def constants(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A device vector of ``values`` (per-part sigmas, key prefixes, index lists), copied from the
    host once per distinct tuple and shared: a steady-state step copies nothing to the device.
    Callers only read it."""
    key = (values, dtype, torch.device(device))
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) >= 256:
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


def row_chunks(rows: int, k: int, fused: bool, whole: bool = False) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most CHUNK_VALUES (``fused``: FUSED_CHUNK_VALUES) values
    each; one range for all rows with ``whole`` (kernels that make no (rows, K) temporary)."""
    if whole:
        yield 0, rows
        return
    step = max(1, (FUSED_CHUNK_VALUES if fused else CHUNK_VALUES) // max(k, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def chunked(out, offset: int, ranges, fn: Callable) -> torch.Tensor | tuple:
    """``out[a:b] = fn(a, b, start)`` for each ``(a, b)`` of ``ranges``, ``start`` the 0-dim int32
    index of connection ``offset + a`` on ``out``'s device (the updates write the scores in place).
    ``out`` may be a tuple of tensors with a tuple result."""
    outs = out if isinstance(out, tuple) else (out,)
    for a, b in ranges:
        got = fn(a, b, i32(offset + a, outs[0].device))
        for o, g in zip(outs, got if isinstance(out, tuple) else (got,)):
            o[a:b] = g
    return out


def chunked_new(make: Callable, rows: int, offset: int, ranges, device, fn: Callable) -> torch.Tensor | tuple:
    """:func:`chunked` into new tensors: ``make()`` allocates them, except when one chunk covers
    all ``rows``: then the kernel's own result is returned (no copy, no second allocation)."""
    ranges = list(ranges)
    if len(ranges) == 1:
        return fn(0, rows, i32(offset, device))
    return chunked(make(), offset, ranges, fn)
