"""``seedslot export CKPT --out FILE``: a training checkpoint as a compact export."""

from __future__ import annotations

import argparse
import os
import sys

from ..checkpoints import CHECKPOINT_MAGIC, CheckpointError, load_checkpoint, load_state_into
from ..export import export, size_report
from ..files import check_writable
from ..models import build_from_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``seedslot export CKPT --out FILE``."""
    parser.add_argument("checkpoint", help="training checkpoint written by `seedslot train`")
    parser.add_argument("--out", required=True, help="export file to write (e.g. model.slot)")


def _check_target(out: str, checkpoint: str) -> None:
    """ValueError when ``out`` is the checkpoint itself (under any name) or another training
    checkpoint: an export never replaces training state."""
    check_writable(out)  # before opening it: a FIFO would block
    try:
        if os.path.samefile(out, checkpoint):
            raise ValueError(f"out: {out} is the checkpoint being exported; pass another path (e.g. model.slot)")
        with open(out, "rb") as f:
            if f.read(len(CHECKPOINT_MAGIC)) == CHECKPOINT_MAGIC:
                raise ValueError(f"out: {out} holds a training checkpoint; an export does not replace one, pass "
                                 "another path (e.g. model.slot)")
    except FileNotFoundError:
        pass


def run_cli(args: argparse.Namespace) -> int:
    """Export a training checkpoint; a CheckpointError becomes one line on stderr and status 2."""
    try:
        payload = load_checkpoint(args.checkpoint)
        missing = [key for key in ("model", "build_args") if key not in payload]
        if missing:
            raise CheckpointError(f"{args.checkpoint}: not a training checkpoint: it has no {', '.join(missing)}")
        model = build_from_checkpoint(payload, args.checkpoint)
        try:
            load_state_into(model, payload["model"])
        except CheckpointError as e:
            raise CheckpointError(f"{args.checkpoint}: {e}") from None
        _check_target(args.out, args.checkpoint)
        written = export(model, args.out, build_args=payload["build_args"])
    except CheckpointError as e:
        print(f"seedslot export: error: {e}", file=sys.stderr)
        return 2
    dense = size_report(model)["fp32_bytes"]
    print(f"wrote {args.out}: {written} bytes, {written / dense:.1%} of the fp32 weights ({dense} bytes)")
    return 0
