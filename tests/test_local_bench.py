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


def test_update_section_replaces_only_its_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("head\n<!-- other:begin -->\nkept\n<!-- other:end -->\n<!-- bench_local:begin -->\nold\n"
                   "<!-- bench_local:end -->\ntail\n")
    bench.update_section(doc, "bench_local", "| new |\n")
    assert doc.read_text() == ("head\n<!-- other:begin -->\nkept\n<!-- other:end -->\n<!-- bench_local:begin -->\n"
                               "| new |\n<!-- bench_local:end -->\ntail\n")
    with pytest.raises(SystemExit, match="no <!-- missing:begin -->"):
        bench.update_section(doc, "missing", "x")


def test_emulated_runs_report_inner_step_and_sync_seconds(tmp_path):
    (tmp_path / "final.json").write_text('{"wall_s": 12.5}')
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "step_s": 0.2}\n{"step": 2, "step_s": 0.4, "sync_s": 3.0}\n'
                                            '{"step": 3, "step_s": 0.3}\n{"step": 4, "step_s": 0.5, "sync_s": 1.0}\n')
    assert bench._times(tmp_path) == {"wall_s": 12.5, "inner_step_s": 0.35, "sync_s": 2.0}
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "step_s": 0.2}\n')  # a per-step run: no syncs
    assert bench._times(tmp_path)["sync_s"] is None
    rows = {name: {**row, "link_s": {"100mbit": 1.0, "10mbit": 10.0}, "wall_s": 12.5, "inner_step_s": 0.35,
                   "sync_s": None} for name, row in _rows().items()}
    header, _, first = bench.markdown(rows, "100mbit").splitlines()[:3]
    assert header.endswith("| wall s @ 100mbit | inner step s | s per sync |")
    assert first.endswith("| 12 | 0.350 | |")


def test_a_run_of_another_length_is_not_reused_or_mixed(tmp_path):
    folder = tmp_path / "text-allreduce-seed0"
    assert not bench.finished(folder, steps=3000)  # nothing there yet: train it
    folder.mkdir()
    (folder / "config.json").write_text('{"steps": 1000, "args": {"steps": 1000, "corpus_chars": 1000000}}')
    assert not bench.finished(folder, steps=1000)  # no final.json: an unfinished run is rerun
    (folder / "final.json").write_text("{}")
    assert bench.finished(folder, steps=1000, corpus_chars=1_000_000)
    with pytest.raises(SystemExit, match=r"holds a run with \{'steps': 1000\}, not \{'steps': 3000"):
        bench.finished(folder, steps=3000)  # a 1,000-step baseline under 3,000-step variants would skew every ratio
    with pytest.raises(SystemExit, match="'corpus_chars': 1000000"):
        bench.finished(folder, steps=1000, corpus_chars=4_000_000)  # nor one trained on another corpus
    assert "--corpus-chars" in bench._command("h50-fp32", 0, 1000)  # recorded in every run's config
    assert bench.run_length([{"steps": 3000}, {"steps": 3000}]) == 3000 and bench.run_length([]) == 0
    with pytest.raises(SystemExit, match=r"mix step counts \[1000, 3000\]"):
        bench.run_length([{"steps": 1000}, {"steps": 3000}])


def test_the_gap_along_the_run_is_reported_per_seed_against_allreduce():
    def row(curves):
        return {"seeds": sorted(curves), "runs": {seed: {"steps": 2000, "curve": curve} for seed, curve in curves.items()}}

    rows = {"allreduce": row({0: {1000: 2.0, 2000: 1.5}, 1: {1000: 1.0, 2000: 1.0}}),
            "h50-fp32": row({0: {1000: 2.2, 2000: 1.53}, 1: {1000: 1.0, 2000: 1.01}})}
    header, _, base, local = bench.curve_markdown(rows).splitlines()
    assert header == ("| variant | seeds | val loss @ 1,000 | vs allreduce | val loss @ 2,000 | vs allreduce | "
                      "best val loss | vs allreduce's best |")
    assert base == "| allreduce | 0,1 | 1.5000 | +0.00% | 1.2500 | +0.00% | 1.2500 | +0.00% |"
    # (+10% + 0%) / 2, (+2% + 1%) / 2; the best: seed 0's 1.53 against 1.5, seed 1's 1.0 (step 1,000) against 1.0
    assert local == "| h50-fp32 | 0,1 | 1.6000 | +5.00% | 1.2700 | +1.50% | 1.2650 | +1.00% |"
    for run in (*rows["allreduce"]["runs"].values(), *rows["h50-fp32"]["runs"].values()):
        run["steps"] = 1000
    assert bench.curve_markdown(rows) == ""  # one mark: the main table already says it
