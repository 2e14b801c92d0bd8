"""numba kernels of the 3LC codec: arrays in, arrays out, no state, no validation.

The wrappers in :mod:`threelc.codec` validate arguments and allocate outputs; the kernels trust
them, except for the one thing a wrapper cannot check cheaply: the coded body of a payload from
another machine.  :func:`decode_chunks` bounds-checks every read and write itself, because numba
does not.

Values are coded in independent chunks of ``chunk`` values (a multiple of 5), so encoding and
decoding run one chunk per thread (``prange``); every iteration writes only its own output.
All kernels release the GIL (``nogil``) so the DDP hook can run them off the autograd thread.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["compute_scales", "encode_chunks", "gather_chunks", "decode_chunks", "piece_bounds"]

_FLT_MAX = np.float64(np.finfo(np.float32).max)
_ZERO_GROUP = 121  # five zero digits: 81 + 27 + 9 + 3 + 1
_RUN_BASE = 241  # a run of k zero groups (2 <= k <= 14) codes as 241 + k
_MAX_RUN = 14

# _Q_TABLE[5 * byte + j] is the ternary value (-1, 0, +1) of digit j of a packed byte.
_Q_TABLE = np.zeros(5 * 256, dtype=np.float32)
for _byte in range(243):
    _rest = _byte
    for _j in range(4, -1, -1):
        _Q_TABLE[5 * _byte + _j] = (_rest % 3) - 1
        _rest //= 3
del _byte, _rest, _j

_jit = numba.njit(cache=True, nogil=True)
_jit_parallel = numba.njit(cache=True, nogil=True, parallel=True)


@_jit
def piece_bounds(unit_starts, count, chunk):
    """Merge unit starts with the chunk grid: pieces never cross a unit or a chunk border.

    Returns the piece start offsets (length pieces + 1) and, for each piece, its unit's index.
    """
    n_units = unit_starts.shape[0] - 1
    bounds = np.empty(n_units + count // chunk + 2, dtype=np.int64)
    owner = np.empty(bounds.shape[0], dtype=np.int64)
    n = 0
    unit = 0
    position = 0
    while position < count:
        while unit_starts[unit + 1] <= position:  # skip empty units
            unit += 1
        next_chunk = (position // chunk + 1) * chunk
        end = min(unit_starts[unit + 1], next_chunk)
        bounds[n] = position
        owner[n] = unit
        n += 1
        position = end
    bounds[n] = count
    return bounds[: n + 1], owner[:n]


@_jit_parallel
def _piece_peaks(x, residual, has_residual, bounds, peaks, nonfinite):
    """max |x + residual| of each piece, and whether the piece holds NaN or Inf."""
    for piece in numba.prange(bounds.shape[0] - 1):
        peak = np.float32(0.0)
        poison = np.float32(0.0)  # v * 0 is NaN exactly when v is NaN or Inf
        if has_residual:
            for i in range(bounds[piece], bounds[piece + 1]):
                v = x[i] + residual[i]
                a = abs(v)
                peak = a if a > peak else peak
                poison += v * np.float32(0.0)
        else:
            for i in range(bounds[piece], bounds[piece + 1]):
                v = x[i]
                a = abs(v)
                peak = a if a > peak else peak
                poison += v * np.float32(0.0)
        peaks[piece] = peak
        nonfinite[piece] = not (poison == 0.0 and peak <= _FLT_MAX)


@_jit
def compute_scales(x, residual, has_residual, unit_starts, sparsity, scales, chunk):
    """Fill ``scales`` (one per unit) with float32(min(max|v| * s, FLT_MAX)).

    Returns False, leaving ``scales`` unspecified, if any value of v = x (+ residual) is NaN
    or Inf.  The product max|v| * s is taken in float64 and rounded once to float32.
    """
    bounds, owner = piece_bounds(unit_starts, x.shape[0], chunk)
    n_pieces = owner.shape[0]
    peaks = np.empty(n_pieces, dtype=np.float32)
    nonfinite = np.empty(n_pieces, dtype=np.bool_)
    _piece_peaks(x, residual, has_residual, bounds, peaks, nonfinite)
    for unit in range(scales.shape[0]):
        scales[unit] = 0.0
    unit_peak = np.zeros(scales.shape[0], dtype=np.float32)
    for piece in range(n_pieces):
        if nonfinite[piece]:
            return False
        if peaks[piece] > unit_peak[owner[piece]]:
            unit_peak[owner[piece]] = peaks[piece]
    for unit in range(scales.shape[0]):
        scales[unit] = np.float32(min(np.float64(unit_peak[unit]) * sparsity, _FLT_MAX))
    return True


@_jit
def _flush_run(coded, position, run):
    """Write a run of ``run`` zero groups at ``position``; return the new position."""
    while run >= 2:
        step = min(run, _MAX_RUN)
        coded[position] = _RUN_BASE + step
        position += 1
        run -= step
    if run == 1:
        coded[position] = _ZERO_GROUP
        position += 1
    return position


@_jit_parallel
def encode_chunks(x, residual, has_residual, unit_starts, scales, chunk, coded, chunk_lengths):
    """Quantize, pack and zero-run encode each chunk; update the residual in place.

    Chunk c's coded bytes go to ``coded[c * (chunk // 5):]`` and their number to
    ``chunk_lengths[c]``; :func:`gather_chunks` then packs them together.
    """
    count = x.shape[0]
    groups_per_chunk = chunk // 5
    n_chunks = chunk_lengths.shape[0]
    for c in numba.prange(n_chunks):
        start = c * chunk
        stop = min(count, start + chunk)
        digits = np.empty(chunk, dtype=np.uint8)
        # Stage 1: ternary digits (q + 1), one unit piece at a time (a constant scale).
        unit = np.searchsorted(unit_starts, start, side="right") - 1
        position = start
        while position < stop:
            while unit_starts[unit + 1] <= position:
                unit += 1
            end = min(stop, unit_starts[unit + 1])
            scale = scales[unit]
            step = scale  # reconstruction of digit 2; digit 0 is -scale
            if has_residual:
                for i in range(position, end):
                    v = x[i] + residual[i]
                    twice = np.float32(2.0) * v
                    up = twice >= scale
                    down = -twice >= scale
                    digit = np.uint8(1) + np.uint8(up) - np.uint8(down)
                    residual[i] = v - (np.float32(up) - np.float32(down)) * step
                    digits[i - start] = digit
            else:
                for i in range(position, end):
                    twice = np.float32(2.0) * x[i]
                    digits[i - start] = np.uint8(1) + np.uint8(twice >= scale) - np.uint8(-twice >= scale)
            position = end
        n_values = stop - start
        for i in range(n_values, (n_values + 4) // 5 * 5):
            digits[i] = 1  # pad the tail with zeros
        # Stage 2: five digits to a byte, runs of zero bytes to one byte.
        base = c * groups_per_chunk
        out = base
        run = 0
        for g in range((n_values + 4) // 5):
            d = 5 * g
            byte = 81 * digits[d] + 27 * digits[d + 1] + 9 * digits[d + 2] + 3 * digits[d + 3] + digits[d + 4]
            if byte == _ZERO_GROUP:
                run += 1
            else:
                if run:
                    out = _flush_run(coded, out, run)
                    run = 0
                coded[out] = byte
                out += 1
        out = _flush_run(coded, out, run)
        chunk_lengths[c] = out - base


@_jit_parallel
def gather_chunks(coded, stride, chunk_lengths, body):
    """Copy chunk c's ``chunk_lengths[c]`` bytes from ``coded[c * stride:]`` into ``body``, in order."""
    n_chunks = chunk_lengths.shape[0]
    offsets = np.zeros(n_chunks + 1, dtype=np.int64)
    for c in range(n_chunks):
        offsets[c + 1] = offsets[c] + chunk_lengths[c]
    for c in numba.prange(n_chunks):
        body[offsets[c] : offsets[c + 1]] = coded[c * stride : c * stride + chunk_lengths[c]]


@_jit_parallel
def decode_chunks(body, chunk_offsets, chunk, count, unit_starts, scales, out, accumulate):
    """Decode every chunk of a parsed payload into ``out`` (or add into it).

    The body comes from another machine: each chunk's bytes must expand to exactly its number
    of 5-value groups, and the tail padding must be zeros.  Returns -1, or the index of the first
    chunk that fails (its values in ``out`` are then unspecified).
    """
    n_chunks = chunk_offsets.shape[0] - 1
    status = np.zeros(n_chunks, dtype=np.bool_)
    for c in numba.prange(n_chunks):
        start = c * chunk
        stop = min(count, start + chunk)
        n_values = stop - start
        n_groups = (n_values + 4) // 5
        q = np.empty(n_groups * 5, dtype=np.float32)
        group = 0
        bad = False
        for b in range(chunk_offsets[c], chunk_offsets[c + 1]):
            byte = body[b]
            if byte > 242:
                run = byte - _RUN_BASE
                if group + run > n_groups:
                    bad = True
                    break
                for i in range(5 * group, 5 * (group + run)):
                    q[i] = 0.0
                group += run
            else:
                if group >= n_groups:
                    bad = True
                    break
                for j in range(5):
                    q[5 * group + j] = _Q_TABLE[5 * byte + j]
                group += 1
        if group != n_groups:
            bad = True
        if not bad:
            for i in range(n_values, 5 * n_groups):
                if q[i] != 0.0:
                    bad = True
        if bad:
            status[c] = True
            continue
        unit = np.searchsorted(unit_starts, start, side="right") - 1
        position = start
        while position < stop:
            while unit_starts[unit + 1] <= position:
                unit += 1
            end = min(stop, unit_starts[unit + 1])
            scale = scales[unit]
            if accumulate:
                for i in range(position, end):
                    out[i] += q[i - start] * scale
            else:
                for i in range(position, end):
                    out[i] = q[i - start] * scale
            position = end
    for c in range(n_chunks):
        if status[c]:
            return c
    return -1
