"""Memory accounting: the exact bytes of training state (whole and per layer), and the peak memory a
workload really uses, measured in-process (:func:`track`) or in a fresh child process
(:func:`run_in_child`, optionally under a watchdog that kills the child when it crosses a budget).

Peak resident memory combines two sources so that short spikes are not missed: a thread sampling
the resident set with psutil every millisecond, and the kernel's own high-water mark. On Linux the
kernel figure is ``VmHWM`` of ``/proc/self/status`` (reset on entry through ``/proc/self/clear_refs``),
not ``getrusage``'s ``ru_maxrss``: the latter survives ``exec``, so a spawned child inherits its
parent's peak (a 1.5 GB parent gives a fresh child a 1.5 GB ``ru_maxrss``). Elsewhere
``ru_maxrss`` is used only when it grew inside the tracked block, which proves the peak was there.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from torch import nn

from .layers import SlotLayer

__all__ = [
    "state_bytes",
    "state_breakdown",
    "CATEGORIES",
    "MemoryPeak",
    "MemoryTracker",
    "track",
    "peak_rss_bytes",
]

# ---------------------------------------------------------------- training state, counted exactly


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    for p in model.parameters():
        yield p
        yield p.grad
    yield from model.buffers()
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (storage.data_ptr(), str(t.device), storage.nbytes())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes held by the model's parameters, buffers, their gradients and the optimizer's state,
    counting each storage once (an expanded or shared tensor costs its storage, not its shape)."""
    seen: set[tuple] = set()
    total = 0
    for t in _tensors(model, optimizer):
        if t is None:
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += key[2]
    return total


# What a byte of training state is for. "weights": ordinary trained parameters (and the seeded
# layers' zero-storage proxies); "momentum": all optimizer state; "other": every remaining buffer
# (random-function keys, int8 score scales, batch-norm statistics).
CATEGORIES = ("scores", "candidates", "weights", "gradients", "momentum", "other")

OPTIMIZER_ROW = "(optimizer)"  # optimizer state of tensors that are not the model's parameters
ROOT_ROW = "(root)"  # tensors the top-level module owns directly


def _category(module: nn.Module, name: str, is_param: bool) -> str:
    if isinstance(module, SlotLayer):  # the layer names its score (and candidate) state
        what = module.state_categories().get(name)
        if what in CATEGORIES:
            return what
    return "weights" if is_param else "other"


def state_breakdown(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, dict[str, int]]:
    """Per layer (qualified module name, in module order), the bytes of each of :data:`CATEGORIES`.

    Every storage is counted once, in the layer that owns it first, so the grand total equals
    :func:`state_bytes`. Optimizer state is charged to the layer of its parameter.
    """
    rows: dict[str, dict[str, int]] = {}
    owner: dict[int, str] = {}  # id(parameter) -> row
    seen: set[tuple] = set()

    def add(row: str, category: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            rows.setdefault(row, dict.fromkeys(CATEGORIES, 0))[category] += key[2]

    modules = list(model.named_modules())
    for fqn, m in modules:  # parameters and their gradients, in model.parameters() order
        row = fqn or ROOT_ROW
        for name, p in m.named_parameters(recurse=False):
            if id(p) in owner:
                continue
            owner[id(p)] = row
            rows.setdefault(row, dict.fromkeys(CATEGORIES, 0))
            add(row, _category(m, name, True), p)
            add(row, "gradients", p.grad)
    for fqn, m in modules:
        for name, b in m.named_buffers(recurse=False):
            add(fqn or ROOT_ROW, _category(m, name, False), b)
    if optimizer is not None:
        for p, state in optimizer.state.items():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    add(owner.get(id(p), OPTIMIZER_ROW), "momentum", v)
    return rows


# ---------------------------------------------------------------- peak memory of a workload


def _read_hwm() -> int | None:
    """The kernel's resident high-water mark of this process (Linux VmHWM), in bytes."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set so far, in bytes (the kernel's high-water mark)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def _cuda_active() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@dataclass(frozen=True)
class MemoryPeak:
    """What :func:`track` measured. Resident figures are whole-process bytes; the increment is
    over the resident set at the start of the block. CUDA figures are None without CUDA."""

    baseline_rss_bytes: int
    peak_rss_bytes: int
    sampled_peak_rss_bytes: int
    kernel_peak_rss_bytes: int | None
    samples: int
    seconds: float
    cuda_max_allocated_bytes: int | None = None
    cuda_max_reserved_bytes: int | None = None

    @property
    def peak_increment_bytes(self) -> int:
        return self.peak_rss_bytes - self.baseline_rss_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_increment_bytes": self.peak_increment_bytes}


_ACTIVE: list["MemoryTracker"] = []  # open trackers, so that a nested one's HWM reset loses nothing
_ACTIVE_LOCK = threading.Lock()


class MemoryTracker:
    """Context manager measuring the peak resident memory (and CUDA peaks) of the block it wraps.

    ``peak_rss_bytes`` and ``peak_increment_bytes`` can be read during the block (the peak so far,
    from the sampler) and after it (the final figures, also as :attr:`result`).
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not interval_s > 0:
            raise ValueError(f"interval_s must be a number > 0; got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.result: MemoryPeak | None = None
        self.baseline_rss_bytes = 0
        self._sampled = 0
        self._kernel_folded = 0  # peaks read before a nested tracker reset them
        self._cuda_folded = (0, 0)
        self._process = psutil.Process()
        self._samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss = self._process.memory_info().rss
        self._samples += 1
        if rss > self._sampled:
            self._sampled = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "MemoryTracker":
        if self._thread is not None:
            raise RuntimeError("a MemoryTracker can be entered only once")
        with _ACTIVE_LOCK:
            hwm = _read_hwm()
            cuda = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if _cuda_active() else (0, 0)
            for outer in _ACTIVE:
                outer._kernel_folded = max(outer._kernel_folded, hwm or 0)
                outer._cuda_folded = tuple(map(max, outer._cuda_folded, cuda))
            self._hwm_reset = _reset_hwm()
            if _cuda_active():
                torch.cuda.reset_peak_memory_stats()
            _ACTIVE.append(self)
        self._ru_before = peak_rss_bytes()
        self._t0 = time.perf_counter()
        self.baseline_rss_bytes = self._sampled = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, name="seedslot-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self._sample()
        seconds = time.perf_counter() - self._t0
        with _ACTIVE_LOCK:
            _ACTIVE.remove(self)
            kernel = None
            if self._hwm_reset:
                kernel = max(_read_hwm() or 0, self._kernel_folded)
            else:
                ru = peak_rss_bytes()
                if ru > self._ru_before:  # the lifetime maximum rose inside the block
                    kernel = ru
        cuda_alloc = cuda_res = None
        if _cuda_active():
            cuda_alloc = max(torch.cuda.max_memory_allocated(), self._cuda_folded[0])
            cuda_res = max(torch.cuda.max_memory_reserved(), self._cuda_folded[1])
        self.result = MemoryPeak(
            baseline_rss_bytes=self.baseline_rss_bytes,
            peak_rss_bytes=max(self._sampled, kernel or 0),
            sampled_peak_rss_bytes=self._sampled,
            kernel_peak_rss_bytes=kernel,
            samples=self._samples,
            seconds=seconds,
            cuda_max_allocated_bytes=cuda_alloc,
            cuda_max_reserved_bytes=cuda_res,
        )

    @property
    def peak_rss_bytes(self) -> int:
        return self.result.peak_rss_bytes if self.result is not None else self._sampled

    @property
    def peak_increment_bytes(self) -> int:
        return self.peak_rss_bytes - self.baseline_rss_bytes


def track(interval_s: float = 0.001) -> MemoryTracker:
    """``with track() as m: ...`` then ``m.peak_rss_bytes``, ``m.peak_increment_bytes``, ``m.result``."""
    return MemoryTracker(interval_s)


# ---------------------------------------------------------------- a workload in a fresh process
