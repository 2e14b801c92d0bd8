"""threelc.launch.bench.local's report: the frontier's order, the plot, and the doc sections it
rewrites (the training runs themselves are the examples', tested in tests/test_local.py)."""

from __future__ import annotations

import pytest

from threelc.launch.bench import local as bench


def _rows():
    def row(loss, megabytes):
        return {"val_loss": loss, "whole_bytes": megabytes * 1e6, "seeds": [0], "runs": {}}

    return {"allreduce": row(1.50, 2824.7), "powersgd-r4": row(1.67, 149.7), "h10-3lc": row(1.71, 6.8),
            "h50-3lc": row(1.95, 1.5), "h50-fp32": row(1.56, 56.5), "h100-3lc": row(3.51, 0.8),
            "h50-3lc-p2": row(1.65, 3.2)}


def test_frontier_order_and_plot(tmp_path):
    rows = _rows()
    assert list(bench.by_bytes(rows)) == ["allreduce", "powersgd-r4", "h50-fp32", "h10-3lc", "h50-3lc-p2",
                                          "h50-3lc", "h100-3lc"]
    assert [bench._sync_every(name) for name in ("h50-3lc-p2", "h100-fp32", "allreduce", "hook")] == [50, 100, None,
                                                                                                    None]
    bench.plot(rows, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_emulated_runs_report_inner_step_and_sync_seconds():
    rows = {name: {**row, "link_s": {"100mbit": 1.0, "10mbit": 10.0}, "wall_s": 12.5, "inner_step_s": 0.35,
                   "sync_s": None} for name, row in _rows().items()}
    header, _, first = bench.markdown(rows, "100mbit").splitlines()[:3]
    assert header.endswith("| wall s @ 100mbit | inner step s | s per sync |")
    assert first.endswith("| 12 | 0.350 | |")


def test_every_run_records_its_corpus():
    assert "--corpus-chars" in bench._command("h50-fp32", 0, 1000)  # so finished() can refuse another corpus
