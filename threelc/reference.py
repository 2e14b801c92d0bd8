"""A slow, obviously correct implementation of the 3LC codec, stage by stage.

This module is the executable specification: each function follows docs/FORMAT.md line by
line with plain numpy and Python loops, without regard for speed.  The tests check that the
numba codec (:mod:`threelc.codec`) and the torch device codec produce the same bytes and the
same floats as this module, bit for bit.  Do not use it for real data.
"""

from __future__ import annotations

import numpy as np

from . import format as fmt

__all__ = [
    "quantize",
    "pack",
    "unpack",
    "zero_run_encode",
    "zero_run_decode",
    "unit_sizes",
    "encode",
    "decode",
    "adler32",
    "seal",
]

FLT_MAX = float(np.finfo(np.float32).max)


def unit_sizes(segment_sizes, block: int) -> list[int]:
    """Sizes of the runs of values that share one scale: segments, or blocks within segments."""
    units = []
    for size in segment_sizes:
        size = int(size)
        if block == 0:
            units.append(size)
            continue
        while size > 0:
            units.append(min(block, size))
            size -= block
    return units


def scale_of(values: np.ndarray, sparsity32: np.float32) -> np.float32:
    """scale = float32(min(max|v| * s, FLT_MAX)), the product taken in float64."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    return np.float32(min(peak * float(sparsity32), FLT_MAX))


def quantize(values: np.ndarray, scale: np.float32) -> np.ndarray:
    """Ternary digits {0, 1, 2} (q + 1) of float32 values: q = +-1 where 2|v| >= scale.

    Exact halves round away from zero; the comparison 2|v| >= scale is exact in floating point.
    """
    digits = np.ones(values.shape, dtype=np.uint8)
    doubled = 2.0 * values.astype(np.float64)
    digits[doubled >= scale] = 2
    digits[-doubled >= scale] = 0
    digits[values == 0] = 1  # scale 0 (all-zero unit): 0 >= 0 must still give digit 1
    return digits


def pack(digits: np.ndarray) -> np.ndarray:
    """Pack digits five to a byte, first digit most significant; pad the tail with 1s."""
    padded = list(digits) + [1] * ((-len(digits)) % 5)
    out = []
    for i in range(0, len(padded), 5):
        a, b, c, d, e = (int(v) for v in padded[i : i + 5])
        out.append(81 * a + 27 * b + 9 * c + 3 * d + e)
    return np.array(out, dtype=np.uint8)


def unpack(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``count`` digits from packed bytes (each byte <= 242)."""
    digits = []
    for byte in packed:
        byte = int(byte)
        group = []
        for _ in range(5):
            group.append(byte % 3)
            byte //= 3
        digits.extend(reversed(group))
    return np.array(digits[:count], dtype=np.uint8)


def zero_run_encode(packed: np.ndarray) -> np.ndarray:
    """Replace each run of k >= 2 bytes 121 by bytes 241 + min(k, 14), repeatedly."""
    out = []
    i = 0
    while i < len(packed):
        if packed[i] != 121:
            out.append(int(packed[i]))
            i += 1
            continue
        run = 0
        while i + run < len(packed) and packed[i + run] == 121:
            run += 1
        i += run
        while run >= 2:
            step = min(run, 14)
            out.append(241 + step)
            run -= step
        if run == 1:
            out.append(121)
    return np.array(out, dtype=np.uint8)


def zero_run_decode(coded: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zero_run_encode`."""
    out = []
    for byte in coded:
        byte = int(byte)
        if byte >= 243:
            out.extend([121] * (byte - 241))
        else:
            out.append(byte)
    return np.array(out, dtype=np.uint8)


def encode(x, *, sparsity=1.0, residual=None, segments=None, block=0, chunk=fmt.DEFAULT_CHUNK) -> np.ndarray:
    """Compress a float32 array into a payload, updating ``residual`` in place if given."""
    x = np.asarray(x, dtype=np.float32).ravel()
    count = x.size
    sparsity32 = np.float32(sparsity)
    segments = [count] if segments is None else [int(s) for s in segments]
    values = x + residual if residual is not None else x.copy()
    if not np.all(np.isfinite(values)):
        header = fmt.pack_header(encoding=fmt.ENCODING_TERNARY, flags=fmt.FLAG_NONFINITE, count=count,
                                 segment_count=0, block=0, chunk=0, chunk_count=0, body_length=0,
                                 sparsity=float(sparsity32))
        return seal(np.frombuffer(header, dtype=np.uint8).copy())
    scales, digits = [], []
    start = 0
    for size in unit_sizes(segments, block):
        unit = values[start : start + size]
        scale = scale_of(unit, sparsity32)
        scales.append(scale)
        digits.append(quantize(unit, scale))
        start += size
    digits = np.concatenate(digits) if digits else np.zeros(0, np.uint8)
    if residual is not None:
        reconstruction = decode_digits(digits, scales, unit_sizes(segments, block))
        residual[...] = values - reconstruction
    chunks = [zero_run_encode(pack(digits[i : i + chunk])) for i in range(0, count, chunk)]
    header = fmt.pack_header(encoding=fmt.ENCODING_TERNARY, flags=0, count=count,
                             segment_count=len(segments), block=block, chunk=chunk,
                             chunk_count=len(chunks), body_length=sum(len(c) for c in chunks),
                             sparsity=float(sparsity32))
    parts = [
        np.frombuffer(header, dtype=np.uint8),
        np.array(segments, dtype="<u8").view(np.uint8),
        np.array(scales, dtype="<f4").view(np.uint8),
        np.array([len(c) for c in chunks], dtype="<u4").view(np.uint8),
        *chunks,
    ]
    return seal(np.concatenate(parts).astype(np.uint8))


def adler32(data) -> int:
    """Adler-32 as RFC 1950 defines it: a = 1 + sum of bytes, b = sum of the running a's, mod 65521."""
    a, b = 1, 0
    for byte in data:
        a = (a + int(byte)) % 65521
        b = (b + a) % 65521
    return (b << 16) | a


def seal(payload: np.ndarray) -> np.ndarray:
    """Write the checksum at offset 44: Adler-32 of bytes [0, 44) followed by bytes [48, end)."""
    covered = np.concatenate([payload[: fmt.CHECKSUM_OFFSET], payload[fmt.HEADER_SIZE :]])
    payload[fmt.CHECKSUM_OFFSET : fmt.HEADER_SIZE] = np.array([adler32(covered)], dtype="<u4").view(np.uint8)
    return payload


def decode_digits(digits, scales, units) -> np.ndarray:
    """float32 values (digit - 1) * scale, one scale per unit."""
    out = np.zeros(len(digits), dtype=np.float32)
    start = 0
    for scale, size in zip(scales, units):
        out[start : start + size] = (digits[start : start + size].astype(np.float32) - 1) * np.float32(scale)
        start += size
    return out


def decode(payload) -> np.ndarray:
    """Decompress a payload into a new float32 array (raises FormatError on bad input)."""
    layout = fmt.parse(payload)  # the header, tables and checksum (zlib's Adler-32, equal to adler32 here)
    header = layout.header
    if header.nonfinite:
        return np.full(header.count, np.nan, dtype=np.float32)
    if header.encoding == fmt.ENCODING_RAW:
        return layout.body.view("<f4").astype(np.float32)
    digits = []
    for index in range(header.chunk_count):
        coded = layout.body[layout.chunk_offsets[index] : layout.chunk_offsets[index + 1]]
        packed = zero_run_decode(coded)
        values = min(header.chunk, header.count - index * header.chunk)
        if len(packed) != (values + 4) // 5 or np.any(packed > 242):
            raise fmt.FormatError(f"chunk {index} decodes to {len(packed)} groups, expected {(values + 4) // 5}")
        chunk_digits = unpack(packed, len(packed) * 5)
        if np.any(chunk_digits[values:] != 1):
            raise fmt.FormatError(f"chunk {index}: tail padding digits must be zeros (digit 1)")
        digits.append(chunk_digits[:values])
    digits = np.concatenate(digits) if digits else np.zeros(0, np.uint8)
    return decode_digits(digits, layout.scales, unit_sizes(layout.segment_sizes, header.block))
