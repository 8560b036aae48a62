"""A seeded layer's proxy Parameters and the layer each belongs to.

A proxy is the zero-storage Parameter through which autograd hands a part's effective-weight
gradient to SlotSGD. The layer tags it with an :class:`Owner`: a weak reference to the layer (so a
proxy never keeps a model alive) and the part's name. Copies and pickles drop the reference (a
weak reference is neither copied nor pickled); the layer tags its copy's proxies again
(``SeededSlotLayer.__setstate__``, ``_apply`` and every forward).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["Owner", "tag_proxy", "slot_owner"]

_ATTR = "_slot_owner"


class Owner:
    """The layer (weakly) and part a proxy Parameter belongs to."""

    __slots__ = ("layer", "part")

    def __init__(self, layer: nn.Module | None, part: str) -> None:
        self.layer = None if layer is None else weakref.ref(layer)
        self.part = part

    def __reduce__(self):  # deepcopy, pickle: no layer (the copy's layer tags it again)
        return Owner, (None, self.part)


def tag_proxy(param: torch.Tensor, layer: nn.Module, part: str) -> None:
    """Record that ``param`` is the proxy Parameter of ``layer``'s ``part``."""
    entry = param.__dict__.get(_ATTR)
    if entry is None or entry.layer is None or entry.layer() is not layer or entry.part != part:
        setattr(param, _ATTR, Owner(layer, part))


def slot_owner(param: torch.Tensor):
    """The seeded layer and part ("weight" or "bias") a proxy Parameter belongs to, or None."""
    entry = getattr(param, _ATTR, None)  # a plain attribute read: torch.compile traces it
    if entry is None or entry.layer is None:
        return None
    layer = entry.layer()
    return None if layer is None else (layer, entry.part)
