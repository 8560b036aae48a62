"""Size of a compact export (seeds + ceil(log2 K)-bit indices) next to fp32 weights, every model.

    python bench/export_sizes.py

Prints a Markdown table: bytes of each model's ordinary fp32 state_dict and of its export at
K = 2, 8, 64 (ratio in brackets). Models take the paper's input shapes (Lenet 1x28x28, the
conv models and VGG-19 3x32x32); selections are the initial ones, which does not change the size.
"""

import torch

from seedslot.export import size_report
from seedslot.models import MODELS, build

KS = (2, 8, 64)


def main() -> None:
    torch.set_num_threads(1)
    print("| model | fp32 state_dict bytes | " + " | ".join(f"K = {k}" for k in KS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in KS) + " |")
    for name in MODELS:
        cells, fp32 = [], 0
        for k in KS:
            r = size_report(build(name, mode="seeded", k=k))
            fp32 = r["fp32_bytes"]
            cells.append(f"{r['export_bytes']:,} ({r['export_bytes'] / fp32:.3f})")
        print(f"| {name} | {fp32:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
