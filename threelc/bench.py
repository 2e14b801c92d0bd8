"""``threelc bench codec``: codec compression ratio and throughput against memory bandwidth.

Every figure is measured in one run on one array: the single-thread ``np.copyto`` rate of the
array is the yardstick, and each codec rate is also printed as a ratio to it.  A copy moves 8
bytes per value; encoding with error feedback and one scale per segment moves ~20 (two passes),
so ~0.4x the copy rate is its ceiling; decoding writes 4 bytes per value (ceiling ~2x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numba
import numpy as np

from . import codec

__all__ = ["add_arguments", "run", "gradient_like", "bench_codec"]


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
            numba.set_num_threads(all_cores)
            results["rows"].append(row)
    return results


def _print_table(results: dict) -> None:
    copy = results["copy_gbps"]
    machine = results["machine"]
    print(f"3LC codec on {results['numel']:,} float32 values (heavy-tailed), {machine['cores']} cores, "
          f"numba {machine['numba']} with {machine['numba_threads']} threads")
    print(f"single-thread np.copyto: {copy:.2f} GB/s (the yardstick; 'x' columns are ratios to it)")
    print("encode runs with error feedback; GB/s counts float32 input bytes")
    header = ("s", "scales", "ratio", "enc 1t GB/s", "x", "enc all", "x", "dec 1t GB/s", "x", "dec all", "x")
    print("{:>4} {:>10} {:>7} {:>11} {:>5} {:>8} {:>5} {:>11} {:>5} {:>8} {:>5}".format(*header))
    for row in results["rows"]:
        print("{:>4} {:>10} {:>6.1f}x {:>11.2f} {:>5.2f} {:>8.2f} {:>5.2f} {:>11.2f} {:>5.2f} {:>8.2f} {:>5.2f}".format(
            row["sparsity"], row["scales"], row["ratio"],
            row["encode_gbps_1t"], row["encode_gbps_1t"] / copy, row["encode_gbps_all"], row["encode_gbps_all"] / copy,
            row["decode_gbps_1t"], row["decode_gbps_1t"] / copy, row["decode_gbps_all"], row["decode_gbps_all"] / copy))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``threelc bench``."""
    parser.add_argument("what", choices=["codec"], help="what to benchmark")
    parser.add_argument("--numel", type=int, default=25_000_000, help="values in the test array")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[1.0, 1.5, 1.9])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (the best is kept)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args) -> int:
    """Run ``threelc bench``."""
    results = bench_codec(args.numel, args.sparsity, args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_table(results)
    return 0
