"""Triton kernels for the CUDA hot paths, bit-exact twins of the fused torch functions.

What runs where. Every hot operation is a custom op of :mod:`seedslot.ops`. Its CPU kernel is
a pure torch function of :mod:`seedslot.ops._torch` (eager, or fused by ``torch.compile``); its
CUDA kernel (with ``triton`` installed, and ``SEEDSLOT_TRITON`` not ``0``) the wrapper of the same
name here, which launches one hand-written ``@triton.jit`` kernel over the whole tensor it is given,
with exactly the signature and result of the torch function:

=========================================  ===================================================
torch function (ops._torch)                 Triton wrapper
=========================================  ===================================================
``candidate_chunk``                        :func:`candidate_chunk`
``selected_chunk``                         :func:`selected_chunk`
``int8_update_rows/unrolled``              :func:`int8_update` (one kernel for any K)
``fp32_update_chunk``                      :func:`fp32_update_chunk`
``requantize_chunk``                       :func:`requantize_chunk`, in place :func:`requantize_rows_`
                                           (the ``requantize`` op's CUDA kernel)
``implicit_chunk``                         :func:`implicit_chunk`
``implicit_greedy_unrolled``               :func:`implicit_greedy` (the ``implicit_greedy`` op's
                                           CUDA kernel for every K)
``packed_argmax``, ``argmax_rows``         :func:`packed_argmax`, :func:`greedy`
``sample_chunk``                           :func:`sample_chunk`
requantize then ``int8_update``, per part  :func:`int8_update_group` (many parts, in place)
decay then ``fp32_update_chunk``, per part :func:`fp32_update_group` (many parts, in place)
=========================================  ===================================================

The group kernels take a list of layer parts as one device table (an int64 row per part: the
addresses of its scores and keys, its rows, K, offsets), made once per distinct list and cached,
and a flat grid of row blocks; each program finds its part by a binary search of the cumulative
block counts. Parts are launched together by column tile width, so a step launches each at most
seven times whatever the number of layers.

Each kernel loops over the K candidates of a block of connections in column tiles of at most
``MAX_BLOCK_K`` (K is a runtime value: no padding of K to a power of two, one compiled kernel per
tile width). Maxima carry across tiles with a strict ``>``, so ties go to the lowest index as with
``torch.argmax``; the int8 update makes two passes over the tiles when K spans more than one (the
first finds each connection's top level, the second re-centres, clips and stores).

Why CI's result holds for the GPU. CI has no GPU: it runs these same ``@triton.jit`` functions in
Triton's interpreter (``TRITON_INTERPRET=1``, numpy on CPU tensors) and compares them bit for bit
with the eager torch path and the numpy reference. The interpreter executes the kernel's own
operations with Triton's typing rules, so what it checks is the program the GPU compiles: the hash
in ``tl.uint32`` (products wrap modulo 2**32, right shifts of unsigned values are logical, exactly
the masked int32 code of :mod:`seedslot.rng`), integer-to-float conversions of at most 24 bits
(exact), and each float operation in the torch code's order. Every float operation here is an
IEEE-754 ``+``, ``-``, ``*``, ``floor``, ``min`` or ``max`` in fp32, which the GPU rounds exactly as
the CPU does, with one exception the interpreter cannot see: a GPU compiler may contract
``a * b + c`` into one fused multiply-add, rounded once instead of twice. numpy never fuses, so no
interpreted test could catch it; the only protection is that every launch passes
``enable_fp_fusion=False``. Do not remove it.

The Gumbel draw. ``sample_chunk`` needs ``-log(-log(u))``, and ``log`` is not correctly rounded
anywhere: torch on CPU (SLEEF, or the C library for a vector's tail), numpy (the interpreter) and
CUDA's libdevice each stay within about one ulp of the true value and disagree with one another on
a fifth of all fp32 inputs. On the GPU the kernel uses libdevice's ``log`` (``__nv_logf``,
documented max error 1 ulp) rather than ``tl.log``, whose lowering is the backend's choice; the
interpreter, which has no libdevice, uses ``tl.log`` (numpy). The GPU's noise ``-log(-log(u))``
can therefore differ from torch CPU's by an ulp or so for some of the 2**24 possible uniforms, and
a sampled index can differ from the CPU path's only where the two largest perturbed scores of a
connection lie within a few ulp of each other, a draw that was a coin toss at fp32 precision
anyway. ``tests/test_triton_kernels.py`` asserts exactly that:
equal indices, except where the perturbed scores at the two indices are within
``GUMBEL_TOLERANCE`` (2**-18 ~ 3.8e-6, relative to max(1, |score|)). Everything else is bit-exact.
"""

from __future__ import annotations

import torch

try:  # the package works without triton: every path then runs as torch
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

__all__ = [
    "available", "candidate_chunk", "selected_chunk", "int8_update", "fp32_update_chunk", "requantize_chunk",
    "requantize_rows_", "int8_update_group", "fp32_update_group", "implicit_chunk", "implicit_greedy", "packed_argmax",
    "greedy", "sample_chunk",
]

# Column tiles hold at most this many candidates, and a program about TILE values.
MAX_BLOCK_K = 64
TILE = 2048
BLOCK_1D = 1024
NUM_WARPS = 4
# Sampled indices may differ from the CPU path where the top two perturbed scores are this close
# (relative to max(1, |score|)): a few ulp of the Gumbel noise, see the module docstring.
GUMBEL_TOLERANCE = 2.0**-18


def available() -> bool:
    """Whether triton is importable (the kernels below can run)."""
    return triton is not None


def interpreted() -> bool:
    """Whether ``@triton.jit`` kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when this
    module was imported): no libdevice there, see the module docstring."""
    return triton is not None and not isinstance(_candidates_kernel, triton.runtime.JITFunction)


if triton is not None:

    # ------------------------------------------------------------ the random function, in uint32

    @triton.jit
    def _mix32(x):
        """lowbias32 on uint32: products wrap modulo 2**32, shifts of unsigned values are logical."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _noise_round(x):
        x = x * 0x7FEB352D
        return x ^ (x >> 15)

    @triton.jit
    def _u32(p):
        """Load an int32 (a key, a start) and reinterpret it as uint32."""
        return tl.load(p).to(tl.uint32, bitcast=True)

    @triton.jit
    def _signed24(h):
        """rng.signed24 as fp32: the top 24 bits minus 2**23 (exact)."""
        return ((h >> 8).to(tl.int32, bitcast=True) - 8388608).to(tl.float32)

    @triton.jit
    def _unit24(h):
        """rng.unit24: the top 24 bits times 2**-24 (exact)."""
        return (h >> 8).to(tl.int32, bitcast=True).to(tl.float32) * 5.9604644775390625e-08

    @triton.jit
    def _conn(start, rows, per_conn):
        """candidates.connections in uint32: (start + i) * per_conn wraps as int32 does."""
        return (start + rows.to(tl.uint32)) * per_conn

    @triton.jit
    def _order_key(x):
        """fp32 -> int32 that orders as torch.argmax compares: -0.0 equals 0.0, NaN above +inf."""
        b = x.to(tl.int32, bitcast=True)
        b = tl.where(x == 0.0, 0, b ^ ((b >> 31) & 0x7FFFFFFF))
        return tl.where(x != x, 0x7FFFFFFF, b)

    @triton.jit
    def _tile_argmax(key, cols, mask, best, idx):
        """Fold a (BLOCK_N, BLOCK_K) tile of int32 keys into the running (best, idx): the lowest
        column holding the tile's maximum, taken only if strictly above the running best."""
        key = tl.where(mask, key, -2147483648)  # below every real key
        top = tl.max(key, axis=1)
        first = tl.min(tl.where(key == top[:, None], cols[None, :], 2147483647), axis=1)
        better = top > best
        return tl.where(better, top, best), tl.where(better, first, idx)

    # ------------------------------------------------------------ candidates

    @triton.jit
    def _candidate_tile(cols, K, rmask, hc, keys_b_p, step):
        """The candidates of one tile (rows of per-connection hashes ``hc``, columns ``cols``) and its mask."""
        cmask = cols < K
        kb = tl.load(keys_b_p + cols, mask=cmask, other=0).to(tl.uint32, bitcast=True)
        return _signed24(_mix32(hc[:, None] ^ kb[None, :])) * step, rmask[:, None] & cmask[None, :]

    @triton.jit
    def _candidates_kernel(out, start_p, n, K, per_conn, key_a_p, keys_b_p, step_p,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        hc = _mix32(_conn(_u32(start_p), rows, per_conn) ^ _u32(key_a_p))
        step = tl.load(step_p)
        base = rows.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w, mask = _candidate_tile(cols, K, rmask, hc, keys_b_p, step)
            tl.store(out + base[:, None] + cols[None, :], w, mask=mask)

    @triton.jit
    def _selected_kernel(out, idx_p, start_p, n, per_conn, key_a_p, keys_b_p, step_p, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < n
        j = tl.load(idx_p + rows, mask=rmask, other=0)
        kb = tl.load(keys_b_p + j, mask=rmask, other=0).to(tl.uint32, bitcast=True)
        hc = _mix32(_conn(_u32(start_p), rows, per_conn) ^ _u32(key_a_p))
        tl.store(out + rows, _signed24(_mix32(hc ^ kb)) * tl.load(step_p), mask=rmask)

    # ------------------------------------------------------------ score updates

    @triton.jit
    def _int8_levels(q_p, q_s0, q_s1, rows, rmask, cols, K, hc, hr, dc, keys_b_p, round_b_p, step):
        """floor(q + dc * W + r) of one tile, as scores.int8_update_rows (same order, no FMA)."""
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        kb = tl.load(keys_b_p + cols, mask=cmask, other=0).to(tl.uint32, bitcast=True)
        rb = tl.load(round_b_p + cols, mask=cmask, other=0).to(tl.uint32, bitcast=True)
        w = _signed24(_mix32(hc[:, None] ^ kb[None, :])) * step
        r = _unit24(_noise_round(hr[:, None] ^ rb[None, :]))
        offs = rows.to(tl.int64)[:, None] * q_s0 + cols.to(tl.int64)[None, :] * q_s1
        q = tl.load(q_p + offs, mask=mask, other=0).to(tl.float32)
        return tl.floor(q + dc[:, None] * w + r), mask

    @triton.jit
    def _int8_update_kernel(out, q_p, q_s0, q_s1, d_p, coef_p, start_p, n, K, per_conn, key_a_p, keys_b_p, step_p,
                            round_a_p, round_b_p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        start = _u32(start_p)
        hc = _mix32(_conn(start, rows, per_conn) ^ _u32(key_a_p))
        hr = _mix32(_conn(start, rows, 1) ^ _u32(round_a_p))
        dc = tl.load(d_p + rows, mask=rmask, other=0.0) * tl.load(coef_p)
        step = tl.load(step_p)
        base = rows.to(tl.int64) * K
        if BLOCK_K >= K:  # one tile: keep the levels, no second pass
            cols = tl.arange(0, BLOCK_K)
            t, mask = _int8_levels(q_p, q_s0, q_s1, rows, rmask, cols, K, hc, hr, dc, keys_b_p, round_b_p, step)
            top = tl.max(tl.where(mask, t, float("-inf")), axis=1)
            shift = tl.maximum(top - 127.0, 0.0)  # re-centre: the top level is at most 127
            v = tl.minimum(tl.maximum(t - shift[:, None], -128.0), 127.0)
            tl.store(out + base[:, None] + cols[None, :], v.to(tl.int8), mask=mask)
        else:  # pass 1: each connection's top level; pass 2: the same levels again, shifted
            top = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                t, mask = _int8_levels(q_p, q_s0, q_s1, rows, rmask, cols, K, hc, hr, dc, keys_b_p, round_b_p, step)
                top = tl.maximum(top, tl.max(tl.where(mask, t, float("-inf")), axis=1))
            shift = tl.maximum(top - 127.0, 0.0)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                t, mask = _int8_levels(q_p, q_s0, q_s1, rows, rmask, cols, K, hc, hr, dc, keys_b_p, round_b_p, step)
                v = tl.minimum(tl.maximum(t - shift[:, None], -128.0), 127.0)
                tl.store(out + base[:, None] + cols[None, :], v.to(tl.int8), mask=mask)

    @triton.jit
    def _fp32_update_kernel(out, s_p, s_s0, s_s1, d_p, neg_lr_p, start_p, n, K, per_conn, key_a_p, keys_b_p, step_p,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        hc = _mix32(_conn(_u32(start_p), rows, per_conn) ^ _u32(key_a_p))
        dl = tl.load(d_p + rows, mask=rmask, other=0.0) * tl.load(neg_lr_p)
        step = tl.load(step_p)
        base = rows.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w, mask = _candidate_tile(cols, K, rmask, hc, keys_b_p, step)
            s = tl.load(s_p + rows.to(tl.int64)[:, None] * s_s0 + cols.to(tl.int64)[None, :] * s_s1, mask=mask)
            tl.store(out + base[:, None] + cols[None, :], s + dl[:, None] * w, mask=mask)

    @triton.jit
    def _requantize_kernel(q_p, inv_p, start_p, n, K, round_a_p, round_b_p,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """In place, on contiguous (n, K) levels; at factor 1 (``inv == 1``) nothing is read or written."""
        inv = tl.load(inv_p)
        if inv != 1.0:
            rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            rmask = rows < n
            hr = _mix32(_conn(_u32(start_p), rows, 1) ^ _u32(round_a_p))
            base = rows.to(tl.int64) * K
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                cmask = cols < K
                mask = rmask[:, None] & cmask[None, :]
                rb = tl.load(round_b_p + cols, mask=cmask, other=0).to(tl.uint32, bitcast=True)
                r = _unit24(_noise_round(hr[:, None] ^ rb[None, :]))
                at = q_p + base[:, None] + cols[None, :]
                q = tl.load(at, mask=mask, other=0).to(tl.float32)
                v = tl.minimum(tl.maximum(tl.floor(q * inv + r), -128.0), 127.0)
                tl.store(at, v.to(tl.int8), mask=mask)

    # ------------------------------------------------------------ score updates of many parts

    @triton.jit
    def _group_part(table_p, blocks_p, n_parts, LOG_PARTS: tl.constexpr):
        """This program's part (the address of its row of the table) and block of rows in it: the
        last part whose first block (``blocks_p``, cumulative, n_parts + 1 values from 0) is at
        most the program id, by binary search (invariant: blocks[lo] <= pid < blocks[hi])."""
        pid = tl.program_id(0)
        lo = pid * 0
        hi = lo + n_parts
        for _ in tl.static_range(LOG_PARTS):
            mid = (lo + hi) // 2
            go = tl.load(blocks_p + mid) <= pid
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        return table_p + lo * 11, pid - tl.load(blocks_p + lo)

    @triton.jit
    def _group_levels(q_p, rows, rmask, cols, K, hc, hr, hq, dc, inv, zero, keys_b_p, round_b_p, step,
                      ZERO: tl.constexpr):
        """:func:`_int8_levels` after the part's requantize (levels zeroed first where ``zero``, as
        the storage's weight decay does below the fp32 range): the levels requantize_ would store,
        kept in registers (integers in [-128, 127], so the int8 round trip changes nothing)."""
        cmask = cols < K
        mask = rmask[:, None] & cmask[None, :]
        kb = tl.load(keys_b_p + cols, mask=cmask, other=0).to(tl.uint32, bitcast=True)
        rb = tl.load(round_b_p + cols, mask=cmask, other=0).to(tl.uint32, bitcast=True)
        q = tl.load(q_p + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0).to(tl.float32)
        if ZERO:
            q = tl.where(zero, 0.0, q)
        if inv != 1.0:  # a coarser grid (rare): the levels are left as they are at factor 1
            rq = _unit24(_noise_round(hq[:, None] ^ rb[None, :]))
            q = tl.minimum(tl.maximum(tl.floor(q * inv + rq), -128.0), 127.0)
        w = _signed24(_mix32(hc[:, None] ^ kb[None, :])) * step
        r = _unit24(_noise_round(hr[:, None] ^ rb[None, :]))
        return tl.floor(q + dc[:, None] * w + r), mask

    @triton.jit
    def _int8_group_kernel(table_p, blocks_p, n_parts, d_p, coef_p, inv_p, zero_p, requant_p, round_p,
                           LOG_PARTS: tl.constexpr, ZERO: tl.constexpr, ONE_TILE: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """requantize_rows_ then the int8 update, in place, of a block of rows of one part of a packed
        list (see :func:`int8_update_group`); per part, the values of index ``i`` of the vectors."""
        row, block = _group_part(table_p, blocks_p, n_parts, LOG_PARTS)
        q_p = tl.load(row).to(tl.pointer_type(tl.int8))
        key_a_p = tl.load(row + 1).to(tl.pointer_type(tl.int32))
        keys_b_p = tl.load(row + 2).to(tl.pointer_type(tl.int32))
        step_p = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        round_b_p = tl.load(row + 4).to(tl.pointer_type(tl.int32))
        n, start = tl.load(row + 5), tl.load(row + 6).to(tl.int32).to(tl.uint32, bitcast=True)
        per_conn, K = tl.load(row + 7).to(tl.uint32), tl.load(row + 8).to(tl.int32)
        d_off, i = tl.load(row + 9), tl.load(row + 10)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        hc = _mix32(_conn(start, rows, per_conn) ^ _u32(key_a_p))
        hr = _mix32(_conn(start, rows, 1) ^ _u32(round_p + i))
        hq = _mix32(_conn(start, rows, 1) ^ _u32(requant_p + i))
        dc = tl.load(d_p + d_off + rows, mask=rmask, other=0.0) * tl.load(coef_p + i)
        inv = tl.load(inv_p + i)
        zero = tl.load(zero_p + i) != 0
        step = tl.load(step_p)
        base = rows.to(tl.int64) * K
        if ONE_TILE:  # every part of this launch has K <= BLOCK_K
            cols = tl.arange(0, BLOCK_K)
            t, mask = _group_levels(q_p, rows, rmask, cols, K, hc, hr, hq, dc, inv, zero, keys_b_p, round_b_p, step,
                                    ZERO)
            top = tl.max(tl.where(mask, t, float("-inf")), axis=1)
            shift = tl.maximum(top - 127.0, 0.0)
            v = tl.minimum(tl.maximum(t - shift[:, None], -128.0), 127.0)
            tl.store(q_p + base[:, None] + cols[None, :], v.to(tl.int8), mask=mask)
        else:  # as _int8_update_kernel's two passes; a row's tiles are read before it writes them
            top = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                t, mask = _group_levels(q_p, rows, rmask, cols, K, hc, hr, hq, dc, inv, zero, keys_b_p, round_b_p,
                                        step, ZERO)
                top = tl.maximum(top, tl.max(tl.where(mask, t, float("-inf")), axis=1))
            shift = tl.maximum(top - 127.0, 0.0)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                t, mask = _group_levels(q_p, rows, rmask, cols, K, hc, hr, hq, dc, inv, zero, keys_b_p, round_b_p,
                                        step, ZERO)
                v = tl.minimum(tl.maximum(t - shift[:, None], -128.0), 127.0)
                tl.store(q_p + base[:, None] + cols[None, :], v.to(tl.int8), mask=mask)

    @triton.jit
    def _fp32_group_kernel(table_p, blocks_p, n_parts, d_p, neg_lr_p, decay_p, LOG_PARTS: tl.constexpr,
                           DECAY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The fp32 update, in place, of a block of rows of one part of a packed list, each score
        first multiplied by ``decay`` (rounded on its own: no FMA, as two torch ops)."""
        row, block = _group_part(table_p, blocks_p, n_parts, LOG_PARTS)
        s_p = tl.load(row).to(tl.pointer_type(tl.float32))
        key_a_p = tl.load(row + 1).to(tl.pointer_type(tl.int32))
        keys_b_p = tl.load(row + 2).to(tl.pointer_type(tl.int32))
        step_p = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        n, start = tl.load(row + 5), tl.load(row + 6).to(tl.int32).to(tl.uint32, bitcast=True)
        per_conn, K = tl.load(row + 7).to(tl.uint32), tl.load(row + 8).to(tl.int32)
        d_off = tl.load(row + 9)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        hc = _mix32(_conn(start, rows, per_conn) ^ _u32(key_a_p))
        dl = tl.load(d_p + d_off + rows, mask=rmask, other=0.0) * tl.load(neg_lr_p)
        step = tl.load(step_p)
        base = rows.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            w, mask = _candidate_tile(cols, K, rmask, hc, keys_b_p, step)
            at = s_p + base[:, None] + cols[None, :]
            s = tl.load(at, mask=mask)
            if DECAY:
                s = s * tl.load(decay_p)
            tl.store(at, s + dl[:, None] * w, mask=mask)

    # ------------------------------------------------------------ implicit scores

    @triton.jit
    def _implicit_scores(cols, K, hc, hs, drift, factor, bound, cand_keys_p, score_keys_p, step):
        """c * (unit24 * bound) - A * W of one tile, as scores.implicit_chunk (same order, no FMA)."""
        cmask = cols < K
        kb = tl.load(cand_keys_p + cols, mask=cmask, other=0).to(tl.uint32, bitcast=True)
        sb = tl.load(score_keys_p + cols, mask=cmask, other=0).to(tl.uint32, bitcast=True)
        w = _signed24(_mix32(hc[:, None] ^ kb[None, :])) * step
        s0 = _unit24(_mix32(hs[:, None] ^ sb[None, :])) * bound
        return factor * s0 - drift[:, None] * w, cmask

    @triton.jit
    def _implicit_kernel(out, drift_p, factor_p, start_p, n, K, per_conn, cand_key_p, cand_keys_p, step_p,
                         score_key_p, score_keys_p, bound_p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        start = _u32(start_p)
        hc = _mix32(_conn(start, rows, per_conn) ^ _u32(cand_key_p))
        hs = _mix32(_conn(start, rows, 1) ^ _u32(score_key_p))
        drift = tl.load(drift_p + rows, mask=rmask, other=0.0)
        factor, bound, step = tl.load(factor_p), tl.load(bound_p), tl.load(step_p)
        base = rows.to(tl.int64) * K
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            s, cmask = _implicit_scores(cols, K, hc, hs, drift, factor, bound, cand_keys_p, score_keys_p, step)
            tl.store(out + base[:, None] + cols[None, :], s, mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _implicit_greedy_kernel(idx_out, value_out, drift_p, factor_p, start_p, n, K, per_conn, cand_key_p,
                                cand_keys_p, step_p, score_key_p, score_keys_p, bound_p,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        start = _u32(start_p)
        hc = _mix32(_conn(start, rows, per_conn) ^ _u32(cand_key_p))
        hs = _mix32(_conn(start, rows, 1) ^ _u32(score_key_p))
        drift = tl.load(drift_p + rows, mask=rmask, other=0.0)
        factor, bound, step = tl.load(factor_p), tl.load(bound_p), tl.load(step_p)
        best = tl.full((BLOCK_N,), -2147483648, tl.int32)
        idx = tl.zeros((BLOCK_N,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            s, cmask = _implicit_scores(cols, K, hc, hs, drift, factor, bound, cand_keys_p, score_keys_p, step)
            best, idx = _tile_argmax(_order_key(s), cols, cmask[None, :], best, idx)
        kb = tl.load(cand_keys_p + idx, mask=rmask, other=0).to(tl.uint32, bitcast=True)
        tl.store(idx_out + rows, idx.to(tl.int64), mask=rmask)
        tl.store(value_out + rows, _signed24(_mix32(hc ^ kb)) * step, mask=rmask)  # as selected_chunk

    # ------------------------------------------------------------ selection

    @triton.jit
    def _argmax_kernel(idx_out, s_p, s_s0, s_s1, n, K, IS_FLOAT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        best = tl.full((BLOCK_N,), -2147483648, tl.int32)
        idx = tl.zeros((BLOCK_N,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = rmask[:, None] & (cols < K)[None, :]
            s = tl.load(s_p + rows.to(tl.int64)[:, None] * s_s0 + cols.to(tl.int64)[None, :] * s_s1, mask=mask,
                        other=0)
            key = _order_key(s) if IS_FLOAT else s.to(tl.int32)
            best, idx = _tile_argmax(key, cols, mask, best, idx)
        tl.store(idx_out + rows, idx.to(tl.int64), mask=rmask)

    @triton.jit
    def _sample_kernel(idx_out, s_p, s_s0, s_s1, scale_p, start_p, n, K, key_a_p, keys_b_p,
                       LIBDEVICE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        hc = _mix32(_conn(_u32(start_p), rows, 1) ^ _u32(key_a_p))
        scale = tl.load(scale_p)
        best = tl.full((BLOCK_N,), -2147483648, tl.int32)
        idx = tl.zeros((BLOCK_N,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            mask = rmask[:, None] & cmask[None, :]
            kb = tl.load(keys_b_p + cols, mask=cmask, other=0).to(tl.uint32, bitcast=True)
            h = _mix32(hc[:, None] ^ kb[None, :])
            u = ((h >> 8).to(tl.int32, bitcast=True).to(tl.float32) + 0.5) * 5.9604644775390625e-08
            if LIBDEVICE:  # the most accurate log on the GPU (1 ulp); the interpreter has numpy's
                g = -libdevice.log(-libdevice.log(u))
            else:
                g = -tl.log(-tl.log(u))
            s = tl.load(s_p + rows.to(tl.int64)[:, None] * s_s0 + cols.to(tl.int64)[None, :] * s_s1, mask=mask,
                        other=0).to(tl.float32)
            best, idx = _tile_argmax(_order_key(s * scale + g), cols, mask, best, idx)
        tl.store(idx_out + rows, idx.to(tl.int64), mask=rmask)


# ---------------------------------------------------------------- wrappers (the torch signatures)


def _need() -> None:
    if triton is None:
        raise RuntimeError("seedslot: the Triton kernels need triton (pip install 'seedslot[gpu]')")


def _blocks(k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): a column tile of the next power of two >= K (at most MAX_BLOCK_K)."""
    bk = min(triton.next_power_of_2(max(k, 1)), MAX_BLOCK_K)
    return max(1, TILE // bk), bk


def _scalar(x, dtype: torch.dtype, device) -> torch.Tensor:
    """A 0-dim tensor of ``dtype`` on ``device`` (kernels load keys, offsets and rates from memory:
    no host sync, no recompilation for a new value)."""
    if isinstance(x, torch.Tensor):
        if x.dtype != dtype:
            x = x.to(dtype)
        return x.to(device) if x.device != device else x
    return torch.full((), x, dtype=dtype, device=device)  # a fill kernel on CUDA: no blocking copy


def _launch(kernel, n: int, block_n: int, device, *args, **meta) -> None:
    grid = (triton.cdiv(n, block_n),)
    # enable_fp_fusion=False: no a * b + c may become an FMA; the interpreter never fuses, so only
    # this flag keeps the GPU's rounding equal to what CI checks (see the module docstring).
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, num_warps=NUM_WARPS, enable_fp_fusion=False, **meta)
    else:
        kernel[grid](*args, num_warps=NUM_WARPS, enable_fp_fusion=False, **meta)


def _rows_out(kernel, n: int, k: int, dtype: torch.dtype, dev, *args) -> torch.Tensor:
    """A new (n, k) ``dtype`` tensor filled by ``kernel(out, *args)`` over blocks of rows."""
    _need()
    out = torch.empty(n, k, dtype=dtype, device=dev)
    if n and k:
        bn, bk = _blocks(k)
        _launch(kernel, n, bn, dev, out, *args, BLOCK_N=bn, BLOCK_K=bk)
    return out


def candidate_chunk(start, n: int, per_conn: int, key_a, keys_b, step) -> torch.Tensor:
    """:func:`seedslot.ops._torch.candidate_chunk` as a Triton kernel."""
    dev, k = keys_b.device, keys_b.shape[0]
    return _rows_out(_candidates_kernel, n, k, torch.float32, dev, _scalar(start, torch.int32, dev), n, k, per_conn,
                     _scalar(key_a, torch.int32, dev), keys_b.contiguous(), _scalar(step, torch.float32, dev))


def selected_chunk(idx, start, per_conn: int, key_a, keys_b, step) -> torch.Tensor:
    """:func:`seedslot.ops._torch.selected_chunk` as a Triton kernel."""
    _need()
    dev, n = keys_b.device, idx.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=dev)
    if n:
        _launch(_selected_kernel, n, BLOCK_1D, dev, out, idx.contiguous(), _scalar(start, torch.int32, dev), n,
                per_conn, _scalar(key_a, torch.int32, dev), keys_b.contiguous(), _scalar(step, torch.float32, dev),
                BLOCK=BLOCK_1D)
    return out


def int8_update(q, d, coef, start, per_conn: int, key_a, keys_b, step, round_a, round_b) -> torch.Tensor:
    """:func:`seedslot.ops._torch.int8_update_rows` (and ``_unrolled``: the same bits) as one Triton
    kernel for any K."""
    (n, k), dev = q.shape, q.device
    return _rows_out(_int8_update_kernel, n, k, torch.int8, dev, q, q.stride(0), q.stride(1), d.contiguous(),
                     _scalar(coef, torch.float32, dev), _scalar(start, torch.int32, dev), n, k, per_conn,
                     _scalar(key_a, torch.int32, dev), keys_b.contiguous(), _scalar(step, torch.float32, dev),
                     _scalar(round_a, torch.int32, dev), round_b.contiguous())


def fp32_update_chunk(s, d, neg_lr, start, per_conn: int, key_a, keys_b, step) -> torch.Tensor:
    """:func:`seedslot.ops._torch.fp32_update_chunk` as a Triton kernel."""
    (n, k), dev = s.shape, s.device
    return _rows_out(_fp32_update_kernel, n, k, torch.float32, dev, s, s.stride(0), s.stride(1), d.contiguous(),
                     _scalar(neg_lr, torch.float32, dev), _scalar(start, torch.int32, dev), n, k, per_conn,
                     _scalar(key_a, torch.int32, dev), keys_b.contiguous(), _scalar(step, torch.float32, dev))


def requantize_chunk(q, inv_factor, start, round_a, round_b) -> torch.Tensor:
    """:func:`seedslot.ops._torch.requantize_chunk` as a Triton kernel (:func:`requantize_rows_` on a copy)."""
    out = q.contiguous().clone()
    requantize_rows_(out, inv_factor, start, round_a, round_b)
    return out


def requantize_rows_(q, inv_factor, start, round_a, round_b) -> None:
    """:func:`requantize_chunk` in place on contiguous levels: one launch that does nothing at factor 1."""
    _need()
    (n, k), dev = q.shape, q.device
    if n and k:
        bn, bk = _blocks(k)
        _launch(_requantize_kernel, n, bn, dev, q, _scalar(inv_factor, torch.float32, dev),
                _scalar(start, torch.int32, dev), n, k, _scalar(round_a, torch.int32, dev), round_b.contiguous(),
                BLOCK_N=bn, BLOCK_K=bk)


# A part's row of the packed tables of the group updates: the addresses of its scores, candidate
# key_a, keys_b, grid step and rounding keys_b, then its rows, first connection, per_conn, K, first
# direction in the concatenated directions and index in the per-part vectors.
_FIELDS = 11
_TABLES: dict = {}  # (rows of the table, BLOCK_N, device) -> (table, blocks, programs)


def _part_table(fields: tuple, block_n: int, dev) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The device table of ``fields`` (one row per part) and its cumulative block counts, made once
    per distinct list: a step finds the same tensors (what a CUDA graph replays) and copies nothing
    to the device. Keyed by every value it holds, so a moved or replaced tensor makes a new one."""
    key = (fields, block_n, dev)
    got = _TABLES.get(key)
    if got is None:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        blocks = [0]
        for f in fields:
            blocks.append(blocks[-1] + triton.cdiv(f[5], block_n))
        got = _TABLES[key] = (torch.tensor(fields, dtype=torch.int64, device=dev),
                              torch.tensor(blocks, dtype=torch.int32, device=dev), blocks[-1])
    return got


def _groups(scores, offsets, per_conn, key_a, keys_b, step, round_b):
    """The parts' table rows grouped by column tile width (a launch each): ``(fields, BLOCK_N,
    BLOCK_K, one tile)``. Parts with no values are left out."""
    by_tile: dict = {}
    d_off = 0
    for i, s in enumerate(scores):
        n, k = s.shape
        if n and k:
            rb = round_b[i].data_ptr() if round_b is not None else 0
            by_tile.setdefault(_blocks(k), []).append(
                (s.data_ptr(), key_a[i].data_ptr(), keys_b[i].data_ptr(), step[i].data_ptr(), rb, n, offsets[i],
                 per_conn[i], k, d_off, i))
        d_off += n
    return [(tuple(rows), bn, bk, all(r[8] <= bk for r in rows)) for (bn, bk), rows in by_tile.items()]


def _log_parts(n: int) -> int:
    return max(1, (n - 1).bit_length())


def int8_update_group(q, d, coef, inv, zero, requant_keys, round_keys, offsets, per_conn, key_a, keys_b, step,
                      round_b) -> None:
    """:func:`requantize_rows_` then :func:`int8_update` of every part, in place, by one launch per
    column tile width (at most 7, whatever the number of parts): ``q`` the parts' contiguous (rows,
    K) levels, ``d`` their directions concatenated, ``coef``, ``inv``, ``zero`` (None: no part
    zeroed), ``requant_keys`` and ``round_keys`` vectors with one value per part."""
    _need()
    dev = d.device
    zero_t = zero.to(torch.int8) if zero is not None else inv  # not read without a zero flag
    for fields, bn, bk, one_tile in _groups(q, offsets, per_conn, key_a, keys_b, step, round_b):
        table, blocks, programs = _part_table(fields, bn, dev)
        _launch(_int8_group_kernel, programs, 1, dev, table, blocks, len(fields), d, coef, inv, zero_t, requant_keys,
                round_keys, LOG_PARTS=_log_parts(len(fields)), ZERO=zero is not None, ONE_TILE=one_tile,
                BLOCK_N=bn, BLOCK_K=bk)


def fp32_update_group(s, d, neg_lr, decay, offsets, per_conn, key_a, keys_b, step) -> None:
    """:func:`fp32_update_chunk` of every part, in place, after multiplying its scores by ``decay``
    (None: no decay), by one launch per column tile width (at most 7, whatever the number of parts)."""
    _need()
    dev = d.device
    for fields, bn, bk, _ in _groups(s, offsets, per_conn, key_a, keys_b, step, None):
        table, blocks, programs = _part_table(fields, bn, dev)
        _launch(_fp32_group_kernel, programs, 1, dev, table, blocks, len(fields), d, neg_lr,
                decay if decay is not None else neg_lr,
                LOG_PARTS=_log_parts(len(fields)), DECAY=decay is not None, BLOCK_N=bn, BLOCK_K=bk)


def implicit_chunk(drift, factor, start, per_conn: int, cand_key, cand_keys, step, score_key, score_keys,
                   bound) -> torch.Tensor:
    """:func:`seedslot.ops._torch.implicit_chunk` as a Triton kernel."""
    dev, n, k = drift.device, drift.shape[0], cand_keys.shape[0]
    return _rows_out(_implicit_kernel, n, k, torch.float32, dev, drift.contiguous(), _scalar(factor, torch.float32, dev),
                     _scalar(start, torch.int32, dev), n, k, per_conn, _scalar(cand_key, torch.int32, dev),
                     cand_keys.contiguous(), _scalar(step, torch.float32, dev), _scalar(score_key, torch.int32, dev),
                     score_keys.contiguous(), _scalar(bound, torch.float32, dev))


def implicit_greedy(drift, factor, start, per_conn: int, cand_key, cand_keys, step, score_key, score_keys,
                    bound) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`seedslot.ops._torch.implicit_greedy_unrolled` as one Triton kernel for
    any K: ``(index, value)``, the (n,) int64 argmax of the implicit scores (lowest index on ties)
    and the (n,) fp32 candidate there, with no (n, K) tensor."""
    _need()
    dev, n, k = drift.device, drift.shape[0], cand_keys.shape[0]
    idx = torch.empty(n, dtype=torch.int64, device=dev)
    value = torch.empty(n, dtype=torch.float32, device=dev)
    if n and k:
        bn, bk = _blocks(k)
        _launch(_implicit_greedy_kernel, n, bn, dev, idx, value, drift.contiguous(),
                _scalar(factor, torch.float32, dev), _scalar(start, torch.int32, dev), n, k, per_conn,
                _scalar(cand_key, torch.int32, dev), cand_keys.contiguous(), _scalar(step, torch.float32, dev),
                _scalar(score_key, torch.int32, dev), score_keys.contiguous(), _scalar(bound, torch.float32, dev),
                BLOCK_N=bn, BLOCK_K=bk)
    return idx, value


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """(n, K) int8 or fp32 scores -> (n,) int64 argmax, the lowest index on ties: ``scores.argmax(-1)``
    (NaN above everything, -0.0 equal to 0.0, as torch)."""
    _need()
    if scores.dtype not in (torch.int8, torch.float32) or scores.dim() != 2:
        raise TypeError(f"greedy: (n, K) int8 or float32 scores, got {tuple(scores.shape)} {scores.dtype}")
    n, k = scores.shape
    idx = torch.empty(n, dtype=torch.int64, device=scores.device)
    if n and k:
        bn, bk = _blocks(k)
        _launch(_argmax_kernel, n, bn, scores.device, idx, scores, scores.stride(0), scores.stride(1), n, k,
                IS_FLOAT=scores.dtype == torch.float32, BLOCK_N=bn, BLOCK_K=bk)
    elif n:
        raise RuntimeError("greedy: cannot take the argmax of zero candidates")
    return idx


def packed_argmax(words: torch.Tensor) -> torch.Tensor:
    """:func:`seedslot.ops._torch.packed_argmax`: the words read back as their int8 lanes."""
    return greedy(words.contiguous().view(torch.int8))


def sample_chunk(scores, scale, start, key_a, keys_b) -> torch.Tensor:
    """:func:`seedslot.ops._torch.sample_chunk` (Gumbel-max) as a Triton kernel; see the module
    docstring for the one ulp its ``log`` may differ by."""
    _need()
    n, k = scores.shape
    dev = scores.device
    idx = torch.empty(n, dtype=torch.int64, device=dev)
    if n and k:
        bn, bk = _blocks(k)
        _launch(_sample_kernel, n, bn, dev, idx, scores, scores.stride(0), scores.stride(1),
                _scalar(scale, torch.float32, dev), _scalar(start, torch.int32, dev), n, k,
                _scalar(key_a, torch.int32, dev), keys_b.contiguous(), LIBDEVICE=not interpreted(),
                BLOCK_N=bn, BLOCK_K=bk)
    return idx
