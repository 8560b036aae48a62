"""torch.profiler around a few training steps of each mode, as `seedslot bench speed` builds them.

    python bench/profile_step.py [--model vgg19] [--k 8] [--batch-size 128] [--device cuda] [--steps 5]

Prints, per mode, the profiler's table (by host time) and the counts of kernel launches, copies and
host synchronisations: what the README's GPU profile quotes (`docs/gpu/profile.txt`).
"""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from seedslot.app.benchmarks import Trainer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg19")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default="seeded,implicit,learned")
    args = p.parse_args(argv)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    for mode in args.modes.split(","):
        trainer = Trainer(args.model, mode, args.k, args.batch_size, args.device)
        for _ in range(3):  # compile and warm up
            trainer.step()
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                trainer.step()
        print(f"==== {mode}: {args.steps} steps")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))
        counts = {e.key: e.count for e in prof.key_averages()}
        print("syncs:", {k: v for k, v in counts.items()
                         if any(s in k for s in ("Synchronize", "Memcpy", "item", "_local_scalar"))})


if __name__ == "__main__":
    main()
