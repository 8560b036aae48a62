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
``lr * weight_decay`` must therefore stay below 1 (a factor <= 0 is no decay: it would zero or
flip every score); SlotSGD refuses it at construction and, before changing anything, at any step
whose hyper-parameters (e.g. set by a scheduler) break it.

Like gradients, the update itself is checked before anything changes: a step whose update is not
an fp32 number (e.g. lr 1e30 times gradients of 1e12) raises FloatingPointError.

Building the first seeded layer registers a global optimizer step pre-hook: any other optimizer
(torch.optim.SGD, Adam, ...) that holds a seeded layer's proxy parameter raises TypeError naming it
and SlotSGD at ``step()``, before changing anything. Ordinary and dense reference parameters pass untouched.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .scores import max_abs_all
from .storages import slot_owner
from .validate import check_float


_FP32_MAX = float(torch.finfo(torch.float32).max)


def _check_group(group: dict, where: str = "", lr_min_open: bool = False) -> None:
    """ValueError, naming the hyper-parameter (and ``where``), unless ``group``'s are usable."""
    try:
        lr = check_float("lr", group["lr"], 0.0, math.inf, lo_open=lr_min_open)
        check_float("momentum", group["momentum"], 0.0, 1.0)
        wd = check_float("weight_decay", group["weight_decay"], 0.0, math.inf)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be True or False; got {group['nesterov']!r}")
        if group["nesterov"] and group["momentum"] == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
    except KeyError as e:
        raise ValueError(f"hyper-parameter {e.args[0]} is missing") from None
    except ValueError as e:
        raise ValueError(f"{e}{where}") from None
    if lr * wd >= 1.0:
        raise ValueError(
            f"lr * weight_decay must be < 1 (the decay multiplies every score by 1 - lr * weight_decay); "
            f"got lr={lr:g}, weight_decay={wd:g}{where}"
        )


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
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        _check_group(defaults, lr_min_open=True)
        super().__init__(params, {key: v if isinstance(v, bool) else float(v) for key, v in defaults.items()})
        for gi, group in enumerate(self.param_groups):
            _check_group(group, f" in param group {gi}", lr_min_open=True)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, after checking the saved hyper-parameters, counters and momentum buffers
        (ValueError naming the first bad one; nothing is changed then)."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state must hold 'state' and {len(self.param_groups)} 'param_groups'")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list) \
                    or len(saved["params"]) != len(group["params"]):
                raise ValueError(f"optimizer param group {gi} does not match this optimizer's")
            _check_group(saved, f" in param group {gi}")
            for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                entry = state.get(pid, {})
                where = f"parameter {pi} of param group {gi}"
                if not isinstance(entry, dict) or set(entry) - {"momentum_buffer", "step"}:
                    raise ValueError(f"optimizer state of {where} must hold only momentum_buffer and step")
                step = entry.get("step", 0)
                if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                    raise ValueError(f"optimizer step of {where} must be an int >= 0; got {step!r}")
                buf = entry.get("momentum_buffer")
                if buf is not None and not (isinstance(buf, torch.Tensor) and buf.shape == p.shape
                                            and buf.dtype.is_floating_point and bool(torch.isfinite(buf).all())):
                    got = f"{tuple(buf.shape)} {buf.dtype}" if isinstance(buf, torch.Tensor) else type(buf).__name__
                    raise ValueError(f"momentum_buffer of {where} must be a finite float tensor of shape "
                                     f"{tuple(p.shape)}; got {got}")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check hyper-parameters, every gradient and every update before touching anything: a bad
        # one leaves all scores unchanged. One max-norm per tensor (NaN and inf propagate), one sync.
        for gi, group in enumerate(self.param_groups):
            _check_group(group, f" in param group {gi}")
        entries = [(gi, pi, group, p, slot_owner(p)) for gi, group in enumerate(self.param_groups)
                   for pi, p in enumerate(group["params"]) if p.grad is not None]
        if entries:
            self._check_updates(entries)
        for _, _, group, p, owner in entries:
            lr, mom, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
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
                layer.update_scores(part, d, lr, wd, step)  # its score storage's update
                state["step"] = step + 1
        return loss

    def _check_updates(self, entries: list) -> None:
        """FloatingPointError unless every gradient is finite and every parameter's update (a bound
        on ``lr * |direction| * max(1, |W|)``, momentum and coupled decay included) is an fp32 number."""
        tensors = [p.grad for _, _, _, p, _ in entries]
        extra = {}  # entry index -> (index of its momentum buffer or None, index of the parameter or None)
        held = {}  # entry index -> (indices of its part's float state, scale of int8 levels): bounds the state after
        for i, (_, _, group, p, owner) in enumerate(entries):
            if owner is not None:
                names = [f"{owner[1]}_{what}" for what in ("scores", "scale", "drift")]  # what an update changes
                own = [b for b in map(owner[0]._buffers.get, names) if b is not None]
                floats = [b for b in own if b.dtype.is_floating_point]
                held[i] = (list(range(len(tensors), len(tensors) + len(floats))),
                           127.0 if any(b.dtype == torch.int8 for b in own) else 1.0)
                tensors += floats
            buf = self.state.get(p, {}).get("momentum_buffer") if group["momentum"] else None
            plain = owner is None
            b = p_i = None
            if buf is not None:
                b = len(tensors)
                tensors.append(buf)
            if plain and group["weight_decay"]:
                p_i = len(tensors)
                tensors.append(p.detach())
            extra[i] = (b, p_i)
        maxes = max_abs_all(tensors)
        for i, (gi, pi, group, p, owner) in enumerate(entries):
            where = f"parameter {pi} of param group {gi}"
            if not math.isfinite(maxes[i]):
                raise FloatingPointError(f"non-finite gradient in {where}; no score or weight was changed")
            b, p_i = extra[i]
            g = maxes[i] + (group["weight_decay"] * maxes[p_i] if p_i is not None else 0.0)
            mom, buf = group["momentum"], 0.0
            if mom:  # buf = mom * buf + g; the direction is buf, or g + mom * buf with nesterov
                buf = g if b is None else mom * maxes[b] + g
            d = (g + mom * buf if group["nesterov"] else buf) if mom else g
            update = group["lr"] * d * max(1.0, owner[0].sigma if owner is not None else 1.0)
            idx, levels = held.get(i, ([], 1.0))
            state_max = max([maxes[j] for j in idx], default=0.0)
            # |state| after the step, at most: an int8 grid may coarsen its scale by up to twice the update
            after = levels * (state_max + 2.0 * update) if levels > 1 else state_max + update
            if not (max(buf, d, update, after) < _FP32_MAX):
                raise FloatingPointError(
                    f"update of {where} takes its state beyond the fp32 range (lr={group['lr']:g}, max |direction| "
                    f"up to {d:g}); no score or weight was changed"
                )


def _reject_slot_proxies(optimizer: Optimizer, args, kwargs) -> None:
    """Global step pre-hook: only SlotSGD can step a seeded proxy (one stride lookup per parameter)."""
    if isinstance(optimizer, SlotSGD):
        return
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            owner = slot_owner(p) if 0 in p.stride() else None  # proxies are expanded 0-dim tensors
            if owner is not None:
                names = group.get("param_names")
                name = f" {names[pi]!r}" if isinstance(names, (list, tuple)) and pi < len(names) else ""
                raise TypeError(
                    f"{type(optimizer).__name__} cannot train seeded slot layers: parameter {pi}{name} of param "
                    f"group {gi} is slot_{owner[1]} of {type(owner[0]).__name__}({owner[0].extra_repr()}), a "
                    f"gradient proxy only seedslot.SlotSGD can turn into score updates; use seedslot.SlotSGD"
                )


_guard = None  # the hook's handle once installed


def guard_slot_proxies() -> None:
    """Install :func:`_reject_slot_proxies` as a global optimizer step pre-hook, once per process.
    Seeded layers call it when the first one is built: importing seedslot hooks nothing."""
    global _guard
    if _guard is None:
        _guard = register_optimizer_step_pre_hook(_reject_slot_proxies)
