"""``threelc demo`` end to end, shrunk: 2 workers, a tiny CNN, a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_writes_run_folder_and_reports_savings(tmp_path):
    out = tmp_path / "demo"
    # 30 steps: 10 of warm-up, the hook's probe and a possible trial of its header modes (13), then steady ones
    result = subprocess.run([sys.executable, "-m", "threelc.cli", "demo", "--workers", "2", "--steps", "30",
                             "--width", "8", "--out", str(out)], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"run folder: {out}" in result.stdout and "fewer bytes per worker per step" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    fp32, compressed = summary["runs"]
    assert (fp32["hook"], compressed["hook"]) == ("allreduce", "threelc")
    assert compressed["warmup_steps"] == 10  # the hook's default warm-up
    assert summary["bytes_ratio_allreduce_over_threelc"] > 10
    assert all(0.0 <= row["final_eval"] <= 1.0 and row["median_step_s"] > 0 for row in summary["runs"])
    for name in summary["plots"]:
        assert (out / name).stat().st_size > 5_000
    for hook in ("allreduce", "threelc"):
        assert sorted(path.name for path in (out / hook).glob("hook-rank*.jsonl")) == ["hook-rank0.jsonl", "hook-rank1.jsonl"]
    assert "[##############################] 30/30" in result.stderr  # rank 0's progress bar
