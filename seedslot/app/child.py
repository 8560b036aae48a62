"""A call run in a fresh child process, its memory measured from the child's own baseline and
watched against a budget: how the benchmarks measure each mode apart."""

from __future__ import annotations

import multiprocessing
import time
import traceback

import psutil
from dataclasses import dataclass
from typing import Any, Callable

from ..memory import MemoryPeak, track
from .allocator import return_large_frees

@dataclass(frozen=True)
class ChildRun:
    """The outcome of :func:`run_in_child`.

    ``memory`` is the child's own measurement of the call (None if it was killed or died first);
    its baseline is the child's resident set after importing torch and unpickling the call.
    ``exceeded`` says the budget was crossed, seen by the watchdog (which then killed the child)
    or by the child's own peak afterwards. ``watchdog_peak_rss_bytes`` is the largest resident set
    the parent saw.
    """

    value: Any
    memory: MemoryPeak | None
    exceeded: bool
    killed: bool
    error: str | None
    exitcode: int | None
    watchdog_peak_rss_bytes: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None and not self.exceeded


def _child_main(conn, fn: Callable, args: tuple, kwargs: dict, interval_s: float) -> None:
    return_large_frees()  # every mode measured under the same allocator setting
    tracker = track(interval_s)
    try:
        with tracker:
            value = fn(*args, **kwargs)
        conn.send(("ok", value, tracker.result))
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("error", traceback.format_exc(), tracker.result))
    finally:
        conn.close()


def run_in_child(
    fn: Callable,
    *args: Any,
    budget_bytes: int | None = None,
    interval_s: float = 0.001,
    timeout_s: float | None = None,
    **kwargs: Any,
) -> ChildRun:
    """Run ``fn(*args, **kwargs)`` in a fresh ``spawn`` process and measure its peak memory.

    ``fn`` and its arguments must be picklable (a module-level function). With ``budget_bytes``,
    the parent polls the child's resident set every ``interval_s`` and kills it the moment it
    exceeds the budget. ``timeout_s`` kills a child that runs longer. Exceptions in the child come
    back as ``error`` (its traceback) instead of being raised, so a failing workload cannot take
    the caller down.
    """
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                     or budget_bytes <= 0):
        raise ValueError(f"budget_bytes must be an int > 0 or None; got {budget_bytes!r}")
    if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not interval_s > 0:
        raise ValueError(f"interval_s must be a number > 0; got {interval_s!r}")
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, fn, args, kwargs, interval_s), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    watched = psutil.Process(proc.pid)
    seen = 0
    killed = exceeded = False
    message = None
    error = None
    try:
        while True:
            try:
                rss = watched.memory_info().rss
            except psutil.Error:
                rss = 0
            seen = max(seen, rss)
            if budget_bytes is not None and rss > budget_bytes:
                proc.kill()
                killed = exceeded = True
                break
            if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                proc.kill()
                killed = True
                error = f"child timed out after {timeout_s} s"
                break
            if recv.poll(interval_s):
                try:
                    message = recv.recv()
                except EOFError:  # died without a word
                    pass
                break
            if not proc.is_alive() and not recv.poll():
                break
    finally:
        proc.join()
        recv.close()
    seconds = time.perf_counter() - t0
    value = memory = None
    if message is not None:
        status, payload, memory = message
        if status == "ok":
            value = payload
        else:
            error = payload
    elif error is None and not killed:
        error = f"child exited with code {proc.exitcode} before reporting"
    if memory is not None and budget_bytes is not None and memory.peak_rss_bytes > budget_bytes:
        exceeded = True
    return ChildRun(value, memory, exceeded, killed, error, proc.exitcode, seen, seconds)
