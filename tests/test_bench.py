"""`threelc bench codec` runs and reports consistent figures (no speed is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from threelc.launch.bench import codec as bench


def test_bench_codec_json():
    result = subprocess.run([sys.executable, "-m", "threelc.cli", "bench", "codec", "--numel", "50000",
                             "--repeats", "1", "--sparsity", "1.0", "1.9", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["numel"] == 50000 and figures["copy_gbps"] > 0
    assert [(row["sparsity"], row["scales"]) for row in figures["rows"]] == [
        (1.0, "segment"), (1.0, "block1024"), (1.9, "segment"), (1.9, "block1024")]
    for row in figures["rows"]:
        assert row["ratio"] == 50000 * 4 / row["payload_bytes"]
        assert 20 < row["ratio"] <= 280  # 1.6 bits per value at worst, 70 zeros per byte at best
        assert all(row[key] > 0 for key in ("encode_gbps_1t", "encode_gbps_all", "decode_gbps_1t", "decode_gbps_all",
                                            "decode_add_gbps_1t", "encode_hook_gbps_1t", "encode_residual_out_gbps_1t",
                                            "feedback_gbps_1t",
                                            "feedback_two_pass_gbps_1t",
                                            "checksum_share_encode_1t", "checksum_share_decode_1t"))


def test_bench_compare_rows():
    x = bench.gradient_like(20000)
    rows = bench.bench_compare({"synthetic": (x, None)}, repeats=1)
    methods = {row["method"]: row for row in rows}
    assert methods["fp16 cast"]["ratio"] == 2.0
    # Finer scales keep more values: the hook's 8192-value blocks cost bytes against one per tensor.
    assert methods["3LC s=1.0 tensor"]["ratio"] > methods["3LC s=1.0 block8192"]["ratio"] > 20
    assert methods["3LC s=1.9 tensor"]["ratio"] >= methods["3LC s=1.0 tensor"]["ratio"]
    assert all(row["data"] == "synthetic" and row["gbps"] > 0 for row in rows)


def test_gradient_like_is_heavy_tailed():
    x = bench.gradient_like(100000)
    assert x.dtype == np.float32
    kurtosis = np.mean((x - x.mean()) ** 4) / np.var(x) ** 2
    assert kurtosis > 6  # a Gaussian has 3
