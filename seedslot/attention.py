"""nn.MultiheadAttention with a slot input projection: what ``slotify_`` makes of an attention
module whose query, key and value projections are one (3E, E) ``in_proj_weight``."""

from __future__ import annotations

import torch
from torch import nn

from .layers import DenseSlotLinear, SlotLayer, SlotLinear

__all__ = ["SlotMultiheadAttention"]

# What nn.MultiheadAttention.__init__ sets besides its parameters and out_proj: copied as they are.
_SETTINGS = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first", "head_dim",
             "add_zero_attn")


class SlotMultiheadAttention(nn.MultiheadAttention):
    """``attention``'s settings, ``out_proj``, ``bias_k`` and ``bias_v`` (the same objects), with the
    slot linear layer ``in_proj`` (E -> 3E) as its input projection.

    ``in_proj_weight`` and ``in_proj_bias`` are read-only properties: the weights ``in_proj``
    computes with, so nn.MultiheadAttention's forward (fast path included) and
    nn.TransformerEncoderLayer's fast path compute with the selection, and in training the
    gradient reaches ``in_proj``'s scores. Like any read of a slot layer's ``weight``, they select
    greedily, also with ``selection="sample"``. Only for ``kdim == vdim == embed_dim``: separate
    q/k/v projection weights are left to nn.MultiheadAttention.
    """

    def __init__(self, attention: nn.MultiheadAttention, in_proj: SlotLayer) -> None:
        nn.Module.__init__(self)  # not MultiheadAttention's: it would allocate an in_proj_weight to replace
        if not attention._qkv_same_embed_dim:
            raise ValueError("SlotMultiheadAttention needs kdim == vdim == embed_dim (one in_proj_weight); got "
                             f"embed_dim={attention.embed_dim}, kdim={attention.kdim}, vdim={attention.vdim}")
        e = attention.embed_dim
        bias = attention.in_proj_bias is not None
        if not (isinstance(in_proj, (SlotLinear, DenseSlotLinear)) and in_proj.weight_shape == (3 * e, e)
                and ("bias" in in_proj.parts) == bias):
            raise ValueError(f"in_proj must be a slot linear layer {e} -> {3 * e} with bias={bias}; got {in_proj!r}")
        for name in _SETTINGS:
            setattr(self, name, getattr(attention, name))
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            self.register_parameter(name, None)
        self.bias_k, self.bias_v = attention.bias_k, attention.bias_v
        self.in_proj = in_proj
        self.out_proj = attention.out_proj
        self.training = attention.training

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """Read-only: ``in_proj.weight``, the (3E, E) query, key and value projections stacked."""
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """Read-only: ``in_proj.bias`` (3E,), or None."""
        return self.in_proj.bias

    @torch.no_grad()
    def _plain(self, device=None) -> nn.MultiheadAttention:
        """The ordinary nn.MultiheadAttention this module computes in eval mode: the greedy selection
        as its ``in_proj_weight``/``in_proj_bias``; ``out_proj``, ``bias_k`` and ``bias_v`` are this
        module's own objects."""
        bias = "bias" in self.in_proj.parts
        plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias=bias,
                                      add_bias_kv=self.bias_k is not None, add_zero_attn=self.add_zero_attn,
                                      batch_first=self.batch_first, device=device)
        plain.in_proj_weight.copy_(self.in_proj.selected_weight())
        if bias:
            plain.in_proj_bias.copy_(self.in_proj.selected_bias())
        plain.out_proj, plain.bias_k, plain.bias_v = self.out_proj, self.bias_k, self.bias_v
        plain.training = self.training
        return plain
