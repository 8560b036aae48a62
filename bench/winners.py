"""Which candidates win? For trained slot-machine checkpoints: per layer, the magnitude of the
selected candidates against all candidates, and the selected candidate's rank by magnitude
among its connection's K.

    python bench/winners.py CKPT [CKPT ...] --out docs/mnist/winners.png [--json PATH]

Candidates are U(-sigma, sigma), so |candidate| / sigma is uniform on [0, 1) (mean 0.5) and, if
selection ignored magnitude, the selected rank would be uniform on 1..K.
"""

from __future__ import annotations

import argparse
import json

import torch

from seedslot.checkpoints import load_checkpoint, load_state_into
from seedslot.files import atomic_write
from seedslot.layers import SlotLayer
from seedslot.models import build


@torch.no_grad()
def winners(path: str) -> dict:
    payload = load_checkpoint(path)
    model = build(**payload["build_args"])
    load_state_into(model, payload["model"])
    k = payload["build_args"]["k"]
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, SlotLayer):
            continue
        cand = m.candidates("weight").reshape(-1, m.k) / m.sigma  # (n, K) in [-1, 1)
        idx = m.selected_index("weight").reshape(-1)  # (n,)
        sel = cand.gather(1, idx[:, None]).squeeze(1)
        mag = cand.abs()
        # rank 1 = the largest |candidate| of the connection
        rank = 1 + (mag > mag.gather(1, idx[:, None])).sum(1)
        layers.append(dict(
            name=name, connections=idx.numel(),
            mean_abs_candidate=float(mag.mean()), mean_abs_selected=float(sel.abs().mean()),
            share_top_rank=float((rank == 1).float().mean()), share_bottom_rank=float((rank == k).float().mean()),
            rank_hist=torch.bincount(rank - 1, minlength=k).tolist(),
            abs_selected_hist=torch.histc(sel.abs(), 20, 0, 1).tolist(),
            abs_candidate_hist=torch.histc(mag, 20, 0, 1).tolist(),
        ))
    return dict(checkpoint=path, k=k, config=payload.get("config"), layers=layers)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = max(len(r["layers"]) for r in results)
    fig, axes = plt.subplots(2 * len(results), n_layers, figsize=(4 * n_layers, 5.2 * len(results)), squeeze=False)
    for i, r in enumerate(results):
        for j, layer in enumerate(r["layers"]):
            ax = axes[2 * i][j]
            edges = [b / 20 for b in range(21)]
            for key, label, style in (("abs_candidate_hist", "all candidates", "--"),
                                      ("abs_selected_hist", "selected", "-")):
                h = torch.tensor(layer[key])
                ax.stairs((h / h.sum() * 20).tolist(), edges, ls=style, label=label)
            ax.set_title(f"K={r['k']} {layer['name']}: |w| / sigma", fontsize=9)
            ax.set_xlabel("|w| / sigma")
            ax.set_ylabel("density")
            ax.legend(fontsize=8)
            ax = axes[2 * i + 1][j]
            h = torch.tensor(layer["rank_hist"], dtype=torch.float64)
            ax.bar(range(1, r["k"] + 1), (h / h.sum()).tolist(), width=0.8)
            ax.axhline(1 / r["k"], color="k", ls="--", lw=1, label="uniform (magnitude ignored)")
            ax.set_title(f"K={r['k']} {layer['name']}: rank of the selected |w| (1 = largest)", fontsize=9)
            ax.set_xlabel("rank among the connection's K candidates")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--json")
    args = p.parse_args(argv)
    results = [winners(c) for c in args.checkpoints]
    for r in results:
        for layer in r["layers"]:
            print(f"K={r['k']:>3} {layer['name']:<6} mean |selected|/sigma {layer['mean_abs_selected']:.3f} "
                  f"(all candidates {layer['mean_abs_candidate']:.3f}); largest-|w| candidate selected "
                  f"{layer['share_top_rank']:.1%}, smallest {layer['share_bottom_rank']:.1%} (uniform {1 / r['k']:.1%})")
    plot(results, args.out)
    if args.json:
        atomic_write(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
