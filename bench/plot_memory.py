"""Peak memory against K for dense, int8, implicit and learned weights, from `seedslot bench`
JSON files (a budget run and, for learned weights, a memory run).

    python bench/plot_memory.py docs/gpu/budget.json --learned docs/gpu/learned.json --out docs/memory_vs_k.png

CUDA runs plot ``torch.cuda.max_memory_reserved``; CPU runs the process's peak resident set.
"""

from __future__ import annotations

import argparse
import json

LABELS = {"dense": "dense reference (paper)", "int8": "seedslot int8", "implicit": "seedslot implicit"}


def _load(path: str) -> dict:
    with open(path) as f:
        result = json.load(f)
    return dict(result["budget"], device_name=result["device_name"]) if result.get("bench") == "gpu" else result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("budget", help="JSON of `seedslot bench budget` (or `bench gpu --parts budget`)")
    p.add_argument("--learned", help="JSON of `seedslot bench memory --modes learned` at the same batch size")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = _load(args.budget)
    cuda = budget["device"].startswith("cuda")
    peak = (lambda t: t["cuda_max_reserved_bytes"]) if cuda else (lambda t: t["peak_rss_bytes"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j, mode in enumerate(("dense", "int8", "implicit")):
        # "seeded": int8's name in files of older runs
        trials = [t for t in budget["trials"] if t["mode"] == mode or (mode, t["mode"]) == ("int8", "seeded")]
        fits = [t for t in trials if t["fits"]]
        ax.plot([t["k"] for t in fits], [peak(t) / 2**30 for t in fits], "o-", color=f"C{j}", label=LABELS[mode])
        over = [t for t in trials if not t["fits"]]
        if over:
            ax.plot([t["k"] for t in over], [budget["budget_bytes"] / 2**30] * len(over), "x", color=f"C{j}",
                    markersize=10, label=f"{LABELS[mode]}: over the budget")
    if args.learned:
        with open(args.learned) as f:
            learned = json.load(f)
        row = next(r for r in learned["rows"] if r["mode"] == "learned")
        value = row["cuda_max_reserved_bytes"] if cuda else row["peak_rss_bytes"]
        ax.axhline(value / 2**30, color="C3", ls="--", label="ordinary weight training (no K)")
    ax.axhline(budget["budget_bytes"] / 2**30, color="k", lw=0.8, ls=":", label="budget")
    ax.set_xscale("log", base=2)
    ks = budget["ks"]
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (candidates per connection)")
    ax.set_ylabel(("peak CUDA memory reserved" if cuda else "peak resident memory") + " (GiB)")
    where = f"{budget.get('device_name', budget['device'])}" if cuda else "CPU"
    ax.set_title(f"{budget['model']} training step, batch {budget['batch_size']}, {where}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
