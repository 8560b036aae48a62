"""Memory, memory-budget and speed benchmarks of learned, dense-slot and seeded-slot training.

Each benchmark runs full training steps (forward, cross-entropy, backward, optimizer step) on random
inputs of the model's dataset shape: :class:`~seedslot.SlotSGD` with momentum 0.9 for the seeded
models (mode ``int8``: int8 scores; ``implicit``: ``scores="implicit"``), ``torch.optim.SGD``
with momentum 0.9 for the dense reference and for ordinary weights.

* :func:`memory_bench`: each mode in its own fresh process; state bytes and peak process memory.
* :func:`budget_bench`: the largest K whose training step fits a memory budget, one child per K
  under a watchdog that kills it the moment it crosses the budget.
* :func:`speed_bench`: steps per second of the modes interleaved in one process.

Peak memory is the whole child run, warm-up step included: a user's process needs the memory that
``torch.compile`` takes the first time the seeded kernels run, so the budget counts it too;
compilation runs inside the child, not in worker processes. Step times exclude the warm-up step. ``seedslot bench ...`` and ``bench/*.py`` call :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from copy import deepcopy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import bench_ddp
from .devices import DEVICE_HELP, resolve_device
from ..files import atomic_write
from ..memory import CATEGORIES, state_breakdown, state_bytes
from .child import run_in_child
from .compiling import COMPILE, compiled
from ..config import SlotConfig
from ..optim import SlotSGD
from .. import ops
from ..validate import check_int

__all__ = ["MODES", "memory_bench", "budget_bench", "speed_bench", "median_seconds", "parse_bytes", "add_arguments", "run_cli", "main"]

MODES = ("learned", "dense", "int8", "implicit")  # weight training, the dense reference, seedslot's storages
SLOT_SEEDED = ("int8", "implicit")
SPEED_MODES = (*MODES, "incremental")  # speed only: implicit with SlotConfig(incremental=True)
SEGMENTS = ("zero_grad", "forward", "backward", "step")  # of a training step (forward includes the loss)
BUDGET_MODES = ("dense", *SLOT_SEEDED)  # learned weights have no K
BUDGET_KS = tuple(2**i for i in range(9))  # 1, 2, 4, ..., 256
_MiB = 2**20

# ---------------------------------------------------------------- arguments


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"2GiB"`` -> 2147483648; accepts B, kB/MB/GB/TB (powers of 10) and KiB/MiB/GiB/TiB."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"budget must be a size such as 2GiB, 1500MB or 123456 (units B, kB, MB, GB, TB, KiB, MiB, "
                f"GiB, TiB); got {text!r}"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"budget must be > 0 bytes; got {text!r}")
    return value


def _device(device: str | None) -> str:
    return str(resolve_device(device))


def _modes(modes: Sequence[str], allowed: Sequence[str] = MODES) -> tuple[str, ...]:
    modes = tuple("int8" if m == "seeded" else m for m in modes)  # "seeded": int8's name in older command lines
    bad = [m for m in modes if m not in allowed]
    if not modes or bad or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct values among {', '.join(map(repr, allowed))}; got {modes!r}")
    return modes


# ---------------------------------------------------------------- one training workload


def _build(model: str, mode: str, k: int, device: str = "cpu",
           input_size: int | None = None, width: float = 1.0) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model on ``device`` and the (C, H, W) of its dataset's images (``input_size``: another
    height and width, e.g. for the 224x224 ImageNet layout on a small machine; ``width``: the VGG-19s'
    width multiplier). Slot models compute
    their initial scores (the dense reference its candidates) there: on a GPU that is much faster."""
    size = {} if input_size is None else {"input_size": input_size}
    if width != 1.0:
        size["width"] = width
    from ..models import build  # imported late: models build on everything else

    with torch.device(device if mode != "learned" else "cpu"):  # learned: Glorot draws from a CPU generator
        if mode in ("implicit", "incremental"):
            net = build(model, mode="seeded", config=SlotConfig(k=k, scores="implicit", incremental=mode == "incremental"),
                        **size)
        elif mode == "int8":
            net = build(model, mode="seeded", config=SlotConfig(k=k, scores="int8"), **size)
        else:
            net = build(model, mode=mode, k=k, **size)
    c, s = net.build_args["in_channels"], net.build_args["input_size"]
    return net, (c, s, s)


def _check_model(model: str, input_size: int | None, width: float = 1.0) -> int | None:
    """ValueError naming ``model``, ``input_size`` or ``width`` before any child process starts."""
    from ..models import ALL_MODELS, check_width

    if model not in ALL_MODELS:
        raise ValueError(f"model must be one of {', '.join(map(repr, ALL_MODELS))}; got {model!r}")
    check_width(model, width)
    return check_int("input_size", input_size, 1, optional=True)


def _shape_fields(input_size: int | None, width: float) -> dict[str, Any]:
    """The result's ``input_size`` and ``width`` where they are not the model's defaults."""
    return {**({} if input_size is None else {"input_size": input_size}), **({} if width == 1.0 else {"width": width})}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _now(device: str) -> float:
    _sync(device)
    return time.perf_counter()


class Trainer:
    """A model of one mode, its optimizer and a fixed random batch; ``step()`` trains once."""

    def __init__(self, model: str, mode: str, k: int, batch_size: int, device: str, seed: int = 0,
                 input_size: int | None = None, width: float = 1.0, compile: str = "off") -> None:
        torch.manual_seed(seed)
        self.device = device
        net, shape = _build(model, mode, k, device, input_size, width)
        self.model = net.to(device).train()
        # The paper's greedy learning rates; they do not change what a step costs.
        lr = 0.1 if k <= 8 else 0.01
        if mode in (*SLOT_SEEDED, "incremental"):
            self.optimizer: torch.optim.Optimizer = SlotSGD(self.model.parameters(), lr=lr, momentum=0.9)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr if mode == "dense" else 0.01, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch_size, *shape, generator=g).to(device)
        self.y = torch.randint(0, 10, (batch_size,), generator=g).to(device)
        self.forward, self.optimizer_step = compiled(self.model, self.optimizer, compile)

    def step(self) -> float:
        """One training step; returns its wall-clock seconds."""
        t0 = _now(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.forward(self.x), self.y).backward()
        self.optimizer_step()
        return _now(self.device) - t0

    def step_segments(self) -> tuple[float, ...]:
        """One training step; the wall-clock seconds of each of :data:`SEGMENTS`, the device
        synchronised at every boundary (which :meth:`step` does not pay)."""
        marks = [_now(self.device)]
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(_now(self.device))
        loss = F.cross_entropy(self.forward(self.x), self.y)
        marks.append(_now(self.device))
        loss.backward()
        marks.append(_now(self.device))
        self.optimizer_step()
        marks.append(_now(self.device))
        return tuple(b - a for a, b in zip(marks, marks[1:]))


def _train(model: str, mode: str, k: int, batch_size: int, steps: int, device: str,
           cuda_budget_bytes: int | None = None, input_size: int | None = None,
           width: float = 1.0) -> dict[str, Any]:
    """Child-process workload: one warm-up step and ``steps`` timed steps."""
    # Compile in this process: its memory is then measured, and no worker escapes the watchdog.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if cuda_budget_bytes is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cuda_budget_bytes / total), device)
    from ..models import count_connections

    trainer = Trainer(model, mode, k, batch_size, device, input_size=input_size, width=width)
    warmup = trainer.step()
    times = [trainer.step() for _ in range(steps)]
    by_category: dict[str, int] = {}
    for cats in state_breakdown(trainer.model, trainer.optimizer).values():
        for c, b in cats.items():
            by_category[c] = by_category.get(c, 0) + b
    return dict(
        state_bytes=state_bytes(trainer.model, trainer.optimizer),
        state_by_category=by_category,
        connections=count_connections(trainer.model),
        step_seconds=statistics.median(times),
        warmup_seconds=warmup,
    )


# ---------------------------------------------------------------- the benchmarks


def memory_bench(model: str = "vgg19", k: int = 8, batch_size: int = 64, steps: int = 3,
                 modes: Sequence[str] = MODES, device: str | None = None,
                 input_size: int | None = None, width: float = 1.0) -> dict[str, Any]:
    """State bytes, peak process memory and step time of each mode, each in a fresh process."""
    k, batch_size = check_int("k", k, 1), check_int("batch_size", batch_size, 1)
    input_size = _check_model(model, input_size, width)
    steps = check_int("steps", steps, 1)
    modes, device = _modes(modes), _device(device)
    rows = []
    for mode in modes:
        run = run_in_child(_train, model, mode, k, batch_size, steps, device, input_size=input_size, width=width)
        if run.error is not None:
            raise RuntimeError(f"memory bench, mode {mode!r}: the child process failed:\n{run.error}")
        v, mem = run.value, run.memory
        rows.append(dict(
            mode=mode,
            k=None if mode == "learned" else k,
            state_bytes=v["state_bytes"],
            bytes_per_connection=v["state_bytes"] / v["connections"],
            connections=v["connections"],
            state_by_category=v["state_by_category"],
            peak_rss_bytes=mem.peak_rss_bytes,
            baseline_rss_bytes=mem.baseline_rss_bytes,
            peak_increment_bytes=mem.peak_increment_bytes,
            cuda_max_allocated_bytes=mem.cuda_max_allocated_bytes,
            cuda_max_reserved_bytes=mem.cuda_max_reserved_bytes,
            step_seconds=v["step_seconds"],
            warmup_seconds=v["warmup_seconds"],
        ))
    out: dict[str, Any] = dict(bench="memory", model=model, compiled=ops.backends()["compile"], k=k,
                               batch_size=batch_size, steps=steps, device=device, rows=rows)
    out.update(_shape_fields(input_size, width))
    by_mode = {r["mode"]: r for r in rows}
    if "dense" in by_mode:
        d = by_mode["dense"]
        out["ratios"] = {}
        for m in SLOT_SEEDED:
            if m in by_mode:
                out["ratios"][f"state_{m}_over_dense"] = by_mode[m]["state_bytes"] / d["state_bytes"]
                out["ratios"][f"increment_{m}_over_dense"] = (by_mode[m]["peak_increment_bytes"]
                                                             / max(d["peak_increment_bytes"], 1))
    return out


_OOM = ("OutOfMemoryError", "out of memory", "can't allocate memory", "MemoryError")


def budget_bench(model: str = "vgg19", budget_bytes: int = 2 * 2**30, batch_size: int = 32,
                 ks: Sequence[int] = BUDGET_KS, modes: Sequence[str] = BUDGET_MODES, steps: int = 1,
                 device: str | None = None, input_size: int | None = None, width: float = 1.0) -> dict[str, Any]:
    """For each mode, the largest K in ``ks`` (increasing) whose training fits ``budget_bytes``.

    On CPU the budget bounds the child's whole resident set (a watchdog kills it on crossing);
    on CUDA it bounds GPU memory (``set_per_process_memory_fraction``; an OOM is a failure). The
    search stops at the first K that fails. A mode with no K that fits gets ``None``.
    """
    budget_bytes = parse_bytes(budget_bytes)
    ks = tuple(check_int("ks entry", k, 1) for k in ks)
    if not ks or list(ks) != sorted(set(ks)):
        raise ValueError(f"ks must be a non-empty increasing sequence of ints >= 1; got {ks!r}")
    batch_size, steps = check_int("batch_size", batch_size, 1), check_int("steps", steps, 1)
    input_size = _check_model(model, input_size, width)
    modes, device = _modes(modes), _device(device)
    cuda = device.startswith("cuda")
    out: dict[str, Any] = dict(bench="budget", model=model, compiled=ops.backends()["compile"], budget_bytes=budget_bytes,
                               batch_size=batch_size, steps=steps, device=device, ks=list(ks), trials=[])
    out.update(_shape_fields(input_size, width))
    for mode in modes:
        best = None
        for k in ks:
            run = run_in_child(_train, model, mode, k, batch_size, steps, device,
                               cuda_budget_bytes=budget_bytes if cuda else None, input_size=input_size, width=width,
                               budget_bytes=None if cuda else budget_bytes)
            oom = run.error is not None and any(s in run.error for s in _OOM)
            if run.error is not None and not oom:
                raise RuntimeError(f"budget bench, mode {mode!r}, k={k}: the child process failed:\n{run.error}")
            mem = run.memory
            cuda_over = cuda and mem is not None and (mem.cuda_max_reserved_bytes or 0) > budget_bytes
            over = run.exceeded or oom or cuda_over
            out["trials"].append(dict(
                mode=mode, k=k, fits=not over, killed=run.killed,
                peak_rss_bytes=mem.peak_rss_bytes if mem else run.watchdog_peak_rss_bytes,
                cuda_max_reserved_bytes=mem.cuda_max_reserved_bytes if mem else None,
                seconds=run.seconds,
            ))
            if over:
                break
            best = k
        out[f"{mode}_max_k"] = best
    return out


def speed_bench(model: str = "lenet", k: int = 8, batch_size: int = 64, repeats: int = 5,
                min_seconds: float = 0.5, warmup: int = 2, modes: Sequence[str] = MODES,
                device: str | None = None, profile: bool = False, compile: str = "off") -> dict[str, Any]:
    """Steps per second of each mode, measured round robin in one process; with ``compile`` (a
    mode of :data:`.compiling.COMPILE`) every mode's forward and optimizer step, weight training's
    included, run through ``torch.compile``.

    Each measurement runs enough steps to last ``min_seconds`` (judged from the warm-up); the
    order of the modes rotates between repeats, and the report takes medians over ``repeats``.
    With ``profile``, also where each mode's step goes (``result["profile"]``, see :func:`_profile`),
    measured after the timing.
    """
    k, batch_size = check_int("k", k, 1), check_int("batch_size", batch_size, 1)
    repeats, warmup = check_int("repeats", repeats, 1), check_int("warmup", warmup, 1)
    if isinstance(min_seconds, bool) or not isinstance(min_seconds, (int, float)) or not min_seconds >= 0:
        raise ValueError(f"min_seconds must be a number >= 0; got {min_seconds!r}")
    modes, device = _modes(modes, SPEED_MODES), _device(device)
    if compile not in COMPILE:
        raise ValueError(f"compile must be one of {', '.join(map(repr, COMPILE))}; got {compile!r}")
    trainers = {m: Trainer(model, m, k, batch_size, device, compile=compile) for m in modes}
    n_steps, first = {}, {}
    for m, t in trainers.items():
        warm = [t.step() for _ in range(warmup)]  # the first compiles: reported apart, never timed
        first[m] = warm[0]
        n_steps[m] = max(1, math.ceil(min_seconds / max(min(warm), 1e-9)))
    per_step = _rounds(trainers, repeats, n_steps, lambda t, n: sum(t.step() for _ in range(n)) / n)
    rows = [dict(mode=m, k=None if m == "learned" else k, steps_per_measurement=n_steps[m],
                 step_seconds=statistics.median(per_step[m]), steps_per_second=1.0 / statistics.median(per_step[m]),
                 step_seconds_all=per_step[m], first_step_seconds=first[m]) for m in modes]
    out: dict[str, Any] = dict(bench="speed", model=model, compiled=ops.backends()["compile"], numba=ops.backends()["numba"],
                               compile=compile, k=k, batch_size=batch_size, repeats=repeats, device=device,
                               threads=torch.get_num_threads(), rows=rows, ratios={})
    med = {r["mode"]: r["step_seconds"] for r in rows}
    for m in (*SLOT_SEEDED, "incremental"):
        for other in ("dense", "learned"):
            if m in med and other in med:
                out["ratios"][f"{m}_over_{other}"] = med[m] / med[other]
    if profile:
        out["profile"] = _profile(trainers, repeats, n_steps, device)
    if "int8" in trainers:
        # the floor of an int8 step: its update regenerates the K candidates of every connection
        out["regen_seconds"] = _regen_seconds(trainers["int8"].model, repeats)
        if "learned" in med:
            out["int8_floor_seconds"] = med["learned"] + 1.2 * out["regen_seconds"]
    return out


def _rounds(trainers: dict[str, Trainer], repeats: int, n_steps: dict[str, int], measure) -> dict[str, list]:
    """``repeats`` rounds over the modes, their order rotating from round to round; per mode, the
    list of ``measure(trainer, n)`` over its rounds, ``n`` its steps per measurement."""
    modes = list(trainers)
    out: dict[str, list] = {m: [] for m in modes}
    for r in range(repeats):
        for m in modes[r % len(modes):] + modes[: r % len(modes)]:
            out[m].append(measure(trainers[m], n_steps[m]))
    return out


def _profile(trainers: dict[str, Trainer], repeats: int, n_steps: dict[str, int], device: str) -> dict[str, Any]:
    """Per mode: the seconds of each of :data:`SEGMENTS` (per round the median over its steps, then
    the median over rounds, interleaved as in the timing), and torch.profiler's events by self time
    over one measurement's steps (the busiest eight, and the ``Optimizer.step`` region whatever its
    rank), with the self time of all of them: operators, and annotated regions such as
    ``Optimizer.step`` whose self time is the Python inside them (what is left of a step is Python
    outside any event, and numba, which the profiler does not see); and :func:`_host_counts`."""
    from torch.profiler import ProfilerActivity, profile

    def segments(t: Trainer, n: int) -> tuple[float, ...]:
        return tuple(map(statistics.median, zip(*(t.step_segments() for _ in range(n)))))

    seconds = _rounds(trainers, repeats, n_steps, segments)
    cuda = device.startswith("cuda")
    out = {}
    for m, t in trainers.items():
        n = n_steps[m]
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            wall = sum(t.step() for _ in range(n)) / n
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        out[m] = dict(
            **_host_counts(t, device),
            segments=dict(zip(SEGMENTS, map(statistics.median, zip(*seconds[m])))),
            profiled_step_seconds=wall,
            event_self_seconds=sum(e.self_cpu_time_total for e in events) * 1e-6 / n,
            top_ops=[dict(name=e.key, self_seconds=e.self_cpu_time_total * 1e-6 / n, calls=e.count / n,
                          **({"device_seconds": e.self_device_time_total * 1e-6 / n} if cuda else {}))
                     for e in events[:8] + [e for e in events[8:] if e.key.startswith("Optimizer.step#")]],
        )
    return out


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class _HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's value into Python (:data:`HOST_READS`): on CUDA each
    is a synchronisation; on the CPU, where nothing needs one, they are what would be."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _Dispatched(TorchDispatchMode):
    """Counts the ATen operators dispatched (a multi-tensor op is one; what torch.compile fused
    runs eagerly under the mode and counts as its eager operators)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _host_counts(t: Trainer, device: str, steps: int = 2) -> dict[str, Any]:
    """What keeps the host in a steady-state step of ``t``: host syncs per step (CUDA: what
    torch.cuda's sync debug mode reports; CPU: the :data:`HOST_READS` calls), graph breaks of
    ``torch._dynamo.explain`` over a whole training step and over the optimizer's step alone (on
    a copy of the trainer, after an eager step), and ATen operators dispatched per step."""
    t.step()  # steady state: momentum buffers exist, caches are filled
    if device.startswith("cuda"):
        before = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    t.step()
            finally:
                torch.cuda.set_sync_debug_mode(before)
        syncs, counted = sum("synchroniz" in str(w.message) for w in caught), "torch.cuda sync debug mode"
    else:
        reads = _HostReads()
        with reads:
            for _ in range(steps):
                t.step()
        syncs, counted = reads.count, "host reads: Tensor." + "/".join(HOST_READS)
    ops = _Dispatched()
    with ops:
        t.step()
    compiled_fns, (t.forward, t.optimizer_step) = (t.forward, t.optimizer_step), (t.model, t.optimizer.step)
    try:  # explain traces the eager step itself
        twin = deepcopy(t)  # model and optimizer copied together: the optimizer holds the copy's parameters
    finally:
        t.forward, t.optimizer_step = compiled_fns
    twin.step()  # the copied layers register their proxies eagerly
    torch._dynamo.reset()
    whole = torch._dynamo.explain(twin.step)()
    twin.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(twin.model(twin.x), twin.y).backward()
    opt = torch._dynamo.explain(twin.optimizer.step)()
    torch._dynamo.reset()
    return dict(host_syncs_per_step=syncs / steps, host_syncs_counted=counted,
                graph_breaks_per_step=whole.graph_break_count, optimizer_graph_breaks=opt.graph_break_count,
                dispatched_ops_per_step=ops.count)


def median_seconds(fn, repeats: int, device: str = "cpu") -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after one warm-up call (which
    compiles), the device synchronised around each call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = _now(device)
        fn()
        times.append(_now(device) - t0)
    return statistics.median(times)


def _regen_seconds(model: nn.Module, repeats: int) -> float:
    """Median seconds to regenerate all K candidates of every seeded connection of ``model`` once,
    by the kernel the updates use, chunk by chunk into one preallocated buffer per part: the
    kernel's rate under the process's allocator setting, the one the steps it is compared with
    run under."""
    from ..layers import SeededSlotLayer

    parts = [(torch.empty(math.prod(shape), m.k, device=m.candidate_keys.keys.device), offset, m.candidate_keys)
             for m in model.modules() if isinstance(m, SeededSlotLayer) for shape, offset in m.parts.values()]

    def once():
        for out, offset, ck in parts:
            ops.candidate_values(out.shape[0], offset, ck, out=out)

    return median_seconds(once, repeats, str(parts[0][0].device) if parts else "cpu")


# ---------------------------------------------------------------- tables and the command line


def _mib(b: int | float | None) -> str:
    return "-" if b is None else f"{b / _MiB:,.1f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _report(result: dict[str, Any]) -> str:
    bench = result["bench"]
    if bench == "memory":
        head = f"memory: {result['model']}, K={result['k']}, batch {result['batch_size']}, {result['device']}"
        if "input_size" in result:
            head += f", {result['input_size']}x{result['input_size']} inputs"
        if "width" in result:
            head += f", width {result['width']:g}"
        cuda = result["device"].startswith("cuda")
        rows = [[r["mode"], r["k"] or "-", _mib(r["state_bytes"]), f"{r['bytes_per_connection']:.2f}",
                 _mib(r["peak_rss_bytes"]), _mib(r["peak_increment_bytes"])]
                + ([_mib(r["cuda_max_allocated_bytes"])] if cuda else []) + [f"{r['step_seconds']:.3f}"]
                for r in result["rows"]]
        headers = ["mode", "K", "state MiB", "B/conn", "peak MiB", "+peak MiB"]
        headers += ["cuda MiB", "step s"] if cuda else ["step s"]
        text = head + "\n" + _table(headers, rows)
        cats = [c for c in CATEGORIES if any(r["state_by_category"][c] for r in result["rows"])]
        text += "\nstate MiB by kind\n" + _table(
            ["mode", *cats], [[r["mode"], *(_mib(r["state_by_category"][c]) for c in cats)] for r in result["rows"]])
        for m in SLOT_SEEDED:
            if f"state_{m}_over_dense" in result.get("ratios", {}):
                q = result["ratios"]
                text += (f"\n{m}/dense: state {q[f'state_{m}_over_dense']:.4f}, "
                         f"peak increment {q[f'increment_{m}_over_dense']:.4f}")
        return text
    if bench == "budget":
        head = (f"budget: {result['model']}, {_mib(result['budget_bytes'])} MiB, batch {result['batch_size']}, "
                f"{result['device']}")
        rows = [[t["mode"], t["k"], "yes" if t["fits"] else ("killed" if t["killed"] else "no"),
                 _mib(t["peak_rss_bytes"]), f"{t['seconds']:.1f}"] for t in result["trials"]]
        maxes = ", ".join(f"{m}={result[m]}" for m in result if m.endswith("_max_k"))
        dense = result.get("dense_max_k")
        ratios = ", ".join(f"{m}/dense {result[f'{m}_max_k'] / dense:g}" for m in (*SLOT_SEEDED, "incremental")
                           if dense and result.get(f"{m}_max_k") is not None)
        if "input_size" in result:
            head += f", {result['input_size']}x{result['input_size']} inputs"
        if "width" in result:
            head += f", width {result['width']:g}"
        return (head + "\n" + _table(["mode", "K", "fits", "peak MiB", "s"], rows) + "\n" + maxes
                + (f"\nlargest K ratios: {ratios}" if ratios else ""))
    head = (f"speed: {result['model']}, K={result['k']}, batch {result['batch_size']}, {result['device']}, "
            f"{result['threads']} threads, median of {result['repeats']}")
    rows = [[r["mode"], r["k"] or "-", f"{r['step_seconds']:.4f}", f"{r['steps_per_second']:.2f}",
             f"{r['first_step_seconds']:.2f}" if "first_step_seconds" in r else "-"] for r in result["rows"]]
    text = head + "\n" + _table(["mode", "K", "s/step", "steps/s", "first step s"], rows)
    if result["ratios"]:
        text += "\ntime ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items())
    if "regen_seconds" in result:
        text += f"\nregenerating the K candidates of every connection once: {result['regen_seconds']:.4f} s"
    if "int8_floor_seconds" in result:
        text += (f"\nint8 step {_med_of(result, 'int8'):.4f} s against learned + 1.2 x regeneration = "
                 f"{result['int8_floor_seconds']:.4f} s")
    if "profile" in result:
        text += "\n" + _profile_report(result["profile"])
    return text


def _profile_report(prof: dict[str, Any]) -> str:
    """The profile's table of step parts (each against learned's where learned ran) and, per mode,
    the profiler's busiest events."""
    base = prof.get("learned", {}).get("segments")

    def cell(seg: dict, s: str) -> str:
        v = sum(seg.values()) if s == "total" else seg[s]
        ref = (sum(base.values()) if s == "total" else base[s]) if base else None
        return f"{v * 1e3:.3f}" + (f" ({v / ref:.2f}x)" if ref else "")

    cols = (*SEGMENTS, "total")
    text = ("where a step goes: ms of each part, medians (total: their sum)" + (" (x learned)" if base else "") + "\n"
            + _table(["mode", *cols], [[m, *(cell(p["segments"], s) for s in cols)] for m, p in prof.items()]))
    if all("host_syncs_per_step" in p for p in prof.values()):
        ref = prof.get("learned")
        text += ("\n\nwhat keeps the host in a step, per step (" + next(iter(prof.values()))["host_syncs_counted"]
                 + "; graph breaks from torch._dynamo.explain)\n" + _table(
                     ["mode", "host syncs", "graph breaks: step", "optimizer step", "dispatched ops"],
                     [[m, f"{p['host_syncs_per_step']:g}", p["graph_breaks_per_step"], p["optimizer_graph_breaks"],
                       f"{p['dispatched_ops_per_step']}" + (f" ({p['dispatched_ops_per_step'] / ref['dispatched_ops_per_step']:.2f}x)"
                                                             if ref and ref["dispatched_ops_per_step"] else "")]
                      for m, p in prof.items()]))
    for m, p in prof.items():
        ops = ", ".join(f"{o['name']} {o['self_seconds'] * 1e3:.3f} ms ({o['calls']:g} calls)" for o in p["top_ops"][:5])
        text += (f"\n{m}, torch.profiler per step: events' self time {p['event_self_seconds'] * 1e3:.3f} ms of "
                 f"{p['profiled_step_seconds'] * 1e3:.3f} ms (the rest: Python outside events, numba); {ops}")
    return text


def _med_of(result: dict[str, Any], mode: str) -> float:
    """The median step seconds of ``mode`` in a speed result."""
    return next(r["step_seconds"] for r in result["rows"] if r["mode"] == mode)


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(s) for s in text.split(",") if s.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list; got {text!r}") from None
    return parse


INPUT_SIZE_HELP = ("image height and width (default: the model's dataset, 224 for vgg19-imagenet and "
                   "vgg19_bn-imagenet; e.g. 64 there to fit a small machine)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``memory``, ``budget``, ``speed``, ``ddp`` and ``gpu`` sub-commands."""
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)

    def common(p: argparse.ArgumentParser, model: str | None, batch: int) -> None:
        p.add_argument("--model", default=model, required=model is None, help="model name (lenet, conv4, vgg19, vgg19-imagenet, ...)")
        p.add_argument("--batch-size", type=int, default=batch)
        p.add_argument("--device", default=None, help=DEVICE_HELP)
        p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")

    p = sub.add_parser("memory", help="state bytes and peak process memory per mode, each in a fresh process")
    common(p, "vgg19", 64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--modes", type=_csv(str), default=MODES, help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--input-size", type=int, default=None, help=INPUT_SIZE_HELP)
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the VGG-19s (default 1)")

    p = sub.add_parser("budget", help="largest K whose training step fits a memory budget")
    common(p, "vgg19", 32)
    p.add_argument("--budget", type=parse_bytes, default=2 * 2**30, help="e.g. 2GiB (default)")
    p.add_argument("--ks", type=_csv(int), default=BUDGET_KS, help="increasing K values to try (default 1,2,4,...,256)")
    p.add_argument("--steps", type=int, default=1, help="steps after one warm-up step")
    p.add_argument("--modes", type=_csv(str), default=BUDGET_MODES)
    p.add_argument("--input-size", type=int, default=None, help=INPUT_SIZE_HELP)
    p.add_argument("--width", type=float, default=1.0, help="width multiplier of the VGG-19s (default 1)")

    p = sub.add_parser("speed", help="steps per second per mode, interleaved in one process")
    common(p, None, 64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.5, help="shortest measurement")
    p.add_argument("--modes", type=_csv(str), default=MODES)
    p.add_argument("--profile", action="store_true",
                   help="also time each part of a step (zero_grad, forward, backward, optimizer step) and list "
                        "torch.profiler's busiest events, per mode")
    p.add_argument("--compile", choices=COMPILE, default="off",
                   help="torch.compile every mode's forward and optimizer step in this mode (default off)")

    bench_ddp.add_arguments(sub.add_parser("ddp", help="multi-process training traffic and speed"))

    from . import acceptance  # it measures with the benches above

    acceptance.add_arguments(sub.add_parser("gpu", help="the GPU acceptance run: CUDA == CPU identities, speed, "
                                            "memory, budget and a short training run; one table"))


def run_cli(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` describe, print its table, write ``--json``; returns 0."""
    if args.bench == "gpu":
        from . import acceptance

        return acceptance.run_cli(args)
    if args.bench == "ddp":
        return bench_ddp.run_cli(args)
    common = dict(model=args.model, batch_size=args.batch_size, modes=args.modes, device=args.device)
    if args.bench == "memory":
        result = memory_bench(k=args.k, steps=args.steps, input_size=args.input_size, width=args.width, **common)
    elif args.bench == "budget":
        result = budget_bench(budget_bytes=args.budget, ks=args.ks, steps=args.steps, input_size=args.input_size,
                              width=args.width, **common)
    elif args.bench == "speed":
        result = speed_bench(k=args.k, repeats=args.repeats, min_seconds=args.min_seconds, profile=args.profile,
                             compile=args.compile, **common)
    else:
        raise ValueError(f"bench must be one of 'memory', 'budget', 'speed', 'ddp'; got {args.bench!r}")
    print(_report(result), flush=True)
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m seedslot.benchmarks BENCH ...``, as ``seedslot bench BENCH ...``."""
    parser = argparse.ArgumentParser(prog="seedslot bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
