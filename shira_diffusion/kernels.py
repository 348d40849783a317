"""The engine's memory-bound inner loops, batched over all weights: gather, scatter, exchange (scatter keeping
what was there), gather-add-scatter, grow-exchange (an exchange that also reads new originals), switch (restore
one adapter's positions and write another's, in one pass), decode (and the trainer's add-scatter of W0 + v).

A switch is a few million reads and writes at sorted random positions spread over ~100-1000 weights. torch's
CPU `index_select` / `scatter_` on a 1-D tensor run on one core with per-element index bookkeeping, and one
call per weight costs more than the work on small weights. Here one numba-compiled launch covers every
weight of an operation, cut into equal pieces of positions spread over the cores, and the fused
gather-add-scatter touches each cache line once instead of twice. Tensors reach the compiled loops as
(address, length) pairs: building numba typed lists of 160+ arrays per call cost as much as the work.
On GPUs (and without numba) the same operations run as torch ops, weight by weight.

Both paths compute the same bits: a write is `fp32(W0) + fp32(alpha) * delta` with the product rounded
before the sum (no fused multiply-add), cast once to the weight's dtype (fp64 weights sum in fp64).

Usage:
    backups, written, overflowed = gather_add_scatter([(weight, positions, deltas_fp32)], alpha)   # W[p] = W0[p] + alpha*d
    scatter([(weight, positions, backups[0])])                                          # exact restore
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

try:  # numba is a dependency; this keeps the package usable where it cannot be imported
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only on installs without numba
    numba = None

# numba's OpenMP layer shares the OpenMP runtime with torch and would change torch's thread count (and with it
# the bits of later convolutions); its own "workqueue" pool does not, unless the user chose a layer. That pool
# must not be entered from two Python threads at once: one lock serialises our kernels (memory-bound anyway).
if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
_LOCK = threading.Lock()
# Gather, scatter and exchange only copy (and compare) bits: every float type travels as the integer of its width
# (numba has no float16, and comparing bits tells a changed NaN or -0 apart).
_BITS = {torch.float32: np.int32, torch.float64: np.int64, torch.float16: np.int16, torch.bfloat16: np.int16,
         torch.int64: np.int64, torch.int32: np.int32}
# Exponent bits that are all ones exactly for inf / NaN, by delta dtype (checked on the raw bits).
_NONFINITE = {torch.float16: (np.int16, 0x7C00), torch.bfloat16: (np.int16, 0x7F80),
              torch.float32: (np.int32, 0x7F800000), torch.float64: (np.int64, 0x7FF0000000000000)}
_CHUNK = 1 << 15  # positions per parallel work item: big enough to amortise, small enough to balance
_PIECE = 1 << 12  # positions per piece of a switch: the lines they touch stay in cache between its two loops
_AHEAD = 16  # positions prefetched ahead in passes that read the weights (~25 % faster there on a 2-core EPYC)
ZERO_GAP, OUT_OF_RANGE, NONFINITE = 1, 2, 3  # decode problems: status[job] = (kind, index)

if numba is not None:

    def _compiled(**options):
        """numba.njit with its on-disk cache where one can be written, else compiled once per process."""

        def wrap(function):
            try:
                return numba.njit(cache=True, **options)(function)
            except RuntimeError:  # no writable cache location (read-only install and home directory)
                return numba.njit(**options)(function)

        return wrap

    @intrinsic
    def _pointer(typingctx, address, like):
        """A typed pointer to `address` (an int64 from `tensor.data_ptr()`); `like` gives the element type."""
        pointer = types.CPointer(like.dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer))

        return pointer(address, like), codegen

    @numba.njit(nogil=True, inline="always")
    def _view(address, count, like):
        return numba.carray(_pointer(address, like), count)

    @intrinsic
    def _prefetch(typingctx, array, index):
        """Ask for the cache line of `array[index]` ahead of its use (LLVM's prefetch, for writing, kept in all
        cache levels): the reads of a read-modify-write pass wait on memory far less when they are in flight."""

        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            data = context.make_array(array_type)(context, builder, args[0])
            pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]], wraparound=False)
            byte_pointer = ir.IntType(8).as_pointer()
            name = "llvm.prefetch.p0" if getattr(byte_pointer, "is_opaque", False) else "llvm.prefetch.p0i8"
            i32 = ir.IntType(32)
            function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), name)
            builder.call(function, [builder.bitcast(pointer, byte_pointer), ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return types.void(array, index), codegen

    # Slicing first and reading each index once into a local lets LLVM keep pointers in registers.
    @_compiled(parallel=True, nogil=True)
    def _copy(weights, positions, buffers, sizes, chunks, into_weights, wlike, ilike):
        # buffer[i] = weight[index[i]] (gather), or weight[index[i]] = buffer[i] (scatter) when into_weights.
        for c in numba.prange(chunks.shape[0]):
            job, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            weight = _view(weights[job], sizes[job, 1], wlike)
            index = _view(positions[job], sizes[job, 0], ilike)[start:stop]
            buffer = _view(buffers[job], sizes[job, 0], wlike)[start:stop]
            if into_weights:
                for i in range(stop - start):
                    weight[index[i]] = buffer[i]
            else:
                for i in range(stop - start):
                    if i + _AHEAD < stop - start:
                        _prefetch(weight, index[i + _AHEAD])
                    buffer[i] = weight[index[i]]

    @_compiled(parallel=True, nogil=True)
    def _exchange(weights, positions, buffers, expecteds, olds, sizes, chunks, changed, wlike, ilike):
        # The scatter, keeping what was there (read from the line the write brings in anyway) and flagging pieces
        # where that differs from what the caller expected there (bits compared: the types are integers).
        for c in numba.prange(chunks.shape[0]):
            job, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            weight = _view(weights[job], sizes[job, 1], wlike)
            index = _view(positions[job], sizes[job, 0], ilike)[start:stop]
            buffer = _view(buffers[job], sizes[job, 0], wlike)[start:stop]
            expected = _view(expecteds[job], sizes[job, 0], wlike)[start:stop]
            old = _view(olds[job], sizes[job, 0], wlike)[start:stop]
            differs = False
            for i in range(stop - start):
                if i + _AHEAD < stop - start:
                    _prefetch(weight, index[i + _AHEAD])
                at = index[i]
                value = weight[at]
                old[i] = value
                differs |= value != expected[i]
                weight[at] = buffer[i]
            changed[c] = differs

    @_compiled(parallel=True, nogil=True)
    def _grow_exchange(weights, positions, sums, expecteds, fresh, backups, olds, writtens, sizes, chunks, changed, overflows,
                       blike, flike, mlike, ilike):
        # fp32 weights only (the sum needs float arithmetic). At a fresh position the weight holds the original:
        # it goes into the backup (and the expected value) and `original + sum` is written (the original kept, and
        # the piece flagged, where that sum of finite values is not finite); elsewhere `sum` is the value, as in
        # _exchange. Two views of each weight: bits to compare exactly, floats to add.
        for c in numba.prange(chunks.shape[0]):
            job, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            bits = _view(weights[job], sizes[job, 1], blike)
            weight = _view(weights[job], sizes[job, 1], flike)
            index = _view(positions[job], sizes[job, 0], ilike)[start:stop]
            total = _view(sums[job], sizes[job, 0], flike)[start:stop]
            expected = _view(expecteds[job], sizes[job, 0], blike)[start:stop]
            new_here = _view(fresh[job], sizes[job, 0], mlike)[start:stop]
            backup = _view(backups[job], sizes[job, 0], blike)[start:stop]
            old = _view(olds[job], sizes[job, 0], blike)[start:stop]
            written = _view(writtens[job], sizes[job, 0], flike)[start:stop]
            differs = overflow = False
            for i in range(stop - start):
                if i + _AHEAD < stop - start:
                    _prefetch(weight, index[i + _AHEAD])
                at = index[i]
                old[i] = bits[at]
                if new_here[i]:
                    backup[i] = expected[i] = old[i]
                    original = weight[at]
                    value = original + total[i]  # no fastmath: the same bits as torch's fp32 add
                    if not np.isfinite(value) and np.isfinite(original):
                        overflow, value = True, original
                else:
                    differs |= old[i] != expected[i]
                    value = total[i]
                weight[at] = value
                written[i] = value
            changed[c] = differs
            overflows[c] = overflow

    @_compiled(parallel=True, nogil=True)
    def _switch(weights, leaving, backups, expecteds, olds, arriving, deltas, alphas, new_backups, writtens, sizes, pieces, changed,
                overflows, blike, flike, ilike):
        # Per piece (a range of one weight, small enough for the lines it touches to stay in cache): first the
        # leaving positions get their backup back (keeping what was there, compared with what was expected), then
        # the arriving ones get `original + alpha * delta`, reading the original where it was just restored (kept,
        # and the piece flagged, where that value from finite ones is not finite).
        for c in numba.prange(pieces.shape[0]):
            job = pieces[c, 0]
            i, i_stop, j, j_stop = pieces[c, 1], pieces[c, 2], pieces[c, 3], pieces[c, 4]
            bits = _view(weights[job], sizes[job, 2], blike)
            weight = _view(weights[job], sizes[job, 2], flike)
            out_at, back = _view(leaving[job], sizes[job, 0], ilike)[i:i_stop], _view(backups[job], sizes[job, 0], blike)[i:i_stop]
            expected, old = _view(expecteds[job], sizes[job, 0], blike)[i:i_stop], _view(olds[job], sizes[job, 0], blike)[i:i_stop]
            in_at, delta = _view(arriving[job], sizes[job, 1], ilike)[j:j_stop], _view(deltas[job], sizes[job, 1], flike)[j:j_stop]
            new_back, written = _view(new_backups[job], sizes[job, 1], flike)[j:j_stop], _view(writtens[job], sizes[job, 1], flike)[j:j_stop]
            alpha = alphas[job]
            differs = False
            for k in range(i_stop - i):
                if k + _AHEAD < i_stop - i:
                    _prefetch(weight, out_at[k + _AHEAD])
                at = out_at[k]
                value = bits[at]
                old[k] = value
                differs |= value != expected[k]
                bits[at] = back[k]
            overflow = False
            for k in range(j_stop - j):
                if k + _AHEAD < j_stop - j:
                    _prefetch(weight, in_at[k + _AHEAD])
                at = in_at[k]
                base = weight[at]
                new_back[k] = base
                value = base + alpha * delta[k]  # no fastmath: product rounded, then sum, as in torch
                if not np.isfinite(value) and np.isfinite(base):
                    overflow, value = True, base
                weight[at] = value
                written[k] = value
            changed[c] = differs
            overflows[c] = overflow

    @_compiled(nogil=True)
    def _pieces(leaving, arriving, sizes, first_row, rows, outside, piece, ilike):
        # Each job's two sorted position lists cut at every `piece`-th entry of the longer one (binary searches in
        # both), so the pieces of a switch are independent; a job whose ends fall outside its weight is reported.
        for job in range(sizes.shape[0]):
            n_out, n_in, numel = sizes[job, 0], sizes[job, 1], sizes[job, 2]
            out_at, in_at = _view(leaving[job], n_out, ilike), _view(arriving[job], n_in, ilike)
            if (n_out and (out_at[0] < 0 or out_at[n_out - 1] >= numel)) or (n_in and (in_at[0] < 0 or in_at[n_in - 1] >= numel)):
                outside[0] = job
                return
            longer = out_at if n_out >= n_in else in_at
            i = j = 0
            for row in range(first_row[job], first_row[job + 1]):
                rows[row, 0], rows[row, 1], rows[row, 3] = job, i, j
                k = (row - first_row[job] + 1) * piece
                if row + 1 < first_row[job + 1]:
                    i, j = np.searchsorted(out_at, longer[k]), np.searchsorted(in_at, longer[k])
                else:
                    i, j = n_out, n_in
                rows[row, 2], rows[row, 4] = i, j

    @_compiled(parallel=True, nogil=True)
    def _merge(firsts, seconds, unions, first_slots, second_slots, onlys, sizes, counts, count_only, ilike, mlike):
        # Sorted unique lists merged in one linear walk per job: the union, where each entry of either landed, and
        # which union entries only the second list has.
        for job in numba.prange(sizes.shape[0]):
            n, m = sizes[job, 0], sizes[job, 1]
            first, second = _view(firsts[job], n, ilike), _view(seconds[job], m, ilike)
            i = j = k = 0
            if count_only:
                while i < n and j < m:
                    step_first, step_second = first[i] <= second[j], second[j] <= first[i]
                    i += step_first
                    j += step_second
                    k += 1
                counts[job] = k + (n - i) + (m - j)
                continue
            union, only = _view(unions[job], counts[job], ilike), _view(onlys[job], counts[job], mlike)
            at_first, at_second = _view(first_slots[job], n, ilike), _view(second_slots[job], m, ilike)
            while i < n or j < m:
                if j >= m or (i < n and first[i] < second[j]):
                    union[k], at_first[i], only[k] = first[i], k, 0
                    i += 1
                elif i >= n or second[j] < first[i]:
                    union[k], at_second[j], only[k] = second[j], k, 1
                    j += 1
                else:
                    union[k], at_first[i], at_second[j], only[k] = first[i], k, k, 0
                    i += 1
                    j += 1
                k += 1

    @_compiled(parallel=True, nogil=True)
    def _gather_add_scatter(weights, positions, deltas, backups, writtens, sizes, chunks, alpha, overflows, wlike, ilike):
        # Where `W0 + alpha * delta` from finite values is not finite, W0 stays and the chunk is flagged.
        for c in numba.prange(chunks.shape[0]):
            job, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            weight = _view(weights[job], sizes[job, 1], wlike)
            index = _view(positions[job], sizes[job, 0], ilike)[start:stop]
            delta = _view(deltas[job], sizes[job, 0], wlike)[start:stop]
            backup = _view(backups[job], sizes[job, 0], wlike)[start:stop]
            written = _view(writtens[job], sizes[job, 0], wlike)[start:stop]
            overflow = False
            for i in range(stop - start):
                if i + _AHEAD < stop - start:
                    _prefetch(weight, index[i + _AHEAD])
                at = index[i]
                old = weight[at]
                backup[i] = old
                new = old + alpha * delta[i]  # no fastmath: product rounded, then sum, as in torch
                if not np.isfinite(new) and np.isfinite(old):
                    overflow, new = True, old
                weight[at] = new
                written[i] = new
            overflows[c] = overflow

    @_compiled(parallel=True, nogil=True)
    def _add_scatter(weights, positions, bases, values, sizes, chunks, wlike, ilike):
        for c in numba.prange(chunks.shape[0]):
            job, start, stop = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            weight = _view(weights[job], sizes[job, 1], wlike)
            index = _view(positions[job], sizes[job, 0], ilike)[start:stop]
            base = _view(bases[job], sizes[job, 0], wlike)[start:stop]
            value = _view(values[job], sizes[job, 0], wlike)[start:stop]
            for i in range(stop - start):
                weight[index[i]] = base[i] + value[i]

    @_compiled(parallel=True, nogil=True)
    def _decode(gaps, hi_index, hi, deltas, outs, sizes, status, mask, glike, hlike, dlike, ilike):
        for job in numba.prange(sizes.shape[0]):
            count, numel, n_hi = sizes[job, 0], sizes[job, 1], sizes[job, 2]
            gap16, delta = _view(gaps[job], count, glike), _view(deltas[job], count, dlike)
            hi_at, hi_bits, out = _view(hi_index[job], n_hi, hlike), _view(hi[job], n_hi, hlike), _view(outs[job], count, ilike)
            position, next_hi = -1, 0
            for i in range(count):
                gap = np.int64(gap16[i]) & 0xFFFF
                if next_hi < n_hi and hi_at[next_hi] == i:
                    gap += np.int64(hi_bits[next_hi]) << 16
                    next_hi += 1
                if gap == 0:
                    status[job, 0], status[job, 1] = ZERO_GAP, i
                    break
                if (delta[i] & mask) == mask:
                    status[job, 0], status[job, 1] = NONFINITE, i
                    break
                position += gap  # < numel + 2**47: cannot overflow, as the loop stops at the first one out of range
                if position >= numel:
                    status[job, 0], status[job, 1] = OUT_OF_RANGE, position
                    break
                out[i] = position


def _addresses(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    return np.array([t.data_ptr() for t in tensors], dtype=np.int64)


def _like(dtype) -> np.ndarray:
    return np.empty(0, dtype=dtype)


def _check_bounds(weights: Sequence[torch.Tensor], positions: Sequence[torch.Tensor]) -> None:
    for weight, index in zip(weights, positions):
        # The compiled loops do not bounds-check; positions are sorted, so the ends suffice.
        if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= weight.numel()):
            raise IndexError(f"positions {int(index[0])}..{int(index[-1])} outside a weight of {weight.numel()} entries")


def _chunks(weights: Sequence[torch.Tensor], positions: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, chunks): per job (positions, weight entries), and rows (job, start, stop) of at most _CHUNK positions."""
    _check_bounds(weights, positions)
    sizes = np.array([(p.numel(), w.numel()) for w, p in zip(weights, positions)], dtype=np.int64).reshape(-1, 2)
    pieces = -(-sizes[:, 0] // _CHUNK)
    job = np.repeat(np.arange(len(sizes)), pieces)
    start = (np.arange(job.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * _CHUNK
    return sizes, np.stack([job, start, np.minimum(start + _CHUNK, sizes[job, 0])], axis=1)


@contextmanager
def _launch():
    """One launch at a time, on as many threads as torch may use; torch's own thread count left as it was."""
    with _LOCK:
        torch_threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            yield
        finally:
            if torch.get_num_threads() != torch_threads:  # a user-chosen OpenMP layer can change it
                torch.set_num_threads(torch_threads)


_INDEX = {torch.int64: np.int64, torch.int32: np.int32}  # position dtypes the compiled loops take


def _split(jobs: Sequence[tuple], fits) -> tuple[dict, list[int]]:
    """Job indices one compiled launch can take, grouped by (weight dtype, position dtype); the rest go to
    torch one by one."""
    groups: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    rest = []
    for i, job in enumerate(jobs):
        weight, positions = job[0], job[1]
        if (numba is not None and weight.dtype in _BITS and positions.dtype in _INDEX
                and all(t.device.type == "cpu" and t.is_contiguous() for t in job) and fits(*job)):
            groups.setdefault((weight.dtype, positions.dtype), []).append(i)
        else:
            rest.append(i)
    return groups, rest


def gather(jobs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """For each (weight, sorted int64 / int32 positions): `weight.view(-1)[positions]` as a new tensor."""
    flats = [(weight.view(-1), positions) for weight, positions in jobs]
    outs: list[torch.Tensor | None] = [None] * len(flats)
    groups, rest = _split(flats, lambda w, p: True)
    for i in rest:
        outs[i] = flats[i][0].index_select(0, flats[i][1])
    for (dtype, index_dtype), members in groups.items():
        weights, positions = [flats[i][0] for i in members], [flats[i][1] for i in members]
        results = [torch.empty(p.numel(), dtype=dtype) for p in positions]
        sizes, chunks = _chunks(weights, positions)
        with _launch():
            _copy(_addresses(weights), _addresses(positions), _addresses(results), sizes, chunks, False, _like(_BITS[dtype]),
                  _like(_INDEX[index_dtype]))
        for i, result in zip(members, results):
            outs[i] = result
    return outs


def scatter(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """For each (weight, sorted int64 / int32 positions, values in the weight's dtype): `weight.view(-1)[positions] = values`."""
    flats = [(weight.view(-1), positions, values.contiguous()) for weight, positions, values in jobs]
    groups, rest = _split(flats, lambda w, p, v: v.dtype == w.dtype and v.numel() == p.numel())
    for i in rest:
        flats[i][0].index_put_((flats[i][1],), flats[i][2])
    for (dtype, index_dtype), members in groups.items():
        weights, positions = [flats[i][0] for i in members], [flats[i][1] for i in members]
        values = [flats[i][2] for i in members]
        sizes, chunks = _chunks(weights, positions)
        with _launch():
            _copy(_addresses(weights), _addresses(positions), _addresses(values), sizes, chunks, True, _like(_BITS[dtype]),
                  _like(_INDEX[index_dtype]))


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The float tensor's bits as integers of its width (to compare values bit for bit: NaN-safe, -0 != +0)."""
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def kept_finite(values: torch.Tensor, originals: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`values` with the originals kept where a value is not finite but its original is (a write that overflowed
    the weight's dtype), and whether there was any: what the compiled loops do inline."""
    if bool(torch.isfinite(values).all()):
        return values, False
    overflowed = ~torch.isfinite(values) & torch.isfinite(originals)
    return torch.where(overflowed, originals.to(values.dtype), values), bool(overflowed.any())


def exchange(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[bool]]:
    """For each (weight, sorted positions, values, expected), values and expected in the weight's dtype: scatter the
    values; return what each weight held there before and whether that differed (in any bit) from `expected`."""
    flats = [(weight.view(-1), positions, values.contiguous(), expected.contiguous()) for weight, positions, values, expected in jobs]
    olds: list[torch.Tensor | None] = [None] * len(flats)
    changed = [False] * len(flats)
    groups, rest = _split(flats, lambda w, p, v, e: v.dtype == e.dtype == w.dtype and v.numel() == e.numel() == p.numel())
    differ = []  # flags stay on the device until every write is queued: one wait for the GPU, not one per weight
    for i in rest:
        weight, positions, values, expected = flats[i]
        olds[i] = weight.index_select(0, positions)
        differ.append((as_bits(olds[i]) != as_bits(expected)).any())
        weight.index_put_((positions,), values)
    for i, flag in zip(rest, differ):
        changed[i] = bool(flag)
    for (dtype, index_dtype), members in groups.items():
        weights, positions = [flats[i][0] for i in members], [flats[i][1] for i in members]
        values, expected = [flats[i][2] for i in members], [flats[i][3] for i in members]
        kept = [torch.empty(p.numel(), dtype=dtype) for p in positions]
        sizes, chunks = _chunks(weights, positions)
        flags = np.zeros(len(chunks), dtype=np.bool_)
        with _launch():
            _exchange(_addresses(weights), _addresses(positions), _addresses(values), _addresses(expected), _addresses(kept),
                      sizes, chunks, flags, _like(_BITS[dtype]), _like(_INDEX[index_dtype]))
        moved = set(chunks[flags, 0].tolist())
        for j, (i, old) in enumerate(zip(members, kept)):
            olds[i], changed[i] = old, j in moved
    return olds, changed


def grow_exchange(jobs: Sequence[tuple[torch.Tensor, ...]]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool], list[bool]]:
    """`exchange` where some positions are new to the caller (`fresh`): there the weight still holds its original,
    which is stored into `backup` and `expected` (in place) and `original + sum` written; elsewhere `sum` is the value.

    Each job: (weight, sorted positions, sums, expected, fresh, backup), `sums` in the accumulation dtype (fp32, fp64
    for fp64 weights), `expected` and `backup` in the weight's dtype, `fresh` bool. Every value is cast once to the
    weight's dtype. Returns (what each weight held there, what was written, whether any position that is not fresh
    differed from `expected`, whether some fresh `original + sum` from finite values was not finite: the original
    was kept there). One pass on CPU fp32 weights; otherwise gather, torch arithmetic, scatter (same bits).
    Usage: olds, written, changed, overflowed = grow_exchange([(weight, positions, sums, expected, fresh, backup)])
    """
    flats = [(weight.view(-1), *rest) for weight, *rest in jobs]
    olds: list[torch.Tensor | None] = [None] * len(flats)
    writtens: list[torch.Tensor | None] = [None] * len(flats)
    changed = [False] * len(flats)
    overflowed = [False] * len(flats)
    groups, rest = _split(flats, lambda w, p, s, e, f, b: w.dtype == s.dtype == e.dtype == b.dtype == torch.float32
                          and f.dtype == torch.bool and s.numel() == e.numel() == f.numel() == b.numel() == p.numel())
    if rest:
        gathered = gather([flats[i][:2] for i in rest])
        differ = []  # as in `exchange`: no boolean-mask indexing, no wait for the GPU per weight
        for i, old in zip(rest, gathered):
            weight, _, sums, expected, fresh, backup = flats[i]
            olds[i] = old
            values = torch.where(fresh, old.to(sums.dtype) + sums, sums).to(weight.dtype)
            writtens[i], overflowed[i] = kept_finite(values, torch.where(fresh, old, values))  # sums: checked by the caller
            differ.append(((as_bits(old) != as_bits(expected)) & ~fresh).any())
            backup.copy_(torch.where(fresh, old, backup))
            expected.copy_(torch.where(fresh, old, expected))
        scatter([(flats[i][0], flats[i][1], writtens[i]) for i in rest])
        for i, flag in zip(rest, differ):
            changed[i] = bool(flag)
    for (_, index_dtype), members in groups.items():
        weights, positions = [flats[i][0] for i in members], [flats[i][1] for i in members]
        sums, expected, fresh, backups = ([flats[i][k] for i in members] for k in (2, 3, 4, 5))
        kept = [torch.empty(p.numel(), dtype=torch.float32) for p in positions]
        written = [torch.empty(p.numel(), dtype=torch.float32) for p in positions]
        sizes, chunks = _chunks(weights, positions)
        flags = np.zeros(len(chunks), dtype=np.bool_)
        overflows = np.zeros(len(chunks), dtype=np.bool_)
        with _launch():
            _grow_exchange(_addresses(weights), _addresses(positions), _addresses(sums), _addresses(expected), _addresses(fresh),
                           _addresses(backups), _addresses(kept), _addresses(written), sizes, chunks, flags, overflows, _like(np.int32),
                           _like(np.float32), _like(np.uint8), _like(_INDEX[index_dtype]))
        moved, flagged = set(chunks[flags, 0].tolist()), set(chunks[overflows, 0].tolist())
        for j, (i, old, values) in enumerate(zip(members, kept, written)):
            olds[i], writtens[i], changed[i], overflowed[i] = old, values, j in moved, j in flagged
    return olds, writtens, changed, overflowed


def merge(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each (first, second), both sorted unique int64: (their sorted union, where each entry of `first` sits in it,
    where each entry of `second` sits in it, which union entries are not in `first`). One linear walk per pair on
    CPUs; torch elsewhere.
    Usage: union, first_slots, second_slots, new = merge([(old_positions, new_positions)])[0]
    """
    results: list[tuple | None] = [None] * len(pairs)
    members = [i for i, pair in enumerate(pairs) if numba is not None and all(
        t.device.type == "cpu" and t.dtype == torch.int64 and t.is_contiguous() for t in pair)]
    by_device: dict[torch.device, list[int]] = {}
    for i in sorted(set(range(len(pairs))) - set(members)):
        by_device.setdefault(pairs[i][0].device, []).append(i)
    for device, rest in by_device.items():
        # All pairs of a device in one sorted `unique`, each shifted into its own range (positions < 2**40):
        # a GPU waits twice (the sizes) instead of once per pair.
        shift = torch.arange(len(rest), device=device, dtype=torch.int64) << 40
        keys = torch.cat([side + shift[j] for j, i in enumerate(rest) for side in pairs[i]])
        unions = keys.unique(sorted=True)
        bounds = torch.searchsorted(unions, torch.cat([shift, shift[-1:] + (1 << 40)])).tolist()
        for j, i in enumerate(rest):
            first, second = pairs[i]
            union = unions[bounds[j]:bounds[j + 1]] - shift[j]
            first_slots = torch.searchsorted(union, first)
            only_second = torch.ones_like(union, dtype=torch.bool)
            only_second[first_slots] = False
            results[i] = (union, first_slots, torch.searchsorted(union, second), only_second)
    if members:
        firsts, seconds = [pairs[i][0] for i in members], [pairs[i][1] for i in members]
        sizes = np.array([(a.numel(), b.numel()) for a, b in zip(firsts, seconds)], dtype=np.int64).reshape(-1, 2)
        counts = np.zeros(len(members), dtype=np.int64)
        ilike, mlike = _like(np.int64), _like(np.uint8)
        with _launch():  # first the union sizes, then the merge into tensors of those sizes
            _merge(_addresses(firsts), _addresses(seconds), _addresses(firsts), _addresses(firsts), _addresses(seconds), _addresses(firsts),
                   sizes, counts, True, ilike, mlike)
        unions = [torch.empty(int(count), dtype=torch.int64) for count in counts]
        onlys = [torch.empty(int(count), dtype=torch.bool) for count in counts]
        first_slots, second_slots = [torch.empty_like(a) for a in firsts], [torch.empty_like(b) for b in seconds]
        with _launch():
            _merge(_addresses(firsts), _addresses(seconds), _addresses(unions), _addresses(first_slots), _addresses(second_slots),
                   _addresses(onlys), sizes, counts, False, ilike, mlike)
        for j, i in enumerate(members):
            results[i] = (unions[j], first_slots[j], second_slots[j], onlys[j])
    return results


def _merged_pieces(leaving: Sequence[torch.Tensor], arriving: Sequence[torch.Tensor], sizes: np.ndarray, index_dtype: torch.dtype) -> np.ndarray:
    """Rows (job, leaving start, stop, arriving start, stop): each job's two sorted lists cut at the same positions
    into pieces of about _PIECE positions (cut along the longer list), so pieces are independent. `sizes` rows:
    (leaving, arriving, weight entries). Raises IndexError, before anything is written, for positions outside
    their weight (the compiled loops do not bounds-check)."""
    longer = np.maximum(np.maximum(sizes[:, 0], sizes[:, 1]), 1)
    first_row = np.concatenate([[0], np.cumsum((longer - 1) // _PIECE + 1)])
    rows = np.empty((int(first_row[-1]), 5), dtype=np.int64)
    outside = np.full(1, -1, dtype=np.int64)
    _pieces(_addresses(leaving), _addresses(arriving), sizes, first_row, rows, outside, _PIECE, _like(_INDEX[index_dtype]))
    if outside[0] >= 0:
        job = int(outside[0])
        ends = [int(t[end]) for t in (leaving[job], arriving[job]) if t.numel() for end in (0, -1)]
        raise IndexError(f"positions {min(ends)}..{max(ends)} outside a weight of {int(sizes[job, 2])} entries")
    return rows


def switch(jobs: Sequence[tuple], alphas: Sequence[float]) -> tuple[list[torch.Tensor], list[bool], list[torch.Tensor], list[torch.Tensor], list[bool]]:
    """Swap one adapter for another on weights nothing else holds: per job (weight, leaving positions, their backup,
    what we last wrote there, arriving positions, fp32 deltas) restore the backups and write
    `original + alpha * delta` at the arriving positions (where a position is in both, the original is the backup).

    Returns (what the weight held at the leaving positions, whether that differed from what was expected, the
    originals at the arriving positions: their backup, the values written there, whether some value from finite ones
    was not finite: the original was kept there). One pass on CPU fp32 weights; otherwise `exchange` then
    `gather_add_scatter` (the same bits).
    Usage: olds, changed, backups, written, overflowed = switch([(weight, old_pos, backup, written, new_pos, deltas)], [1.0])
    """
    flats = [(weight.view(-1), *rest) for weight, *rest in jobs]
    olds: list[torch.Tensor | None] = [None] * len(flats)
    changed = [False] * len(flats)
    backups: list[torch.Tensor | None] = [None] * len(flats)
    writtens: list[torch.Tensor | None] = [None] * len(flats)
    overflowed = [False] * len(flats)
    groups, rest = _split(flats, lambda w, lp, b, e, ap, d: w.dtype == b.dtype == e.dtype == d.dtype == torch.float32
                          and lp.dtype == ap.dtype and b.numel() == e.numel() == lp.numel() and d.numel() == ap.numel())
    if rest:  # restore first, so arriving positions that were leaving ones read their original
        restored, flags = exchange([flats[i][:4] for i in rest])
        for i, old, flag in zip(rest, restored, flags):
            olds[i], changed[i] = old, flag
        by_alpha: dict[float, list[int]] = {}
        for i in rest:
            by_alpha.setdefault(alphas[i], []).append(i)
        for alpha, members in by_alpha.items():
            for i, backup, written, flag in zip(members, *gather_add_scatter([(flats[i][0], flats[i][4], flats[i][5]) for i in members], alpha)):
                backups[i], writtens[i], overflowed[i] = backup, written, flag
    for (_, index_dtype), members in groups.items():
        weights = [flats[i][0] for i in members]
        leaving, backup, expected, arriving, deltas = ([flats[i][k].contiguous() for i in members] for k in range(1, 6))
        kept = [torch.empty(p.numel(), dtype=torch.float32) for p in leaving]
        new_backups = [torch.empty(p.numel(), dtype=torch.float32) for p in arriving]
        written = [torch.empty(p.numel(), dtype=torch.float32) for p in arriving]
        sizes = np.array([(a.numel(), b.numel(), w.numel()) for a, b, w in zip(leaving, arriving, weights)], dtype=np.int64).reshape(-1, 3)
        pieces = _merged_pieces(leaving, arriving, sizes, index_dtype)
        flags = np.zeros(len(pieces), dtype=np.bool_)
        overflows = np.zeros(len(pieces), dtype=np.bool_)
        with _launch():
            _switch(_addresses(weights), _addresses(leaving), _addresses(backup), _addresses(expected), _addresses(kept),
                    _addresses(arriving), _addresses(deltas), np.array([alphas[i] for i in members], dtype=np.float32),
                    _addresses(new_backups), _addresses(written), sizes, pieces, flags, overflows, _like(np.int32), _like(np.float32),
                    _like(_INDEX[index_dtype]))
        moved, flagged = set(pieces[flags, 0].tolist()), set(pieces[overflows, 0].tolist())
        for j, i in enumerate(members):
            olds[i], changed[i], backups[i], writtens[i], overflowed[i] = kept[j], j in moved, new_backups[j], written[j], j in flagged
    return olds, changed, backups, writtens, overflowed


def gather_add_scatter(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], alpha: float) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
    """For each (weight, sorted positions, fp32 deltas): write `W0 + alpha * deltas` there; return (W0 there: the
    backups, the values written, both in the weight's dtype; whether some value from finite ones was not finite in
    the weight's dtype: there W0 was kept, so a caller undoes the rest with the backups).

    One pass on CPU fp32 weights; other dtypes and devices: gather, add in fp32, cast once, scatter (same bits).
    """
    flats = [(weight.view(-1), positions, deltas) for weight, positions, deltas in jobs]
    backups: list[torch.Tensor | None] = [None] * len(flats)
    writtens: list[torch.Tensor | None] = [None] * len(flats)
    overflowed = [False] * len(flats)
    groups, rest = _split(flats, lambda w, p, d: w.dtype == d.dtype == torch.float32 and d.numel() == p.numel())
    if rest:
        gathered = gather([flats[i][:2] for i in rest])
        for i, backup in zip(rest, gathered):
            sums = add_scaled(backup.to(torch.promote_types(backup.dtype, torch.float32), copy=True), flats[i][2], alpha)
            backups[i] = backup
            writtens[i], overflowed[i] = kept_finite(sums.to(backup.dtype), backup)
        scatter([(flats[i][0], flats[i][1], writtens[i]) for i in rest])
    for (_, index_dtype), members in groups.items():
        weights, positions = [flats[i][0] for i in members], [flats[i][1] for i in members]
        deltas = [flats[i][2] for i in members]
        results = [torch.empty(p.numel(), dtype=torch.float32) for p in positions]
        written = [torch.empty(p.numel(), dtype=torch.float32) for p in positions]
        sizes, chunks = _chunks(weights, positions)
        flags = np.zeros(len(chunks), dtype=np.bool_)
        with _launch():
            _gather_add_scatter(_addresses(weights), _addresses(positions), _addresses(deltas), _addresses(results), _addresses(written),
                                sizes, chunks, np.float32(alpha), flags, _like(np.float32), _like(_INDEX[index_dtype]))
        flagged = set(chunks[flags, 0].tolist())
        for j, (i, result, values) in enumerate(zip(members, results, written)):
            backups[i], writtens[i], overflowed[i] = result, values, j in flagged
    return backups, writtens, overflowed


def add_scatter(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """For each (weight, sorted positions, W0 there, values): `weight.view(-1)[positions] = W0 + values`, summed in
    fp32 (fp64 for fp64 weights) and rounded once to the weight's dtype (the trainer's W0 + v; one pass on CPU
    fp32 weights)."""
    flats = [(weight.view(-1), positions, bases, values) for weight, positions, bases, values in jobs]
    groups, rest = _split(flats, lambda w, p, b, v: w.dtype == b.dtype == v.dtype == torch.float32 and b.numel() == v.numel() == p.numel())
    if rest:
        sums = []
        for weight, _, bases, values in (flats[i] for i in rest):
            accumulate = torch.promote_types(weight.dtype, torch.float32)
            sums.append((bases.to(accumulate) + values.to(accumulate)).to(weight.dtype))
        scatter([(flats[i][0], flats[i][1], total) for i, total in zip(rest, sums)])
    for (_, index_dtype), members in groups.items():
        weights, positions = [flats[i][0] for i in members], [flats[i][1] for i in members]
        bases, values = [flats[i][2] for i in members], [flats[i][3] for i in members]
        sizes, chunks = _chunks(weights, positions)
        with _launch():
            _add_scatter(_addresses(weights), _addresses(positions), _addresses(bases), _addresses(values), sizes, chunks,
                         _like(np.float32), _like(_INDEX[index_dtype]))


def add_scaled(values: torch.Tensor, deltas: torch.Tensor, alpha: float, slots: torch.Tensor | None = None) -> torch.Tensor:
    """`values[slots] += alpha * deltas` in fp32, in place; the product is rounded before the sum.

    (`add_(x, alpha=a)` would use a fused multiply-add on CPU and give other bits than the compiled loop.)
    """
    scaled = (deltas * alpha).to(values.dtype)  # the product rounded in fp32 (fp64 sums: widened exactly)
    if slots is None:
        return values.add_(scaled)
    return values.index_add_(0, slots, scaled)


def decode(jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Positions from gap-coded files, checked on the way, for many tensors in one launch.

    Each job: (uint16 gaps, int64 high-bit indices (increasing, in range), int64 high bits (>= 0), 1-D float
    deltas of the same length, entries in the weight). Returns the int64 positions and, per job, (0, 0) or
    (ZERO_GAP, gap index) / (OUT_OF_RANGE, the first position out of range) / (NONFINITE, delta index). Gaps >= 1 make
    positions sorted, unique and >= 0 by construction, so these are all the checks positions need.
    """
    outs = [torch.empty(gaps.numel(), dtype=torch.int64) for gaps, *_ in jobs]
    status = np.zeros((len(jobs), 2), dtype=np.int64)
    groups: dict[torch.dtype, list[int]] = {}
    for i, (_, _, _, deltas, _) in enumerate(jobs):
        groups.setdefault(deltas.dtype, []).append(i)
    for dtype, members in groups.items():
        compiled = [i for i in members if numba is not None and all(t.device.type == "cpu" for t in jobs[i][:4])]  # it reads CPU memory
        for i in sorted(set(members) - set(compiled)):
            outs[i], status[i] = _decode_torch(*jobs[i])
        if not compiled:
            continue
        members = compiled
        bits, mask = _NONFINITE[dtype]
        gaps = [jobs[i][0].contiguous() for i in members]
        hi_index, hi = [jobs[i][1].contiguous() for i in members], [jobs[i][2].contiguous() for i in members]
        deltas = [jobs[i][3].contiguous() for i in members]
        sizes = np.array([(g.numel(), jobs[i][4], h.numel()) for i, g, h in zip(members, gaps, hi_index)], dtype=np.int64).reshape(-1, 3)
        part = np.zeros((len(members), 2), dtype=np.int64)
        with _launch():
            _decode(_addresses(gaps), _addresses(hi_index), _addresses(hi), _addresses(deltas), _addresses([outs[i] for i in members]),
                    sizes, part, bits(mask), _like(np.uint16), _like(np.int64), _like(bits), _like(np.int64))
        status[members] = part
    return outs, [tuple(int(v) for v in row) for row in status]


def _decode_torch(gaps: torch.Tensor, hi_index: torch.Tensor, hi: torch.Tensor, deltas: torch.Tensor, numel: int):
    """`decode` for one job with torch ops (installs without numba): same positions, same first problem."""
    full = gaps.to(torch.int64)
    if hi_index.numel():
        full[hi_index] += hi << 16
    # Gaps are >= 0, so positions rise: clamping each gap to numel + 1 keeps the running sum from overflowing
    # without moving the first position that falls out of range (reported with its real value below).
    positions = torch.cumsum(full.clamp(max=numel + 1), 0) - 1
    outside = torch.nonzero(positions >= numel)
    problems = [(int(found[0]), kind) for found, kind in ((torch.nonzero(full == 0), ZERO_GAP),
                (torch.nonzero(~torch.isfinite(deltas)), NONFINITE), (outside, OUT_OF_RANGE)) if found.numel()]
    if problems:
        # the first by index, and at one index in the compiled loop's order: zero gap, non-finite, out of range
        index, kind = min(problems, key=lambda problem: (problem[0], (ZERO_GAP, NONFINITE, OUT_OF_RANGE).index(problem[1])))
        if kind == OUT_OF_RANGE:
            return positions, (kind, (int(positions[index - 1]) if index else -1) + int(full[index]))
        return positions, (kind, index)
    return positions, (0, 0)
