"""Multi-process training with torch's DistributedDataParallel.

A seeded layer's only Parameter is its proxy, whose gradient is G, one fp32 value per connection:
that is all DDP all-reduces. Every rank then runs the same SlotSGD update on the same averaged G,
with stochastic-rounding noise keyed by (seed, step), so the int8 scores stay bit-identical on all
ranks without ever being sent. The dense reference's Parameters are its K scores per connection,
so DDP all-reduces K values per connection: the traffic compared by ``seedslot bench ddp``.

DDP is built with ``init_sync=False`` (a proxy is an expanded 0-dim tensor, which DDP's initial
broadcast cannot write into; every rank builds the same model from the seed instead, which
:func:`wrap` verifies) and ``broadcast_buffers=False`` (scores are buffers that every rank
computes identically; batch-norm running statistics stay per rank and rank 0's are saved, as the
paper uses no SyncBatchNorm). Training checks every epoch that the ranks still agree.

Each global batch is split over the ranks; an epoch's last batch may split unevenly, and each
rank's loss is then weighted so that DDP's average is still the mean over the whole batch. With
two ranks the result equals, bit for bit, one process that averages the two half-batch gradients
the same way (``bench/ddp_equivalence.py``). A plain single process sums the batch's gradient in
another fp32 order: scores first differ by a rounding level, then, once a selection flips, the two
runs drift apart like any two runs with different rounding.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..validate import check_int
from .devices import env_int

__all__ = ["DistributedError", "init_from_env", "rank_and_world", "wrap", "check_batch_size", "shard",
           "loss_weight", "sum_over_ranks", "check_in_sync", "Ranks", "collective_failure", "shutdown", "launch",
           "ByteCounter",
           "free_port"]

TIMEOUT_ENV = "SEEDSLOT_DIST_TIMEOUT"  # seconds a collective may wait for a missing rank
_DEFAULT_TIMEOUT_S = 120.0


class DistributedError(RuntimeError):
    """The ranks could not meet, lost one another, or no longer hold the same model."""


def _timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(_DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0; got {value!r}")
    return seconds


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment): gloo for
    CPU tensors, nccl for CUDA tensors. A rank that never arrives or dies makes the others fail after
    ``SEEDSLOT_DIST_TIMEOUT`` seconds (default 120) instead of hanging. Returns whether it joined."""
    if env_int("WORLD_SIZE", 1) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set: "
                             "start distributed runs with torchrun or `seedslot train --nproc N`")
    timeout = datetime.timedelta(seconds=_timeout_s())
    backend = "gloo"
    if torch.cuda.is_available():  # collectives pick the backend by the tensors' device
        backend = "cpu:gloo,cuda:nccl"
        local = env_int("LOCAL_RANK", 0)
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (RuntimeError, ValueError) as e:  # DistStoreError, DistNetworkError are RuntimeErrors
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise DistributedError(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: the ranks did not all "
                               f"meet at {where} within {TIMEOUT_ENV}={_timeout_s():g} s "
                               f"({type(e).__name__}: {_first_line(e)})") from e
    return True


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def collective_failure(e: BaseException) -> DistributedError | None:
    """``e`` as a one-line DistributedError when it is a failed collective (a rank died, or stalled
    past the timeout) in a process group, else None."""
    if isinstance(e, DistributedError):
        return e
    text = str(e)
    if not (dist.is_available() and dist.is_initialized()) and "WORLD_SIZE" not in os.environ:
        return None
    if not (isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
            w in text for w in ("gloo", "Gloo", "NCCL", "c10d", "Connection", "Timed out", "timed out")))):
        return None
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    return DistributedError(f"rank {rank} of {world}: lost contact with another rank (it died, or stalled for "
                            f"more than {TIMEOUT_ENV}={_timeout_s():g} s): {_first_line(e)[:300]}")


def shutdown() -> None:
    """Leave the process group: wait for every rank, then destroy the group. Gloo work still alive
    at interpreter exit can abort the process (SIGABRT), so callers drop their DDP wrappers first
    and all of it goes while Python is fully alive."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _fingerprint(model: nn.Module, skip: frozenset[str] = frozenset()) -> str:
    """A hash of every state entry's name and value but ``skip``: tensors by their bytes, extra
    state (a slot layer's seeds, K, sharing, lambda) by its JSON. Equal on every rank iff the models
    are; implicit scores start at zero drift whatever the seed, so the extra state is needed too."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name in skip:
            continue
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(t, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def wrap(model: nn.Module, device: torch.device | None = None) -> DistributedDataParallel:
    """``model`` in DDP as described in the module docstring; ValueError when the ranks built
    different models (another seed, K or architecture), which DDP would otherwise train apart."""
    prints = [None] * dist.get_world_size()
    dist.all_gather_object(prints, _fingerprint(model))
    if len(set(prints)) != 1:
        raise ValueError("the ranks built different models (seed, k or model differ between ranks)")
    ids = [device.index] if device is not None and device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, init_sync=False, **no_buffer_sync)


def _batch_norm_statistics(model: nn.Module) -> frozenset[str]:
    return frozenset(f"{m}.{b}" if m else b for m, mod in model.named_modules()
                     if isinstance(mod, nn.modules.batchnorm._NormBase) for b, _ in mod.named_buffers(recurse=False))


def check_in_sync(model: nn.Module) -> None:
    """DistributedError unless every rank holds the same scores, weights and optimiser-visible state
    (batch-norm running statistics excepted: each rank keeps its own, from its own shards)."""
    rank, world = rank_and_world()
    if world == 1:
        return
    prints = [None] * world
    dist.all_gather_object(prints, _fingerprint(model, _batch_norm_statistics(model)))
    apart = [r for r, p in enumerate(prints) if p != prints[0]]
    if apart:
        raise DistributedError(f"ranks {apart} hold different scores or weights from rank 0 "
                               "(the same update should have kept them bit-identical)")


def check_batch_size(batch_size: int, world: int) -> None:
    """ValueError unless ``world`` ranks can split a batch of ``batch_size`` evenly."""
    if batch_size % world:
        raise ValueError(f"the world size {world} does not divide batch_size {batch_size}: "
                         "choose --batch-size divisible by --nproc")


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of a global batch (every rank sees the whole batch's indices): equal
    shares, or shares one apart when the batch (an epoch's last) does not split evenly."""
    if batch.shape[0] < world:
        raise ValueError(f"a batch of {batch.shape[0]} examples cannot give each of {world} ranks one")
    return batch.tensor_split(world)[rank]


def loss_weight(n: int, rank: int, world: int) -> float:
    """The factor on this rank's mean loss over its :func:`shard` of a global batch of ``n`` that
    makes DDP's average over the ranks the mean over the whole batch: 1.0 for equal shares."""
    return (n // world + (rank < n % world)) * world / n


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Each of ``values`` summed over the ranks (fp64: exact for counts)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class Ranks:
    """The processes one training run spans, as its loop sees them: rank ``rank`` of ``world``.
    A single process is a world of one, for which every method is a no-op or an identity, so the
    loop never asks how many processes there are."""

    def __init__(self, rank: int = 0, world: int = 1, joined: bool = False) -> None:
        self.rank, self.world, self.joined = rank, world, joined

    @classmethod
    def join(cls) -> "Ranks":
        """The ranks of the process group torchrun describes (joined here, see
        :func:`init_from_env`), or a world of one."""
        joined = init_from_env()
        return cls(*rank_and_world(), joined)

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that prints and writes."""
        return self.rank == 0

    def say(self, *parts) -> None:
        """``print`` (flushed) on rank 0 only."""
        if self.main:
            print(*parts, flush=True)

    def check_batch_size(self, batch_size: int) -> None:
        """ValueError unless every global batch splits evenly over the ranks."""
        check_batch_size(batch_size, self.world)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the loop calls: ``model`` itself, or ``model`` in DDP (:func:`wrap`)."""
        if self.world == 1:
            return model
        return wrap(model, device if device.type == "cuda" else None)

    def whole_batches(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """``batches`` without a last batch too small to give every rank one example."""
        return batches[:-1] if batches and len(batches[-1]) < self.world else batches

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's share of a global batch ``(x, y)``, and the weight of its mean loss
        (:func:`loss_weight`): ``(x, y, 1.0)`` in a world of one."""
        if self.world == 1:
            return x, y, 1.0
        weight = loss_weight(len(y), self.rank, self.world)
        return shard(x, self.rank, self.world), shard(y, self.rank, self.world), weight

    def sum(self, values: Sequence[float]) -> list:
        """Each of ``values`` summed over the ranks (:func:`sum_over_ranks`); in a world of one,
        the values as they are."""
        return list(values) if self.world == 1 else sum_over_ranks(values)

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable object) on every rank; ``value`` itself in a world of one."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_in_sync(self, model: nn.Module) -> None:
        """DistributedError unless every rank holds the same model (:func:`check_in_sync`)."""
        if self.world > 1:
            check_in_sync(model)

    def close(self) -> None:
        """Leave the process group this object joined (:func:`shutdown`); drop DDP wrappers first."""
        if self.joined:
            shutdown()


def free_port() -> int:
    """A TCP port on the loopback interface that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m seedslot *argv`` on ``nproc`` local processes through torchrun (which
    stops every rank when one fails); returns the exit status."""
    check_int("nproc", nproc, 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "seedslot", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # Ctrl-C: torchrun (which sets its own handler) sends it once to every rank (each in a session
    # of its own, out of the terminal's reach); they agree on a step, rank 0 saves, all exit. This
    # wait only notes it rather than killing torchrun, which would orphan the ranks.
    interrupted = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1)) if main_thread else None
    try:
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
        errors = _relay_stderr(proc.stderr)
        status = proc.wait()
        if interrupted and status:
            return 130
        return 2 if errors and status else status
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _relay_stderr(stream) -> int:
    """Copy the ranks' and torchrun's stderr to ours, except that an error line several ranks print
    (``seedslot...: error: ...``) is shown once, and once a rank has said what went wrong, torchrun's
    own report of the failed child (a long traceback) is left out. Returns the error lines seen."""
    seen: set[str] = set()
    skipping = False
    for line in stream:
        text = line.rstrip("\n")
        if text.startswith("seedslot") and ": error: " in text:
            if text not in seen:
                seen.add(text)
                sys.stderr.write(line)
                sys.stderr.flush()
            continue
        if seen and (skipping or text.startswith(("Traceback (most recent call last)", "[W", "="))
                     or re.match(r"[IWE]\d{4} ", text) or "torch.distributed" in text or "ChildFailedError" in text):
            skipping = True  # the rest is torchrun's report of the failure already said
            continue
        sys.stderr.write(line)
        sys.stderr.flush()
    return len(seen)


class ByteCounter:
    """DDP communication hook state: counts the bytes each all-reduce sends, then all-reduces."""

    def __init__(self) -> None:
        self.bytes = 0

    @staticmethod
    def hook(state, bucket):  # no annotations: DDP checks them as objects, not strings
        buf = bucket.buffer()
        state.bytes += buf.numel() * buf.element_size()
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(None, bucket)
