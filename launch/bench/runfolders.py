"""The training benchmarks' run folders (:mod:`.adamw`, :mod:`.local`): where a run goes, whether a
finished one may be reused, what one run measured, and the tables both write from them.

A benchmark trains each (task, variant, seed) into ``{out}/{task}-{variant}-seed{seed}`` and reuses
a folder that already holds ``final.json``, so an interrupted benchmark resumes where it stopped,
but only a run made with the same length and corpus (:func:`finished`), and one table never mixes
lengths (:func:`run_length`).  :func:`measure` reads a folder once (:func:`threelc.launch.runs.runlog.load_run`).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from ..runs.runlog import Run, load_run

__all__ = ["CORPUS_CHARS", "run_folder", "finished", "torchrun", "run_length", "table_length", "measure", "curve_markdown", "update_section", "free_port"]


#: The examples' corpus size (their ``--corpus-chars`` default): 1 MB of the standard library.
CORPUS_CHARS = 1_000_000


def run_folder(out: Path, task: str, variant: str, seed: int) -> Path:
    return Path(out) / f"{task}-{variant}-seed{seed}"


def finished(folder: Path, **expected) -> bool:
    """Whether ``folder`` holds a finished run made with the training options ``expected`` (names
    as in its config's ``args``, e.g. ``steps=3000``), to be reused rather than rerun.
    ``SystemExit`` if it holds one made with other values: reusing it would put, say, a 1,000-step
    allreduce under 3,000-step variants in one table and skew every ratio."""
    if not (folder / "final.json").exists():
        return False
    held = json.loads((folder / "config.json").read_text())["args"]
    other = {key: held.get(key) for key, value in expected.items() if held.get(key) != value}
    if other:
        raise SystemExit(f"{folder} holds a run with {other}, not {expected}: give another --out")
    return True


def torchrun(command: list, folder: Path, nproc: int, port: int = 0) -> None:
    """Train ``command`` (``["-m", module, *options]``) on ``nproc`` local ranks into ``folder``,
    one numba and one OpenMP thread per rank (the ranks share this machine's cores); master port
    ``port``, or a free one."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                    str(port or free_port()), *command, "--run-dir", str(folder)], check=True, env=env)


def run_length(runs) -> int:
    """The one step count of ``runs`` (:func:`measure`'s records); ``SystemExit`` if they mix lengths."""
    lengths = {run["steps"] for run in runs}
    if len(lengths) > 1:
        raise SystemExit(f"the runs mix step counts {sorted(lengths)}: keep each length in its own --out")
    return lengths.pop() if lengths else 0


def table_length(rows: dict) -> int:
    """:func:`run_length` of every run in ``rows`` (variant -> ``{"runs": {seed: measure(...)}}``)."""
    return run_length(run for row in rows.values() for run in row["runs"].values())


def measure(folder: Path) -> dict:
    """What one finished run folder measured:

    * ``val_loss``: the last evaluation; ``curve``: every evaluation, ``{step: loss}``;
    * ``whole_bytes``: what each rank sent over all steps, warm-up and refresh allreduces and outer
      syncs included (the hook's own count), mean over ranks; ``steady_bytes``: the mean per
      compressed step (per step where none was compressed); ``full_precision_steps``: rank 0's
      uncompressed steps;
    * ``steps``: the run's length;
    * ``wall_s``, ``inner_step_s``, ``sync_s``: rank 0's wall time, median step and mean outer sync
      on the training thread (None where the run did not record them)."""
    run = load_run(folder)
    ranks = list(run.hook.values())
    compressed = [line["sent_bytes"] for lines in ranks for line in lines if line["compressed"]]
    every = [line["sent_bytes"] for lines in ranks for line in lines]
    curve = {record["step"]: record["val_loss"] for record in run.metrics if "val_loss" in record}
    if not curve:
        raise SystemExit(f"{folder} holds a run with no evaluation: nothing to compare")
    return {"val_loss": curve[max(curve)], "curve": curve,
            "whole_bytes": statistics.mean(sum(line["sent_bytes"] for line in lines) for lines in ranks),
            "steady_bytes": statistics.mean(compressed or every),
            "full_precision_steps": sum(not line["compressed"] for line in ranks[0]),
            "steps": run.config["steps"], **_times(run)}


def _times(run: Run) -> dict:
    steps = [record["step_s"] for record in run.metrics if "step_s" in record]
    syncs = [record["sync_s"] for record in run.metrics if "sync_s" in record]
    return {"wall_s": (run.final or {}).get("wall_s"), "inner_step_s": statistics.median(steps) if steps else None,
            "sync_s": statistics.mean(syncs) if syncs else None}


def curve_markdown(rows: dict, every: int = 1000) -> str:
    """Validation loss every ``every`` steps (mean over seeds) and its mean per-seed ratio to
    allreduce at that step: how the gap moves with the run's length.  Then two summaries less
    noisy than one final evaluation: each run's mean over its evaluations in the last ``every / 2``
    steps (the last one included), against allreduce's same mean; and each run's best evaluation
    against allreduce's best (of the same seed), so that a baseline whose validation loss has turned
    up by the end does not flatter the others.  ``rows``: variant -> ``{"seeds", "runs": {seed:
    measure(...)}}``, allreduce among them.  Empty for runs shorter than two marks."""
    steps = table_length(rows)
    marks = list(range(every, steps + 1, every))
    base = rows.get("allreduce")
    if len(marks) < 2 or not base:
        return ""
    tail = f"last {every // 2:,} steps"
    lines = ["| variant | seeds | " + " | ".join(f"val loss @ {mark:,} | vs allreduce" for mark in marks) +
             f" | mean val loss, {tail} | vs allreduce | best val loss | vs allreduce's best |",
             "|---|---|" + "---|---|" * (len(marks) + 2)]

    def late(curve):
        return statistics.mean(loss for step, loss in curve.items() if step >= steps - every // 2)

    summaries = (late, lambda curve: min(curve.values()))
    for variant, row in rows.items():
        common = [seed for seed in row["seeds"] if seed in base["seeds"]]
        cells = []
        for mark in marks:
            losses = [row["runs"][seed]["curve"].get(mark) for seed in row["seeds"]]
            ratios = [row["runs"][seed]["curve"].get(mark, float("nan")) / base["runs"][seed]["curve"][mark] - 1
                      for seed in common if mark in base["runs"][seed]["curve"]]
            mean = statistics.mean(losses) if None not in losses else None
            cells.append(("" if mean is None else f"{mean:.4f}") + " | " + _percent(ratios))
        for summary in summaries:
            ratios = [summary(row["runs"][seed]["curve"]) / summary(base["runs"][seed]["curve"]) - 1 for seed in common]
            cells.append(f"{statistics.mean(summary(row['runs'][seed]['curve']) for seed in row['seeds']):.4f} | " +
                         _percent(ratios))
        lines.append(f"| {variant} | {','.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(ratios) -> str:
    return f"{statistics.mean(ratios) * 100:+.2f}%" if ratios else ""


def update_section(doc: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- {name}:begin -->`` and ``<!-- {name}:end -->`` in ``doc``
    (each marker on its own line; the rest of the file stays byte for byte)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    content = doc.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{doc} has no {begin} ... {end} section")
    head, rest = content.split(begin, 1)
    body = text if text.endswith("\n") else text + "\n"
    doc.write_text(f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}")


def free_port() -> int:
    """A TCP port free on this machine now, for one run's torchrun master."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
