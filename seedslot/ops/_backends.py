"""Which implementation of a kernel runs: the environment switches, torch.compile, numba, Triton.

Read only by the op layer. ``SEEDSLOT_COMPILE=0`` keeps the torch kernels eager (else they are fused
by ``torch.compile``), ``SEEDSLOT_TRITON=0`` keeps CUDA tensors on the torch kernels, and
``SEEDSLOT_NUMBA=0`` keeps the CPU on torch where :mod:`seedslot.ops._numba` has a twin. A compiler,
Triton kernel or numba import that fails falls back to torch, with one warning for the process.
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

F = TypeVar("F", bound=Callable)

# Tests only: the CPU kernels of the ops run their CUDA kernels instead (the Triton kernels, in
# Triton's interpreter under TRITON_INTERPRET=1), so the CUDA path runs end to end without a GPU.
cuda_kernels_on_cpu = False


def _switch(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def compile_enabled() -> bool:
    """``SEEDSLOT_COMPILE=0`` turns the fused torch.compile path off."""
    return _switch("SEEDSLOT_COMPILE")


def triton_enabled() -> bool:
    """``SEEDSLOT_TRITON=0`` keeps CUDA tensors on the torch kernels (eager or torch.compile)."""
    return _switch("SEEDSLOT_TRITON")


def numba_enabled() -> bool:
    """``SEEDSLOT_NUMBA=0`` keeps the CPU on torch where :mod:`seedslot.ops._numba` has a twin."""
    return _switch("SEEDSLOT_NUMBA")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_on() -> bool:
    """Whether CUDA kernels run as Triton programs: triton installed and not disabled."""
    return triton_enabled() and triton_available()


def runs_triton(t: torch.Tensor | None) -> bool:
    """Whether the kernels on ``t`` run as Triton programs (no (rows, K) temporaries: one chunk)."""
    return t is not None and (t.is_cuda or cuda_kernels_on_cpu) and triton_on()


@functools.cache
def _numba_module():
    """:mod:`seedslot.ops._numba`, or None where numba is not installed or does not import (one
    warning then: e.g. a numba too old for the installed numpy)."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        return importlib.import_module("seedslot.ops._numba")
    except Exception as e:  # noqa: BLE001 - a broken numba: the torch path
        warnings.warn(f"seedslot: numba is installed but does not import ({type(e).__name__}: {e}); using torch "
                      "(set SEEDSLOT_NUMBA=0 to silence this)", RuntimeWarning, stacklevel=3)
        return None


def numba_kernels():
    """:mod:`seedslot.ops._numba` (numba twins of CPU kernels) when numba imports and
    ``SEEDSLOT_NUMBA`` is not 0, else None."""
    return _numba_module() if numba_enabled() else None


_warned = False
_triton_warned = False


class Fused:
    """A pure torch kernel, run through ``torch.compile`` when enabled (:meth:`__call__`), and on
    CUDA as its Triton twin when it has one (:meth:`cuda`).

    Compilation is lazy; if it fails the eager function is used from then on, with one warning
    for the whole process. ``.eager``, ``.compiled`` and ``.triton`` give each implementation
    explicitly (tests; ``.triton`` on CPU tensors runs in Triton's interpreter under
    ``TRITON_INTERPRET=1``). If the twin raises, the torch path is used from then on, with one
    warning. Row counts are marked dynamic while K stays static: inductor vectorises a reduction
    over a static K better. Values that change between calls (keys, offsets, learning rates) are
    passed as 0-dim tensors so that a new value never recompiles.
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
        """The Triton twin (same signature and result; :mod:`seedslot.ops._triton`), or None."""
        if isinstance(self._triton, str):  # resolved lazily: importing it imports triton
            self._triton = getattr(importlib.import_module("seedslot.ops._triton"), self._triton)
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
        """The torch kernel: compiled when enabled, else (or inside a user's trace) eager."""
        global _warned
        if self._failed or not compile_enabled() or torch.compiler.is_compiling():
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager
            self._failed = True
            if not _warned:
                _warned = True
                warnings.warn(f"seedslot: torch.compile failed ({type(e).__name__}: {e}); using the eager path "
                              "(set SEEDSLOT_COMPILE=0 to silence this)", RuntimeWarning, stacklevel=2)
            return self.eager(*args, **kwargs)

    def cuda(self, *args, **kwargs):
        """The CUDA kernel: the Triton twin where there is one and Triton is on, else the torch one."""
        global _triton_warned
        if self._triton is not None and not self._triton_failed and triton_on():
            try:
                return self.triton(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - no working triton: the torch path below
                self._triton_failed = True
                if not _triton_warned:
                    _triton_warned = True
                    warnings.warn(f"seedslot: a Triton kernel failed ({type(e).__name__}: {e}); using torch "
                                  "(set SEEDSLOT_TRITON=0 to silence this)", RuntimeWarning, stacklevel=2)
        return self(*args, **kwargs)


def fused(*rows: str, triton: str | Callable | None = None) -> Callable[[F], F]:
    """Decorator: see :class:`Fused`. ``rows`` names the tensor arguments whose first dimension is
    the (dynamic) number of connections; ``triton`` the twin's name in :mod:`seedslot.ops._triton`."""
    return lambda fn: Fused(fn, rows, triton)  # type: ignore[return-value]
