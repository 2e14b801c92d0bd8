"""The 3LC codec on torch tensors: the same payload bytes as :mod:`threelc.codec`, on any device.

The DDP hook keeps a CUDA bucket on its device: the residual, the quantization, the payload and
the collectives all stay there.  This module is the codec for that path.  It is written with
vectorized torch operations only (no Python loop whose length grows with the data), so the same
code runs on CUDA, on CPU in CI, and on any other torch device with float64 support; the tests
hold it to the numba codec and to :mod:`threelc.reference` byte for byte.  docs/DEVICE.md says
why torch operations rather than numba CUDA kernels, and what they cost.

Encoding, stage by stage (docs/FORMAT.md has the byte layout):

1. ``v = x + residual`` (float32).
2. Per unit (a segment, or a block of a segment): ``peak = max(max v, -min v)`` by two-level
   segmented reductions (units cut at a fixed tile grid, then pieces merged per unit) so that
   one huge segment still spreads over the whole device.  ``scale = float32(min(float64(peak) * s, FLT_MAX))``.
3. ``q = [2v >= scale] - [-2v >= scale]`` (exact in float32), digit ``q + 1``; tail padded with
   digit 1; five digits to a byte ``81a + 27b + 9c + 3d + e``.
4. Zero-run encoding without a loop over runs: a byte is emitted for every non-zero group and
   for every 14th zero group of a run (runs restart at chunk borders; the run start comes from a
   cumulative max).  The emitted groups are compacted by a cumulative sum and a scatter; the
   length of each zero piece is the distance to the next emitted group or the chunk's end, so a
   piece of 1 stays byte 121 and a piece of k >= 2 becomes 241 + k.
5. One host synchronisation reads back the body length and whether v was finite (the payload's
   size depends on both); only then is the residual updated to ``v - q * scale``, so a non-finite
   input leaves it unchanged, as in the numba codec.

Decoding reads the header and tables to the host (two small copies) and validates them with
:func:`threelc.format.parse` itself, so both codecs reject a bad header with the same
:class:`~threelc.FormatError`.  The body never leaves the device: each byte's group count is
cumulated, every chunk must end exactly on its group count, each group finds its byte by a
scatter and a cumulative sum (memory-safe even for a corrupt body), and a 243 x 5 table gives
the ternary values.  One last synchronisation reads whether the body was valid (skip it with
``validate=False`` for bytes this process produced itself).

The payload's checksum (Adler-32, docs/FORMAT.md) is computed on the device from its closed form,
``a = 1 + sum(c_k)`` and ``b = n + sum((n - k) c_k)`` (mod 65521), with int64 sums that cannot
overflow; the encoder writes it into the header without a synchronisation, and the decoder copies
it to the host together with the header, so verifying it before decoding costs no extra one.

Host synchronisations per call: compress 1 (body length and finiteness); decompress 2 for the
header and tables, plus 1 for the body check unless ``validate=False``.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch

from threelc import format as fmt
# The device codec takes the same arguments as the numba codec and must reject them with the
# same messages, so it shares the codec's argument checks instead of copying them.
from threelc.codec import NonFiniteError, check_segments, check_sparsity

__all__ = [
    "compress_tensor",
    "compress_raw_tensor",
    "decompress_tensor",
    "decompress_add_tensor",
    "payload_info_tensor",
    "TILE",
]

logger = logging.getLogger(__name__)

# Payload tables are little-endian; the codec reinterprets float32/int32 tensors as bytes.
if sys.byteorder != "little":  # pragma: no cover - every torch device in use is little-endian
    raise ImportError("threelc.hooks.device_codec assumes a little-endian host")

FLT_MAX = float(np.finfo(np.float32).max)
_ZERO_GROUP = 121  # five zero digits: 81 + 27 + 9 + 3 + 1
_RUN_BASE = 241  # a run of k zero groups (2 <= k <= 14) codes as 241 + k
_MAX_RUN = 14
#: Values per tile of the first level of the segmented max: small enough that one big segment
#: still yields thousands of independent reductions, large enough that each one is efficient.
TILE = 1 << 14

# _Q_TABLE[byte, j] is the ternary value (-1, 0, +1) of digit j of a packed byte.
_Q_TABLE = torch.tensor(
    [[(byte // 3 ** (4 - j)) % 3 - 1 for j in range(5)] for byte in range(243)], dtype=torch.float32
)
_DIGIT_WEIGHTS = torch.tensor([81, 27, 9, 3, 1], dtype=torch.uint8)


@dataclass(frozen=True)
class _Plan:
    """Everything about a (count, segments, block, chunk) layout that does not depend on values.

    The hook compresses the same bucket layout every step, so plans are cached per device.
    """

    count: int
    chunk: int
    groups: int  # 5-value groups in all: ceil(count / 5)
    n_units: int
    n_chunks: int
    segment_sizes: np.ndarray  # int64, host
    segment_table: torch.Tensor  # uint8, the payload's segment table, on the device
    unit_sizes: torch.Tensor  # int64 [n_units], values per unit
    piece_lengths: torch.Tensor  # int64 [n_pieces], units cut at the TILE grid
    unit_piece_counts: torch.Tensor  # int64 [n_units], pieces per unit (0 for an empty unit)
    chunk_last_group: torch.Tensor  # int64 [n_chunks], index of each chunk's last group
    chunk_group_ends: torch.Tensor  # int64 [n_chunks], groups in chunks 0..c together
    q_table: torch.Tensor  # float32 [243, 5], the ternary values of each packed byte
    digit_weights: torch.Tensor  # uint8 [5], 81 27 9 3 1


@functools.lru_cache(maxsize=64)
def _plan(count: int, segments: tuple, block: int, chunk: int, device: torch.device) -> _Plan:
    """Build the layout's plan once (host numpy, then a few small copies to the device)."""
    segment_sizes = np.array(segments, dtype=np.int64)
    unit_starts = fmt.unit_starts(segment_sizes, block)
    unit_sizes = np.diff(unit_starts)
    # First level of the segmented max: pieces that lie inside one unit and one tile.
    tile_starts = np.arange(0, count, TILE, dtype=np.int64)
    bounds = np.union1d(unit_starts, tile_starts)
    bounds = bounds[bounds < count] if count else bounds[:0]
    piece_lengths = np.diff(np.append(bounds, count))
    piece_unit = np.searchsorted(unit_starts, bounds, side="right") - 1
    unit_piece_counts = np.bincount(piece_unit, minlength=len(unit_sizes)).astype(np.int64)
    groups_per_chunk = chunk // 5
    groups = (count + 4) // 5
    n_chunks = fmt.chunk_count(count, chunk)
    group_ends = np.minimum(np.arange(1, n_chunks + 1, dtype=np.int64) * groups_per_chunk, groups)

    def on_device(array, dtype=torch.int64):
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype).to(device)

    return _Plan(
        count=count,
        chunk=chunk,
        groups=groups,
        n_units=len(unit_sizes),
        n_chunks=n_chunks,
        segment_sizes=segment_sizes,
        segment_table=on_device(segment_sizes.astype("<u8").view(np.uint8), torch.uint8),
        unit_sizes=on_device(unit_sizes),
        piece_lengths=on_device(piece_lengths),
        unit_piece_counts=on_device(unit_piece_counts),
        chunk_last_group=on_device(group_ends - 1),
        chunk_group_ends=on_device(group_ends),
        q_table=_Q_TABLE.to(device),
        digit_weights=_DIGIT_WEIGHTS.to(device),
    )


def _get_plan(count: int, segment_sizes: np.ndarray, block: int, chunk: int, device: torch.device) -> _Plan:
    return _plan(count, tuple(int(s) for s in segment_sizes), int(block), int(chunk), torch.device(device))


def _check_float_tensor(tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return tensor.view(-1)


def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk <= 0 or chunk % 5 \
            or chunk > fmt.MAX_CHUNK:
        raise ValueError(f"chunk must be a positive multiple of 5 up to {fmt.MAX_CHUNK}, got {chunk!r}")
    return int(chunk)


def _check_block(block) -> int:
    if block is None:
        return 0
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 1 <= block < 2**32:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    return int(block)


def _to_device(data: bytes, device: torch.device) -> torch.Tensor:
    """A small host byte string as a uint8 tensor on ``device``, without a stream synchronisation.

    A copy from pageable memory would make the host wait for the device's queued work; a pinned
    staging buffer lets the copy queue behind that work instead (torch keeps the buffer alive
    until the copy has run).
    """
    host = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


_ADLER_MODULUS = 65521


def _checksum_tensor(payload: torch.Tensor) -> torch.Tensor:
    """Adler-32 of the payload's bytes except the checksum field (``threelc.format.checksum``),
    as a 0-d int64 tensor on the payload's device; no host synchronisation."""
    covered = torch.cat([payload[: fmt.CHECKSUM_OFFSET], payload[fmt.HEADER_SIZE:]]).to(torch.int64)
    n = covered.numel()
    # Each product is below 65521 * 255 and n < 2**40, so the int64 sums cannot overflow.
    weights = torch.arange(n, 0, -1, dtype=torch.int64, device=payload.device).remainder_(_ADLER_MODULUS)
    a = (covered.sum() + 1).remainder(_ADLER_MODULUS)
    b = ((covered * weights).sum() + n).remainder(_ADLER_MODULUS)
    return b * 65536 + a


def _seal(payload: torch.Tensor) -> torch.Tensor:
    """Write the checksum into an assembled payload on its device (in place); returns it."""
    value = _checksum_tensor(payload)
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=payload.device)
    payload[fmt.CHECKSUM_OFFSET:fmt.HEADER_SIZE] = ((value >> shifts) & 0xFF).to(torch.uint8)
    return payload


def _unit_scales_per_value(scales: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Each value's scale: a broadcastable 1-element tensor for one unit, else one per value."""
    if plan.n_units == 1:
        return scales
    # output_size keeps repeat_interleave from synchronising with the device to size its output.
    return torch.repeat_interleave(scales, plan.unit_sizes, output_size=plan.count)


def _unit_scales(values: torch.Tensor, plan: _Plan, sparsity32: np.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scale per unit and a 0-d bool tensor: were all values finite?"""
    # max|v| = max(max v, -min v): two reads of v instead of writing |v| and reading it back.
    # unsafe=True skips torch's own length checks, which would synchronise; the plan built the
    # lengths to match.  Both reductions propagate NaN, and an Inf is an extreme, so a unit's
    # peak is non-finite exactly when one of its values is.
    peaks = []
    for reduction in ("max", "min"):
        piece_extremes = torch.segment_reduce(values, reduction, lengths=plan.piece_lengths, initial=0.0,
                                              unsafe=True)
        peaks.append(torch.segment_reduce(piece_extremes, reduction, lengths=plan.unit_piece_counts,
                                          initial=0.0, unsafe=True))
    # abs_ turns the -0.0 of an all-zero unit's negated minimum into the +0.0 the format stores.
    unit_peaks = torch.maximum(peaks[0], peaks[1].neg_()).abs_()
    finite = torch.isfinite(unit_peaks).all()
    # The spec takes max|v| * s in float64 and rounds once; the product of two float32 is exact.
    scales = (unit_peaks.double() * float(sparsity32)).clamp_(max=FLT_MAX).float()
    return scales, finite


def _index_dtype(groups: int) -> torch.dtype:
    """int32 group indices where they fit: half the memory traffic of int64 in the run stage."""
    return torch.int32 if groups < 2**31 - 1 else torch.int64


def _zero_run_encode(packed: torch.Tensor, groups_per_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which groups emit a coded byte, and the inclusive cumulative count of emitted groups.

    A byte is emitted for every non-zero group and for the first group of every piece of up to
    14 zero groups; runs restart at chunk borders.  The body length is the count's last entry,
    and chunk c's coded bytes end at entry ``chunk_last_group[c]``.
    """
    groups = packed.numel()
    index = torch.arange(groups, device=packed.device, dtype=_index_dtype(groups))
    zero = packed == _ZERO_GROUP
    # A zero run starts after the last non-zero group or at its chunk's first group, whichever
    # is later: cummax carries "last non-zero index + 1" forward.
    after_nonzero = torch.cummax(torch.where(zero, 0, index + 1), dim=0).values
    chunk_start = index - index.remainder(groups_per_chunk)
    position_in_run = index - torch.maximum(after_nonzero, chunk_start)
    emitted = (position_in_run.remainder(_MAX_RUN) == 0) | ~zero
    return emitted, torch.cumsum(emitted, dim=0, dtype=index.dtype)


def _quantize_stage(values: torch.Tensor, scale_per_value: torch.Tensor, digit_weights: torch.Tensor,
                    groups_per_chunk: int):
    """Ternary values, packed groups and the zero-run emission of all chunks: stages 3 and 4.

    Returns ``q`` (int8, -1/0/+1 per value), the packed bytes (uint8, one per 5-value group),
    which groups emit a coded byte, and their inclusive cumulative count.  Pure tensor code, so
    ``torch.compile`` can fuse it (see ``fuse`` in :func:`compress_tensor`).
    """
    count = values.numel()
    groups = (count + 4) // 5
    twice = values * 2.0  # may overflow to Inf, which compares like the exact 2v would
    up = twice >= scale_per_value
    down = twice.neg_() >= scale_per_value  # twice is not needed any more
    # bool is one byte 0/1: reinterpreting it as int8 saves a conversion pass in eager mode.
    q = up.view(torch.int8) - down.view(torch.int8)
    # Digits q + 1, the tail padded with digit 1 (a zero), five to a byte, first most significant.
    digits = torch.ones(5 * groups, dtype=torch.uint8, device=values.device)
    torch.add(q.view(torch.uint8), 1, out=digits[:count])
    packed = (digits.view(groups, 5) * digit_weights).sum(dim=1, dtype=torch.uint8)
    emitted, emitted_cumsum = _zero_run_encode(packed, groups_per_chunk)
    return q, packed, emitted, emitted_cumsum


@functools.lru_cache(maxsize=1)
def _fused_quantize_stage():
    """:func:`_quantize_stage` compiled by torch.compile (built once, on first use)."""
    logger.debug("threelc: compiling the fused quantize stage (torch.compile, dynamic shapes)")
    return torch.compile(_quantize_stage, dynamic=True)


def _compact_body(packed, emitted, emitted_cumsum, body_length: int, plan: _Plan) -> torch.Tensor:
    """The coded body: the emitted groups in order, zero pieces replaced by their run byte."""
    device = packed.device
    index_dtype = _index_dtype(plan.groups)
    groups_per_chunk = plan.chunk // 5
    index = torch.arange(plan.groups, device=device, dtype=index_dtype)
    # Scatter each emitted group's index to its output position; the rest go to a spare slot.
    target = torch.where(emitted, emitted_cumsum - 1, body_length).to(torch.int64)  # scatter wants int64
    sources = torch.empty(body_length + 1, dtype=index_dtype, device=device)
    sources.scatter_(0, target, index)
    sources = sources[:body_length].to(torch.int64)
    values = packed[sources]
    # A zero piece covers the groups up to the next emitted group or its chunk's end.
    following = torch.cat([sources[1:], sources.new_tensor([plan.groups])])
    chunk_end = torch.clamp((sources // groups_per_chunk + 1) * groups_per_chunk, max=plan.groups)
    piece = (torch.minimum(following, chunk_end) - sources).to(torch.uint8)
    run_byte = torch.where(piece == 1, _ZERO_GROUP, piece + _RUN_BASE).to(torch.uint8)
    return torch.where(values == _ZERO_GROUP, run_byte, values)


def compress_tensor(x: torch.Tensor, *, sparsity=1.0, residual: torch.Tensor | None = None, segments=None,
                    block=None, nonfinite: str = "flag", chunk: int = fmt.DEFAULT_CHUNK,
                    fuse: bool = False) -> torch.Tensor:
    """Compress a float32 tensor with 3LC into a payload on the same device.

    The payload's bytes equal ``threelc.compress`` on the same values and arguments.

    Parameters
    ----------
    x : torch.Tensor, float32, contiguous (any shape; read as flat), on any device
    sparsity : float in (0, 2)
    residual : torch.Tensor, float32, x's size and device, optional
        Error feedback: read, and updated in place to ``v - decompress(payload)`` where
        ``v = x + residual``.  Left unchanged if ``v`` is not finite.
    segments : sequence of int, optional
        Sizes of consecutive segments with one scale each (default: one segment).
    block : int, optional
        If given, one scale per ``block`` values within each segment.
    nonfinite : {"flag", "raise"}
        If ``v`` holds NaN or Inf: return a payload flagged non-finite (decodes to all NaN), or
        raise :class:`threelc.NonFiniteError`.  The default is "flag" (the numba codec's is
        "raise") because a DDP hook must still send something every rank can decode.
    chunk : int
        Values per independently coded chunk (a multiple of 5).
    fuse : bool
        Run the quantization, packing and zero-run stages through ``torch.compile``, which fuses
        their element-wise passes (Triton on CUDA, C++ on CPU).  The first call per device and
        shape compiles (seconds to a minute); the bytes are the same either way.

    Returns
    -------
    torch.Tensor of uint8 on ``x.device``

    Notes
    -----
    One host synchronisation: the payload's length depends on the data.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([0.1, -2.0, 0.9, 1.2, 0.0, 0.0])
    >>> decompress_tensor(compress_tensor(x))
    tensor([ 0., -2.,  0.,  2.,  0.,  0.])
    """
    x = _check_float_tensor(x, "x")
    device = x.device
    count = x.numel()
    sparsity32 = check_sparsity(sparsity)
    if nonfinite not in ("raise", "flag"):
        raise ValueError(f"nonfinite must be 'raise' or 'flag', got {nonfinite!r}")
    chunk = _check_chunk(chunk)
    block = _check_block(block)
    if residual is not None:
        residual_flat = _check_float_tensor(residual, "residual")
        if residual_flat.numel() != count:
            raise ValueError(f"residual has {residual_flat.numel()} values, x has {count}")
        if residual_flat.device != device:
            raise ValueError(f"residual is on {residual_flat.device}, x is on {device}")
    plan = _get_plan(count, check_segments(segments, count), block, chunk, device)

    values = x + residual_flat if residual is not None else x
    if count == 0:
        empty_scales = torch.zeros(plan.n_units, dtype=torch.float32, device=device)  # empty segments: scale 0
        return _assemble_payload(plan, block, sparsity32, empty_scales,
                                 torch.zeros(0, dtype=torch.int32, device=device),
                                 torch.zeros(0, dtype=torch.uint8, device=device))
    scales, finite = _unit_scales(values, plan, sparsity32)
    scale_per_value = _unit_scales_per_value(scales, plan)
    stage = _fused_quantize_stage() if fuse else _quantize_stage
    q, packed, emitted, emitted_cumsum = stage(values, scale_per_value, plan.digit_weights, chunk // 5)
    # The one host synchronisation: the payload's size depends on both of these.
    finite_flag, body_length = torch.stack([finite.to(torch.int64), emitted_cumsum[-1].to(torch.int64)]).tolist()
    if not finite_flag:
        if nonfinite == "raise":
            raise NonFiniteError("input (plus residual) holds NaN or Inf; nothing was compressed")
        header = fmt.pack_header(encoding=fmt.ENCODING_TERNARY, flags=fmt.FLAG_NONFINITE, count=count,
                                 segment_count=0, block=0, chunk=0, chunk_count=0, body_length=0,
                                 sparsity=float(sparsity32))
        return _seal(_to_device(header, device))
    if residual is not None:
        # residual = v - q * scale; q * scale is exact, so this equals the numba kernel's update.
        torch.addcmul(values, q, scale_per_value, value=-1, out=residual_flat)
    chunk_ends = emitted_cumsum[plan.chunk_last_group]
    chunk_lengths = torch.diff(chunk_ends, prepend=chunk_ends.new_zeros(1)).to(torch.int32)
    body = _compact_body(packed, emitted, emitted_cumsum, body_length, plan)
    return _assemble_payload(plan, block, sparsity32, scales, chunk_lengths, body)


def _assemble_payload(plan: _Plan, block: int, sparsity32: np.float32, scales: torch.Tensor,
                      chunk_lengths: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """Header, segment sizes, scales, chunk lengths and body, concatenated on the device."""
    header = fmt.pack_header(encoding=fmt.ENCODING_TERNARY, flags=0, count=plan.count,
                             segment_count=len(plan.segment_sizes), block=block, chunk=plan.chunk,
                             chunk_count=plan.n_chunks, body_length=body.numel(), sparsity=float(sparsity32))
    return _seal(torch.cat([
        _to_device(header, body.device),
        plan.segment_table,
        scales.view(torch.uint8),  # float32 and int32 tables are little-endian in memory
        chunk_lengths.view(torch.uint8),
        body,
    ]))


def compress_raw_tensor(x: torch.Tensor) -> torch.Tensor:
    """Wrap float32 values uncompressed in a payload (bytes equal ``threelc.compress_raw``)."""
    x = _check_float_tensor(x, "x")
    header = fmt.pack_header(encoding=fmt.ENCODING_RAW, flags=0, count=x.numel(), segment_count=0, block=0,
                             chunk=0, chunk_count=0, body_length=4 * x.numel(), sparsity=0.0)
    return _seal(torch.cat([_to_device(header, x.device), x.view(torch.uint8)]))


def _parse_on_host(payload: torch.Tensor) -> tuple[fmt.Layout, int]:
    """Validate the header and tables with :func:`threelc.format.parse`, copying only them.

    Returns the layout (its ``body`` is a placeholder, not the payload's bytes) and the body's
    offset in the payload.  Two small device-to-host copies: the header together with the
    checksum computed on the device, then the tables, whose size the header gives (an upper
    bound in block mode, where it depends on the segment sizes).
    """
    size = payload.numel()
    if size < fmt.HEADER_SIZE:
        return fmt.parse(payload.cpu().numpy()), 0  # raises: truncated
    computed = _checksum_tensor(payload)
    computed_bytes = torch.stack([(computed >> shift) & 0xFF for shift in (0, 8, 16, 24)]).to(torch.uint8)
    header_and_checksum = torch.cat([payload[: fmt.HEADER_SIZE], computed_bytes]).cpu().numpy()
    header = header_and_checksum[: fmt.HEADER_SIZE]
    computed_checksum = int(np.frombuffer(header_and_checksum[fmt.HEADER_SIZE:].tobytes(), "<u4")[0])
    prefix = header
    if size > fmt.HEADER_SIZE:
        # Field offsets from the layout in threelc.format: count 8, segment_count 16, block 20,
        # chunk_count 28.  Malformed values only change how much is copied; parse judges them.
        count, segment_count, block, _, n_chunks = (
            int(np.frombuffer(header[8:16].tobytes(), "<u8")[0]),
            *(int(v) for v in np.frombuffer(header[16:32].tobytes(), "<u4")),
        )
        n_scales = segment_count + (-(-count // block) if block else 0)
        tables_end = min(size, fmt.HEADER_SIZE + 8 * segment_count + 4 * n_scales + 4 * n_chunks)
        if tables_end > fmt.HEADER_SIZE:
            prefix = payload[:tables_end].cpu().numpy()
    # parse() checks the payload's total length too: give it a host array of the full length
    # whose unused tail is never read (np.empty does not touch the memory).
    proxy = np.empty(size, dtype=np.uint8)
    proxy[: prefix.size] = prefix
    layout = fmt.parse(proxy, computed_checksum=computed_checksum)
    return layout, size - layout.header.body_length


def payload_info_tensor(payload: torch.Tensor) -> fmt.Header:
    """The validated header of a payload held in a tensor (like ``threelc.payload_info``).

    Copies only the header and tables to the host (two small synchronisations on a device).
    """
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise fmt.FormatError("payload must be a 1-D uint8 torch.Tensor")
    return _parse_on_host(payload)[0].header


def _table_view(payload: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` 4-byte values at byte ``start`` of the payload, copied only if misaligned."""
    raw = payload[start : start + 4 * count]
    if raw.storage_offset() % 4:  # a payload sliced out of a receive buffer at an odd offset
        raw = raw.clone()
    return raw.view(dtype)


def _check_out(out, count: int, device: torch.device) -> torch.Tensor:
    flat = _check_float_tensor(out, "out")
    if flat.numel() != count:
        raise ValueError(f"out has {flat.numel()} values, the payload holds {count}")
    if flat.device != device:
        raise ValueError(f"out is on {flat.device}, the payload is on {device}")
    return flat


def _decode_groups(body: torch.Tensor, chunk_ends: torch.Tensor, plan: _Plan):
    """Expand the coded body to one packed byte per group; flag the chunks that are wrong.

    ``chunk_ends`` holds each chunk's end offset in the body (int64, on the device).  Returns the
    packed bytes (uint8, one per group) and a bool per chunk: true if its bytes do not expand to
    exactly its groups.  Memory-safe for any body: every index stays in bounds whatever the bytes
    say, so a corrupt body yields garbage values and a flag, never an out-of-bounds access.
    """
    device = body.device
    index_dtype = _index_dtype(plan.groups)
    groups_per_byte = torch.where(body > 242, body.to(index_dtype) - _RUN_BASE, 1)
    group_ends = torch.cumsum(groups_per_byte, dim=0, dtype=torch.int64)
    # Chunk c is right iff chunks 0..c together expand to exactly their groups: comparing running
    # totals flags the same first bad chunk as checking each chunk alone.
    bad_chunks = group_ends[chunk_ends - 1] != plan.chunk_group_ends
    # Each group's byte: mark where every byte's groups start, then a running count of marks.
    starts = (group_ends - groups_per_byte).clamp_(max=plan.groups)
    marks = torch.zeros(plan.groups + 1, dtype=index_dtype, device=device)
    marks.scatter_(0, starts, torch.ones(starts.shape, dtype=index_dtype, device=device))
    source = torch.cumsum(marks[: plan.groups], dim=0, dtype=index_dtype).sub_(1)
    coded = torch.index_select(body, 0, source)
    packed = torch.where(coded > 242, _ZERO_GROUP, coded).to(index_dtype)
    return packed, bad_chunks


def _decode_into(payload: torch.Tensor, out: torch.Tensor | None, accumulate: bool, validate: bool) -> torch.Tensor:
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise fmt.FormatError("payload must be a 1-D uint8 torch.Tensor")
    device = payload.device
    layout, body_offset = _parse_on_host(payload)
    header = layout.header
    count = header.count
    if out is None:
        out = torch.empty(count, dtype=torch.float32, device=device)
    flat = _check_out(out, count, device)
    if header.nonfinite:
        flat.fill_(float("nan"))  # NaN + anything is NaN, so accumulating is the same
        return out
    if header.encoding == fmt.ENCODING_RAW:
        values = _table_view(payload, body_offset, count, torch.float32)
        if accumulate:
            flat.add_(values)
        else:
            flat.copy_(values)
        return out
    if count == 0:
        return out
    plan = _get_plan(count, layout.segment_sizes, header.block, header.chunk, device)
    # The tables are read from the device copy of the payload: no host-to-device copies.
    scales_offset = fmt.HEADER_SIZE + 8 * header.segment_count
    scales = _table_view(payload, scales_offset, len(layout.scales), torch.float32)
    chunk_lengths = _table_view(payload, scales_offset + 4 * len(layout.scales), plan.n_chunks, torch.int32)
    chunk_ends = torch.cumsum(chunk_lengths, dim=0, dtype=torch.int64)
    packed, bad_chunks = _decode_groups(payload[body_offset:], chunk_ends, plan)
    ternary = torch.index_select(plan.q_table, 0, packed).view(-1)
    scale_per_value = _unit_scales_per_value(scales, plan)
    values = ternary[:count]
    if accumulate:
        # out + 1 * q * scale: the product is exact, so this is the numba kernel's out += q * scale.
        flat.addcmul_(values, scale_per_value)
    else:
        torch.mul(values, scale_per_value, out=flat)
    if validate:
        # Only the last chunk can end in a partial group; its padding digits must be zeros.
        bad_chunks[-1] |= ternary[count:].ne(0).any()
        chunk_index = torch.arange(plan.n_chunks, device=device)
        first_bad = int(torch.where(bad_chunks, chunk_index, plan.n_chunks).min())
        if first_bad < plan.n_chunks:
            raise fmt.FormatError(f"chunk {first_bad}: coded bytes do not decode to exactly its values "
                                  "(corrupt body or non-zero tail padding)")
    return out


def decompress_tensor(payload: torch.Tensor, out: torch.Tensor | None = None, *, accumulate: bool = False,
                      validate: bool = True) -> torch.Tensor:
    """Decode a payload held in a uint8 tensor into float32 values on the payload's device.

    The values equal ``threelc.decompress`` of the same bytes, bit for bit.

    Parameters
    ----------
    payload : torch.Tensor, uint8, 1-D, on any device
    out : torch.Tensor, float32, contiguous, on the payload's device, optional
        Written in place (any shape with the payload's element count); allocated if omitted.
    accumulate : bool
        Add the decoded values into ``out`` instead of overwriting it.
    validate : bool
        Check that the body expands to exactly the declared values (one host synchronisation).
        Header and tables are always validated.  With ``validate=False`` a corrupt body gives
        unspecified values but never an out-of-bounds access: meant for bytes this process made.

    Raises
    ------
    FormatError
        If the payload is malformed (same messages as the numba codec).  ``out`` may then hold
        partial output.
    """
    return _decode_into(payload, out, accumulate, validate)


def decompress_add_tensor(payload: torch.Tensor, out: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Decode a payload and add its values into ``out`` in place; returns ``out``.

    The device twin of ``threelc.decompress_add``: summing N payloads needs no temporaries
    beyond one payload's decoded digits.
    """
    return _decode_into(payload, out, True, validate)
