"""``threelc bench codec``: codec compression ratio and throughput against memory bandwidth.

Every figure is measured in one run on one array: the single-thread ``np.copyto`` rate of the
array is the yardstick, and each codec rate is also printed as a ratio to it.  A copy moves 8
bytes per value; encoding with error feedback and one scale per segment moves ~20 (two passes),
so ~0.4x the copy rate is its ceiling; decoding writes 4 bytes per value (ceiling ~2x).

This module is also ``threelc bench`` itself (:func:`add_arguments`, :func:`run`): ``codec`` runs
here, ``train`` in :mod:`threelc.launch.bench.bench_train`.  It lives in ``threelc.launch``, not
in the codec package, because ``--compare`` captures real gradients from the examples (torch);
``threelc bench codec`` alone still never imports torch.

The payload checksum (format version 2) is timed on its own and reported as a share of the
single-thread encode and decode times: every encode writes it and every decode verifies it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numba
import numpy as np

from threelc import codec
from threelc import format as payload_format

__all__ = ["add_arguments", "run", "gradient_like", "bench_codec", "bench_compare"]


def gradient_like(numel: int, seed: int = 0) -> np.ndarray:
    """A heavy-tailed float32 array shaped like a gradient (Student t, 3 degrees of freedom)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, numel) * 1e-3).astype(np.float32)


def _best_seconds(function, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls, after one untimed warm-up call."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def bench_codec(numel: int, sparsities, repeats: int, block: int = 1024) -> dict:
    """Measure ratio and encode/decode GB/s (of float32 input) on 1 thread and on all cores."""
    x = gradient_like(numel)
    gigabytes = x.nbytes / 1e9
    copy_target = np.empty_like(x)
    copy_rate = gigabytes / _best_seconds(lambda: np.copyto(copy_target, x), repeats)
    all_cores = numba.config.NUMBA_NUM_THREADS
    results = {
        "numel": numel,
        "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "numba_threads": all_cores, "numba": numba.__version__, "numpy": np.__version__},
        "copy_gbps": copy_rate,
        "rows": [],
    }
    residual = np.zeros_like(x)
    out = np.empty_like(x)
    for sparsity in sparsities:
        for mode, block_size in (("segment", None), (f"block{block}", block)):
            payload = codec.compress(x, sparsity=sparsity, block=block_size)
            row = {"sparsity": sparsity, "scales": mode, "ratio": x.nbytes / payload.size,
                   "payload_bytes": int(payload.size)}
            for threads, label in ((1, "1t"), (all_cores, "all")):
                numba.set_num_threads(threads)
                encode = _best_seconds(lambda: codec.compress(x, sparsity=sparsity, residual=residual,
                                                              block=block_size), repeats)
                decode = _best_seconds(lambda: codec.decompress(payload, out=out), repeats)
                row[f"encode_gbps_{label}"] = gigabytes / encode
                row[f"decode_gbps_{label}"] = gigabytes / decode
                if threads == 1:
                    # Encoding without a residual argument (one pass with blocks: the hook's encode
                    # until it passed its residual with residual_out), with the residual read and
                    # the new residual written elsewhere in that pass (the hook's since: it passes
                    # the bucket itself as residual_out; a third array here keeps x as it is), and
                    # summing payloads into one buffer (zero groups are skipped).
                    hook_encode = _best_seconds(lambda: codec.compress(x, sparsity=sparsity, block=block_size), repeats)
                    row["encode_hook_gbps_1t"] = gigabytes / hook_encode
                    feedback_encode = _best_seconds(lambda: codec.compress(x, sparsity=sparsity, residual=residual,
                                                                           residual_out=out, block=block_size), repeats)
                    row["encode_residual_out_gbps_1t"] = gigabytes / feedback_encode
                    add = _best_seconds(lambda: codec.decompress_add(payload, out), repeats)
                    row["decode_add_gbps_1t"] = gigabytes / add
                    # Error feedback's update, residual = v - decoded: in one pass (the hook's),
                    # and as decode-then-subtract, the way it was made before.
                    feedback = _best_seconds(lambda: codec.decompress_residual(payload, x, out), repeats)
                    row["feedback_gbps_1t"] = gigabytes / feedback
                    two_pass = _best_seconds(lambda: np.subtract(x, codec.decompress(payload, out=out), out=out),
                                             repeats)
                    row["feedback_two_pass_gbps_1t"] = gigabytes / two_pass
                    checksum = _best_seconds(lambda: payload_format.checksum(payload), repeats)
                    row["checksum_share_encode_1t"] = checksum / encode
                    row["checksum_share_decode_1t"] = checksum / decode
            numba.set_num_threads(all_cores)
            results["rows"].append(row)
    return results


def _general_compressors():
    """name -> compress function for the general-purpose compressors that are installed."""
    compressors = {}
    try:
        import zstandard
    except ImportError:  # the `bench` extra is optional
        zstandard = None
    if zstandard is not None:
        for level in (1, 3):
            compressors[f"zstd-{level}"] = zstandard.ZstdCompressor(level=level).compress
    try:
        import lz4.frame
    except ImportError:
        lz4 = None
    if lz4 is not None:
        compressors["lz4"] = lz4.frame.compress
    return compressors


#: 3LC in the comparison: (sparsity, block): one scale per tensor (the paper's) at both ends of
#: s, and the DDP hook's default, one scale per 8192-value block.
COMPARE_SETTINGS = ((1.0, None), (1.9, None), (1.0, 8192))


def bench_compare(arrays: dict, repeats: int) -> list[dict]:
    """Ratio and single-thread GB/s of 3LC, fp16 and general compressors on the same arrays.

    ``arrays`` maps a name to (float32 array, segment sizes or None).  General compressors run
    on the raw float32 bytes and, stacked, on the 3LC payload; every rate counts float32 input
    bytes, so the columns compare directly.
    """
    numba.set_num_threads(1)
    rows = []
    try:
        for name, (x, segments) in arrays.items():
            gigabytes = x.nbytes / 1e9

            def add(method, payload_bytes, seconds):
                rows.append({"data": name, "method": method, "ratio": x.nbytes / payload_bytes,
                             "gbps": gigabytes / seconds})

            add("fp16 cast", x.nbytes // 2, _best_seconds(lambda: x.astype(np.float16), repeats))
            raw = x.tobytes()
            for label, function in _general_compressors().items():
                add(f"{label} (float32)", len(function(raw)), _best_seconds(lambda: function(raw), repeats))
            for sparsity, block in COMPARE_SETTINGS:
                residual = np.zeros_like(x)
                payload = codec.compress(x, sparsity=sparsity, segments=segments, block=block)
                seconds = _best_seconds(lambda: codec.compress(x, sparsity=sparsity, segments=segments, block=block,
                                                               residual=residual), repeats)
                label = f"3LC s={sparsity} " + ("tensor" if block is None else f"block{block}")
                add(label, payload.size, seconds)
                payload_bytes = payload.tobytes()
                for general, function in _general_compressors().items():
                    stacked = len(function(payload_bytes))
                    extra = _best_seconds(lambda: function(payload_bytes), repeats)
                    add(f"{label} + {general}", stacked, seconds + extra)
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return rows


def _print_compare(rows: list[dict]) -> None:
    print()
    print("Against general compressors (single thread; GB/s of float32 input; 3LC with error feedback)")
    print("{:>22} {:>26} {:>9} {:>8}".format("data", "method", "ratio", "GB/s"))
    for row in rows:
        print("{:>22} {:>26} {:>8.1f}x {:>8.3f}".format(row["data"], row["method"], row["ratio"], row["gbps"]))


def _captured_arrays(numel: int) -> dict:
    """The synthetic array and real gradients of both examples (per-parameter segments)."""
    from .gradients import capture_gradients

    arrays = {"heavy-tailed synthetic": (gradient_like(numel), None)}
    arrays["digits CNN (w=96) grads"] = capture_gradients("digits", 96)
    arrays["char transformer grads"] = capture_gradients("text", 128)
    return arrays


def _print_table(results: dict) -> None:
    copy = results["copy_gbps"]
    machine = results["machine"]
    print(f"3LC codec on {results['numel']:,} float32 values (heavy-tailed), {machine['cores']} cores, "
          f"numba {machine['numba']} with {machine['numba_threads']} threads")
    print(f"single-thread np.copyto: {copy:.2f} GB/s (the yardstick; 'x' columns are ratios to it)")
    print("encode runs with error feedback; GB/s counts float32 input bytes")
    print("'cksum': the payload checksum's time as a share of the single-thread encode / decode time")
    print("'add 1t': decompress_add, decoding into a sum (the hook's path), single thread")
    print("'hook 1t': encode without the residual argument (with blocks, one pass over memory), single thread")
    print("'r-out 1t': encode with the residual and residual_out (with blocks, one pass that also reads the")
    print("            residual and writes the new one: the hook's encode), single thread")
    print("'fb 1t': error feedback's update residual = v - decoded (decompress_residual, the hook's path);")
    print("         '2-pass': the same as decompress, then np.subtract; single thread")
    header = ("s", "scales", "ratio", "enc 1t GB/s", "x", "enc all", "x", "hook 1t", "x", "r-out 1t", "x",
              "dec 1t GB/s", "x", "dec all", "x", "add 1t", "x", "fb 1t", "x", "2-pass", "x", "cksum enc", "cksum dec")
    print("{:>4} {:>10} {:>7} {:>11} {:>5} {:>8} {:>5} {:>7} {:>5} {:>8} {:>5} {:>11} {:>5} {:>8} {:>5} {:>7} {:>5} "
          "{:>6} {:>5} {:>6} {:>5} {:>9} {:>9}".format(*header))
    for row in results["rows"]:
        print("{:>4} {:>10} {:>6.1f}x {:>11.2f} {:>5.2f} {:>8.2f} {:>5.2f} {:>7.2f} {:>5.2f} {:>8.2f} {:>5.2f} "
              "{:>11.2f} {:>5.2f} {:>8.2f} {:>5.2f} {:>7.2f} {:>5.2f} {:>6.2f} {:>5.2f} {:>6.2f} {:>5.2f} {:>8.2%} "
              "{:>8.2%}".format(
                  row["sparsity"], row["scales"], row["ratio"],
                  row["encode_gbps_1t"], row["encode_gbps_1t"] / copy, row["encode_gbps_all"],
                  row["encode_gbps_all"] / copy, row["encode_hook_gbps_1t"], row["encode_hook_gbps_1t"] / copy,
                  row["encode_residual_out_gbps_1t"], row["encode_residual_out_gbps_1t"] / copy,
                  row["decode_gbps_1t"], row["decode_gbps_1t"] / copy,
                  row["decode_gbps_all"], row["decode_gbps_all"] / copy, row["decode_add_gbps_1t"],
                  row["decode_add_gbps_1t"] / copy, row["feedback_gbps_1t"], row["feedback_gbps_1t"] / copy,
                  row["feedback_two_pass_gbps_1t"], row["feedback_two_pass_gbps_1t"] / copy,
                  row["checksum_share_encode_1t"],
                  row["checksum_share_decode_1t"]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``threelc bench``: ``codec`` here, ``train`` in :mod:`threelc.launch.bench.bench_train`."""
    benches = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    codec_parser = benches.add_parser("codec", help="codec ratio and throughput against memory bandwidth")
    codec_parser.add_argument("--numel", type=int, default=25_000_000, help="values in the test array")
    codec_parser.add_argument("--sparsity", type=float, nargs="+", default=[1.0, 1.5, 1.9])
    codec_parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (the best is kept)")
    codec_parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    codec_parser.add_argument("--compare", action="store_true",
                              help="also compare with fp16 and zstd/lz4 on synthetic and real captured gradients")
    codec_parser.add_argument("--compare-numel", type=int, default=4_000_000,
                              help="values of the synthetic array in the comparison")
    codec_parser.set_defaults(run=run_codec)
    train_parser = benches.add_parser("train", help="training against PyTorch's hooks on an emulated cluster")
    # Imported here, not at the top: `threelc bench codec` must not need torch.
    from . import bench_train

    bench_train.add_arguments(train_parser)
    train_parser.set_defaults(run=bench_train.run)


def run_codec(args) -> int:
    """Run ``threelc bench codec``."""
    results = bench_codec(args.numel, args.sparsity, args.repeats)
    if args.compare:
        results["compare"] = bench_compare(_captured_arrays(args.compare_numel), max(1, args.repeats // 2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_table(results)
        if args.compare:
            _print_compare(results["compare"])
    return 0


def run(args) -> int:
    """Run ``threelc bench WHAT``."""
    return args.run(args)
