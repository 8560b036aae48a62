"""``seedslot bench ddp``: bytes all-reduced per step and step time of the dense reference and
seeded slots under DistributedDataParallel, side by side (local processes, gloo over loopback).
A seeded layer all-reduces one gradient value per connection, the dense reference K: the
seeded/dense ratio of bytes is 1/K. Registered by :mod:`seedslot.benchmarks`."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import ByteCounter, free_port, init_from_env, shutdown, wrap
from ..files import atomic_write
from ..models import build
from ..optim import SlotSGD

__all__ = ["add_arguments", "run_cli"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``seedslot bench ddp``."""
    p.add_argument("--model", default="lenet", help="model name (default lenet)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2, help="processes (gloo, loopback)")
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init_from_env()
    result = {}
    for mode in ("dense", "seeded"):
        model = build(args["model"], mode=mode, k=args["k"])
        ddp = wrap(model)
        counter = ByteCounter()
        ddp.register_comm_hook(counter, ByteCounter.hook)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (SlotSGD if mode == "seeded" else torch.optim.SGD)(params, lr=0.1, momentum=0.9)
        a = model.build_args
        g = torch.Generator().manual_seed(rank)
        n = args["batch_size"] // world
        x = torch.randn(n, a["in_channels"], a["input_size"], a["input_size"], generator=g)
        y = torch.randint(0, a["num_classes"], (n,), generator=g)
        times = []
        for i in range(args["steps"] + 1):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t)
        per_step = counter.bytes // (args["steps"] + 1)
        buffer, comm = torch.zeros(per_step // 4), []  # the same bytes, all-reduced alone
        for i in range(args["steps"] + 1):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buffer)
            if i:
                comm.append(time.perf_counter() - t)
        result[mode] = dict(bytes_per_step=per_step, step_seconds=statistics.median(times),
                            allreduce_seconds=statistics.median(comm))
        del ddp, model, opt
    if rank == 0:
        atomic_write(out, json.dumps(result))
    shutdown()


def run_cli(args: argparse.Namespace) -> int:
    """Bytes all-reduced per step and step time of dense and seeded under DDP, side by side, and
    the time of an all-reduce of those bytes alone (the part of a step that traffic costs)."""
    import torch.multiprocessing as mp

    if args.nproc < 2:
        raise ValueError(f"nproc must be an int >= 2 for the ddp bench; got {args.nproc}")
    if args.batch_size % args.nproc:
        raise ValueError(f"the world size {args.nproc} does not divide --batch-size {args.batch_size}")
    spec = dict(model=args.model, k=args.k, batch_size=args.batch_size, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(args.nproc, free_port(), spec, out), nprocs=args.nproc)
        with open(out) as f:
            rows = json.load(f)
    result = dict(bench="ddp", **spec, nproc=args.nproc, backend="gloo",
                  bytes_per_step={m: r["bytes_per_step"] for m, r in rows.items()},
                  step_seconds={m: r["step_seconds"] for m, r in rows.items()},
                  allreduce_seconds={m: r["allreduce_seconds"] for m, r in rows.items()})
    result["ratio_seeded_over_dense_bytes"] = result["bytes_per_step"]["seeded"] / result["bytes_per_step"]["dense"]
    print(f"ddp: {args.model}, K={args.k}, {args.nproc} processes (gloo), global batch {args.batch_size}")
    print(f"{'mode':>7} {'bytes/step':>14} {'s/step':>8} {'s/all-reduce':>13}")
    for m in ("dense", "seeded"):
        print(f"{m:>7} {result['bytes_per_step'][m]:>14,} {result['step_seconds'][m]:>8.4f} "
              f"{result['allreduce_seconds'][m]:>13.4f}")
    print(f"seeded/dense bytes: {result['ratio_seeded_over_dense_bytes']:.4f} (1/K = {1 / args.k:.4f})")
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2) + "\n")
    return 0
