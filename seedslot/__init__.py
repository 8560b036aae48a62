"""seedslot: Slot Machine networks whose candidate weights are regenerated from seeds, with int8 scores."""

from . import memory
from .config import SlotConfig
from . import export  # the module, callable: seedslot.export(model, path) writes an export
from .export import CheckpointError, load_exported
from .convert import ConversionReport, ordinary_parameters, slot_parameters, slotify_, to_dense
from .layers import (DenseSlotConv1d, DenseSlotConv2d, DenseSlotConv3d, DenseSlotConvTranspose1d,
                     DenseSlotConvTranspose2d, DenseSlotConvTranspose3d, DenseSlotEmbedding, DenseSlotLinear,
                     SlotConv1d, SlotConv2d, SlotConv3d, SlotConvTranspose1d, SlotConvTranspose2d, SlotConvTranspose3d,
                     SlotEmbedding, SlotLinear)
from .attention import SlotMultiheadAttention
from .optim import SlotSGD

__all__ = [
    "SlotConfig",
    "SlotLinear",
    "SlotConv2d",
    "DenseSlotLinear",
    "DenseSlotConv2d",
    "SlotSGD",
    "slotify_",
    "to_dense",
    "memory",
    "CheckpointError",
    "load_exported",
    "export",
    "SlotConv1d",
    "SlotConv3d",
    "DenseSlotConv1d",
    "DenseSlotConv3d",
    "SlotEmbedding",
    "DenseSlotEmbedding",
    "ConversionReport",
    "slot_parameters",
    "ordinary_parameters",
    "SlotConvTranspose1d",
    "SlotConvTranspose2d",
    "SlotConvTranspose3d",
    "DenseSlotConvTranspose1d",
    "DenseSlotConvTranspose2d",
    "DenseSlotConvTranspose3d",
    "SlotMultiheadAttention",
]
__version__ = "0.1.0"
