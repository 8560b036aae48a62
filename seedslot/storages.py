"""Score storages: how a seeded slot layer keeps the scores of its connections.

One class per storage, chosen once from its name (:func:`storage_for`) when a layer is built:

- :class:`Int8Scores` (``"int8"``): K int8 levels per connection and one fp32 scale per part;
- :class:`Fp32Scores` (``"fp32"``): K fp32 scores per connection (the scale stays 1);
- :class:`ImplicitScores` (``"implicit"``): one fp32 drift per connection, scores ``c*s0 - A*W``.

A storage holds no tensors itself: it registers its state as buffers of the layer (so state_dict
keys, ``.to()`` and copies work as for any module) and reads them back by name. The interface,
:class:`ScoreStorage`, is what a seeded layer and SlotSGD use: register the state, select greedily
(with the selected values when they come for free), sample, materialise the scores, update them.
What a storage reads from its layer: ``k``, ``seed``, ``sigma``, ``score_lambda``, ``parts`` and the
keys ``candidate_keys``, ``sample_keys``, ``round_keys`` (see :mod:`seedslot.layers`).

This module also keeps the registry from the layers' proxy Parameters to their layers
(:func:`slot_owner`), so that the optimizer finds a layer's storage without importing the layers.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from .candidates import Stream, init_scores, stream_keys
from .ops import InitialScoreKeys, i32
from .rng import key32
from .selection import greedy, greedy_values, sample
from .updates import coarsen_factor, max_abs

__all__ = ["SCORES", "ScoreStorage", "Int8Scores", "Fp32Scores", "ImplicitScores", "IncrementalImplicitScores", "STORAGES",
           "INCREMENTAL", "storage_for",
           "register_proxy", "slot_owner"]

SCORES = ("int8", "fp32", "implicit")  # the storages' names

# proxy Parameter -> (layer, part), for SlotSGD. Weak both ways, so it never keeps a model alive.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_proxy(param: torch.Tensor, layer: nn.Module, part: str) -> None:
    """Record that ``param`` is the proxy Parameter of ``layer``'s ``part``."""
    _OWNERS[param] = (weakref.ref(layer), part)


def slot_owner(param: torch.Tensor):
    """The seeded layer and part ("weight" or "bias") a proxy Parameter belongs to, or None."""
    entry = _OWNERS.get(param)
    if entry is None:
        return None
    layer = entry[0]()
    return None if layer is None else (layer, entry[1])


class ScoreStorage:
    """The scores of a seeded layer's parts. Stateless: every method takes the layer and reads the
    buffers it registered there. ``rows`` below is the number of connections of a part."""

    name = ""

    def register_layer(self, layer: nn.Module) -> None:
        """Register the layer-wide state (after the layer's keys, before any part)."""

    def reseed(self, layer: nn.Module) -> None:
        """Re-derive what follows the layer's seeds and ``score_lambda`` after they changed (load)."""

    def register(self, layer: nn.Module, part: str, shape: tuple[int, ...], offset: int) -> None:
        """Register the initial state of a part of ``shape``, its first connection ``offset``."""
        raise NotImplementedError

    def state(self, part: str) -> dict[str, str]:
        """The part's state, as buffer name -> what it is (a memory category: "scores" or "other")."""
        raise NotImplementedError

    def load_checks(self, part: str) -> list[tuple[str, object, str]]:
        """``(buffer name, predicate on a loaded float tensor, what it must be)`` for state_dict loads."""
        raise NotImplementedError

    def greedy(self, layer: nn.Module, part: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows,) argmax index (lowest on ties), and the (rows,) fp32 selected values when the
        selection regenerated them anyway (else None). The index is int64 when the values are None,
        and may be a narrower integer dtype (a cache's) when they are given."""
        raise NotImplementedError

    def lend(self, layer: nn.Module, part: str, w: torch.Tensor) -> torch.Tensor | None:
        """Before an autograd graph keeps ``w`` (greedy()'s values, maybe viewed): None, or, where
        ``w`` is a cache the storage rewrites in place, a token for the graph to save with it: while
        the token lives, the cache is written in a copy."""
        return None

    def sample(self, layer: nn.Module, part: str, key: torch.Tensor) -> torch.Tensor:
        """(rows,) int64 Gumbel-max draw from softmax(scores), keyed by the 0-dim int32 ``key``."""
        raise NotImplementedError

    def scores(self, layer: nn.Module, part: str) -> torch.Tensor:
        """The real scores, (rows, K) fp32: materialised on request only."""
        raise NotImplementedError

    def update(self, layer: nn.Module, part: str, direction: torch.Tensor, lr: float, weight_decay: float,
               step: int) -> None:
        """``s_k -= lr * direction * W_k`` for every connection of a part, after shrinking every score
        by ``(1 - lr * weight_decay)``; ``step`` keys stochastic rounding."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t)


class _Stored(ScoreStorage):
    """K scores per connection held as ``{part}_scores`` (*shape, K) and ``{part}_scale``."""

    dtype = torch.float32

    def register(self, layer, part, shape, offset):
        device = layer.candidate_keys.keys.device
        init, scale = init_scores(math.prod(shape), layer.k, layer.seed, layer.score_lambda * layer.sigma, offset,
                                  self.dtype, device)
        layer.register_buffer(f"{part}_scores", init.view(*shape, layer.k))
        layer.register_buffer(f"{part}_scale", torch.tensor(scale, dtype=torch.float32, device=device))

    def state(self, part):
        return {f"{part}_scores": "scores", f"{part}_scale": "other"}

    def load_checks(self, part):
        return [(f"{part}_scale", lambda t: (t > 0) & torch.isfinite(t), "finite and > 0"),
                (f"{part}_scores", _finite, "finite")]

    @staticmethod
    def stored(layer, part) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, K) stored scores and the 0-dim scale that turns them into real scores."""
        return getattr(layer, f"{part}_scores").view(-1, layer.k), getattr(layer, f"{part}_scale")

    def greedy(self, layer, part):
        return greedy(self.stored(layer, part)[0]), None  # no float temporaries: one pass over the part

    def sample(self, layer, part, key):
        scores, scale = self.stored(layer, part)
        return sample(scores, scale, layer.parts[part][1], key, layer.sample_keys)

    def scores(self, layer, part):
        scores, scale = self.stored(layer, part)
        return scores.to(torch.float32) * scale


class Fp32Scores(_Stored):
    """K fp32 scores per connection, for ablations."""

    name = "fp32"

    def update(self, layer, part, direction, lr, weight_decay, step):
        scores, _ = self.stored(layer, part)
        d = direction.reshape(-1).to(torch.float32)
        if weight_decay:
            scores.mul_(1.0 - lr * weight_decay)
        neg_lr = torch.full((), -lr, dtype=torch.float32, device=d.device)
        ops.fp32_update_(scores, d, neg_lr, layer.parts[part][1], layer.candidate_keys)


class Int8Scores(_Stored):
    """K int8 levels per connection and one fp32 scale per part (see :mod:`seedslot.updates`)."""

    name = "int8"
    dtype = torch.int8

    def greedy(self, layer, part):
        scores, _ = self.stored(layer, part)
        got = greedy_values(scores, layer.parts[part][1], layer.candidate_keys)  # index and value in one pass
        return got if got is not None else super().greedy(layer, part)

    def update(self, layer, part, direction, lr, weight_decay, step):
        scores, scale = self.stored(layer, part)
        d = direction.reshape(-1).to(torch.float32)
        offset = layer.parts[part][1]
        if weight_decay:  # through the scale: costs nothing
            scale.mul_(1.0 - lr * weight_decay)
            if float(scale) < torch.finfo(torch.float32).tiny:  # scores below the normal fp32 range are 0
                scores.zero_()
                scale.fill_(layer.score_lambda * layer.sigma / 127.0)
        # one host sync for both numbers the grid decision needs
        d_max, scale_now = torch.stack([max_abs(d) if d.numel() else d.new_zeros(()), scale]).tolist()
        factor = coarsen_factor(lr, d_max, layer.sigma, scale_now)
        round_keys = layer.round_keys
        if factor != 1.0:
            inv = torch.full((), 1.0 / factor, dtype=torch.float32, device=d.device)
            ops.requantize_(scores, inv, offset, i32(key32(layer.seed, Stream.REQUANT, 2, step), d.device), round_keys)
            scale.mul_(factor)
        coef = (-lr / scale).to(torch.float32)
        round_a = i32(key32(layer.seed, Stream.ROUND, 2, step), d.device)
        ops.int8_update_(scores, d, coef, offset, layer.candidate_keys, round_a, round_keys)


_BOUND, _SCORE_KEY, _SCORE_KEYS = "_score_bound", "_score_key", "_score_keys"


def _initial_score_keys(layer) -> InitialScoreKeys:
    """What regenerates implicit scores' initial scores s0: key_a, keys_b and their bound."""
    b = layer._buffers
    return InitialScoreKeys(b[_SCORE_KEY], b[_SCORE_KEYS], b[_BOUND])


class ImplicitScores(ScoreStorage):
    """One fp32 drift per connection (``{part}_drift``) and a factor per part (``{part}_scale``):
    the scores ``c * s0 - A * W`` are regenerated at every selection (see :mod:`seedslot.updates`)."""

    name = "implicit"

    def register_layer(self, layer):
        device = layer.candidate_keys.keys.device
        layer.register_buffer(_BOUND, torch.tensor(layer.score_lambda * layer.sigma, dtype=torch.float32,
                                                   device=device), persistent=False)
        self.reseed(layer)

    def reseed(self, layer):  # the initial scores' keys follow the seed, their bound lambda
        device = layer.candidate_keys.keys.device
        key, keys = stream_keys(layer.seed, Stream.INITIAL_SCORES, layer.k, device)
        layer.register_buffer(_SCORE_KEY, i32(key, device), persistent=False)
        layer.register_buffer(_SCORE_KEYS, keys, persistent=False)
        getattr(layer, _BOUND).fill_(layer.score_lambda * layer.sigma)

    def register(self, layer, part, shape, offset):
        device = layer.candidate_keys.keys.device
        layer.register_buffer(f"{part}_drift", torch.zeros(shape, dtype=torch.float32, device=device))
        layer.register_buffer(f"{part}_scale", torch.ones((), dtype=torch.float32, device=device))

    def state(self, part):
        return {f"{part}_drift": "scores", f"{part}_scale": "other"}

    def load_checks(self, part):  # the factor may decay to 0
        return [(f"{part}_scale", lambda t: (t >= 0) & torch.isfinite(t), "finite and >= 0"),
                (f"{part}_drift", _finite, "finite")]

    def greedy(self, layer, part):
        drift, factor = getattr(layer, f"{part}_drift").view(-1), getattr(layer, f"{part}_scale")
        return ops.implicit_greedy(drift, factor, layer.parts[part][1], layer.candidate_keys, _initial_score_keys(layer))

    def sample(self, layer, part, key):
        # a chunk of fp32 scores (an (n, K) temporary), then the same Gumbel-max draw as stored scores
        drift, factor = getattr(layer, f"{part}_drift").view(-1), getattr(layer, f"{part}_scale")
        return ops.implicit_sample(drift, factor, layer.parts[part][1], layer.candidate_keys,
                                   _initial_score_keys(layer), key, layer.sample_keys)

    def scores(self, layer, part):
        drift, factor = getattr(layer, f"{part}_drift").view(-1), getattr(layer, f"{part}_scale")
        return ops.implicit_scores(drift, factor, layer.parts[part][1], layer.candidate_keys, _initial_score_keys(layer))

    def update(self, layer, part, direction, lr, weight_decay, step):
        # s = c*s0 - A*W: shrinking scales c and A, the step adds to A
        drift, factor = getattr(layer, f"{part}_drift").view(-1), getattr(layer, f"{part}_scale")
        d = direction.reshape(-1).to(torch.float32)
        if weight_decay:
            shrink = 1.0 - lr * weight_decay
            drift.mul_(shrink)
            factor.mul_(shrink)
        drift.add_(d, alpha=lr)


# values cache -> the tokens of the autograd graphs that saved it (see lend): a token dies with its
# graph's saved tensors, after the backward (unless the graph is retained) or with the graph
_LOANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class IncrementalImplicitScores(ImplicitScores):
    """:class:`ImplicitScores` whose greedy selection re-selects only the connections whose
    selection can have changed (``SlotConfig(scores="implicit", incremental=True)``).

    Per connection it keeps the selected index (``{part}_sel``, uint8 up to K = 256), its candidate
    (``{part}_val``, fp32) and an interval (``{part}_lo``, ``{part}_hi``, fp32) of the ratio
    ``a = drift / factor`` over which that index provably is what full recomputation selects (the
    argument is in :mod:`seedslot.ops._torch`): 13 more bytes per connection, whatever K, in
    non-persistent buffers (a state_dict is the same as without the cache). A selection checks every connection's ratio against its interval and re-selects those
    outside. The cache depends on nothing but the layer's keys, so the drift and the factor may
    change in any way (updates, weight decay, loads, a user's edits): they are read afresh at every
    selection. Only new keys (``set_extra_state``: seeds, score_lambda) empty the intervals.
    With numba installed, the check and the re-selection are one pass of a numba twin
    (:mod:`seedslot.ops._numba`), else a numpy scan and a compiled re-selection of the stale rows.
    Full recomputation (the cache untouched) inside a torch.compile'd model, on CUDA (no Triton
    twin yet), for a factor outside [2**-40, 2**40], when a re-selected drift is not finite, and
    (numba path) when a buffer was replaced by a non-contiguous tensor.
    The values cache goes into a forward's graph as it is, not copied: a selection that finds it
    held by a graph that may still read it (its backward not run, or the graph retained) continues
    in a copy (copy-on-write), so a graph keeps the weights of its forward.
    """

    incremental = True

    def register(self, layer, part, shape, offset):
        super().register(layer, part, shape, offset)
        device = layer.candidate_keys.keys.device
        rows = math.prod(shape)
        sel = torch.uint8 if layer.k <= 256 else torch.int16 if layer.k <= 2**15 else torch.int32
        layer.register_buffer(f"{part}_sel", torch.zeros(rows, dtype=sel, device=device), persistent=False)
        layer.register_buffer(f"{part}_val", torch.zeros(rows, device=device), persistent=False)
        layer.register_buffer(f"{part}_lo", torch.full((rows,), math.inf, device=device), persistent=False)
        layer.register_buffer(f"{part}_hi", torch.full((rows,), -math.inf, device=device), persistent=False)

    def state(self, part):
        return {**super().state(part), f"{part}_sel": "scores", f"{part}_val": "scores", f"{part}_lo": "scores", f"{part}_hi": "scores"}

    def reseed(self, layer):
        super().reseed(layer)
        self.invalidate(layer)

    @staticmethod
    def invalidate(layer) -> None:
        """Empty every interval: the next selection re-selects every connection."""
        for part in getattr(layer, "parts", {}):
            lo = layer._buffers.get(f"{part}_lo")
            if lo is not None:
                lo.fill_(math.inf)
                layer._buffers[f"{part}_hi"].fill_(-math.inf)

    def lend(self, layer, part, w):
        if w._base is not layer._buffers[f"{part}_val"]:  # not a view of the cache (a fallback's, a cast's, ...)
            return None
        token = torch.empty(0)
        _LOANS.setdefault(w._base, weakref.WeakSet()).add(token)
        return token

    @staticmethod
    def _at_args(layer, part):
        return (getattr(layer, f"{part}_scale"), *layer.candidate_keys, *_initial_score_keys(layer))

    def greedy(self, layer, part):
        b = layer._buffers  # the buffers this storage registered; not Module.__getattr__ (per selection)
        drift, factor, sel, val, lo, hi = (b[f"{part}_{n}"] for n in ("drift", "scale", "sel", "val", "lo", "hi"))
        if not ops.incremental_applies(drift):
            return super().greedy(layer, part)
        if _LOANS.get(val):  # a live token (a non-empty WeakSet): copy-on-write, the graph keeps val
            val = b[f"{part}_val"] = val.clone()
        if not ops.incremental_greedy(drift, factor, sel, val, lo, hi, layer.parts[part][1], layer.candidate_keys,
                                      _initial_score_keys(layer)):
            return super().greedy(layer, part)
        # the cache itself, lent to a training forward's graph (see lend); the index stays uint8,
        # converted only where it is read
        return sel, val


STORAGES: dict[str, ScoreStorage] = {s.name: s for s in (Int8Scores(), Fp32Scores(), ImplicitScores())}
assert tuple(STORAGES) == SCORES
INCREMENTAL: dict[str, ScoreStorage] = {"implicit": IncrementalImplicitScores()}  # storages with incremental=True


def storage_for(name, incremental: bool = False) -> ScoreStorage:
    """The storage called ``name`` (one of :data:`SCORES`), its incremental
    variant with ``incremental`` (implicit scores only); ValueError otherwise."""
    if name not in SCORES:  # a tuple: also answers for unhashable values
        raise ValueError(f"scores must be one of {', '.join(map(repr, SCORES))}; got {name!r}")
    if incremental:
        if name not in INCREMENTAL:
            raise ValueError(f"incremental selection needs scores='implicit'; got scores={name!r}")
        return INCREMENTAL[name]
    return STORAGES[name]
