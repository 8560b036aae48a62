"""The CPU speed table of docs/PERFORMANCE.md, from `seedslot bench speed --json` files.

    python bench/speed_table.py docs/perf

Reads every ``*.json`` speed result in the folder (ordered by model size, then K) and prints one
Markdown row per file: step times, ratios to weight training, the int8 floor and the first steps.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

ORDER = ("lenet", "conv2", "conv4", "conv6", "vgg19")


def row(result: dict) -> str:
    med = {"int8" if r["mode"] == "seeded" else r["mode"]: r for r in result["rows"]}  # "seeded": older files
    learned = med["learned"]["step_seconds"] if "learned" in med else None

    def ratio(mode: str) -> str:
        return f"{med[mode]['step_seconds'] / learned:.3f}" if mode in med and learned else "-"

    step = lambda mode: f"{med[mode]['step_seconds']:.4f}" if mode in med else "-"  # noqa: E731
    first = ", ".join(f"{m} {med[m]['first_step_seconds']:.1f}" for m in ("int8", "implicit", "incremental")
                      if m in med and "first_step_seconds" in med[m])
    floor = f"{result['int8_floor_seconds']:.4f}" if "int8_floor_seconds" in result else "-"
    return (f"| {result['model']} | {result['k']} | {step('learned')} | {step('int8')} | {ratio('int8')} | "
            f"{floor} | {ratio('implicit')} | {ratio('incremental')} | {first} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    args = p.parse_args(argv)
    results = [json.load(open(f)) for f in glob.glob(os.path.join(args.folder, "*.json"))]
    results = sorted((r for r in results if r.get("bench") == "speed"),
                     key=lambda r: (ORDER.index(r["model"]) if r["model"] in ORDER else len(ORDER), r["k"]))
    print("| model | K | learned s/step | int8 s/step | int8 / learned | int8 floor s (learned + 1.2 x "
          "regeneration) | implicit / learned | implicit, incremental / learned | first step s (compiles) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(row(r))


if __name__ == "__main__":
    main()
