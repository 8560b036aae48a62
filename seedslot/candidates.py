"""Candidate weights and initial scores, regenerated from seeds instead of stored.

Candidate ``k`` of connection ``c`` is ``signed24(bits(c, key_a, keys_b)[k]) * sigma / 2**23``:
uniform on the 2**24-point grid of [-sigma, sigma), with sigma the layer's Glorot bound. It does
not depend on K, so a layer with K = 16 holds the K = 8 candidates plus eight more. With sharing,
the connection index is replaced by 0: one set of K values per layer (``"layer"``) or, when every
layer uses the model's seed as its candidate seed, for the whole model (``"global"``, each layer
scaling the same unit draws by its own sigma).

Initial scores ``U(0, lambda*sigma)`` come from another stream of the layer's seed. int8 scores
take the top 7 bits of the same draws, so they are the fp32 scores quantised to ``lambda*sigma/127``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from .rng import bits, compile_enabled, derive, fused, key32, signed24, unit24, use_triton

SHARING = ("none", "layer", "global")

# Stream tags: every random number of a layer comes from derive(seed, tag, ...).
CANDIDATES, SCORES, SAMPLE, ROUND, REQUANT = 1, 2, 3, 4, 5

# A chunk holds at most this many (connection, candidate) values. The eager path's temporaries (a
# few int32/fp32 tensors of a chunk) bound the first; fused kernels keep no temporaries, so only
# their output is chunk-sized, and a larger chunk saves the per-call overhead (~30% of an update).
CHUNK_VALUES = 1 << 19
FUSED_CHUNK_VALUES = 1 << 22


def glorot_sigma(fan_in: int, fan_out: int) -> float:
    """The Glorot/Xavier uniform bound sqrt(6 / (fan_in + fan_out)), rounded to fp32."""
    return float(torch.tensor(math.sqrt(6.0 / (fan_in + fan_out)), dtype=torch.float32))


def grid_step(bound: float) -> torch.Tensor:
    """``bound / 2**23`` as an fp32 0-dim tensor (exact: a power-of-two division)."""
    return torch.tensor(bound, dtype=torch.float32) * (2.0**-23)


def stream_keys(seed: int, tag: int, k: int, device=None) -> tuple[int, torch.Tensor]:
    """``(key_a, keys_b)`` of one stream: keys_b has one int32 key per candidate."""
    # key32(seed, tag, 1, j) for every j at once: derive's last step (splitmix64 of the prefix's hash
    # xor j) in uint64 arithmetic, so that a large K costs no Python loop
    x = np.uint64(derive(seed, tag, 1)) ^ np.arange(k, dtype=np.uint64)
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    kb = torch.from_numpy((x & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)).to(device)
    return key32(seed, tag, 0), kb


def row_chunks(rows: int, k: int, like: torch.Tensor | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most CHUNK_VALUES (fused: FUSED_CHUNK_VALUES) values each;
    one range for all rows when the kernels run as Triton programs on ``like``'s device (a caller
    passes ``like`` only where its kernel makes no (rows, K) temporary): fewer launches."""
    if use_triton(like):
        yield 0, rows
        return
    step = max(1, (FUSED_CHUNK_VALUES if compile_enabled() else CHUNK_VALUES) // max(k, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def chunked(out, offset: int, k: int, like: torch.Tensor | None, fn: Callable) -> torch.Tensor | tuple:
    """The chunk loop in front of every kernel, writing into ``out`` (the updates write the
    scores in place): ``out[a:b] = fn(a, b, start)`` for each :func:`row_chunks` range of
    ``out``'s rows, ``start`` the 0-dim int32 index of connection ``offset + a`` on ``out``'s
    device. ``out`` may be a tuple of tensors with a tuple result. ``k`` and ``like`` are
    :func:`row_chunks`'. New results go through :func:`chunked_new`."""
    outs = out if isinstance(out, tuple) else (out,)
    for a, b in row_chunks(outs[0].shape[0], k, like):
        got = fn(a, b, i32(offset + a, outs[0].device))
        for o, g in zip(outs, got if isinstance(out, tuple) else (got,)):
            o[a:b] = g
    return out


def chunked_new(make: Callable, rows: int, offset: int, k: int, like: torch.Tensor | None, device,
                fn: Callable) -> torch.Tensor | tuple:
    """:func:`chunked` into new tensors: ``make()`` allocates them, except when one chunk covers
    all ``rows``: then the kernel's own result is returned (no copy, no second allocation)."""
    ranges = list(row_chunks(rows, k, like))
    if len(ranges) == 1:
        return fn(0, rows, i32(offset, device))
    return chunked(make(), offset, k, like, fn)


class CandidateKeys(NamedTuple):
    """What regenerates a layer's candidates, in the order the kernels take it (after ``start``)."""

    per_conn: int  # 1, or 0 when candidates are shared
    key: torch.Tensor  # 0-dim int32 key_a of the candidate stream
    keys: torch.Tensor  # (K,) int32 keys_b
    step: torch.Tensor  # 0-dim fp32 grid step


def connections(start, n: int, per_conn: int, device) -> torch.Tensor:
    """Connection indices ``start .. start+n-1`` (int32), or zeros when candidates are shared.
    ``start`` may be an int or a 0-dim int32 tensor (kernels take tensors: no recompiles)."""
    return (torch.arange(n, dtype=torch.int32, device=device) + start) * per_conn


def i32(value: int, device=None) -> torch.Tensor:
    """A 0-dim int32 tensor: how keys and offsets are passed to fused kernels."""
    # torch.full, not torch.tensor: on CUDA a fill kernel instead of a host-to-device copy, which
    # would block the host until the device is idle
    return torch.full((), value, dtype=torch.int32, device=device)


@fused(triton="candidate_chunk")
def candidate_chunk(
    start: torch.Tensor, n: int, per_conn: int, key_a: torch.Tensor, keys_b: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """Candidates of connections ``start .. start+n-1``: (n, K) float32."""
    c = connections(start, n, per_conn, keys_b.device)
    return signed24(bits(c, key_a, keys_b)).to(torch.float32) * step


@fused("idx", triton="selected_chunk")
def selected_chunk(
    idx: torch.Tensor, start: torch.Tensor, per_conn: int, key_a: torch.Tensor, keys_b: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """The candidate ``idx[i]`` of connection ``start + i``: (n,) float32, one hash per value."""
    c = connections(start, idx.shape[0], per_conn, keys_b.device)
    b = bits(c, key_a, keys_b[idx].unsqueeze(-1)).squeeze(-1)
    return signed24(b).to(torch.float32) * step


def init_scores(
    rows: int, k: int, seed: int, bound: float, conn_offset: int, dtype: torch.dtype, device=None
) -> tuple[torch.Tensor, float]:
    """Initial scores (rows, k) and their scale: ``U(0, bound)`` in fp32, or int8 levels 0..127
    with scale ``bound / 127``."""
    key_a, kb = stream_keys(seed, SCORES, k, device)
    out = torch.empty(rows, k, dtype=dtype, device=device)
    top = torch.tensor(bound, dtype=torch.float32)
    for a, b in row_chunks(rows, k):
        r = bits(connections(conn_offset + a, b - a, 1, device), key_a, kb)
        if dtype == torch.int8:
            out[a:b] = ((r >> 25) & 0x7F).to(torch.int8)
        else:
            out[a:b] = unit24(r) * top.to(device)
    scale = bound / 127.0 if dtype == torch.int8 else 1.0
    return out, scale


def candidate_values(rows: int, offset: int, ck: CandidateKeys) -> torch.Tensor:
    """All K candidates of connections ``offset .. offset+rows-1``: (rows, K) float32."""
    k, dev = ck.keys.shape[0], ck.keys.device
    return chunked_new(lambda: torch.empty(rows, k, dtype=torch.float32, device=dev), rows, offset, k, None, dev,
                       lambda a, b, start: candidate_chunk(start, b - a, *ck))


def selected_values(idx: torch.Tensor, offset: int, ck: CandidateKeys) -> torch.Tensor:
    """The candidates ``idx`` (rows,) of connections ``offset ..``: (rows,) float32."""
    n, dev = idx.shape[0], idx.device
    return chunked_new(lambda: torch.empty(n, dtype=torch.float32, device=dev), n, offset, 1, idx, dev,
                       lambda a, b, start: selected_chunk(idx[a:b], start, *ck))
