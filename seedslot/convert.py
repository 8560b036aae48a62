"""Whole-model conversion: ``slotify_`` turns Linear/ConvNd/ConvTransposeNd/Embedding and
nn.MultiheadAttention's input projections into slot layers in place (in the spirit
of torchao's ``quantize_``), ``to_dense`` turns a slot model back into an ordinary one holding the
selected weights (for deployment and for the paper's fine-tuning experiment)."""

from __future__ import annotations

import copy
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .config import UNSET, SlotConfig
from .attention import SlotMultiheadAttention, projection_shapes
from .layers import (DenseSlotConv1d, DenseSlotConv2d, DenseSlotConv3d, DenseSlotConvTranspose1d,
                     DenseSlotConvTranspose2d, DenseSlotConvTranspose3d, DenseSlotEmbedding, DenseSlotLinear,
                     SlotConv1d, SlotConv2d, SlotConv3d, SlotConvTranspose1d, SlotConvTranspose2d,
                     SlotConvTranspose3d, SlotEmbedding, SlotLayer, SlotLinear)
from .rng import derive

FilterFn = Callable[[nn.Module, str], bool]


def layer_seed(seed: int, fqn: str) -> int:
    """The seed of the layer at qualified name ``fqn``: a pure function of (seed, name)."""
    return derive(seed, zlib.crc32(fqn.encode()), len(fqn)) >> 1  # 63 bits: non-negative everywhere


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# What slotify_ converts, and their subclasses that keep their forward.
_CONVERTIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_TRANSPOSED, nn.Embedding, nn.MultiheadAttention)
_CONV_TRANSPOSE = {1: (SlotConvTranspose1d, DenseSlotConvTranspose1d), 2: (SlotConvTranspose2d, DenseSlotConvTranspose2d),
                   3: (SlotConvTranspose3d, DenseSlotConvTranspose3d)}
_CONV = {1: (SlotConv1d, DenseSlotConv1d), 2: (SlotConv2d, DenseSlotConv2d), 3: (SlotConv3d, DenseSlotConv3d)}
# nn.MultiheadAttention's parameters: add_bias_kv's biases, (1, 1, E) but vectors, which stay
# learned; and every one it may hold (the others are its input projection, which converts).
_ATTENTION_VECTORS = ("bias_k", "bias_v")
_ATTENTION_ALL = ("in_proj_weight", "in_proj_bias", *_ATTENTION_VECTORS, "q_proj_weight", "k_proj_weight",
                  "v_proj_weight")


@dataclass(frozen=True)
class ConvertedLayer:
    """A layer ``slotify_`` turned into a slot layer: its connections and the bytes of its slot state."""

    name: str  # the slot layer's qualified name
    source: str  # the type it had
    target: str  # the slot layer's type
    connections: int
    bytes: int
    # The qualified names of the parameters it replaced (its first name's); a separate q/k/v
    # projection names in_proj_bias, of which it replaced a third.
    replaces: tuple[str, ...] = ()


@dataclass(frozen=True)
class LearnedWeight:
    """A parameter that stays learned, and why: "filtered" (``filter_fn`` said no), "tied" (it is
    also a parameter of ``other``), "unsupported" (no slot layer for its module) or "vector" (a
    1-D parameter of a module without a slot layer: a norm's scale and shift, a bias)."""

    name: str  # the parameter's qualified name
    module: str  # its module's type
    ndim: int
    numel: int
    bytes: int
    reason: str
    detail: str = ""
    duplicate: bool = False  # the same Parameter is listed under another name already

    @property
    def strict_violation(self) -> bool:
        """Whether ``slotify_(strict=True)`` refuses to leave it learned: a weight of two or more
        dimensions left learned for any reason but the user's ``filter_fn``."""
        return self.reason in ("unsupported", "tied") and self.ndim >= 2


@dataclass
class ConversionReport:
    """What :func:`slotify_` did: every converted layer, every parameter left learned with the
    reason, and the share of the model's weights now seeded (connections of slot layers over
    those plus the elements of the learned parameters)."""

    converted: list[ConvertedLayer] = field(default_factory=list)
    learned: list[LearnedWeight] = field(default_factory=list)
    kept: list[ConvertedLayer] = field(default_factory=list)  # slot layers already there (slotify_ again)

    @property
    def seeded(self) -> int:
        return sum(c.connections for c in (*self.converted, *self.kept))

    @property
    def learned_numel(self) -> int:
        return sum(w.numel for w in self.learned if not w.duplicate)

    @property
    def seeded_share(self) -> float:
        total = self.seeded + self.learned_numel
        return self.seeded / total if total else 0.0

    def __str__(self) -> str:
        kept = f" ({len(self.kept)} slot layers kept)" if self.kept else ""
        lines = [f"slotify_: {len(self.converted)} layers converted{kept}, {self.seeded} connections seeded; "
                 f"{len(self.learned)} parameters ({self.learned_numel} weights) left learned; "
                 f"{100 * self.seeded_share:.2f}% of the weights seeded"]
        for c in self.converted:
            lines.append(f"  converted  {c.name}: {c.source} -> {c.target}, {c.connections} connections, "
                         f"{c.bytes} bytes")
        for c in self.kept:
            lines.append(f"  kept       {c.name}: already a {c.target}, {c.connections} connections, {c.bytes} bytes")
        for w in self.learned:
            why = w.reason + (f" ({w.detail})" if w.detail else "")
            lines.append(f"  learned    {w.name}: {w.module}, {w.numel} weights, {w.bytes} bytes: {why}")
        return "\n".join(lines)


def _connections(layer: SlotLayer) -> int:
    return sum(math.prod(shape) for shape, _ in layer.parts.values())


def _converted_params(m: nn.Module) -> tuple[str, ...]:
    """The names of the parameters of ``m`` that its conversion replaces."""
    if isinstance(m, nn.MultiheadAttention):
        return (*(f"{name}_weight" for name in projection_shapes(m)), "in_proj_bias")
    return ("weight", "bias")


def _replaces(m: nn.Module, fqn: str, layer_name: str) -> tuple[str, ...]:
    """The qualified names of the parameters of ``m`` (at ``fqn``) that its slot layer named
    ``layer_name`` replaces: an attention's projection replaces its weight and its third of
    ``in_proj_bias``, which each of the three separate projections names."""
    names = [n for n in _converted_params(m) if m._parameters.get(n) is not None]
    if isinstance(m, nn.MultiheadAttention):
        leaf = layer_name.rpartition(".")[2]
        names = [n for n in names if n in (f"{leaf}_weight", "in_proj_bias")]
    return tuple(f"{fqn}.{n}" for n in names)


def _convertible(m: nn.Module) -> str | None:
    """Why module ``m`` cannot become a slot layer, or None if it can (an nn.Linear, nn.ConvNd,
    nn.ConvTransposeNd, nn.Embedding or nn.MultiheadAttention, or a subclass that neither overrides
    ``forward`` nor holds anything besides their parameters and, for attention, ``out_proj``)."""
    base = next((b for b in _CONVERTIBLE if isinstance(m, b)), None)
    if base is None:
        return f"no slot layer for {type(m).__name__}"
    if type(m).forward is not base.forward:
        return f"{type(m).__name__} overrides {base.__name__}.forward"
    attention = base is nn.MultiheadAttention
    owned = "parameters and out_proj" if attention else "weight and bias"
    if (set(m._parameters) - set(_ATTENTION_ALL if attention else ("weight", "bias")) or m._buffers
            or set(m._modules) - ({"out_proj"} if attention else set())):
        return f"{type(m).__name__} holds more than {base.__name__}'s {owned}"
    weight = _weight(m)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return f"{type(m).__name__} is not initialised yet (run one forward first)"
    if not weight.dtype.is_floating_point:
        return f"weight dtype {weight.dtype} is not floating point"
    if isinstance(m, nn.Embedding) and (m.padding_idx is not None or m.max_norm is not None or m.sparse):
        return "an Embedding with padding_idx, max_norm or sparse gradients"
    if isinstance(m, _TRANSPOSED) and m.padding_mode != "zeros":
        return f"padding_mode {m.padding_mode!r}: a transposed convolution pads with zeros only"
    return None


def _state_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in m.state_dict().values() if isinstance(t, torch.Tensor))


def _weight(m: nn.Module) -> torch.Tensor:
    """The weight of a convertible module whose dtype and device its slot layers take (an
    attention's first input projection weight)."""
    if isinstance(m, nn.MultiheadAttention):
        return getattr(m, f"{next(iter(projection_shapes(m)))}_weight")
    return m.weight


def _slot_layers(m: nn.Module, fqn: str, config: SlotConfig, dense: bool) -> dict[str, SlotLayer]:
    """The slot layers that replace ``m`` by qualified name, each seeded by its name, in ``m``'s
    dtype and mode: ``m``'s own, or for nn.MultiheadAttention its input projection's
    (``fqn.in_proj``, or ``fqn.q_proj``, ``fqn.k_proj`` and ``fqn.v_proj``: see
    :func:`~seedslot.attention.projection_shapes`)."""
    weight = _weight(m)
    if isinstance(m, nn.MultiheadAttention):
        layers = {f"{fqn}.{name}": (DenseSlotLinear if dense else SlotLinear)(
            n_in, n_out, m.in_proj_bias is not None, **_layer_kw(f"{fqn}.{name}", config, weight.device))
            for name, (n_in, n_out) in projection_shapes(m).items()}
    else:
        layers = {fqn: _new_slot_layer(m, dense, **_layer_kw(fqn, config, weight.device))}
    for layer in layers.values():
        if weight.dtype != torch.float32:  # the slot layer computes in the layer's dtype, as it did
            layer.to(weight.dtype)
        layer.train(m.training)
    return layers


def _layer_kw(fqn: str, config: SlotConfig, device) -> dict:
    """The keywords of the slot layer at ``fqn``: its seed is its name's."""
    return dict(config=config.replace(seed=layer_seed(config.seed, fqn)), device=device,
                candidate_seed=config.seed if config.sharing == "global" else None)


def _new_slot_layer(m: nn.Module, dense: bool, **kw) -> SlotLayer:
    if isinstance(m, nn.Embedding):
        layer = (DenseSlotEmbedding if dense else SlotEmbedding)(m.num_embeddings, m.embedding_dim, **kw)
        layer.scale_grad_by_freq = m.scale_grad_by_freq
        return layer
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        return (DenseSlotLinear if dense else SlotLinear)(m.in_features, m.out_features, bias, **kw)
    dims = len(m.kernel_size)
    if isinstance(m, _TRANSPOSED):
        return _CONV_TRANSPOSE[dims][dense](m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                            m.output_padding, m.groups, bias, m.dilation, **kw)
    layer = _CONV[dims][dense](m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                               m.groups, bias, **kw)
    return layer.set_padding_mode(m.padding_mode)


def slotify_(
    model: nn.Module,
    config: SlotConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    dense: bool = False,
    k: int = UNSET,
    seed: int = UNSET,
    sharing: str = UNSET,
    selection: str = UNSET,
    scores: str = UNSET,
    score_lambda: float | None = UNSET,
    incremental: bool = UNSET,
    strict: bool = False,
    verbose: bool = False,
    report: bool = False,
) -> nn.Module | ConversionReport:
    """Replace every ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and
    ``nn.Embedding`` (without padding_idx or max_norm) of ``model``, and every subclass that keeps
    their forward (e.g. nn.MultiheadAttention's ``out_proj``), by a slot layer, in place. An
    ``nn.MultiheadAttention`` becomes a :class:`~seedslot.SlotMultiheadAttention` whose input
    projection is the slot linear layer ``in_proj`` (one ``in_proj_weight``, kdim == vdim ==
    embed_dim), or the three ``q_proj``, ``k_proj`` and ``v_proj`` (separate q/k/v projection
    weights; each also replaces its third of ``in_proj_bias``).

    Returns ``model``, or with ``report=True`` a :class:`ConversionReport` (``verbose=True`` prints
    it): every converted layer with its connections and bytes, every parameter left learned with
    the reason, and the share of the weights now seeded. ``strict=True`` raises ValueError (one
    line naming the module and its type) when a weight of two or more dimensions would stay
    learned for any reason but ``filter_fn``.

    The settings come as ``config`` (a :class:`~seedslot.SlotConfig`, whose ``seed`` is the
    model's) or as the keywords ``k``, ``seed``, ``sharing``, ``selection``, ``scores``,
    ``score_lambda`` and ``incremental``, not both. Each layer's seed is :func:`layer_seed` of ``seed`` and its qualified name, so the same model
    and seed always give the same network. With ``sharing="global"`` every layer draws its K unit
    candidates from ``seed`` itself: one set for the whole model. ``dense=True`` builds the
    paper's dense reference layers instead (``scores`` does not apply). ``filter_fn(module, fqn)``
    picks the layers to convert. A module used in several places becomes one slot layer used in
    all of them (its seed and ``filter_fn`` follow its first name). A parameter tied to another
    module's (nanoGPT's ``lm_head.weight`` is ``wte.weight``) stays learned, so the tie holds;
    the report says so. Nothing is changed if any argument or layer is invalid, or if ``strict``
    refuses.
    """
    config = SlotConfig.resolve(config, "slotify_", k=k, seed=seed, sharing=sharing, selection=selection,
                                scores=scores, score_lambda=score_lambda, incremental=incremental)
    # Every parameter's owners: a parameter held by two module objects is tied.
    owners: dict[int, list[str]] = {}
    for fqn, m in model.named_modules():
        for pname, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{fqn}.{pname}" if fqn else pname)
    out = ConversionReport()
    new: dict[str, nn.Module] = {}
    seen: dict[int, nn.Module | None] = {}  # id(module) -> its slot layer (None: not converted)
    reported: set[int] = set()  # parameters already in the report

    def learned(fqn: str, m: nn.Module, reason: str, detail: str, only: tuple[str, ...] | None = None) -> None:
        for pname, p in m._parameters.items():
            if p is None or (only is not None and pname not in only):
                continue
            name = f"{fqn}.{pname}" if fqn else pname
            if id(p) in reported:  # tied: listed once more under this name, counted once
                first = next(o for o in owners[id(p)] if o != name)
                out.learned.append(LearnedWeight(name, type(m).__name__, p.dim(), p.numel(),
                                                 p.numel() * p.element_size(), "tied", f"the Parameter {first}",
                                                 duplicate=True))
                continue
            reported.add(id(p))
            if reason == "unsupported" and p.dim() < 2:
                reason_, detail_ = "vector", f"a 1-D parameter of {type(m).__name__}"
            elif reason == "unsupported" and isinstance(m, nn.MultiheadAttention) and pname in _ATTENTION_VECTORS:
                reason_, detail_ = "vector", f"add_bias_kv's bias of {type(m).__name__}"
            else:
                reason_, detail_ = reason, detail
            out.learned.append(LearnedWeight(name, type(m).__name__, p.dim(),
                                             p.numel(), p.numel() * p.element_size(), reason_, detail_))

    def kv_biases(fqn: str, m: nn.Module) -> None:
        """An attention's bias_k and bias_v, (1, 1, E) vectors that stay learned whatever its projections do."""
        learned(fqn, m, "vector", f"add_bias_kv's bias of {type(m).__name__}", only=_ATTENTION_VECTORS)

    for fqn, m in model.named_modules(remove_duplicate=False):
        if id(m) in seen:  # a shared module: one slot layer, every place
            if seen[id(m)] is not None:
                new[fqn] = seen[id(m)]
            continue
        seen[id(m)] = None
        if isinstance(m, SlotLayer) and filter_fn is None and (m.k, m.sharing, m.selection, getattr(
                m, "scores", config.scores)) != (config.k, config.sharing, config.selection, config.scores):
            raise ValueError(f"{fqn}: already a slot layer with k={m.k}, sharing={m.sharing!r}, selection="
                             f"{m.selection!r}, scores={getattr(m, 'scores', None)!r}; slotify_ again does not "
                             "change it (build the model afresh for another config)")
        if isinstance(m, SlotMultiheadAttention):  # converted before: its in_proj and out_proj come next
            kv_biases(fqn, m)
            continue
        if isinstance(m, SlotLayer):  # converted before: seeded already, nothing to do
            out.kept.append(ConvertedLayer(fqn, type(m).__name__, type(m).__name__, _connections(m), _state_bytes(m)))
            reported.update(id(p) for p in m._parameters.values() if p is not None)
            continue
        why = _convertible(m)
        if why is not None:
            learned(fqn, m, "unsupported", why)
            continue
        if filter_fn is not None and not filter_fn(m, fqn):
            learned(fqn, m, "filtered", "filter_fn")
            continue
        names = _converted_params(m)
        # Tied: held under another name too, in another module or (q_proj_weight is k_proj_weight) in this one.
        tied = {pname: [o for o in owners[id(p)] if o != (f"{fqn}.{pname}" if fqn else pname)]
                for pname, p in m._parameters.items() if p is not None and pname in names}
        tied = {pname: others for pname, others in tied.items() if others}
        if tied:
            pname, others = next(iter(tied.items()))
            learned(fqn, m, "tied", f"{fqn + '.' if fqn else ''}{pname} is also {', '.join(others)}", only=names)
            if isinstance(m, nn.MultiheadAttention):
                kv_biases(fqn, m)
            continue
        if not fqn:
            raise ValueError("slotify_ converts the layers inside a model; wrap a lone layer in nn.Sequential")
        layers = _slot_layers(m, fqn, config, dense)
        reported.update(id(p) for pname, p in m._parameters.items() if p is not None and pname in names)
        for name, layer in layers.items():
            out.converted.append(ConvertedLayer(name, type(m).__name__, type(layer).__name__, _connections(layer),
                                                _state_bytes(layer), _replaces(m, fqn, name)))
        if isinstance(m, nn.MultiheadAttention):  # the module keeps its place; out_proj converts on its own
            kv_biases(fqn, m)
            replacement = SlotMultiheadAttention(m, **{name.rpartition(".")[2]: layer
                                                       for name, layer in layers.items()})
        else:
            (replacement,) = layers.values()
        seen[id(m)] = new[fqn] = replacement
    if strict:
        bad = [w for w in out.learned if w.strict_violation]
        if bad:
            more = f" (and {len(bad) - 1} more weights)" if len(bad) > 1 else ""
            raise ValueError(f"slotify_(strict=True): {bad[0].name} ({bad[0].module}) would stay learned: "
                             f"{bad[0].reason}: {bad[0].detail}{more}; nothing was converted")
    for fqn, layer in new.items():
        _replace(model, fqn, layer)
    if verbose:
        print(out)
    return out if report else model


def slot_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``'s slot layers (seeded layers' proxies for
    :class:`~seedslot.SlotSGD`, the dense reference's scores), each once."""
    return _split(model)[0]


def ordinary_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every other parameter of ``model`` (norms, embeddings, unconverted layers), each once: for
    any torch optimizer, next to SlotSGD for :func:`slot_parameters`."""
    return _split(model)[1]


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    slot_ids = {id(p) for m in model.modules() if isinstance(m, SlotLayer) for p in m.parameters()}
    slot, ordinary = [], []
    for p in model.parameters():
        (slot if id(p) in slot_ids else ordinary).append(p)
    return slot, ordinary


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every slot layer replaced by the ordinary layer (``nn.Linear``,
    ``nn.ConvNd``, ...) holding its selected (eval-mode) weights, and every
    :class:`~seedslot.SlotMultiheadAttention` by an ``nn.MultiheadAttention``: the same outputs in
    eval mode, trainable by any optimizer, with the unconverted model's state_dict keys."""
    out = _swap(copy.deepcopy(model), SlotMultiheadAttention, lambda m: m._plain())
    return _swap(out, SlotLayer, _plain_layer)


def _plain_layer(m: SlotLayer) -> nn.Module:
    weight = m.weight  # the greedy selection in the layer's dtype (a float64 layer stays float64)
    plain = m._plain(device=weight.device).to(weight.dtype)
    plain.weight.copy_(weight)
    if "bias" in m.parts:
        plain.bias.copy_(m.bias)
    return plain.train(m.training)


def _swap(root: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``root`` with every module of type ``kind`` replaced by ``make(module)`` in place (a module
    used in several places by one replacement, so shared layers stay shared); ``make(root)`` if
    ``root`` is one itself."""
    done: dict[int, nn.Module] = {}
    for fqn, m in list(root.named_modules(remove_duplicate=False)):
        if not isinstance(m, kind):
            continue
        if id(m) not in done:
            done[id(m)] = make(m)
        if not fqn:
            return done[id(m)]
        _replace(root, fqn, done[id(m)])
    return root
