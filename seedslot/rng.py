"""The counter-based random function every random number in seedslot comes from.

``bits(conn, key_a, keys_b)[i, j] = mix32(mix32(conn[i] ^ key_a) ^ keys_b[j])`` is a pure function
of integers: any subset of values can be recomputed in any order, in any chunking, on any device,
and always gives the same 32 bits. ``mix32`` is Chris Wellons' ``lowbias32`` integer hash. Three
implementations agree bit for bit: eager torch, the same code fused by ``torch.compile`` (used
automatically, disabled by ``SEEDSLOT_COMPILE=0``), and the numpy ``uint32`` reference the tests
keep (``tests/reference.py``).

Torch has no unsigned 32-bit arithmetic, so torch code works on int32 and relies on two's
complement wrap-around: bitwise ops and the low 32 bits of a product are the same for int32 and
uint32, and right shifts are masked to make them logical. The numpy reference uses true uint32.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import warnings
from typing import Callable, TypeVar

import torch

STREAM_VERSION = 1  # the format of every random stream below; a change to any value a seed gives bumps it

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_M2_I32 = _M2 - (1 << 32)  # same low 32 bits, fits int32
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
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


# ---------------------------------------------------------------- the fused path

F = TypeVar("F", bound=Callable)


def compile_enabled() -> bool:
    """``SEEDSLOT_COMPILE=0`` turns the fused torch.compile path off."""
    return os.environ.get("SEEDSLOT_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def triton_enabled() -> bool:
    """``SEEDSLOT_TRITON=0`` keeps CUDA tensors on the torch path (eager or torch.compile)."""
    return os.environ.get("SEEDSLOT_TRITON", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def numba_enabled() -> bool:
    """``SEEDSLOT_NUMBA=0`` keeps the CPU on the torch path where :mod:`seedslot.cpu_kernels` has a twin."""
    return os.environ.get("SEEDSLOT_NUMBA", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def _cpu_kernels():
    """:mod:`seedslot.cpu_kernels`, or None where numba is not installed or does not import (one
    warning then: e.g. a numba too old for the installed numpy)."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        return importlib.import_module("seedslot.cpu_kernels")
    except Exception as e:  # noqa: BLE001 - a broken numba: the torch path
        warnings.warn(f"seedslot: numba is installed but does not import ({type(e).__name__}: {e}); using torch "
                      "(set SEEDSLOT_NUMBA=0 to silence this)", RuntimeWarning, stacklevel=3)
        return None


def cpu_twins():
    """:mod:`seedslot.cpu_kernels` (numba twins of CPU kernels) when numba imports and
    ``SEEDSLOT_NUMBA`` is not 0, else None."""
    return _cpu_kernels() if numba_enabled() else None


def use_triton(t: torch.Tensor | None) -> bool:
    """Whether fused functions on ``t`` run as their Triton twins: ``t`` on CUDA, triton installed,
    not disabled, and not inside a user's torch.compile (which traces the eager body)."""
    return (t is not None and t.is_cuda and triton_enabled() and triton_available()
            and not torch.compiler.is_compiling())


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


_warned = False
_triton_warned = False


class _Fused:
    """A pure tensor function run through ``torch.compile`` when enabled.

    Compilation is lazy; if it fails the eager function is used from then on, with one warning
    for the whole process. ``.eager`` and ``.compiled`` give either path explicitly (tests).

    A function may have a Triton twin (``fused(..., triton=name)``): when its first tensor argument
    is on CUDA and :func:`use_triton` holds, the call runs the twin instead (one hand-written kernel,
    bit-exact, see :mod:`seedslot.triton_kernels`); ``.triton`` gives it explicitly, which on CPU
    tensors runs in Triton's interpreter under ``TRITON_INTERPRET=1`` (tests). If the twin raises,
    the torch path is used from then on, with one warning.
    Row counts are marked dynamic while K stays static: inductor vectorises a reduction over a
    static K about twice as fast. Values that change between calls (keys, offsets, learning
    rates) must be passed as 0-dim tensors so that a new value never recompiles.
    """

    def __init__(self, fn: Callable, rows: tuple[str, ...], triton: str | Callable | None = None) -> None:
        self.eager = fn
        names = list(inspect.signature(fn).parameters)
        self._rows = [names.index(r) for r in rows]
        self._compiled: Callable | None = None
        self._failed = False
        self._triton = triton
        self._triton_failed = False
        functools.update_wrapper(self, fn)

    @property
    def triton(self) -> Callable | None:
        """The Triton twin (same signature and result; :mod:`seedslot.triton_kernels`), or None."""
        if isinstance(self._triton, str):  # resolved lazily: importing it imports triton
            self._triton = getattr(importlib.import_module("seedslot.triton_kernels"), self._triton)
        return self._triton

    @property
    def compiled(self) -> Callable:
        if self._compiled is None:
            compiled = torch.compile(self.eager)

            def run(*args, **kwargs):
                for i in self._rows:
                    if args[i].shape[0] > 1:
                        torch._dynamo.maybe_mark_dynamic(args[i], 0)
                return compiled(*args, **kwargs)

            self._compiled = run
        return self._compiled

    def __call__(self, *args, **kwargs):
        global _warned, _triton_warned
        if torch.compiler.is_compiling():
            # inside a user's torch.compile(model) the eager body is traced into that graph
            return self.eager(*args, **kwargs)
        if self._triton is not None and not self._triton_failed and use_triton(_first_tensor(args, kwargs)):
            try:
                return self.triton(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - no working triton: the torch path below
                self._triton_failed = True
                if not _triton_warned:
                    _triton_warned = True
                    warnings.warn(
                        f"seedslot: a Triton kernel failed ({type(e).__name__}: {e}); using torch "
                        "(set SEEDSLOT_TRITON=0 to silence this)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        if self._failed or not compile_enabled():
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            self._failed = True
            if not _warned:
                _warned = True
                warnings.warn(
                    f"seedslot: torch.compile failed ({type(e).__name__}: {e}); "
                    "using the eager path (set SEEDSLOT_COMPILE=0 to silence this)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return self.eager(*args, **kwargs)


def fused(*rows: str, triton: str | Callable | None = None) -> Callable[[F], F]:
    """Decorator: see :class:`_Fused`. ``rows`` names the tensor arguments whose first dimension
    is the (dynamic) number of connections; ``triton`` the twin that runs on CUDA tensors (a
    function, or the name of one in :mod:`seedslot.triton_kernels`)."""
    return lambda fn: _Fused(fn, rows, triton)  # type: ignore[return-value]
