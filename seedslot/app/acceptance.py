"""``seedslot bench gpu``: the GPU acceptance run, one command and one table.

On a CUDA machine it checks that what the GPU computes is what the CPU computes (candidates,
initial scores and greedy selections of every layer of VGG-19, all three sharing modes, every
score storage; one int8 and one implicit update step), then measures: the regeneration rate of the
CUDA kernels, VGG-19 step time and ``torch.cuda.max_memory_allocated`` per mode, the largest K
under a CUDA memory budget, and a short ``seedslot train`` on the GPU. It exits non-zero when an
identity fails. The identities run on any pair of devices, so the test suite runs them on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Sequence

import torch

from .benchmarks import budget_bench, median_seconds, memory_bench, speed_bench
from .compiling import COMPILE
from ..candidates import SHARING
from .devices import resolve_device
from ..files import atomic_write
from ..layers import SeededSlotLayer
from ..optim import SlotSGD
from ..storages import SCORES

__all__ = ["PARTS", "identities", "update_identities", "regeneration_rate", "gpu_acceptance", "report", "merge",
           "add_arguments", "run_cli"]

def _build_on(device, model: str, k: int, sharing: str, scores: str, seed: int = 0):
    """A seeded model whose buffers are computed on ``device`` (not computed on the CPU and moved)."""
    from ..models import build

    with torch.device(device):
        return build(model, mode="seeded", k=k, sharing=sharing, scores=scores, seed=seed).to(device)


def _layers(model) -> list[tuple[str, SeededSlotLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SeededSlotLayer)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


@torch.no_grad()
def identities(device, model: str = "vgg19", k: int = 8, sharings: Sequence[str] = SHARING,
               storages: Sequence[str] = SCORES, reference="cpu") -> list[dict[str, Any]]:
    """For each sharing mode and score storage: whether every layer's candidates, stored initial
    state (int8 levels, fp32 scores, implicit drift and its scores) and greedy selection computed
    on ``device`` equal those computed on ``reference``, bit for bit."""
    rows = []
    for sharing in sharings:
        for scores in storages:
            here, there = _build_on(device, model, k, sharing, scores), _build_on(reference, model, k, sharing, scores)
            checks = {"candidates": True, "initial scores": True, "greedy selection": True}
            for (_, a), (_, b) in zip(_layers(here), _layers(there)):
                for part in a.parts:
                    checks["candidates"] &= _same(a.candidates(part), b.candidates(part))
                    checks["initial scores"] &= _same(a.score_values(part), b.score_values(part))
                    checks["greedy selection"] &= _same(a.selected_index(part), b.selected_index(part))
            for what, ok in checks.items():
                rows.append(dict(check=what, sharing=sharing, scores=scores, equal=ok))
    return rows


def update_identities(device, model: str = "vgg19", k: int = 8, reference="cpu") -> list[dict[str, Any]]:
    """One SlotSGD step (momentum 0.9) on ``device`` and on ``reference`` from the same
    effective-weight gradients: int8 levels must be equal bit for bit; implicit drifts may
    differ by fp32 rounding of ``A + lr * d`` (a fused multiply-add on one device, not on the
    other), so they are compared within 1 ulp and their greedy selections must be equal."""
    rows = []
    for scores in ("int8", "implicit"):
        nets = [_build_on(d, model, k, "none", scores) for d in (device, reference)]
        g = torch.Generator().manual_seed(0)
        grads = {}
        for name, layer in _layers(nets[1]):
            for part in layer.parts:
                grads[name, part] = torch.randn(layer.parts[part][0], generator=g) * 1e-2
        for net in nets:
            for name, layer in _layers(net):
                for part in layer.parts:
                    proxy = getattr(layer, f"slot_{part}")
                    proxy.grad = grads[name, part].to(proxy.device)
            SlotSGD(net.parameters(), lr=0.1, momentum=0.9).step()
        state_equal, selection_equal, max_ulps = True, True, 0.0
        for (_, a), (_, b) in zip(_layers(nets[0]), _layers(nets[1])):
            for part in a.parts:
                sa, sb = (getattr(x, f"{part}_{'drift' if scores == 'implicit' else 'scores'}").cpu() for x in (a, b))
                if scores == "int8":
                    state_equal &= torch.equal(sa, sb)
                else:
                    ulp = torch.finfo(torch.float32).eps * sb.abs().clamp_min(torch.finfo(torch.float32).tiny)
                    max_ulps = max(max_ulps, float(((sa - sb).abs() / ulp).max()))
                selection_equal &= torch.equal(a.selected_index(part).cpu(), b.selected_index(part).cpu())
        if scores == "implicit":
            state_equal = max_ulps <= 1.0
        rows.append(dict(check=f"{scores} update step", sharing="none", scores=scores,
                         equal=state_equal and selection_equal, state_equal=state_equal,
                         selection_equal=selection_equal, max_ulps=max_ulps if scores == "implicit" else 0.0))
    return rows


def regeneration_rate(device, connections: int = 1 << 24, k: int = 8, repeats: int = 5) -> float:
    """Candidate values per second: every candidate of ``connections`` connections, one call."""
    from ..candidates import Stream, grid_step, i32, stream_keys

    key_a, keys_b = stream_keys(1, Stream.CANDIDATES, k, device)
    key_a, step = i32(key_a, device), grid_step(0.01).to(device)
    seconds = median_seconds(lambda: torch.ops.seedslot.candidates(i32(0, device), connections, 1, key_a, keys_b, step), repeats,
                             str(device))
    return connections * k / seconds


def _short_train(device: str, data_dir: str | None, epochs: int) -> dict[str, Any]:
    """A short ``seedslot train`` run on ``device`` (real MNIST when ``data_dir`` has it, else a
    small synthetic IDX set whose label is which image quadrant is bright)."""
    from .train import TrainConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            data_dir = os.path.join(tmp, "synthetic")
            _write_synthetic_idx(data_dir)
        summary = run(TrainConfig(model="lenet", dataset="mnist", data_dir=data_dir, epochs=epochs, device=device,
                                  out=os.path.join(tmp, "run")), progress=False)
        same = _selections_equal_on_cpu(os.path.join(tmp, "run", "last.ckpt"), device)
    return dict(test_accuracy=summary["test_accuracy"], seconds=summary["seconds"], data=summary["data"],
                cuda_max_allocated_bytes=summary.get("cuda_max_allocated_bytes"), selections_equal_on_cpu=same)


@torch.no_grad()
def _selections_equal_on_cpu(path: str, device: str) -> bool:
    """Whether the checkpoint at ``path`` selects the same candidates loaded on ``device`` and on the CPU."""
    from ..checkpoints import load_checkpoint, load_state_into
    from ..models import build

    nets = []
    for where in (device, "cpu"):
        payload = load_checkpoint(path, map_location=where)
        net = build(**payload["build_args"]).to(where)
        load_state_into(net, payload["model"])
        nets.append(net)
    return all(torch.equal(a.selected_index(part).cpu(), b.selected_index(part).cpu())
               for (_, a), (_, b) in zip(_layers(nets[0]), _layers(nets[1])) for part in a.parts)


def _write_synthetic_idx(path: str, n_train: int = 6000, n_test: int = 1000) -> None:
    import struct

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 4, (n,), generator=g, dtype=torch.uint8)
        images = torch.randint(0, 96, (n, 28, 28), generator=g, dtype=torch.uint8)
        for q in range(4):
            rows, cols = slice(14 * (q // 2), 14 * (q // 2) + 14), slice(14 * (q % 2), 14 * (q % 2) + 14)
            images[labels == q, rows, cols] += 128
        with open(os.path.join(path, f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
        with open(os.path.join(path, f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.numpy().tobytes())


PARTS = ("identities", "speed", "memory", "budget", "train")


def gpu_acceptance(device: str = "cuda", budget_bytes: int = 2 * 2**30, data_dir: str | None = None,
                   quick: bool = False, parts: Sequence[str] = PARTS, log=print,
                   compile: str = "reduce-overhead") -> dict[str, Any]:
    """The acceptance run's ``parts``; ``ok`` is False when an identity fails. The speed part runs
    every mode, weight training included, through ``torch.compile`` in mode ``compile``."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(f"device {device!r}: the GPU acceptance run needs a CUDA device")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {', '.join(PARTS)}; got {', '.join(parts)}")
    device = str(dev)
    out: dict[str, Any] = dict(bench="gpu", device=device, device_name=torch.cuda.get_device_name(dev),
                               torch=torch.__version__, ok=True)
    t0 = time.perf_counter()
    model = "lenet" if quick else "vgg19"
    if "identities" in parts:
        out["identities"] = identities(device, model) + update_identities(device, model)
        out["ok"] = all(r["equal"] for r in out["identities"])
        log(f"identities ({model}, K=8): {'all equal' if out['ok'] else 'FAILED'} ({time.perf_counter() - t0:.0f} s)")
    if "speed" in parts:
        out["regeneration_values_per_second"] = regeneration_rate(device)
        out["speed"] = speed_bench(model, k=8, batch_size=128, device=device, repeats=3 if quick else 5,
                                   compile=compile)
        log(f"speed: {out['speed']['ratios']} ({time.perf_counter() - t0:.0f} s)")
    if "memory" in parts:
        out["memory"] = [memory_bench(model, k=k, batch_size=128, steps=2, device=device)
                         for k in ((8,) if quick else (8, 32))]
        log(f"memory done ({time.perf_counter() - t0:.0f} s)")
    if "budget" in parts:
        out["budget"] = budget_bench(model, budget_bytes=budget_bytes, device=device,
                                     ks=(2, 4) if quick else (2, 4, 8, 16, 32, 64, 128, 256))
        log("budget: " + ", ".join(f"{m}={out['budget'][m]}" for m in out["budget"] if m.endswith("_max_k")))
    if "train" in parts:
        out["train"] = _short_train(device, data_dir, epochs=1 if quick else 2)
        out["ok"] &= out["train"]["selections_equal_on_cpu"]
    out["seconds"] = time.perf_counter() - t0
    return out


def report(result: dict[str, Any]) -> str:
    """The acceptance run (or the merge of several partial runs) as one Markdown table."""
    rows = [("device", f"{result['device_name']} ({result['device']}), torch {result['torch']}")]
    for r in result.get("identities", []):
        extra = f" (max {r['max_ulps']:.1f} ulp)" if r.get("max_ulps") else ""
        rows.append((f"CUDA == CPU: {r['check']}, sharing {r['sharing']}, {r['scores']}",
                     ("equal" if r["equal"] else "DIFFERENT") + extra))
    if "speed" in result:
        rows.append(("regeneration (K = 8, 16.8 M connections, one launch)",
                     f"{result['regeneration_values_per_second'] / 1e9:.1f} G values/s"))
        sp = result["speed"]
        for r in sp["rows"]:
            rows.append((f"{sp['model']} batch {sp['batch_size']} K={sp['k']}, compile {sp.get('compile', 'off')}: "
                         f"{_name(r['mode'])} step",
                         f"{r['step_seconds'] * 1e3:.2f} ms"))
        for name, v in sp["ratios"].items():
            rows.append((f"step time {_name(name).replace('_over_', ' / ')}", f"{v:.3f}"))
    for mem in result.get("memory", []):
        by = {r["mode"]: r for r in mem["rows"]}
        for m, r in by.items():
            rows.append((f"{mem['model']} K={mem['k']} batch {mem['batch_size']}: {_name(m)} max_memory_allocated",
                         f"{r['cuda_max_allocated_bytes'] / 2**20:,.0f} MiB"))
        for m in ("int8", "seeded", "implicit"):  # "seeded": int8 in files of older runs
            if m in by and "dense" in by:
                q = by[m]["cuda_max_allocated_bytes"] / by["dense"]["cuda_max_allocated_bytes"]
                rows.append((f"{mem['model']} K={mem['k']}: peak {_name(m)} / dense", f"{q:.3f}"))
    if "budget" in result:
        b = result["budget"]
        for m in ("dense", "int8", "seeded", "implicit"):
            if f"{m}_max_k" in b:
                rows.append((f"largest K under {b['budget_bytes'] / 2**30:g} GiB ({b['model']}, batch {b['batch_size']}):"
                             f" {_name(m)}", f"{b[f'{m}_max_k']} (tried {', '.join(map(str, b['ks']))})"))
    if "train" in result:
        t = result["train"]
        rows.append((f"seedslot train on {result['device']}: {t['data']}",
                     f"test accuracy {t['test_accuracy']:.2%} in {t['seconds']:.0f} s"))
        rows.append(("its checkpoint loaded on the CPU selects the same candidates",
                     "yes" if t["selections_equal_on_cpu"] else "NO"))
    rows.append(("every identity holds", "yes" if result["ok"] else "NO"))
    width = max(len(a) for a, _ in rows)
    lines = [f"| {'check or measurement':<{width}} | result |", f"| {'-' * width} | --- |"]
    return "\n".join([*lines, *(f"| {a:<{width}} | {b} |" for a, b in rows)])


def _name(mode: str) -> str:
    return mode.replace("seeded", "int8")


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Partial acceptance runs (``--parts``) of one device as one result."""
    out: dict[str, Any] = {}
    for r in results:
        ok = out.get("ok", True) and r["ok"]
        out.update(r)
        out["ok"] = ok
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``seedslot bench gpu``."""
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    p.add_argument("--budget", default="2GiB", help="CUDA memory budget of the largest-K search (default 2GiB)")
    p.add_argument("--data-dir", help="MNIST directory for the short training run (default: synthetic data)")
    p.add_argument("--quick", action="store_true", help="Lenet instead of VGG-19, fewer K: a smoke test")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (default all)")
    p.add_argument("--compile", choices=COMPILE, default="reduce-overhead",
                   help="torch.compile mode of every mode's step in the speed part (default reduce-overhead)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--report", nargs="+", metavar="JSON", help="only print the table of these (partial) runs' JSON")


def run_cli(args: argparse.Namespace) -> int:
    from .benchmarks import parse_bytes

    if args.report:
        results = []
        for path in args.report:
            with open(path) as f:
                results.append(json.load(f))
        result = merge(results)
    else:
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        result = gpu_acceptance(args.device, parse_bytes(args.budget), args.data_dir, args.quick, parts,
                                log=lambda s: print(s, file=sys.stderr, flush=True), compile=args.compile)
    print(report(result), flush=True)
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1
