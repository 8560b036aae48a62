"""``seedslot sweep EXPERIMENT``: the paper's ablations as named sets of training runs, with a
Markdown table and a PNG plot per experiment.

Every run is a small dict of TrainConfig fields (its *spec*); its id is that dict written out in
sorted order, so it is stable across invocations. A finished run appends one whole JSON line to
``OUT/runs.jsonl``; a sweep started again skips every id already there (runs shared between
experiments, e.g. seeded K=8, are trained once). Every run checkpoints each epoch under
``OUT/checkpoints/``, so an interrupted run continues from its last epoch, and claims itself in
``OUT/claims/`` while it trains, so that two sweeps started on the same OUT (one thread each) share
the work instead of doing it twice.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import textwrap
import time
from dataclasses import dataclass

from ..candidates import SHARING
from .devices import DEVICE_HELP, resolve_device
from ..checkpoints import CheckpointError, load_checkpoint
from ..files import atomic_write, check_writable
from .train import CHECKPOINT, TrainConfig, run
from ..validate import check_choice, check_int

__all__ = ["EXPERIMENTS", "Preset", "PRESETS", "plan", "sweep", "report", "add_arguments", "run_cli"]

EXPERIMENTS = ("headline", "k", "scores", "selection", "sharing", "finetune", "cost")
SWEEP_MODELS = ("lenet", "conv2")
RUNS = "runs.jsonl"

# The x values of each experiment (candidates per connection K).
GRIDS = {"headline": [2, 8], "k": [1, 2, 4, 8, 16, 32, 64], "scores": [2, 8, 32], "selection": [2, 8, 32],
         "sharing": [2, 8, 64]}


@dataclass(frozen=True)
class Preset:
    """How long each run of a model trains. ``epochs`` None is the paper's (TrainConfig default);
    ``limit_train`` keeps the first N training examples (15% of them go to validation);
    ``finetune_epochs`` is the total that ``finetune`` splits between selection and weight training."""

    epochs: int | None
    limit_train: int | None
    finetune_epochs: int


# Defaults sized for a 2-core CPU shared with other work (one thread, about 90 min for `all`, 2
# seeds): a Lenet epoch on 17k examples takes ~10 s, a CONV-2 epoch on 4.25k ~30 s at 1 thread.
PRESETS = {"lenet": Preset(epochs=2, limit_train=20000, finetune_epochs=3),
           "conv2": Preset(epochs=1, limit_train=5000, finetune_epochs=2)}
_PAPER_EPOCHS = {"lenet": 120, "conv2": 140}

# The paper's published test accuracies (greedy selection) by (model, dataset): K -> accuracy.
PAPER = {("lenet", "mnist"): {2: 0.970, 8: 0.982}}
_PAPER_EXPERIMENTS = ("headline", "k")  # the experiments whose series those numbers belong to


def run_id(spec: dict) -> str:
    """The stable id of a run: its public (no leading "_") non-None spec fields as key=value, sorted."""
    return ",".join(f"{key}={spec[key]}" for key in sorted(spec) if spec[key] is not None and not key.startswith("_"))


# ---------------------------------------------------------------- the experiments


def _slot(model: str, p: Preset, seed: int, k: int, *, mode: str = "seeded", selection: str = "greedy",
          sharing: str = "none", scores: str | None = "int8", epochs: int | None = None) -> dict:
    return dict(model=model, seed=seed, limit_train=p.limit_train, mode=mode, k=k, selection=selection,
                sharing=sharing, scores=scores if mode == "seeded" else None,
                epochs=p.epochs if epochs is None else epochs)


def _learned(model: str, p: Preset, seed: int, epochs: int | None = None) -> dict:
    return dict(model=model, seed=seed, limit_train=p.limit_train, mode="learned",
                epochs=p.epochs if epochs is None else epochs)


def _random(model: str, p: Preset, seed: int, k: int) -> dict:
    return dict(model=model, seed=seed, limit_train=p.limit_train, mode="seeded", k=k, selection="greedy",
                sharing="none", scores="int8", random_selection=True)


def _finetune_splits(total: int) -> list[int]:
    """Selection epochs out of ``total``: about 1/4, 1/2 and 3/4 of it, each in [1, total - 1]."""
    return sorted({min(max(round(total * f), 1), total - 1) for f in (0.25, 0.5, 0.75)}) if total >= 2 else []


DEFAULT_DATASET = "fashion-mnist"


def _tag(spec: dict, dataset: str) -> dict:
    """``spec`` on ``dataset``: the dataset is part of the spec, hence of the run's id, except for
    the default one (so that the ids of existing Fashion-MNIST sweeps stay what they were)."""
    if dataset == DEFAULT_DATASET:
        return spec
    spec = dict(spec, dataset=dataset)
    if "_select" in spec:
        spec["_select"] = _tag(spec["_select"], dataset)
        spec["finetune_after"] = run_id(spec["_select"])
    return spec


def _id_dataset(rid: str) -> str:
    """The dataset a run id stands for."""
    return next((part[len("dataset="):] for part in rid.split(",") if part.startswith("dataset=")), DEFAULT_DATASET)


def _series(experiment: str, model: str, p: Preset, seeds: list[int],
            dataset: str = DEFAULT_DATASET) -> list[tuple[str, list[tuple]]]:
    """:func:`_series_of` with every spec on ``dataset``."""
    return [(label, [(x, [_tag(s, dataset) for s in group]) for x, group in points])
            for label, points in _series_of(experiment, model, p, seeds)]


def _series_of(experiment: str, model: str, p: Preset, seeds: list[int]) -> list[tuple[str, list[tuple]]]:
    """[(label, [(x, [spec per seed]), ...]), ...] of one experiment on one model; x None marks a
    reference that does not depend on x (drawn as a horizontal line)."""
    per_seed = lambda f: [f(s) for s in seeds]  # noqa: E731
    if experiment == "headline":  # the paper's Lenet numbers (K = 2 and 8) for each score storage
        ks = GRIDS["headline"]
        return [("seeded int8", [(k, per_seed(lambda s: _slot(model, p, s, k))) for k in ks]),
                ("seeded implicit", [(k, per_seed(lambda s: _slot(model, p, s, k, scores="implicit"))) for k in ks]),
                ("dense reference", [(k, per_seed(lambda s: _slot(model, p, s, k, mode="dense"))) for k in ks])]
    if experiment == "k":
        ks = GRIDS["k"]
        return [("seeded int8, greedy", [(k, per_seed(lambda s: _slot(model, p, s, k))) for k in ks]),
                ("random selection", [(k, per_seed(lambda s: _random(model, p, s, k))) for k in ks]),
                ("learned weights", [(None, per_seed(lambda s: _learned(model, p, s)))])]
    if experiment == "scores":
        ks = GRIDS["scores"]
        return [("seeded int8", [(k, per_seed(lambda s: _slot(model, p, s, k))) for k in ks]),
                ("seeded fp32", [(k, per_seed(lambda s: _slot(model, p, s, k, scores="fp32"))) for k in ks]),
                ("seeded implicit", [(k, per_seed(lambda s: _slot(model, p, s, k, scores="implicit"))) for k in ks]),
                ("dense reference", [(k, per_seed(lambda s: _slot(model, p, s, k, mode="dense"))) for k in ks])]
    if experiment == "selection":
        ks = GRIDS["selection"]
        return [("greedy", [(k, per_seed(lambda s: _slot(model, p, s, k))) for k in ks]),
                ("probabilistic (lr 50)", [(k, per_seed(lambda s: _slot(model, p, s, k, selection="sample")))
                                           for k in ks])]
    if experiment == "sharing":
        ks = GRIDS["sharing"]
        return [(f"sharing {sh}", [(k, per_seed(lambda s: _slot(model, p, s, k, sharing=sh))) for k in ks])
                for sh in SHARING]
    if experiment == "finetune":
        total = p.finetune_epochs
        # the end points are the k sweep's runs when ``total`` is what their epochs (None) mean
        whole = None if p.epochs is None and total == _PAPER_EPOCHS.get(model) else total
        points = [(0, per_seed(lambda s: _learned(model, p, s, whole)))]
        for e in _finetune_splits(total):
            points.append((e, per_seed(lambda s: _finetune(model, p, s, e, total))))
        points.append((total, per_seed(lambda s: _slot(model, p, s, 8, epochs=whole))))
        return [(f"selection (K=8) then weight training, {total} epochs in all", points)]
    if experiment == "cost":
        return [("seeded int8 K=8", [(None, per_seed(lambda s: _slot(model, p, s, 8)))]),
                ("dense reference K=8", [(None, per_seed(lambda s: _slot(model, p, s, 8, mode="dense")))]),
                ("learned weights", [(None, per_seed(lambda s: _learned(model, p, s)))])]
    raise AssertionError(experiment)


def _finetune(model: str, p: Preset, seed: int, select_epochs: int, total: int) -> dict:
    select = dict(_slot(model, p, seed, 8, epochs=select_epochs), save=True)
    return dict(model=model, seed=seed, limit_train=p.limit_train, mode="learned", epochs=total - select_epochs,
                finetune_after=run_id(select), _select=select)


def _resolve_experiments(experiment: str) -> list[str]:
    check_choice("experiment", experiment, EXPERIMENTS + ("all",))
    return list(EXPERIMENTS) if experiment == "all" else [experiment]


def plan(experiment: str, *, models=SWEEP_MODELS, seeds=(0, 1), presets: dict | None = None,
         dataset: str = DEFAULT_DATASET) -> list[dict]:
    """Every run ``experiment`` needs on ``dataset``, in order, without duplicates (a finetune run
    follows its selection run)."""
    presets = PRESETS if presets is None else presets
    for m in models:
        check_choice("model", m, SWEEP_MODELS)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    specs, seen = [], set()

    def add(spec: dict) -> None:
        if "_select" in spec:
            add(spec["_select"])
        key = run_id(spec)
        if key not in seen:
            seen.add(key)
            specs.append(spec)

    for name in _resolve_experiments(experiment):
        for m in models:
            for _, points in _series(name, m, presets[m], list(seeds), dataset):
                for _, group in points:
                    for spec in group:
                        add(spec)
    return specs


def _public(spec: dict) -> dict:
    return {key: value for key, value in spec.items() if not key.startswith("_")}


# ---------------------------------------------------------------- running


def load_records(out: str) -> dict[str, dict]:
    """id -> record of every finished run in ``out/runs.jsonl`` (a torn last line is ignored)."""
    records = {}
    path = os.path.join(out, RUNS)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (isinstance(record, dict) and isinstance(record.get("id"), str)
                        and record.get("dataset", DEFAULT_DATASET) == _id_dataset(record["id"])):
                    records[record["id"]] = record  # (a run on another dataset under an old id is not this run)
    return records


def _append(out: str, record: dict) -> None:
    """Append one whole line; a torn line left by a killed writer is closed off first."""
    path = os.path.join(out, RUNS)
    line = json.dumps(record) + "\n"
    check_writable(path)
    with open(path, "ab+", opener=lambda p, flags: os.open(p, flags | getattr(os, "O_NOFOLLOW", 0))) as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def _checkpoint_dir(out: str, rid: str) -> str:
    return os.path.join(out, "checkpoints", _digest(rid))


def _digest(rid: str) -> str:
    return hashlib.sha1(rid.encode()).hexdigest()[:16]


class _Claim:
    """A held claim: its file, locked (``flock``) through the open descriptor."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` (clock ticks since boot; "" where /proc cannot tell): with
    the pid it names one process, never a later one that reuses the pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _claim(out: str, rid: str) -> _Claim | None:
    """Claim run ``rid`` for this process, or None when a live process holds it. A claim is held by
    an ``flock`` on its file, which the kernel drops when its process dies, however it dies (also
    as PID 1 of a container): a claim nobody locks is provably stale and is taken over. A claim
    file of an older seedslot (a pid, no lock) counts as live while a process other than this one
    has that pid."""
    os.makedirs(os.path.join(out, "claims"), exist_ok=True)
    path = os.path.join(out, "claims", _digest(rid))
    for _ in range(3):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released (removed) it between our open and our lock: try afresh
            os.close(fd)
            continue
        words = os.read(fd, 64).split()
        if len(words) == 1:  # an older seedslot's claim: a pid only
            try:
                pid = int(words[0])
            except ValueError:
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                os.close(fd)
                return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_start_time(os.getpid())}".encode(), 0)
        return _Claim(path, fd)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train(spec: dict, out: str, *, dataset: str, data_dir: str | None, threads: int | None,
           device: str | None = None) -> dict:
    fields = {key: value for key, value in _public(spec).items() if key not in ("save", "finetune_after", "dataset")}
    rid = run_id(spec)
    run_dir = _checkpoint_dir(out, rid)
    if _resumable(os.path.join(run_dir, CHECKPOINT), dataset):  # interrupted earlier: continue it
        cfg = TrainConfig(resume=run_dir, data_dir=data_dir, threads=threads, epochs=fields.get("epochs"),
                          device=device)
    else:
        cfg = TrainConfig(**fields, dataset=dataset, data_dir=data_dir, threads=threads, out=run_dir, device=device,
                          overwrite=True)  # the sweep's own directory, claimed: what a kill left there goes
        if "finetune_after" in spec:
            cfg.finetune_from = os.path.join(_checkpoint_dir(out, spec["finetune_after"]), CHECKPOINT)
    summary = run(cfg, progress=False)
    if summary["interrupted"]:
        raise KeyboardInterrupt
    return dict(
        id=rid, spec=_public(spec), dataset=dataset, test_accuracy=summary["test_accuracy"],
        val_accuracy=summary["val_accuracy"]["last"], epochs=summary["epochs"], seconds=summary["seconds"],
        train_seconds=summary["train_seconds"],
        history=[dict(epoch=r["epoch"], val_accuracy=r["val_accuracy"], seconds=r["seconds"])
                 for r in summary["history"]],
        bytes_per_connection=summary["bytes_per_connection"], threads=summary["threads"],
        compile=summary["compile"], lr=summary["config"]["lr"], data=summary["data"],
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def _resumable(path: str, dataset: str) -> bool:
    """Whether ``path`` holds a checkpoint of a run on ``dataset`` (one that an older seedslot left
    under the same id for another dataset is started afresh)."""
    if not os.path.exists(path):
        return False
    try:
        return load_checkpoint(path)["config"]["dataset"] == dataset
    except (CheckpointError, KeyError, TypeError):
        return True  # resuming says what is wrong with it


def sweep(experiment: str, out: str, *, dataset: str = "fashion-mnist", data_dir: str | None = None,
          models=SWEEP_MODELS, seeds=(0, 1), presets: dict | None = None, threads: int | None = None,
          device: str | None = None, log=print, write_report: bool = True, ks=None) -> int:
    """Run what ``experiment`` needs and is not yet in ``out/runs.jsonl`` (with ``ks``, only its
    slot runs at those K values: learned baselines and fine-tuning runs have no K and are skipped),
    then (``write_report``) write its tables and plots; returns the number of runs trained now."""
    from .data import DATASETS

    check_choice("dataset", dataset, DATASETS)
    if write_report:
        _check_matplotlib()  # before anything is trained
    specs = plan(experiment, models=models, seeds=seeds, presets=presets, dataset=dataset)
    if ks is not None:
        grid = sorted({s["k"] for s in specs if "k" in s})
        if not ks or any(k not in grid for k in ks):
            raise ValueError(f"ks must be values of {experiment}'s K grid ({', '.join(map(str, grid))}); got {list(ks)}")
        specs = [s for s in specs if s.get("k") in ks]
    os.makedirs(out, exist_ok=True)
    done = load_records(out)
    todo = [s for s in specs if run_id(s) not in done]
    log(f"seedslot sweep {experiment}: {len(specs)} runs, {len(specs) - len(todo)} already in {os.path.join(out, RUNS)}")
    trained = 0
    for i, spec in enumerate(specs):
        rid = run_id(spec)
        needed_later = spec.get("save") and any(s.get("finetune_after") == rid and run_id(s) not in done
                                                for s in specs)
        ckpt_missing = not os.path.exists(os.path.join(_checkpoint_dir(out, rid), CHECKPOINT))
        if rid in done and not (needed_later and ckpt_missing):
            continue
        if "finetune_after" in spec and spec["finetune_after"] not in load_records(out):
            log(f"[{i + 1}/{len(specs)}] {rid}: waits for its selection run (another sweep has it)")
            continue
        claim = _claim(out, rid)
        if claim is None:
            log(f"[{i + 1}/{len(specs)}] {rid}: another sweep is training it")
            continue
        try:
            done.update(load_records(out))  # another sweep may have finished it meanwhile
            if rid in done and not (needed_later and ckpt_missing):
                continue
            log(f"[{i + 1}/{len(specs)}] {rid}")
            record = _train(spec, out, dataset=dataset, data_dir=data_dir, threads=threads, device=device)
            trained += 1
            if rid not in done:
                _append(out, record)
                done[rid] = record
        finally:
            claim.release()
        log(f"[{i + 1}/{len(specs)}] done: test accuracy {record['test_accuracy']:.2%}, {record['seconds']:.1f} s")
    if write_report:
        report(experiment, out, models=models, seeds=seeds, presets=presets, dataset=dataset)
    return trained


# ---------------------------------------------------------------- tables and plots


def _stats(records: dict, group: list[dict], key="test_accuracy") -> tuple | None:
    """(mean, min, max, n) of ``key`` (a record field or a function of the record) over the
    finished runs of ``group``; None if none finished."""
    get = key if callable(key) else (lambda r: r[key])
    values = [get(records[run_id(s)]) for s in group if run_id(s) in records]
    values = [v for v in values if v is not None]
    return (sum(values) / len(values), min(values), max(values), len(values)) if values else None


def _cell(st: tuple | None, n_seeds: int, scale: float = 100.0, fmt: str = ".2f") -> str:
    if st is None:
        return "—"
    mean, lo, hi, n = st
    text = f"{mean * scale:{fmt}}" + (f" ({lo * scale:{fmt}}–{hi * scale:{fmt}})" if n > 1 else "")
    return text + (f" [{n}/{n_seeds} seeds]" if n < n_seeds else "")


_TITLES = {
    "headline": "Test accuracy (%) at K = 2 and 8, greedy: seedslot's score storages and the dense reference",
    "k": "Test accuracy (%) vs K, greedy selection",
    "scores": "Test accuracy (%): int8 vs fp32 vs implicit scores vs the dense reference",
    "selection": "Test accuracy (%): greedy vs probabilistic selection",
    "sharing": "Test accuracy (%) with candidate sharing",
    "finetune": "Test accuracy (%): selection epochs then weight training, fixed total",
    "cost": "Test accuracy vs training time (K=8)",
}
_MODEL_NAMES = {"lenet": "Lenet-300-100", "conv2": "CONV-2"}


def _describe(model: str, p: Preset) -> str:
    epochs = f"{p.epochs} epoch(s)" if p.epochs is not None else f"the paper's epochs ({_PAPER_EPOCHS[model]})"
    data = f"first {p.limit_train} training examples" if p.limit_train else "full training set"
    return f"{_MODEL_NAMES[model]}: {epochs}, {data}"


def _table(experiment: str, records: dict, models, seeds, presets: dict, dataset: str = "fashion-mnist",
           out: str | None = None) -> str:
    lines = [f"### {experiment}: {_TITLES[experiment]} ({dataset})", "",
             f"Mean over seeds {', '.join(map(str, seeds))} (min–max in brackets). "
             + "; ".join(_describe(m, presets[m]) for m in models) + ".", ""]
    for m in models:
        series = _series(experiment, m, presets[m], list(seeds), dataset)
        if experiment == "cost":
            lines += [f"**{_MODEL_NAMES[m]}**", "", "| method | test accuracy (%) | training time (s) | last epoch (s) |",
                      "| --- | --- | --- | --- |"]
            for label, [(_, group)] in series:
                acc, t = _stats(records, group), _stats(records, group, "train_seconds")
                # the last epoch: the first one of a process also pays torch.compile's warm-up
                per_epoch = _stats(records, group, lambda r: r["history"][-1]["seconds"] if r["history"] else None)
                lines.append(f"| {label} | {_cell(acc, len(seeds))} | {_cell(t, len(seeds), 1.0, '.1f')} "
                             f"| {_cell(per_epoch, len(seeds), 1.0, '.1f')} |")
        else:
            xs = sorted({x for _, points in series for x, _ in points if x is not None})
            notes = []
            head = "selection epochs" if experiment == "finetune" else "K"
            lines += [f"**{_MODEL_NAMES[m]}**", "", f"| {head} | " + " | ".join(map(str, xs)) + " |",
                      "| --- |" + " --- |" * len(xs)]
            paper = PAPER.get((m, dataset), {}) if experiment in _PAPER_EXPERIMENTS else {}
            if paper:
                lines.append("| paper (Aladago & Torresani 2021), greedy | "
                             + " | ".join(f"{100 * paper[x]:.1f}" if x in paper else "" for x in xs) + " |")
            for label, points in series:
                by_x = dict(points)
                if None in by_x:
                    notes.append(f"{label} (no K): {_cell(_stats(records, by_x[None]), len(seeds))}")
                    continue
                cells = [_cell(_stats(records, by_x[x]), len(seeds)) if x in by_x else "" for x in xs]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines += [""] + [f"Reference: {note}." for note in notes]
            if out is not None:
                lines += _unfinished(out, records, series, head)
        lines.append("")
    return "\n".join(lines)


def _unfinished(out: str, records: dict, series, xname: str = "K") -> list[str]:
    """One line per run of ``series`` that has not finished: how far it got, or that it has not
    started (``xname``: what the series' x is)."""
    lines = []
    for label, points in series:
        for x, group in points:
            for spec in group:
                rid = run_id(spec)
                if rid in records:
                    continue
                try:
                    with open(os.path.join(_checkpoint_dir(out, rid), "metrics.jsonl")) as f:
                        epochs = [json.loads(line) for line in f if line.strip()]
                    got = f"stopped after epoch {epochs[-1]['epoch']} (val {100 * epochs[-1]['val_accuracy']:.2f}%)"
                except (OSError, ValueError, KeyError, IndexError, TypeError):
                    got = "not started"
                where = "" if x is None else f", {xname} {x}"
                lines.append(f"- not finished: {label}{where}, seed {spec['seed']}: {got}")
    return ([""] if lines else []) + lines


def _plot(experiment: str, records: dict, models, seeds, presets: dict, path: str, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        series = _series(experiment, m, presets[m], list(seeds), dataset)
        if experiment == "cost":
            for j, (label, [(_, group)]) in enumerate(series):
                color, labelled = f"C{j}", False
                for s in group:
                    r = records.get(run_id(s))
                    if r is None:
                        continue
                    t = [0.0]
                    for h in r["history"]:
                        t.append(t[-1] + h["seconds"])
                    ax.plot(t[1:], [100 * h["val_accuracy"] for h in r["history"]], "-", color=color, alpha=0.4)
                    ax.plot([r["train_seconds"]], [100 * r["test_accuracy"]], "o", color=color,
                            label=None if labelled else label)
                    labelled = True
            ax.set_xlabel("training time (s, 1 CPU thread)")
            ax.set_ylabel("accuracy (%): dots test, lines validation per epoch")
        else:
            n = len(series)
            for j, (label, points) in enumerate(series):
                color = f"C{j}"
                if points[0][0] is None:  # reference line
                    st = _stats(records, points[0][1])
                    if st is not None:
                        ax.axhline(100 * st[0], color=color, ls="--", label=f"{label} (mean, band min–max)")
                        ax.axhspan(100 * st[1], 100 * st[2], color=color, alpha=0.15)
                    continue
                xs, ys, lo, hi = [], [], [], []
                for x, group in points:
                    st = _stats(records, group)
                    if st is None:
                        continue
                    # spread the series a little along x so that the error bars do not overlap
                    shift = 2 ** (0.06 * (j - (n - 1) / 2)) if experiment != "finetune" else 0.03 * (j - (n - 1) / 2)
                    xs.append(x * shift if experiment != "finetune" else x + shift)
                    ys.append(100 * st[0])
                    lo.append(100 * (st[0] - st[1]))
                    hi.append(100 * (st[2] - st[0]))
                if xs:
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=color, label=label)
            paper = PAPER.get((m, dataset), {}) if experiment in _PAPER_EXPERIMENTS else {}
            if paper:
                ax.plot(list(paper), [100 * v for v in paper.values()], "*", color="k", markersize=12,
                        label="paper (Aladago & Torresani 2021)", zorder=5)
            if experiment == "finetune":
                total = presets[m].finetune_epochs
                ax.set_xlabel(f"selection epochs of {total} (0 = weight training only, {total} = selection only)")
            else:
                ax.set_xscale("log", base=2)
                ax.set_xlabel("K (candidates per connection, log scale)")
                ticks = GRIDS[experiment]
                ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_ylabel("test accuracy (%)")
        ax.set_title(_describe(m, presets[m]), fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    how = ("one dot and line per seed" if experiment == "cost"
           else f"mean of seeds {', '.join(map(str, seeds))}, bars min–max")
    fig.suptitle(textwrap.fill(_TITLES[experiment], 60 * len(models)) + f"\n{dataset}; {how}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("sweep draws its plots with matplotlib, which is not installed: pip install matplotlib "
                         "(checked before any run is trained)") from None


def report(experiment: str, out: str, *, models=SWEEP_MODELS, seeds=(0, 1), presets: dict | None = None,
           dataset: str | None = None) -> list[str]:
    """Write ``out/EXPERIMENT.md`` and ``out/EXPERIMENT.png`` for each experiment (``all``: every
    one, plus ``out/results.md`` with every table) from the finished runs on ``dataset`` (None:
    the dataset of the runs in ``out``); returns the paths."""
    presets = PRESETS if presets is None else presets
    _check_matplotlib()
    records = load_records(out)
    if dataset is None:
        dataset = next((r["dataset"] for r in records.values() if "dataset" in r), DEFAULT_DATASET)
    written, tables = [], []
    for name in _resolve_experiments(experiment):
        table = _table(name, records, models, seeds, presets, dataset, out)
        tables.append(table)
        for path, write in ((os.path.join(out, f"{name}.md"), lambda p: atomic_write(p, table + "\n")),
                            (os.path.join(out, f"{name}.png"),
                             lambda p: _plot(name, records, models, seeds, presets, p, dataset))):
            write(path)
            written.append(path)
    if experiment == "all":
        path = os.path.join(out, "results.md")
        atomic_write(path, "\n".join(tables) + "\n")
        written.append(path)
    return written


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``seedslot sweep EXPERIMENT``."""
    parser.add_argument("experiment", help=f"one of {', '.join(EXPERIMENTS)}, or all")
    parser.add_argument("--dataset", default="fashion-mnist", help="1-channel 28x28 dataset (default fashion-mnist)")
    parser.add_argument("--data-dir", help="directory with the dataset files")
    parser.add_argument("--models", nargs="+", default=list(SWEEP_MODELS), help="default: lenet conv2")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="default: 0 1")
    parser.add_argument("--epochs", type=int, metavar="N",
                        help="epochs of every run (default: lenet 2, conv2 1); finetune splits max(N, 2)")
    parser.add_argument("--paper-epochs", action="store_true",
                        help="the paper's epochs (lenet 120, conv2 140, +40 for probabilistic) on the full training set")
    parser.add_argument("--limit-train", type=int, metavar="N",
                        help="first N training examples (default: lenet 20000, conv2 5000; 0 = all)")
    parser.add_argument("--out", default="sweep", metavar="DIR", help="runs.jsonl, tables and plots (default ./sweep)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--report-only", action="store_true", help="only rewrite tables and plots from runs.jsonl")
    parser.add_argument("--ks", nargs="+", type=int, metavar="K",
                        help="train only the experiment's slot runs at these K values, no learned or fine-tuning "
                             "runs (the tables keep every column)")


def presets_for(epochs: int | None = None, limit_train: int | None = None, paper_epochs: bool = False) -> dict:
    """The presets after the command line's --epochs, --limit-train and --paper-epochs."""
    check_int("epochs", epochs, 1, optional=True)
    if paper_epochs and epochs is not None:
        raise ValueError("epochs and paper_epochs exclude each other")
    presets = {}
    for m, p in PRESETS.items():
        if paper_epochs:
            p = Preset(None, None, _PAPER_EPOCHS[m])
        elif epochs is not None:
            p = Preset(epochs, p.limit_train, max(epochs, 2))
        if limit_train is not None:
            p = Preset(p.epochs, limit_train or None, p.finetune_epochs)
        presets[m] = p
    return presets


def run_cli(args: argparse.Namespace) -> int:
    """Run (or, with --report-only, only report) a sweep; ValueError for bad input."""
    presets = presets_for(args.epochs, args.limit_train, args.paper_epochs)
    kwargs = dict(models=tuple(args.models), seeds=tuple(args.seeds), presets=presets)
    if args.report_only:
        plan(args.experiment, **kwargs)  # validates
        for path in report(args.experiment, args.out, **kwargs):
            print(f"wrote {path}")
        return 0
    t0 = time.perf_counter()
    resolve_device(args.device)  # before any run starts
    n = sweep(args.experiment, args.out, dataset=args.dataset, data_dir=args.data_dir, threads=args.threads,
              device=args.device, log=lambda s: print(s, flush=True), ks=args.ks, **kwargs)
    print(f"seedslot sweep {args.experiment}: trained {n} run(s) in {time.perf_counter() - t0:.0f} s; "
          f"tables and plots in {args.out}", file=sys.stderr)
    return 0
