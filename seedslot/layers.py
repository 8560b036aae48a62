"""Slot Machine layers: seeded (candidates regenerated; int8, fp32 or implicit scores) and the dense
reference.

Seeded layers store only scores (int8 or fp32), or with ``scores="implicit"`` one fp32 drift per
connection from which the scores follow (see :mod:`seedslot.updates`). A forward pass selects one
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

import json
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .candidates import (
    CandidateKeys,
    Stream,
    candidate_values,
    glorot_sigma,
    grid_step,
    i32,
    init_scores,
    selected_values,
    stream_keys,
)
from .config import UNSET, SlotConfig
from .rng import key32, key32_at
from .optim import guard_slot_proxies
from .selection import greedy, sample
from .proxies import tag_proxy
from .storages import ScoreStorage
from .validate import check_int

__all__ = ["SlotLinear", "SlotConv2d", "DenseSlotLinear", "DenseSlotConv2d", "SlotLayer", "SeededSlotLayer",
           "DenseSlotLayer", "SlotConv1d", "SlotConv3d", "DenseSlotConv1d", "DenseSlotConv3d",
           "encode_slot_state", "decode_slot_state", "SlotEmbedding", "DenseSlotEmbedding",
           "SlotConvTranspose1d", "SlotConvTranspose2d", "SlotConvTranspose3d", "DenseSlotConvTranspose1d",
           "DenseSlotConvTranspose2d", "DenseSlotConvTranspose3d"]


@torch.library.custom_op("seedslot::next_draw_key", mutates_args=("draws",))
def _next_draw_key(draws: torch.Tensor, seed: str) -> torch.Tensor:
    """Advance a layer's draw counter and return the 0-dim int32 sampling key of the draw it held.

    One opaque op, in eager mode and inside a user's torch.compile graph alike (the seed passes as a
    string: seeds are arbitrary ints), so a compiled model draws exactly the samples eager does,
    with no graph break and no recompile. The key is derived on the counter's device: no host read.
    """
    if torch._C._current_graph_task_id() != -1:  # a forward re-run inside backward would draw anew
        raise RuntimeError("selection='sample' cannot be recomputed: activation checkpointing "
                           "(torch.utils.checkpoint) re-runs the forward during backward, which would draw another "
                           "sample than the forward did and give wrong gradients; checkpoint only layers with "
                           "selection='greedy', or leave the sampling layers out of the checkpointed segment")
    key = key32_at((int(seed), Stream.SAMPLE, 2), draws)
    draws += 1
    return key


@_next_draw_key.register_fake
def _(draws: torch.Tensor, seed: str) -> torch.Tensor:
    return draws.new_empty((), dtype=torch.int32)


def encode_slot_state(state: dict) -> torch.Tensor:
    """A layer's seeds and settings (``get_extra_state``) as a 1-D uint8 CPU tensor: the UTF-8
    JSON of the dict, exact for any int seed and float ``score_lambda``."""
    data = json.dumps(state, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_slot_state(t: torch.Tensor) -> dict:
    """Inverse of :func:`encode_slot_state`; RuntimeError naming ``_extra_state`` for anything else."""
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > 4096:
        raise RuntimeError(f"slot state (_extra_state) must be a 1-D uint8 tensor of JSON (at most 4096 bytes); "
                           f"got {t.dtype} of shape {tuple(t.shape)}")
    try:
        state = json.loads(bytes(t.cpu().tolist()).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise RuntimeError(f"slot state (_extra_state) is not JSON: {e}") from None
    if not isinstance(state, dict):
        raise RuntimeError(f"slot state (_extra_state) must hold a JSON object; got {type(state).__name__}")
    return state


class SlotLayer(nn.Module):
    """What every slot layer shares: settings, Glorot bound, keys and selection.

    A layer has one or two *parts*, ``weight`` and optionally ``bias``; a part's connections are
    numbered after those of the parts before it, so the bias is a slot like any weight.
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        fan_in: int,
        fan_out: int,
        bias: bool,
        config: SlotConfig,
        *,
        default_lambda: float,
        candidate_seed: int | None,
        device=None,
        bias_size: int | None = None,
    ) -> None:
        super().__init__()
        # the layer's own settings: its seed, and the paper's lambda where the config leaves it open
        self.config = config.replace(score_lambda=float(default_lambda if config.score_lambda is None
                                                        else config.score_lambda))
        self.candidate_seed = config.seed if candidate_seed is None else check_int("candidate_seed", candidate_seed)
        self.sigma = glorot_sigma(fan_in, fan_out)
        self.weight_shape = tuple(weight_shape)
        self.parts: dict[str, tuple[tuple[int, ...], int]] = {"weight": (self.weight_shape, 0)}
        if bias:
            # one bias per output: weight_shape[0] but for a transposed convolution's (in, out/groups, ...)
            self.parts["bias"] = ((weight_shape[0] if bias_size is None else bias_size,), math.prod(weight_shape))
        if sum(math.prod(s) for s, _ in self.parts.values()) >= 2**31:
            raise ValueError("a slot layer holds at most 2**31 - 1 connections")
        self._per_conn = 1 if self.sharing == "none" else 0
        self.register_buffer("_cand_step", grid_step(self.sigma).to(device), persistent=False)
        self._set_seeds(self.seed, self.candidate_seed, device)
        # Training forwards so far: keys the sampling noise of selection="sample".
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64, device=device))

    # the settings, read from ``config`` (set them through a new config, e.g. by load_state_dict)
    k = property(lambda self: self.config.k)
    seed = property(lambda self: self.config.seed)
    sharing = property(lambda self: self.config.sharing)
    selection = property(lambda self: self.config.selection)
    score_lambda = property(lambda self: self.config.score_lambda)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        draws = state_dict.get(prefix + "draws")  # a tampered counter fails here, not at a later forward
        if isinstance(draws, torch.Tensor) and not (draws.dim() == 0 and draws.dtype == torch.int64
                                                    and 0 <= int(draws) < 2**62):
            args[-1].append(f"{prefix}draws must be an int64 scalar in [0, 2**62)")  # error_msgs
            return
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _set_seeds(self, seed: int, candidate_seed: int, device=None) -> None:
        """Derive every stream key (small non-persistent buffers) from the seeds."""
        if seed != self.config.seed:
            self.config = self.config.replace(seed=seed)
        self.candidate_seed = candidate_seed
        cand_key, cand_keys = stream_keys(candidate_seed, Stream.CANDIDATES, self.k, device)
        self.register_buffer("_cand_key", i32(cand_key, device), persistent=False)
        self.register_buffer("_cand_keys", cand_keys, persistent=False)
        self.register_buffer("_sample_keys", stream_keys(seed, Stream.SAMPLE, self.k, device)[1], persistent=False)
        self.register_buffer("_round_keys", stream_keys(seed, Stream.ROUND, self.k, device)[1], persistent=False)

    @property
    def candidate_keys(self) -> CandidateKeys:
        """The keys that regenerate this layer's candidates, as the kernels take them."""
        b = self._buffers  # not Module.__getattr__: this is read at every selection
        return CandidateKeys(self._per_conn, b["_cand_key"], b["_cand_keys"], b["_cand_step"])

    @property
    def sample_keys(self) -> torch.Tensor:
        """(K,) int32 keys_b of the sampling noise (selection="sample")."""
        return self._sample_keys

    @property
    def round_keys(self) -> torch.Tensor:
        """(K,) int32 keys_b of stochastic rounding (int8 score updates)."""
        return self._round_keys

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
        # A memory format (channels_last) is for activations: the slot state keeps its own layout,
        # which every kernel relies on; flat, a tensor takes the device and dtype only.
        super()._apply(lambda t: fn(t.reshape(-1)).view(t.shape) if t.dim() >= 4 else fn(t), recurse)
        for name, old in kept.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def _compute_dtype(self) -> torch.dtype:
        """The dtype of the weights a forward produces: the layer's float Parameters' dtype."""
        raise NotImplementedError

    def get_extra_state(self) -> torch.Tensor:
        """The seeds travel with the scores: a state_dict alone defines the layer's weights (and,
        through ``score_lambda``, the initial scores that implicit scores are relative to). A tensor
        (see :func:`encode_slot_state`), so that a state_dict holds tensors only (safetensors,
        transformers' ``save_pretrained``)."""
        return encode_slot_state({"seed": self.seed, "candidate_seed": self.candidate_seed, "k": self.k,
                                  "sharing": self.sharing, "score_lambda": self.score_lambda})

    def set_extra_state(self, state: dict | torch.Tensor) -> None:
        if isinstance(state, torch.Tensor):  # today's state_dicts; a dict: written before slot state was a tensor
            state = decode_slot_state(state)
        if not isinstance(state, dict):
            raise RuntimeError(f"slot state (_extra_state) must be a dict of seeds; got {type(state).__name__}")
        if state.get("k") != self.k or state.get("sharing") != self.sharing:
            raise RuntimeError(
                f"slot state has k={state.get('k')}, sharing={state.get('sharing')!r}; "
                f"this layer has k={self.k}, sharing={self.sharing!r}"
            )
        lam = state.get("score_lambda", self.score_lambda)  # absent from checkpoints written before it was saved
        try:
            check_int("candidate_seed", state.get("candidate_seed"))
            config = self.config.replace(seed=state.get("seed"), score_lambda=lam)
        except ValueError as e:
            raise RuntimeError(f"slot state: {str(e):.200}") from None
        self.config = config.replace(score_lambda=float(config.score_lambda))
        self._set_seeds(config.seed, state["candidate_seed"], self._cand_step.device)

    def state_categories(self) -> dict[str, str]:
        """What each state tensor of the layer that is neither a plain weight nor a plain buffer is
        (name -> "scores" or "candidates"), for memory accounting."""
        return {}

    # -- what subclasses provide
    def _values(self, part: str, idx: torch.Tensor) -> torch.Tensor:
        """(rows,) fp32 selected candidate values for (rows,) indices."""
        raise NotImplementedError

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    # -- selection
    def _select(self, part: str, draw: int | torch.Tensor | None) -> torch.Tensor:
        """(rows,) int64 index of the candidate each connection uses; ``draw`` None is greedy, else
        a draw counter value or its sampling key (see :meth:`_sample_key`)."""
        raise NotImplementedError

    def _sample_key(self, draw: int | torch.Tensor) -> torch.Tensor:
        """The 0-dim int32 key of the sampling noise of draw number ``draw`` (a key passes through)."""
        if isinstance(draw, torch.Tensor):
            return draw
        return i32(key32(self.seed, Stream.SAMPLE, 2, draw), self._cand_keys.device)

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

    @property
    def weight(self) -> torch.Tensor:
        """Read-only: the weight the layer computes with (greedy selection), in the layer's dtype,
        on its device, of the plain layer's shape. For code outside the layer that reads
        ``layer.weight`` (nn.MultiheadAttention's ``out_proj``, nn.TransformerEncoderLayer's fast
        path, transformers' ViT): with gradients enabled it carries them to the slot's scores like
        the layer's own forward (with ``selection="sample"`` such a read still selects greedily)."""
        return self._effective("weight", None)

    @property
    def bias(self) -> torch.Tensor | None:
        """Read-only: the bias the layer computes with (greedy selection), or None; see :attr:`weight`."""
        return self._effective("bias", None) if "bias" in self.parts else None

    def candidates(self, part: str = "weight") -> torch.Tensor:
        """All K candidates of a part, float32 (*shape, K): materialised on request only."""
        raise NotImplementedError

    def _effective(self, part: str, draw: int | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, *self._weights())

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This forward's weight and bias (None without one), selected with one draw."""
        draw = self._next_draw()
        weight = self._effective("weight", draw)
        bias = self._effective("bias", draw) if "bias" in self.parts else None
        return weight, bias

    def extra_repr(self) -> str:
        return (
            f"{self._shape_repr()}, bias={'bias' in self.parts}, k={self.k}, seed={self.seed}, "
            f"sharing={self.sharing!r}, selection={self.selection!r}"
        )

    def _shape_repr(self) -> str:
        return str(self.weight_shape)


class SeededSlotLayer(SlotLayer):
    """Scores only, kept by a :class:`~seedslot.storages.ScoreStorage`; candidates regenerated on
    demand. See the module docstring."""

    def __init__(self, weight_shape, fan_in, fan_out, bias, config: SlotConfig, **kwargs) -> None:
        super().__init__(weight_shape, fan_in, fan_out, bias, config, **kwargs)
        self.storage: ScoreStorage = config.storage  # chosen once, from the config's name
        guard_slot_proxies()
        device = self._cand_keys.device
        self.storage.register_layer(self)
        for part, (shape, offset) in self.parts.items():
            self.storage.register(self, part, shape, offset)
            self.register_parameter(f"slot_{part}", nn.Parameter(self._zero_proxy(shape, device)))
            tag_proxy(getattr(self, f"slot_{part}"), self, part)

    @property
    def scores(self) -> str:
        """The name of the score storage: "int8", "fp32" or "implicit"."""
        return self.storage.name

    def _set_seeds(self, seed: int, candidate_seed: int, device=None) -> None:
        super()._set_seeds(seed, candidate_seed, device)
        if "storage" in self.__dict__:  # not while SlotLayer.__init__ runs: the storage registers later
            self.storage.reseed(self)

    def state_categories(self) -> dict[str, str]:
        return {name: what for part in self.parts for name, what in self.storage.state(part).items()}

    @staticmethod
    def _zero_proxy(shape, device, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=device).expand(shape)

    def _proxy(self, part: str) -> nn.Parameter:
        """The part's proxy Parameter, re-expanded if a copy materialised it (deepcopy, load)."""
        p = getattr(self, f"slot_{part}")
        if any(s != 0 for s in p.stride()) or p.device != self._cand_keys.device:
            self._reset_proxy(part)
        elif not torch.compiler.is_compiling():  # inside a graph: registered by __setstate__ / _apply
            tag_proxy(p, self, part)
        return p

    @torch.compiler.disable
    def _reset_proxy(self, part: str) -> None:
        p = getattr(self, f"slot_{part}")
        p.data = self._zero_proxy(self.parts[part][0], self._cand_keys.device, p.dtype)
        tag_proxy(p, self, part)

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
        for name, mine in self._buffers.items():  # another score storage's state is refused, never cast
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and mine is not None and (t.dtype == torch.int8) != (mine.dtype == torch.int8):
                error_msgs.append(f"{prefix}{name} is {t.dtype} in the state, {mine.dtype} in this layer (scores "
                                  f"{self.scores!r}): a state of another score storage cannot be loaded")
                return
        for part in self.parts:  # values the update and selection rely on
            for name, ok, accepted in self.storage.load_checks(part):
                t = state_dict.get(prefix + name)
                if (isinstance(t, torch.Tensor) and t.dtype.is_floating_point and name in self._buffers
                        and not bool(ok(t).all())):
                    error_msgs.append(f"{prefix}{name} must be {accepted}")
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        missing_keys[before:] = [k for k in missing_keys[before:] if k not in proxies]

    def _compute_dtype(self):
        return self.slot_weight.dtype

    def _pick(self, part: str, draw: int | torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(index, selected value or None) per connection; the storage's greedy selection may hand
        back the values it regenerated anyway."""
        if draw is None:
            return self.storage.greedy(self, part)
        return self.storage.sample(self, part, self._sample_key(draw)), None

    def _select(self, part, draw):
        return self._pick(part, draw)[0].long()

    @torch.no_grad()
    def score_values(self, part: str = "weight") -> torch.Tensor:
        """The real scores of a part, float32 (*shape, K): int8 levels times the scale, or the
        implicit scores computed from the drift (materialised on request only)."""
        return self.storage.scores(self, part).view(*self.parts[part][0], self.k)

    def _values(self, part, idx):
        return selected_values(idx, self.parts[part][1], self.candidate_keys)

    def candidates(self, part: str = "weight") -> torch.Tensor:
        shape, offset = self.parts[part]
        return candidate_values(math.prod(shape), offset, self.candidate_keys).view(*shape, self.k)

    def _effective(self, part, draw):
        proxy = self._proxy(part)
        with torch.no_grad():
            idx, w = self._pick(part, draw)
            if w is None:
                w = self._values(part, idx)
            w = w.view(self.parts[part][0]).to(proxy.dtype)  # the module's dtype (fp32: no copy)
        if torch.is_grad_enabled() and proxy.requires_grad:
            # proxy.grad receives G; w is not copied (in a user's torch.compile graph, adding the
            # zero proxy is fused away and gives eager's bits; torch.func transforms need a plain
            # op). A cache the storage rewrites in place is lent to the graph while it may read it
            # (copy-on-write, see storage.lend).
            if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
                w = w + proxy
            else:
                w = _ToProxy.apply(w, proxy, self.storage.lend(self, part, w))
        return w

    @torch.no_grad()
    def update_scores(self, part: str, direction: torch.Tensor, lr: float, weight_decay: float,
                      step: int | torch.Tensor) -> None:
        """``s_k -= lr * direction * W_k`` for every connection of a part (called by SlotSGD).

        ``weight_decay`` shrinks every score by ``(1 - lr * weight_decay)`` first (for int8, through
        the scale): SGD's decay without momentum, and invisible to greedy selection.
        """
        self.storage.update(self, part, direction, lr, weight_decay, step)

    def extra_repr(self) -> str:
        incremental = ", incremental=True" if self.config.incremental else ""
        return f"{super().extra_repr()}, scores={self.scores!r}{incremental}"


class _ToProxy(torch.autograd.Function):
    """``w`` unchanged (a view, no copy); its gradient goes to the proxy Parameter: what adding the
    zero proxy does, without a pass over the weights. The graph saves ``token`` (None or a tensor
    from the storage's ``lend``): it lives as long as the graph may still read ``w``. (The old
    ctx-in-forward style: ``setup_context`` would make every call several times dearer; torch.func
    transforms take the zero proxy's add instead.)"""

    @staticmethod
    def forward(ctx, w, proxy, token):
        if token is not None:
            ctx.save_for_backward(token)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return None, grad, None


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


class DenseSlotLayer(SlotLayer):
    """The paper's dense formulation, for side-by-side comparison. See the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        device = self._cand_keys.device
        for part, (shape, offset) in self.parts.items():
            rows = math.prod(shape)
            cand = candidate_values(rows, offset, self.candidate_keys)
            init, _ = init_scores(rows, self.k, self.seed, self.score_lambda * self.sigma, offset, torch.float32, device)
            self.register_buffer(f"{part}_candidates", cand.view(*shape, self.k))
            self.register_parameter(f"{part}_scores", nn.Parameter(init.view(*shape, self.k)))

    def state_categories(self) -> dict[str, str]:
        return {f"{part}_{name}": what for part in self.parts
                for name, what in (("scores", "scores"), ("candidates", "candidates"))}

    def _compute_dtype(self):
        return self.weight_scores.dtype

    def _select(self, part, draw):
        scores = getattr(self, f"{part}_scores").detach().view(-1, self.k)
        if draw is None:
            return greedy(scores)
        return sample(scores, 1.0, self.parts[part][1], self._sample_key(draw), self._sample_keys)

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
    def _setup(self, base, in_features: int, out_features: int, bias: bool, config: SlotConfig, kw: dict) -> None:
        in_features = check_int("in_features", in_features, 1)
        out_features = check_int("out_features", out_features, 1)
        base.__init__(self, (out_features, in_features), in_features, out_features, bias, config, default_lambda=0.1,
                      **kw)
        self.in_features, self.out_features = in_features, out_features

    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def _plain(self, device=None) -> nn.Module:
        """The ordinary layer of the same shape (uninitialised weights)."""
        return nn.Linear(self.in_features, self.out_features, "bias" in self.parts, device=device)


def _int_pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair; ValueError naming ``name`` otherwise."""
    pair = _pair(value)
    if not (isinstance(pair, tuple) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them; got {value!r}")
    return pair


class _Conv:
    def _setup(self, base, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, config, kw):
        in_channels = check_int("in_channels", in_channels, 1)
        out_channels = check_int("out_channels", out_channels, 1)
        groups = check_int("groups", groups, 1)
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
        base.__init__(self, shape, shape[1] * rf, out_channels * rf, bias, config, default_lambda=1.0, **kw)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw_)
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.padding = padding

    padding_mode = "zeros"  # set_padding_mode: as nn.Conv2d's

    def _op(self, x, weight, bias):
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad, then a valid convolution
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def set_padding_mode(self, mode: str) -> "SlotLayer":
        """Pad as ``nn.Conv2d(padding_mode=mode)`` does: "zeros", "reflect", "replicate" or "circular"."""
        _set_padding_mode(self, mode)
        return self

    def _plain(self, device=None) -> nn.Module:
        """The ordinary layer of the same shape and settings (uninitialised weights)."""
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, "bias" in self.parts, self.padding_mode, device=device)

    def _shape_repr(self) -> str:
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}{mode}"
        )


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _set_padding_mode(layer, mode: str) -> None:
    """Record ``mode`` and the F.pad amounts nn.ConvNd would use (last dimension first)."""
    if mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(map(repr, PADDING_MODES))}; got {mode!r}")
    n = len(layer.kernel_size)
    if isinstance(layer.padding, str):
        pads = [0, 0] * n
        if layer.padding == "same":
            for d, k, i in zip(layer.dilation, layer.kernel_size, range(n - 1, -1, -1)):
                total = d * (k - 1)
                pads[2 * i], pads[2 * i + 1] = total // 2, total - total // 2
    else:
        pads = [p for p in reversed(layer.padding) for _ in range(2)]
    layer.padding_mode, layer._reversed_padding = mode, tuple(pads)


def _int_tuple(name: str, value, n: int, minimum: int) -> tuple[int, ...]:
    """An int or ``n`` ints, each >= minimum, as an n-tuple; ValueError naming ``name`` otherwise."""
    t = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(t, (tuple, list)) and len(t) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in t)):
        raise ValueError(f"{name} must be an int >= {minimum} or {n} of them; got {value!r}")
    return tuple(t)


class _ConvNd:
    """The shape of an N-d convolution (N = ``_dims``: 1 or 3; 2 is :class:`_Conv`)."""

    _dims = 0
    padding_mode = "zeros"

    def _setup(self, base, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
               padding_mode, config, kw):
        n = self._dims
        in_channels = check_int("in_channels", in_channels, 1)
        out_channels = check_int("out_channels", out_channels, 1)
        groups = check_int("groups", groups, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        kernel = _int_tuple("kernel_size", kernel_size, n, 1)
        stride, dilation = _int_tuple("stride", stride, n, 1), _int_tuple("dilation", dilation, n, 1)
        if isinstance(padding, str) and padding in ("valid", "same"):
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1 (as nn.Conv{n}d); got stride={stride}")
        else:
            try:
                padding = _int_tuple("padding", padding, n, 0)
            except (ValueError, TypeError):
                raise ValueError(f"padding must be 'valid', 'same', an int >= 0 or {n} of them; got {padding!r}") from None
        rf = math.prod(kernel)
        shape = (out_channels, in_channels // groups, *kernel)
        base.__init__(self, shape, shape[1] * rf, out_channels * rf, bias, config, default_lambda=1.0, **kw)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride, self.dilation, self.groups, self.padding = stride, dilation, groups, padding
        _set_padding_mode(self, padding_mode)

    def _op(self, x, weight, bias):
        conv = F.conv1d if self._dims == 1 else F.conv3d
        if self.padding_mode != "zeros":  # as nn.ConvNd: pad, then a valid convolution
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def set_padding_mode(self, mode: str) -> "SlotLayer":
        """Pad as ``nn.ConvNd(padding_mode=mode)`` does."""
        _set_padding_mode(self, mode)
        return self

    def _plain(self, device=None) -> nn.Module:
        cls = nn.Conv1d if self._dims == 1 else nn.Conv3d
        return cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                   self.groups, "bias" in self.parts, self.padding_mode, device=device)

    def _shape_repr(self) -> str:
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}{mode}"
        )


class SlotLinear(_Linear, SeededSlotLayer):
    """A Linear whose weights are chosen among K seeded candidates per connection.

    ``scores="int8"`` stores K int8 scores per connection (``"fp32"``: K fp32 scores, for
    ablations; ``"implicit"``: one fp32 drift, see :mod:`seedslot.storages`; ``incremental=True``
    re-selects only what can have changed). ``score_lambda`` defaults to the paper's 0.1 for
    linear layers. The settings come as ``config`` (a :class:`~seedslot.SlotConfig`) or as
    keywords, not both; the layer keeps them as ``config`` (its own seed included).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, config: SlotConfig | None = None,
                 k: int = UNSET, seed: int = UNSET, sharing: str = UNSET, selection: str = UNSET, scores: str = UNSET,
                 score_lambda: float | None = UNSET, incremental: bool = UNSET, candidate_seed: int | None = None,
                 device=None) -> None:
        config = SlotConfig.resolve(config, "SlotLinear", k=k, seed=seed, sharing=sharing, selection=selection,
                                    scores=scores, score_lambda=score_lambda, incremental=incremental)
        self._setup(SeededSlotLayer, in_features, out_features, bias, config,
                    dict(candidate_seed=candidate_seed, device=device))


class SlotConv2d(_Conv, SeededSlotLayer):
    """A Conv2d whose weights are chosen among K seeded candidates per connection (lambda 1).
    The settings come as ``config`` or as keywords, not both."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, config: SlotConfig | None = None, k: int = UNSET, seed: int = UNSET,
                 sharing: str = UNSET, selection: str = UNSET, scores: str = UNSET,
                 score_lambda: float | None = UNSET, incremental: bool = UNSET, candidate_seed: int | None = None,
                 device=None) -> None:
        config = SlotConfig.resolve(config, "SlotConv2d", k=k, seed=seed, sharing=sharing, selection=selection,
                                    scores=scores, score_lambda=score_lambda, incremental=incremental)
        self._setup(SeededSlotLayer, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                    config, dict(candidate_seed=candidate_seed, device=device))


class DenseSlotLinear(_Linear, DenseSlotLayer):
    """The paper's dense slot Linear: stored candidates and fp32 score Parameter (a config's
    ``scores`` does not apply)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, config: SlotConfig | None = None,
                 k: int = UNSET, seed: int = UNSET, sharing: str = UNSET, selection: str = UNSET,
                 score_lambda: float | None = UNSET, candidate_seed: int | None = None, device=None) -> None:
        config = SlotConfig.resolve(config, "DenseSlotLinear", k=k, seed=seed, sharing=sharing, selection=selection,
                                    score_lambda=score_lambda)
        self._setup(DenseSlotLayer, in_features, out_features, bias, config,
                    dict(candidate_seed=candidate_seed, device=device))


class DenseSlotConv2d(_Conv, DenseSlotLayer):
    """The paper's dense slot Conv2d: stored candidates and fp32 score Parameter (a config's
    ``scores`` does not apply)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, config: SlotConfig | None = None, k: int = UNSET, seed: int = UNSET,
                 sharing: str = UNSET, selection: str = UNSET, score_lambda: float | None = UNSET,
                 candidate_seed: int | None = None, device=None) -> None:
        config = SlotConfig.resolve(config, "DenseSlotConv2d", k=k, seed=seed, sharing=sharing, selection=selection,
                                    score_lambda=score_lambda)
        self._setup(DenseSlotLayer, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                    config, dict(candidate_seed=candidate_seed, device=device))


def _resolved(name: str, dense: bool, config, k, seed, sharing, selection, scores, score_lambda) -> SlotConfig:
    """The settings of a generated layer class ``name``: ``config`` or the keywords (not both); a
    dense reference keeps fp32 scores, so ``scores`` is refused there."""
    settings = dict(k=k, seed=seed, sharing=sharing, selection=selection, score_lambda=score_lambda)
    if not dense:
        settings["scores"] = scores
    elif scores is not UNSET:
        raise ValueError(f"{name} keeps fp32 scores and candidates; scores does not apply (got {scores!r})")
    return SlotConfig.resolve(config, name, **settings)


def _conv_nd_class(dims: int, base, dense: bool):
    """SlotConv1d / SlotConv3d and their dense references: nn.ConvNd's arguments, slot settings as
    ``config`` or as keywords (not both)."""
    name = f"{'Dense' if dense else ''}SlotConv{dims}d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *,
                 config: SlotConfig | None = None, k: int = UNSET, seed: int = UNSET, sharing: str = UNSET,
                 selection: str = UNSET, scores: str = UNSET, score_lambda: float | None = UNSET,
                 candidate_seed: int | None = None, device=None) -> None:
        config = _resolved(name, dense, config, k, seed, sharing, selection, scores, score_lambda)
        self._setup(base, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                    padding_mode, config, dict(candidate_seed=candidate_seed, device=device))

    what = "the paper's dense reference of" if dense else "seeded"
    doc = f"A {what} nn.Conv{dims}d: weights chosen among K candidates per connection (lambda 1)."
    return type(name, (_ConvNd, base), {"_dims": dims, "__init__": __init__, "__doc__": doc,
                                         "__module__": __name__, "__qualname__": name})


SlotConv1d = _conv_nd_class(1, SeededSlotLayer, dense=False)
SlotConv3d = _conv_nd_class(3, SeededSlotLayer, dense=False)
DenseSlotConv1d = _conv_nd_class(1, DenseSlotLayer, dense=True)
DenseSlotConv3d = _conv_nd_class(3, DenseSlotLayer, dense=True)


class _ConvTransposeNd:
    """The shape of an N-d transposed convolution (N = ``_dims``): nn.ConvTransposeNd's weight
    (in_channels, out_channels / groups, *kernel), one bias per output channel, lambda 1 as for
    every convolution. Its Glorot bound takes fan_in = weight.size(1) * receptive field and fan_out
    = weight.size(0) * receptive field, the rule of every slot layer (and torch's for this weight):
    it is the bound of the convolution out -> in whose adjoint this layer is, and Glorot's bound of a
    linear map is its adjoint's. Padding is zeros only, as nn.ConvTransposeNd's."""

    _dims = 0
    padding_mode = "zeros"

    def _setup(self, base, in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
               dilation, padding_mode, config, kw):
        n = self._dims
        in_channels = check_int("in_channels", in_channels, 1)
        out_channels = check_int("out_channels", out_channels, 1)
        groups = check_int("groups", groups, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' for a transposed convolution (as nn.ConvTranspose{n}d); "
                             f"got {padding_mode!r}")
        kernel = _int_tuple("kernel_size", kernel_size, n, 1)
        stride, dilation = _int_tuple("stride", stride, n, 1), _int_tuple("dilation", dilation, n, 1)
        padding = _int_tuple("padding", padding, n, 0)
        output_padding = _int_tuple("output_padding", output_padding, n, 0)
        if any(o >= max(s, d) for o, s, d in zip(output_padding, stride, dilation)):
            raise ValueError(f"output_padding={output_padding} must be smaller than stride={stride} or "
                             f"dilation={dilation} in every dimension")
        rf = math.prod(kernel)
        shape = (in_channels, out_channels // groups, *kernel)
        base.__init__(self, shape, shape[1] * rf, shape[0] * rf, bias, config, default_lambda=1.0,
                      bias_size=out_channels, **kw)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.dilation, self.groups = dilation, groups

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """As nn.ConvTransposeNd's: ``output_size`` picks among the output sizes a strided
        transposed convolution can give (it sets output_padding for this call)."""
        # torch's own resolution of output_size: it reads only self.output_padding
        output_padding = nn.modules.conv._ConvTransposeNd._output_padding(
            self, x, output_size, self.stride, self.padding, self.kernel_size, self._dims, self.dilation)
        return self._op(x, *self._weights(), output_padding)

    def _op(self, x, weight, bias, output_padding=None):
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self._dims - 1]
        return conv(x, weight, bias, self.stride, self.padding,
                    self.output_padding if output_padding is None else output_padding, self.groups, self.dilation)

    def _plain(self, device=None) -> nn.Module:
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[self._dims - 1]
        return cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                   self.output_padding, self.groups, "bias" in self.parts, self.dilation, device=device)

    def _shape_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
                f"groups={self.groups}")


def _conv_transpose_class(dims: int, base, dense: bool):
    """SlotConvTranspose1d/2d/3d and their dense references: nn.ConvTransposeNd's arguments, slot
    settings as ``config`` or as keywords (not both)."""
    name = f"{'Dense' if dense else ''}SlotConvTranspose{dims}d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = False, dilation=1, padding_mode: str = "zeros", *,
                 config: SlotConfig | None = None, k: int = UNSET, seed: int = UNSET, sharing: str = UNSET,
                 selection: str = UNSET, scores: str = UNSET, score_lambda: float | None = UNSET,
                 candidate_seed: int | None = None, device=None) -> None:
        config = _resolved(name, dense, config, k, seed, sharing, selection, scores, score_lambda)
        self._setup(base, in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                    dilation, padding_mode, config, dict(candidate_seed=candidate_seed, device=device))

    what = "the paper's dense reference of" if dense else "seeded"
    doc = (f"A {what} nn.ConvTranspose{dims}d: weights chosen among K candidates per connection (lambda 1); "
           "``forward(input, output_size=None)`` as torch's.")
    return type(name, (_ConvTransposeNd, base), {"_dims": dims, "__init__": __init__, "__doc__": doc,
                                                  "__module__": __name__, "__qualname__": name})


SlotConvTranspose1d = _conv_transpose_class(1, SeededSlotLayer, dense=False)
SlotConvTranspose2d = _conv_transpose_class(2, SeededSlotLayer, dense=False)
SlotConvTranspose3d = _conv_transpose_class(3, SeededSlotLayer, dense=False)
DenseSlotConvTranspose1d = _conv_transpose_class(1, DenseSlotLayer, dense=True)
DenseSlotConvTranspose2d = _conv_transpose_class(2, DenseSlotLayer, dense=True)
DenseSlotConvTranspose3d = _conv_transpose_class(3, DenseSlotLayer, dense=True)


class _Embedding:
    """The shape of an embedding table: a Linear from one-hot rows, K candidate rows per entry
    (Glorot bound of (num_embeddings, embedding_dim), lambda 0.1 as for linear layers). Without
    ``padding_idx`` and ``max_norm``: a padding row would need a zero candidate, and max_norm
    rewrites the weights in place."""

    def _setup(self, base, num_embeddings: int, embedding_dim: int, config: SlotConfig, kw: dict) -> None:
        num_embeddings = check_int("num_embeddings", num_embeddings, 1)
        embedding_dim = check_int("embedding_dim", embedding_dim, 1)
        base.__init__(self, (num_embeddings, embedding_dim), embedding_dim, num_embeddings, False, config,
                      default_lambda=0.1, **kw)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.scale_grad_by_freq, self.sparse = None, None, False, False

    def _op(self, x, weight, bias):
        return F.embedding(x, weight, scale_grad_by_freq=self.scale_grad_by_freq)

    def _plain(self, device=None) -> nn.Module:
        return nn.Embedding(self.num_embeddings, self.embedding_dim, scale_grad_by_freq=self.scale_grad_by_freq,
                            device=device)

    def _shape_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class SlotEmbedding(_Embedding, SeededSlotLayer):
    """An nn.Embedding whose entries are chosen among K seeded candidates each. The settings come
    as ``config`` or as keywords, not both."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, config: SlotConfig | None = None, k: int = UNSET,
                 seed: int = UNSET, sharing: str = UNSET, selection: str = UNSET, scores: str = UNSET,
                 score_lambda: float | None = UNSET, candidate_seed: int | None = None, device=None) -> None:
        config = SlotConfig.resolve(config, "SlotEmbedding", k=k, seed=seed, sharing=sharing, selection=selection,
                                    scores=scores, score_lambda=score_lambda)
        self._setup(SeededSlotLayer, num_embeddings, embedding_dim, config,
                    dict(candidate_seed=candidate_seed, device=device))


class DenseSlotEmbedding(_Embedding, DenseSlotLayer):
    """The paper's dense formulation of :class:`SlotEmbedding`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, config: SlotConfig | None = None, k: int = UNSET,
                 seed: int = UNSET, sharing: str = UNSET, selection: str = UNSET, score_lambda: float | None = UNSET,
                 candidate_seed: int | None = None, device=None) -> None:
        config = SlotConfig.resolve(config, "DenseSlotEmbedding", k=k, seed=seed, sharing=sharing,
                                    selection=selection, score_lambda=score_lambda)
        self._setup(DenseSlotLayer, num_embeddings, embedding_dim, config,
                    dict(candidate_seed=candidate_seed, device=device))
