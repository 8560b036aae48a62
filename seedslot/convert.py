"""Whole-model conversion: ``slotify_`` turns Linear/Conv2d into slot layers in place (in the spirit
of torchao's ``quantize_``), ``to_dense`` turns a slot model back into an ordinary one holding the
selected weights (for deployment and for the paper's fine-tuning experiment)."""

from __future__ import annotations

import copy
import zlib
from typing import Callable

import torch
from torch import nn

from .config import SlotConfig
from .layers import DenseSlotConv2d, DenseSlotLinear, SlotConv2d, SlotLayer, SlotLinear
from .rng import derive

FilterFn = Callable[[nn.Module, str], bool]


def layer_seed(seed: int, fqn: str) -> int:
    """The seed of the layer at qualified name ``fqn``: a pure function of (seed, name)."""
    return derive(seed, zlib.crc32(fqn.encode()), len(fqn)) >> 1  # 63 bits: non-negative everywhere


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def slotify_(
    model: nn.Module,
    config: SlotConfig | None = None,
    filter_fn: FilterFn | None = None,
    *,
    dense: bool = False,
    k: int = 8,
    seed: int = 0,
    sharing: str = "none",
    selection: str = "greedy",
    scores: str = "int8",
    score_lambda: float | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` (exact types) of ``model`` by a slot layer.

    The settings come as ``config`` (a :class:`~seedslot.SlotConfig`, whose ``seed`` is the
    model's) or as the keywords ``k``, ``seed``, ``sharing``, ``selection``, ``scores`` and
    ``score_lambda``, not both. Each layer's seed is :func:`layer_seed` of ``seed`` and its qualified name, so the same model
    and seed always give the same network. With ``sharing="global"`` every layer draws its K unit
    candidates from ``seed`` itself: one set for the whole model. ``dense=True`` builds the
    paper's dense reference layers instead (``scores`` does not apply). ``filter_fn(module, fqn)``
    picks the layers to convert. A module used in several places becomes one slot layer used in
    all of them (its seed and ``filter_fn`` follow its first name). Nothing is changed if any
    argument or layer is invalid.
    """
    config = SlotConfig.resolve(config, "slotify_", k=k, seed=seed, sharing=sharing, selection=selection,
                                scores=scores, score_lambda=score_lambda)
    new: dict[str, nn.Module] = {}
    converted: dict[int, nn.Module | None] = {}  # id(module) -> its slot layer (None: not converted)
    owners: dict[int, str] = {}  # id(weight or bias Parameter) -> the first layer holding it
    for fqn, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, SlotLayer) and filter_fn is None and (m.k, m.sharing, m.selection, getattr(
                m, "scores", config.scores)) != (config.k, config.sharing, config.selection, config.scores):
            raise ValueError(f"{fqn}: already a slot layer with k={m.k}, sharing={m.sharing!r}, selection="
                             f"{m.selection!r}, scores={getattr(m, 'scores', None)!r}; slotify_ again does not "
                             "change it (build the model afresh for another config)")
        if type(m) not in (nn.Linear, nn.Conv2d):
            continue
        for p in (m.weight, m.bias):
            if p is not None and owners.setdefault(id(p), fqn) != fqn and id(m) not in converted:
                raise ValueError(f"{fqn} and {owners[id(p)]} share a Parameter (tied weights): slot layers cannot "
                                 "tie it; share the module itself instead (one slot layer used in both places)")
        if id(m) in converted:  # a shared module: one slot layer, every place
            if converted[id(m)] is not None:
                new[fqn] = converted[id(m)]
            continue
        converted[id(m)] = None
        if filter_fn is not None and not filter_fn(m, fqn):
            continue
        if not fqn:
            raise ValueError("slotify_ converts the layers inside a model; wrap a lone layer in nn.Sequential")
        kw = dict(config=config.replace(seed=layer_seed(config.seed, fqn)), device=m.weight.device,
                  candidate_seed=config.seed if config.sharing == "global" else None)
        bias = m.bias is not None
        if isinstance(m, nn.Linear):
            cls = DenseSlotLinear if dense else SlotLinear
            new[fqn] = cls(m.in_features, m.out_features, bias, **kw)
        else:
            if m.padding_mode != "zeros":
                raise ValueError(f"{fqn}: padding_mode must be 'zeros' for a slot layer; got {m.padding_mode!r}")
            cls = DenseSlotConv2d if dense else SlotConv2d
            new[fqn] = cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                           m.groups, bias, **kw)
        if m.weight.dtype != torch.float32:  # the slot layer computes in the layer's dtype, as it did
            new[fqn].to(m.weight.dtype)
        new[fqn].train(m.training)
        converted[id(m)] = new[fqn]
    for fqn, layer in new.items():
        _replace(model, fqn, layer)
    return model


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every slot layer replaced by ``nn.Linear``/``nn.Conv2d`` holding
    its selected (eval-mode) weights: the same outputs in eval mode, trainable by any optimizer."""
    out = copy.deepcopy(model)
    done: dict[int, nn.Module] = {}  # id(slot layer) -> its plain layer: shared layers stay shared
    for fqn, m in list(out.named_modules(remove_duplicate=False)):
        if not isinstance(m, SlotLayer):
            continue
        if id(m) in done:
            _replace(out, fqn, done[id(m)])
            continue
        bias = "bias" in m.parts
        if isinstance(m, (SlotLinear, DenseSlotLinear)):
            plain = nn.Linear(m.in_features, m.out_features, bias, device=m.draws.device)
        else:
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                              m.groups, bias, device=m.draws.device)
        plain.weight.copy_(m.selected_weight())
        if bias:
            plain.bias.copy_(m.selected_bias())
        plain.train(m.training)
        if not fqn:
            return plain
        done[id(m)] = plain
        _replace(out, fqn, plain)
    return out
