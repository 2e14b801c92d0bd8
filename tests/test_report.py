"""``threelc report`` on small synthetic run folders: values in the table, plots on disk."""

from __future__ import annotations

import json

import pytest

from threelc.cli import main as cli_main
from threelc.launch.runs.report import format_table, write_report
from threelc.launch.runs.runlog import RunWriter, append_jsonl, hook_stats_path
from threelc.launch.runs.summary import cumulative_sent_by_step, summarize
from threelc.launch.runs.runlog import load_run

RAW = 400_000  # gradient bytes per step


def _make_run(path, *, hook, sent_per_step, steps=6, warmup=2, step_s=0.01, accuracy=0.9, emulate=None):
    """A run folder as the trainer writes it: 2 ranks, ``steps`` steps, eval at 3 and at the end."""
    config = {"task": "digits-cnn", "eval_metric": "test_accuracy", "hook": hook, "sparsity": 1.5,
              "collective": "allgather", "powersgd_rank": 1, "world_size": 2, "task_config": {"parameters": RAW // 4}}
    writer = RunWriter(path, config)
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 2.0 / step, "time": step * step_s, "step_s": step_s * (3 if step == 1 else 1)}
        if step % 3 == 0:
            record["test_accuracy"] = accuracy * step / steps
        writer.log(record)
    compresses = hook == "threelc"
    for rank in range(2):
        for iteration in range(steps):
            warm = compresses and iteration < warmup
            sent = RAW if (warm or not compresses) else sent_per_step
            append_jsonl(hook_stats_path(path, rank), {
                "step": iteration, "rank": rank, "world_size": 2, "raw_bytes": RAW, "sent_bytes": sent,
                "received_bytes": sent, "ratio": RAW / sent, "compressed": compresses and not warm,
                "compress_s": 0.0, "decompress_s": 0.0, "comm_s": 0.0, "time": 0.0})
    if emulate:
        (path / "emulate.json").write_text(json.dumps(emulate))
    return path


@pytest.fixture
def runs(tmp_path):
    emulate = {"cluster": {"nodes": 2, "rate": "100mbit"}, "nproc_per_node": 1,
               "nodes": [{"node": n, "steady": {"tx_bytes_per_step": 4_200.0 + 100 * n}} for n in range(2)]}
    return [
        _make_run(tmp_path / "fp32", hook="allreduce", sent_per_step=RAW, step_s=0.02, accuracy=0.96),
        _make_run(tmp_path / "3lc", hook="threelc", sent_per_step=4_000, step_s=0.01, accuracy=0.95, emulate=emulate),
    ]


def test_summary_values(runs):
    fp32, compressed = (summarize(load_run(path)) for path in runs)
    # allreduce: every iteration but the first is steady; 2 ranks, ring model = raw bytes.
    assert fp32["hook_bytes_per_step"] == RAW and fp32["ratio_vs_fp32"] == pytest.approx(1.0)
    assert fp32["wire_bytes_per_step"] is None
    assert fp32["median_step_s"] == pytest.approx(0.02) and fp32["final_eval"] == pytest.approx(0.96)
    # threelc: the two warm-up iterations are excluded; ratio = ring bytes (RAW for N=2) / 4000.
    assert compressed["warmup_steps"] == 2
    assert compressed["hook_bytes_per_step"] == 4_000 and compressed["ratio_vs_fp32"] == pytest.approx(100.0)
    assert compressed["wire_bytes_per_step"] == pytest.approx(4_250.0)
    assert compressed["settings"] == "s=1.5 allgather" and compressed["rate"] == "100mbit"
    assert compressed["final_loss"] == pytest.approx(2.0 / 6)


def test_cumulative_bytes_align_hook_iterations_with_metric_steps(runs):
    sent = cumulative_sent_by_step(load_run(runs[1]))
    assert sent[1] == RAW and sent[2] == 2 * RAW and sent[3] == 2 * RAW + 4_000


def test_table_and_plots(runs, tmp_path):
    rows, paths = write_report(runs, tmp_path / "report")
    table = format_table(rows)
    assert "100.0x" in table and "4.00 kB" in table and "4.25 kB" in table and "acc 95.0%" in table
    assert "400.00 kB" in table and "20.0 ms" in table
    names = sorted(path.name for path in paths)
    assert names == ["eval_vs_bytes.png", "loss_vs_bytes.png", "loss_vs_step.png", "loss_vs_time.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [row["hook"] for row in saved["runs"]] == ["allreduce", "threelc"]


def test_cli(runs, tmp_path, capsys):
    assert cli_main(["report", *map(str, runs), "--out", str(tmp_path / "cli")]) == 0
    output = capsys.readouterr().out
    assert "threelc" in output and (tmp_path / "cli" / "loss_vs_time.png").exists()
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
