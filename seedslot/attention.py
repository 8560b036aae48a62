"""nn.MultiheadAttention with slot input projections: what ``slotify_`` makes of an attention
module, whether its query, key and value projections are one (3E, E) ``in_proj_weight`` or,
when kdim or vdim differ from embed_dim, separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``."""

from __future__ import annotations

import torch
from torch import nn

from .layers import DenseSlotLinear, SlotLayer, SlotLinear

__all__ = ["SlotMultiheadAttention", "projection_shapes"]

# What nn.MultiheadAttention.__init__ sets besides its parameters and out_proj: copied as they are.
_SETTINGS = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first", "head_dim",
             "add_zero_attn")
# The separate projections, in the order their biases make up in_proj_bias.
_SEPARATE = ("q_proj", "k_proj", "v_proj")


def projection_shapes(attention: nn.MultiheadAttention) -> dict[str, tuple[int, int]]:
    """The slot linear layers that hold ``attention``'s input projection, child name ->
    (in_features, out_features): ``in_proj`` (E -> 3E) for one ``in_proj_weight``, else ``q_proj``,
    ``k_proj`` and ``v_proj`` (E, kdim, vdim -> E). Each replaces the parameter ``<name>_weight``;
    their biases, in this order, are ``in_proj_bias``."""
    e = attention.embed_dim
    if attention._qkv_same_embed_dim:
        return {"in_proj": (e, 3 * e)}
    return {"q_proj": (e, e), "k_proj": (attention.kdim, e), "v_proj": (attention.vdim, e)}


class SlotMultiheadAttention(nn.MultiheadAttention):
    """``attention``'s settings, ``out_proj``, ``bias_k`` and ``bias_v`` (the same objects), with slot
    linear layers as its input projection: ``in_proj`` (E -> 3E) when kdim == vdim == embed_dim,
    else ``q_proj``, ``k_proj`` and ``v_proj`` (see :func:`projection_shapes`).

    ``in_proj_weight``, ``in_proj_bias`` and ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``
    are read-only properties: the weights the slot layers compute with (None where the other form
    applies), so nn.MultiheadAttention's forward (fast path included) and
    nn.TransformerEncoderLayer's fast path compute with the selection, and in training the
    gradient reaches the scores. Like any read of a slot layer's ``weight``, they select greedily,
    also with ``selection="sample"``.
    """

    def __init__(self, attention: nn.MultiheadAttention, in_proj: SlotLayer | None = None, *,
                 q_proj: SlotLayer | None = None, k_proj: SlotLayer | None = None,
                 v_proj: SlotLayer | None = None) -> None:
        nn.Module.__init__(self)  # not MultiheadAttention's: it would allocate the weights to replace
        given = {name: layer for name, layer in zip(("in_proj", *_SEPARATE), (in_proj, q_proj, k_proj, v_proj))
                 if layer is not None}
        shapes = projection_shapes(attention)
        if list(given) != list(shapes):
            raise ValueError(f"an attention with embed_dim={attention.embed_dim}, kdim={attention.kdim}, "
                             f"vdim={attention.vdim} takes the projections {', '.join(shapes)}; got "
                             f"{', '.join(given) or 'none'}")
        bias = attention.in_proj_bias is not None
        for name, (n_in, n_out) in shapes.items():
            layer = given[name]
            if not (isinstance(layer, (SlotLinear, DenseSlotLinear)) and layer.weight_shape == (n_out, n_in)
                    and ("bias" in layer.parts) == bias):
                raise ValueError(f"{name} must be a slot linear layer {n_in} -> {n_out} with bias={bias}; "
                                 f"got {layer!r}")
        for name in _SETTINGS:
            setattr(self, name, getattr(attention, name))
        self.bias_k, self.bias_v = attention.bias_k, attention.bias_v
        for name, layer in given.items():
            setattr(self, name, layer)
        self.out_proj = attention.out_proj
        self.training = attention.training

    def _projections(self) -> list[SlotLayer]:
        """The slot layers of the input projection, in ``in_proj_bias``'s order."""
        return [self.in_proj] if self._qkv_same_embed_dim else [getattr(self, name) for name in _SEPARATE]

    @property
    def in_proj_weight(self) -> torch.Tensor | None:
        """Read-only: ``in_proj.weight``, the (3E, E) query, key and value projections stacked; None
        with separate projections."""
        return self.in_proj.weight if self._qkv_same_embed_dim else None

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """Read-only: the (3E,) bias of the query, key and value projections, or None without bias."""
        layers = self._projections()
        if "bias" not in layers[0].parts:
            return None
        return layers[0].bias if len(layers) == 1 else torch.cat([layer.bias for layer in layers])

    def _separate(self, name: str) -> torch.Tensor | None:
        return None if self._qkv_same_embed_dim else getattr(self, name).weight

    @property
    def q_proj_weight(self) -> torch.Tensor | None:
        """Read-only: ``q_proj.weight`` (E, E), or None with one ``in_proj_weight``."""
        return self._separate("q_proj")

    @property
    def k_proj_weight(self) -> torch.Tensor | None:
        """Read-only: ``k_proj.weight`` (E, kdim), or None with one ``in_proj_weight``."""
        return self._separate("k_proj")

    @property
    def v_proj_weight(self) -> torch.Tensor | None:
        """Read-only: ``v_proj.weight`` (E, vdim), or None with one ``in_proj_weight``."""
        return self._separate("v_proj")

    @torch.no_grad()
    def _plain(self) -> nn.MultiheadAttention:
        """The ordinary nn.MultiheadAttention this module computes in eval mode, on its device and in
        its dtype: the greedy selection as its projection weights and ``in_proj_bias``;
        ``out_proj``, ``bias_k`` and ``bias_v`` are this module's own objects."""
        layers = self._projections()
        weights = [layer.weight for layer in layers]  # in the layers' dtype, as the forward uses them
        bias = "bias" in layers[0].parts
        plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias=bias,
                                      add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
                                      kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first,
                                      device=weights[0].device, dtype=weights[0].dtype)
        names = ["in_proj"] if self._qkv_same_embed_dim else _SEPARATE
        for name, weight in zip(names, weights):
            getattr(plain, f"{name}_weight").copy_(weight)
        if bias:
            plain.in_proj_bias.copy_(self.in_proj_bias)
        plain.out_proj, plain.bias_k, plain.bias_v = self.out_proj, self.bias_k, self.bias_v
        plain.training = self.training
        return plain
