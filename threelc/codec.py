"""The 3LC codec's public numpy API: validation, allocation and payload assembly.

Each function here is a thin wrapper: it validates and converts its arguments, allocates the
output, and hands plain arrays to the numba kernels in :mod:`threelc.kernels`.  Payload bytes
follow docs/FORMAT.md; :mod:`threelc.reference` is the slow executable specification that the
tests hold this module to, bit for bit.
"""

from __future__ import annotations

import logging

import numpy as np

from . import format as fmt
from . import kernels

__all__ = [
    "compress",
    "compress_raw",
    "decompress",
    "decompress_add",
    "decompress_residual",
    "payload_info",
    "NonFiniteError",
    "check_sparsity",
    "check_segments",
]

logger = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """The input to :func:`compress` (plus its residual) holds NaN or Inf."""


def check_segments(segments, count: int) -> np.ndarray:
    """``segments`` (sizes; ``None`` = one segment) as int64, checked against ``count`` values."""
    if segments is None:
        return np.array([count], dtype=np.int64)
    sizes = np.asarray(segments)
    if sizes.ndim != 1 or (sizes.size and sizes.dtype.kind not in "iu"):
        raise ValueError("segments must be a 1-D sequence of integer segment sizes")
    sizes = sizes.astype(np.int64)
    if np.any(sizes < 0):
        raise ValueError("segment sizes must be non-negative")
    if int(sizes.sum()) != count:
        raise ValueError(f"segment sizes sum to {int(sizes.sum())}, but the array has {count} values")
    return sizes


def check_sparsity(sparsity) -> np.float32:
    """``sparsity`` as the float32 the payload records; ``ValueError`` unless it is a real number
    (not a bool or a string) in (0, 2) as float32.  The one check of s: the hook's state, the
    device codec and the benchmarks call it (the payload parser checks the same range on the wire)."""
    real = isinstance(sparsity, (int, float, np.integer, np.floating)) and not isinstance(sparsity, (bool, np.bool_))
    sparsity32 = np.float32(sparsity) if real else np.float32("nan")
    if not (np.isfinite(sparsity32) and 0.0 < sparsity32 < 2.0):
        raise ValueError(f"sparsity must be a number in (0, 2) (as float32), got {sparsity!r}")
    return sparsity32


def _as_flat_float32(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return array.reshape(-1)


def _nonfinite_payload(count: int, sparsity32: np.float32) -> np.ndarray:
    header = fmt.pack_header(encoding=fmt.ENCODING_TERNARY, flags=fmt.FLAG_NONFINITE, count=count,
                             segment_count=0, block=0, chunk=0, chunk_count=0, body_length=0,
                             sparsity=float(sparsity32))
    return fmt.seal(np.frombuffer(header, dtype=np.uint8).copy())


def compress(x, *, sparsity=1.0, residual=None, segments=None, block=None, nonfinite="raise",
             chunk=fmt.DEFAULT_CHUNK, residual_out=None) -> np.ndarray:
    """Compress a float32 array with 3LC into a self-describing payload.

    Steps (docs/FORMAT.md): with error feedback, ``v = x + residual``; per unit of values that
    share a scale (a segment, or a block of a segment), ``scale = max|v| * sparsity``; ternary
    digits ``q = sign(v)`` where ``2|v| >= scale`` else 0 (exact halves round away from zero);
    five digits to a byte; runs of 2..14 all-zero bytes to one byte.

    Parameters
    ----------
    x : float32 array, C-contiguous (any shape; read as flat)
    sparsity : float in (0, 2)
        The sparsity multiplier s: larger s zeroes more values.  The paper's range is [1, 2);
        below 1 the scale is under the unit's largest value, values above it are sent as +-scale
        (error feedback keeps the excess), and payloads grow denser.
    residual : float32 array of x's size, optional
        Error feedback: read and updated in place to ``v - decompress(payload)`` (or read only,
        with ``residual_out``).
    segments : sequence of int, optional
        Sizes of consecutive segments with one scale each (default: one segment).
    block : int, optional
        If given, one scale per ``block`` values within each segment.
    nonfinite : {"raise", "flag"}
        If ``v`` holds NaN or Inf: raise :class:`NonFiniteError`, or return a payload flagged
        non-finite that decodes to all NaN.  Either way ``residual`` is left unchanged (and
        ``residual_out`` unspecified).
    chunk : int
        Values per independently coded chunk (a multiple of 5); chunks are coded in parallel.
    residual_out : float32 array of x's size, optional (needs ``residual``)
        Where the new residual ``v - decompress(payload)`` goes, leaving ``residual`` as it was;
        it may be ``x`` itself (writeable), the DDP hook's choice: ``v`` is then read and
        replaced by the new residual in one pass, which the caller copies into its residual once
        it knows the step is kept.  Any other array must not overlap ``x`` or ``residual``.

    Returns
    -------
    numpy.ndarray of uint8

    Examples
    --------
    >>> import numpy as np, threelc
    >>> x = np.array([0.1, -2.0, 0.9, 1.2, 0.0, 0.0], dtype=np.float32)
    >>> threelc.decompress(threelc.compress(x))
    array([ 0., -2.,  0.,  2.,  0.,  0.], dtype=float32)
    """
    x = _as_flat_float32(x, "x")
    count = x.size
    sparsity32 = check_sparsity(sparsity)
    if nonfinite not in ("raise", "flag"):
        raise ValueError(f"nonfinite must be 'raise' or 'flag', got {nonfinite!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk <= 0 or chunk % 5 or chunk > fmt.MAX_CHUNK:
        raise ValueError(f"chunk must be a positive multiple of 5 up to {fmt.MAX_CHUNK}, got {chunk!r}")
    if block is None:
        block = 0
    elif isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 1 <= block < 2**32:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    if residual is None:
        residual_flat = np.zeros(0, dtype=np.float32)
    else:
        residual_flat = _as_flat_float32(residual, "residual")
        if residual_flat.size != count:
            raise ValueError(f"residual has {residual_flat.size} values, x has {count}")
        if residual_out is None and not residual_flat.flags.writeable:
            raise ValueError("residual must be writeable (it is updated in place)")
    out, feedback = _feedback_target(x, residual_flat, residual is not None, residual_out)
    segment_sizes = check_segments(segments, count)
    unit_starts = fmt.unit_starts(segment_sizes, int(block))
    n_chunks = fmt.chunk_count(count, chunk)
    scales = np.zeros(len(unit_starts) - 1, dtype=np.float32)
    coded = np.empty(n_chunks * (chunk // 5), dtype=np.uint8)
    chunk_lengths = np.empty(n_chunks, dtype=np.int64)
    longest_unit = int(segment_sizes.max()) if segment_sizes.size else 0
    if block:
        longest_unit = min(longest_unit, int(block))
    if longest_unit <= chunk and (residual is None or residual_out is not None):
        # Blocks (the DDP hook's): scales, bytes and the new residual in one pass.
        finite = kernels.encode_chunks_fused(x, residual_flat, out, feedback, unit_starts,
                                             float(sparsity32), scales, chunk, coded, chunk_lengths)
    else:
        # Long units, or a residual updated in place: every scale (and finiteness) is known first.
        finite = kernels.compute_scales(x, residual_flat, residual is not None, unit_starts, float(sparsity32),
                                        scales, chunk)
        if finite:
            kernels.encode_chunks(x, residual_flat, out, feedback, unit_starts, scales, chunk, coded,
                                  chunk_lengths)
    if not finite:
        if nonfinite == "raise":
            raise NonFiniteError("input (plus residual) holds NaN or Inf; nothing was compressed")
        return _nonfinite_payload(count, sparsity32)
    body_length = int(chunk_lengths.sum())
    header = fmt.pack_header(encoding=fmt.ENCODING_TERNARY, flags=0, count=count,
                             segment_count=len(segment_sizes), block=int(block), chunk=int(chunk),
                             chunk_count=n_chunks, body_length=body_length, sparsity=float(sparsity32))
    tables = [segment_sizes.astype("<u8").view(np.uint8), scales.astype("<f4").view(np.uint8),
              chunk_lengths.astype("<u4").view(np.uint8)]
    table_bytes = sum(t.size for t in tables)
    payload = np.empty(fmt.HEADER_SIZE + table_bytes + body_length, dtype=np.uint8)
    payload[: fmt.HEADER_SIZE] = np.frombuffer(header, dtype=np.uint8)
    offset = fmt.HEADER_SIZE
    for table in tables:
        payload[offset : offset + table.size] = table
        offset += table.size
    kernels.gather_chunks(coded, chunk // 5, chunk_lengths, payload[offset:])
    return fmt.seal(payload)


def _feedback_target(x: np.ndarray, residual: np.ndarray, has_residual: bool, residual_out) -> tuple:
    """Where the encoder writes the new residual: ``(out array, kernels' feedback mode)``.

    ``residual_out`` needs a residual, must be x's size and writeable, and either x itself or an
    array that overlaps neither x nor the residual."""
    if not has_residual:
        if residual_out is not None:
            raise ValueError("residual_out needs a residual: it receives the updated residual")
        return residual, kernels.NO_FEEDBACK  # (an empty array the kernels never read)
    if residual_out is None:
        return residual, kernels.INTO_RESIDUAL
    out = _as_flat_float32(residual_out, "residual_out")
    if out.size != x.size:
        raise ValueError(f"residual_out has {out.size} values, x has {x.size}")
    if not out.flags.writeable:
        raise ValueError("residual_out must be writeable")
    if out.__array_interface__["data"][0] == x.__array_interface__["data"][0]:
        return x, kernels.INTO_X
    if np.shares_memory(out, x) or np.shares_memory(out, residual):
        raise ValueError("residual_out must be x itself or overlap neither x nor residual")
    return out, kernels.INTO_OUT


def compress_raw(x) -> np.ndarray:
    """Wrap float32 values uncompressed in a payload (for data where 3LC does not pay)."""
    x = _as_flat_float32(x, "x")
    header = fmt.pack_header(encoding=fmt.ENCODING_RAW, flags=0, count=x.size, segment_count=0, block=0,
                             chunk=0, chunk_count=0, body_length=4 * x.size, sparsity=0.0)
    payload = np.empty(fmt.HEADER_SIZE + 4 * x.size, dtype=np.uint8)
    payload[: fmt.HEADER_SIZE] = np.frombuffer(header, dtype=np.uint8)
    payload[fmt.HEADER_SIZE :] = x.astype("<f4", copy=False).view(np.uint8)
    return fmt.seal(payload)


def payload_info(payload) -> fmt.Header:
    """The validated header of a payload (raises :class:`~threelc.FormatError` if malformed)."""
    return fmt.parse(payload).header


def _decode_into(payload, out, mode: int, minuend=None) -> np.ndarray:
    layout = fmt.parse(payload)
    header = layout.header
    if out.size != header.count:
        raise ValueError(f"out has {out.size} values, the payload holds {header.count}")
    flat = out.reshape(-1)
    if header.nonfinite:
        flat[...] = np.nan  # NaN + anything is NaN, so accumulating is the same
        return out
    if header.encoding == fmt.ENCODING_RAW:
        values = layout.body.view("<f4")
        if mode == kernels.ADD:
            flat += values
        elif mode == kernels.SUBTRACT:
            np.subtract(minuend, values, out=flat)
        else:
            flat[...] = values
        return out
    bad_chunk = kernels.decode_chunks(layout.body, layout.chunk_offsets, header.chunk, header.count,
                                      layout.unit_starts, layout.scales, flat, mode, flat if minuend is None else minuend)
    if bad_chunk >= 0:
        raise fmt.FormatError(f"chunk {bad_chunk}: coded bytes do not decode to exactly its values "
                              "(corrupt body or non-zero tail padding)")
    return out


def decompress(payload, out=None) -> np.ndarray:
    """Decode a payload into float32 values.

    Parameters
    ----------
    payload : uint8 array or bytes
    out : float32 array, C-contiguous, optional
        Written in place (any shape with the payload's element count); allocated if omitted.

    Raises
    ------
    FormatError
        If the payload is malformed. ``out`` may then hold partial output.
    """
    if out is None:
        out = np.empty(fmt.parse(payload).header.count, dtype=np.float32)
    else:
        out = _checked_out(out)
    return _decode_into(payload, out, kernels.DECODE)


def decompress_add(payload, out) -> np.ndarray:
    """Decode a payload and add its values into ``out`` (float32) in place; returns ``out``.

    Summing N payloads this way needs no temporary arrays, and costs time in proportion to the
    payload's size: groups of five zero values are skipped, not added (so a -0.0 under such a
    group stays -0.0, where IEEE's -0.0 + 0.0 is +0.0; every other value is exactly
    ``out + decoded``).  A
    non-finite payload turns ``out`` into all NaN.  On FormatError, ``out`` may hold partial sums.
    """
    return _decode_into(payload, _checked_out(out), kernels.ADD)


def decompress_residual(payload, values, out) -> np.ndarray:
    """Error feedback's update: ``out = values - decompress(payload)``; returns ``out``.

    ``values`` is what was compressed (gradient plus the old residual), ``out`` the residual to
    write (float32, C-contiguous, the payload's element count; it may be ``values`` itself, but
    no other array that overlaps it).  Bit for bit what ``np.subtract(values,
    decompress(payload), out=out)`` gives, with half its memory traffic: ``values`` is copied
    into ``out`` and the decoder subtracts the payload's non-zero groups in place, skipping its
    zero runs (``x - 0.0`` is ``x``), so no decoded array is written and read back.  A non-finite
    payload turns ``out`` into all NaN.  On FormatError (checked before ``out`` is written, but
    for a corrupt coded body), ``out`` may be partly written.
    """
    out = _checked_out(out)
    if not isinstance(values, np.ndarray) or values.dtype != np.float32:
        raise TypeError("values must be a float32 numpy array")
    if not values.flags.c_contiguous:
        raise ValueError("values must be C-contiguous")
    if values.size != out.size:
        raise ValueError(f"values has {values.size} values, out has {out.size}")
    same = values.__array_interface__["data"][0] == out.__array_interface__["data"][0]
    if not same and np.shares_memory(values, out):
        raise ValueError("values and out overlap without being the same array")
    return _decode_into(payload, out, kernels.SUBTRACT, values.reshape(-1))


def _checked_out(out) -> np.ndarray:
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise TypeError("out must be a float32 numpy array")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    return out
