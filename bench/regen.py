"""Candidates per second of the counter-based random function, fused (torch.compile) vs eager.

    python bench/regen.py [--layer 512,512,3,3] [--k 8] [--repeats 5] [--json PATH]

Materialises every candidate of one layer (as ``layer.candidates()`` does, chunk by chunk) and reports
the median rate over repeats, after a warm-up call that compiles the kernel.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from seedslot import candidates as C
from seedslot.ops import _torch as T
from seedslot.ops._chunks import FUSED_CHUNK_VALUES
from seedslot.rng import key32
from seedslot.app.benchmarks import median_seconds
from seedslot.files import atomic_write


def rate(fn, rows: int, k: int, repeats: int) -> float:
    """Candidates per second of ``fn`` (candidate_chunk's compiled or eager path), chunk by chunk
    into one preallocated buffer."""
    keys = C.stream_keys(1, C.Stream.CANDIDATES, k)[1]
    key, step = C.i32(key32(1, C.Stream.CANDIDATES, 0)), C.grid_step(0.01)
    chunk = max(1, FUSED_CHUNK_VALUES // k)
    out = torch.empty(rows, k)

    def once():
        for a in range(0, rows, chunk):
            b = min(rows, a + chunk)
            out[a:b] = fn(C.i32(a), b - a, 1, key, keys, step)

    return rows * k / median_seconds(once, repeats)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default="512,512,3,3", help="weight shape, comma separated")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = math.prod(int(s) for s in args.layer.split(","))
    result = {
        "layer": args.layer,
        "k": args.k,
        "threads": torch.get_num_threads(),
        "compiled_per_second": rate(T.candidate_chunk.compiled, rows, args.k, args.repeats),
        "eager_per_second": rate(T.candidate_chunk.eager, rows, args.k, max(1, args.repeats // 2)),
    }
    result["speedup"] = result["compiled_per_second"] / result["eager_per_second"]
    print(f"layer {args.layer}, K={args.k}, {result['threads']} threads")
    print(f"  compiled: {result['compiled_per_second'] / 1e6:8.0f} M candidates/s")
    print(f"  eager:    {result['eager_per_second'] / 1e6:8.0f} M candidates/s  (compiled is {result['speedup']:.1f}x)")
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
