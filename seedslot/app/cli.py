"""The ``seedslot`` command: ``train``, ``demo``, and the ``bench``, ``export`` and ``sweep``
commands of their own modules (imported only when used).

Bad input of any kind (unknown names, values that do not fit, missing data, unreadable
checkpoints) ends with one line ``seedslot: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..candidates import SHARING
from ..checkpoints import CheckpointError
from .data import DATASETS, NORMALIZE
from .compiling import COMPILE
from .devices import DEVICE_HELP
from .allocator import return_large_frees
from ..models import MODELS, MODES
from ..storages import SCORES
from ..selection import SELECTION
from ..validate import check_int


__all__ = ["main"]

# commands whose module provides add_arguments(parser) and run_cli(args) (see _delegated): one-line help
_DELEGATED = {
    "bench": "memory, budget and speed benchmarks",
    "export": "write a trained checkpoint as seeds plus packed indices",
    "sweep": "run a grid of training runs",
}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (main prints them), not usage plus a message."""

    def error(self, message: str):
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODELS, default="lenet", help="network (default lenet)")
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist", help="dataset (default fashion-mnist)")
    p.add_argument("--data-dir", help="directory with the dataset files (default for fashion-mnist: "
                   "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--mode", choices=MODES, help="seeded (default), dense (paper's reference) or learned (baseline)")
    p.add_argument("--k", type=int, help="candidates per connection (default 8; slot modes)")
    p.add_argument("--selection", choices=SELECTION, help="default greedy")
    p.add_argument("--sharing", choices=SHARING, help="candidate sharing (default none)")
    p.add_argument("--scores", choices=SCORES,
                   help="score storage of mode seeded: int8 (default), fp32, or implicit (4 bytes per connection)")
    p.add_argument("--score-lambda", type=float, metavar="LAMBDA",
                   help="score init U(0, LAMBDA*sigma); default the paper's: 1 for conv, 0.1 for linear layers "
                   "(the authors' code uses 1 everywhere)")
    p.add_argument("--incremental", action="store_true",
                   help="with --scores implicit: re-select only the connections whose selection can have changed "
                   "(the same selections, 13 more bytes per connection)")
    p.add_argument("--epochs", type=int, help="default: the paper's for the model and selection")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--lr", type=float, help="default: the paper's for the mode, k and selection")
    p.add_argument("--momentum", type=float, help="default 0.9")
    p.add_argument("--weight-decay", type=float, help="default 1e-4 for vgg19, else 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normalize", choices=NORMALIZE, help="meanstd or unit ([0, 1] pixels); default per dataset")
    p.add_argument("--out", metavar="DIR", help="write last.ckpt, metrics.jsonl and summary.json here")
    p.add_argument("--json", metavar="PATH", help="write the run's summary here")
    p.add_argument("--random-selection", action="store_true",
                   help="evaluate one random candidate per connection (the paper's baseline), no training")
    p.add_argument("--finetune-from", metavar="CKPT", help="train the weights a slot checkpoint selected")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR/last.ckpt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a new run into a run's directory is refused)")
    p.add_argument("--checkpoint-every-steps", type=int, metavar="N", help="also save last.ckpt every N steps")
    p.add_argument("--limit-train", type=int, metavar="N", help="use only the first N training examples")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--compile", choices=COMPILE,
                   help="torch.compile the forward and the optimizer step in this mode (default off: eager); "
                        "reduce-overhead adds CUDA graphs on CUDA")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train on N local processes with DistributedDataParallel (gloo on CPU), "
                   "as `torchrun --nproc-per-node N -m seedslot train ...`")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    from .train import TrainConfig, resolve, run

    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)}
    if args.nproc is not None:
        check_int("nproc", args.nproc, 1)
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            from .distributed import check_batch_size, launch

            if args.resume is None:  # a bad argument is one error before any process starts
                check_batch_size(resolve(TrainConfig(**fields)).batch_size, args.nproc)
            return launch(_without_nproc(argv), args.nproc)
    if args.epochs is None and args.resume is None and not args.random_selection \
            and os.environ.get("RANK", "0") == "0":  # one line, before anything else the run prints
        cfg = resolve(TrainConfig(**fields))
        print(f"seedslot train: no --epochs given: running the paper's full schedule, {cfg.epochs} epochs for "
              f"{cfg.model}{f' with {cfg.selection} selection' if cfg.selection else ''}; "
              "shorten it with --epochs N", flush=True)
    try:
        summary = run(TrainConfig(**fields), progress=not args.no_progress)
    except RuntimeError as e:  # a rank died or stalled: one line on the survivors, not a traceback
        import torch.distributed as dist

        from .distributed import collective_failure

        failure = collective_failure(e) if os.environ.get("WORLD_SIZE", "1") not in ("0", "1") else None
        if failure is None:
            raise
        status = _error(str(failure))
        if dist.is_available() and dist.is_initialized():
            # A process group that lost a rank cannot be torn down: gloo's threads still hold the
            # dead peer's pair and abort the interpreter at exit (SIGABRT). Leave without
            # finalisation; checkpoint and summary writes are atomic, nothing is half-written.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status
    if summary.get("diverged"):
        print(f"seedslot train: error: the run diverged ({summary['diverged_reason']}); summary and last finite "
              "checkpoint written", file=sys.stderr)
        return 1
    return 130 if summary["interrupted"] else 0


def _demo(args: argparse.Namespace) -> int:
    """Seeded (int8 and implicit scores) and dense reference Lenet-300-100 on Fashion-MNIST, same
    seed, side by side."""
    from .train import TrainConfig, run

    rows = []
    for name, mode, scores in (("int8", "seeded", "int8"), ("implicit", "seeded", "implicit"), ("dense", "dense", None)):
        print(f"\n== {name} ==", flush=True)
        cfg = TrainConfig(model="lenet", dataset="fashion-mnist", data_dir=args.data_dir, mode=mode, scores=scores,
                          k=args.k, epochs=args.epochs, seed=args.seed, threads=args.threads, device=args.device)
        rows.append((name, run(cfg, progress=not args.no_progress)))
    print(f"\nLenet-300-100 on Fashion-MNIST, K={args.k}, {args.epochs} epoch(s), seed {args.seed}; "
          "seconds include data loading and, for seeded, the first torch.compile of its kernels")
    print(f"{'scores':<9} {'test acc':>9} {'seconds':>8} {'state bytes':>13} {'bytes/conn':>11}")
    for name, s in rows:
        print(f"{name:<9} {s['test_accuracy']:>9.2%} {s['seconds']:>8.1f} {s['state_bytes']:>13,} "
              f"{s['bytes_per_connection']:>11.2f}")
    print("Expect a spread across seeds: after 1 epoch, seeds 0-9 of each mode spanned 3-5 points of test "
          "accuracy, and the three modes' means agreed within 0.2 points (README, Results: measured with "
          "`seedslot train --model lenet --dataset fashion-mnist --k 8 --epochs 1 --seed S`). Compare modes at one seed.")
    return 0


def _delegated(name: str):
    """The module behind a delegated command, imported now (``seedslot train`` never needs them)."""
    if name == "bench":
        from . import benchmarks as module
    elif name == "export":
        from . import export_cmd as module
    else:
        from . import sweep as module
    return module


def _parser() -> _Parser:
    from .. import __version__

    parser = _Parser(prog="seedslot", description="Slot Machine networks with seeded candidate weights.")
    parser.add_argument("--version", action="version", version=f"seedslot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_train_arguments(sub.add_parser("train", help="train a model (or evaluate a baseline)"))
    demo = sub.add_parser("demo", help="seeded int8 and implicit vs dense reference: 1 Lenet epoch on Fashion-MNIST")
    demo.add_argument("--data-dir", help="Fashion-MNIST directory (default /usr/share/datasets/fashion-mnist)")
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--k", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, metavar="N")
    demo.add_argument("--device", help=DEVICE_HELP)
    demo.add_argument("--no-progress", action="store_true")
    for name, help_text in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)  # parsed by its module, see main()
    return parser


def _error(message: str) -> int:
    print(f"seedslot: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``seedslot COMMAND ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return_large_frees()  # freed tensors go back to the OS: a run's peak is what it really needs
    try:
        if argv and argv[0] in _DELEGATED:
            module = _delegated(argv[0])
            parser = _Parser(prog=f"seedslot {argv[0]}", description=_DELEGATED[argv[0]])
            module.add_arguments(parser)
            return int(module.run_cli(parser.parse_args(argv[1:])) or 0)
        args = _parser().parse_args(argv)
        return _train(args, argv) if args.command == "train" else _demo(args)
    except _UsageError as e:
        return _error(str(e))
    except (CheckpointError, ValueError) as e:  # DataError is a ValueError
        return _error(str(e))
    except OSError as e:  # e.g. an unreadable checkpoint or an unwritable --out
        return _error(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except KeyboardInterrupt:
        print("seedslot: interrupted", file=sys.stderr)
        return 130
