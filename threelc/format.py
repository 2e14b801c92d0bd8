"""The 3LC payload format: header layout, parsing and validation.

A payload is a flat ``uint8`` array that describes itself completely: a decoder needs
nothing but the bytes.  docs/FORMAT.md documents the layout byte by byte; this module is
its single implementation (the tables after the header are read and checked by one compiled
pass, :func:`threelc.kernels.read_tables`, whose findings :func:`parse` turns into messages).
Every decoder (the numba codec, the torch device codec) parses payloads through :func:`parse`,
so every decoder rejects the same bad input with the same :class:`FormatError`.

Layout (all integers little-endian)::

    offset size field
    0      3    magic            b"3LC"
    3      1    version          2
    4      1    encoding         0 = ternary (3LC), 1 = raw float32
    5      1    flags            bit 0: the input held NaN/Inf (decodes to all NaN)
    6      2    reserved         0
    8      8    count            number of float32 values (u64)
    16     4    segment_count    number of segments (u32)
    20     4    block            values per scale inside a segment, 0 = one scale per segment
    24     4    chunk            values per independently coded chunk (a multiple of 5)
    28     4    chunk_count      number of chunks (u32)
    32     8    body_length      bytes of coded body (u64)
    40     4    sparsity         the sparsity multiplier s used (float32, informational)
    44     4    checksum         Adler-32 of every other byte of the payload (u32)
    48     ...  segment sizes    u64[segment_count]
    ...    ...  scales           float32[scale_count]
    ...    ...  chunk lengths    u32[chunk_count]  (coded bytes of each chunk)
    ...    ...  body             uint8[body_length]

The checksum lets a receiver reject a payload corrupted after it was made (in memory, on the
wire, by a faulty peer) before decoding it: without it, a flipped scale byte decodes to a
finite but wrong gradient that nothing downstream can tell from a real one.  Adler-32 rather
than CRC-32 because its closed form (a sum and a position-weighted sum) vectorizes on a device
(:mod:`threelc.hooks.device_codec`) exactly as zlib computes it on the host.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np

from . import kernels

__all__ = [
    "FormatError",
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "ENCODING_TERNARY",
    "ENCODING_RAW",
    "FLAG_NONFINITE",
    "DEFAULT_CHUNK",
    "Header",
    "Layout",
    "parse",
    "pack_header",
    "checksum",
    "check_checksum",
    "seal",
    "CHECKSUM_OFFSET",
    "scale_count",
    "unit_starts",
    "chunk_count",
    "max_ternary_size",
]

MAGIC = b"3LC"
VERSION = 2
ENCODING_TERNARY = 0
ENCODING_RAW = 1
FLAG_NONFINITE = 1
HEADER_SIZE = 48
#: Offset of the u32 checksum in the header; the checksum covers every byte but these four.
CHECKSUM_OFFSET = 44
#: Values per independently coded chunk: 5 * 2**13, so a chunk holds whole 5-value groups and
#: codes to at most 8192 bytes; small enough that the chunks of one bucket spread over all cores.
DEFAULT_CHUNK = 5 * 8192
#: The largest chunk a payload may declare (its coded size must fit the u32 chunk-length table).
MAX_CHUNK = 5 * (1 << 28)

_HEADER = struct.Struct("<3sBBBHQIIIIQfI")
assert _HEADER.size == HEADER_SIZE


class FormatError(ValueError):
    """A payload is malformed: truncated, oversized, corrupt, or of an unknown version."""


@dataclasses.dataclass(frozen=True)
class Header:
    """The fixed 48-byte header of a payload, as parsed."""

    version: int
    encoding: int
    flags: int
    count: int
    segment_count: int
    block: int
    chunk: int
    chunk_count: int
    body_length: int
    sparsity: float
    checksum: int

    @property
    def nonfinite(self) -> bool:
        """True if the compressed input held NaN or Inf (the payload decodes to all NaN)."""
        return bool(self.flags & FLAG_NONFINITE)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A validated payload: its header and views of its tables and body."""

    header: Header
    segment_sizes: np.ndarray  # int64[segment_count]
    scales: np.ndarray  # float32[scale_count]
    chunk_lengths: np.ndarray  # int64[chunk_count]
    chunk_offsets: np.ndarray  # int64[chunk_count + 1], offsets into body
    body: np.ndarray  # uint8[body_length]
    unit_starts: np.ndarray  # int64[scale_count + 1]: where each scale's values start (unit_starts())


def scale_count(segment_sizes: np.ndarray, block: int) -> int:
    """Number of scales for these segments: one per segment, or one per block of each segment."""
    return int(kernels.unit_count(np.asarray(segment_sizes, dtype=np.int64), int(block)))


def unit_starts(segment_sizes: np.ndarray, block: int) -> np.ndarray:
    """Start offsets (int64, length units + 1) of the units: the runs of values that share one scale."""
    return kernels.unit_starts(np.asarray(segment_sizes, dtype=np.int64), int(block))


def chunk_count(count: int, chunk: int) -> int:
    """Number of chunks that ``count`` values split into."""
    return (count + chunk - 1) // chunk


def max_ternary_size(segment_sizes: np.ndarray, block: int, chunk: int = DEFAULT_CHUNK) -> int:
    """The largest ternary payload of these segments (``block`` 0: one scale per segment): header,
    tables, and one coded byte per five values, which every chunk holds whole but the last
    (zero-run encoding never lengthens the bytes).  Dense digits (no zero group) reach it."""
    sizes = np.asarray(segment_sizes, dtype=np.int64)
    count = int(sizes.sum())
    return (HEADER_SIZE + 8 * sizes.size + 4 * scale_count(sizes, block) + 4 * chunk_count(count, chunk)
            + (count + 4) // 5)


def pack_header(
    *,
    encoding: int,
    flags: int,
    count: int,
    segment_count: int,
    block: int,
    chunk: int,
    chunk_count: int,
    body_length: int,
    sparsity: float,
) -> bytes:
    """Serialize a header with checksum 0 (the caller guarantees the fields are consistent).

    The checksum covers the tables and body too, so it is written last: :func:`seal` the
    assembled payload.
    """
    return _HEADER.pack(
        MAGIC, VERSION, encoding, flags, 0, count, segment_count, block, chunk,
        chunk_count, body_length, sparsity, 0,
    )


def checksum(payload: np.ndarray) -> int:
    """Adler-32 (zlib's) of the payload's bytes before and after the checksum field, in order."""
    payload = np.ascontiguousarray(payload)
    head = zlib.adler32(memoryview(payload[:CHECKSUM_OFFSET]))
    return zlib.adler32(memoryview(payload[HEADER_SIZE:]), head)


def seal(payload: np.ndarray) -> np.ndarray:
    """Write the checksum of an assembled payload (uint8 array, in place); returns the payload."""
    payload[CHECKSUM_OFFSET:HEADER_SIZE] = np.frombuffer(struct.pack("<I", checksum(payload)), np.uint8)
    return payload


def check_checksum(stored: int, computed: int) -> None:
    """Raise :class:`FormatError` unless the stored checksum equals the computed one."""
    if stored != computed:
        raise FormatError(f"checksum mismatch: the header (offset {CHECKSUM_OFFSET}) says {stored:#010x}, the bytes "
                          f"give {computed:#010x}: the payload was corrupted or truncated after it was made")


def _table(payload: np.ndarray, offset: int, count: int, dtype: str) -> np.ndarray:
    """Copy a little-endian table out of the payload (copies are aligned and native)."""
    itemsize = np.dtype(dtype).itemsize
    raw = payload[offset : offset + count * itemsize]
    return np.frombuffer(raw.tobytes(), dtype=dtype)


def parse(payload, *, computed_checksum: int | None = None) -> Layout:
    """Parse and validate a payload's header and tables.

    Checks everything that can be checked without decoding the body: magic, version, the
    checksum, field ranges, that the tables agree with each other, and that the payload's length
    is exactly what the header declares.  The body's contents are checked by the decoder.
    ``computed_checksum`` is for a caller that computed the checksum itself (the device codec
    computes it on the device and parses a host copy of the header and tables only); by default
    it is computed here.

    Raises
    ------
    FormatError
        With a message that names the field at fault.
    """
    if not isinstance(payload, np.ndarray):
        try:
            payload = np.frombuffer(memoryview(payload), dtype=np.uint8)
        except TypeError as error:
            raise FormatError(f"payload must be a uint8 array or bytes, got {type(payload).__name__}") from error
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise FormatError(f"payload must be a 1-D uint8 array, got {payload.dtype} with shape {payload.shape}")
    if payload.size < HEADER_SIZE:
        raise FormatError(f"payload truncated: {payload.size} bytes, the header alone is {HEADER_SIZE}")
    (magic, version, encoding, flags, reserved, count, segment_count, block, chunk,
     n_chunks, body_length, sparsity, stored_checksum) = _HEADER.unpack(payload[:HEADER_SIZE].tobytes())
    if magic != MAGIC:
        raise FormatError(f"bad magic {magic!r} at offset 0, expected {MAGIC!r}: not a 3LC payload")
    if version != VERSION:
        raise FormatError(f"unsupported format version {version} at offset 3 (this decoder reads version {VERSION})")
    # Before any other field: a corrupt payload is reported as corrupt, whatever field it hit.
    check_checksum(stored_checksum, checksum(payload) if computed_checksum is None else computed_checksum)
    if encoding not in (ENCODING_TERNARY, ENCODING_RAW):
        raise FormatError(f"unknown encoding {encoding} at offset 4")
    if flags & ~FLAG_NONFINITE:
        raise FormatError(f"unknown flag bits {flags:#04x} at offset 5")
    if reserved:
        raise FormatError("reserved header field (offset 6) must be zero")
    header = Header(version, encoding, flags, count, segment_count, block, chunk, n_chunks, body_length, sparsity,
                    stored_checksum)
    # Tables are bounded by the payload's own length before anything is allocated.
    if count > (1 << 40):
        raise FormatError(f"element count {count} is implausibly large (> 2**40)")
    empty_i = np.zeros(0, dtype=np.int64)
    if header.nonfinite or encoding == ENCODING_RAW:
        expected_body = 0 if header.nonfinite else 4 * count
        if segment_count or block or chunk or n_chunks:
            raise FormatError("raw and non-finite payloads carry no segments, blocks or chunks")
        if body_length != expected_body:
            raise FormatError(f"body length {body_length} does not match {expected_body} for {count} values")
        if payload.size != HEADER_SIZE + body_length:
            raise FormatError(f"payload is {payload.size} bytes, header declares {HEADER_SIZE + body_length}")
        return Layout(header, empty_i, np.zeros(0, np.float32), empty_i, np.zeros(1, np.int64),
                      payload[HEADER_SIZE:], np.zeros(1, np.int64))
    if not np.isfinite(sparsity) or not 0.0 < sparsity < 2.0:
        raise FormatError(f"sparsity {sparsity} at offset 40 is outside (0, 2)")
    if block > count and block > MAX_CHUNK:
        raise FormatError(f"block size {block} at offset 20 is implausibly large")
    if chunk == 0 or chunk % 5 or chunk > MAX_CHUNK:
        raise FormatError(f"chunk size {chunk} at offset 24 must be a positive multiple of 5 up to {MAX_CHUNK}")
    if n_chunks != chunk_count(count, chunk):
        raise FormatError(f"chunk count {n_chunks} does not match {chunk_count(count, chunk)} for {count} values")
    if HEADER_SIZE + 8 * segment_count > payload.size:
        raise FormatError(f"payload truncated in the segment table ({segment_count} segments)")
    if segment_count == 0 and count != 0:
        raise FormatError(f"{count} values but no segments")
    # The tables, read and checked in one compiled pass (kernels.read_tables); the messages here.
    (problem, index, segment_sizes, scales, chunk_lengths, chunk_offsets,
     starts) = kernels.read_tables(payload, HEADER_SIZE, count, segment_count, block, chunk, n_chunks,
                                   min(body_length, 1 << 62))  # (a larger one fits no payload: int64 in numba)
    if problem == kernels.BAD_SEGMENTS:
        total = int(_table(payload, HEADER_SIZE, segment_count, "<u8").sum(dtype=np.uint64))
        raise FormatError(f"segment sizes sum to {total}, expected {count}")
    if problem == kernels.TRUNCATED_TABLES:
        raise FormatError(f"payload truncated in the scale or chunk table ({index} scales, {n_chunks} chunks)")
    if problem == kernels.BAD_SCALE:
        raise FormatError(f"scale {index} is {scales[index]!r}: scales must be finite and non-negative")
    if problem == kernels.BAD_CHUNK_LENGTH:
        groups = kernels.chunk_groups(count, chunk, n_chunks, index)
        raise FormatError(f"chunk {index} declares {chunk_lengths[index]} coded bytes, impossible for {groups} groups")
    if problem == kernels.BAD_BODY_LENGTH:
        raise FormatError(f"chunk lengths sum to {chunk_offsets[-1]}, body length is {body_length}")
    if problem == kernels.BAD_PAYLOAD_LENGTH:
        raise FormatError(f"payload is {payload.size} bytes, header and tables declare {index + body_length}")
    offset = payload.size - body_length
    return Layout(header, segment_sizes, scales, chunk_lengths, chunk_offsets, payload[offset:], starts)
