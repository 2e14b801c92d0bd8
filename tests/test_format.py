"""The payload format: golden fixtures, malformed payloads, fuzzing and properties."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import threelc
from threelc import format as fmt
from threelc import reference

from awkward import AWKWARD, AWKWARD_IDS

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_golden_payloads(name):
    """The codec reproduces the frozen payloads byte for byte and decodes them exactly."""
    x = np.load(FIXTURES / f"{name}.in.npy")
    golden = (FIXTURES / f"{name}.bin").read_bytes()
    expected = np.load(FIXTURES / f"{name}.out.npy")
    assert threelc.compress(x, **MANIFEST[name]).tobytes() == golden
    assert threelc.decompress(golden).tobytes() == expected.tobytes()
    assert reference.decode(golden).tobytes() == expected.tobytes()


def test_worked_example_of_format_doc():
    """docs/FORMAT.md walks through this payload byte by byte."""
    payload = (FIXTURES / "worked_example.bin").read_bytes()
    assert payload.hex() == (
        "334c430200000000" "1100000000000000" "01000000" "00000000" "00a00000" "01000000"
        "0200000000000000" "0000803f" "e103815d" "1100000000000000" "00000040" "02000000" "61f4"
    )


def _valid_payload():
    rng = np.random.default_rng(0)
    x = (rng.standard_t(3, 230) * 1e-3).astype(np.float32)
    return threelc.compress(x, sparsity=1.3, segments=[100, 130], block=50, chunk=100)


def _set(payload, offset, fmt_char, value, seal=True):
    """The payload with one field changed; resealed (a valid checksum) unless ``seal=False``,
    so the field's own check is what rejects it."""
    changed = bytearray(payload.tobytes())
    struct.pack_into("<" + fmt_char, changed, offset, value)
    changed = np.frombuffer(bytes(changed), dtype=np.uint8).copy()
    return _sealed(changed) if seal else changed


def _sealed(payload):
    return fmt.seal(payload.copy()) if payload.size >= fmt.HEADER_SIZE else payload


def _flip(payload, offset):
    flipped = payload.copy()
    flipped[offset] ^= 0xFF
    return flipped


def _malformed_cases():
    good = _valid_payload()
    layout = fmt.parse(good)
    body_start = good.size - layout.header.body_length
    table_start = fmt.HEADER_SIZE
    cases = {
        "empty": (np.zeros(0, np.uint8), "truncated"),
        "short_header": (good[:20], "truncated"),
        "bad_magic": (_set(good, 0, "3s", b"XYZ"), "bad magic"),
        "old_version": (_set(good, 3, "B", 1), "unsupported format version 1"),
        "future_version": (_set(good, 3, "B", 3), "unsupported format version 3"),
        "unknown_encoding": (_set(good, 4, "B", 9), "unknown encoding"),
        "unknown_flags": (_set(good, 5, "B", 0x80), "unknown flag"),
        "reserved": (_set(good, 6, "H", 1), "reserved"),
        "count_too_big": (_set(good, 8, "Q", 231), "segment sizes sum"),
        "count_absurd": (_set(good, 8, "Q", 1 << 50), "implausibly large"),
        "segment_count_huge": (_set(good, 16, "I", 2**32 - 1), "truncated in the segment table"),
        "chunk_not_multiple_of_5": (_set(good, 24, "I", 101), "multiple of 5"),
        "chunk_count_wrong": (_set(good, 28, "I", 2), "chunk count"),
        "body_length_wrong": (_set(good, 32, "Q", layout.header.body_length + 1), "chunk lengths sum"),
        "sparsity_out_of_range": (_set(good, 40, "f", 2.5), "sparsity"),
        "segments_do_not_sum": (_set(good, table_start, "Q", 99), "segment sizes sum"),
        "segment_over_count": (_set(good, table_start, "Q", 2**64 - 1), "segment sizes sum"),
        "no_segments": (_set(good, 16, "I", 0), "230 values but no segments"),
        "scale_table_truncated": (_set(good, 20, "I", 1), r"truncated in the scale or chunk table \(230 scales"),
        "nan_scale": (_set(good, table_start + 16, "f", float("nan")), "scale 0"),
        "negative_scale": (_set(good, table_start + 20, "f", -1.0), "scale 1"),
        "impossible_chunk_length": (_set(good, body_start - 8, "I", 10**6), "impossible"),
        "truncated_body": (_sealed(good[:-1]), "payload is"),
        "trailing_garbage": (_sealed(np.concatenate([good, np.zeros(3, np.uint8)])), "payload is"),
        # Unsealed: what corruption after encoding looks like; the checksum catches all of it.
        "checksum_field": (_set(good, fmt.CHECKSUM_OFFSET, "I", 12345, seal=False), "checksum mismatch"),
        "unsealed_truncation": (good[:-1], "checksum mismatch"),
        "unsealed_trailing_bytes": (np.concatenate([good, np.zeros(3, np.uint8)]), "checksum mismatch"),
        "unsealed_finite_scale_x1e6": (_set(good, table_start + 16, "f", 1e6 * float(layout.scales[0]), seal=False),
                                       "checksum mismatch"),
        "unsealed_huge_count": (_set(good, 8, "Q", 1 << 39, seal=False), "checksum mismatch"),
        "unsealed_flipped_body_byte": (_flip(good, body_start), "checksum mismatch"),
        "not_uint8": (good.astype(np.int16), "uint8"),
        "not_bytes": (12345, "uint8 array or bytes"),
    }
    # Body corruption: a run byte that overflows the chunk, and a chunk that ends early.
    overflow = good.copy()
    overflow[body_start] = 255
    overflow[body_start + 1] = 255
    cases["run_overflows_chunk"] = (_sealed(overflow), "chunk 0")
    return cases


MALFORMED = _malformed_cases()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_payloads_raise_format_error(name):
    payload, match = MALFORMED[name]
    with pytest.raises(threelc.FormatError, match=match):
        threelc.decompress(payload)
    assert issubclass(threelc.FormatError, ValueError)


def test_nonzero_tail_padding_is_rejected():
    payload = threelc.compress(np.array([1.0, 0.0, 0.0], np.float32))  # one group: digits 2,1,1 + 2 pad
    corrupt = payload.copy()
    corrupt[-1] = 81 * 2 + 27 + 9 + 3 * 2 + 1  # a padding digit set to +1
    fmt.seal(corrupt)
    with pytest.raises(threelc.FormatError, match="tail padding"):
        threelc.decompress(corrupt)


def test_raw_and_nonfinite_headers_are_checked():
    raw = threelc.compress_raw(np.ones(4, np.float32))
    with pytest.raises(threelc.FormatError, match="body length"):
        threelc.decompress(_set(raw, 8, "Q", 5))
    with pytest.raises(threelc.FormatError, match="checksum mismatch"):
        threelc.decompress(_flip(raw, fmt.HEADER_SIZE + 3))
    flagged = threelc.compress(np.array([np.nan], np.float32), nonfinite="flag")
    with pytest.raises(threelc.FormatError, match="carry no segments"):
        threelc.decompress(_set(flagged, 16, "I", 1))


def _decode_or_error(function, payload):
    try:
        return function(payload).tobytes()
    except threelc.FormatError:
        return "FormatError"


def test_fuzz_decoder_against_reference():
    """Random and mutated payloads: the codec gives the reference's output or FormatError.

    Every other mutated payload is resealed (a valid checksum), so the checks behind the checksum
    are fuzzed too; the unsealed ones must all be rejected.
    """
    rng = np.random.default_rng(42)
    seeds = [
        threelc.compress((rng.standard_t(3, n) * 1e-3).astype(np.float32), sparsity=s, block=b, chunk=c)
        for n, s, b, c in [(0, 1.0, None, 5), (13, 1.9, None, 5), (333, 1.0, 16, 50), (1000, 1.5, None, 100)]
    ]
    outcomes = {"ok": 0, "error": 0}
    for trial in range(3000):
        seed = seeds[trial % len(seeds)].copy()
        kind = trial % 5
        if kind == 0:  # flip a few bytes anywhere
            positions = rng.integers(0, seed.size, size=rng.integers(1, 4))
            seed[positions] = rng.integers(0, 256, size=positions.size)
            payload = seed
        elif kind == 1:  # corrupt the body only (the header stays valid)
            body = fmt.parse(seed).header.body_length
            if body:
                seed[seed.size - 1 - rng.integers(0, body)] = rng.integers(0, 256)
            payload = seed
        elif kind == 2:  # truncate or extend
            cut = int(rng.integers(0, seed.size + 5))
            payload = np.concatenate([seed, rng.integers(0, 256, 5).astype(np.uint8)])[:cut]
        elif kind == 3:  # random bytes behind a valid magic and version
            payload = rng.integers(0, 256, int(rng.integers(0, 120))).astype(np.uint8)
            payload[:4] = np.frombuffer(b"3LC\x02", np.uint8)[: payload.size]
        else:  # pure noise
            payload = rng.integers(0, 256, int(rng.integers(0, 80))).astype(np.uint8)
        mutated = not np.array_equal(payload, seeds[trial % len(seeds)])
        if trial % 2:
            payload = _sealed(payload)
        elif mutated:
            assert _decode_or_error(threelc.decompress, payload) == "FormatError", f"trial {trial}: unsealed"
        fast = _decode_or_error(threelc.decompress, payload)
        slow = _decode_or_error(reference.decode, payload)
        assert fast == slow, f"trial {trial}: codec and reference disagree"
        outcomes["error" if fast == "FormatError" else "ok"] += 1
    # Both outcomes must actually occur, or the fuzzer tests nothing.
    assert outcomes["ok"] > 100 and outcomes["error"] > 100, outcomes


float32_arrays = hnp.arrays(
    np.float32, st.integers(0, 300),
    elements=st.floats(allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=150, deadline=None)
@given(x=float32_arrays, sparsity=st.floats(1.0, 1.9921875, width=32), block=st.sampled_from([None, 1, 7, 64]))
def test_property_round_trip_of_ternary_values(x, sparsity, block):
    """Decoding gives q * scale with q in {-1, 0, 1}, exactly the reference's values."""
    payload = threelc.compress(x, sparsity=sparsity, block=block, chunk=25)
    decoded = threelc.decompress(payload)
    assert decoded.tobytes() == reference.decode(payload).tobytes()
    assert payload.tobytes() == reference.encode(x, sparsity=sparsity, block=block or 0, chunk=25).tobytes()
    assert np.all(np.sign(decoded) * np.sign(x) >= 0), "a value never changes sign"
    assert np.all(np.abs(decoded[decoded != 0]) >= np.abs(x[decoded != 0]) / 2 * 0.999999)


@settings(max_examples=100, deadline=None)
@given(x=float32_arrays, residual_scale=st.floats(0, 1e20), sparsity=st.floats(1.0, 1.9921875, width=32))
def test_property_residual_invariant(x, residual_scale, sparsity):
    """x + old residual == decoded + new residual exactly (the quantization error is kept).

    Exact float equality: the sum can differ from the target only in the sign of a zero.
    """
    residual = (np.linspace(-1, 1, x.size) * residual_scale).astype(np.float32)
    target = x + residual
    decoded = threelc.decompress(threelc.compress(x, sparsity=sparsity, residual=residual))
    assert np.array_equal(decoded + residual, target)


@settings(max_examples=100, deadline=None)
@given(x=float32_arrays, residual_scale=st.floats(0, 1e20), sparsity=st.floats(0.5, 0.99609375, width=32),
       block=st.sampled_from([None, 1, 7, 64]))
def test_property_below_one(x, residual_scale, sparsity, block):
    """s in [0.5, 1): the reference's bytes, every sent value is +-its unit's scale with the sign of
    v, and the residual keeps the rest exactly (s >= 0.5 keeps |v| within 2 scales of the scale)."""
    residual = (np.linspace(-1, 1, x.size) * residual_scale).astype(np.float32)
    residual_ref = residual.copy()
    target = x + residual
    payload = threelc.compress(x, sparsity=sparsity, residual=residual, block=block, chunk=25)
    assert payload.tobytes() == reference.encode(x, sparsity=sparsity, residual=residual_ref, block=block or 0,
                                                 chunk=25).tobytes()
    decoded = threelc.decompress(payload)
    assert np.all(np.sign(decoded) * np.sign(target) >= 0)
    assert np.array_equal(decoded + residual, target)


def test_kernels_run_without_jit():
    """The kernel bodies also run as plain Python (NUMBA_DISABLE_JIT=1), as coverage sees them."""
    script = (
        "import numpy as np, threelc\n"
        "from threelc import reference\n"
        "rng = np.random.default_rng(1)\n"
        "for n in (0, 1, 7, 61, 250):\n"
        "    x = (rng.standard_t(3, n) * 1e-3).astype(np.float32)\n"
        "    r1 = np.zeros(n, np.float32); r2 = r1.copy()\n"
        "    p = threelc.compress(x, sparsity=1.5, residual=r1, block=8, chunk=20)\n"
        "    q = reference.encode(x, sparsity=1.5, residual=r2, block=8, chunk=20)\n"
        "    assert p.tobytes() == q.tobytes() and r1.tobytes() == r2.tobytes()\n"
        "    assert threelc.decompress(p).tobytes() == reference.decode(p).tobytes()\n"
        "    p = threelc.compress(x, sparsity=1.5, chunk=200)  # 40 groups a chunk: the packer's 8-group path\n"
        "    assert p.tobytes() == reference.encode(x, sparsity=1.5, chunk=200).tobytes()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("size", [0, 1, 43, 48, 49, 5553, 70_000])
def test_checksum_is_rfc1950_adler32_of_all_bytes_but_its_field(size):
    """format.checksum (zlib) equals the reference's plain Adler-32 loop, and seal() makes parse accept."""
    payload = np.random.default_rng(size).integers(0, 256, max(size, fmt.HEADER_SIZE)).astype(np.uint8)
    covered = np.concatenate([payload[: fmt.CHECKSUM_OFFSET], payload[fmt.HEADER_SIZE :]])
    assert fmt.checksum(payload) == reference.adler32(covered)
    assert fmt.checksum(payload) == fmt.checksum(reference.seal(payload.copy()))  # the field itself is not covered
    assert reference.seal(payload.copy()).tobytes() == fmt.seal(payload.copy()).tobytes()


@pytest.mark.parametrize("name,x,segments", AWKWARD, ids=AWKWARD_IDS)
def test_max_ternary_size_bounds_every_payload_and_dense_digits_reach_it(name, x, segments):
    sizes = np.array([x.size] if segments is None else segments, dtype=np.int64)
    for block in (None, 3, 1024):
        for chunk in (5, 10, fmt.DEFAULT_CHUNK):
            bound = fmt.max_ternary_size(sizes, block or 0, chunk)
            if np.all(np.isfinite(x)):
                assert threelc.compress(x, segments=segments, block=block, chunk=chunk).size <= bound
            dense = np.where(np.arange(x.size) % 2, -1.0, 1.0).astype(np.float32)  # every digit +-1
            assert threelc.compress(dense, segments=segments, block=block, chunk=chunk).size == bound
