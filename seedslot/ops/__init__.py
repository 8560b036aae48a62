"""The op layer: every hot operation of seedslot, declared once, with a kernel per device.

Each operation on one chunk of connections is a ``torch.library`` custom op (``seedslot::...``)
with a fake (meta) implementation, so it is one opaque node with known shapes inside a user's
``torch.compile`` graph. Its CPU kernel is torch (fused by ``torch.compile`` when enabled), or
numba where that is faster; its CUDA kernel the Triton kernel, or the torch one where triton is
missing or disabled. Both give the same bits (the tests check every pair). The functions below
take whole layer parts and run the ops chunk by chunk (one chunk where a Triton kernel runs: it
makes no (rows, K) temporary). Everything here takes tensors and small named tuples, never a layer;
every value that changes between steps (keys, offsets, rates) is a 0-dim tensor, so a new value
never recompiles a kernel.

Nothing outside this package looks at devices, compilation, numba or Triton.

========================  ==========================================================
op                        what one call computes, for connections ``start, start+1, ...``
========================  ==========================================================
``candidates``            the K candidates of ``n`` connections: (n, K) fp32
``selected``              the candidate ``idx[i]`` of each connection: (n,) fp32
``greedy``                argmax of (n, K) int8/fp32 scores, the lowest index on ties
``packed_greedy``         greedy index and selected value of int8 levels read as packed words
``sample``                a Gumbel-max draw from softmax(scores * scale)
``int8_update``           the int8 levels after one stochastically rounded update
``fp32_update``           fp32 scores after one update
``requantize``            int8 levels on a coarser grid, rounded stochastically (in place)
``int8_update_group``     zero, requantize and update the levels of a list of parts (in place)
``fp32_update_group``     decay and update the fp32 scores of a list of parts (in place)
``implicit_scores``       the implicit scores ``c * s0 - A * W``: (n, K) fp32
``implicit_greedy``       their greedy index and selected value, without the (n, K) scores
``incremental_greedy``    re-selection, in place, of the cached connections that went stale
========================  ==========================================================
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.library import custom_op

from . import _backends
from . import _torch as T
from ._backends import compile_enabled, runs_triton
from ._chunks import chunked, chunked_new, constants, i32, row_chunks

__all__ = ["backends", "CandidateKeys", "InitialScoreKeys", "i32", "constants", "candidate_values", "selected_values", "initial_scores",
           "greedy", "greedy_values", "sample", "int8_update_", "fp32_update_", "requantize_", "packs_parts",
           "int8_update_group_", "fp32_update_group_", "implicit_scores",
           "implicit_greedy", "implicit_sample", "incremental_applies", "incremental_greedy", "INCREMENTAL_REBUILD_SHARE"]


class CandidateKeys(NamedTuple):
    """What regenerates a layer's candidates, in the order the kernels take it (after ``start``)."""

    per_conn: int  # 1, or 0 when candidates are shared
    key: torch.Tensor  # 0-dim int32 key_a of the candidate stream
    keys: torch.Tensor  # (K,) int32 keys_b
    step: torch.Tensor  # 0-dim fp32 grid step


class InitialScoreKeys(NamedTuple):
    """What regenerates a layer's initial scores s0 (implicit scores), as the kernels take it."""

    key: torch.Tensor  # 0-dim int32 key_a of the initial-score stream
    keys: torch.Tensor  # (K,) int32 keys_b
    bound: torch.Tensor  # 0-dim fp32 lambda * sigma


# ---------------------------------------------------------------- declaring an op


def _declare(name: str, schema: str, cpu, cuda, fake, mutates: tuple[str, ...] = ()):
    """The custom op ``seedslot::name``: ``cpu`` its default kernel (the CPU and any device without
    its own), ``cuda`` the CUDA one, ``fake`` what it returns on fake tensors (shapes, dtypes)."""

    def default(*args):
        return (cuda if _backends.cuda_kernels_on_cpu else cpu)(*args)

    default.__name__ = name
    op = custom_op(f"seedslot::{name}", default, mutates_args=mutates, schema=schema)
    op.register_kernel("cuda", cuda)
    op.register_fake(fake)
    return op


def _fused_op(name: str, schema: str, kernel, fake):
    """An op whose CPU kernel is one torch kernel and whose CUDA kernel is its Triton twin."""
    return _declare(name, schema, kernel, kernel.cuda, fake)


_KEYS = "int per_conn, Tensor key_a, Tensor keys_b, Tensor step"
_IMPLICIT = ("Tensor drift, Tensor factor, Tensor start, int per_conn, Tensor cand_key, Tensor cand_keys, Tensor step, "
             "Tensor score_key, Tensor score_keys, Tensor bound")


def _rows_like(t: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return t.new_empty(t.shape[0], k, dtype=dtype)


_candidates = _fused_op(
    "candidates", f"(Tensor start, int n, {_KEYS}) -> Tensor", T.candidate_chunk,
    lambda start, n, per_conn, key_a, keys_b, step: keys_b.new_empty(n, keys_b.shape[0], dtype=torch.float32))

_selected = _fused_op(
    "selected", f"(Tensor idx, Tensor start, {_KEYS}) -> Tensor", T.selected_chunk,
    lambda idx, start, per_conn, key_a, keys_b, step: keys_b.new_empty(idx.shape[0], dtype=torch.float32))


def _greedy_cpu(scores):
    # fused, an elementwise pass over packed words beats inductor's argmax; eager, argmax is faster
    words = T.packed_words(scores) if compile_enabled() else None
    return scores.argmax(dim=-1) if words is None else T.packed_argmax(words)


def _greedy_cuda(scores):
    if scores.dtype in (torch.int8, torch.float32) and scores.dim() == 2 and _backends.triton_on():
        return T.argmax_rows.cuda(scores)  # one Triton kernel, any K
    return _greedy_cpu(scores)


_greedy = _declare("greedy", "(Tensor scores) -> Tensor", _greedy_cpu, _greedy_cuda,
                   lambda scores: scores.new_empty(scores.shape[:-1], dtype=torch.int64))

_packed_greedy = _declare(
    "packed_greedy", f"(Tensor words, Tensor start, {_KEYS}) -> (Tensor, Tensor)", T.packed_greedy, T.packed_greedy,
    lambda words, *_: (words.new_empty(words.shape[0], dtype=torch.int64),
                       words.new_empty(words.shape[0], dtype=torch.float32)))

_sample = _fused_op(
    "sample", "(Tensor scores, Tensor scale, Tensor start, Tensor key_a, Tensor keys_b) -> Tensor", T.sample_chunk,
    lambda scores, *_: scores.new_empty(scores.shape[0], dtype=torch.int64))


def _int8_update_cpu(q, d, coef, start, per_conn, key_a, keys_b, step, round_a, round_b):
    """One of the int8 update's torch forms, by K and layout (all give the same bits)."""
    if q.shape[1] > T.UNROLL_MAX_K:  # the per-connection hashes once, then the (n, K) form
        hc, hr, dc = T.connection_hashes(d, coef, start, per_conn, key_a, round_a)
        return T.int8_update_hashed(q, hc, hr, dc, keys_b, step, round_b)
    words = T.packed_words(q)  # one word per connection
    if words is not None:
        words = T.int8_update_packed(words.view(-1), d, coef, start, per_conn, key_a, keys_b, step, round_a, round_b)
        return words.view(torch.int8).view(q.shape)
    return T.int8_update_unrolled(q, d, coef, start, per_conn, key_a, keys_b, step, round_a, round_b)


def _int8_update_cuda(q, d, coef, start, per_conn, key_a, keys_b, step, round_a, round_b):
    if _backends.triton_on():  # one Triton kernel for any K
        return T.int8_update_rows.cuda(q, d, coef, start, per_conn, key_a, keys_b, step, round_a, round_b)
    return _int8_update_cpu(q, d, coef, start, per_conn, key_a, keys_b, step, round_a, round_b)


_int8_update = _declare(
    "int8_update", f"(Tensor q, Tensor d, Tensor coef, Tensor start, {_KEYS}, Tensor round_a, Tensor round_b) -> Tensor",
    _int8_update_cpu, _int8_update_cuda, lambda q, *_: torch.empty_like(q, memory_format=torch.contiguous_format))

_fp32_update = _fused_op(
    "fp32_update", f"(Tensor s, Tensor d, Tensor neg_lr, Tensor start, {_KEYS}) -> Tensor", T.fp32_update_chunk,
    lambda s, *_: torch.empty_like(s, memory_format=torch.contiguous_format))

def _requantize_cpu(q, inv_factor, start, round_a, round_b):
    if float(inv_factor) == 1.0:  # a CPU value: no device read, and nothing to do
        return
    q.copy_(T.requantize_chunk(q, inv_factor, start, round_a, round_b))


def _requantize_cuda(q, inv_factor, start, round_a, round_b):
    if _backends.triton_on() and q.is_contiguous():  # the kernel reads the factor: no work at 1
        from ._triton import requantize_rows_
        requantize_rows_(q, inv_factor, start, round_a, round_b)
    else:
        q.copy_(T.requantize_chunk(q, inv_factor, start, round_a, round_b))


# in place: the int8 update requantises at every step whatever the factor its device decided
_requantize = _declare(
    "requantize", "(Tensor(a!) q, Tensor inv_factor, Tensor start, Tensor round_a, Tensor round_b) -> ()",
    _requantize_cpu, _requantize_cuda, lambda *_: None, mutates=("q",))


def _packed_or(name: str, cpu):
    """The CUDA kernel of a group op: the packed Triton function ``name`` (one launch per column
    tile width, whatever the number of parts) while Triton is on, else ``cpu``, part after part."""

    def cuda(*args):
        if _backends.triton_on():
            from . import _triton
            return getattr(_triton, name)(*args)
        return cpu(*args)

    return cuda


def _int8_group_cpu(q, d, coef, inv, zero, requant_keys, round_keys, offsets, per_conn, key_a, keys_b, step, round_b):
    """The group update as the per-part ops, part after part (what the packed kernel equals)."""
    for i, (qi, di) in enumerate(zip(q, d.split([t.shape[0] for t in q]))):
        if zero is not None:
            qi.masked_fill_(zero[i], 0)
        requantize_(qi, inv[i], offsets[i], requant_keys[i], round_b[i])
        int8_update_(qi, di, coef[i], offsets[i], CandidateKeys(per_conn[i], key_a[i], keys_b[i], step[i]),
                     round_keys[i], round_b[i])


_int8_group = _declare(
    "int8_update_group",
    "(Tensor(a!)[] q, Tensor d, Tensor coef, Tensor inv, Tensor? zero, Tensor requant_keys, Tensor round_keys, "
    "int[] offsets, int[] per_conn, Tensor[] key_a, Tensor[] keys_b, Tensor[] step, Tensor[] round_b) -> ()",
    _int8_group_cpu, _packed_or("int8_update_group", _int8_group_cpu), lambda *_: None, mutates=("q",))


def _fp32_group_cpu(s, d, neg_lr, decay, offsets, per_conn, key_a, keys_b, step):
    for i, (si, di) in enumerate(zip(s, d.split([t.shape[0] for t in s]))):
        if decay is not None:
            si.mul_(decay)
        fp32_update_(si, di, neg_lr, offsets[i], CandidateKeys(per_conn[i], key_a[i], keys_b[i], step[i]))


_fp32_group = _declare(
    "fp32_update_group",
    "(Tensor(a!)[] s, Tensor d, Tensor neg_lr, Tensor? decay, int[] offsets, int[] per_conn, Tensor[] key_a, "
    "Tensor[] keys_b, Tensor[] step) -> ()",
    _fp32_group_cpu, _packed_or("fp32_update_group", _fp32_group_cpu), lambda *_: None, mutates=("s",))


_implicit_scores = _fused_op(
    "implicit_scores", f"({_IMPLICIT}) -> Tensor", T.implicit_chunk,
    lambda drift, factor, start, per_conn, cand_key, cand_keys, *_: _rows_like(drift, cand_keys.shape[0],
                                                                               torch.float32))


def _implicit_greedy_cpu(drift, factor, start, per_conn, cand_key, cand_keys, step, score_key, score_keys, bound):
    """Up to UNROLL_MAX_K candidates one at a time (no (n, K) tensor), above that the scores' argmax."""
    args = (drift, factor, start, per_conn, cand_key, cand_keys, step, score_key, score_keys, bound)
    if cand_keys.shape[0] <= T.UNROLL_MAX_K:
        return T.implicit_greedy_unrolled(*args)
    idx = T.implicit_chunk(*args).argmax(-1)
    return idx, T.selected_chunk(idx, start, per_conn, cand_key, cand_keys, step)


def _implicit_greedy_cuda(*args):
    if _backends.triton_on():  # one Triton kernel for any K
        return T.implicit_greedy_unrolled.cuda(*args)
    return _implicit_greedy_cpu(*args)


_implicit_greedy = _declare(
    "implicit_greedy", f"({_IMPLICIT}) -> (Tensor, Tensor)", _implicit_greedy_cpu, _implicit_greedy_cuda,
    lambda drift, *_: (drift.new_empty(drift.shape[0], dtype=torch.int64),
                       drift.new_empty(drift.shape[0], dtype=torch.float32)))


# ---------------------------------------------------------------- incremental re-selection

INCREMENTAL_REBUILD_SHARE = 0.25  # above this share of stale connections, re-select the part in chunks


def _reselect(drift, factor, sel, val, lo, hi, rows, offset, per_conn, cand_key, cand_keys, step, score_key,
              score_keys, bound) -> bool:
    """Re-select ``rows`` (all when None) into the cache; False (nothing changed) when a drift
    there is not finite."""
    at = (factor, per_conn, cand_key, cand_keys, step, score_key, score_keys, bound)
    if rows is None:
        if not bool(torch.isfinite(drift).all()):
            return False
        for a, b in row_chunks(drift.shape[0], cand_keys.shape[0], compile_enabled()):  # float64 (n, K) temporaries
            conn = torch.arange(offset + a, offset + b, dtype=torch.int32, device=drift.device)
            idx, v, l, h = T.implicit_select_at(drift[a:b], conn, *at)
            sel[a:b], val[a:b], lo[a:b], hi[a:b] = idx, v, l, h
        return True
    if rows.shape[0] == 1:  # as two equal rows: a compiled kernel for n = 1 would compile again
        rows = rows.expand(2)
    d = drift[rows]
    if not bool(torch.isfinite(d).all()):
        return False
    conn = (rows + offset).to(torch.int32)
    idx, v, l, h = T.implicit_select_at(d, conn, *at)
    sel[rows], val[rows], lo[rows], hi[rows] = idx.to(sel.dtype), v, l, h
    return True


def _incremental_cpu(drift, factor, lo, hi, sel, val, cand_key, cand_keys, step, score_key, score_keys, bound,
                     offset, per_conn) -> int:
    """How many connections were re-selected, or < 0 where the part must be recomputed in full."""
    twins = _backends.numba_kernels()
    if twins is not None:  # the scan and the re-selection in one pass, the same bits as below
        return twins.incremental_greedy(drift, factor, lo, hi, sel, val, cand_key, cand_keys, step, score_key,
                                        score_keys, bound, offset, per_conn)
    c = float(factor)
    if not (T.INCR_C_MIN <= c <= T.INCR_C_MAX):
        return -2
    drift = drift.view(-1)
    rows = T.incremental_stale_rows(drift, c, lo, hi)
    n = rows.shape[0]
    whole = n > INCREMENTAL_REBUILD_SHARE * drift.numel()
    if n and not _reselect(drift, factor, sel, val, lo, hi, None if whole else rows, offset, per_conn, cand_key,
                           cand_keys, step, score_key, score_keys, bound):
        return -1
    return n


def _incremental_cuda(*args) -> int:
    return -4  # no CUDA kernel yet: the caller recomputes the part


_incremental = _declare(
    "incremental_greedy",
    "(Tensor drift, Tensor factor, Tensor(a!) lo, Tensor(b!) hi, Tensor(c!) sel, Tensor(d!) val, Tensor cand_key, "
    "Tensor cand_keys, Tensor step, Tensor score_key, Tensor score_keys, Tensor bound, int offset, int per_conn) -> int",
    _incremental_cpu, _incremental_cuda, lambda *_: -4, mutates=("lo", "hi", "sel", "val"))


# ---------------------------------------------------------------- whole parts, chunk by chunk


def backends() -> dict[str, bool]:
    """What runs the kernels in this process: ``compile`` (torch.compile on the torch kernels),
    ``numba`` (the CPU's numba kernels), ``triton`` (the Triton kernels, on CUDA tensors)."""
    return dict(compile=compile_enabled(), numba=_backends.numba_kernels() is not None, triton=_backends.triton_on())


def _ranges(rows: int, k: int, like: torch.Tensor | None = None):
    """The chunks of a call over ``rows`` connections; one where ``like``'s kernels run as Triton."""
    return row_chunks(rows, k, compile_enabled(), whole=like is not None and runs_triton(like))


def candidate_values(rows: int, offset: int, ck: CandidateKeys, out: torch.Tensor | None = None) -> torch.Tensor:
    """All K candidates of connections ``offset .. offset+rows-1``: (rows, K) float32 (written
    into ``out`` when given)."""
    k, dev = ck.keys.shape[0], ck.keys.device
    if out is not None:
        return chunked(out, offset, _ranges(rows, k), lambda a, b, start: _candidates(start, b - a, *ck))
    return chunked_new(lambda: torch.empty(rows, k, dtype=torch.float32, device=dev), rows, offset, _ranges(rows, k),
                       dev, lambda a, b, start: _candidates(start, b - a, *ck))


def selected_values(idx: torch.Tensor, offset: int, ck: CandidateKeys) -> torch.Tensor:
    """The candidates ``idx`` (rows,) of connections ``offset ..``: (rows,) float32."""
    n, dev = idx.shape[0], idx.device
    return chunked_new(lambda: torch.empty(n, dtype=torch.float32, device=dev), n, offset, _ranges(n, 1, idx), dev,
                       lambda a, b, start: _selected(idx[a:b], start, *ck))


def initial_scores(rows: int, key_a: int, keys_b: torch.Tensor, bound: float, offset: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Initial scores (rows, K) of connections ``offset..``: ``U(0, bound)`` in fp32 (the top 24
    bits of each draw), or int8 levels 0..127 (its top 7 bits: the fp32 scores quantised to
    ``bound / 127``). Made once per layer: eager torch, chunk by chunk."""
    k, device = keys_b.shape[0], keys_b.device
    out = torch.empty(rows, k, dtype=dtype, device=device)
    top = torch.tensor(bound, dtype=torch.float32)
    for a, b in _ranges(rows, k):
        r = T.bits(T.connections(offset + a, b - a, 1, device), key_a, keys_b)
        if dtype == torch.int8:
            out[a:b] = ((r >> 25) & 0x7F).to(torch.int8)
        else:
            out[a:b] = T.unit24(r) * top.to(device)
    return out


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """(n, K) scores -> (n,) int64 index of the best score, the lowest index on ties."""
    return _greedy(scores.detach())


def greedy_values(scores: torch.Tensor, offset: int, ck: CandidateKeys) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(n, K) int8 levels of connections ``offset..`` -> ``(index, value)``: :func:`greedy`'s index
    and the selected candidate in one pass over packed words; None where that pass is not the
    faster (eager kernels, Triton, K > 8) or the levels cannot be read as words."""
    # up to K = 8 (one word): above, the kernel unrolled over K lanes costs compile time and memory
    # in proportion to K, for a pass that is small next to the update's
    if not compile_enabled() or scores.shape[-1] > 8 or runs_triton(scores):
        return None
    words = T.packed_words(scores)
    if words is None:
        return None
    n, dev = scores.shape[0], scores.device
    return chunked_new(lambda: (torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, device=dev)),
                       n, offset, _ranges(n, scores.shape[1]), dev,
                       lambda a, b, start: _packed_greedy(words[a:b], start, *ck))


def sample(scores: torch.Tensor, scale, offset: int, key_a: torch.Tensor, keys_b: torch.Tensor) -> torch.Tensor:
    """(n, K) scores of connections ``offset..`` -> (n,) int64 draws from softmax(scores*scale);
    ``scale`` a number or a 0-dim tensor."""
    n, dev = scores.shape[0], scores.device
    scores = scores.detach()
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=dev)
    return chunked_new(lambda: torch.empty(n, dtype=torch.int64, device=dev), n, offset,
                       _ranges(n, scores.shape[1], scores), dev,
                       lambda a, b, start: _sample(scores[a:b], scale_t, start, key_a, keys_b))


def int8_update_(scores: torch.Tensor, d: torch.Tensor, coef: torch.Tensor, offset: int, ck: CandidateKeys,
                 round_a: torch.Tensor, round_b: torch.Tensor) -> None:
    """``scores`` (rows, K) int8 levels after ``q + d * coef * W + r``, floored and re-centred, in
    place (``coef`` = -lr / scale, ``r`` from the rounding keys)."""
    chunked(scores, offset, _ranges(scores.shape[0], scores.shape[1], d),
            lambda a, b, start: _int8_update(scores[a:b], d[a:b], coef, start, *ck, round_a, round_b))


def fp32_update_(scores: torch.Tensor, d: torch.Tensor, neg_lr: torch.Tensor, offset: int, ck: CandidateKeys) -> None:
    """``scores += neg_lr * d * W``, in place, for (rows, K) fp32 scores."""
    chunked(scores, offset, _ranges(scores.shape[0], scores.shape[1], d),
            lambda a, b, start: _fp32_update(scores[a:b], d[a:b], neg_lr, start, *ck))


def requantize_(scores: torch.Tensor, inv_factor: torch.Tensor, offset: int, round_a: torch.Tensor,
                round_b: torch.Tensor) -> None:
    """int8 levels on a grid ``1 / inv_factor`` times coarser, rounded stochastically, in place;
    unchanged, at no cost, where the 0-dim ``inv_factor`` is 1 (read by the kernel, not the host)."""
    for a, b in _ranges(scores.shape[0], scores.shape[1], scores):
        _requantize(scores[a:b], inv_factor, i32(offset + a, scores.device), round_a, round_b)


def packs_parts(scores: list[torch.Tensor]) -> bool:
    """Whether :func:`int8_update_group_` and :func:`fp32_update_group_` update these parts by
    packed launches (Triton kernels over a table of the parts, contiguous scores), not part by part."""
    return bool(scores) and runs_triton(scores[0]) and all(s.is_contiguous() for s in scores)


def _unzip(cks: list[CandidateKeys]) -> tuple[list, list, list, list]:
    return ([c.per_conn for c in cks], [c.key for c in cks], [c.keys for c in cks], [c.step for c in cks])


def int8_update_group_(scores: list[torch.Tensor], d: torch.Tensor, coef: torch.Tensor, inv: torch.Tensor,
                       zero: torch.Tensor | None, requant_keys: torch.Tensor, round_keys: torch.Tensor,
                       offsets: list[int], cks: list[CandidateKeys], round_b: list[torch.Tensor]) -> None:
    """For every part ``i`` of ``scores`` ((rows, K) int8 levels), in place: levels zeroed where
    ``zero[i]``, :func:`requantize_` by ``inv[i]`` (keys ``requant_keys[i]``), then
    :func:`int8_update_` with ``coef[i]`` (keys ``round_keys[i]``); ``d`` the parts' directions
    concatenated, the vectors one value per part. Where :func:`packs_parts`, a number of launches
    that does not grow with the number of parts."""
    _int8_group(scores, d, coef, inv, zero, requant_keys, round_keys, offsets, *_unzip(cks), round_b)


def fp32_update_group_(scores: list[torch.Tensor], d: torch.Tensor, neg_lr: torch.Tensor, decay: torch.Tensor | None,
                       offsets: list[int], cks: list[CandidateKeys]) -> None:
    """For every part of ``scores`` ((rows, K) fp32), in place: multiplied by the 0-dim ``decay``
    (None: not), then :func:`fp32_update_`; ``d`` the parts' directions concatenated. Where
    :func:`packs_parts`, a number of launches that does not grow with the number of parts."""
    _fp32_group(scores, d, neg_lr, decay, offsets, *_unzip(cks))


def implicit_scores(drift: torch.Tensor, factor: torch.Tensor, offset: int, ck: CandidateKeys,
                    sk: InitialScoreKeys) -> torch.Tensor:
    """(n, K) fp32 implicit scores ``c * s0 - A * W`` of the (n,) drift ``A`` of connections ``offset..``."""
    n, k, dev = drift.shape[0], ck.keys.shape[0], drift.device
    return chunked_new(lambda: torch.empty(n, k, device=dev), n, offset, _ranges(n, k), dev,
                       lambda a, b, start: _implicit_scores(drift[a:b], factor, start, *ck, *sk))


def implicit_greedy(drift: torch.Tensor, factor: torch.Tensor, offset: int, ck: CandidateKeys,
                    sk: InitialScoreKeys) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, value)``: the (n,) int64 argmax of :func:`implicit_scores` (lowest index on ties)
    and the (n,) fp32 candidate there."""
    n, dev = drift.shape[0], drift.device
    return chunked_new(lambda: (torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, device=dev)),
                       n, offset, _ranges(n, ck.keys.shape[0], drift), dev,
                       lambda a, b, start: _implicit_greedy(drift[a:b], factor, start, *ck, *sk))


def implicit_sample(drift: torch.Tensor, factor: torch.Tensor, offset: int, ck: CandidateKeys, sk: InitialScoreKeys,
                    key: torch.Tensor, sample_keys: torch.Tensor) -> torch.Tensor:
    """A Gumbel-max draw from softmax(implicit scores), as :func:`sample` draws from stored ones."""
    n, dev = drift.shape[0], drift.device
    one = torch.ones((), device=dev)
    return chunked_new(lambda: torch.empty(n, dtype=torch.int64, device=dev), n, offset, _ranges(n, ck.keys.shape[0]),
                       dev, lambda a, b, start: _sample(_implicit_scores(drift[a:b], factor, start, *ck, *sk), one,
                                                        start, key, sample_keys))


def incremental_applies(drift: torch.Tensor) -> bool:
    """Whether :func:`incremental_greedy` can answer for ``drift``: it has a kernel on its device
    (the CPU), and runs outside a torch.compile trace (whose graph recomputes the part in full)."""
    return drift.device.type == "cpu" and not torch.compiler.is_compiling()


def incremental_greedy(drift: torch.Tensor, factor: torch.Tensor, sel: torch.Tensor, val: torch.Tensor,
                       lo: torch.Tensor, hi: torch.Tensor, offset: int, ck: CandidateKeys, sk: InitialScoreKeys) -> bool:
    """Re-select, in place, the connections of a part whose ratio ``drift / factor`` left its cached
    interval (``sel``, ``val``, ``lo``, ``hi``: index, value and interval per connection). False
    where the cache cannot answer (inside a torch.compile trace, on a device without a kernel, a
    factor out of range, a non-finite drift): then the caller recomputes the part in full."""
    if not incremental_applies(drift):
        return False
    return _incremental(drift, factor, lo, hi, sel, val, ck.key, ck.keys, ck.step, sk.key, sk.keys, sk.bound,
                        offset, ck.per_conn) >= 0
