"""torch.compile for a training step: the modes ``seedslot train`` and the benchmarks accept."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

COMPILE = ("off", "default", "reduce-overhead")  # torch.compile's mode, or none


def compiled(model: nn.Module, optimizer: torch.optim.Optimizer, mode: str) -> tuple[Callable, Callable]:
    """The forward and the optimizer step a loop calls: as they are with ``"off"`` (eager), else
    each through ``torch.compile`` in that mode ("reduce-overhead": CUDA graphs on CUDA; SlotSGD's
    deferred checks keep its step free of host reads, so the whole step can be captured)."""
    if mode not in COMPILE:
        raise ValueError(f"compile must be one of {', '.join(map(repr, COMPILE))}; got {mode!r}")
    if mode == "off":
        return model, optimizer.step
    if mode == "default":
        return torch.compile(model), torch.compile(optimizer.step)
    forward = torch.compile(model, mode=mode)

    def graphed(*args, **kwargs):
        # a new training step: the CUDA graphs may reuse the previous step's output memory
        torch.compiler.cudagraph_mark_step_begin()
        return forward(*args, **kwargs)

    return graphed, torch.compile(optimizer.step, mode=mode)
