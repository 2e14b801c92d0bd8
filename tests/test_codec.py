"""The numba codec against the numpy reference, bit for bit, plus its contract and its errors."""

from __future__ import annotations

import numpy as np
import pytest

import threelc
from threelc import format as fmt
from threelc import kernels, reference

from awkward import AWKWARD, AWKWARD_IDS, FLT_MAX

SPARSITIES = [0.3, 0.5, 1.0, 1.5, 1.9]  # below 1: the dense end (scale under the peak)


def check_against_reference(x, segments, *, sparsity, block, chunk, residual_seed=None):
    """compress/decompress equal the reference byte for byte and float for float."""
    residual = residual_ref = None
    if residual_seed is not None:
        rng = np.random.default_rng(residual_seed)
        residual = (rng.standard_normal(x.size) * 0.1).astype(np.float32)
        residual_ref = residual.copy()
    payload = threelc.compress(x, sparsity=sparsity, residual=residual, segments=segments, block=block, chunk=chunk)
    expected = reference.encode(x, sparsity=sparsity, residual=residual_ref, segments=segments,
                                block=block or 0, chunk=chunk)
    assert payload.dtype == np.uint8
    assert payload.tobytes() == expected.tobytes()
    if residual is not None:
        assert residual.tobytes() == residual_ref.tobytes()
    decoded = threelc.decompress(payload)
    assert decoded.tobytes() == reference.decode(payload).tobytes()
    return payload, decoded


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("name,x,segments", AWKWARD, ids=AWKWARD_IDS)
def test_matches_reference(name, x, segments, sparsity):
    for block in (None, 3, 1024):
        for chunk in (5, 10, fmt.DEFAULT_CHUNK):
            check_against_reference(x, segments, sparsity=sparsity, block=block, chunk=chunk)
    check_against_reference(x, segments, sparsity=sparsity, block=None, chunk=10, residual_seed=7)


def test_large_array_matches_reference_across_chunks():
    rng = np.random.default_rng(5)
    x = (rng.standard_t(3, 3 * fmt.DEFAULT_CHUNK + 17) * 1e-2).astype(np.float32)
    x[1000:50000] = 0  # a zero stretch that crosses a chunk border
    segments = [5, 40000, 60000, x.size - 100005]
    for block in (None, 1024):
        check_against_reference(x, segments, sparsity=1.5, block=block, chunk=fmt.DEFAULT_CHUNK, residual_seed=3)


def test_documented_example():
    x = np.array([0.1, -2.0, 0.9, 1.2, 0.0, 0.0], dtype=np.float32)
    assert threelc.decompress(threelc.compress(x)).tolist() == [0.0, -2.0, 0.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "groups,codes",
    [(1, [121]), (2, [243]), (14, [255]), (15, [255, 121]), (16, [255, 243]),
     (29, [255, 255, 121]), (70, [255] * 5), (71, [255] * 5 + [121])],
)
def test_zero_run_codes(groups, codes):
    """A run of k zero groups between two nonzero groups codes exactly as the spec says."""
    x = np.zeros(5 * (groups + 2), dtype=np.float32)
    x[0] = x[-1] = 1.0
    payload = threelc.compress(x)
    body = payload[-(len(codes) + 2):]
    assert body.tolist() == [81 * 2 + 27 + 9 + 3 + 1] + codes + [81 + 27 + 9 + 3 + 2]


def test_stages_match_reference():
    rng = np.random.default_rng(0)
    digits = rng.choice([0, 1, 2], size=5 * 300, p=[0.05, 0.9, 0.05]).astype(np.uint8)
    coded = np.empty(300, dtype=np.uint8)
    length = kernels._pack_zero_runs(digits, 300, coded)
    expected = reference.zero_run_encode(reference.pack(digits))
    assert coded[:length].tolist() == expected.tolist()
    assert reference.unpack(reference.zero_run_decode(expected), digits.size).tolist() == digits.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_zero_runs_of_every_length_at_every_offset_match_reference(seed):
    """Long zero stretches take the packer's eight-groups-at-once path: runs of 0..120 digits
    between nonzero digits put run ends at every offset within and across its blocks, at every
    run length modulo 14, and before the tail that the fast path leaves to single groups."""
    rng = np.random.default_rng(seed)
    for n_groups in [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 299]:
        digits = np.ones(5 * n_groups, dtype=np.uint8)
        position = int(rng.integers(0, 120))
        while position < digits.size:
            digits[position] = rng.choice([0, 2])
            position += 1 + int(rng.integers(0, 120))
        coded = np.empty(max(n_groups, 1), dtype=np.uint8)
        length = kernels._pack_zero_runs(digits, n_groups, coded)
        expected = reference.zero_run_encode(reference.pack(digits)) if n_groups else []
        assert coded[:length].tolist() == list(expected), n_groups


def test_quantization_rule_exact_halves_round_away_from_zero():
    x = np.array([1.0, 0.5, -0.5, np.nextafter(np.float32(0.5), 0), 0.25], dtype=np.float32)
    assert threelc.decompress(threelc.compress(x)).tolist() == [1.0, 1.0, -1.0, 0.0, 0.0]


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_largest_value_always_survives(sparsity):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(999).astype(np.float32)
    decoded = threelc.decompress(threelc.compress(x, sparsity=sparsity))
    peak = np.argmax(np.abs(x))
    assert np.sign(decoded[peak]) == np.sign(x[peak])
    assert np.float32(abs(decoded[peak])) == np.float32(min(float(abs(x[peak])) * float(np.float32(sparsity)), FLT_MAX))


def test_sparsity_below_one_sends_the_scale_and_feeds_back_the_excess():
    """s < 1: the scale is under the peak; values of at least scale / 2 go out as +-scale, and the
    residual keeps the rest, exactly for s >= 0.5 (Sterbenz: scale / 2 <= |v| <= 2 scale)."""
    x = np.array([1.0, 0.6, 0.3, 0.2, -0.25, -0.7], np.float32)
    residual = np.zeros(6, np.float32)
    decoded = threelc.decompress(threelc.compress(x, sparsity=0.5, residual=residual))
    assert decoded.tolist() == [0.5, 0.5, 0.5, 0.0, -0.5, -0.5]
    assert np.array_equal(decoded + residual, x)
    ramp = np.linspace(-1, 1, 10_000).astype(np.float32)
    dense, sparse = (threelc.compress(ramp, sparsity=s) for s in (0.3, 1.0))
    assert np.count_nonzero(threelc.decompress(dense)) == np.count_nonzero(np.abs(ramp) >= 0.15)  # 85%
    assert np.count_nonzero(threelc.decompress(sparse)) == np.count_nonzero(np.abs(ramp) >= 0.5)  # 50%
    assert dense.size > sparse.size


def test_all_zeros_and_huge_values_give_finite_output():
    zeros = np.zeros(50, np.float32)
    residual = np.zeros(50, np.float32)
    assert threelc.decompress(threelc.compress(zeros, residual=residual)).tolist() == [0.0] * 50
    assert not residual.any()
    huge = np.array([FLT_MAX, -FLT_MAX, FLT_MAX / 3], np.float32)
    residual = np.zeros(3, np.float32)
    decoded = threelc.decompress(threelc.compress(huge, sparsity=1.9, residual=residual))
    assert np.all(np.isfinite(decoded)) and np.all(np.isfinite(residual))
    assert decoded.tolist() == [FLT_MAX, -FLT_MAX, 0.0]


def test_residual_invariant_is_exact():
    """decoded + new residual == x + old residual exactly, step after step."""
    rng = np.random.default_rng(9)
    residual = np.zeros(5000, np.float32)
    for step in range(20):
        x = (rng.standard_t(3, 5000) * 1e-3).astype(np.float32)
        target = x + residual
        decoded = threelc.decompress(threelc.compress(x, sparsity=1.5, residual=residual, block=256))
        assert np.array_equal(decoded + residual, target), step


def test_error_feedback_bounds_the_accumulated_error():
    """With error feedback, the sum of decoded payloads tracks the sum of inputs."""
    rng = np.random.default_rng(4)
    residual = np.zeros(2000, np.float32)
    sent = np.zeros(2000, np.float64)
    true = np.zeros(2000, np.float64)
    for _ in range(200):
        x = (rng.standard_normal(2000) * 1e-3).astype(np.float32)
        true += x
        sent += threelc.decompress(threelc.compress(x, sparsity=1.9, residual=residual, block=128))
    # The gap is exactly the residual, which stays bounded while the sums grow.
    assert np.allclose(true - sent, residual, atol=1e-5)
    assert np.abs(residual).max() < 0.02 and np.abs(true).max() > 0.03


def test_decompress_add_accumulates_and_writes_into_out():
    rng = np.random.default_rng(3)
    payloads = [threelc.compress(rng.standard_normal(777).astype(np.float32), segments=[7, 770]) for _ in range(4)]
    total = np.zeros(777, np.float32)
    expected = np.zeros(777, np.float32)
    for payload in payloads:
        assert threelc.decompress_add(payload, total) is total
        expected += reference.decode(payload)
    assert total.tobytes() == expected.tobytes()
    out = np.full((7, 111), 5.0, np.float32)
    assert threelc.decompress(payloads[0], out=out) is out
    assert out.ravel().tobytes() == reference.decode(payloads[0]).tobytes()


@pytest.mark.parametrize("size", [40, 4000])
def test_decompress_add_skips_zeros_so_a_negative_zero_stays(size):
    """Both ways the decoder treats zero codes (five neutral values in a chunk where they mix with
    packed groups, 40 values; a skipped run in a chunk of nearly nothing but runs, 4000) leave ``out``
    as it is, -0.0 included; zero digits of a packed group add +0.0."""
    x = np.zeros(size, np.float32)
    x[[3, 17]] = [1.0, -1.0]
    payload = threelc.compress(x)  # zero runs, two packed groups
    out = np.full(size, -0.0, np.float32)
    out[[5, size - 1]] = 2.5
    threelc.decompress_add(payload, out)
    # Groups of five zeros are skipped: their -0.0 stays (IEEE's -0.0 + 0.0 would be +0.0); the two
    # packed groups (values 0-4 and 15-19) are added, zeros included.
    expected = np.full(size, -0.0, np.float32)
    expected[0:5] = expected[15:20] = 0.0
    expected[[3, 5, 17, size - 1]] = [1.0, 2.5, -1.0, 2.5]
    assert out.tobytes() == expected.tobytes()


def _residual_the_long_way(payload, values):
    return np.subtract(values, reference.decode(payload).reshape(values.shape))


@pytest.mark.parametrize("name,x,segments", AWKWARD, ids=AWKWARD_IDS)
def test_decompress_residual_is_values_minus_decoded_bit_for_bit(name, x, segments):
    rng = np.random.default_rng(11)
    for block in (None, 3, 1024):
        for chunk in (5, 10, fmt.DEFAULT_CHUNK):
            if not np.all(np.isfinite(x)):
                continue
            payload = threelc.compress(x, segments=segments, block=block, chunk=chunk)
            values = x.reshape(-1).copy()
            out = rng.standard_normal(values.size).astype(np.float32)  # garbage: every value is written
            assert threelc.decompress_residual(payload, values, out) is out
            assert out.tobytes() == _residual_the_long_way(payload, values).tobytes(), (name, block, chunk)
            assert values.tobytes() == x.reshape(-1).tobytes(), "values are read only"


def test_decompress_residual_in_place_and_on_other_values():
    rng = np.random.default_rng(12)
    x = (rng.standard_t(3, 100_003) * 1e-3).astype(np.float32)
    payload = threelc.compress(x, block=512, chunk=1000)
    # The hook's case: values are what was compressed; any values of the same size work alike.
    other = rng.standard_normal(x.size).astype(np.float32)
    for values in (x, other):
        expected = _residual_the_long_way(payload, values)
        in_place = values.copy()
        threelc.decompress_residual(payload, in_place, in_place)
        assert in_place.tobytes() == expected.tobytes()
        shaped = np.empty((1, x.size), np.float32)  # out of any shape with the count, like decompress's
        threelc.decompress_residual(payload, values, shaped)
        assert shaped.ravel().tobytes() == expected.tobytes()


def test_decompress_residual_keeps_negative_zero_and_signs():
    x = np.zeros(40, np.float32)
    x[[3, 17]] = [1.0, -1.0]
    payload = threelc.compress(x)
    values = np.full(40, -0.0, np.float32)
    values[[3, 5, 17]] = [0.25, 2.5, -0.25]
    out = np.empty(40, np.float32)
    threelc.decompress_residual(payload, values, out)
    # -0.0 - 0.0 is -0.0, in zero runs (copied) and in packed groups (subtracted) alike.
    assert out.tobytes() == _residual_the_long_way(payload, values).tobytes()
    assert np.signbit(out[0]) and np.signbit(out[39])
    assert out[[3, 5, 17]].tolist() == [-0.75, 2.5, 0.75]


def test_decompress_residual_of_raw_and_nonfinite_payloads():
    values = np.array([1.5, -0.0, np.float32(3e-41), 7.0], np.float32)
    raw = threelc.compress_raw(values * 2)
    out = np.empty(4, np.float32)
    threelc.decompress_residual(raw, values, out)
    assert out.tobytes() == (values - values * 2).tobytes()
    bad = np.ones(12, np.float32)
    bad[4] = np.nan
    flagged = threelc.compress(bad, nonfinite="flag")
    out = np.zeros(12, np.float32)
    threelc.decompress_residual(flagged, np.ones(12, np.float32), out)
    assert np.all(np.isnan(out))


def test_decompress_residual_refuses_bad_arguments():
    payload = threelc.compress(np.arange(20, dtype=np.float32))
    values = np.arange(20, dtype=np.float32)
    with pytest.raises(TypeError, match="values must be a float32"):
        threelc.decompress_residual(payload, values.astype(np.float64), np.empty(20, np.float32))
    with pytest.raises(TypeError, match="values must be a float32"):
        threelc.decompress_residual(payload, list(values), np.empty(20, np.float32))
    with pytest.raises(TypeError, match="out must be a float32"):
        threelc.decompress_residual(payload, values, np.empty(20, np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        threelc.decompress_residual(payload, np.arange(40, dtype=np.float32)[::2], np.empty(20, np.float32))
    with pytest.raises(ValueError, match="values has 19 values, out has 20"):
        threelc.decompress_residual(payload, values[:19], np.empty(20, np.float32))
    with pytest.raises(ValueError, match="payload holds 20"):
        threelc.decompress_residual(payload, np.zeros(21, np.float32), np.empty(21, np.float32))
    shared = np.zeros(25, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        threelc.decompress_residual(payload, shared[:20], shared[5:])
    corrupt = payload.copy()
    corrupt[-1] ^= 0xFF  # unsealed damage: the checksum catches it before out is written
    out = np.full(20, 9.0, np.float32)
    with pytest.raises(threelc.FormatError):
        threelc.decompress_residual(corrupt, values, out)
    assert np.all(out == 9.0)


def _with_residual_out(x, residual, target, **options):
    """compress with ``residual_out`` over x (``target`` "x") or into a third array ("other");
    returns (payload, x after, residual after, the new residual)."""
    x = x.copy()
    residual = residual.copy()
    out = x if target == "x" else np.full(x.shape, 7.0, np.float32)  # garbage: every value is written
    payload = threelc.compress(x, residual=residual, residual_out=out, **options)
    return payload, x, residual, out


@pytest.mark.parametrize("target", ["x", "other"])
@pytest.mark.parametrize("name,x,segments", AWKWARD, ids=AWKWARD_IDS)
def test_residual_out_is_the_in_place_update_bit_for_bit(name, x, segments, target):
    """residual_out gets the residual an update in place would leave; the residual stays as it was."""
    if not np.all(np.isfinite(x)):
        return
    rng = np.random.default_rng(13)
    for block in (None, 3, 1024):
        for chunk in (5, 10, fmt.DEFAULT_CHUNK):
            residual = (rng.standard_normal(x.size) * 0.1).astype(np.float32)
            residual[::7] = -0.0
            in_place = residual.copy()
            options = dict(segments=segments, block=block, chunk=chunk, sparsity=1.0)
            expected = threelc.compress(x, residual=in_place, **options)
            payload, x_after, residual_after, out = _with_residual_out(x.reshape(-1), residual, target, **options)
            assert payload.tobytes() == expected.tobytes(), (name, block, chunk)
            assert out.tobytes() == in_place.tobytes(), (name, block, chunk)
            assert residual_after.tobytes() == residual.tobytes(), "the residual is read only"
            if target == "other":
                assert x_after.tobytes() == x.reshape(-1).tobytes(), "x is read only"


@pytest.mark.parametrize("target", ["x", "other"])
def test_residual_out_over_blocks_takes_the_one_pass_path(monkeypatch, target):
    rng = np.random.default_rng(14)
    x = (rng.standard_t(3, 2 * fmt.DEFAULT_CHUNK + 333) * 1e-2).astype(np.float32)
    residual = (rng.standard_t(3, x.size) * 1e-3).astype(np.float32)
    segments = [7, 9000, 50000, x.size - 59007]
    in_place = residual.copy()
    expected = threelc.compress(x, residual=in_place, segments=segments, block=8192)

    def two_passes(*args, **kwargs):
        raise AssertionError("blocks with residual_out must not take the two-pass path")

    monkeypatch.setattr(kernels, "compute_scales", two_passes)
    payload, _, _, out = _with_residual_out(x, residual, target, segments=segments, block=8192)
    assert payload.tobytes() == expected.tobytes() and out.tobytes() == in_place.tobytes()


@pytest.mark.parametrize("target", ["x", "other"])
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
@pytest.mark.parametrize("position", [0, 9, 10, 13, 39, 42])
def test_residual_out_leaves_the_residual_after_nonfinite_input(bad, position, target):
    # Blocks of 4 in chunks of 10, as in the one-pass test without a residual: the bad value in a
    # unit inside a chunk, across a chunk border, or in the short last chunk.
    x = np.linspace(-1, 1, 43, dtype=np.float32)
    x[position] = bad
    residual = np.full(43, 0.125, np.float32)
    for nonfinite in ("raise", "flag"):
        work, kept = x.copy(), residual.copy()
        out = work if target == "x" else np.zeros(43, np.float32)
        if nonfinite == "raise":
            with pytest.raises(threelc.NonFiniteError, match="NaN or Inf"):
                threelc.compress(work, residual=kept, residual_out=out, block=4, chunk=10)
        else:
            payload = threelc.compress(work, residual=kept, residual_out=out, block=4, chunk=10, nonfinite="flag")
            assert threelc.payload_info(payload).nonfinite
        assert kept.tobytes() == residual.tobytes(), "the residual must not be touched"


def test_residual_out_refuses_bad_arguments():
    x = np.arange(20, dtype=np.float32)
    residual = np.zeros(20, np.float32)
    with pytest.raises(ValueError, match="residual_out needs a residual"):
        threelc.compress(x.copy(), residual_out=np.empty(20, np.float32))
    with pytest.raises(ValueError, match="residual_out has 19 values, x has 20"):
        threelc.compress(x, residual=residual, residual_out=np.empty(19, np.float32))
    with pytest.raises(TypeError, match="residual_out must be float32"):
        threelc.compress(x, residual=residual, residual_out=np.empty(20, np.float64))
    with pytest.raises(ValueError, match="residual_out must be C-contiguous"):
        threelc.compress(x, residual=residual, residual_out=np.empty(40, np.float32)[::2])
    frozen = np.empty(20, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="residual_out must be writeable"):
        threelc.compress(x, residual=residual, residual_out=frozen)
    shared = np.zeros(30, np.float32)
    with pytest.raises(ValueError, match="overlap neither"):
        threelc.compress(x, residual=shared[:20], residual_out=shared[10:])
    with pytest.raises(ValueError, match="overlap neither"):  # x itself, or apart from it
        threelc.compress(shared[:20], residual=residual, residual_out=shared[5:25])
    x_frozen = x.copy()
    x_frozen.flags.writeable = False
    with pytest.raises(ValueError, match="residual_out must be writeable"):
        threelc.compress(x_frozen, residual=residual, residual_out=x_frozen)
    # A read-only residual is fine when residual_out takes the update; it is not read-only in place.
    read_only = np.zeros(20, np.float32)
    read_only.flags.writeable = False
    threelc.compress(x.copy(), residual=read_only, residual_out=np.empty(20, np.float32))
    with pytest.raises(ValueError, match="residual must be writeable"):
        threelc.compress(x, residual=read_only)


def test_raw_payload_round_trip():
    x = np.array([1.5, -0.0, np.float32(3e-41), 7.0], np.float32)
    payload = threelc.compress_raw(x)
    assert threelc.payload_info(payload).encoding == fmt.ENCODING_RAW
    assert threelc.decompress(payload).tobytes() == x.tobytes()
    acc = np.ones(4, np.float32)
    threelc.decompress_add(payload, acc)
    assert acc.tolist() == (x + 1).tolist()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input(bad):
    x = np.ones(12, np.float32)
    x[7] = bad
    residual = np.full(12, 0.25, np.float32)
    with pytest.raises(threelc.NonFiniteError, match="NaN or Inf"):
        threelc.compress(x, residual=residual)
    payload = threelc.compress(x, residual=residual, nonfinite="flag")
    assert threelc.payload_info(payload).nonfinite
    assert np.all(residual == 0.25), "the residual must not be touched"
    assert np.all(np.isnan(threelc.decompress(payload)))
    acc = np.zeros(12, np.float32)
    assert np.all(np.isnan(threelc.decompress_add(payload, acc)))


def test_blocks_without_residual_take_the_one_pass_path(monkeypatch):
    rng = np.random.default_rng(11)
    x = (rng.standard_t(3, 2 * fmt.DEFAULT_CHUNK + 333) * 1e-2).astype(np.float32)
    segments = [7, 9000, 50000, x.size - 59007]

    def two_passes(*args, **kwargs):
        raise AssertionError("blocks without a residual must not take the two-pass path")

    monkeypatch.setattr(kernels, "compute_scales", two_passes)
    check_against_reference(x, segments, sparsity=1.0, block=8192, chunk=fmt.DEFAULT_CHUNK)
    with pytest.raises(AssertionError, match="two-pass"):  # a residual, or units longer than a chunk: two passes
        threelc.compress(x, block=8192, residual=np.zeros_like(x))
    with pytest.raises(AssertionError, match="two-pass"):
        threelc.compress(x, segments=segments)


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
@pytest.mark.parametrize("position", [0, 9, 10, 13, 39, 42])
def test_nonfinite_input_without_residual_in_one_pass(bad, position):
    # Blocks of 4 in chunks of 10 take the one-pass path: units inside a chunk ([0, 4), [12, 16),
    # [36, 40)), units across a chunk border ([8, 12) holds 9 and 10) and the short last chunk.
    x = np.linspace(-1, 1, 43, dtype=np.float32)
    x[position] = bad
    kept = x.copy()
    with pytest.raises(threelc.NonFiniteError, match="NaN or Inf"):
        threelc.compress(x, block=4, chunk=10)
    payload = threelc.compress(x, block=4, chunk=10, nonfinite="flag")
    assert threelc.payload_info(payload).nonfinite and np.all(np.isnan(threelc.decompress(payload)))
    assert kept.tobytes() == x.tobytes()
    x[position] = 0.5  # the same input made finite again codes as the reference does
    check_against_reference(x, None, sparsity=1.0, block=4, chunk=10)


def test_nonfinite_from_overflowing_residual():
    x = np.array([FLT_MAX, 1.0], np.float32)
    residual = np.array([FLT_MAX, 0.0], np.float32)
    with pytest.raises(threelc.NonFiniteError):
        threelc.compress(x, residual=residual)
    assert residual.tolist() == [FLT_MAX, 0.0]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(sparsity=2.0), ValueError, "sparsity"),
        (dict(sparsity=0.0), ValueError, "sparsity"),
        (dict(sparsity=-0.5), ValueError, "sparsity"),
        (dict(sparsity=float("nan")), ValueError, "sparsity"),
        (dict(sparsity="1.0"), ValueError, r"sparsity must be a number in \(0, 2\)"),  # not parsed from text
        (dict(sparsity=True), ValueError, "sparsity"),
        (dict(sparsity=1.99999999), ValueError, "sparsity"),  # 2.0 once rounded to float32
        (dict(segments=[3, 3]), ValueError, "sum to 6"),
        (dict(segments=[11, -1]), ValueError, "non-negative"),
        (dict(segments=[[10]]), ValueError, "1-D"),
        (dict(block=0), ValueError, "block"),
        (dict(chunk=7), ValueError, "chunk"),
        (dict(nonfinite="ignore"), ValueError, "nonfinite"),
        (dict(residual=np.zeros(9, np.float32)), ValueError, "residual has 9"),
        (dict(residual=np.zeros(10, np.float64)), TypeError, "residual must be float32"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        threelc.compress(np.ones(10, np.float32), **kwargs)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="float32"):
        threelc.compress(np.ones(10))
    with pytest.raises(ValueError, match="contiguous"):
        threelc.compress(np.ones(20, np.float32)[::2])
    payload = threelc.compress(np.ones(10, np.float32))
    with pytest.raises(ValueError, match="out has 9 values"):
        threelc.decompress(payload, out=np.zeros(9, np.float32))
    with pytest.raises(TypeError, match="float32"):
        threelc.decompress_add(payload, np.zeros(10, np.float64))
    readonly = np.zeros(10, np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        threelc.compress(np.ones(10, np.float32), residual=readonly)


def test_shapes_are_flattened():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert threelc.decompress(threelc.compress(x)).size == 12


def test_payload_from_bytes():
    payload = threelc.compress(np.linspace(-1, 1, 33, dtype=np.float32))
    assert threelc.decompress(payload.tobytes()).tobytes() == threelc.decompress(payload).tobytes()
