"""Training runs of the paper from one config: slot machines (seeded or dense), the learned and
random-selection baselines, and fine-tuning of a selected network.

``run`` is set-up by small named steps (``_configure`` the config or resume it, ``_Outputs``,
``_load_data``, ``_build`` model, optimizer and scheduler, ``_start`` from a checkpoint or a seed),
one flat loop, and ``_summary``. A single process is a world of one (:class:`~seedslot.distributed.Ranks`):
the loop is the same under DDP. Everything random in it is keyed by the seed: the validation split, each
epoch's shuffle (a generator seeded from (seed, epoch)), each batch's flips, and dropout (the global
torch RNG, seeded once and saved in every checkpoint). A run killed mid-epoch and resumed from its
``last.ckpt`` therefore ends bit-identical to an uninterrupted one (same thread count assumed:
CPU kernels may sum in another order with another count).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data as _data
from ..checkpoints import CheckpointError, load_checkpoint, load_state_into, save_checkpoint
from ..config import SlotConfig
from ..convert import to_dense
from .compiling import COMPILE, compiled
from .devices import resolve_device
from .distributed import Ranks
from ..files import append_text, atomic_write, check_writable, remove_stale_temporaries
from ..layers import SlotLayer
from ..memory import peak_rss_bytes, state_bytes
from ..models import MODELS, MODES, build, build_from_checkpoint, count_connections
from ..optim import SlotSGD
from .. import ops
from ..rng import STREAM_VERSION, torch_seed
from ..validate import check_choice, check_float, check_int

__all__ = ["TrainConfig", "resolve", "run", "evaluate", "random_selection_", "make_model", "epoch_batches",
           "flip_generator"]

# stream tags of the training run's random numbers
_SHUFFLE, _FLIP, _DROPOUT, _RANDOM_SELECTION = 0x5F01, 0x5F02, 0x5F03, 0x5F04
_BASE_EPOCHS = {"lenet": 120, "conv2": 140, "conv4": 140, "conv6": 140, "vgg19": 120}
_EVAL_BATCH = 1000
CHECKPOINT = "last.ckpt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


@dataclass
class TrainConfig:
    """Every knob of a training run. None means "the paper's default for this model and method",
    filled in by :func:`resolve`."""

    model: str = "lenet"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # None: the dataset's default location (Fashion-MNIST only)
    mode: str | None = None  # "seeded"; "learned" with finetune_from
    k: int | None = None  # 8; slot modes only
    selection: str | None = None  # "greedy"; slot modes only
    sharing: str | None = None  # "none"; slot modes only
    scores: str | None = None  # "int8"; seeded mode only
    score_lambda: float | None = None  # score init U(0, lambda*sigma); None: paper's (conv 1, linear 0.1)
    incremental: bool = False  # implicit scores only: re-select only what can have changed
    epochs: int | None = None  # lenet 120, conv 140, vgg19 120; 40 more with selection "sample"
    batch_size: int | None = None  # 128
    lr: float | None = None  # greedy 0.1 (k <= 8) or 0.01; sample 50 (conv6 25); learned 0.01 (vgg19 0.1)
    momentum: float | None = None  # 0.9
    weight_decay: float | None = None  # vgg19 1e-4, else 0
    lr_milestones: list[int] | None = None  # vgg19: lr x lr_gamma after 2/3 of the epochs (80 of 120)
    lr_gamma: float = 0.1
    seed: int = 0
    normalize: str | None = None  # None: the dataset's default (see seedslot.data)
    limit_train: int | None = None  # keep only the first N training examples (tests)
    out: str | None = None  # directory for last.ckpt, metrics.jsonl, summary.json
    json: str | None = None  # where to write the summary
    random_selection: bool = False  # evaluate one random candidate per connection, no training
    finetune_from: str | None = None  # slot checkpoint whose selected weights are trained normally
    resume: str | None = None  # directory whose last.ckpt is continued
    checkpoint_every_steps: int | None = None  # also save last.ckpt every N steps
    threads: int | None = None  # torch.set_num_threads
    device: str | None = None  # "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"
    overwrite: bool = False  # a new run may replace the run already in out (else: refused)
    compile: str | None = None  # "off" (default), "default" or "reduce-overhead": torch.compile the step

    def slot_config(self) -> SlotConfig:
        """The slot layers' settings of this run (the library's defaults where a field is None)."""
        return SlotConfig(k=8 if self.k is None else self.k, sharing=self.sharing or "none",
                          selection=self.selection or "greedy", scores=self.scores or "int8",
                          score_lambda=self.score_lambda, seed=self.seed, incremental=self.incremental)


_MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))

# Fields a resumed run may change; everything else comes from the checkpoint.
_RESUME_OVERRIDES = ("data_dir", "json", "threads", "checkpoint_every_steps", "epochs", "device", "compile")


def resolve(config: TrainConfig) -> TrainConfig:
    """``config`` with every None default replaced by the paper's value; ValueError for values
    that are unknown or do not fit together (e.g. k with mode "learned")."""
    c = config
    check_choice("model", c.model, MODELS)
    check_choice("dataset", c.dataset, _data.DATASETS)
    mode = c.mode if c.mode is not None else ("learned" if c.finetune_from else "seeded")
    check_choice("mode", mode, MODES)
    if mode == "learned":
        for name in ("k", "selection", "sharing", "scores", "score_lambda", "incremental"):
            if getattr(c, name) not in (None, False):
                raise ValueError(f"{name} applies to the slot modes 'seeded' and 'dense', not to mode 'learned'")
    if mode == "dense" and c.scores is not None:
        raise ValueError("scores applies to mode 'seeded' only (the dense reference keeps fp32 scores)")
    if c.finetune_from is not None and mode != "learned":
        raise ValueError("finetune_from trains the selected weights as ordinary weights: mode must be 'learned'")
    if c.random_selection:
        if mode == "learned":
            raise ValueError("random_selection needs a slot mode, 'seeded' or 'dense'")
        if c.finetune_from is not None or c.resume is not None:
            raise ValueError("random_selection does not train: it takes neither finetune_from nor resume")
        if c.epochs is not None:
            raise ValueError("random_selection does not train: epochs does not apply")
    if mode == "dense" and c.incremental:
        raise ValueError("incremental applies to mode 'seeded' with scores 'implicit'")
    slot = mode != "learned"
    if slot:
        c.slot_config()  # every slot setting is validated there
    k = (8 if c.k is None else c.k) if slot else None
    selection = (c.selection or "greedy") if slot else None
    sharing = (c.sharing or "none") if slot else None
    scores = (c.scores or "int8") if mode == "seeded" else None
    if c.random_selection and scores == "implicit":
        raise ValueError("random_selection needs stored scores: use scores 'int8' or 'fp32'")

    check_int("epochs", c.epochs, 1, optional=True)
    if c.random_selection:
        epochs = 0
    elif c.epochs is not None:
        epochs = c.epochs
    else:
        epochs = _BASE_EPOCHS[c.model] + (40 if selection == "sample" else 0)
    if c.lr is not None:
        lr = c.lr
    elif not slot:
        lr = 0.1 if c.model == "vgg19" else 0.01
    elif selection == "sample":
        lr = 25.0 if c.model == "conv6" else 50.0
    else:
        lr = 0.1 if k <= 8 else 0.01
    weight_decay = c.weight_decay if c.weight_decay is not None else (1e-4 if c.model == "vgg19" else 0.0)
    if c.lr_milestones is not None:
        milestones = list(c.lr_milestones)
    else:
        milestones = [round(epochs * 2 / 3)] if c.model == "vgg19" and epochs >= 2 else []
    out = dataclasses.replace(
        c, mode=mode, k=k, selection=selection, sharing=sharing, scores=scores, epochs=epochs,
        batch_size=128 if c.batch_size is None else c.batch_size, lr=float(lr),
        momentum=0.9 if c.momentum is None else float(c.momentum), weight_decay=float(weight_decay),
        lr_milestones=milestones, normalize=c.normalize or _data.DEFAULT_NORMALIZE[c.dataset],
        compile=c.compile or "off",
    )
    check_choice("compile", out.compile, COMPILE)
    check_int("batch_size", out.batch_size, 1)
    check_float("lr", out.lr, 0.0, lo_open=True)
    check_float("momentum", out.momentum, 0.0, 1.0)
    check_float("weight_decay", out.weight_decay, 0.0)
    check_float("lr_gamma", out.lr_gamma, 0.0, lo_open=True)
    for m in out.lr_milestones:
        check_int("lr_milestones", m, 1)
    peak_lr = out.lr * max(1.0, out.lr_gamma ** len(out.lr_milestones))
    if mode == "seeded" and peak_lr * out.weight_decay >= 1.0:  # SlotSGD would refuse it at that step
        raise ValueError(f"lr * weight_decay must be < 1 for mode 'seeded' (the decay multiplies every score "
                         f"by 1 - lr * weight_decay); got peak lr {peak_lr:g}, weight_decay {out.weight_decay:g}")
    check_int("seed", out.seed, 0)
    check_choice("normalize", out.normalize, _data.NORMALIZE)
    check_int("limit_train", out.limit_train, 2, optional=True)
    check_int("checkpoint_every_steps", out.checkpoint_every_steps, 1, optional=True)
    if out.checkpoint_every_steps is not None and out.out is None:
        raise ValueError("checkpoint_every_steps saves into out: pass out (a directory) too")
    check_int("threads", out.threads, 1, optional=True)
    if out.threads is not None and out.threads > _MAX_THREADS:  # torch's thread pools crash far above it
        raise ValueError(f"threads must be an int in [1, {_MAX_THREADS}] (64, or 4 per CPU core); got {out.threads}")
    resolve_device(out.device)  # an unknown or absent device is an error before anything starts
    return out


def _resumed(config: TrainConfig, ckpt: dict, source: str) -> TrainConfig:
    """The checkpoint's config, with the few fields a resumed run may change taken from ``config``."""
    try:
        saved = TrainConfig(**ckpt["config"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: not a seedslot training checkpoint ({type(e).__name__}: {e})") from None
    if config.out is not None and os.path.abspath(config.out) != os.path.abspath(config.resume):
        raise ValueError(f"out={config.out!r}: a resumed run continues in its own directory {config.resume!r}; "
                         "leave out unset or pass the same directory")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        given = getattr(config, f.name)
        if f.name in _RESUME_OVERRIDES or f.name in ("resume", "out", "overwrite"):
            continue
        if given != getattr(defaults, f.name) and given != getattr(saved, f.name):
            raise ValueError(f"resume continues the run as it was configured: {f.name}={given!r} differs from "
                             f"the checkpoint's {getattr(saved, f.name)!r}")
    changes = {name: getattr(config, name) for name in _RESUME_OVERRIDES if getattr(config, name) is not None}
    # Where a resumed run writes is decided here, from its own command line only: inside its --out
    # (the resumed directory) and to its own --json, never to a path the checkpoint holds.
    changes["json"], changes["overwrite"] = config.json, False
    try:
        cfg = resolve(dataclasses.replace(saved, **changes, resume=config.resume, out=config.resume))
    except ValueError as e:
        if "epochs" in changes or "checkpoint_every_steps" in changes:
            raise
        raise CheckpointError(f"{source}: tampered: its config does not resolve ({e})") from None
    done = ckpt.get("epoch")
    if "epochs" in changes and isinstance(done, int) and not isinstance(done, bool) and cfg.epochs < done:
        raise ValueError(f"epochs must be >= the {done} epochs the checkpoint has done; got {cfg.epochs}")
    return cfg


_TALLY = dict(loss_sum=float, correct=int, seen=int, epoch_seconds=float, history=list)


def _restore(ckpt: dict, source: str, cfg: TrainConfig, objects: dict, batches_per_epoch: int) -> tuple[dict, dict]:
    """Load a training checkpoint's state into ``objects`` (model, optimizer, scheduler) and the
    global RNG; returns ``(pos, tally)``. CheckpointError naming the first field out of range."""
    try:
        for key, obj in objects.items():
            load_state_into(obj, ckpt[key])
        rng = ckpt["rng"]
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
            raise CheckpointError("rng must be a torch RNG state (uint8 tensor)")
        limits = dict(epoch=cfg.epochs, step_in_epoch=batches_per_epoch, global_step=(cfg.epochs + 1) * batches_per_epoch)
        pos = {}
        for key, top in limits.items():
            v = ckpt[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
                raise CheckpointError(f"{key} must be an int in [0, {top}]; got {v!r:.80}")
            pos[key] = v
        tally = ckpt["tally"]
        if not isinstance(tally, dict) or set(tally) != set(_TALLY):
            raise CheckpointError(f"tally must be a dict of {', '.join(_TALLY)}")
        for key, kind in _TALLY.items():
            v = tally[key]
            ok = isinstance(v, kind) or (kind is float and isinstance(v, int))
            if isinstance(v, bool) or not ok or (kind is not list and not (math.isfinite(v) and v >= 0)):
                raise CheckpointError(f"tally[{key!r}] must be a {kind.__name__}"
                                      + ("" if kind is list else " >= 0") + f"; got {v!r:.80}")
        _check_history(tally["history"], pos["epoch"])
        torch.set_rng_state(rng)  # rank 0's; other ranks re-key their dropout
        return pos, dict(tally)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{source}: not a seedslot training checkpoint ({type(e).__name__}: {e})") from None


def _check_history(history: list, epochs_done: int) -> None:
    """CheckpointError unless ``history`` holds the records of the ``epochs_done`` finished epochs
    (what the summary and the metrics rewrite read), so that a tampered one fails here, not late."""
    if len(history) != epochs_done:
        raise CheckpointError(f"tally['history'] must hold one record per finished epoch ({epochs_done}); "
                              f"got {len(history)}")
    for i, r in enumerate(history):
        if not isinstance(r, dict) or r.get("epoch") != i + 1 or isinstance(r.get("epoch"), bool):
            raise CheckpointError(f"tally['history'][{i}] must be the record of epoch {i + 1}")
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"):
            v = r.get(key)
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not (v is None and key.startswith("val") or number and (key.endswith("loss") or 0 <= v <= (
                    1 if key.endswith("accuracy") else math.inf))):
                raise CheckpointError(f"tally['history'][{i}][{key!r}] must be a number"
                                      + (" in [0, 1]" if key.endswith("accuracy") else "")
                                      + (" or null" if key.startswith("val") else "") + f"; got {v!r:.80}")
        try:
            json.dumps(r, allow_nan=True)
        except (TypeError, ValueError, RecursionError):
            raise CheckpointError(f"tally['history'][{i}] must hold JSON values only") from None


# ---------------------------------------------------------------- pieces of the loop


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of the whole training split for ``epoch``: a shuffle fixed by (seed, epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(torch_seed(seed, _SHUFFLE, epoch)))
    return list(order.split(batch_size))


def flip_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of the random flips of batch ``step`` of ``epoch``."""
    return torch.Generator().manual_seed(torch_seed(seed, _FLIP, epoch, step))


class _StopOnCtrlC:
    """While active, the first Ctrl-C or SIGTERM asks the loop to stop after the current step (so
    that what was done can be saved); a second one interrupts at once. With ``agree``, ``asked`` records it
    and ``requested`` is set once the ranks agree (:meth:`agree`), so that all stop after the same
    step; without, the Ctrl-C sets ``requested`` at once."""

    def __init__(self, agree: bool = False) -> None:
        self.requested = self.asked = False
        self._agree = agree
        self._previous = None

    def __enter__(self) -> "_StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():  # SIGTERM (schedulers, Kubernetes) as Ctrl-C
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        self.requested = not self._agree
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"\nseedslot: {name}: stopping after this step and saving (Ctrl-C again aborts)", file=sys.stderr,
              flush=True)

    def agree(self, asked_anywhere: bool) -> None:
        """Stop after this step when any rank was asked to (``asked`` summed over the ranks)."""
        self.requested = self.requested or asked_anywhere

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


@torch.no_grad()
def evaluate(model: nn.Module, split: _data.Split, preprocess: _data.Preprocess,
             batch_size: int = _EVAL_BATCH) -> tuple[float | None, float | None]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode on ``split``; None for an empty split."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for x, y in _data.batches(split, batch_size):  # on the split's device
        logits = model(preprocess(x))  # (B, classes)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
    model.train(was_training)
    n = len(split)
    return (loss / n, correct / n) if n else (None, None)


@torch.no_grad()
def random_selection_(model: nn.Module, seed: int) -> nn.Module:
    """The paper's random baseline, in place: every slot layer selects one candidate per connection
    uniformly at random (seeded), by scores that are 1 for it and 0 for the others."""
    g = torch.Generator().manual_seed(torch_seed(seed, _RANDOM_SELECTION))
    for m in model.modules():
        if isinstance(m, SlotLayer):
            for part in m.parts:
                if getattr(m, "scores", None) == "implicit":
                    raise ValueError("random_selection needs stored scores: use scores 'int8' or 'fp32'")
                scores = getattr(m, f"{part}_scores")  # (*shape, K)
                idx = torch.randint(m.k, scores.shape[:-1], generator=g).to(scores.device)
                scores.zero_().scatter_(-1, idx.unsqueeze(-1), 1)
    return model


def _epoch_record(epoch: int, pos: dict, tally: dict, val: tuple, lr: float, seconds: float,
                  device: torch.device) -> dict:
    """The metrics line of a finished epoch."""
    seen = max(tally["seen"], 1)
    return dict(kind="epoch", epoch=epoch + 1, global_step=pos["global_step"],
                train_loss=tally["loss_sum"] / seen, train_accuracy=tally["correct"] / seen,
                val_loss=val[0], val_accuracy=val[1], lr=lr, seconds=seconds,
                peak_rss_bytes=peak_rss_bytes(), **_cuda_peak(device))


def _cuda_peak(device: torch.device) -> dict:
    """``{"cuda_max_allocated_bytes": ...}`` on a CUDA device, else nothing."""
    return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}


def _in_step_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """:func:`state_bytes` as during a step: a gradient counted for every trainable parameter,
    also after a run (e.g. a resumed finished one) in which no step ran."""
    missing = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad and p.grad is None)
    return state_bytes(model, optimizer) + missing


def _on_terminal() -> bool:
    """Whether the progress bar goes to a terminal: a log file or pipe gets the line per epoch only."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _fmt(loss: float | None, accuracy: float | None) -> str:
    if loss is None or accuracy is None:
        return "loss n/a acc n/a"
    return f"loss {loss:.4f} acc {accuracy:.2%}"


# ---------------------------------------------------------------- set-up


@dataclass
class _State:
    """Everything a checkpoint holds: what is trained, and where the loop stands (``pos``) with
    the running epoch's sums and the finished epochs' records (``tally``)."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    pos: dict = dataclasses.field(default_factory=lambda: dict(epoch=0, step_in_epoch=0, global_step=0))
    tally: dict = dataclasses.field(default_factory=lambda: dict(loss_sum=0.0, correct=0, seen=0, epoch_seconds=0.0,
                                                                 history=[]))
    data_sha256: str | None = None  # the data's fingerprint (Data.fingerprint)

    def payload(self) -> dict:
        """The checkpoint: state dicts, the RNG states (CUDA's on a CUDA device), pos, tally, config,
        and the random stream version the model's seeds regenerate."""
        return dict(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            rng=torch.get_rng_state(), **self.pos, tally=self.tally, config=asdict(self.cfg), data_sha256=self.data_sha256,
            build_args=self.model.build_args, stream_version=STREAM_VERSION,
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
        )


def _check_outputs(cfg: TrainConfig) -> None:
    """ValueError naming ``out`` or ``json`` when the run could not write its results there."""
    if cfg.out is not None and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"out: {cfg.out} is not a directory")
    if cfg.json is not None:
        try:
            check_writable(cfg.json)
        except ValueError as e:
            raise ValueError(f"json: {e}") from None
        parent = os.path.dirname(os.path.abspath(cfg.json))
        if os.path.isdir(cfg.json):
            raise ValueError(f"json: {cfg.json} is a directory; pass a file path")
        if not os.path.isdir(parent):
            raise ValueError(f"json: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"json: directory {parent} is not writable")


class _Outputs:
    """The files of a run, written by rank 0 only: ``out/last.ckpt``, ``out/metrics.jsonl``,
    ``out/summary.json`` and the ``json`` summary. Made before anything is loaded or trained:
    ValueError (on every rank) when ``out`` or ``json`` could not be written."""

    def __init__(self, cfg: TrainConfig, ranks: Ranks) -> None:
        _check_outputs(cfg)
        self.out = cfg.out if ranks.main else None
        self.json = cfg.json if ranks.main else None
        self._lock = None
        held = [name for name in (CHECKPOINT, METRICS, SUMMARY)
                if cfg.out is not None and os.path.lexists(os.path.join(cfg.out, name))]
        if held and cfg.resume is None and not cfg.overwrite:  # on every rank: they all stop
            raise ValueError(f"out: {cfg.out} already holds a run ({', '.join(held)}); continue it with "
                             f"--resume {cfg.out}, or pass --overwrite to replace it")
        refused = None
        if self.out is not None:
            os.makedirs(self.out, exist_ok=True)
            try:
                self._lock = _lock_dir(self.out)
            except ValueError as e:
                refused = str(e)
        refused = ranks.from_main(refused)  # every rank stops with rank 0's line, none waits for it
        if refused is not None:
            raise ValueError(refused)
        if self.out is not None:
            if held and cfg.resume is None:
                for name in held:  # replaced whole, never mixed with the new run's lines
                    os.remove(os.path.join(self.out, name))
            for name in (CHECKPOINT, METRICS, SUMMARY):  # temporaries left by a kill during a write
                remove_stale_temporaries(os.path.join(self.out, name))

    def close(self) -> None:
        """Release ``out`` for the next run."""
        if self._lock is not None:
            _unlock_dir(self.out, self._lock)
            self._lock = None

    def save(self, state: _State) -> str | None:
        """Write ``out/last.ckpt``; its path, or None without ``out``. :class:`_Diverged` (on every
        rank: their states are equal) instead of saving a state that is not finite, which its own
        resume would refuse: the last finite checkpoint stays."""
        bad = _first_nonfinite(state)
        if bad is not None:
            raise _Diverged(f"{bad} is not finite at epoch {state.pos['epoch'] + 1} step {state.pos['step_in_epoch']}")
        if self.out is None:
            return None
        path = os.path.join(self.out, CHECKPOINT)
        save_checkpoint(path, state.payload())
        return path

    def log(self, record: dict) -> None:
        """Append one line to ``out/metrics.jsonl``."""
        if self.out is not None:
            append_text(os.path.join(self.out, METRICS), json.dumps(_json_safe(record), allow_nan=False) + "\n")

    def rewrite_metrics(self, history: list[dict]) -> None:
        """``out/metrics.jsonl`` as a resumed checkpoint knows it: a kill between an epoch's log
        and its save leaves a record the checkpoint does not know, and its history is the truth."""
        if self.out is not None:
            atomic_write(os.path.join(self.out, METRICS), "".join(json.dumps(r) + "\n" for r in history))

    def write_summary(self, summary: dict) -> None:
        """Write the summary to ``json`` and ``out/summary.json``."""
        text = json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n"  # strict JSON: no bare NaN
        for path in filter(None, [self.json, self.out and os.path.join(self.out, SUMMARY)]):
            atomic_write(path, text)  # never a half-written summary


LOCK = ".lock"


def _json_safe(value):
    """``value`` with every float that is NaN or infinite replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _first_nonfinite(state: "_State") -> str | None:
    """The name of the first model or optimizer tensor holding a NaN or an infinity, or None."""
    named = list(state.model.state_dict().items())
    for i, per_param in enumerate(state.optimizer.state.values()):
        named += [(f"optimizer {key} of parameter {i}", v) for key, v in per_param.items()]
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            return name
    return None


def _lock_dir(out: str) -> int:
    """An exclusive lock on ``out`` (``flock`` of ``out/.lock``) for as long as the returned
    descriptor is open: the kernel drops it when the process dies, so a lock is never stale.
    ValueError when another run holds it. :func:`_unlock_dir` removes the file again."""
    path = os.path.join(out, LOCK)
    for _ in range(3):
        check_writable(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"out: {out} is in use by another seedslot run; wait for it to end or pass another "
                             "--out") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it between our open and our lock: lock the new one
    raise ValueError(f"out: {out} is in use by other seedslot runs; wait for them to end or pass another --out")


def _unlock_dir(out: str, fd: int) -> None:
    """Release :func:`_lock_dir`'s lock, removing its file while still holding it."""
    try:
        os.remove(os.path.join(out, LOCK))
    except FileNotFoundError:
        pass
    os.close(fd)


def _configure(config: TrainConfig) -> tuple[TrainConfig, dict | None]:
    """The resolved config, and the checkpoint a resumed run continues (None for a new run)."""
    if config.resume is None:
        return resolve(config), None
    source = os.path.join(config.resume, CHECKPOINT)
    ckpt = load_checkpoint(source)
    return _resumed(config, ckpt, source), ckpt


def _load_data(cfg: TrainConfig, device: torch.device, ckpt: dict | None) -> tuple[_data.Data, str]:
    """The run's dataset, split and on ``device``, and its fingerprint; ValueError naming
    ``data_dir`` when a resumed run's checkpoint was trained on other data (e.g. Fashion-MNIST's
    files where the run had MNIST's: same format, same sizes)."""
    data = _data.load(cfg.dataset, cfg.data_dir, seed=cfg.seed, normalize=cfg.normalize, limit_train=cfg.limit_train)
    fingerprint = data.fingerprint()
    saved = None if ckpt is None else ckpt.get("data_sha256")  # absent from checkpoints written before it was saved
    if saved is not None and saved != fingerprint:
        source = os.path.join(cfg.resume, CHECKPOINT)
        if not isinstance(saved, str):
            raise CheckpointError(f"{source}: tampered: data_sha256 must be a string; got {type(saved).__name__}")
        raise ValueError(f"data_dir: {data.data_dir} holds other {cfg.dataset} data than the run in {cfg.resume} "
                         "was trained on (the SHA-256 of its examples differs); pass the run's own --data-dir")
    return data.to(device), fingerprint  # uint8 images move once: no per-batch host-to-device copy


def make_model(cfg: TrainConfig, data: _data.Data, ckpt: dict | None) -> nn.Module:
    """The model a run trains: rebuilt from a resumed checkpoint, the selected weights of
    ``finetune_from`` as an ordinary network, or built fresh from ``cfg``."""
    shape = dict(in_channels=data.in_channels, input_size=data.input_size, num_classes=data.num_classes)
    if ckpt is not None:
        return build_from_checkpoint(ckpt, os.path.join(cfg.resume, CHECKPOINT))
    if cfg.finetune_from is None:
        return build(cfg.model, mode=cfg.mode, config=cfg.slot_config(), **shape)
    payload = load_checkpoint(cfg.finetune_from)
    slot = build_from_checkpoint(payload, cfg.finetune_from)
    args = slot.build_args
    if args["mode"] == "learned":
        raise ValueError(f"{cfg.finetune_from} holds an ordinary network; finetune_from takes a slot machine checkpoint")
    if args["name"] != cfg.model:
        raise ValueError(f"{cfg.finetune_from} holds a {args['name']} model; pass model={args['name']!r}")
    if any(args[key] != value for key, value in shape.items()):
        raise ValueError(f"{cfg.finetune_from} was trained on {args['in_channels']}x{args['input_size']}^2 inputs, "
                         f"{cfg.dataset} has {data.in_channels}x{data.input_size}^2")
    load_state_into(slot, payload["model"])
    model = to_dense(slot)
    model.build_args = {**args, "mode": "learned"}  # an ordinary model of the same architecture
    return model


def _compiled(cfg: TrainConfig, net: nn.Module, optimizer: torch.optim.Optimizer):
    """The forward and the optimizer step the loop calls (see :func:`.compiling.compiled`)."""
    return compiled(net, optimizer, cfg.compile)


def _build(cfg: TrainConfig, data: _data.Data, ckpt: dict | None, device: torch.device,
           ranks: Ranks) -> tuple[_State, nn.Module]:
    """The model on ``device``, its optimizer and scheduler (at their start), and the module the
    loop calls: the model itself, or its DDP wrapper."""
    model = make_model(cfg, data, ckpt).to(device)
    ranks.check_batch_size(cfg.batch_size)
    net = ranks.wrap(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    hyper = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    optimizer = SlotSGD(params, **hyper) if cfg.mode == "seeded" else torch.optim.SGD(params, **hyper)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.lr_milestones, cfg.lr_gamma)
    return _State(cfg, model, optimizer, scheduler, device), net


def _start(state: _State, ckpt: dict | None, batches_per_epoch: int, rank: int) -> None:
    """Restore ``state`` and the RNGs from a resumed checkpoint, or seed dropout for a new run;
    ranks other than 0 draw their own dropout masks."""
    cfg, device = state.cfg, state.device
    if ckpt is not None:
        objects = dict(model=state.model, optimizer=state.optimizer, scheduler=state.scheduler)
        state.pos, state.tally = _restore(ckpt, os.path.join(cfg.resume, CHECKPOINT), cfg, objects, batches_per_epoch)
        if device.type == "cuda" and isinstance(ckpt.get("cuda_rng"), torch.Tensor):
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)  # dropout on CUDA draws from its own generator
    else:
        torch.manual_seed(torch_seed(cfg.seed, _DROPOUT))
    if rank:
        torch.manual_seed(torch_seed(cfg.seed, _DROPOUT, rank, state.pos["global_step"]))


def _announce(cfg: TrainConfig, resumed: bool, pos: dict, data: _data.Data, device: torch.device, say) -> None:
    say(f"seedslot train: {cfg.model} on {cfg.dataset}, mode {cfg.mode}"
        + (f", resumed from {cfg.resume} at epoch {pos['epoch'] + 1} step {pos['step_in_epoch']}" if resumed else ""))
    say("config: " + json.dumps(asdict(cfg)))
    say("data: " + data.describe())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    say(f"torch: {device} ({where}), torch.compile {'on' if ops.backends()['compile'] else 'off'} "
        "(SEEDSLOT_COMPILE=0 turns it off)")


# ---------------------------------------------------------------- the run


def run(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train (or evaluate) as ``config`` says; returns the summary, also written to ``config.json``.

    Prints the resolved config, a progress bar per epoch and one line per epoch. With ``out``,
    writes ``out/last.ckpt`` every epoch (and every ``checkpoint_every_steps`` steps),
    ``out/metrics.jsonl`` and ``out/summary.json``, holding ``out`` locked meanwhile; a new run into an
    ``out`` that holds a run is refused unless ``overwrite``. The first Ctrl-C or SIGTERM stops after
    the current step, saves, and returns a summary with ``interrupted`` true.
    """
    t_start = time.perf_counter()
    cfg, ckpt = _configure(config)
    ranks = Ranks.join()  # torchrun's ranks, or a world of one
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    try:
        outputs = _Outputs(cfg, ranks)  # before anything is loaded, trained or written
    except BaseException:
        ranks.close()  # a refused out stops every rank, leaving the process group cleanly
        raise
    try:
        data, fingerprint = _load_data(cfg, device, ckpt)
        state, net = _build(cfg, data, ckpt, device, ranks)
        state.data_sha256 = fingerprint
        _start(state, ckpt, math.ceil(len(data.train) / cfg.batch_size), ranks.rank)
        model, pos, tally = state.model, state.pos, state.tally
        _announce(cfg, ckpt is not None, pos, data, device, ranks.say)
        if ckpt is not None:
            outputs.rewrite_metrics(tally["history"])
        if cfg.random_selection:
            random_selection_(model, cfg.seed)
        elif cfg.finetune_from is not None and ckpt is None:
            ranks.say(f"selected weights before fine-tuning: val {_fmt(*evaluate(model, data.val, data.preprocess))}")

        interrupted, diverged = False, None
        try:
            _loop(cfg, state, net, data, ranks, outputs, device, progress)
        except _Interrupted as e:
            interrupted = e.unfinished
        except _Diverged as e:
            diverged = str(e)

        summary = _summary(state, data, ranks, outputs, interrupted, t_start, diverged)
        del net  # the DDP wrapper goes before the process group
        ranks.close()
        outputs.write_summary(summary)
        return summary
    finally:
        outputs.close()


class _Interrupted(Exception):
    """The loop stopped on a Ctrl-C or SIGTERM; ``unfinished``: epochs were left."""

    def __init__(self, unfinished: bool) -> None:
        super().__init__()
        self.unfinished = unfinished


class _Diverged(Exception):
    """The loss or the state stopped being finite: nothing more is saved, the last checkpoint stays."""


def _loop(cfg: TrainConfig, state: _State, net: nn.Module, data: _data.Data, ranks: Ranks, outputs: _Outputs,
          device: torch.device, progress: bool) -> None:
    """The epochs still to run; raises :class:`_Interrupted` or :class:`_Diverged` when it stops early."""
    model, optimizer, scheduler, pos, tally = state.model, state.optimizer, state.scheduler, state.pos, state.tally
    forward, optimizer_step = _compiled(cfg, net, optimizer)
    with _StopOnCtrlC(agree=ranks.world > 1) as stop:
        for epoch in range(pos["epoch"], cfg.epochs):
            t_epoch = time.perf_counter()
            model.train()
            batches = ranks.whole_batches(epoch_batches(len(data.train), cfg.batch_size, cfg.seed, epoch))
            bar = tqdm(total=len(batches), initial=pos["step_in_epoch"], desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", leave=False, dynamic_ncols=True,
                       disable=not (progress and ranks.main and _on_terminal()))
            for step in range(pos["step_in_epoch"], len(batches)):
                idx = batches[step].to(device)
                x = data.preprocess(data.train.images[idx], flip_generator(cfg.seed, epoch, step))
                x, y, weight = ranks.shard(x, data.train.labels[idx])  # flips drawn for the global batch
                optimizer.zero_grad(set_to_none=True)
                logits = forward(x)  # (B / world, classes)
                loss = F.cross_entropy(logits, y)
                (loss * weight).backward()  # weight 1 (exact) unless the last batch splits unevenly
                optimizer_step()

                # the global batch's tally, and whether any rank was asked to stop
                done = ranks.sum([loss.item() * len(y), int((logits.argmax(dim=1) == y).sum()), len(y), stop.asked])
                if not math.isfinite(done[0]):
                    raise _Diverged(f"the training loss is {done[0]} at epoch {epoch + 1} step {step + 1}")
                if isinstance(optimizer, SlotSGD):
                    optimizer.check()  # the host reads the loss here anyway: a deferred bad step raises now
                stop.agree(bool(done[3]))
                tally["loss_sum"] += done[0]
                tally["correct"] += int(done[1])
                tally["seen"] += int(done[2])
                pos["step_in_epoch"], pos["global_step"] = step + 1, pos["global_step"] + 1
                bar.update()
                bar.set_postfix(loss=f"{tally['loss_sum'] / tally['seen']:.4f}",
                                acc=f"{tally['correct'] / tally['seen']:.2%}", refresh=False)
                if stop.requested:
                    break
                if cfg.checkpoint_every_steps and pos["global_step"] % cfg.checkpoint_every_steps == 0:
                    tally["epoch_seconds"] += time.perf_counter() - t_epoch
                    t_epoch = time.perf_counter()
                    outputs.save(state)
            bar.close()
            tally["epoch_seconds"] += time.perf_counter() - t_epoch
            t_epoch = time.perf_counter()
            if stop.requested:
                raise _Interrupted(True)

            val = evaluate(model, data.val, data.preprocess)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            record = _epoch_record(epoch, pos, tally, val, lr, tally["epoch_seconds"] + time.perf_counter() - t_epoch,
                                   device)
            ranks.say(f"epoch {epoch + 1}/{cfg.epochs}  train {_fmt(record['train_loss'], record['train_accuracy'])}  "
                      f"val {_fmt(*val)}  lr {lr:g}  {record['seconds']:.1f} s  "
                      f"peak RSS {record['peak_rss_bytes'] / 2**20:.0f} MiB")
            outputs.log(record)
            pos.update(epoch=epoch + 1, step_in_epoch=0)
            tally.update(loss_sum=0.0, correct=0, seen=0, epoch_seconds=0.0, history=tally["history"] + [record])
            ranks.check_in_sync(model)  # scores are never sent: prove every rank still holds rank 0's before saving
            outputs.save(state)
            if stop.requested:
                raise _Interrupted(pos["epoch"] < cfg.epochs)


def _summary(state: _State, data: _data.Data, ranks: Ranks, outputs: _Outputs, interrupted: bool,
             t_start: float, diverged: str | None = None) -> dict:
    """Save an interrupted run, or evaluate a finished one on the test split; the run's summary."""
    cfg, model, pos, history = state.cfg, state.model, state.pos, state.tally["history"]
    if interrupted and diverged is None:
        try:
            path = outputs.save(state)
        except _Diverged as e:
            diverged = str(e)
        else:
            ranks.say(f"interrupted at epoch {pos['epoch'] + 1} step {pos['step_in_epoch']}; "
                      + (f"saved {path}; continue with --resume {cfg.out}" if path else "nothing saved (no --out)"))
    if diverged is not None:
        path = os.path.join(cfg.out, CHECKPOINT) if cfg.out is not None else None
        kept = (f"the last finite checkpoint, {path}, stays" if path and os.path.exists(path)
                else "no checkpoint was saved")
        ranks.say(f"diverged: {diverged}; {kept} (try a smaller --lr)")
    if diverged is not None or interrupted:
        test_loss = test_acc = None
    else:
        test_loss, test_acc = evaluate(model, data.test, data.preprocess)
    vals = [r["val_accuracy"] for r in history if r["val_accuracy"] is not None]
    if cfg.random_selection:
        val_loss, last_val = evaluate(model, data.val, data.preprocess)
        best_val, best_epoch = last_val, 0
        outputs.log(dict(kind="random_selection", val_loss=val_loss, val_accuracy=last_val,
                         test_loss=test_loss, test_accuracy=test_acc))
    else:
        last_val = history[-1]["val_accuracy"] if history else None
        best_val = max(vals) if vals else None
        best_epoch = next(r["epoch"] for r in history if r["val_accuracy"] == best_val) if vals else None
        if not interrupted:
            outputs.log(dict(kind="test", test_loss=test_loss, test_accuracy=test_acc))
    connections = count_connections(model)
    total_state = _in_step_state_bytes(model, state.optimizer)
    summary = dict(
        test_accuracy=test_acc, test_loss=test_loss,
        val_accuracy=dict(best=best_val, best_epoch=best_epoch, last=last_val),
        epochs=pos["epoch"], global_steps=pos["global_step"], interrupted=interrupted and diverged is None,
        diverged=diverged is not None, diverged_reason=diverged,
        seconds=time.perf_counter() - t_start, train_seconds=sum(r["seconds"] for r in history),
        peak_rss_bytes=peak_rss_bytes(), **_cuda_peak(state.device), state_bytes=total_state,
        connections=connections, bytes_per_connection=total_state / connections, compile=ops.backends()["compile"],
        threads=torch.get_num_threads(), data=data.describe(), config=asdict(cfg), build_args=model.build_args,
        history=history, checkpoint=os.path.join(cfg.out, CHECKPOINT) if cfg.out is not None and cfg.epochs else None,
    )
    if test_acc is not None:
        ranks.say(f"test loss {test_loss:.4f} acc {test_acc:.2%}  ({summary['seconds']:.1f} s, "
                  f"state {total_state / 2**20:.2f} MiB = {summary['bytes_per_connection']:.2f} B/connection)")
    summary["world_size"] = ranks.world
    return summary
