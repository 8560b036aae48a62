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
    mode = None if mode == "default" else mode
    return torch.compile(model, mode=mode), torch.compile(optimizer.step, mode=mode)
