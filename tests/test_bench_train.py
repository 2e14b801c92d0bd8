"""``threelc bench train``: the analysis on fixed numbers, and a tiny configuration end to end.

The end-to-end test needs root and iproute2 (the emulated cluster).  It skips without them,
except where the environment sets ``THREELC_REQUIRE_EMULATION=1`` (CI does): there it fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch_helpers import require_emulation
from threelc.launch.bench import bench_doc
from threelc.launch.bench import bench_train
from threelc.launch.bench.bench_train import EXAMPLES, FULL_HOOKS, QUICK_HOOKS, parse_hook, plan_cells


def test_parse_hook_names():
    assert parse_hook("powersgd-r4").powersgd_rank == 4
    spec = parse_hook("threelc-s1.9-allgather")
    assert (spec.hook, spec.sparsity, spec.collective) == ("threelc", 1.9, "allgather")
    assert parse_hook("threelc-s1.5").collective == "auto"
    assert parse_hook("threelc-s0.5").sparsity == 0.5  # below 1: the dense end of the quantizer
    assert parse_hook("threelc-s1.0").train_args() == ["--hook", "threelc", "--sparsity", "1.0", "--collective", "auto"]
    inline = parse_hook("threelc-s1.0-allgather-inline")
    assert (inline.collective, inline.header) == ("allgather", "inline")
    assert inline.train_args()[-2:] == ["--header", "inline"] and parse_hook("threelc-s1.0-separate").header == "separate"
    for bad in ("powersgd", "threelc-s2.0", "threelc-s0.0", "zstd", "threelc-s1.0-inline-allgather", "allreduce-inline"):
        with pytest.raises(ValueError):
            parse_hook(bad)
    with pytest.raises(ValueError, match=r"hook 'threelc-s2\.0': sparsity must be a number in \(0, 2\)"):
        parse_hook("threelc-s2.0")  # the codec's own check, named after the hook
    assert len(FULL_HOOKS) == 10 and set(QUICK_HOOKS) <= set(FULL_HOOKS) | {"threelc-s1.0", "threelc-s1.9"}


def test_plan_runs_accuracy_unshaped_then_timing_on_each_rate():
    hooks = [parse_hook("allreduce"), parse_hook("threelc-s1.0")]
    cells = plan_cells([EXAMPLES["digits"]], ["100mbit", "10mbit"], hooks, steps=None, warmup=10, timing_steps=5,
                       quick=True)
    # A timing run of 3LC's "auto" collective and header adds the steps of a possible measured
    # trial (up to 4 candidates x 6).
    assert [(cell.hook.name, cell.rate, cell.kind, cell.steps, cell.warmup) for cell in cells] == [
        ("allreduce", "unshaped", "accuracy", 200, 10), ("threelc-s1.0", "unshaped", "accuracy", 200, 10),
        ("allreduce", "100mbit", "timing", 7, 2), ("threelc-s1.0", "100mbit", "timing", 31, 2),
        ("allreduce", "10mbit", "timing", 7, 2), ("threelc-s1.0", "10mbit", "timing", 31, 2)]
    assert parse_hook("threelc-s1.0-allgather").trial_steps == 12  # the header modes may still be tried
    assert parse_hook("threelc-s1.0-allgather-separate").trial_steps == 0 and parse_hook("powersgd-r1").trial_steps == 0


def test_every_3lc_timing_run_is_timed_over_the_same_last_steps():
    hooks = [parse_hook(name) for name in ("powersgd-r1", "threelc-s1.0", "threelc-s1.0-allgather-separate",
                                            "threelc-s1.0-scatter_reduce")]
    timing = [cell for cell in plan_cells([EXAMPLES["digits"]], ["100mbit"], hooks, steps=None, warmup=10,
                                          timing_steps=5, quick=True) if cell.kind == "timing"]
    # The pinned runs run as long as the default's longest possible trial, and all are timed over their last 5.
    assert [(cell.hook.name, cell.steps, cell.window) for cell in timing] == [
        ("powersgd-r1", 7, 5), ("threelc-s1.0", 31, 5), ("threelc-s1.0-allgather-separate", 31, 5),
        ("threelc-s1.0-scatter_reduce", 31, 5)]
    assert bench_train.last_steps((3, 30), 5) == (26, 30)
    assert bench_train.last_steps((27, 30), 5) == (27, 30)  # a shorter window stays whole
    assert bench_train.last_steps((3, 30), None) == (3, 30) and bench_train.last_steps(None, 5) is None


def test_plan_adds_delayed_timing_runs_after_each_shaped_rate():
    hooks = [parse_hook("allreduce"), parse_hook("threelc-s1.0")]
    cells = plan_cells([EXAMPLES["digits"]], ["100mbit"], hooks, steps=None, warmup=10, timing_steps=5, quick=True,
                       delays=["20ms", "50ms"])
    assert [(cell.rate, cell.delay, cell.kind) for cell in cells] == [
        ("unshaped", None, "accuracy")] * 2 + [("100mbit", None, "timing")] * 2 + [
        ("100mbit", "20ms", "timing")] * 2 + [("100mbit", "50ms", "timing")] * 2
    assert cells[4].folder == "digits/100mbit-delay20ms/allreduce"  # never the undelayed run's folder


def test_repeats_run_the_compressing_hooks_timing_cells_in_rounds():
    hooks = [parse_hook(name) for name in ("allreduce", "powersgd-r1", "threelc-s1.0")]
    cells = plan_cells([EXAMPLES["digits"]], ["100mbit"], hooks, steps=None, warmup=10, timing_steps=5, quick=True,
                       delays=["20ms"], repeats=3)
    timing = [(cell.delay, cell.hook.name, cell.repeat) for cell in cells if cell.kind == "timing"]
    # Per link: every hook once, then the compressing hooks again, round after round; fp32 allreduce once.
    rounds = [("powersgd-r1", 1), ("threelc-s1.0", 1), ("powersgd-r1", 2), ("threelc-s1.0", 2)]
    assert timing == [(delay, name, repeat) for delay in (None, "20ms")
                      for name, repeat in [("allreduce", 0), ("powersgd-r1", 0), ("threelc-s1.0", 0), *rounds]]
    folders = [cell.folder for cell in cells if cell.kind == "timing" and cell.delay is None]
    assert folders[1:] == ["digits/100mbit/powersgd-r1", "digits/100mbit/threelc-s1.0",
                           "digits/100mbit/powersgd-r1/repeat1", "digits/100mbit/threelc-s1.0/repeat1",
                           "digits/100mbit/powersgd-r1/repeat2", "digits/100mbit/threelc-s1.0/repeat2"]
    assert [cell.repeat for cell in cells if cell.kind == "accuracy"] == [0, 0, 0]  # accuracy runs are never repeated
    once = plan_cells([EXAMPLES["digits"]], ["100mbit"], hooks, steps=None, warmup=10, timing_steps=5, quick=True)
    assert once == plan_cells([EXAMPLES["digits"]], ["100mbit"], hooks, steps=None, warmup=10, timing_steps=5,
                              quick=True, repeats=1)


def test_repeated_runs_merge_into_their_median_and_get_a_table(tmp_path):
    results = _results()
    steps = {"powersgd-r1": [0.2, 0.3, 0.25], "threelc-s1.0": [0.11, 0.09, 0.13]}
    for repeat in (1, 2):
        for hook, wire in (("powersgd-r1", 1.3e6), ("threelc-s1.0", 0.35e6)):
            row = _cell("100mbit", hook, steps[hook][repeat], wire + repeat)
            row["profile"] = {"compress_s": 0.01 * repeat, "decompress_s": 0.01, "comm_s": 0.02}
            row["cpu_per_step"] = {"main": 0.02 * repeat, "threelc-hook": 0.004, "gloo_tcp_loop": 0.001 * repeat}
            results["cells"].append({**row, "repeat": repeat})
    merged = {(row["rate"], row["hook"]): row for row in bench_doc.merge_repeats(results["cells"])}
    assert len(merged) == len(_results()["cells"])  # one row per cell
    ours = merged[("100mbit", "threelc-s1.0")]
    assert ours["median_step_s"] == 0.11 and ours["repeat_steps_s"] == [0.11, 0.09, 0.13]
    assert ours["wire_tx_per_step_node"] == 0.35e6 + 1  # the median of 0.25e6, 0.35e6 + 1, 0.35e6 + 2
    # The overhead of the median bytes (the rows' own 0.05 each), so that the row's columns agree.
    assert ours["wire_overhead"] == 0.0 and ours["hook_bytes_per_step"] == 0.35e6 + 1
    assert ours["profile"]["compress_s"] == 0.01
    # (the first run recorded no CPU: the median of the two that did)
    assert ours["cpu_per_step"] == {"main": pytest.approx(0.03), "threelc-hook": 0.004, "gloo_tcp_loop": pytest.approx(0.0015)}
    analysis = bench_doc.analyze(results)["digits"]
    analysis.cpus = 2
    cpu = bench_doc.cpu_table(analysis, "100mbit")
    # 4 nodes x 35.5 ms of CPU per step over 2 cores x 110 ms: 65% of the cores' time.
    assert "| threelc-s1.0 | 110 ms | 30.0 ms | 4.0 ms | 1.5 ms | 0.0 ms | 35.5 ms | 65% |" in cpu
    assert "allreduce" not in cpu and bench_doc.cpu_table(analysis, "10mbit") == ""
    # Accuracy runs (unshaped) evaluate between their CPU samples: not tabled.
    analysis.cell[("unshaped", "threelc-s1.0")]["cpu_per_step"] = {"main": 0.05}
    assert bench_doc.cpu_table(analysis, "unshaped") == ""
    assert merged[("100mbit", "powersgd-r1")]["median_step_s"] == 0.25
    assert "repeat_steps_s" not in merged[("100mbit", "allreduce")]  # run once: untouched
    analysis = bench_doc.analyze(results)["digits"]
    assert analysis.value("100mbit", "powersgd-r1", "median_step_s") == 0.25  # the targets read the medians
    table = bench_doc.repeats_table(analysis)
    assert "| 100mbit | threelc-s1.0 | 3 | 110 ms | 90.0 ms | 130 ms | 36% | 110 ms, 90.0 ms, 130 ms |" in table
    assert "allreduce" not in table and bench_doc.repeats_table(bench_doc.analyze(_results())["digits"]) == ""
    results["settings"]["repeats"] = 3
    assert "Repeated timing runs (`--repeats 3`" in bench_doc.write_doc(results, tmp_path / "b.md").read_text()
    # One failed run fails the cell, named, rather than a median of the survivors.
    results["cells"][-1] = {**results["cells"][-1], "error": "exit codes [1, 0, 0, 0]"}
    failed = {(row["rate"], row["hook"]): row for row in bench_doc.merge_repeats(results["cells"])}
    assert failed[("100mbit", "threelc-s1.0")]["error"] == "1 of 3 runs failed; first: exit codes [1, 0, 0, 0]"
    assert bench_doc.analyze(results)["digits"].row("100mbit", "threelc-s1.0") is None


def _cell(rate, hook, step_s, wire, *, final=None, curve=(), warmup=None):
    return {"example": "digits", "rate": rate, "hook": hook, "kind": "accuracy" if rate == "unshaped" else "timing",
            "nodes": 4, "warmup": warmup, "error": None, "median_step_s": step_s, "wire_tx_per_step_node": wire,
            "hook_bytes_per_step": wire, "wire_overhead": 0.05, "final_eval": final, "curve": list(curve),
            "steps": 100 if rate == "unshaped" else 7, "parameters": 2_000_000,
            "profile": {"compress_s": 0.01, "decompress_s": 0.01, "comm_s": 0.02}}


def _results():
    cells = [
        _cell("unshaped", "allreduce", 0.10, 12e6, final=0.97, curve=[(10, 0.5, 1.0), (20, 0.965, 2.0)]),
        _cell("unshaped", "powersgd-r1", 0.12, 1e6, final=0.95, curve=[(10, 0.5, 1.0), (20, 0.9, 2.4)], warmup=10),
        _cell("unshaped", "threelc-s1.0", 0.105, 0.2e6, final=0.965, curve=[(10, 0.5, 1.0), (20, 0.962, 2.1)],
              warmup=10),
        _cell("100mbit", "allreduce", 1.0, 12.5e6),
        _cell("100mbit", "powersgd-r1", 0.2, 1.1e6),
        _cell("100mbit", "threelc-s1.0", 0.11, 0.25e6),
        _cell("10mbit", "allreduce", 10.0, 12.5e6),
        _cell("10mbit", "threelc-s1.0", 0.4, 0.25e6),
    ]
    return {"command": "threelc bench train (test)", "settings": {"nodes": 4, "warmup_steps": 10},
            "machine": {"cpus": 2, "memory_bytes": 2**34, "gpu": False}, "examples": {"digits": {
                "module": "threelc.launch.examples.train_digits", "model_args": ["--width", "96"], "metric": "test_accuracy",
                "higher_is_better": True, "target_slack": 0.01, "batch_size": 8}},
            "cells": cells, "scaling": []}


def test_analysis_targets_and_time_to_target():
    analysis = bench_doc.analyze(_results())["digits"]
    assert analysis.floor == 0.10 and analysis.target == pytest.approx(0.96)
    assert bench_doc.headline_hook(analysis) == "threelc-s1.0"
    assert analysis.speedup("100mbit", "threelc-s1.0") == pytest.approx(1.0 / 0.11)
    assert analysis.byte_ratio("100mbit", "threelc-s1.0") == pytest.approx(50)
    # Measured unshaped; on 10mbit: 10 warm-up steps at allreduce's 10 s, then 10 steps at 0.4 s.
    assert analysis.time_to_target("unshaped", "threelc-s1.0") == (2.1, True)
    assert analysis.time_to_target("10mbit", "threelc-s1.0") == (pytest.approx(10 * 10.0 + 10 * 0.4), False)
    assert analysis.time_to_target("100mbit", "powersgd-r1") is None  # 0.9 never reaches 0.96
    assert analysis.last_evals_mean("threelc-s1.0") == pytest.approx((0.5 + 0.962) / 2)  # both of its 2 evaluations
    assert analysis.last_evals_mean("fp16") is None  # no such run
    met = {row["target"]: row["met"] for row in bench_doc.check_targets(analysis, "threelc-s1.0")}
    assert list(met.values()) == [True, False, True, True, True, True, True]


def test_delayed_rows_get_their_own_table_and_leave_the_rest_alone(tmp_path):
    plain = bench_doc.write_doc(_results(), tmp_path / "plain" / "benchmarks.md").read_text()
    assert "one-way delay" not in plain
    results = _results()
    for delay, fp32, mine in (("20ms", 2.0, 0.25), ("50ms", 4.0, 0.5)):
        for hook, step in (("allreduce", fp32), ("threelc-s1.0", mine)):
            results["cells"].append({**_cell("100mbit", hook, step, 1e6), "delay": delay})
    analysis = bench_doc.analyze(results)["digits"]
    assert analysis.speedup("100mbit", "threelc-s1.0") == pytest.approx(1.0 / 0.11)  # undelayed rows unchanged
    text = bench_doc.write_doc(results, tmp_path / "delayed" / "benchmarks.md").read_text()
    start, end = text.index("### digits: step time against one-way delay"), text.index("## How it was measured")
    assert text[:start] + text[end:] == plain  # the delayed runs add their section and change nothing else
    table = bench_doc.delay_table(analysis, "100mbit")
    assert table.splitlines()[0] == "| hook | no delay | 20ms | 50ms |"
    assert "| threelc-s1.0 | 110 ms (9.1x) | 250 ms (8.0x) | 500 ms (8.0x) |" in table
    assert "| powersgd-r1 | 200 ms (5.0x) | - | - |" in table  # no delayed run: a dash, not an error


def test_rewriting_the_doc_keeps_the_sections_after_the_marker(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"stale numbers\n{bench_doc.KEEP_MARKER}\n## AdamW\nhand-written table\n")
    text = bench_doc.write_doc(_results(), doc).read_text()
    assert "stale numbers" not in text and "threelc bench train (test)" in text
    assert text.endswith(f"\n{bench_doc.KEEP_MARKER}\n## AdamW\nhand-written table\n")
    plain = bench_doc.write_doc(_results(), tmp_path / "new.md").read_text()
    assert bench_doc.KEEP_MARKER not in plain  # nothing to keep: no marker, no tail


def test_doc_written_from_results(tmp_path):
    doc = bench_doc.write_doc(_results(), tmp_path / "docs" / "benchmarks.md")
    text = doc.read_text()
    assert "threelc bench train (test)" in text and "**missed**" in text and "Where the time goes" in text
    assert "| threelc-s1.0 | 250.00 kB | 50.0x |" in text
    for name in ("step_time_digits.png", "accuracy_vs_bytes_digits.png"):
        assert (tmp_path / "docs" / "bench" / name).stat().st_size > 3_000


@pytest.mark.slow
def test_bench_train_end_to_end_tiny(tmp_path):
    # (20 steps: the default's probe and a possible trial of its header modes, 13 steps, come first)
    require_emulation()
    out, doc = tmp_path / "run", tmp_path / "docs" / "benchmarks.md"
    command = [sys.executable, "-m", "threelc.cli", "bench", "train", "--examples", "digits", "--rates", "none",
               "--hooks", "allreduce", "threelc-s1.0", "--nodes", "2", "--steps", "20", "--warmup-steps", "2",
               "--width", "8", "--scaling-nodes", "--out", str(out), "--doc", str(doc), "--timeout", "120"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "bench.json").read_text())
    rows = {row["hook"]: row for row in results["cells"]}
    assert set(rows) == {"allreduce", "threelc-s1.0"}
    fp32, compressed = rows["allreduce"], rows["threelc-s1.0"]
    for row in (fp32, compressed):
        assert row["error"] is None and row["median_step_s"] > 0 and 0.0 <= row["final_eval"] <= 1.0
        assert row["wire_tx_per_step_node"] > 0 and len(row["curve"]) >= 2
    # A ring allreduce of the 14,794 float32 gradients moves 2 (N - 1) / N * 4P = 59,176 bytes per node per
    # step; the wire adds headers.  3LC's payloads are a few hundred bytes: far fewer even with headers.
    assert 59_176 <= fp32["wire_tx_per_step_node"] < 59_176 * 1.2
    assert compressed["wire_tx_per_step_node"] < fp32["wire_tx_per_step_node"] / 10
    # 2 warm-up steps of allreduce excluded, and the first compressed step (the plan's one-time probe),
    # and a measured trial of the two header modes (12 steps) if the plan's call was close
    assert compressed["steady_first_step"] in (4, 16)
    text = doc.read_text()
    assert "```\nthreelc bench train --examples digits" in text and "## Targets (digits, 2 nodes" in text
    assert (doc.parent / "bench" / "step_time_digits.png").exists()
    assert "headline (digits, 2 nodes, threelc-s1.0" in result.stdout


def test_doc_goes_to_the_run_folder_unless_named(tmp_path):
    # A run must not overwrite the repository's docs/benchmarks.md unless asked to.
    assert bench_train._doc_path(None, tmp_path) == tmp_path / "benchmarks.md"
    assert bench_train._doc_path("none", tmp_path) is None
    assert bench_train._doc_path("docs/benchmarks.md", tmp_path) == Path("docs/benchmarks.md")


def test_scaling_rows_hold_the_default_to_the_collective_its_plan_chose():
    def cell(hook, sent, plan=None):
        return {"nodes": 4, "hook": hook, "raw_bytes_per_step": 4000, "hook_bytes_per_step": sent,
                "wire_tx_per_step_node": sent * 1.1, "median_step_s": 0.05, "plan": plan, "run_dir": hook}

    auto = {"collective": "scatter_reduce", "coalesce": False, "reason": "modelled step: ..."}
    rows = {row["hook"]: row for row in bench_train.scaling_rows([
        cell("allreduce", 6000), cell("threelc-s1.0-allgather-separate", 300),
        cell("threelc-s1.0-scatter_reduce-separate", 160, {"collective": "scatter_reduce", "reason": "configured"}),
        cell("threelc-s1.0", 160, auto)])}
    # C = 300 / 3 = 100: allgather 3 C, scatter-reduce 2 * 3/4 C, and so the default that chose it.
    assert rows["threelc-s1.0-allgather-separate"]["model_bytes"] == 300
    assert rows["threelc-s1.0-scatter_reduce-separate"]["model_bytes"] == rows["threelc-s1.0"]["model_bytes"] == 150
    assert rows["allreduce"]["model_bytes"] == 6000
    table = bench_doc.scaling_table(list(rows.values()))
    assert "threelc-s1.0 (plan: scatter_reduce)" in table and "50.0 ms" in table
    assert "threelc-s1.0-scatter_reduce-separate (plan" not in table  # configured, not the plan's choice
    # A bench.json from before header modes: the allgather run without the suffix gives C.
    old = bench_train.scaling_rows([cell("threelc-s1.0-allgather", 300),
                                    cell("threelc-s1.0", 300, {**auto, "collective": "allgather", "header": "inline"})])
    assert [row["model_bytes"] for row in old] == [300, 300]
    assert "threelc-s1.0 (plan: allgather + inline headers)" in bench_doc.scaling_table(old)


def test_measure_run_reads_cpu_per_step_over_the_timing_window(tmp_path):
    from threelc.launch.runs.runlog import append_jsonl

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"world_size": 2, "eval_metric": "test_accuracy"}))
    for step in range(1, 41):  # hook iteration step - 1; compressed from iteration 2 on
        append_jsonl(folder / "metrics.jsonl", {"step": step, "loss": 1.0, "time": step * 0.1, "step_s": 0.1})
        for rank in range(2):
            append_jsonl(folder / f"hook-rank{rank}.jsonl", {"step": step - 1, "rank": rank, "compressed": step > 2,
                                                             "sent_bytes": 10, "raw_bytes": 100})
    for rank, hook_cpu in ((0, 0.002), (1, 0.004)):  # rank r's worker: hook_cpu seconds per step
        for step in range(0, 41, 10):
            append_jsonl(folder / f"cpu-rank{rank}.jsonl",
                         {"step": step, "cpu": {"main": 0.05 * step, "threelc-hook": hook_cpu * step}})
    # The steady window starts at the second compressed iteration (3), metrics step 4; the samples
    # inside it are steps 10..40.  Cut to the last 25 steps (16..40): samples 20..40.
    whole, last = bench_train.measure_run(folder), bench_train.measure_run(folder, 25)
    assert whole["cpu_steps"] == 30 and last["cpu_steps"] == 20
    for row in (whole, last):
        assert row["cpu_per_step"] == {"main": pytest.approx(0.05), "threelc-hook": pytest.approx(0.003)}
    (folder / "cpu-rank0.jsonl").unlink()
    (folder / "cpu-rank1.jsonl").unlink()
    assert bench_train.measure_run(folder)["cpu_per_step"] is None  # runs from before CPU sampling
