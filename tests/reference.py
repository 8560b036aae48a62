"""The numpy ``uint32`` reference of :mod:`seedslot.rng`'s random function, in true unsigned 32-bit
arithmetic (torch works on int32 with two's complement wrap-around): what the torch, compiled and
Triton paths are compared with bit for bit. ``mix32`` is Chris Wellons' ``lowbias32``."""

import numpy as np

_M1 = 0x7FEB352D  # lowbias32's multipliers
_M2 = 0x846CA68B


def np_mix32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(_M1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(_M2)
    return x ^ (x >> np.uint32(16))


def np_bits(conn: np.ndarray, key_a: int, keys_b: np.ndarray) -> np.ndarray:
    """Reference for :func:`seedslot.rng.bits` in true uint32 arithmetic; returns uint32."""
    with np.errstate(over="ignore"):
        a = np.uint32(key_a & 0xFFFFFFFF)
        kb = np.asarray(keys_b, dtype=np.int64).astype(np.uint32)
        h = np_mix32(np.asarray(conn, dtype=np.int64).astype(np.uint32) ^ a)
        return np_mix32(h[..., None] ^ kb)


def np_noise_bits(conn: np.ndarray, key_a: int, keys_b: np.ndarray) -> np.ndarray:
    """Reference for :func:`seedslot.rng.noise_bits`; returns uint32."""
    with np.errstate(over="ignore"):
        kb = np.asarray(keys_b, dtype=np.int64).astype(np.uint32)
        h = np_mix32(np.asarray(conn, dtype=np.int64).astype(np.uint32) ^ np.uint32(key_a & 0xFFFFFFFF))
        x = (h[..., None] ^ kb) * np.uint32(_M1)
        return x ^ (x >> np.uint32(15))
