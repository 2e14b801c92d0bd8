"""The torch device codec against the numba codec and the reference, byte for byte, on CPU.

The device codec promises the same payload bytes, the same residual bits and the same decoded
bits as :mod:`threelc.codec`; every test here asserts exactly that, on CPU tensors, so CI checks
the GPU path's arithmetic without a GPU.  launch/bench/gpu_check.py repeats the identity on CUDA.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import threelc
from threelc import format as fmt
from threelc import reference
from threelc.hooks.device_codec import (
    compress_raw_tensor,
    compress_tensor,
    decompress_add_tensor,
    decompress_tensor,
    payload_info_tensor,
)

from awkward import AWKWARD, AWKWARD_IDS, FLT_MAX, TINY

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SPARSITIES = [0.3, 0.5, 1.0, 1.5, 1.9]


def bits(array) -> bytes:
    """The exact bytes of a float array (NaN payloads and signed zeros included)."""
    if isinstance(array, torch.Tensor):
        array = array.numpy()
    return np.ascontiguousarray(array).tobytes()


def check_same_bytes(x, segments=None, *, sparsity=1.0, block=None, chunk=fmt.DEFAULT_CHUNK, residual_seed=None,
                     with_reference=False):
    """Device payload, residual and decoded values equal the numba codec's, bit for bit."""
    residual_numba = residual_device = None
    if residual_seed is not None:
        rng = np.random.default_rng(residual_seed)
        residual_numba = (rng.standard_normal(x.size) * 0.1).astype(np.float32)
        residual_device = torch.from_numpy(residual_numba.copy())
    expected = threelc.compress(x, sparsity=sparsity, residual=residual_numba, segments=segments, block=block,
                                chunk=chunk, nonfinite="flag")
    payload = compress_tensor(torch.from_numpy(x.copy()), sparsity=sparsity, residual=residual_device,
                              segments=segments, block=block, chunk=chunk)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert bits(payload) == expected.tobytes()
    if residual_seed is not None:
        assert bits(residual_device) == residual_numba.tobytes()
    if with_reference and residual_seed is None:
        assert expected.tobytes() == reference.encode(x, sparsity=sparsity, segments=segments, block=block or 0,
                                                      chunk=chunk).tobytes()
    decoded = decompress_tensor(payload)
    assert decoded.dtype == torch.float32 and decoded.shape == (x.size,)
    assert bits(decoded) == threelc.decompress(expected).tobytes()
    return payload


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("name,x,segments", AWKWARD, ids=AWKWARD_IDS)
def test_awkward_arrays_match_numba_codec(name, x, segments, sparsity):
    for block, chunk in ((None, 5), (None, fmt.DEFAULT_CHUNK), (3, 10), (1024, 50)):
        check_same_bytes(x, segments, sparsity=sparsity, block=block, chunk=chunk)
    check_same_bytes(x, segments, sparsity=sparsity, chunk=10, with_reference=True)
    check_same_bytes(x, segments, sparsity=sparsity, block=3, chunk=50, residual_seed=7)


@pytest.mark.parametrize("groups", [1, 2, 13, 14, 15, 16, 28, 29, 70, 71])
@pytest.mark.parametrize("chunk", [10, 75, fmt.DEFAULT_CHUNK])
def test_zero_runs_split_at_chunk_borders(groups, chunk):
    # A zero run placed at every offset relative to the chunk grid, so runs start, end and get
    # cut exactly at chunk borders.
    for lead in (0, 4, 13):
        x = np.zeros(5 * (lead + groups + 3) + 2, np.float32)
        x[: 5 * lead] = 0.8
        x[5 * (lead + groups) :] = -0.9
        check_same_bytes(x, sparsity=1.0, chunk=chunk, with_reference=True)


def test_large_array_with_many_segments_blocks_and_residual():
    rng = np.random.default_rng(5)
    x = (rng.standard_t(3, 3 * fmt.DEFAULT_CHUNK + 17) * 1e-2).astype(np.float32)
    x[1000:50000] = 0  # a zero stretch that crosses a chunk border
    segment_sizes = [5, 0, 40000, 60000, 3, x.size - 100008]
    for block in (None, 1024, 7):
        check_same_bytes(x, segment_sizes, sparsity=1.5, block=block, residual_seed=3)
    check_same_bytes(x, [1] * 1000 + [x.size - 1000], sparsity=1.2, chunk=55, residual_seed=4)


def test_extreme_magnitudes():
    values = np.array([FLT_MAX, -FLT_MAX, FLT_MAX * 0.75, -FLT_MAX / 2, FLT_MAX / 2 * 0.999999,
                       TINY, -TINY, 3 * TINY, 1e-39, 0.0, -0.0], np.float32)
    for sparsity in (1.0, 1.5, np.nextafter(np.float32(2.0), np.float32(0.0))):
        check_same_bytes(values, sparsity=float(sparsity), chunk=10, with_reference=True)
        check_same_bytes(values[5:], sparsity=float(sparsity), with_reference=True)  # subnormals only
        check_same_bytes(values, [2, 3, 6], sparsity=float(sparsity), residual_seed=11)


def test_error_feedback_over_steps_stays_bitwise_equal():
    rng = np.random.default_rng(8)
    residual_numba = np.zeros(1003, np.float32)
    residual_device = torch.zeros(1003)
    for step in range(5):
        x = (rng.standard_normal(1003) * 10.0 ** -step).astype(np.float32)
        expected = threelc.compress(x, sparsity=1.7, residual=residual_numba, segments=[500, 503], block=64,
                                    chunk=100)
        payload = compress_tensor(torch.from_numpy(x), sparsity=1.7, residual=residual_device,
                                  segments=[500, 503], block=64, chunk=100)
        assert bits(payload) == expected.tobytes()
        assert bits(residual_device) == residual_numba.tobytes()


def test_decode_into_out_and_accumulate():
    rng = np.random.default_rng(9)
    x = rng.standard_normal(777).astype(np.float32)
    payload = threelc.compress(x, sparsity=1.3, segments=[700, 77], block=100, chunk=55)
    base = rng.standard_normal(777).astype(np.float32)
    expected = threelc.decompress_add(payload, base.copy())
    out = torch.from_numpy(base.copy()).reshape(7, 111)
    returned = decompress_add_tensor(torch.from_numpy(payload), out)
    assert returned is out and bits(out) == expected.tobytes()
    out = torch.from_numpy(base.copy())
    decompress_tensor(torch.from_numpy(payload), out, accumulate=True)
    assert bits(out) == expected.tobytes()
    out = torch.full((777,), 5.0)
    decompress_tensor(torch.from_numpy(payload), out)
    assert bits(out) == threelc.decompress(payload).tobytes()


def test_nonfinite_input_is_flagged_and_residual_left_alone():
    x = np.array([1.0, 2.0, np.nan, 4.0, -1.0, 0.5], np.float32)
    residual = torch.full((6,), 0.25)
    payload = compress_tensor(torch.from_numpy(x), residual=residual)
    assert bits(payload) == threelc.compress(x, nonfinite="flag").tobytes()
    assert threelc.payload_info(payload.numpy()).nonfinite
    assert torch.equal(residual, torch.full((6,), 0.25))
    assert torch.isnan(decompress_tensor(payload)).all()
    out = torch.ones(6)
    decompress_add_tensor(payload, out)
    assert torch.isnan(out).all()
    # Finite x whose sum with the residual overflows is non-finite too.
    big = torch.full((6,), FLT_MAX)
    overflow = compress_tensor(big.clone(), residual=big.clone())
    assert bits(overflow) == threelc.compress(np.full(6, FLT_MAX, np.float32), residual=np.full(6, FLT_MAX, np.float32),
                                              nonfinite="flag").tobytes()
    with pytest.raises(threelc.NonFiniteError):
        compress_tensor(torch.tensor([np.inf, 1.0]), nonfinite="raise")


def test_raw_payloads_match():
    x = np.random.default_rng(2).standard_normal(13).astype(np.float32)
    payload = compress_raw_tensor(torch.from_numpy(x))
    assert bits(payload) == threelc.compress_raw(x).tobytes()
    assert bits(decompress_tensor(payload)) == x.tobytes()


def test_payload_info_matches_numba_codec():
    x = np.random.default_rng(6).standard_normal(321).astype(np.float32)
    for payload in (threelc.compress(x, segments=[300, 21], block=16, chunk=50, sparsity=1.25),
                    threelc.compress_raw(x), threelc.compress(np.full(3, np.nan, np.float32), nonfinite="flag")):
        assert payload_info_tensor(torch.from_numpy(payload)) == threelc.payload_info(payload)
    with pytest.raises(fmt.FormatError):
        payload_info_tensor(torch.zeros(47, dtype=torch.uint8))


def test_misaligned_payload_tensor_decodes():
    x = np.random.default_rng(3).standard_normal(101).astype(np.float32)
    for payload in (threelc.compress(x, segments=[50, 51], chunk=20), threelc.compress_raw(x)):
        buffer = torch.zeros(payload.size + 3, dtype=torch.uint8)
        buffer[3:] = torch.from_numpy(payload)
        assert bits(decompress_tensor(buffer[3:])) == threelc.decompress(payload).tobytes()


def test_documented_example():
    x = torch.tensor([0.1, -2.0, 0.9, 1.2, 0.0, 0.0])
    assert decompress_tensor(compress_tensor(x)).tolist() == [0.0, -2.0, 0.0, 2.0, 0.0, 0.0]


def test_argument_errors_match_numba_codec():
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="sparsity"):
        compress_tensor(x, sparsity=2.0)
    with pytest.raises(ValueError, match="chunk"):
        compress_tensor(x, chunk=12)
    with pytest.raises(ValueError, match="block"):
        compress_tensor(x, block=0)
    with pytest.raises(ValueError, match="segment sizes sum"):
        compress_tensor(x, segments=[3, 3])
    with pytest.raises(ValueError, match="residual"):
        compress_tensor(x, residual=torch.zeros(9))
    with pytest.raises(TypeError, match="float32"):
        compress_tensor(x.double())
    with pytest.raises(ValueError, match="out has"):
        decompress_tensor(torch.from_numpy(threelc.compress(np.zeros(10, np.float32))), torch.zeros(9))


# ---- malformed payloads: the same FormatError as the numba codec --------------------------------

def _same_error(payload: np.ndarray):
    """Both decoders reject the payload with the same FormatError message, as it is (most
    corruptions then fail the checksum) and resealed (so the check behind the checksum runs)."""
    variants = [payload] + ([fmt.seal(payload.copy())] if payload.size >= fmt.HEADER_SIZE else [])
    for variant in variants:
        with pytest.raises(fmt.FormatError) as numba_error:
            threelc.decompress(variant)
        with pytest.raises(fmt.FormatError) as device_error:
            decompress_tensor(torch.from_numpy(variant.copy()))
        assert str(device_error.value) == str(numba_error.value)


def _with_body(payload: np.ndarray, body: list[int]) -> np.ndarray:
    """The payload with its (single-chunk) body replaced by ``body`` and the tables adjusted."""
    layout = fmt.parse(payload)
    header = layout.header
    assert header.chunk_count == 1
    table_end = payload.size - header.body_length
    new = np.concatenate([payload[:table_end], np.array(body, np.uint8)])
    new[32:40] = np.frombuffer(np.array([len(body)], "<u8").tobytes(), np.uint8)  # body_length
    new[table_end - 4 : table_end] = np.frombuffer(np.array([len(body)], "<u4").tobytes(), np.uint8)
    return fmt.seal(new)


def test_truncated_and_corrupt_headers():
    payload = threelc.compress(np.random.default_rng(4).standard_normal(200).astype(np.float32), segments=[150, 50],
                               block=64, chunk=50)
    for cut in (0, 1, 47, 48, 55, 60, 80, payload.size - 1):
        _same_error(payload[:cut])
    _same_error(np.concatenate([payload, np.zeros(1, np.uint8)]))
    for offset, value in ((0, ord("X")), (3, 1), (4, 7), (5, 4), (6, 1), (24, 7), (28, 9), (43, 0x40), (16, 9), (20, 0)):
        corrupt = payload.copy()
        corrupt[offset] = value
        _same_error(corrupt)
    scales_offset = fmt.HEADER_SIZE + 8 * 2
    corrupt = payload.copy()
    corrupt[scales_offset : scales_offset + 4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    _same_error(corrupt)


def test_corrupt_bodies():
    ones = np.ones(13, np.float32)  # 3 groups, the last with two padding digits
    payload = threelc.compress(ones)
    assert list(fmt.parse(payload).body) == [242, 242, 81 * 2 + 27 * 2 + 9 * 2 + 3 + 1]
    _same_error(_with_body(payload, [242, 242, 242]))  # padding digits 2 instead of 1
    _same_error(_with_body(payload, [255, 242]))  # 14 + 1 groups for a 3-group chunk
    _same_error(_with_body(payload, [244, 242]))  # 3 + 1 groups
    _same_error(_with_body(payload, [243]))  # 2 groups for 3
    zeros = threelc.compress(np.zeros(70, np.float32), chunk=35)  # two chunks of 7 groups: [248] [248]
    body_offset = zeros.size - 2
    assert list(zeros[body_offset:]) == [248, 248]
    for first, second in ((247, 248), (248, 249), (249, 247), (255, 241)):
        corrupt = zeros.copy()
        corrupt[body_offset:] = [first, second]
        _same_error(corrupt)


def test_valid_bodies_the_encoder_never_writes_decode_like_numba():
    # The format allows other splits of a zero run than the encoder's greedy one.
    ones = threelc.compress(np.ones(13, np.float32))
    zeros = threelc.compress(np.zeros(140, np.float32))  # 28 groups, encoded [255, 255]
    for payload, body in ((ones, [242, 243]), (ones, [244]), (ones, [243, 238]),
                          (zeros, [248] * 4), (zeros, [121] * 28), (zeros, [254, 254, 243])):
        candidate = _with_body(payload, body)
        assert bits(decompress_tensor(torch.from_numpy(candidate))) == threelc.decompress(candidate).tobytes()


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_fused_stage_gives_the_same_bytes():
    # torch.compile (inductor) fuses the element-wise passes; every operation in the stage is
    # exact, so fusion must not change a bit.  One compile (dynamic shapes) serves all cases.
    rng = np.random.default_rng(12)
    for size, segment_sizes, block, chunk in ((1003, [500, 503], 64, 100), (4096, [1, 4000, 95], None, 55),
                                              (70, [35, 35], None, 10)):
        x = (rng.standard_t(3, size) * 1e-2).astype(np.float32)
        x[size // 4 : size // 2] = 0
        residual_numba = (rng.standard_normal(size) * 1e-3).astype(np.float32)
        residual_device = torch.from_numpy(residual_numba.copy())
        expected = threelc.compress(x, sparsity=1.5, residual=residual_numba, segments=segment_sizes, block=block,
                                    chunk=chunk)
        payload = compress_tensor(torch.from_numpy(x), sparsity=1.5, residual=residual_device,
                                  segments=segment_sizes, block=block, chunk=chunk, fuse=True)
        assert bits(payload) == expected.tobytes()
        assert bits(residual_device) == residual_numba.tobytes()


# ---- golden fixtures -----------------------------------------------------------------------------

def _golden_cases():
    manifest = FIXTURES / "manifest.json"
    if not manifest.exists():
        return []
    return sorted(json.loads(manifest.read_text()).items())


@pytest.mark.parametrize("name,kwargs", _golden_cases(), ids=[name for name, _ in _golden_cases()])
def test_golden_fixtures(name, kwargs):
    x = np.load(FIXTURES / f"{name}.in.npy")
    payload = np.frombuffer((FIXTURES / f"{name}.bin").read_bytes(), dtype=np.uint8)
    expected = np.load(FIXTURES / f"{name}.out.npy")
    assert bits(decompress_tensor(torch.from_numpy(payload.copy()))) == expected.tobytes()
    kwargs = dict(kwargs)
    kwargs.setdefault("nonfinite", "flag")
    assert bits(compress_tensor(torch.from_numpy(x.copy()), **kwargs)) == payload.tobytes()


# ---- property test --------------------------------------------------------------------------------

_values = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, FLT_MAX, float(TINY)]),
)


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.one_of(_values, st.just(0.0)), max_size=120),
    cuts=st.lists(st.integers(0, 120), max_size=5),
    sparsity=st.floats(1.0, 1.9990234375, width=32),
    block=st.one_of(st.none(), st.integers(1, 40)),
    chunk=st.sampled_from([5, 10, 15, 50, fmt.DEFAULT_CHUNK]),
    residual_seed=st.one_of(st.none(), st.integers(0, 3)),
)
def test_property_device_and_numba_payloads_are_identical(values, cuts, sparsity, block, chunk, residual_seed):
    x = np.array(values, np.float32)
    bounds = sorted({min(c, x.size) for c in cuts} | {0, x.size})
    segments = np.diff(bounds).tolist() if x.size else None
    check_same_bytes(x, segments, sparsity=sparsity, block=block, chunk=chunk, residual_seed=residual_seed)


# ---- the prepared GPU check runs on CPU ----------------------------------------------------------

def test_gpu_check_script_runs_on_cpu(tmp_path):
    from threelc.launch.bench import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--numel", "20000", "--repeats", "1", "--no-nccl", "--no-fuse",
                           "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["identical"] is True
    assert report["device"] == "cpu"
    assert report["encode_gbps"] > 0 and report["decode_gbps"] > 0 and report["copy_gbps"] > 0


@pytest.mark.slow
def test_gpu_check_exchange_runs_on_gloo():
    # The NCCL step's code (size exchange, padded all_gather, decode, average, comparison with
    # the numba codec) run with gloo on CPU, so a GPU session does not find its bugs.
    from threelc.launch.bench import gpu_check

    report = gpu_check.run_exchange(20003, "cpu", timeout_s=120.0)
    assert report["ok"], report.get("error")
    assert report["ranks_agree"] and report["matches_cpu_codec"]
    assert len(report["payload_bytes"]) == 2


def test_gpu_check_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from threelc.launch.bench import gpu_check

    assert gpu_check.main(["--out", "/dev/null"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("size", [48, 49, 1000, 300_001])
def test_device_checksum_equals_zlib(size):
    """The vectorized Adler-32 gives zlib's value, also where the int64 sums are large."""
    from threelc.hooks.device_codec import _checksum_tensor

    payload = np.random.default_rng(size).integers(200, 256, size).astype(np.uint8)  # large bytes: large sums
    assert int(_checksum_tensor(torch.from_numpy(payload))) == fmt.checksum(payload)
