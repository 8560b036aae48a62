"""SlotSGD: SGD with momentum for models that mix seeded slot layers and ordinary parameters.

State per seeded-layer part (its proxy Parameter): ``momentum_buffer``, one fp32 value per
connection, and ``step``, the count that keys stochastic rounding. Ordinary parameters get
torch.optim.SGD's exact update and state. Hyper-parameters live in ``param_groups``, so torch's LR
schedulers work unchanged.

Momentum factorises: SGD momentum on the K straight-through gradients ``G * W_k`` of a connection
is ``W_k`` times SGD momentum on G, so one value per connection gives the updates torch.optim.SGD
gives the dense reference with K values (equal up to fp32 rounding order).

Weight decay on slot scores is decoupled shrinkage: before each update every score of the layer
is multiplied by ``1 - lr * weight_decay`` (for int8 scores, through the per-tensor scale, so it
costs nothing). Without momentum this is exactly SGD's coupled decay; with momentum it differs from
torch.optim.SGD, which would need K momentum values per connection. Greedy selection never sees it
directly (a positive rescaling keeps the argmax); it makes later updates relatively larger.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer

from .layers import slot_owner


def _check_float(name: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = True) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be a finite number in {lo_b}{lo}, {hi}{hi_b}; got {value!r}")
    return float(value)


class SlotSGD(Optimizer):
    """SGD for seeded slot layers (straight-through score updates) and ordinary parameters."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        lr = _check_float("lr", lr, 0.0, math.inf, lo_open=True)
        momentum = _check_float("momentum", momentum, 0.0, 1.0)
        weight_decay = _check_float("weight_decay", weight_decay, 0.0, math.inf)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be True or False; got {nesterov!r}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every gradient before touching anything: a bad one leaves all scores unchanged.
        # One fused max-norm over all of them (NaN and inf propagate), one sync; the slow search
        # for the culprit runs only when it fails.
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, math.inf, foreach=True))):
            for gi, group in enumerate(self.param_groups):
                for pi, p in enumerate(group["params"]):
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                        raise FloatingPointError(
                            f"non-finite gradient in parameter {pi} of param group {gi}; "
                            "no score or weight was changed"
                        )
        for group in self.param_groups:
            lr, mom, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                owner = slot_owner(p)
                g = p.grad
                if owner is None:
                    if p.numel() > 1 and 0 in p.stride():
                        raise RuntimeError(
                            "SlotSGD got a slot proxy parameter whose layer is gone or was copied "
                            "without a forward pass; run a forward pass before step()"
                        )
                    if wd:
                        g = g.add(p, alpha=wd)
                state = self.state[p]
                if mom:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(g).detach()
                    else:
                        buf.mul_(mom).add_(g)
                    d = g.add(buf, alpha=mom) if nesterov else buf
                else:
                    d = g
                if owner is None:
                    p.add_(d, alpha=-lr)
                else:
                    layer, part = owner
                    step = state.get("step", 0)
                    layer._update_scores(part, d, lr, wd, step)
                    state["step"] = step + 1
        return loss
