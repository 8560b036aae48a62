"""Two-process training equals one process, on Fashion-MNIST.

    SEEDSLOT_COMPILE=0 python bench/ddp_equivalence.py --limit-train 2048 --epochs 2

Trains Lenet-300-100 three ways on the same global batches and compares the final models:
``seedslot train --nproc 2`` (gloo; every epoch it checks that both ranks hold identical state),
one process that averages the two half-batch gradients as DDP does (expected bit-identical), and a
plain single-process ``seedslot train`` (expected equal up to fp32 summation order, which stochastic
rounding can turn into one-level score differences). Prints one JSON object.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

from seedslot import SlotSGD
from seedslot.checkpoints import load_checkpoint
from seedslot.app.distributed import loss_weight, shard
from seedslot.app.train import CHECKPOINT, TrainConfig, epoch_batches, flip_generator, make_model, resolve
from seedslot.app import data as _data


def _cli(args: argparse.Namespace, out: str, nproc: int) -> None:
    cmd = [sys.executable, "-m", "seedslot", "train", "--model", "lenet", "--dataset", "fashion-mnist",
           "--limit-train", str(args.limit_train), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--k", str(args.k), "--threads", "1", "--no-progress", "--out", out]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    subprocess.run(cmd + (["--nproc", str(nproc)] if nproc > 1 else []), check=True, stdout=subprocess.DEVNULL)


def _halves(args: argparse.Namespace, world: int) -> dict:
    """train.run's loop for Lenet (no dropout) with DDP's gradient: sum over ranks of mean / world."""
    torch.set_num_threads(1)
    cfg = resolve(TrainConfig(model="lenet", dataset="fashion-mnist", data_dir=args.data_dir, k=args.k,
                              epochs=args.epochs, batch_size=args.batch_size, limit_train=args.limit_train))
    data = _data.load(cfg.dataset, cfg.data_dir, seed=cfg.seed, normalize=cfg.normalize, limit_train=cfg.limit_train)
    model = make_model(cfg, data, None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SlotSGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.lr_milestones, cfg.lr_gamma)
    for epoch in range(cfg.epochs):
        model.train()
        batches = epoch_batches(len(data.train), cfg.batch_size, cfg.seed, epoch)
        if len(batches[-1]) < world:
            batches = batches[:-1]
        for step, idx in enumerate(batches):
            x = data.preprocess(data.train.images[idx], flip_generator(cfg.seed, epoch, step))
            y = data.train.labels[idx]
            total = None
            for r in range(world):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(shard(x, r, world)), shard(y, r, world))
                (loss * loss_weight(len(y), r, world)).backward()
                g = [p.grad / world for p in params]
                total = g if total is None else [a + b for a, b in zip(total, g)]
            for p, g in zip(params, total):
                p.grad = g
            opt.step()
        sched.step()
    return model.state_dict()


def _compare(a: dict, b: dict) -> dict:
    scores = [n for n in a if n.endswith("_scores")]
    diff = torch.cat([(a[n].int() - b[n].int()).abs().flatten() for n in scores])
    same = all(torch.equal(a[n], b[n]) for n in a if isinstance(a[n], torch.Tensor))
    return dict(identical=same, scores=diff.numel(),
                scores_differing=int((diff > 0).sum()), max_level_difference=int(diff.max()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit-train", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--data-dir")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, nproc in (("ddp", 2), ("one", 1)):
            _cli(args, os.path.join(tmp, name), nproc)
            runs[name] = load_checkpoint(os.path.join(tmp, name, CHECKPOINT))
        summaries = {n: json.load(open(os.path.join(tmp, n, "summary.json"))) for n in runs}
    halves = _halves(args, 2)
    ddp = runs["ddp"]["model"]
    print(json.dumps(dict(
        args=vars(args), global_steps=runs["ddp"]["global_step"],
        ddp_vs_one_process_averaging_halves=_compare(ddp, halves),
        ddp_vs_plain_one_process=_compare(ddp, runs["one"]["model"]),
        test_accuracy={n: s["test_accuracy"] for n, s in summaries.items()},
        train_seconds={n: round(s["train_seconds"], 2) for n, s in summaries.items()},
    ), indent=2))


if __name__ == "__main__":
    main()
