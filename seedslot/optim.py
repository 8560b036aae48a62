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
an fp32 number (e.g. lr 1e30 times gradients of 1e12) raises FloatingPointError. By default
(``check="deferred"``) that check is made on the device, with no host read: a bad step's writes
become no-ops there (masked gradients and directions, momentum multiplied by 1, weight decay by 1),
and so do those of every later step until the host reads the verdict, at :meth:`SlotSGD.check` or
:meth:`SlotSGD.state_dict` (the training loop calls ``check()`` where it reads the loss). The error
then names the first bad parameter of the first bad step, as ``check="eager"`` does from ``step()``
(one host sync per step), and the host-side state the skipped steps advanced (step counts, momentum
buffers they created) is rolled back, so that either mode continues with the same bits. Deferred
needs all parameters on one device and real floating gradients; other steps are checked eagerly.
Hyper-parameters are Python numbers: they are checked on the host before anything changes.

``foreach=True`` (default) updates the ordinary parameters and the momentum buffers of every part
with torch's multi-tensor ops (like torch.optim.SGD's foreach), and the scores of all parts of one
storage with one ``ScoreStorage.update_group`` call per param group: implicit drifts by multi-tensor
ops, int8 and fp32 scores on CUDA by packed Triton kernels over a table of the parts (one launch
per column tile width), their per-part numbers (the int8 grid decision, scales, rounding keys) as
vectors. The optimizer's launches per step do not depend on the number of layers (on the CPU the
int8 and fp32 kernels still run once per part, as the per-part update does). ``foreach=False``
updates one parameter at a time; both give the same bits.

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

from .ops import constants
from .updates import max_abs_all
from .proxies import slot_owner
from .validate import check_float


_FP32_MAX = float(torch.finfo(torch.float32).max)
CHECKS = ("deferred", "eager")  # when a bad step raises: at the next host read, or from step()


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
    """SGD for seeded slot layers (straight-through score updates) and ordinary parameters.

    ``check`` says when a bad step (a non-finite gradient, an update beyond the fp32 range) raises:
    ``"deferred"`` (the default) decides on the device and makes the step a no-op there, raising at
    the next read (:meth:`check`, :meth:`state_dict`); ``"eager"`` reads the decision back at once
    (one host sync per step) and raises from ``step()``. ``foreach`` (default True) updates the
    ordinary parameters, all momentum buffers and all scores with multi-tensor ops and packed
    kernels (launches per step independent of the number of layers); False loops per parameter.
    Every combination gives the same bits.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        check: str = "deferred",
        foreach: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        _check_group(defaults, lr_min_open=True)
        if check not in CHECKS:
            raise ValueError(f"check must be one of {', '.join(map(repr, CHECKS))}; got {check!r}")
        if not isinstance(foreach, bool):
            raise ValueError(f"foreach must be True or False; got {foreach!r}")
        super().__init__(params, {key: v if isinstance(v, bool) else float(v) for key, v in defaults.items()})
        for gi, group in enumerate(self.param_groups):
            _check_group(group, f" in param group {gi}", lr_min_open=True)
        self.check_mode, self.foreach = check, foreach
        # self._pending, the device-side record of deferred checks since the last read: made by add_param_group
        self._counts: dict = {}  # proxy -> its step count on the device (see _count)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_pending", None) is not None:
            self.check()  # a pending bad step is raised before the rows change
        self._pending = _Pending.of(self.param_groups)  # made on the host: a compiled step only updates it

    def __getstate__(self) -> dict:  # torch's keeps defaults, state and param_groups; the checks pend on no copy
        return {**super().__getstate__(), "check_mode": self.check_mode, "foreach": self.foreach}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("check_mode", "deferred")
        self.__dict__.setdefault("foreach", True)
        self.__dict__.setdefault("_pending", _Pending.of(self.param_groups))
        self.__dict__.setdefault("_counts", {})

    def check(self) -> None:
        """Raise the FloatingPointError of the first bad step since the last read, if any (one host
        sync when deferred steps ran since then; nothing otherwise). That step and every later one
        changed nothing on the device; the host-side state (step counts, buffers they created) is
        rolled back here, so the optimizer can go on from the state before the bad step."""
        pending = self._pending
        if pending is None or not pending.unread:
            return
        pending.unread = False
        if not bool(pending.bad):  # the one host read of a good run
            pending.created.clear()
            pending.fresh.clear()
            return
        rows, skipped = pending.snap.tolist(), pending.skipped.tolist()
        created = pending.created_bad.tolist()
        message = None
        for i, (g_max, d_max, lr, bad) in enumerate(rows):
            if bad and message is None:
                where = pending.where[i]
                if not math.isfinite(g_max):
                    message = f"non-finite gradient in {where}; no score or weight was changed"
                else:
                    message = (f"update of {where} is beyond the fp32 range (lr={lr:g}, max |direction| "
                               f"up to {d_max:g}); no score or weight was changed")
        for i, p in enumerate(pending.params):  # undo what the host did for the steps the device skipped
            state = self.state.get(p)
            if state is None:
                continue
            if skipped[i] and "step" in state:
                state["step"] -= int(skipped[i])
                if not state["step"]:  # a part's first step was skipped: as if never stepped
                    del state["step"]
            if created[i] and i in pending.created:
                state.pop("momentum_buffer", None)
            if skipped[i] and i in pending.fresh and not state:  # an entry a skipped step made
                del self.state[p]
        pending.created.clear()
        pending.fresh.clear()
        pending.bad.fill_(False)
        pending.skipped.zero_()
        pending.created_bad.fill_(False)
        raise FloatingPointError(message or "a deferred check failed; no score or weight was changed")

    def state_dict(self) -> dict:
        """As torch's, after :meth:`check` (a pending bad step raises here)."""
        self.check()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, after checking the saved hyper-parameters, counters and momentum buffers
        (ValueError naming the first bad one; nothing is changed then). A deferred check not yet
        read is dropped: the loaded state replaces what it guarded."""
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
        self._pending = _Pending.of(self.param_groups)
        self._counts.clear()  # made again from the loaded steps

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Hyper-parameters are Python numbers: checked on the host, before anything changes.
        for gi, group in enumerate(self.param_groups):
            _check_group(group, f" in param group {gi}")
        entries = [(gi, pi, group, p, slot_owner(p)) for gi, group in enumerate(self.param_groups)
                   for pi, p in enumerate(group["params"]) if p.grad is not None]
        if not entries:
            return loss
        for _, _, _, p, owner in entries:
            if owner is None and p.numel() > 1 and 0 in p.stride():
                raise RuntimeError(
                    "SlotSGD got a slot proxy parameter whose layer is gone or was copied "
                    "without a forward pass; run a forward pass before step()"
                )
        ok = None
        if self.check_mode == "eager" or not self._deferrable(entries):
            # Every gradient and every update checked before touching anything: a bad one leaves
            # all scores unchanged. One max-norm per tensor (NaN and inf propagate), one sync.
            self._check_updates(entries)
        else:
            ok = self._device_check(entries)
        (self._step_foreach if self.foreach else self._step_each)(entries, ok)
        return loss

    def _step_each(self, entries: list, ok: torch.Tensor | None) -> None:
        """The update, one parameter at a time. ``ok`` (deferred checks): a 0-dim bool; where it is
        False every write below leaves its tensor as it was."""
        for _, _, group, p, owner in entries:
            mom, wd, nesterov = group["momentum"], group["weight_decay"], group["nesterov"]
            g = p.grad
            if owner is None and wd:
                g = g.add(p, alpha=wd)
            if ok is not None:
                g = torch.where(ok, g, -0.0)  # x + (-0.0) is x for every x, -0.0 included
            state = self.state[p]
            if mom:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(g).detach()
                    self._created(p, ok)
                else:
                    buf.mul_(mom if ok is None else _keep(ok, mom, buf.dtype)).add_(g)
                d = g.add(buf, alpha=mom) if nesterov else buf
            else:
                d = g
            if ok is not None:
                d = torch.where(ok, d, 0.0 if owner is None else -0.0)
            self._apply(p, owner, d, group, ok)

    def _step_foreach(self, entries: list, ok: torch.Tensor | None) -> None:
        """:meth:`_step_each` with torch's multi-tensor ops: a number of launches per param group,
        not per parameter, for the gradients, ordinary parameters, momentum buffers and scores
        (:meth:`_update_scores`). The same operations, so the same bits."""
        spans, start = [], 0  # (start, end, group): entries are in param-group order
        while start < len(entries):
            group, end = entries[start][2], start
            while end < len(entries) and entries[end][2] is group:
                end += 1
            spans.append((start, end, group))
            start = end
        grads = [p.grad for _, _, _, p, _ in entries]
        for start, end, group in spans:  # coupled weight decay of the ordinary parameters
            plain = [i for i in range(start, end) if entries[i][4] is None]
            if group["weight_decay"] and plain:
                decayed = torch._foreach_add([grads[i] for i in plain], [entries[i][3] for i in plain],
                                             alpha=group["weight_decay"])
                for i, g in zip(plain, decayed):
                    grads[i] = g
        if ok is not None:  # one masked copy of all gradients (torch.where has no multi-tensor form)
            flat = torch.where(ok, torch.cat([g.reshape(-1) for g in grads]), -0.0)
            grads = [t.view(g.shape) for t, g in zip(flat.split([g.numel() for g in grads]), grads)]
        for start, end, group in spans:
            self._group_foreach(entries[start:end], grads[start:end], group, ok)

    def _group_foreach(self, entries: list, grads: list, group: dict, ok: torch.Tensor | None) -> None:
        lr, mom, nesterov = group["lr"], group["momentum"], group["nesterov"]
        states = [self.state[e[3]] for e in entries]  # made (maybe empty) for every stepped parameter, as by step_each
        plain = [i for i, e in enumerate(entries) if e[4] is None]
        if mom:
            old, bufs, olds = [], [None] * len(entries), []
            for i, (_, _, _, p, _) in enumerate(entries):
                state = states[i]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(grads[i]).detach()
                    self._created(p, ok)
                else:
                    old.append(i)
                    olds.append(buf)
                bufs[i] = buf
            if olds:
                torch._foreach_mul_(olds, mom if ok is None else _keep(ok, mom, olds[0].dtype))
                torch._foreach_add_(olds, [grads[i] for i in old])
            dirs = torch._foreach_add(grads, bufs, alpha=mom) if nesterov else bufs
        else:
            dirs = grads
        if ok is not None:
            # finite here: the gradients are masked, the buffers unchanged
            dirs = torch._foreach_mul(dirs, ok.to(dirs[0].dtype))
        if plain:
            torch._foreach_add_([entries[i][3] for i in plain], [dirs[i] for i in plain], alpha=-lr)
        self._update_scores([(e[3], e[4], d) for e, d in zip(entries, dirs) if e[4] is not None], group, ok)

    def _update_scores(self, seeded: list, group: dict, ok: torch.Tensor | None) -> None:
        """:meth:`_apply` of every ``(proxy, owner, direction)`` of ``seeded``, one param group's: one
        ``update_group`` call per score storage and device, whose launches do not grow with the
        number of parts, and the step counts advanced by one multi-tensor op."""
        lr, wd = group["lr"], group["weight_decay"]
        by: dict = {}  # (storage, device) -> its parts, in order
        for p, owner, d in seeded:
            by.setdefault((owner[0].storage, p.device), []).append((p, owner, d))
        for (storage, device), got in by.items():
            decay = None
            if wd:  # decoupled: one factor for all the parts, 1 where a deferred check failed
                decay = _keep(ok, 1.0 - lr * wd) if ok is not None else torch.full(
                    (), 1.0 - lr * wd, dtype=torch.float32, device=device)
            steps = [self.state[p].get("step", 0) for p, _, _ in got]
            counts = [self._count(p, s) for (p, _, _), s in zip(got, steps)] if storage.keyed_by_step else steps
            storage.update_group([owner for _, owner, _ in got], [d for _, _, d in got], lr, decay, counts)
            for (p, _, _), s in zip(got, steps):
                self.state[p]["step"] = s + 1
            if storage.keyed_by_step:  # a skipped step (ok False) does not count, as check() rolls back step
                if ok is None:
                    torch._foreach_add_(counts, 1)
                else:  # the list form: dynamo reads a tensor scalar of a multi-tensor op back to the host
                    torch._foreach_add_(counts, [ok.to(torch.int64)] * len(counts))

    def _apply(self, p: torch.Tensor, owner, d: torch.Tensor, group: dict, ok: torch.Tensor | None) -> None:
        """Move ``p`` (an ordinary parameter) or its layer's part's scores (a proxy) along ``-d``."""
        if owner is None:
            p.add_(d, alpha=-group["lr"])
        else:
            self._update_scores([(p, owner, d)], group, ok)

    def _count(self, p: torch.Tensor, step: int) -> torch.Tensor:
        """``state["step"]`` of ``p`` as a 0-dim int64 tensor on its device, made from the int once
        (after construction or a load) and then advanced there: what keys a storage's stochastic
        rounding, without a host-to-device copy or a new compiled graph per step."""
        count = self._counts.get(p)
        if count is None:
            count = self._counts[p] = torch.full((), step, dtype=torch.int64, device=p.device)
        return count

    # ------------------------------------------------------------------ the checks

    def _check_updates(self, entries: list) -> None:
        """FloatingPointError unless every gradient is finite and every parameter's update (a bound
        on ``lr * |direction| * max(1, |W|)``, momentum and coupled decay included) is an fp32 number."""
        tensors = [p.grad for _, _, _, p, _ in entries]
        extra = {}  # entry index -> (index of its momentum buffer or None, index of the parameter or None)
        held = {}  # entry index -> (indices of its part's float state, scale of int8 levels): bounds the state after
        for i, (_, _, group, p, owner) in enumerate(entries):
            if owner is not None:
                floats, levels = owner[0].storage.moved(*owner)
                held[i] = (list(range(len(tensors), len(tensors) + len(floats))), levels)
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

    def _deferrable(self, entries: list) -> bool:
        """Whether this step can be checked on the device: gradients of one dtype, fp32 or fp64 (see
        :func:`_keep`), on one device."""
        device, dtype = entries[0][3].device, entries[0][3].grad.dtype
        if dtype not in (torch.float32, torch.float64):
            return False
        for _, _, group, p, owner in entries:
            if p.device != device or p.grad.dtype != dtype or p.dtype != dtype:
                return False
        return True

    def _device_check(self, entries: list) -> torch.Tensor:
        """:meth:`_check_updates`' decision made on the device, without a host read: the 0-dim bool
        "this step may write", False from the first bad step until :meth:`check` reads it. The first
        bad step's numbers are kept for the error message; the steps skipped, for the rollback."""
        params = [p for group in self.param_groups for p in group["params"]]
        device = entries[0][3].device
        pending = self._pending
        if pending is not None and (len(pending.params) != len(params) or pending.device != device
                                    or any(a is not b for a, b in zip(pending.params, params))):
            self.check()  # the parameters changed (add_param_group, a move): read, then start afresh
            pending = None
        if pending is None:
            pending = self._pending = _Pending(self.param_groups, device)
        index = {id(p): i for i, p in enumerate(params)}
        rows = [index[id(p)] for _, _, _, p, _ in entries]
        pending.fresh.update(i for i, (_, _, _, p, _) in zip(rows, entries) if p not in self.state)
        norms = torch._foreach_norm([p.grad for _, _, _, p, _ in entries], math.inf)
        zero = norms[0].new_zeros(())
        bufs, plains = [], []  # (entry index, tensor)
        for i, (_, _, group, p, owner) in enumerate(entries):
            buf = self.state.get(p, {}).get("momentum_buffer") if group["momentum"] else None
            if buf is not None:
                bufs.append((i, buf))
            if owner is None and group["weight_decay"]:
                plains.append((i, p.detach()))
        b_max, p_max = [zero] * len(entries), [zero] * len(entries)
        for found, out in ((bufs, b_max), (plains, p_max)):
            if found:
                for (i, _), m in zip(found, torch._foreach_norm([t for _, t in found], math.inf)):
                    out[i] = m
        # the state an update moves (scores, scales, drifts), bounded after the step as _check_updates does
        levels = [1.0] * len(entries)
        moved = [(i, *e[4][0].storage.moved(*e[4])) for i, e in enumerate(entries) if e[4] is not None]
        flat = [t for _, ts, _ in moved for t in ts]
        if flat:  # each entry's largest, through an (entries, most tensors) table: launches per step, not per part
            width = max(len(ts) for _, ts, _ in moved)
            at = constants(tuple(i * width + j for i, ts, _ in moved for j in range(len(ts))), torch.int64, device)
            maxes = torch.stack(torch._foreach_norm(flat, math.inf)).to(zero.dtype)
            s_max = zero.new_zeros(len(entries) * width).index_copy_(0, at, maxes).view(-1, width).amax(1)
            for i, _, lv in moved:
                levels[i] = lv
        else:
            s_max = zero.new_zeros(len(entries))
        stack = torch.stack([torch.stack(norms), torch.stack(b_max), torch.stack(p_max), s_max]).to(torch.float64)
        cols, start = [], 0  # per param group: the same arithmetic as _check_updates, in float64
        while start < len(entries):
            group = entries[start][2]
            end = start
            while end < len(entries) and entries[end][2] is group:
                end += 1
            gm, bm, pm, sm = stack[:, start:end]
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            g = gm + wd * pm if wd else gm
            buf = mom * bm + g if mom else torch.zeros_like(g)  # bm is 0 where there is no buffer yet
            d = (g + mom * buf if group["nesterov"] else buf) if mom else g
            sigma = constants(tuple(max(1.0, e[4][0].sigma if e[4] is not None else 1.0) for e in entries[start:end]),
                              torch.float64, device)
            update = lr * d * sigma
            lv = constants(tuple(levels[start:end]), torch.float64, device)
            # |state| after the step, at most: an int8 grid may coarsen its scale by up to twice the update
            after = torch.where(lv > 1, lv * (sm + 2.0 * update), sm + update)
            bad = ~torch.isfinite(gm) | ~((buf < _FP32_MAX) & (d < _FP32_MAX) & (update < _FP32_MAX)
                                          & (after < _FP32_MAX))
            cols.append(torch.stack([gm, d, torch.full_like(gm, lr), bad.to(torch.float64)], -1))
            start = end
        step_rows = torch.cat(cols) if len(cols) > 1 else cols[0]
        step_bad = step_rows[:, 3].any()
        first = step_bad & ~pending.bad  # this is the first bad step since the last read
        idx = constants(tuple(rows), torch.int64, device)
        if len(rows) == len(params):
            full = step_rows
        else:
            full = torch.zeros_like(pending.snap).index_copy_(0, idx, step_rows)
        pending.snap.copy_(torch.where(first, full, pending.snap))
        pending.bad.logical_or_(step_bad)
        pending.skipped.index_add_(0, idx, pending.bad.to(torch.int64).expand(len(rows)))
        pending.unread = True
        return ~pending.bad

    def _created(self, p: torch.Tensor, ok: torch.Tensor | None) -> None:
        """Note that ``p``'s momentum buffer was made at this step (dropped again if the step fails)."""
        if ok is not None:
            pending = self._pending
            i = next(i for i, q in enumerate(pending.params) if q is p)
            pending.created_bad[i] = ~ok
            pending.created.add(i)


class _Pending:
    """What deferred checks keep on the device between host reads (fixed shapes: one row per
    parameter of the optimizer, in param-group order)."""

    @staticmethod
    def of(groups: list) -> "_Pending | None":
        params = [p for group in groups for p in group["params"]]
        return _Pending(groups, params[0].device) if params else None

    def __init__(self, groups: list, device: torch.device) -> None:
        self.params = [p for group in groups for p in group["params"]]
        self.where = [f"parameter {pi} of param group {gi}" for gi, group in enumerate(groups)
                      for pi in range(len(group["params"]))]
        n = len(self.params)
        self.device = device
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # a bad step since the last read
        self.snap = torch.zeros(n, 4, dtype=torch.float64, device=device)  # first bad step: |g|, |d|, lr, bad
        self.skipped = torch.zeros(n, dtype=torch.int64, device=device)  # steps the device skipped per param
        self.created_bad = torch.zeros(n, dtype=torch.bool, device=device)  # buffer made by a skipped step
        self.created: set[int] = set()  # rows whose momentum buffer was made since the last read
        self.fresh: set[int] = set()  # rows that had no optimizer state at the last read
        self.unread = False


def _keep(ok: torch.Tensor, factor: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0-dim ``factor`` where ``ok``, else 1.0 (a multiplication that keeps its tensor). In fp32 or
    fp64, multiplying by it gives the bits of multiplying by the Python number (which torch rounds to
    the tensor's dtype); not so in half precision, which deferred checks therefore leave out."""
    return torch.where(ok, torch.full((), factor, dtype=dtype, device=ok.device), 1.0)


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
