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
from numba.core import types
from numba.extending import intrinsic

__all__ = ["compute_scales", "encode_chunks", "encode_chunks_fused", "gather_chunks", "decode_chunks", "piece_bounds",
           "unit_count", "unit_starts", "chunk_groups", "read_tables",
           "DECODE", "ADD", "SUBTRACT", "NO_FEEDBACK", "INTO_RESIDUAL", "INTO_X", "INTO_OUT"]

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
# _Q_NEUTRAL: _Q_TABLE, but -0.0 for the zero codes (a zero group, 121, and the runs, 243..255).
# x + -0.0 is x for every float, -0.0 included, so adding a zero code's five "values" changes
# nothing, as skipping it would; zero digits inside a packed group still add +0.0, as they always did.
_Q_NEUTRAL = _Q_TABLE.copy()
_Q_NEUTRAL[5 * _ZERO_GROUP : 5 * _ZERO_GROUP + 5] = -0.0
_Q_NEUTRAL[5 * 243 :] = -0.0

# A coded byte stands for _GROUPS[byte] groups: one packed group (0..242), or a run of 2..14 zero
# groups (243..255).
_GROUPS = np.ones(256, dtype=np.int64)
_GROUPS[243:] = np.arange(2, 15)
# _RUN_CODE[k] is the byte that ends a run of k < 14 zero groups (nothing for k = 0).
_RUN_CODE = np.zeros(_MAX_RUN, dtype=np.uint8)
_RUN_CODE[1] = _ZERO_GROUP
_RUN_CODE[2:] = _RUN_BASE + np.arange(2, _MAX_RUN)
_ZERO_DIGITS = np.uint64(0x0101010101010101)  # eight zero digits (digit = q + 1) as one 64-bit word
_FINITE_BITS = 0x7F800000  # |v|'s bits are >= this exactly when v is Inf or NaN
# A chunk coded in fewer bytes than its groups / _RUNS_CHUNK is mostly runs of zero groups:
# decoding it branches on runs (predictable there) and skips them (see _decode_chunk).
_RUNS_CHUNK = 4

# What :func:`decode_chunks` does with the decoded values: write them into ``out``, add them into
# it, or subtract them from it (error feedback: ``residual = v`` first, then ``residual -= decoded``).
DECODE, ADD, SUBTRACT = 0, 1, 2
#: The encoders' error feedback (their ``feedback`` argument): no residual; v = x + residual and
#: the new residual v - q * scale written over the residual (in place), over x, or into a third
#: array; the encoders take that array as ``out`` (x or the residual themselves for the first
#: two).  A loop that writes an array through one name and reads it through another runs scalar,
#: as its vectorized form checks that the two do not overlap: each case has its own loop.
NO_FEEDBACK, INTO_RESIDUAL, INTO_X, INTO_OUT = 0, 1, 2, 3

_jit = numba.njit(cache=True, nogil=True)
_jit_parallel = numba.njit(cache=True, nogil=True, parallel=True)


if numba.config.DISABLE_JIT:
    # Pure Python run (coverage, debugging): intrinsics cannot run outside compiled code.
    def _float32_bits(value):
        return int(np.float32(value).view(np.int32))

    def _bits_float32(bits):
        return np.int32(bits).view(np.float32)

else:

    @intrinsic
    def _float32_bits(typingctx, value):
        """The IEEE-754 bits of a float32 as an int32 (a free register move)."""
        signature = types.int32(types.float32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(types.int32))

        return signature, codegen

    @intrinsic
    def _bits_float32(typingctx, value):
        """Inverse of :func:`_float32_bits`."""
        signature = types.float32(types.int32)

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        return signature, codegen


@_jit
def piece_bounds(unit_starts, count, chunk):
    """Merge unit starts with the chunk grid: pieces never cross a unit or a chunk border.

    Returns the piece start offsets (length pieces + 1) and, for each piece, its unit's index.
    """
    n_units = unit_starts.shape[0] - 1
    bounds = np.empty(n_units + count // chunk + 3, dtype=np.int64)
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


@_jit
def _peak_bits(x, residual, has_residual):
    """max over i of the bits of |x[i] (+ residual[i])|: an integer max, which vectorizes.

    For non-negative floats the order of the bit patterns is the order of the values, and
    Inf and NaN compare above every finite value, so one max also detects non-finite input.
    """
    peak = np.int32(0)
    if has_residual:
        for i in range(x.shape[0]):
            peak = max(peak, _float32_bits(x[i] + residual[i]) & np.int32(0x7FFFFFFF))
    else:
        for i in range(x.shape[0]):
            peak = max(peak, _float32_bits(x[i]) & np.int32(0x7FFFFFFF))
    return peak


@_jit_parallel
def _piece_peaks(x, residual, has_residual, bounds, peaks):
    for piece in numba.prange(bounds.shape[0] - 1):
        start, stop = bounds[piece], bounds[piece + 1]
        # Slices, not offsets: loops over range(len) let LLVM drop wraparound checks and vectorize.
        if has_residual:
            peaks[piece] = _peak_bits(x[start:stop], residual[start:stop], True)
        else:
            peaks[piece] = _peak_bits(x[start:stop], residual, False)


@_jit
def compute_scales(x, residual, has_residual, unit_starts, sparsity, scales, chunk):
    """Fill ``scales`` (one per unit) with float32(min(max|v| * s, FLT_MAX)).

    Returns False, leaving ``scales`` unspecified, if any value of v = x (+ residual) is NaN
    or Inf.  The product max|v| * s is taken in float64 and rounded once to float32.
    """
    bounds, owner = piece_bounds(unit_starts, x.shape[0], chunk)
    peaks = np.empty(owner.shape[0], dtype=np.int32)
    _piece_peaks(x, residual, has_residual, bounds, peaks)
    unit_peak = np.zeros(scales.shape[0], dtype=np.int32)
    for piece in range(owner.shape[0]):
        if peaks[piece] >= _FINITE_BITS:
            return False
        unit_peak[owner[piece]] = max(unit_peak[owner[piece]], peaks[piece])
    for unit in range(scales.shape[0]):
        scales[unit] = _scale_of(unit_peak[unit], sparsity)
    return True


@_jit
def _scale_of(peak, sparsity):
    """float32(min(max|v| * s, FLT_MAX)) from the bits of max|v|, the product in float64."""
    return np.float32(min(np.float64(_bits_float32(peak)) * sparsity, _FLT_MAX))


@_jit
def _quantize_with_residual(x, residual, out, digits, scale, feedback):
    """digits = q + 1 of v = x + residual; the new residual v - q * scale into ``out``, which is
    ``residual`` (INTO_RESIDUAL), ``x`` (INTO_X) or a third array (``feedback``).  Only ``out`` is
    written, so read-only x and residual arrays compile too."""
    if feedback == INTO_X:
        _quantize_over(out, residual, digits, scale)
    elif feedback == INTO_RESIDUAL:
        _quantize_over(out, x, digits, scale)  # x + residual == residual + x exactly
    else:
        for i in range(x.shape[0]):
            digits[i], out[i] = _digit_and_rest(x[i] + residual[i], scale)


@_jit
def _quantize_over(out, addend, digits, scale):
    """:func:`_quantize_with_residual` in place: v = out + addend, then out = v - q * scale."""
    for i in range(out.shape[0]):
        digits[i], out[i] = _digit_and_rest(out[i] + addend[i], scale)


@_jit
def _digit_and_rest(v, scale):
    """v's digit q + 1, q = +-1 where 2|v| >= scale (exact halves round away from zero), and what
    the digit does not carry, v - q * scale (exact in float32)."""
    twice = np.float32(2.0) * v
    up = twice >= scale
    down = -twice >= scale
    return np.uint8(1) + np.uint8(up) - np.uint8(down), v - (np.float32(up) - np.float32(down)) * scale


@_jit
def _quantize(x, digits, scale):
    """digits = q + 1 of x: q = +-1 where 2|x| >= scale (exact halves round away from zero)."""
    for i in range(x.shape[0]):
        twice = np.float32(2.0) * x[i]
        digits[i] = np.uint8(1) + np.uint8(twice >= scale) - np.uint8(-twice >= scale)


@_jit
def _pack_group(digits, g, run, out, coded):
    """Pack group ``g``'s five digits into a byte and zero-run encode it; return ``(run, out)``.

    Branch-free on the data (a branch per group is unpredictable where zero and nonzero groups
    mix): every step writes its candidate bytes and advances the output position only if they
    count, in integer arithmetic that compiles to no jumps.  A zero group extends the run,
    emitting 255 when it reaches 14; any other group ends the run (its code) and is written.
    """
    d = 5 * g
    byte = (81 * np.int64(digits[d]) + 27 * np.int64(digits[d + 1]) + 9 * np.int64(digits[d + 2])
            + 3 * np.int64(digits[d + 3]) + np.int64(digits[d + 4]))
    zero = np.int64(byte == _ZERO_GROUP)
    nonzero = 1 - zero
    longer = run + 1
    full = np.int64(longer == _MAX_RUN)
    coded[out] = np.uint8(255 * zero + nonzero * np.int64(_RUN_CODE[run]))
    out += (zero & full) | (nonzero & np.int64(run > 0))
    coded[out] = np.uint8(byte)
    out += nonzero
    return zero * (longer - full * _MAX_RUN), out


@_jit
def _pack_zero_runs(digits, n_groups, coded):
    """Pack digits five to a byte and zero-run encode them into ``coded``; return the length.

    Gradients are mostly zero digits, in long stretches: eight groups (40 digits, five 64-bit
    words) that are all zeros extend the run at once, with no per-group work; the other groups
    go through :func:`_pack_group`.  The writes stay inside ``coded[:n_groups]`` because the
    output never outruns the input.
    """
    out = 0
    run = 0
    n_blocks = n_groups // 8
    words = digits[: 40 * n_blocks].view(np.uint64)
    for block in range(n_blocks):
        w = 5 * block
        if ((words[w] ^ _ZERO_DIGITS) | (words[w + 1] ^ _ZERO_DIGITS) | (words[w + 2] ^ _ZERO_DIGITS)
                | (words[w + 3] ^ _ZERO_DIGITS) | (words[w + 4] ^ _ZERO_DIGITS)) == 0:
            run += 8  # run was under 14, so it reaches 14 at most once
            if run >= _MAX_RUN:
                coded[out] = 255
                out += 1
                run -= _MAX_RUN
            continue
        for g in range(8 * block, 8 * block + 8):
            run, out = _pack_group(digits, g, run, out, coded)
    for g in range(8 * n_blocks, n_groups):
        run, out = _pack_group(digits, g, run, out, coded)
    if run:
        coded[out] = _RUN_CODE[run]
        out += 1
    return out


@_jit
def _piece_at(unit_starts, unit, position, stop):
    """The unit that holds ``position`` (searching on from ``unit``, past empty units) and the end
    of the piece of constant scale that starts there: the unit's end, or ``stop``."""
    while unit_starts[unit + 1] <= position:
        unit += 1
    return unit, min(stop, unit_starts[unit + 1])


@_jit
def _encode_chunk(x, residual, out, feedback, unit_starts, scales, start, stop, coded):
    """Quantize, pack and zero-run encode ``x[start:stop]`` (plus ``residual[start:stop]``, unless
    ``feedback`` is NO_FEEDBACK: the new residual goes where it says) into ``coded``; return the
    length."""
    n_groups = (stop - start + 4) // 5
    digits = np.empty(5 * n_groups, dtype=np.uint8)
    # Stage 1: ternary digits, one piece of constant scale at a time.
    unit = np.searchsorted(unit_starts, start, side="right") - 1
    position = start
    while position < stop:
        unit, end = _piece_at(unit_starts, unit, position, stop)
        if feedback != NO_FEEDBACK:
            _quantize_with_residual(x[position:end], residual[position:end], out[position:end],
                                    digits[position - start : end - start], scales[unit], feedback)
        else:
            _quantize(x[position:end], digits[position - start : end - start], scales[unit])
        position = end
    digits[stop - start :] = 1  # pad the tail with zeros
    # Stage 2: bytes and zero runs.
    return _pack_zero_runs(digits, n_groups, coded)


@_jit_parallel
def encode_chunks(x, residual, out, feedback, unit_starts, scales, chunk, coded, chunk_lengths):
    """Quantize, pack and zero-run encode each chunk, with error feedback as ``feedback`` says.

    Chunk c's coded bytes go to ``coded[c * (chunk // 5):]`` and their number to
    ``chunk_lengths[c]``; :func:`gather_chunks` then packs them together.
    """
    count = x.shape[0]
    groups_per_chunk = chunk // 5
    for c in numba.prange(chunk_lengths.shape[0]):
        start = c * chunk
        stop = min(count, start + chunk)
        base = c * groups_per_chunk
        chunk_lengths[c] = _encode_chunk(x, residual, out, feedback, unit_starts, scales, start, stop,
                                         coded[base : base + (stop - start + 4) // 5])


@_jit_parallel
def encode_chunks_fused(x, residual, out, feedback, unit_starts, sparsity, scales, chunk, coded, chunk_lengths):
    """:func:`compute_scales` and :func:`encode_chunks` in one pass over memory, for input whose
    units are no longer than a chunk (the DDP hook's blocks), and whose residual, if any, is not
    updated in place (``feedback`` INTO_X, as in the DDP hook, or INTO_OUT).

    Each chunk computes the scales of the units that lie inside it and encodes at once, while its
    values are still in cache; a unit across a chunk border (at most one per border, as no unit
    is longer than a chunk) gets its scale from all its values first.  Nothing is written but
    ``scales`` (zeros on entry: empty units keep them), ``coded``, ``chunk_lengths`` and the new
    residual (each chunk's once its scales are known), so input found non-finite leaves ``residual`` as it
    was: returns False, with those unspecified, if any value is NaN or Inf.  The scales, bytes and
    new residual are :func:`compute_scales`' and :func:`encode_chunks`'.
    """
    count = x.shape[0]
    n_chunks = chunk_lengths.shape[0]
    groups_per_chunk = chunk // 5
    has_residual = feedback != NO_FEEDBACK
    finite = np.ones(n_chunks, dtype=np.bool_)
    for c in numba.prange(1, n_chunks):  # the unit across the border at c * chunk, if any
        border = c * chunk
        unit = np.searchsorted(unit_starts, border, side="right") - 1
        if unit_starts[unit] < border < unit_starts[unit + 1]:
            peak = _peak_bits(x[unit_starts[unit] : unit_starts[unit + 1]],
                              residual[unit_starts[unit] : unit_starts[unit + 1]], has_residual)
            finite[c] = peak < _FINITE_BITS
            scales[unit] = _scale_of(peak, sparsity)
    for c in numba.prange(n_chunks):
        start = c * chunk
        stop = min(count, start + chunk)
        unit = np.searchsorted(unit_starts, start, side="right") - 1
        position = start
        while position < stop:
            unit, end = _piece_at(unit_starts, unit, position, stop)
            if unit_starts[unit] >= start and end == unit_starts[unit + 1]:  # the whole unit is in this chunk
                peak = _peak_bits(x[position:end], residual[position:end], has_residual)
                finite[c] = finite[c] and peak < _FINITE_BITS
                scales[unit] = _scale_of(peak, sparsity)
            position = end
        base = c * groups_per_chunk
        chunk_lengths[c] = 0
        if finite[c]:
            chunk_lengths[c] = _encode_chunk(x, residual, out, feedback, unit_starts, scales, start, stop,
                                             coded[base : base + (stop - start + 4) // 5])
    for c in range(n_chunks):
        if not finite[c]:
            return False
    return True


@_jit_parallel
def gather_chunks(coded, stride, chunk_lengths, body):
    """Copy chunk c's ``chunk_lengths[c]`` bytes from ``coded[c * stride:]`` into ``body``, in order."""
    n_chunks = chunk_lengths.shape[0]
    offsets = np.zeros(n_chunks + 1, dtype=np.int64)
    for c in range(n_chunks):
        offsets[c + 1] = offsets[c] + chunk_lengths[c]
    for c in numba.prange(n_chunks):
        body[offsets[c] : offsets[c + 1]] = coded[c * stride : c * stride + chunk_lengths[c]]


@_jit
def _decode_chunk(coded, unit_starts, start, scales, out, mode):
    """Decode one chunk's coded bytes into ``out``, the chunk's slice: written (``mode`` DECODE;
    ``out`` must hold zeros), added into it (ADD) or subtracted from it (SUBTRACT).

    Works from the coded bytes directly, so the work follows the payload, not the value count.
    Nearly every byte applies five values of one unit at once, with no branch on what the byte
    is (zero and nonzero groups mix unpredictably in gradients with error feedback): a packed
    group's five ``digit * scale``, or, for a zero group or a run of them, five values that leave
    ``out`` as it is: +0.0 written over zeros, -0.0 added (:data:`_Q_NEUTRAL`), +0.0 subtracted
    (``x - 0.0`` is ``x`` bit for bit); a run then moves the position past all its groups.  In a
    chunk of mostly runs (``_RUNS_CHUNK``) a branch on runs is predictable, and runs are
    skipped without touching ``out``.  Either way zero codes never change ``out``, while zero
    digits in a packed group add +0.0 (turning a -0.0 under ADD into +0.0).  Groups across a unit
    border and the chunk's last partial group take a slower path with the same results.

    Returns False, with ``out`` partly written, unless the bytes stand for exactly the chunk's
    groups and the last group's padding digits are zeros: the bytes come from another machine,
    and these are the bounds checks numba does not do.
    """
    count = out.shape[0]
    n_groups = (count + 4) // 5
    unit = np.searchsorted(unit_starts, start, side="right") - 1
    unit_end = unit_starts[unit + 1] - start
    scale = scales[unit]
    runs_chunk = _RUNS_CHUNK * coded.shape[0] < n_groups
    g = 0
    for b in range(coded.shape[0]):
        byte = coded[b]
        groups = np.int64(_GROUPS[byte])
        if g + groups > n_groups:
            return False
        o = 5 * g
        g += groups
        if groups > 1 and runs_chunk:  # a run, in a chunk of runs: nothing of out to touch
            continue
        while o >= unit_end:
            unit += 1
            unit_end = unit_starts[unit + 1] - start
            scale = scales[unit]
        t = 5 * np.int64(byte)
        if o + 5 <= unit_end and o + 5 <= count:  # nearly every byte: one unit, five values
            if mode == ADD:
                for j in range(5):
                    out[o + j] += _Q_NEUTRAL[t + j] * scale
            elif mode == SUBTRACT:
                for j in range(5):
                    out[o + j] -= _Q_TABLE[t + j] * scale
            else:
                for j in range(5):
                    out[o + j] = _Q_TABLE[t + j] * scale
            continue
        if byte == _ZERO_GROUP or byte >= 243:  # zero codes change nothing (DECODE's out holds zeros)
            continue
        for j in range(count - o, 5):  # only in the last group: its padding must be zero digits
            if _Q_TABLE[t + j] != 0.0:
                return False
        for i in range(o, min(o + 5, count)):  # a group across a unit border, or the partial last one
            while i >= unit_end:
                unit += 1
                unit_end = unit_starts[unit + 1] - start
                scale = scales[unit]
            value = _Q_TABLE[t + i - o] * scale
            if mode == ADD:
                out[i] = out[i] + value
            elif mode == SUBTRACT:
                out[i] = out[i] - value
            else:
                out[i] = value
    return g == n_groups


@_jit_parallel
def decode_chunks(body, chunk_offsets, chunk, count, unit_starts, scales, out, mode, minuend):
    """Decode every chunk of a parsed payload into ``out``, or add into it (``mode``:
    :func:`_decode_chunk`); SUBTRACT writes ``minuend - decoded``, copying each chunk of
    ``minuend`` (an array of ``out``'s size: ``out`` itself, or one that does not overlap it) into
    ``out`` just before subtracting from it, while it is in cache; DECODE zeroes each chunk of
    ``out`` just before decoding into it.

    The body comes from another machine: each chunk's bytes must expand to exactly its number
    of 5-value groups, and the tail padding must be zeros.  Returns -1, or the index of the first
    chunk that fails (its values in ``out`` are then unspecified).
    """
    n_chunks = chunk_offsets.shape[0] - 1
    status = np.zeros(n_chunks, dtype=np.bool_)
    for c in numba.prange(n_chunks):
        start = c * chunk
        stop = min(count, start + chunk)
        if mode == SUBTRACT:
            out[start:stop] = minuend[start:stop]
        elif mode == DECODE:
            out[start:stop] = 0.0
        status[c] = not _decode_chunk(body[chunk_offsets[c] : chunk_offsets[c + 1]], unit_starts, start, scales,
                                      out[start:stop], mode)
    for c in range(n_chunks):
        if status[c]:
            return c
    return -1


# ------------------------------------------------------------------------------- payload tables
# What :func:`read_tables` found wrong (TABLES_OK: nothing); threelc.format turns it into a message.
TABLES_OK, BAD_SEGMENTS, TRUNCATED_TABLES, BAD_SCALE, BAD_CHUNK_LENGTH, BAD_BODY_LENGTH, BAD_PAYLOAD_LENGTH = range(7)


@_jit
def unit_count(segment_sizes, block):
    """Number of units (scales) of these segments: one per segment (``block`` 0), or one per
    ``block`` values of each segment, its last block holding the remainder (an empty segment
    then has no unit; one scale per segment keeps it)."""
    if block == 0:
        return segment_sizes.shape[0]
    n_units = 0
    for size in segment_sizes:
        n_units += (size + block - 1) // block
    return n_units


@_jit
def chunk_groups(count, chunk, n_chunks, c):
    """Number of 5-value groups in chunk ``c`` of ``count`` values coded in chunks of ``chunk``."""
    return chunk // 5 if c < n_chunks - 1 else (count - (n_chunks - 1) * chunk + 4) // 5


@_jit
def unit_starts(segment_sizes, block):
    """Start offsets (int64, length units + 1) of the units (:func:`unit_count`), the runs of
    values that share one scale."""
    starts = np.empty(unit_count(segment_sizes, block) + 1, dtype=np.int64)
    starts[0] = 0
    unit = 0
    position = 0
    for size in segment_sizes:
        if block == 0:
            position += size
            unit += 1
            starts[unit] = position
            continue
        stop = position + size
        while position < stop:
            position = min(position + block, stop)
            unit += 1
            starts[unit] = position
    return starts


@_jit
def _read_le(payload, offset, size):
    """The little-endian unsigned integer of ``size`` bytes at ``payload[offset:]``."""
    value = np.uint64(0)
    for i in range(size - 1, -1, -1):
        value = (value << np.uint64(8)) | np.uint64(payload[offset + i])
    return value


@_jit
def read_tables(payload, offset, count, segment_count, block, chunk, n_chunks, body_length):
    """Read and check the tables that follow a ternary payload's header, from ``offset`` on
    (docs/FORMAT.md): segment sizes, scales, chunk lengths, in that order and with the same checks
    as :func:`threelc.format.parse` describes.  The header's own fields are checked by then, and
    the segment table is known to fit the payload.

    Returns ``(problem, index, segment_sizes, scales, chunk_lengths, chunk_offsets, unit_starts)``:
    ``problem`` one of TABLES_OK, BAD_SEGMENTS, ... and ``index`` what it concerns (the scale
    count for TRUNCATED_TABLES, a bad scale's or chunk's index); the arrays are read as far as
    the checks got, and empty after them.
    """
    empty_i = np.zeros(0, dtype=np.int64)
    empty_f = np.zeros(0, dtype=np.float32)
    segment_sizes = np.empty(segment_count, dtype=np.int64)
    total = np.uint64(0)
    too_large = False
    for s in range(segment_count):
        size = _read_le(payload, offset + 8 * s, 8)
        too_large = too_large or size > np.uint64(count)
        total += size
        segment_sizes[s] = np.int64(size) if size <= np.uint64(count) else -1
    offset += 8 * segment_count
    if too_large or total != np.uint64(count):
        return BAD_SEGMENTS, 0, segment_sizes, empty_f, empty_i, empty_i, empty_i
    n_scales = unit_count(segment_sizes, block)
    if offset + 4 * n_scales + 4 * n_chunks > payload.shape[0]:
        return TRUNCATED_TABLES, n_scales, segment_sizes, empty_f, empty_i, empty_i, empty_i
    scales = np.empty(n_scales, dtype=np.float32)
    for u in range(n_scales):
        bits = np.int64(_read_le(payload, offset + 4 * u, 4))
        scales[u] = _bits_float32(np.int32(bits - ((bits >> 31) << 32)))  # the u32's bits as an int32
        if (_float32_bits(scales[u]) & np.int32(0x7FFFFFFF)) >= _FINITE_BITS or scales[u] < 0:
            return BAD_SCALE, u, segment_sizes, scales, empty_i, empty_i, empty_i
    offset += 4 * n_scales
    chunk_lengths = np.empty(n_chunks, dtype=np.int64)
    chunk_offsets = np.zeros(n_chunks + 1, dtype=np.int64)
    for c in range(n_chunks):
        length = np.int64(_read_le(payload, offset + 4 * c, 4))
        chunk_lengths[c] = length
        groups = chunk_groups(count, chunk, n_chunks, c)
        if length > groups or length < (groups + 13) // 14:
            return BAD_CHUNK_LENGTH, c, segment_sizes, scales, chunk_lengths, empty_i, empty_i
        chunk_offsets[c + 1] = chunk_offsets[c] + length
    offset += 4 * n_chunks
    if chunk_offsets[n_chunks] != body_length:
        return BAD_BODY_LENGTH, 0, segment_sizes, scales, chunk_lengths, chunk_offsets, empty_i
    if payload.shape[0] != offset + body_length:
        return BAD_PAYLOAD_LENGTH, offset, segment_sizes, scales, chunk_lengths, chunk_offsets, empty_i
    return TABLES_OK, 0, segment_sizes, scales, chunk_lengths, chunk_offsets, unit_starts(segment_sizes, block)
