"""The counter-based random function every random number in seedslot comes from.

``bits(conn, key_a, keys_b)[i, j] = mix32(mix32(conn[i] ^ key_a) ^ keys_b[j])`` is a pure function
of integers: any subset of values can be recomputed in any order, in any chunking, on any device,
and always gives the same 32 bits. ``mix32`` is Chris Wellons' ``lowbias32`` integer hash. The torch
code here, fused by ``torch.compile`` or not, the numba and Triton kernels of :mod:`seedslot.ops`
and the numpy ``uint32`` reference the tests keep (``tests/reference.py``) agree bit for bit.

Torch has no unsigned 32-bit arithmetic, so torch code works on int32 and relies on two's
complement wrap-around: bitwise ops and the low 32 bits of a product are the same for int32 and
uint32, and right shifts are masked to make them logical. The numpy reference uses true uint32.
"""

from __future__ import annotations

import numpy as np
import torch

STREAM_VERSION = 1  # the format of every random stream below; a change to any value a seed gives bumps it

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_M2_I32 = _M2 - (1 << 32)  # same low 32 bits, fits int32
_MASK64 = (1 << 64) - 1


def _splitmix64(x):
    """SplitMix64's finaliser on a Python int, or elementwise on a numpy uint64 array."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive(*words: int) -> int:
    """A 64-bit integer that depends on every word (seeds, stream tags, counters)."""
    h = 0x5EED5107
    for w in words:
        if w < 0:
            raise ValueError(f"derive() takes non-negative integers, got {w}")
        while True:  # fold arbitrarily large ints 64 bits at a time
            h = _splitmix64(h ^ (w & _MASK64))
            w >>= 64
            if not w:
                break
    return h


def torch_seed(*words: int) -> int:
    """:func:`derive`'s value as a seed torch takes (``manual_seed`` wants one below 2**63)."""
    return derive(*words) & (2**63 - 1)


def key32(*words: int) -> int:
    """A 32-bit key as a signed int32 value (what torch int32 tensors hold)."""
    k = derive(*words) & 0xFFFFFFFF
    return k - (1 << 32) if k >= (1 << 31) else k


def keys32(*words: int, count: int) -> np.ndarray:
    """``[key32(*words, j) for j in range(count)]`` as an int32 array, without a Python loop:
    derive's last fold, :func:`_splitmix64` of the prefix's hash xor j, in uint64 arithmetic
    (which wraps as the masked int arithmetic does)."""
    x = _splitmix64(np.uint64(derive(*words)) ^ np.arange(count, dtype=np.uint64))
    return (x & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def _int64(v: int) -> int:
    """The int64 with the bits of the uint64 ``v``."""
    return v - (1 << 64) if v >= (1 << 63) else v


def _shr64(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def key32_at(words: tuple[int, ...], counter: torch.Tensor) -> torch.Tensor:
    """``key32(*words, n)`` as a 0-dim int32 tensor on ``counter``'s device, ``n`` the value of the
    0-dim integer tensor ``counter`` (a step or draw count, 0 <= n < 2**63): derive's last fold,
    :func:`_splitmix64` of the prefix's hash xor n, in int64 arithmetic (bitwise ops and the low 64
    bits of sums and products are those of uint64), so a counter kept on the device is never read
    back to the host."""
    return key32_fold(key_prefix(*words), counter)


def key_prefix(*words: int) -> int:
    """The int64 that :func:`key32_at` folds its counter into: :func:`derive`'s hash of ``words``."""
    return _int64(derive(*words))


def key32_fold(prefix: int | torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """:func:`key32_at` from the :func:`key_prefix` of its words, elementwise: ``prefix`` may be an
    int64 tensor of several prefixes and ``counter`` a tensor of as many counts (one key each, in the
    same integer operations, so the same bits as one call per pair)."""
    x = counter.to(torch.int64) ^ prefix
    x = x + _int64(0x9E3779B97F4A7C15)
    x = (x ^ _shr64(x, 30)) * _int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr64(x, 27)) * _int64(0x94D049BB133111EB)
    x = (x ^ _shr64(x, 31)) & 0xFFFFFFFF
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors with uint32 semantics."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _M2_I32
    return x ^ ((x >> 16) & 0xFFFF)


def bits(conn: torch.Tensor, key_a: int, keys_b: torch.Tensor) -> torch.Tensor:
    """32 random bits (int32) for every (connection, key_b) pair: shape (*conn.shape, K)."""
    return mix32(mix32(conn ^ key_a).unsqueeze(-1) ^ keys_b)


def noise_bits(conn: torch.Tensor, key_a, keys_b: torch.Tensor) -> torch.Tensor:
    """Cheaper bits for stochastic rounding: a per-connection mix32, then per value only one
    multiply-xorshift round (the top 24 bits, the ones used, are well mixed by the multiply)."""
    return noise_round(mix32(conn ^ key_a).unsqueeze(-1) ^ keys_b)


def noise_round(x: torch.Tensor) -> torch.Tensor:
    """The per-value round of :func:`noise_bits`, on ``mix32(conn ^ key_a) ^ key_b``."""
    x = x * _M1
    return x ^ ((x >> 15) & 0x1FFFF)


def signed24(b: torch.Tensor) -> torch.Tensor:
    """The top 24 bits as a uniform integer in [-2**23, 2**23), exactly representable in fp32."""
    return ((b >> 8) & 0xFFFFFF) - (1 << 23)


def unit24(b: torch.Tensor) -> torch.Tensor:
    """The top 24 bits as a uniform float32 in [0, 1) (exact: 24 bits fit the fp32 mantissa)."""
    return ((b >> 8) & 0xFFFFFF).to(torch.float32) * (2.0**-24)
