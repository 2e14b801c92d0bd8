"""The training examples under torchrun: logs, byte accounting, determinism, the shared pieces."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from launch_helpers import TINY_DIGITS, torchrun
from threelc.launch.runs.summary import ring_allreduce_bytes
from threelc.launch.examples.data import sharded_batches
from threelc.launch.runs.progress import ProgressBar
from threelc.launch.runs.runlog import load_run
from threelc.launch.examples.train_digits import DigitsCNN
from threelc.launch.examples.train_text import TextTask


def test_sharded_batches_are_disjoint_across_ranks_and_seeded():
    first = [next(sharded_batches(100, 10, rank, 4, seed=3)) for rank in range(4)]
    again = [next(sharded_batches(100, 10, rank, 4, seed=3)) for rank in range(4)]
    joined = torch.cat(first)
    assert len(set(joined.tolist())) == 40  # no index on two ranks
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(next(sharded_batches(100, 10, 0, 4, seed=4)), first[0])
    with pytest.raises(ValueError, match="cannot fill"):
        next(sharded_batches(10, 8, 0, 2, seed=0))


def test_ring_allreduce_bytes_model():
    assert ring_allreduce_bytes(1000, 1) == 0
    assert ring_allreduce_bytes(1000, 2) == 1000
    assert ring_allreduce_bytes(1000, 4) == 1500


def test_progress_bar_prints_tenths_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(20, label="x", stream=stream)
    for step in range(1, 21):
        bar.update(step, loss=0.5)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("x [") and "20/20" in lines[-1] and "loss=0.5" in lines[-1]


def test_digits_width_sizes_the_model():
    counts = [sum(p.numel() for p in DigitsCNN(width).parameters()) for width in (16, 96)]
    assert 50_000 < counts[0] < 60_000 and 1_900_000 < counts[1] < 2_100_000


def _params(width):
    return sum(p.numel() for p in DigitsCNN(width).parameters())


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["allreduce", "powersgd"])
def test_digits_under_torchrun_logs_metrics_and_collective_bytes(tmp_path, hook):
    steps = 10
    # Several buckets: PowerSGD's collectives must stay in the same order on every rank.
    torchrun(2, "threelc.launch.examples.train_digits",
             ["--hook", hook, "--steps", steps, "--run-dir", tmp_path, "--bucket-cap-mb", "0.005", *TINY_DIGITS])
    run = load_run(tmp_path)
    assert run.config["hook"] == hook and run.config["world_size"] == 2
    assert run.config["task_config"]["parameters"] == _params(4)
    assert [m["step"] for m in run.metrics] == list(range(1, steps + 1))
    assert [m["step"] for m in run.metrics if "test_accuracy" in m] == [5, 10]
    assert 0.0 <= run.final["test_accuracy"] <= 1.0 and run.final["median_step_s"] > 0
    assert sorted(run.hook) == [0, 1]
    raw = 4 * _params(4)
    for rank, lines in run.hook.items():
        assert [line["step"] for line in lines] == list(range(steps))  # iteration indices, as the hook logs
        assert all(line["raw_bytes"] == raw and line["rank"] == rank for line in lines)
        if hook == "allreduce":  # ring model with N = 2: each rank sends and receives the whole gradient
            assert all(line["sent_bytes"] == raw == line["received_bytes"] for line in lines)
        else:  # two warm-up steps of allreduce, then P, Q and the small tensors
            assert [line["compressed"] for line in lines] == [False, False] + [True] * (steps - 2)
            assert all(line["sent_bytes"] < raw / 2 for line in lines[2:])


@pytest.mark.slow
def test_digits_runs_are_deterministic(tmp_path):
    for name in ("a", "b"):
        torchrun(2, "threelc.launch.examples.train_digits", ["--steps", 6, "--run-dir", tmp_path / name, *TINY_DIGITS])
    losses = [[m["loss"] for m in load_run(tmp_path / name).metrics] for name in ("a", "b")]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_digits_with_threelc_hook_compresses_after_warmup(tmp_path):
    steps = 8
    torchrun(2, "threelc.launch.examples.train_digits", ["--hook", "threelc", "--warmup-steps", 3, "--steps", steps,
                                                "--width", 16, "--run-dir", tmp_path, "--eval-every", 4, "--no-progress"])
    run = load_run(tmp_path)
    lines = run.hook[0]
    assert [line["compressed"] for line in lines] == [False] * 3 + [True] * (steps - 3)
    raw = 4 * _params(16)
    assert all(line["raw_bytes"] == raw for line in lines)
    # 3LC: >10x fewer bytes than fp32.  The first compressed step also carries the exchange plan's
    # one-time link probe (threelc.hooks.plan: two messages of the step's payload P and two of P/2
    # to the peer, three headers), so it stays below (1 + 3) P < 4/10 of the raw bytes.
    assert all(line["sent_bytes"] < raw / 10 for line in lines[4:])
    assert lines[3]["sent_bytes"] < 4 * raw / 10
    assert lines[3]["collectives"] > lines[4]["collectives"]
    # Every rank samples its threads' CPU every 10 steps (and after the last): the training thread
    # and the hook's worker by name (tests/test_cputime.py checks the arithmetic).
    assert sorted(run.cpu) == [0, 1]
    for records in run.cpu.values():
        assert [record["step"] for record in records] == [0, steps]
        assert records[1]["cpu"]["main"] > records[0]["cpu"]["main"] > 0
        assert records[1]["cpu"]["threelc-hook"] > 0


def test_text_optimizer_choice():
    options = dict(d_model=16, layers=1, heads=2, context=16, corpus_chars=20_000)
    model = TextTask(**options).build_model()
    assert isinstance(TextTask(**options).build_optimizer(model.parameters()), torch.optim.AdamW)
    sgd = TextTask(**options, optimizer="sgd").build_optimizer(model.parameters())  # its own default lr
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["lr"] == 0.15
    assert TextTask(**options, optimizer="sgd").describe()["optimizer"] == "sgd"
    with pytest.raises(ValueError, match="optimizer must be one of adamw, sgd"):
        TextTask(**options, optimizer="adam")


def test_text_corpus_split_is_fixed_and_model_learns_something(tmp_path):
    task = TextTask(d_model=16, layers=1, heads=2, context=16, corpus_chars=20_000, batch_size=4)
    assert TextTask(d_model=16, layers=1, heads=2, context=16, corpus_chars=20_000).corpus_sha256 == task.corpus_sha256
    assert len(task.train_data) == 18_000 and len(task.val_data) == 2_000
    command = [sys.executable, "-m", "threelc.launch.examples.train_text", "--steps", "30", "--eval-every", "30",
               "--d-model", "16", "--layers", "1", "--heads", "2", "--context", "16", "--corpus-chars", "20000",
               "--lr", "0.01", "--run-dir", str(tmp_path), "--no-progress"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["val_loss"] < 5.0  # below the uniform 256-way guess, ln 256 = 5.55
