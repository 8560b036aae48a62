"""Numba twins of CPU kernels whose cost in torch is per-call overhead, not arithmetic.

:func:`incremental_greedy` is the incremental implicit selection of one layer part in one pass:
the staleness check of every connection and the re-selection of the stale ones, written into the
cache in place. The torch path (:func:`seedslot.ops._torch.incremental_stale_rows`, then
:func:`seedslot.ops._torch.implicit_select_at` on the stale rows) costs a numpy scan and a compiled
call per part, per-call overhead that can be as much as a small network's whole step. The
twin computes the same fp32 scores and float64 intervals, operation for operation (LLVM contracts
nothing into FMAs without fast-math), so a re-selected row gets the same bits; the tests check it
against the torch path. Importing this module imports numba: :func:`seedslot.ops._backends.numba_kernels` gives
it where numba is installed, imports and is not disabled (``SEEDSLOT_NUMBA=0``).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch.autograd.graph import increment_version
from torch.utils.weak import WeakIdKeyDictionary

from ._torch import INCR_ABS, INCR_C_MAX, INCR_C_MIN, INCR_MARGIN, INCR_R_MAX, INCR_U

__all__ = ["incremental_greedy"]

_MASK, _M1, _M2 = 0xFFFFFFFF, 0x7FEB352D, 0x846CA68B
_BLOCK = 256  # connections checked per vectorised pass before any is re-selected
# The proof's constants, passed as arguments: numba's disk cache freezes the globals a kernel reads
# and is invalidated only by this file's own source, not by seedslot.ops._torch's.
_LIMITS = (INCR_MARGIN * INCR_U, INCR_ABS, INCR_C_MIN, INCR_C_MAX, INCR_R_MAX)


@njit(inline="always")
def _mix32(x):
    """lowbias32 on a uint32 value held in an int64 (products wrap modulo 2**64: the low 32 bits
    are uint32's)."""
    x ^= x >> 16
    x = (x * _M1) & _MASK
    x ^= x >> 15
    x = (x * _M2) & _MASK
    return x ^ (x >> 16)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _incremental_greedy(drift, factor, lo, hi, sel, val, cand_key, cand_keys, step, score_key, score_keys, bound,
                        offset, per_conn, limits):
    c = factor[()]
    if not (limits[2] <= c <= limits[3]):
        return -2
    w = np.empty(cand_keys.shape[0], np.float32)
    s0 = np.empty(cand_keys.shape[0], np.float32)
    # a' = A * fl(1/c): two roundings, within the 3u the proof in seedslot.ops._torch allows for fl(A / c)
    inv = np.float32(1.0) / c
    sigma = np.float64(step[()]) * 2.0**23
    stale, n = 0, drift.shape[0]
    for start in range(0, n, _BLOCK):
        end = min(start + _BLOCK, n)
        x, l, h = drift[start:end], lo[start:end], hi[start:end]
        out = 0
        for i in range(end - start):  # branch-free, over slices from 0: LLVM vectorises it
            a = x[i] * inv
            out += 1 - ((l[i] < a) & (a < h[i]))  # NaN: 1, stale
        if out:
            got = _reselect_block(drift, start, end, inv, c, lo, hi, sel, val, offset, per_conn, cand_key[()],
                                  cand_keys, step[()], score_key[()], score_keys, bound[()], w, s0, sigma, limits)
            if got < 0:
                return -1
            stale += got
    return stale


@njit(nogil=True, boundscheck=False, error_model="numpy")
def _reselect_block(drift, start, end, inv, c, lo, hi, sel, val, offset, per_conn, cand_key, cand_keys, step,
                    score_key, score_keys, bound, w, s0, sigma, limits):
    """Re-select the stale connections of drift[start:end] (see seedslot.ops._torch's proof): how many,
    or -1 at a non-finite drift."""
    k = cand_keys.shape[0]
    b, cd = np.float64(bound), np.float64(c)
    cand_key, score_key = np.int64(cand_key) & _MASK, np.int64(score_key) & _MASK
    stale = 0
    for i in range(start, end):
        a = drift[i] * inv
        if lo[i] < a and a < hi[i]:
            continue
        d = drift[i]
        if not np.isfinite(d):
            return -1  # the caller recomputes the part; the rows written so far are right
        stale += 1
        conn = (offset + i) & _MASK
        hc = _mix32((conn * per_conn) ^ cand_key)
        hs = _mix32(conn ^ score_key)
        best_j, best = 0, np.float32(0.0)
        for j in range(k):  # implicit_select_at's scores, fl(fl(c * s0) - fl(A * W)); the first maximum
            w[j] = np.float32((_mix32(hc ^ (np.int64(cand_keys[j]) & _MASK)) >> 8) - (1 << 23)) * step
            s0[j] = (np.float32(_mix32(hs ^ (np.int64(score_keys[j]) & _MASK)) >> 8) * np.float32(2.0**-24)) * bound
            s = c * s0[j] - d * w[j]
            if j == 0 or s > best:
                best_j, best = j, s
        # implicit_select_at's interval, in float64
        a0 = np.float64(d) / cd
        win = max(abs(a0), b / sigma)
        r = abs(a0) + win
        m = limits[0] * (b + r * sigma) + limits[1]
        up, down, flat = np.inf, -np.inf, False
        si, wi = np.float64(s0[best_j]), np.float64(w[best_j])
        for j in range(k):
            if j != best_j:
                ds, dw = si - np.float64(s0[j]), wi - np.float64(w[j])
                if dw > 0:
                    up = min(up, (ds - m) / dw)
                elif dw < 0:
                    down = max(down, (ds - m) / dw)
                elif not ds > m:
                    flat = True  # a gap that no a can open
        up, down = min(up, a0 + win), max(down, a0 - win)
        sel[i], val[i] = best_j, w[best_j]
        if flat or not r <= limits[4]:
            lo[i], hi[i] = np.float32(np.inf), np.float32(-np.inf)
            continue
        lo32, hi32 = np.float32(down), np.float32(up)  # rounded inwards: lo up, hi down
        if np.float64(lo32) < down:
            lo32 = np.nextafter(lo32, np.float32(np.inf))
        if np.float64(hi32) > up:
            hi32 = np.nextafter(hi32, np.float32(-np.inf))
        lo[i], hi[i] = lo32, hi32
    return stale


# drift tensor -> (the call's other tensors, the data pointers of all, their numpy views): the views
# are made once. Not the drift itself in the value: it would keep its own key alive.
_VIEWS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _views(tensors: tuple) -> tuple | None:
    """numpy views of ``tensors`` (made once per drift and reused while no tensor was replaced), or
    None when one is not contiguous (a view would be a copy)."""
    got = _VIEWS.get(tensors[0])
    ptrs = tuple(t.data_ptr() for t in tensors)
    if got is not None and got[1] == ptrs and all(a is b for a, b in zip(got[0], tensors[1:])):
        return got[2]
    if not all(t.is_contiguous() for t in tensors):
        return None
    arrays = tuple(t.detach().view(-1).numpy() if t.dim() else t.detach().numpy() for t in tensors)
    _VIEWS[tensors[0]] = (tensors[1:], ptrs, arrays)
    return arrays


def incremental_greedy(drift: torch.Tensor, factor: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                       sel: torch.Tensor, val: torch.Tensor, cand_key: torch.Tensor, cand_keys: torch.Tensor,
                       step: torch.Tensor, score_key: torch.Tensor, score_keys: torch.Tensor, bound: torch.Tensor,
                       offset: int, per_conn: int) -> int:
    """Re-select, into ``sel``, ``val``, ``lo`` and ``hi`` (in place), every connection of a part
    whose ratio ``drift / factor`` is not strictly inside its interval: how many were, or < 0 when
    the part must be recomputed in full instead (-1: a drift to re-select is not finite; -2: the
    factor is outside [INCR_C_MIN, INCR_C_MAX]; -3: a tensor is not contiguous). CPU tensors; keys,
    step and bound as :mod:`seedslot.ops._torch`'s kernels take them (0-dim int32 and fp32, (K,) int32)."""
    arrays = _views((drift, factor, lo, hi, sel, val, cand_key, cand_keys, step, score_key, score_keys, bound))
    if arrays is None:
        return -3
    got = int(_incremental_greedy(*arrays, offset, per_conn, _LIMITS))
    if got:  # writes through numpy bump no version counter: autograd must see them as torch's would
        increment_version((sel, val, lo, hi))
    return got
