"""Slot Machine layers: seeded (candidates regenerated; int8, fp32 or implicit scores) and the dense
reference.

Seeded layers store only scores (int8 or fp32), or with ``scores="implicit"`` one fp32 drift per
connection from which the scores follow (see :mod:`seedslot.scores`). A forward pass selects one
candidate per connection (greedy or sampled), regenerates just the selected values, and adds a zero-storage proxy Parameter
(``slot_weight``, an expanded 0-dim tensor) so that autograd delivers the effective-weight gradient
G, one fp32 value per connection, as ``slot_weight.grad``. :class:`~seedslot.SlotSGD` turns G into
the straight-through score update ``grad s_k = G * W_k`` chunk by chunk. Hooks, gradient clipping
and ``model.parameters()`` therefore work as for ordinary layers.

The dense reference is the paper's formulation: an fp32 candidate tensor of shape
``(*weight_shape, K)``, an fp32 score Parameter of the same shape, and a straight-through gather
whose backward is ``G[..., None] * candidates``; any torch optimizer trains it. Given the same
shape, k, seed and sharing it holds bit-identical candidates and initial scores to a seeded layer
with ``scores="fp32"``.

Eval mode always selects greedily (the most probable candidate), also for ``selection="sample"``;
training forwards with ``selection="sample"`` draw anew each time, keyed by the ``draws`` counter.
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils.weak import WeakIdKeyDictionary

from . import scores as _scores
from .candidates import (
    CANDIDATES,
    REQUANT,
    ROUND,
    SAMPLE,
    SHARING,
    SCORES as SCORE_STREAM,
    candidate_chunk,
    glorot_sigma,
    grid_step,
    i32,
    init_scores,
    row_chunks,
    selected_chunk,
    stream_keys,
)
from .rng import key32
from .scores import SCORES
from .selection import SELECTION, greedy, sample_chunk

__all__ = ["SlotLinear", "SlotConv2d", "DenseSlotLinear", "DenseSlotConv2d", "slot_owner"]

# proxy Parameter -> (layer, part), for SlotSGD. Weak both ways, so it never keeps a model alive.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def slot_owner(param: torch.Tensor):
    """The seeded layer and part ("weight" or "bias") a proxy Parameter belongs to, or None."""
    entry = _OWNERS.get(param)
    if entry is None:
        return None
    layer = entry[0]()
    return None if layer is None else (layer, entry[1])


def _choice(name: str, value, accepted: Sequence[str]) -> str:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")
    return value


def _nonneg_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


@torch.library.custom_op("seedslot::next_draw_key", mutates_args=("draws",))
def _next_draw_key(draws: torch.Tensor, seed: str) -> torch.Tensor:
    """Advance a layer's draw counter and return the 0-dim int32 sampling key of the draw it held.

    One opaque op, in eager mode and inside a user's torch.compile graph alike: the counter is read
    and the key derived in Python (``key32`` takes arbitrary ints, hence the seed as a string), so
    a compiled model draws exactly the samples eager does, with no graph break and no recompile.
    """
    draw = int(draws)
    draws += 1
    return i32(key32(int(seed), SAMPLE, 2, draw), draws.device)


@_next_draw_key.register_fake
def _(draws: torch.Tensor, seed: str) -> torch.Tensor:
    return draws.new_empty((), dtype=torch.int32)


class _SlotBase(nn.Module):
    """Arguments, Glorot bound and selection shared by every slot layer.

    A layer has one or two *parts*, ``weight`` and optionally ``bias``; a part's connections are
    numbered after those of the parts before it, so the bias is a slot like any weight.
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        fan_in: int,
        fan_out: int,
        bias: bool,
        *,
        k: int,
        seed: int,
        sharing: str,
        selection: str,
        score_lambda: float | None,
        default_lambda: float,
        candidate_seed: int | None,
        device=None,
    ) -> None:
        super().__init__()
        self.k = _nonneg_int("k", k, 1)
        self.seed = _nonneg_int("seed", seed)
        self.sharing = _choice("sharing", sharing, SHARING)
        self.selection = _choice("selection", selection, SELECTION)
        self.candidate_seed = seed if candidate_seed is None else _nonneg_int("candidate_seed", candidate_seed)
        lam = default_lambda if score_lambda is None else score_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"score_lambda must be a finite float > 0 or None; got {score_lambda!r}")
        self.score_lambda = float(lam)
        self.sigma = glorot_sigma(fan_in, fan_out)
        self.weight_shape = tuple(weight_shape)
        self.parts: dict[str, tuple[tuple[int, ...], int]] = {"weight": (self.weight_shape, 0)}
        if bias:
            self.parts["bias"] = ((weight_shape[0],), math.prod(weight_shape))
        if sum(math.prod(s) for s, _ in self.parts.values()) >= 2**31:
            raise ValueError("a slot layer holds at most 2**31 - 1 connections")
        self._per_conn = 1 if sharing == "none" else 0
        self.register_buffer("_cand_step", grid_step(self.sigma).to(device), persistent=False)
        self._set_seeds(self.seed, self.candidate_seed, device)
        # Training forwards so far: keys the sampling noise of selection="sample".
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64, device=device))

    def _set_seeds(self, seed: int, candidate_seed: int, device=None) -> None:
        """Derive every stream key (small non-persistent buffers) from the seeds."""
        self.seed, self.candidate_seed = seed, candidate_seed
        cand_key, cand_keys = stream_keys(candidate_seed, CANDIDATES, self.k, device)
        self.register_buffer("_cand_key", i32(cand_key, device), persistent=False)
        self.register_buffer("_cand_keys", cand_keys, persistent=False)
        self.register_buffer("_sample_keys", stream_keys(seed, SAMPLE, self.k, device)[1], persistent=False)
        self.register_buffer("_round_keys", stream_keys(seed, ROUND, self.k, device)[1], persistent=False)

    def _apply(self, fn, recurse=True):
        # Every buffer of a slot layer defines its weights (keys, candidate grid step, scores and
        # their scales, implicit drifts and bound, the dense reference's candidates, the draw
        # counter): a conversion moves them but never changes their dtype or values. Only the
        # float Parameters (seeded: the proxies; dense: the scores) follow a dtype cast, and the
        # forward computes in their dtype.
        target = fn(torch.zeros((), dtype=self._compute_dtype(), device=self._cand_step.device)).dtype
        if not target.is_floating_point:
            raise TypeError(f"{type(self).__name__} computes in a real floating-point dtype; refusing the "
                            f"conversion to {target} (nothing was changed)")
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _compute_dtype(self) -> torch.dtype:
        """The dtype of the weights a forward produces: the layer's float Parameters' dtype."""
        raise NotImplementedError

    def get_extra_state(self) -> dict:
        """The seeds travel with the scores: a state_dict alone defines the layer's weights (and,
        through ``score_lambda``, the initial scores that implicit scores are relative to)."""
        return {"seed": self.seed, "candidate_seed": self.candidate_seed, "k": self.k, "sharing": self.sharing,
                "score_lambda": self.score_lambda}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise RuntimeError(f"slot state (_extra_state) must be a dict of seeds; got {type(state).__name__}")
        if state.get("k") != self.k or state.get("sharing") != self.sharing:
            raise RuntimeError(
                f"slot state has k={state.get('k')}, sharing={state.get('sharing')!r}; "
                f"this layer has k={self.k}, sharing={self.sharing!r}"
            )
        for key in ("seed", "candidate_seed"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise RuntimeError(f"slot state {key} must be an int >= 0; got {v!r:.80}")
        lam = state.get("score_lambda")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))
                                or not (math.isfinite(lam) and lam > 0)):
            raise RuntimeError(f"slot state score_lambda must be a finite number > 0; got {lam!r:.80}")
        self._set_seeds(state["seed"], state["candidate_seed"], self._cand_step.device)
        if state.get("score_lambda") is not None:  # absent from checkpoints written before it was saved
            self.score_lambda = float(state["score_lambda"])
            if "_score_bound" in self._buffers:  # implicit scores
                self._score_bound.fill_(self.score_lambda * self.sigma)

    # -- what subclasses provide
    def _scores(self, part: str) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(rows, K) scores of a part and the scale that turns them into real scores."""
        raise NotImplementedError

    def _values(self, part: str, idx: torch.Tensor) -> torch.Tensor:
        """(rows,) fp32 selected candidate values for (rows,) indices."""
        raise NotImplementedError

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # -- selection
    def _select(self, part: str, draw: int | torch.Tensor | None) -> torch.Tensor:
        """(rows,) int64 index of the candidate each connection uses; ``draw`` None is greedy, else
        a draw counter value or its sampling key (see :meth:`_sample_key`)."""
        scores, scale = self._scores(part)
        if draw is None:
            return greedy(scores)  # no float temporaries: one pass over the whole part
        offset = self.parts[part][1]
        idx = torch.empty(scores.shape[0], dtype=torch.int64, device=scores.device)
        key_a = self._sample_key(draw)
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=scores.device)
        for a, b in row_chunks(scores.shape[0], self.k, scores):
            idx[a:b] = sample_chunk(scores[a:b], scale_t, i32(offset + a, scores.device), key_a, self._sample_keys)
        return idx

    def _sample_key(self, draw: int | torch.Tensor) -> torch.Tensor:
        """The 0-dim int32 key of the sampling noise of draw number ``draw`` (a key passes through)."""
        if isinstance(draw, torch.Tensor):
            return draw
        return i32(key32(self.seed, SAMPLE, 2, draw), self._cand_keys.device)

    def _next_draw(self) -> torch.Tensor | None:
        """None (greedy), or the sampling key of this training forward's draw (advancing ``draws``)."""
        if not (self.training and self.selection == "sample"):
            return None
        return _next_draw_key(self.draws, str(self.seed))

    @torch.no_grad()
    def selected_index(self, part: str = "weight") -> torch.Tensor:
        """Index of the candidate each connection uses in eval mode, shape of the part."""
        return self._select(part, None).view(self.parts[part][0])

    @torch.no_grad()
    def selected_weight(self) -> torch.Tensor:
        """The weight an eval-mode forward uses (float32, weight shape): the greedy selection."""
        return self._values("weight", self._select("weight", None)).view(self.weight_shape)

    @torch.no_grad()
    def selected_bias(self) -> torch.Tensor | None:
        if "bias" not in self.parts:
            return None
        return self._values("bias", self._select("bias", None))

    def candidates(self, part: str = "weight") -> torch.Tensor:
        """All K candidates of a part, float32 (*shape, K): materialised on request only."""
        raise NotImplementedError

    def _effective(self, part: str, draw: int | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        draw = self._next_draw()
        weight = self._effective("weight", draw)
        bias = self._effective("bias", draw) if "bias" in self.parts else None
        return self._op(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"{self._shape_repr()}, bias={'bias' in self.parts}, k={self.k}, seed={self.seed}, "
            f"sharing={self.sharing!r}, selection={self.selection!r}"
        )

    def _shape_repr(self) -> str:
        return str(self.weight_shape)


class _Seeded(_SlotBase):
    """Scores only; candidates regenerated on demand. See the module docstring."""

    def __init__(self, *args, scores: str = "int8", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scores = _choice("scores", scores, SCORES)
        device = self._cand_keys.device
        dtype = torch.int8 if scores == "int8" else torch.float32
        bound = self.score_lambda * self.sigma
        if scores == "implicit":  # the initial scores are regenerated at every selection
            self.register_buffer("_score_bound", torch.tensor(bound, dtype=torch.float32, device=device),
                                 persistent=False)
            self._set_score_keys(device)
        for part, (shape, offset) in self.parts.items():
            if scores == "implicit":  # s = scale * s0 - drift * W, see seedslot.scores
                self.register_buffer(f"{part}_drift", torch.zeros(shape, dtype=torch.float32, device=device))
                self.register_buffer(f"{part}_scale", torch.ones((), dtype=torch.float32, device=device))
            else:
                init, scale = init_scores(math.prod(shape), self.k, self.seed, bound, offset, dtype, device)
                self.register_buffer(f"{part}_scores", init.view(*shape, self.k))
                self.register_buffer(f"{part}_scale", torch.tensor(scale, dtype=torch.float32, device=device))
            self.register_parameter(f"slot_{part}", nn.Parameter(self._zero_proxy(shape, device)))
            _OWNERS[getattr(self, f"slot_{part}")] = (weakref.ref(self), part)

    def _set_seeds(self, seed: int, candidate_seed: int, device=None) -> None:
        super()._set_seeds(seed, candidate_seed, device)
        if "_score_keys" in self._buffers:  # implicit scores: the initial scores' keys follow the seed
            self._set_score_keys(device)

    def _set_score_keys(self, device) -> None:
        key, keys = stream_keys(self.seed, SCORE_STREAM, self.k, device)
        self.register_buffer("_score_key", i32(key, device), persistent=False)
        self.register_buffer("_score_keys", keys, persistent=False)

    @staticmethod
    def _zero_proxy(shape, device, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=device).expand(shape)

    def _proxy(self, part: str) -> nn.Parameter:
        """The part's proxy Parameter, re-expanded if a copy materialised it (deepcopy, load)."""
        p = getattr(self, f"slot_{part}")
        if any(s != 0 for s in p.stride()) or p.device != self._cand_keys.device:
            self._reset_proxy(part)
        elif not torch.compiler.is_compiling():  # inside a graph: registered by __setstate__ / _apply
            _OWNERS[p] = (weakref.ref(self), part)
        return p

    @torch.compiler.disable
    def _reset_proxy(self, part: str) -> None:
        p = getattr(self, f"slot_{part}")
        p.data = self._zero_proxy(self.parts[part][0], self._cand_keys.device, p.dtype)
        _OWNERS[p] = (weakref.ref(self), part)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for part in self.parts:
            self._proxy(part)
        return self

    def __setstate__(self, state) -> None:
        # deepcopy and pickle: re-expand and register the copies' proxies now, so that a compiled
        # forward (which cannot touch the registry) and SlotSGD find them.
        super().__setstate__(state)
        for part in self.parts:
            self._reset_proxy(part)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for part in self.parts:  # proxies hold no state
            destination.pop(prefix + f"slot_{part}", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        proxies = {prefix + f"slot_{part}" for part in self.parts}
        state_dict = {k: v for k, v in state_dict.items() if k not in proxies}
        for part in self.parts:  # values the update and selection rely on
            implicit = getattr(self, "scores", None) == "implicit"  # its factor may decay to 0
            for name, ok, accepted in (("scale", lambda t: ((t >= 0) if implicit else (t > 0)) & torch.isfinite(t),
                                        "finite and >= 0" if implicit else "finite and > 0"),
                                       ("scores", torch.isfinite, "finite"), ("drift", torch.isfinite, "finite")):
                t = state_dict.get(f"{prefix}{part}_{name}")
                if (isinstance(t, torch.Tensor) and t.dtype.is_floating_point and f"{part}_{name}" in self._buffers
                        and not bool(ok(t).all())):
                    error_msgs.append(f"{prefix}{part}_{name} must be {accepted}")
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in proxies]

    def _compute_dtype(self):
        return self.slot_weight.dtype

    def _scores(self, part):
        """(rows, K) stored scores and their scale; implicit: (rows,) drift and the factor on s0."""
        if self.scores == "implicit":
            return getattr(self, f"{part}_drift").view(-1), getattr(self, f"{part}_scale")
        q = getattr(self, f"{part}_scores")
        return q.view(-1, self.k), getattr(self, f"{part}_scale")

    def _implicit_args(self, part: str, start: torch.Tensor) -> tuple:
        """Arguments after ``drift`` of the implicit-score kernels from connection ``start``."""
        return (getattr(self, f"{part}_scale"), start, self._per_conn, self._cand_key, self._cand_keys,
                self._cand_step, self._score_key, self._score_keys, self._score_bound)

    def _select(self, part, draw):
        if self.scores != "implicit":
            return super()._select(part, draw)
        return self._implicit_select(part, draw)[0]

    def _implicit_select(self, part: str, draw: int | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(index, selected value or None) per connection; greedy gets the values for free."""
        drift, _ = self._scores(part)
        dev = drift.device
        idx = torch.empty(drift.shape[0], dtype=torch.int64, device=dev)
        values = torch.empty(drift.shape[0], device=dev) if draw is None else None
        for a, b in row_chunks(drift.shape[0], self.k, drift if draw is None else None):  # sample: (n, K) scores
            start = i32(self.parts[part][1] + a, dev)
            args = self._implicit_args(part, start)
            if draw is None:
                idx[a:b], values[a:b] = _scores.implicit_greedy_chunk(drift[a:b], *args)
            else:  # a chunk of fp32 scores, then the same Gumbel-max draw as stored scores
                key_a = self._sample_key(draw)
                idx[a:b] = sample_chunk(_scores.implicit_chunk(drift[a:b], *args), torch.ones((), device=dev),
                                        start, key_a, self._sample_keys)
        return idx, values

    @torch.no_grad()
    def score_values(self, part: str = "weight") -> torch.Tensor:
        """The real scores of a part, float32 (*shape, K): int8 levels times the scale, or the
        implicit scores computed from the drift (materialised on request only)."""
        scores, scale = self._scores(part)
        if self.scores != "implicit":
            return (scores.to(torch.float32) * scale).view(*self.parts[part][0], self.k)
        out = torch.empty(scores.shape[0], self.k, device=scores.device)
        for a, b in row_chunks(scores.shape[0], self.k):
            start = i32(self.parts[part][1] + a, scores.device)
            out[a:b] = _scores.implicit_chunk(scores[a:b], *self._implicit_args(part, start))
        return out.view(*self.parts[part][0], self.k)

    def _values(self, part, idx):
        offset = self.parts[part][1]
        out = torch.empty(idx.shape[0], dtype=torch.float32, device=idx.device)
        for a, b in row_chunks(idx.shape[0], 1, idx):
            out[a:b] = selected_chunk(
                idx[a:b], i32(offset + a, idx.device), self._per_conn, self._cand_key, self._cand_keys, self._cand_step
            )
        return out

    def candidates(self, part: str = "weight") -> torch.Tensor:
        shape, offset = self.parts[part]
        rows = math.prod(shape)
        out = torch.empty(rows, self.k, dtype=torch.float32, device=self._cand_keys.device)
        for a, b in row_chunks(rows, self.k):
            out[a:b] = candidate_chunk(
                i32(offset + a, out.device), b - a, self._per_conn, self._cand_key, self._cand_keys, self._cand_step
            )
        return out.view(*shape, self.k)

    def _effective(self, part, draw):
        proxy = self._proxy(part)
        with torch.no_grad():
            if self.scores == "implicit":  # greedy selection hands back the values it regenerated
                idx, w = self._implicit_select(part, draw)
            else:
                idx, w = self._select(part, draw), None
            if w is None:
                w = self._values(part, idx)
            w = w.view(self.parts[part][0]).to(proxy.dtype)  # the module's dtype (fp32: no copy)
        if torch.is_grad_enabled() and proxy.requires_grad:
            w = w + proxy  # proxy is exactly zero: same values, and proxy.grad receives G
        return w

    @torch.no_grad()
    def _update_scores(self, part: str, direction: torch.Tensor, lr: float, weight_decay: float, step: int) -> None:
        """``s_k -= lr * direction * W_k`` for every connection of a part (called by SlotSGD).

        ``weight_decay`` shrinks every score by ``(1 - lr * weight_decay)`` first (for int8, through
        the scale): SGD's decay without momentum, and invisible to greedy selection.
        """
        scores, scale = self._scores(part)
        d = direction.reshape(-1).to(torch.float32)
        offset = self.parts[part][1]
        shrink = 1.0 - lr * weight_decay
        if self.scores == "implicit":  # s = c*s0 - A*W: shrinking scales c and A, the step adds to A
            if weight_decay:
                scores.mul_(shrink)
                scale.mul_(shrink)
            scores.add_(d, alpha=lr)
            return
        if self.scores == "fp32":
            if weight_decay:
                scores.mul_(shrink)
            neg_lr = torch.full((), -lr, dtype=torch.float32, device=d.device)
            for a, b in row_chunks(scores.shape[0], self.k, d):
                scores[a:b] = _scores.fp32_update_chunk(
                    scores[a:b], d[a:b], neg_lr, i32(offset + a, d.device), self._per_conn,
                    self._cand_key, self._cand_keys, self._cand_step,
                )
            return
        if weight_decay:
            scale.mul_(shrink)
            if float(scale) < torch.finfo(torch.float32).tiny:  # scores below the normal fp32 range are 0
                scores.zero_()
                scale.fill_(self.score_lambda * self.sigma / 127.0)
        # one host sync for both numbers the grid decision needs
        d_max, scale_now = torch.stack([torch.linalg.vector_norm(d, math.inf) if d.numel() else d.new_zeros(()),
                                        scale]).tolist()
        factor = _scores.coarsen_factor(lr, d_max, self.sigma, scale_now)
        if factor != 1.0:
            inv = torch.full((), 1.0 / factor, dtype=torch.float32, device=d.device)
            key_a = i32(key32(self.seed, REQUANT, 2, step), d.device)
            for a, b in row_chunks(scores.shape[0], self.k, d):
                scores[a:b] = _scores.requantize_chunk(
                    scores[a:b], inv, i32(offset + a, d.device), key_a, self._round_keys
                )
            scale.mul_(factor)
        coef = (-lr / scale).to(torch.float32)
        round_a = i32(key32(self.seed, ROUND, 2, step), d.device)
        for a, b in row_chunks(scores.shape[0], self.k, d):
            scores[a:b] = _scores.int8_update_chunk(
                scores[a:b], d[a:b], coef, i32(offset + a, d.device), self._per_conn, self._cand_key,
                self._cand_keys, self._cand_step, round_a, self._round_keys,
            )


class _StraightThrough(torch.autograd.Function):
    """Gather the selected candidate; backward is ``grad s_k = G * W_k`` (the paper's estimator)."""

    @staticmethod
    def forward(ctx, scores, candidates, idx):
        ctx.save_for_backward(candidates)
        ctx.dtype = scores.dtype  # the module's dtype; candidates stay fp32
        return candidates.gather(-1, idx.unsqueeze(-1)).squeeze(-1).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        (candidates,) = ctx.saved_tensors
        return (grad.unsqueeze(-1) * candidates).to(ctx.dtype), None, None


class _Dense(_SlotBase):
    """The paper's dense formulation, for side-by-side comparison. See the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        device = self._cand_keys.device
        for part, (shape, offset) in self.parts.items():
            rows = math.prod(shape)
            cand = torch.empty(rows, self.k, dtype=torch.float32, device=device)
            for a, b in row_chunks(rows, self.k):
                cand[a:b] = candidate_chunk(
                    i32(offset + a, device), b - a, self._per_conn, self._cand_key, self._cand_keys, self._cand_step
                )
            init, _ = init_scores(rows, self.k, self.seed, self.score_lambda * self.sigma, offset, torch.float32, device)
            self.register_buffer(f"{part}_candidates", cand.view(*shape, self.k))
            self.register_parameter(f"{part}_scores", nn.Parameter(init.view(*shape, self.k)))

    def _compute_dtype(self):
        return self.weight_scores.dtype

    def _scores(self, part):
        return getattr(self, f"{part}_scores").detach().view(-1, self.k), 1.0

    def _values(self, part, idx):
        cand = getattr(self, f"{part}_candidates").view(-1, self.k)
        return cand.gather(-1, idx.unsqueeze(-1)).squeeze(-1)

    def candidates(self, part: str = "weight") -> torch.Tensor:
        return getattr(self, f"{part}_candidates").detach().clone()

    def _effective(self, part, draw):
        shape = self.parts[part][0]
        idx = self._select(part, draw).view(shape)
        return _StraightThrough.apply(getattr(self, f"{part}_scores"), getattr(self, f"{part}_candidates"), idx)


# ---------------------------------------------------------------- shapes and ops


class _Linear:
    def _setup(self, base, in_features: int, out_features: int, bias: bool, kw: dict) -> None:
        in_features = _nonneg_int("in_features", in_features, 1)
        out_features = _nonneg_int("out_features", out_features, 1)
        base.__init__(self, (out_features, in_features), in_features, out_features, bias, default_lambda=0.1, **kw)
        self.in_features, self.out_features = in_features, out_features

    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair; ValueError naming ``name`` otherwise."""
    pair = _pair(value)
    if not (isinstance(pair, tuple) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them; got {value!r}")
    return pair


class _Conv:
    def _setup(self, base, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, kw):
        in_channels = _nonneg_int("in_channels", in_channels, 1)
        out_channels = _nonneg_int("out_channels", out_channels, 1)
        groups = _nonneg_int("groups", groups, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        kh, kw_ = _int_pair("kernel_size", kernel_size, 1)
        stride, dilation = _int_pair("stride", stride, 1), _int_pair("dilation", dilation, 1)
        if isinstance(padding, str) and padding in ("valid", "same"):
            if padding == "same" and stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as nn.Conv2d); got stride={stride}")
        else:
            try:
                padding = _int_pair("padding", padding, 0)
            except (ValueError, TypeError):
                raise ValueError(f"padding must be 'valid', 'same', an int >= 0 or a pair of them; "
                                 f"got {padding!r}") from None
        rf = kh * kw_
        shape = (out_channels, in_channels // groups, kh, kw_)
        base.__init__(self, shape, shape[1] * rf, out_channels * rf, bias, default_lambda=1.0, **kw)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw_)
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.padding = padding

    def _op(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _shape_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
        )


class SlotLinear(_Linear, _Seeded):
    """A Linear whose weights are chosen among K seeded candidates per connection.

    ``scores="int8"`` stores K int8 scores per connection (``"fp32"``: K fp32 scores, for
    ablations; ``"implicit"``: one fp32 drift, see :mod:`seedslot.scores`). ``score_lambda``
    defaults to the paper's 0.1 for linear layers.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, k: int = 8, seed: int = 0,
                 sharing: str = "none", selection: str = "greedy", scores: str = "int8",
                 score_lambda: float | None = None, candidate_seed: int | None = None, device=None) -> None:
        self._setup(_Seeded, in_features, out_features, bias, dict(
            k=k, seed=seed, sharing=sharing, selection=selection, scores=scores,
            score_lambda=score_lambda, candidate_seed=candidate_seed, device=device))


class SlotConv2d(_Conv, _Seeded):
    """A Conv2d whose weights are chosen among K seeded candidates per connection (lambda 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, k: int = 8, seed: int = 0, sharing: str = "none",
                 selection: str = "greedy", scores: str = "int8", score_lambda: float | None = None,
                 candidate_seed: int | None = None, device=None) -> None:
        self._setup(_Seeded, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, dict(
            k=k, seed=seed, sharing=sharing, selection=selection, scores=scores,
            score_lambda=score_lambda, candidate_seed=candidate_seed, device=device))


class DenseSlotLinear(_Linear, _Dense):
    """The paper's dense slot Linear: stored candidates and fp32 score Parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, k: int = 8, seed: int = 0,
                 sharing: str = "none", selection: str = "greedy", score_lambda: float | None = None,
                 candidate_seed: int | None = None, device=None) -> None:
        self._setup(_Dense, in_features, out_features, bias, dict(
            k=k, seed=seed, sharing=sharing, selection=selection,
            score_lambda=score_lambda, candidate_seed=candidate_seed, device=device))


class DenseSlotConv2d(_Conv, _Dense):
    """The paper's dense slot Conv2d: stored candidates and fp32 score Parameter."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, k: int = 8, seed: int = 0, sharing: str = "none",
                 selection: str = "greedy", score_lambda: float | None = None,
                 candidate_seed: int | None = None, device=None) -> None:
        self._setup(_Dense, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, dict(
            k=k, seed=seed, sharing=sharing, selection=selection,
            score_lambda=score_lambda, candidate_seed=candidate_seed, device=device))
