"""Memory accounting: the exact bytes of training state a model and its optimizer hold."""

from __future__ import annotations

import torch
from torch import nn


def _tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    for p in model.parameters():
        yield p
        yield p.grad
    yield from model.buffers()
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes held by the model's parameters, buffers, their gradients and the optimizer's state,
    counting each storage once (an expanded or shared tensor costs its storage, not its shape)."""
    seen: set[tuple] = set()
    total = 0
    for t in _tensors(model, optimizer):
        if t is None:
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
