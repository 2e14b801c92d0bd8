"""The training benchmarks' run folders (threelc.launch.bench.runfolders): what one run measured,
which finished runs may be reused, and the tables both benchmarks write from them."""

from __future__ import annotations

import json

import pytest

from threelc.launch.bench import adamw as bench_adamw
from threelc.launch.bench import runfolders
from threelc.launch.runs.runlog import append_jsonl


def _run(folder, sent, compressed, evals, step_s=None, sync_s=None, final=None, ranks=2):
    """A finished run folder: ``sent[i]``/``compressed[i]`` the hook's record of step i on every
    rank (rank r sends ``sent[i] + r``), ``evals`` {step: val_loss}."""
    folder.mkdir(parents=True)
    steps = len(sent)
    (folder / "config.json").write_text(json.dumps({"steps": steps, "args": {"steps": steps}}))
    (folder / "final.json").write_text(json.dumps(final or {}))
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 1.0, **({"step_s": step_s[step - 1]} if step_s else {}),
                  **({"sync_s": sync_s[step]} if sync_s and step in sync_s else {}),
                  **({"val_loss": evals[step]} if step in evals else {})}
        append_jsonl(folder / "metrics.jsonl", record)
        for rank in range(ranks):
            append_jsonl(folder / f"hook-rank{rank}.jsonl", {"step": step - 1, "rank": rank, "compressed": compressed[step - 1],
                                                             "sent_bytes": sent[step - 1] + rank, "raw_bytes": 100})
    return folder


def test_measure_reads_bytes_losses_and_times_of_one_run(tmp_path):
    folder = _run(tmp_path / "text-x-seed0", [100, 10, 20, 30], [False, True, True, True], {2: 3.0, 4: 2.5},
                  step_s=[0.2, 0.4, 0.3, 0.5], sync_s={2: 3.0, 4: 1.0}, final={"wall_s": 12.5})
    run = runfolders.measure(folder)
    assert run == {"val_loss": 2.5, "curve": {2: 3.0, 4: 2.5}, "whole_bytes": 162,  # (160 + 164) / 2
                   "steady_bytes": pytest.approx(20.5),  # (10 + 20 + 30 + 11 + 21 + 31) / 6
                   "full_precision_steps": 1, "steps": 4, "wall_s": 12.5, "inner_step_s": 0.35, "sync_s": 2.0}
    # a per-step run without timings: the times are None, and an uncompressed run's steady state is every step
    plain = runfolders.measure(_run(tmp_path / "text-y-seed0", [100, 100], [False, False], {2: 2.0}))
    assert (plain["wall_s"], plain["inner_step_s"], plain["sync_s"]) == (None, None, None)
    assert plain["steady_bytes"] == 100.5 and plain["full_precision_steps"] == 2
    with pytest.raises(SystemExit, match="no evaluation"):
        runfolders.measure(_run(tmp_path / "text-z-seed0", [100], [False], {}))


def test_a_run_of_another_length_or_corpus_is_not_reused_or_mixed(tmp_path):
    folder = tmp_path / "text-allreduce-seed0"
    assert not runfolders.finished(folder, steps=3000)  # nothing there yet: train it
    folder.mkdir()
    (folder / "config.json").write_text('{"steps": 1000, "args": {"steps": 1000, "corpus_chars": 1000000}}')
    assert not runfolders.finished(folder, steps=1000)  # no final.json: an unfinished run is rerun
    (folder / "final.json").write_text("{}")
    assert runfolders.finished(folder, steps=1000, corpus_chars=1_000_000)
    with pytest.raises(SystemExit, match=r"holds a run with \{'steps': 1000\}, not \{'steps': 3000"):
        runfolders.finished(folder, steps=3000)  # a 1,000-step baseline under 3,000-step variants would skew every ratio
    with pytest.raises(SystemExit, match="'corpus_chars': 1000000"):
        runfolders.finished(folder, steps=1000, corpus_chars=4_000_000)  # nor one trained on another corpus
    assert runfolders.run_length([{"steps": 3000}, {"steps": 3000}]) == 3000 and runfolders.run_length([]) == 0
    with pytest.raises(SystemExit, match=r"mix step counts \[1000, 3000\]"):
        runfolders.run_length([{"steps": 1000}, {"steps": 3000}])


def test_the_gap_along_the_run_is_reported_per_seed_against_allreduce():
    def row(curves):
        return {"seeds": sorted(curves), "runs": {seed: {"steps": 2000, "curve": curve} for seed, curve in curves.items()}}

    rows = {"allreduce": row({0: {1000: 2.0, 1400: 1.6, 1500: 1.6, 2000: 1.5}, 1: {1000: 1.0, 1500: 1.0, 2000: 1.0}}),
            "h50-fp32": row({0: {1000: 2.2, 1400: 1.0, 1500: 1.67, 2000: 1.53}, 1: {1000: 1.0, 1500: 1.0, 2000: 1.01}})}
    header, _, base, local = runfolders.curve_markdown(rows).splitlines()
    assert header == ("| variant | seeds | val loss @ 1,000 | vs allreduce | val loss @ 2,000 | vs allreduce | "
                      "mean val loss, last 500 steps | vs allreduce | best val loss | vs allreduce's best |")
    assert base == "| allreduce | 0,1 | 1.5000 | +0.00% | 1.2500 | +0.00% | 1.2750 | +0.00% | 1.2500 | +0.00% |"
    # (+10% + 0%) / 2, (+2% + 1%) / 2; the last 500 steps (1,500 and 2,000; not 1,400): seed 0's 1.6 against
    # 1.55, seed 1's 1.005 against 1.0; the best: seed 0's 1.0 (step 1,400) against 1.5, seed 1's 1.0 against 1.0
    assert local == ("| h50-fp32 | 0,1 | 1.6000 | +5.00% | 1.2700 | +1.50% | 1.3025 | +1.86% | 1.0000 | -16.67% |")
    for run in (*rows["allreduce"]["runs"].values(), *rows["h50-fp32"]["runs"].values()):
        run["steps"] = 1000
    assert runfolders.curve_markdown(rows) == ""  # one mark: the main table already says it


def test_bench_adamw_adds_the_along_the_run_table_to_long_runs_only(tmp_path):
    def pair(out, steps, ours):
        base = {step: 2.0 - step / 1000 * 0.25 for step in range(1000, steps + 1, 1000)}
        _run(runfolders.run_folder(out, "gpt2", "allreduce", 0), [100] * steps, [False] * steps, base or {steps: 2.0})
        _run(runfolders.run_folder(out, "gpt2", "ours-f20-momentum-b512", 0), [100] + [2] * (steps - 1),
             [False] + [True] * (steps - 1), {step: loss * ours for step, loss in (base or {steps: 2.0}).items()})

    pair(tmp_path / "long", 2000, 1.01)
    text = bench_adamw.markdown(bench_adamw.summarize(tmp_path / "long", ["gpt2"], [0]))
    assert "**gpt2**, validation loss along the run" in text
    assert "| ours-f20-momentum-b512 | 0 | 1.7675 | +1.00% | 1.5150 | +1.00% | 1.5150 | +1.00% |" in text
    pair(tmp_path / "short", 1000, 1.01)
    assert "along the run" not in bench_adamw.markdown(bench_adamw.summarize(tmp_path / "short", ["gpt2"], [0]))


def test_update_section_replaces_only_its_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("head\n<!-- other:begin -->\nkept\n<!-- other:end -->\n<!-- bench_local:begin -->\nold\n"
                   "<!-- bench_local:end -->\ntail\n")
    runfolders.update_section(doc, "bench_local", "| new |\n")
    assert doc.read_text() == ("head\n<!-- other:begin -->\nkept\n<!-- other:end -->\n<!-- bench_local:begin -->\n"
                               "| new |\n<!-- bench_local:end -->\ntail\n")
    with pytest.raises(SystemExit, match="no <!-- missing:begin -->"):
        runfolders.update_section(doc, "missing", "x")
