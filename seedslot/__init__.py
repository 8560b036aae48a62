"""seedslot: Slot Machine networks whose candidate weights are regenerated from seeds, with int8 scores."""

from . import memory
from .config import SlotConfig
from .export import CheckpointError, load_exported
from .convert import slotify_, to_dense
from .layers import DenseSlotConv2d, DenseSlotLinear, SlotConv2d, SlotLinear
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
]
__version__ = "0.1.0"
