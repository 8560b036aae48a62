"""Which device a command runs on: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import os
import re

import torch

__all__ = ["DEVICE_HELP", "resolve_device", "env_int"]

DEVICE_HELP = "auto (CUDA when available, the default), cpu, cuda or cuda:N"


def env_int(name: str, default: int) -> int:
    """The environment variable ``name`` (torchrun's ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) as an
    int >= 0, ``default`` when unset; ValueError naming the variable otherwise."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"environment variable {name} must be an int >= 0; got {text!r:.80}")
    return value


def resolve_device(name: str | None = "auto") -> torch.device:
    """The torch.device ``name`` stands for; ValueError naming ``device`` when it is unknown or absent.

    Under torchrun with several processes, ``cuda`` (or ``auto`` on a GPU machine) means the GPU
    of this process's ``LOCAL_RANK``: one process per GPU.
    """
    name = "auto" if name is None else name
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available here (torch.cuda.is_available() is "
                         "False); use auto or cpu")
    if name in ("auto", "cuda"):
        index = env_int("LOCAL_RANK", 0) if env_int("WORLD_SIZE", 1) > 1 else 0
    else:
        index = int(name.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)
