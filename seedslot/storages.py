"""Score storages: how a seeded slot layer keeps the scores of its connections.

One class per storage, chosen once from its name (:func:`storage_for`) when a layer is built:

- :class:`Int8Scores` (``"int8"``): K int8 levels per connection and one fp32 scale per part;
- :class:`Fp32Scores` (``"fp32"``): K fp32 scores per connection (the scale stays 1);
- :class:`ImplicitScores` (``"implicit"``): one fp32 drift per connection, scores ``c*s0 - A*W``.

A storage holds no tensors itself: it registers its state as buffers of the layer (so state_dict
keys, ``.to()`` and copies work as for any module) and reads them back by name. The interface,
:class:`ScoreStorage`, is what a seeded layer and SlotSGD use: register the state, select greedily
(with the selected values when they come for free), sample, materialise the scores, update them
(a part at a time, or all of a step's parts of one storage at once: :meth:`ScoreStorage.update_group`).
What a storage reads from its layer: ``k``, ``seed``, ``sigma``, ``score_lambda``, ``parts`` and the
keys ``candidate_keys``, ``sample_keys``, ``round_keys`` (see :mod:`seedslot.layers`).

A storage owns the names of its state: a part's tensors are buffers ``{part}_{role}`` of the layer
(the roles are the storage's ``Part`` fields), reached only through :meth:`ScoreStorage.tensors`.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from .candidates import Stream, init_scores, stream_keys
from .ops import InitialScoreKeys, i32
from .rng import key32_at, key32_fold, key_prefix
from .selection import greedy, greedy_values, sample
from .updates import coarsen_factor, max_abs

__all__ = ["SCORES", "ScoreStorage", "Int8Scores", "Fp32Scores", "ImplicitScores", "IncrementalImplicitScores", "STORAGES",
           "INCREMENTAL", "storage_for", "buffer_name"]

SCORES = ("int8", "fp32", "implicit")  # the storages' names


def buffer_name(part: str, role: str) -> str:
    """The layer buffer holding a part's ``role`` (``weight_scores``, ``bias_scale``, ...): the state_dict key."""
    return f"{part}_{role}"


def _offset(layer: nn.Module, part: str) -> int:
    """The index of the part's first connection."""
    return layer.parts[part][1]


class ScoreStorage:
    """The scores of a seeded layer's parts. Stateless: every method takes the layer and reads the
    buffers it registered there. ``rows`` below is the number of connections of a part.

    ``Part`` names a part's tensors (its fields are the roles, in registration order) and
    ``ROLES`` says what each is (a memory category: "scores" or "other") and whether a state_dict
    keeps it."""

    name = ""
    keyed_by_step = False  # whether update() draws random numbers keyed by its step (then a 0-dim tensor)
    Part: type = tuple
    ROLES: dict[str, tuple[str, bool]] = {}  # role -> (memory category, persistent)

    def tensors(self, layer: nn.Module, part: str):
        """The part's tensors, as a ``Part`` (the one place a storage reads its buffers)."""
        b = layer._buffers  # not Module.__getattr__: read at every selection
        return self.Part(*(b[buffer_name(part, role)] for role in self.Part._fields))

    def _put(self, layer: nn.Module, part: str, role: str, tensor: torch.Tensor) -> None:
        """Register (or replace) the part's ``role`` tensor."""
        layer.register_buffer(buffer_name(part, role), tensor, persistent=self.ROLES[role][1])

    def register_layer(self, layer: nn.Module) -> None:
        """Register the layer-wide state (after the layer's keys, before any part)."""

    def reseed(self, layer: nn.Module) -> None:
        """Re-derive what follows the layer's seeds and ``score_lambda`` after they changed (load)."""

    def register(self, layer: nn.Module, part: str, shape: tuple[int, ...], offset: int) -> None:
        """Register the initial state of a part of ``shape``, its first connection ``offset``."""
        raise NotImplementedError

    def state(self, part: str) -> dict[str, str]:
        """The part's state, as buffer name -> what it is (a memory category: "scores" or "other")."""
        return {buffer_name(part, role): what for role, (what, _) in self.ROLES.items()}

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
        by ``(1 - lr * weight_decay)`` (:meth:`decay`); ``step`` (an int, or a 0-dim int64 tensor on
        the device) keys stochastic rounding."""
        if weight_decay:
            self.decay(layer, part, torch.full((), 1.0 - lr * weight_decay, device=direction.device))
        self._move(layer, part, direction, lr, step)

    def _move(self, layer: nn.Module, part: str, direction: torch.Tensor, lr: float, step) -> None:
        """:meth:`update` without the decay."""
        raise NotImplementedError

    def decay(self, layer: nn.Module, part: str, factor: torch.Tensor) -> None:
        """Multiply every score of a part by the 0-dim ``factor`` on the device (no host read): the
        decoupled weight decay of an update, for an optimizer that decides it on the device."""
        raise NotImplementedError

    def update_group(self, parts: list[tuple[nn.Module, str]], directions: list[torch.Tensor], lr: float,
                     decay: torch.Tensor | None, steps: list) -> None:
        """:meth:`decay` by the 0-dim fp32 ``decay`` (None: none) then :meth:`update` of every
        ``(layer, part)`` of ``parts`` (layers of this storage, on one device), with the same bits:
        SlotSGD's multi-tensor step. Here a call per part; a storage overrides it where its updates
        can run as a number of launches that does not grow with the number of parts."""
        for (layer, part), direction, step in zip(parts, directions, steps):
            if decay is not None:
                self.decay(layer, part, decay)
            self._move(layer, part, direction, lr, step)

    def moved(self, layer: nn.Module, part: str) -> tuple[list[torch.Tensor], float]:
        """The float tensors an update moves, and how many of their units one real score unit can
        take (int8 levels: 127, else 1): what bounds the state after a step."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t)


def _concatenated(directions: list[torch.Tensor]) -> torch.Tensor:
    """The parts' directions as one fp32 vector, in order (what the packed kernels read)."""
    return torch.cat([d.reshape(-1) for d in directions]).to(torch.float32)


def _packed(storage: "_Stored", parts: list) -> tuple[list[torch.Tensor], list[int], list] | None:
    """The parts' (rows, K) scores, offsets and candidate keys where :func:`ops.packs_parts`, else None."""
    scores = [storage.stored(layer, part)[0] for layer, part in parts]
    if not ops.packs_parts(scores):
        return None
    return scores, [_offset(layer, part) for layer, part in parts], [layer.candidate_keys for layer, _ in parts]


class StoredPart(NamedTuple):
    scores: torch.Tensor  # (*shape, K) levels or fp32 scores
    scale: torch.Tensor  # 0-dim fp32: real scores = scores * scale


class _Stored(ScoreStorage):
    """K scores per connection held as ``{part}_scores`` (*shape, K) and ``{part}_scale``."""

    dtype = torch.float32
    Part = StoredPart
    ROLES = {"scores": ("scores", True), "scale": ("other", True)}

    def register(self, layer, part, shape, offset):
        device = layer.candidate_keys.keys.device
        init, scale = init_scores(math.prod(shape), layer.k, layer.seed, layer.score_lambda * layer.sigma, offset,
                                  self.dtype, device)
        self._put(layer, part, "scores", init.view(*shape, layer.k))
        self._put(layer, part, "scale", torch.tensor(scale, dtype=torch.float32, device=device))

    def load_checks(self, part):
        return [(buffer_name(part, "scale"), lambda t: (t > 0) & torch.isfinite(t), "finite and > 0"),
                (buffer_name(part, "scores"), _finite, "finite")]

    def stored(self, layer, part) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, K) stored scores and the 0-dim scale that turns them into real scores."""
        scores, scale = self.tensors(layer, part)
        return scores.view(-1, layer.k), scale

    def greedy(self, layer, part):
        return greedy(self.stored(layer, part)[0]), None  # no float temporaries: one pass over the part

    def sample(self, layer, part, key):
        scores, scale = self.stored(layer, part)
        return sample(scores, scale, _offset(layer, part), key, layer.sample_keys)

    def scores(self, layer, part):
        scores, scale = self.stored(layer, part)
        return scores.to(torch.float32) * scale


    def moved(self, layer, part):
        scores, scale = self.tensors(layer, part)
        if scores.dtype.is_floating_point:
            return [scores, scale], 1.0
        return [scale], 127.0


class Fp32Scores(_Stored):
    """K fp32 scores per connection, for ablations."""

    name = "fp32"

    def decay(self, layer, part, factor):
        self.tensors(layer, part).scores.mul_(factor)

    def _move(self, layer, part, direction, lr, step):
        scores, _ = self.stored(layer, part)
        d = direction.reshape(-1).to(torch.float32)
        neg_lr = torch.full((), -lr, dtype=torch.float32, device=d.device)
        ops.fp32_update_(scores, d, neg_lr, _offset(layer, part), layer.candidate_keys)

    def update_group(self, parts, directions, lr, decay, steps):
        packed = _packed(self, parts)
        if packed is None:
            return super().update_group(parts, directions, lr, decay, steps)
        scores, offsets, cks = packed
        neg_lr = torch.full((), -lr, dtype=torch.float32, device=scores[0].device)
        ops.fp32_update_group_(scores, _concatenated(directions), neg_lr, decay, offsets, cks)


class Int8Scores(_Stored):
    """K int8 levels per connection and one fp32 scale per part (see :mod:`seedslot.updates`)."""

    name = "int8"
    dtype = torch.int8
    keyed_by_step = True

    def greedy(self, layer, part):
        scores, _ = self.stored(layer, part)
        got = greedy_values(scores, _offset(layer, part), layer.candidate_keys)  # index and value in one pass
        return got if got is not None else super().greedy(layer, part)

    def decay(self, layer, part, factor):
        # as update's: through the scale, and scores below the normal fp32 range become 0
        scores, scale = self.tensors(layer, part)
        scale.mul_(factor)
        small = (factor != 1.0) & (scale < torch.finfo(torch.float32).tiny)
        scores.masked_fill_(small, 0)
        scale.copy_(torch.where(small, layer.score_lambda * layer.sigma / 127.0, scale))

    def _move(self, layer, part, direction, lr, step):
        scores, scale = self.stored(layer, part)
        d = direction.reshape(-1).to(torch.float32)
        offset, dev = _offset(layer, part), d.device
        # the grid decision, on the device: requantize_ leaves the levels at factor 1
        factor = coarsen_factor(lr, max_abs(d) if d.numel() else d.new_zeros(()), layer.sigma, scale)
        count = step if isinstance(step, torch.Tensor) else torch.full((), step, dtype=torch.int64, device=dev)
        round_keys = layer.round_keys
        ops.requantize_(scores, (1.0 / factor).to(torch.float32), offset,
                        key32_at((layer.seed, Stream.REQUANT, 2), count), round_keys)
        scale.mul_(factor)
        coef = (-lr / scale).to(torch.float32)
        ops.int8_update_(scores, d, coef, offset, layer.candidate_keys, key32_at((layer.seed, Stream.ROUND, 2), count),
                         round_keys)

    def update_group(self, parts, directions, lr, decay, steps):
        # update()'s arithmetic on vectors of one value per part (the same elementwise operations,
        # so the same bits), then one packed op for every part's levels
        packed = _packed(self, parts)
        if packed is None:
            return super().update_group(parts, directions, lr, decay, steps)
        scores, offsets, cks = packed
        dev, layers = scores[0].device, [layer for layer, _ in parts]
        held = [self.tensors(layer, part).scale for layer, part in parts]
        scales = torch.stack(held)
        zero = None
        if decay is not None:  # decay()'s, the levels zeroed by the packed op
            scales.mul_(decay)
            zero = (decay != 1.0) & (scales < torch.finfo(torch.float32).tiny)
            fresh = ops.constants(tuple(layer.score_lambda * layer.sigma / 127.0 for layer in layers), torch.float32, dev)
            scales = torch.where(zero, fresh, scales)
        d = _concatenated(directions)
        d_max = torch.stack(torch._foreach_norm(list(d.split([s.shape[0] for s in scores])), math.inf))
        factor = coarsen_factor(lr, d_max, ops.constants(tuple(layer.sigma for layer in layers), torch.float64, dev),
                                scales)
        counts = torch.stack([s if isinstance(s, torch.Tensor) else torch.full((), s, dtype=torch.int64, device=dev)
                              for s in steps])
        requant, rounding = (key32_fold(ops.constants(tuple(key_prefix(layer.seed, stream, 2) for layer in layers),
                                                   torch.int64, dev), counts)
                             for stream in (Stream.REQUANT, Stream.ROUND))
        inv = (1.0 / factor).to(torch.float32)
        scales.mul_(factor)
        coef = (-lr / scales).to(torch.float32)
        ops.int8_update_group_(scores, d, coef, inv, zero, requant, rounding, offsets, cks,
                               [layer.round_keys for layer in layers])
        torch._foreach_copy_(held, list(scales.unbind()))


_BOUND, _SCORE_KEY, _SCORE_KEYS = "_score_bound", "_score_key", "_score_keys"


def _initial_score_keys(layer) -> InitialScoreKeys:
    """What regenerates implicit scores' initial scores s0: key_a, keys_b and their bound."""
    b = layer._buffers
    return InitialScoreKeys(b[_SCORE_KEY], b[_SCORE_KEYS], b[_BOUND])


class ImplicitPart(NamedTuple):
    drift: torch.Tensor  # (*shape) fp32 A
    scale: torch.Tensor  # 0-dim fp32 factor c


class ImplicitScores(ScoreStorage):
    """One fp32 drift per connection (``{part}_drift``) and a factor per part (``{part}_scale``):
    the scores ``c * s0 - A * W`` are regenerated at every selection (see :mod:`seedslot.updates`)."""

    name = "implicit"
    Part = ImplicitPart
    ROLES = {"drift": ("scores", True), "scale": ("other", True)}

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
        self._put(layer, part, "drift", torch.zeros(shape, dtype=torch.float32, device=device))
        self._put(layer, part, "scale", torch.ones((), dtype=torch.float32, device=device))

    def load_checks(self, part):  # the factor may decay to 0
        return [(buffer_name(part, "scale"), lambda t: (t >= 0) & torch.isfinite(t), "finite and >= 0"),
                (buffer_name(part, "drift"), _finite, "finite")]

    def _kernel_args(self, layer, part) -> tuple:
        """``(drift, factor, offset, candidate keys, initial-score keys)``: what the implicit ops take."""
        t = self.tensors(layer, part)
        return t.drift.view(-1), t.scale, _offset(layer, part), layer.candidate_keys, _initial_score_keys(layer)

    def greedy(self, layer, part):
        return ops.implicit_greedy(*self._kernel_args(layer, part))

    def sample(self, layer, part, key):
        # a chunk of fp32 scores (an (n, K) temporary), then the same Gumbel-max draw as stored scores
        return ops.implicit_sample(*self._kernel_args(layer, part), key, layer.sample_keys)

    def scores(self, layer, part):
        return ops.implicit_scores(*self._kernel_args(layer, part))

    def decay(self, layer, part, factor):
        drift, scale = self.tensors(layer, part)[:2]
        drift.mul_(factor)
        scale.mul_(factor)

    def moved(self, layer, part):
        return list(self.tensors(layer, part)[:2]), 1.0

    def _move(self, layer, part, direction, lr, step):
        # s = c*s0 - A*W: the step adds to A (a decay scales c and A)
        self.tensors(layer, part).drift.view(-1).add_(direction.reshape(-1).to(torch.float32), alpha=lr)

    def update_group(self, parts, directions, lr, decay, steps):
        # update()'s operations as multi-tensor ops, on every device: a few launches for all parts
        held = [self.tensors(layer, part) for layer, part in parts]
        drifts = [t.drift.view(-1) for t in held]
        if decay is not None:
            torch._foreach_mul_(drifts + [t.scale for t in held], decay)
        torch._foreach_add_(drifts, [d.reshape(-1).to(torch.float32) for d in directions], alpha=lr)


# values cache -> the tokens of the autograd graphs that saved it (see lend): a token dies with its
# graph's saved tensors, after the backward (unless the graph is retained) or with the graph
_LOANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


class IncrementalPart(NamedTuple):
    drift: torch.Tensor
    scale: torch.Tensor
    sel: torch.Tensor  # (rows,) the cached index (uint8 up to K = 256)
    val: torch.Tensor  # (rows,) fp32 its candidate
    lo: torch.Tensor  # (rows,) fp32 the interval of drift / scale over which sel holds
    hi: torch.Tensor


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
    Part = IncrementalPart
    ROLES = {**ImplicitScores.ROLES, "sel": ("scores", False), "val": ("scores", False), "lo": ("scores", False),
             "hi": ("scores", False)}

    def register(self, layer, part, shape, offset):
        super().register(layer, part, shape, offset)
        device = layer.candidate_keys.keys.device
        rows = math.prod(shape)
        sel = torch.uint8 if layer.k <= 256 else torch.int16 if layer.k <= 2**15 else torch.int32
        self._put(layer, part, "sel", torch.zeros(rows, dtype=sel, device=device))
        self._put(layer, part, "val", torch.zeros(rows, device=device))
        self._put(layer, part, "lo", torch.full((rows,), math.inf, device=device))
        self._put(layer, part, "hi", torch.full((rows,), -math.inf, device=device))

    def reseed(self, layer):
        super().reseed(layer)
        self.invalidate(layer)

    def invalidate(self, layer) -> None:
        """Empty every interval: the next selection re-selects every connection."""
        for part in getattr(layer, "parts", {}):
            if buffer_name(part, "lo") in layer._buffers:  # not while the layer registers its parts
                t = self.tensors(layer, part)
                t.lo.fill_(math.inf)
                t.hi.fill_(-math.inf)

    def lend(self, layer, part, w):
        if w._base is not self.tensors(layer, part).val:  # not a view of the cache (a fallback's, a cast's, ...)
            return None
        token = torch.empty(0)
        _LOANS.setdefault(w._base, weakref.WeakSet()).add(token)
        return token

    @staticmethod
    def _at_args(layer, part):
        """The arguments of ``implicit_select_at`` after ``(drift, conn)`` (tests)."""
        return (layer._buffers[buffer_name(part, "scale")], *layer.candidate_keys, *_initial_score_keys(layer))

    def greedy(self, layer, part):
        t = self.tensors(layer, part)
        if not ops.incremental_applies(t.drift):
            return super().greedy(layer, part)
        val = t.val
        if _LOANS.get(val):  # a live token (a non-empty WeakSet): copy-on-write, the graph keeps val
            val = val.clone()
            self._put(layer, part, "val", val)
        if not ops.incremental_greedy(t.drift, t.scale, t.sel, val, t.lo, t.hi, _offset(layer, part),
                                      layer.candidate_keys, _initial_score_keys(layer)):
            return super().greedy(layer, part)
        # the cache itself, lent to a training forward's graph (see lend); the index stays uint8,
        # converted only where it is read
        return t.sel, val


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
