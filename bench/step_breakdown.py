"""Where an incremental implicit step's time goes, by ablation: the same training step with parts
of it skipped, interleaved with weight training in one process.

    OMP_NUM_THREADS=1 python bench/step_breakdown.py [--model lenet] [--k 8] [--repeats 15]

Variants: "learned" (weight training), "incremental" (SlotConfig(scores="implicit",
incremental=True)), "no selection" (after one real step, every forward reuses that step's cached
selection: no staleness check, no re-selection) and "no selection, no check" (also without
SlotSGD's pre-step check of gradients and momentum). The skipped parts are measured in situ, where a
step's other work has evicted their data from the caches; the ablated variants train wrongly and
exist only to be timed (they patch two private methods, restored on exit). Prints the median step
of each and its ratio to the learned step.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from seedslot import optim, storages
from seedslot.app.benchmarks import Trainer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=20, help="steps per repeat")
    args = p.parse_args(argv)
    greedy, check = storages.IncrementalImplicitScores.greedy, optim.SlotSGD._check_updates

    def cached(self, layer, part):  # the selection as cached, unchecked
        return getattr(layer, f"{part}_sel"), getattr(layer, f"{part}_val")

    variants = {"learned": ("learned", greedy, check), "incremental": ("incremental", greedy, check),
                "no selection": ("incremental", cached, check),
                "no selection, no check": ("incremental", cached, lambda self, entries: None)}
    trainers = {name: Trainer(args.model, mode, args.k, args.batch_size, "cpu") for name, (mode, _, _) in variants.items()}
    for trainer in trainers.values():
        trainer.step()  # a real selection fills the caches the ablated variants reuse
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for r in range(args.repeats + 1):  # the first round warms up (compiles) and is dropped
            for name, (_, g, c) in variants.items():
                storages.IncrementalImplicitScores.greedy, optim.SlotSGD._check_updates = g, c
                step = statistics.median(trainers[name].step() for _ in range(args.steps))
                if r:
                    times[name].append(step)
    finally:
        storages.IncrementalImplicitScores.greedy, optim.SlotSGD._check_updates = greedy, check
    base = statistics.median(times["learned"])
    print(f"{args.model}, K={args.k}, batch {args.batch_size}, cpu, 1 thread, median of {args.repeats} x {args.steps} steps")
    for name, t in times.items():
        print(f"{name:>24}  {statistics.median(t) * 1e3:7.3f} ms  {statistics.median(t) / base:6.3f} x learned")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
