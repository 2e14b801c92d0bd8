"""The examples' threelc.optim.AdamW wiring, the tiny GPT-2 example, and bench_adamw's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

import threelc.optim
from launch_helpers import torchrun
from threelc.launch.bench import adamw as bench_adamw
from threelc.launch.runs.runlog import append_jsonl
from threelc.launch.examples.train_text import TextTask

TINY_TEXT = ["--d-model", "16", "--layers", "1", "--heads", "2", "--context", "16", "--corpus-chars", "20000",
             "--batch-size", "4", "--no-progress"]


def test_text_task_builds_threelc_adamw_with_its_options():
    task = TextTask(d_model=16, layers=1, heads=2, context=16, corpus_chars=20_000, optimizer="threelc-adamw",
                    adam_options={"freeze_step": 5, "refresh": "none"})
    optimizer = task.build_optimizer(task.build_model().parameters())
    assert isinstance(optimizer, threelc.optim.AdamW)
    assert (optimizer.freeze_step, optimizer.refresh, optimizer.defaults["lr"]) == (5, "none", 1e-3)
    assert task.describe()["freeze_step"] == 5


def test_block_sizes_option_parses_pattern_equals_values():
    import argparse

    from threelc.launch.examples.train_text import _block_size

    assert _block_size("*.wte.weight=256") == ("*.wte.weight", 256)
    assert _block_size("a=b=8") == ("a=b", 8)  # the last "=" splits
    for bad in ("*.wte.weight", "*.wte.weight=", "=256", "x=-1", "x=2.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="PATTERN=VALUES"):
            _block_size(bad)


def test_tiny_gpt2_is_a_byte_language_model():
    pytest.importorskip("transformers")
    from threelc.launch.examples.train_gpt2 import GPT2Task

    task = GPT2Task(d_model=16, layers=1, heads=2, context=16, corpus_chars=20_000)
    model = task.build_model()
    inputs, targets = next(task.batches(0, 1))
    assert model(inputs).shape == (32, 16, 256)
    with torch.no_grad():
        assert float(task.loss(model, inputs, targets)) == pytest.approx(5.55, abs=0.3)  # ~ln 256 at random init
    assert task.describe()["parameters"] == sum(p.numel() for p in model.parameters())


def test_trainer_pairs_threelc_adamw_with_the_hook(tmp_path):
    torchrun(2, "threelc.launch.examples.train_text", [*TINY_TEXT, "--steps", "12", "--eval-every", "12", "--hook", "threelc",
                                              "--optimizer", "threelc-adamw", "--freeze-step", "4",
                                              "--run-dir", tmp_path], timeout=300)
    lines = [json.loads(line) for line in (tmp_path / "hook-rank0.jsonl").read_text().splitlines()]
    assert [line["compressed"] for line in lines] == [False] * 4 + [True] * 4 + [False] + [True] * 3
    assert json.loads((tmp_path / "final.json").read_text())["val_loss"] < 5.6


def test_min_numel_above_every_bucket_runs_the_schedule_on_exact_gradients(tmp_path):
    """The benchmark's ablation (ours-f20-doubling-exact): the optimizer's schedule, nothing compressed."""
    torchrun(2, "threelc.launch.examples.train_text", [*TINY_TEXT, "--steps", "6", "--eval-every", "6", "--hook", "threelc",
                                              "--optimizer", "threelc-adamw", "--freeze-step", "2",
                                              "--min-numel", str(2**62), "--run-dir", tmp_path], timeout=300)
    lines = [json.loads(line) for line in (tmp_path / "hook-rank0.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and not any(line["compressed"] for line in lines)
    assert json.loads((tmp_path / "config.json").read_text())["min_numel"] == 2**62


def test_scale_options_reach_the_optimizer():
    import argparse

    from threelc.launch.examples.train_text import _add_arguments, adam_options

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    assert adam_options(parser.parse_args([])) == {}
    given = adam_options(parser.parse_args(["--embedding-scale", "row", "--transpose-conv1d"]))
    assert given == {"embedding_scale": "row", "transpose_conv1d": True}
    assert adam_options(parser.parse_args(["--no-transpose-conv1d"])) == {"transpose_conv1d": False}
    assert adam_options(parser.parse_args(["--floor-variance"])) == {"floor_variance": True}
    assert adam_options(parser.parse_args(["--floor-variance", "transient"])) == {"floor_variance": "transient"}
    assert adam_options(parser.parse_args(["--floor-variance", "carry"])) == {"floor_variance": "carry"}


def test_floor_variance_option_refuses_other_modes(capsys):
    import argparse

    from threelc.launch.examples.train_text import _add_arguments

    parser = argparse.ArgumentParser()
    _add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--floor-variance", "persistent"])
    assert "expected 'transient' or 'carry'" in capsys.readouterr().err


def test_threelc_adamw_without_the_threelc_hook_refuses_to_train(tmp_path):
    with pytest.raises(AssertionError, match="must be paired"):
        torchrun(2, "threelc.launch.examples.train_text", [*TINY_TEXT, "--steps", "3", "--hook", "allreduce",
                                                  "--optimizer", "threelc-adamw"], timeout=300)


def _fake_run(folder, val_loss, per_step, compressed):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"eval_metric": "val_loss", "world_size": 2,
                                                             "steps": len(per_step)}))
    (folder / "final.json").write_text("{}")
    for step, (sent, flag) in enumerate(zip(per_step, compressed)):
        append_jsonl(folder / "metrics.jsonl", {"step": step + 1, "loss": 1.0, "time": 0.0, "step_s": 0.0,
                                                **({"val_loss": val_loss} if step == len(per_step) - 1 else {})})
        for rank in range(2):
            append_jsonl(folder / f"hook-rank{rank}.jsonl", {"step": step, "rank": rank, "sent_bytes": sent,
                                                             "raw_bytes": 100, "compressed": flag})


def test_bench_adamw_counts_warm_up_bytes_in_the_whole_run(tmp_path):
    _fake_run(bench_adamw.run_folder(tmp_path, "text", "allreduce", 0), 2.0, [100] * 4, [False] * 4)
    _fake_run(bench_adamw.run_folder(tmp_path, "text", "ours-f20-doubling", 0), 2.02, [100, 2, 2, 4],
              [False, True, True, True])
    rows = bench_adamw.summarize(tmp_path, ["text"], [0])["text"]
    ours = rows["ours-f20-doubling"]
    assert ours["whole_bytes"] == 108 and ours["full_precision_steps"] == 1
    assert ours["whole_ratio"] == pytest.approx(400 / 108) and ours["steady_ratio"] == pytest.approx(100 / (8 / 3))
    assert ours["loss_vs_allreduce"] == pytest.approx(0.01)
    assert "| ours-f20-doubling | 0 | 2.0200 | +1.00% | 1 |" in bench_adamw.markdown({"text": rows})
    _fake_run(bench_adamw.run_folder(tmp_path, "text", "allreduce", 1), 2.0, [100] * 6, [False] * 6)
    with pytest.raises(SystemExit, match=r"mix step counts \[4, 6\]"):  # never one table, one ratio
        bench_adamw.summarize(tmp_path, ["text"], [0, 1])


def test_bench_adamw_pins_the_exchange_plan_of_every_threelc_row():
    """The table compares the codec's bytes: a link-dependent plan (allgather's double bytes, inline
    headers' slot padding, both picks of the hook's measured trial) would change them between machines."""
    threelc_rows = {name: args for name, args in bench_adamw.VARIANTS.items() if "threelc" in args}
    assert "ours-f20-doubling" in threelc_rows and "3lc+torch-adamw" in threelc_rows
    for name, args in threelc_rows.items():
        options = [(args[i], args[i + 1]) for i in range(len(args) - 1)]
        assert ("--collective", "scatter_reduce") in options, name
        assert ("--header", "separate") in options, name


def test_bench_adamw_replaces_only_its_section(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{bench_adamw.MARKER_BEGIN}\nold\n{bench_adamw.MARKER_END}\nafter\n")
    bench_adamw.update_doc(doc, "new table")
    assert doc.read_text() == f"before\n{bench_adamw.MARKER_BEGIN}\nnew table\n{bench_adamw.MARKER_END}\nafter\n"
    doc.write_text("no markers")
    with pytest.raises(SystemExit, match="bench_adamw"):
        bench_adamw.update_doc(doc, "x")
