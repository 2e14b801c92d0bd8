"""``threelc bench train``: the same training with PyTorch's hooks and with 3LC, on an emulated cluster.

::

    threelc bench train --quick                      # the headline subset, minutes
    threelc bench train --out runs/bench-full --doc docs/benchmarks.md   # the full matrix, ~45 min

For every example, link rate and hook this runs one job under :func:`threelc.launch.cluster.emulate.emulate`
(N network namespaces, tbf-shaped veth links, one torchrun node each) and reads the run folder
back with :mod:`threelc.launch.runs.runlog`.  Two kinds of run:

* **accuracy runs**, on the unshaped network: ``--steps`` steps with the hooks' real warm-up
  (``--warmup-steps``, the threelc hook's default of 10 iterations, also PowerSGD's start
  iteration).  They give the final test accuracy / validation loss, the accuracy curve from
  which the steps to the target are read, and the compute floor (step time when the network
  costs almost nothing).
* **timing runs**, on shaped links: 2 warm-up steps (the least DDP allows, because it rebuilds
  its buckets after the first step) and ``--timing-steps`` steady steps.  They give the median
  step time and the wire bytes per step per node, from the link counters, over the steady steps
  only.  A shaped link changes when bytes arrive, not which: the arithmetic, and so the accuracy
  curve, is the unshaped run's, which is what lets a 10mbit cell cost seconds instead of hours.

Time to target on a shaped link is therefore an estimate: the accuracy run's steps to the target,
the warm-up steps at fp32 allreduce's step time on that link, the rest at the hook's.
:mod:`threelc.launch.bench.bench_doc` computes it, checks the issue's targets and writes the document.

Then ``--scaling-nodes`` (default 2 4 8) runs a small model with fp32 allreduce, both 3LC
collectives and the hook's default (``collective="auto"``: the measured plan) on N nodes, for wire
bytes against the byte model ((N - 1) C and 2 (N - 1) / N C) and, on a shaped link
(``--scaling-rate``), for step time: whether the plan picked the faster collective.

Everything lands in ``--out`` (one folder per run, ``bench.json``), and the document (``--doc``,
by default ``benchmarks.md`` in ``--out``: a run never overwrites the repository's
docs/benchmarks.md unless asked to) is written from ``bench.json`` (``--from-json`` redoes only
that step).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

from threelc.codec import check_sparsity

__all__ = [
    "HookSpec",
    "Example",
    "Cell",
    "EXAMPLES",
    "FULL_HOOKS",
    "QUICK_HOOKS",
    "parse_hook",
    "plan_cells",
    "repeated",
    "run_cell",
    "run_scaling",
    "scaling_rows",
    "measure_run",
    "remeasure",
    "machine_facts",
    "add_arguments",
    "run",
]

logger = logging.getLogger(__name__)

#: What the benchmark calls the unshaped network (``--rate none`` of the emulator).
UNSHAPED = "unshaped"
_UNSHAPED_NAMES = ("none", "unshaped", "0", "")


@dataclasses.dataclass(frozen=True)
class HookSpec:
    """One hook configuration of the matrix, named as on the command line.

    Names: ``allreduce``, ``fp16``, ``powersgd-r{RANK}``, ``threelc-s{S}`` (the hook's ``auto``
    collective) and ``threelc-s{S}-{allgather|scatter_reduce}``, each 3LC name optionally ending
    in ``-{separate|inline}`` (the hook's ``header`` option; without it, ``auto``).
    """

    name: str
    hook: str
    sparsity: float = 1.0
    collective: str = "auto"
    powersgd_rank: int = 1
    header: str | None = None

    @property
    def has_warmup(self) -> bool:
        """Whether the hook starts with plain allreduce steps (PowerSGD's start iteration, 3LC's start_iter)."""
        return self.hook in ("powersgd", "threelc")

    @property
    def trial_steps(self) -> int:
        """Steps the hook may spend trying plans after its probe (3LC's ``auto`` collective or
        header on a close call: :mod:`threelc.hooks.plan`); timing runs add them, as the steady
        window starts after them."""
        if self.hook != "threelc":
            return 0
        from threelc.hooks.plan import TRIAL_STEPS
        candidates = (2 if self.collective == "auto" else 1) * (2 if self.header in (None, "auto") else 1)
        return candidates * TRIAL_STEPS if candidates > 1 else 0

    def train_args(self) -> list[str]:
        """The training script's options that select this hook."""
        args = ["--hook", self.hook]
        if self.hook == "threelc":
            args += ["--sparsity", str(self.sparsity), "--collective", self.collective]
            if self.header is not None:
                args += ["--header", self.header]
        if self.hook == "powersgd":
            args += ["--powersgd-rank", str(self.powersgd_rank)]
        return args


_HOOK_NAME = re.compile(r"^(?:(allreduce|fp16)|powersgd-r(\d+)|threelc-s([0-9.]+)(?:-(allgather|scatter_reduce|auto))?"
                        r"(?:-(separate|inline))?)$")


def parse_hook(name: str) -> HookSpec:
    """The :class:`HookSpec` named ``name``; ``ValueError`` saying the accepted forms otherwise."""
    match = _HOOK_NAME.match(name)
    if not match:
        raise ValueError(f"hook {name!r}: use allreduce, fp16, powersgd-r<RANK>, threelc-s<S> or "
                         "threelc-s<S>-<allgather|scatter_reduce>, optionally ending in -<separate|inline>")
    plain, rank, sparsity, collective, header = match.groups()
    if plain:
        return HookSpec(name, plain)
    if rank:
        return HookSpec(name, "powersgd", powersgd_rank=int(rank))
    try:
        check_sparsity(float(sparsity))
    except ValueError as error:
        raise ValueError(f"hook {name!r}: {error}") from None
    return HookSpec(name, "threelc", sparsity=float(sparsity), collective=collective or "auto", header=header)


#: The issue's matrix: fp32 allreduce, fp16, PowerSGD rank 1 and 4, 3LC at three s with each collective.
FULL_HOOKS = ("allreduce", "fp16", "powersgd-r1", "powersgd-r4",
              *(f"threelc-s{s}-{c}" for c in ("scatter_reduce", "allgather") for s in ("1.0", "1.5", "1.9")))
#: ``--quick``: the headline subset (3LC with its default collective, ``auto``).
QUICK_HOOKS = ("allreduce", "fp16", "powersgd-r1", "threelc-s1.0", "threelc-s1.9")


@dataclasses.dataclass(frozen=True)
class Example:
    """An example of :mod:`threelc.launch.examples` and how the benchmark judges it.

    ``target_slack``: the target is fp32 allreduce's final metric minus this (accuracy, higher is
    better) or plus this (validation loss, lower is better).
    """

    name: str
    module: str
    model_args: tuple
    metric: str
    higher_is_better: bool
    target_slack: float
    steps: int
    quick_steps: int
    batch_size: int

    def reached(self, value: float, target: float) -> bool:
        """Whether ``value`` meets ``target`` in this example's direction."""
        return value >= target if self.higher_is_better else value <= target


#: The issue's two examples.  Per-worker batch 8: four workers' forward/backward must share 2 cores,
#: and a small batch keeps compute from hiding what the network costs (as a GPU would).
EXAMPLES = {
    "digits": Example("digits", "threelc.launch.examples.train_digits", ("--width", "96"), "test_accuracy", True, 0.01,
                      steps=300, quick_steps=200, batch_size=8),
    "text": Example("text", "threelc.launch.examples.train_text", ("--d-model", "128", "--layers", "2", "--context", "64"),
                    "val_loss", False, 0.05, steps=300, quick_steps=100, batch_size=8),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One emulated run of the matrix."""

    example: Example
    rate: str  # tc rate, or UNSHAPED
    hook: HookSpec
    kind: str  # "accuracy" or "timing"
    steps: int
    warmup: int  # --warmup-steps for hooks that have one
    delay: str | None = None  # one-way delay between nodes (timing runs of --delays)
    window: int | None = None  # timing runs: the median is over the last `window` steady steps
    repeat: int = 0  # timing runs of --repeats: which run of the same cell (0: the first)

    @property
    def folder(self) -> str:
        link = self.rate if self.delay is None else f"{self.rate}-delay{self.delay}"
        return f"{self.example.name}/{link}/{self.hook.name}" + (f"/repeat{self.repeat}" if self.repeat else "")


def normalize_rate(rate: str) -> str:
    """``none``/``unshaped`` -> :data:`UNSHAPED`; a tc rate is checked and kept."""
    if str(rate).lower() in _UNSHAPED_NAMES:
        return UNSHAPED
    from ..cluster.netns import parse_rate

    parse_rate(rate)  # raises ValueError on a bad rate, before anything runs
    return str(rate)


def repeated(hook: HookSpec) -> bool:
    """Whether ``--repeats`` runs the hook's timing cells again: the compressing hooks, whose steps
    lie within a run's noise of each other (PowerSGD against 3LC at 100mbit: a few ms of ~75).
    fp32 allreduce and fp16 are several times slower there, and one run ranks them."""
    return hook.hook in ("powersgd", "threelc")


def plan_cells(examples, rates, hooks, *, steps: int | None, warmup: int, timing_steps: int, quick: bool,
               delays=(), repeats: int = 1) -> list[Cell]:
    """The runs, in order: per example, the unshaped accuracy runs first, then each rate's timing
    runs, each shaped rate followed by its timing runs with each of ``delays``.  With ``repeats``
    > 1 each link's timing runs of :func:`repeated` hooks run that many times, in rounds (every
    hook once, then every hook again: ``ABCABC``), so that a drift of the host weighs on every
    hook alike; the document reports the median of their medians (:func:`bench_doc.merge_repeats`)."""
    cells = []
    for example in examples:
        full = steps or (example.quick_steps if quick else example.steps)
        for rate in [UNSHAPED] + [rate for rate in rates if rate != UNSHAPED]:
            if rate == UNSHAPED:
                cells += [Cell(example, rate, hook, "accuracy", full, warmup) for hook in hooks]
                continue
            for delay in (None, *delays):
                for repeat in range(max(repeats, 1)):
                    cells += [Cell(example, rate, hook, "timing", 2 + _aligned_trial_steps(hook, hooks) + timing_steps,
                                   2, delay, window=timing_steps, repeat=repeat)
                              for hook in hooks if repeat == 0 or repeated(hook)]
    return cells


def _aligned_trial_steps(hook: HookSpec, hooks) -> int:
    """Steps a 3LC timing run adds before its window: every 3LC run of the matrix adds as many as
    the longest possible trial, so that all of them are timed over the same last steps.  A young
    network's payloads grow over its first tens of steps: a pinned collective timed right after
    its probe would be charged fewer bytes than the default timed after its trial."""
    if hook.hook != "threelc":
        return hook.trial_steps
    return max(other.trial_steps for other in hooks if other.hook == "threelc")


def _training_command(cell: Cell, *, batch_size: int | None, model_args=None) -> list[str]:
    example = cell.example
    eval_every = max(1, min(10, cell.steps // 10)) if cell.kind == "accuracy" else cell.steps
    command = ["-m", example.module, *(model_args or example.model_args), *cell.hook.train_args(),
               "--steps", str(cell.steps), "--batch-size", str(batch_size or example.batch_size),
               "--eval-every", str(eval_every), "--no-progress"]
    if cell.hook.has_warmup:
        command += ["--warmup-steps", str(cell.warmup)]
    return command


@contextlib.contextmanager
def _stdout_to(path: Path):
    """Send this process's file descriptor 1 (inherited by node 0's torchrun) to ``path``.

    :func:`~threelc.launch.cluster.emulate.emulate` lets node 0 write to the terminal; across dozens of
    runs that buries the benchmark's own progress, so its output goes to ``node0.log`` instead.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _emulated_run(command: list[str], run_dir: Path, *, nodes: int, rate: str, timeout: float,
                  delay: str | None = None) -> dict:
    from ..cluster.emulate import emulate

    run_dir.mkdir(parents=True, exist_ok=True)
    with _stdout_to(run_dir / "node0.log"):
        return emulate(command, nodes=nodes, rate=None if rate == UNSHAPED else rate, delay=delay, nproc_per_node=1,
                       out=run_dir, timeout=timeout, port=29500)


def _median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def _median_wire(links: dict[int, list[dict]], window) -> tuple[float | None, float | None]:
    """Per node, :func:`~threelc.launch.cluster.wirebytes.median_step_delta` of tx (rx) bytes over the
    steady steps (the module says why a median); the mean over nodes."""
    from ..cluster.wirebytes import median_step_delta

    if not window or not links:
        return None, None
    per_node = {key: [median_step_delta(lines, *window, key) for lines in links.values()]
                for key in ("tx_bytes", "rx_bytes")}
    if any(value is None for values in per_node.values() for value in values):
        return None, None
    return statistics.mean(per_node["tx_bytes"]), statistics.mean(per_node["rx_bytes"])


def last_steps(window: tuple | None, last: int | None) -> tuple | None:
    """The steady ``window`` (first, last step) cut to its ``last`` steps (all of it if shorter or None)."""
    if window is None or not last:
        return window
    return max(window[0], window[1] - last + 1), window[1]


def measure_run(run_dir: Path, last: int | None = None) -> dict:
    """The figures of one finished run folder (steady-state medians, wire bytes, accuracy curve).

    The steady window is :func:`~threelc.launch.cluster.wirebytes.steady_window` of rank 0's hook log (the
    steps after warm-up), the same window the emulator used for the wire bytes, cut to its
    ``last`` steps when given (timing runs: see :func:`_aligned_trial_steps`); metrics step ``k``
    is hook iteration ``k - 1``.
    """
    from ..runs.cputime import per_step
    from ..runs.runlog import load_run
    from .bench_doc import wire_overhead
    from ..runs.summary import steady_window, summarize

    run = load_run(run_dir)
    row = summarize(run)
    hook_lines = sorted(run.hook.get(0, []), key=lambda line: line["step"])
    window = last_steps(steady_window(hook_lines), last)
    steady_steps = set(range(window[0] + 1, window[1] + 2)) if window else set()
    step_times = [record["step_s"] for record in run.metrics if record["step"] in steady_steps]
    steady_hook = [line for line in hook_lines if window and window[0] <= line["step"] <= window[1]]
    nodes = [node.get("steady") for node in (run.emulate or {}).get("nodes", [])]
    tx_median, rx_median = _median_wire(run.links, window)
    cpu = [per_step(records, min(steady_steps), max(steady_steps)) for records in run.cpu.values()] if steady_steps else []
    cpu = [measured for measured in cpu if measured]
    metric = run.config.get("eval_metric")
    elapsed, curve = 0.0, []
    for record in run.metrics:
        elapsed += record["step_s"]
        if metric in record:
            curve.append([record["step"], record[metric], elapsed])
    return {
        "parameters": row["parameters"],
        "world_size": row["world_size"],
        "steady_first_step": min(steady_steps) if steady_steps else None,
        "steady_steps": len(step_times),
        "median_step_s": _median(step_times),
        "raw_bytes_per_step": row["raw_bytes_per_step"],
        "hook_bytes_per_step": row["hook_bytes_per_step"],
        "wire_tx_per_step_node": tx_median,
        "wire_rx_per_step_node": rx_median,
        # Total over the steady window / steps, beside the median (wirebytes says why the median leads).
        "wire_tx_mean_per_step_node": (statistics.mean(node["tx_bytes_mean_per_step"] for node in nodes)
                                       if nodes and all(nodes) else None),
        "wire_overhead": wire_overhead(tx_median, row["hook_bytes_per_step"]),
        "profile": {key: _median([line.get(key) for line in steady_hook]) for key in ("compress_s", "decompress_s", "comm_s")},
        "final_eval": row["final_eval"],
        "curve": curve,  # [step, metric, seconds of training steps so far]
        "wall_s": (run.emulate or {}).get("wall_s"),
        "plan": (run.final or {}).get("hook_totals_rank0", {}).get("plan"),  # threelc's exchange plan
        # CPU seconds per step by thread name, the ranks' mean, over the samples inside the window
        # (:mod:`threelc.launch.runs.cputime`): on a host whose cores the nodes share, the step's real cost.
        "cpu_per_step": ({name: statistics.mean(seconds.get(name, 0.0) for seconds, _ in cpu)
                          for name in sorted({name for seconds, _ in cpu for name in seconds})} if cpu else None),
        "cpu_steps": min(steps for _, steps in cpu) if cpu else None,
    }


def run_cell(cell: Cell, out: Path, *, nodes: int, timeout: float, batch_size: int | None = None,
             model_args=None) -> dict:
    """Run one cell on the emulated cluster; its row for ``bench.json`` (``error`` set if it failed)."""
    run_dir = out / cell.folder
    command = _training_command(cell, batch_size=batch_size, model_args=model_args)
    row = {"example": cell.example.name, "rate": cell.rate, "hook": cell.hook.name, "kind": cell.kind,
           "steps": cell.steps, "warmup": cell.warmup if cell.hook.has_warmup else None, "nodes": nodes,
           "run_dir": cell.folder, "command": command, "error": None}
    if cell.delay is not None:
        row["delay"] = cell.delay
    if cell.window is not None:
        row["window"] = cell.window
    if cell.repeat:
        row["repeat"] = cell.repeat
    try:
        record = _emulated_run(command, run_dir, nodes=nodes, rate=cell.rate, timeout=timeout, delay=cell.delay)
        if any(code != 0 for code in record["exit_codes"]):
            row["error"] = f"exit codes {record['exit_codes']} (see {run_dir}/node*.log)"
        else:
            row.update(measure_run(run_dir, cell.window))
    except TimeoutError as error:
        row["error"] = str(error)
    return row


#: The scaling runs: a small digits CNN (~223k parameters), few steps; the 3LC default (the plan) beside
#: both collectives.
#: The pinned collectives send their headers separately, so their bytes are the byte model's exactly
#: (inline headers' slots add padding); the default shows what its plan chose.
SCALING_HOOKS = ("allreduce", "threelc-s1.0-allgather-separate", "threelc-s1.0-scatter_reduce-separate", "threelc-s1.0")
SCALING_MODEL = ("--width", "32")


def run_scaling(out: Path, node_counts, *, steps: int, timeout: float, rate: str = UNSHAPED) -> list[dict]:
    """Run :data:`SCALING_HOOKS` on each node count; their rows, for :func:`scaling_rows`.

    Each run: 2 warm-up steps, the first compressed step (the plan's probe), the steps of a measured
    trial of both collectives if the hook's plan may run one, ``steps`` steady ones.
    """
    example = EXAMPLES["digits"]
    rows = []
    for count in node_counts:
        hooks = [parse_hook(name) for name in SCALING_HOOKS]
        for hook in hooks:
            cell = Cell(example, rate, hook, "timing", 3 + _aligned_trial_steps(hook, hooks) + steps, 2, window=steps)
            row = run_cell(cell, out / f"scaling/n{count}", nodes=count, timeout=timeout, batch_size=16,
                           model_args=SCALING_MODEL)
            row["run_dir"] = f"scaling/n{count}/{cell.folder}"
            rows.append(row)
            logger.info("scaling N=%d %s: %s", count, hook.name, row.get("wire_tx_per_step_node"))
    return rows


def scaling_rows(cells: list[dict]) -> list[dict]:
    """Wire bytes per node for N nodes and each collective, beside the byte model.

    The model's C is one rank's compressed bucket: the allgather run's hook bytes per step over
    ``N - 1`` peers (the hook counts payloads and size headers exactly; that run sends its headers
    separately, so no slot padding is counted).  Predictions: allgather
    ``(N - 1) C``, scatter-reduce ``2 (N - 1) / N C``, fp32 ring allreduce ``2 (N - 1) / N * 4P``;
    the default (``"auto"``) is held to the model of the collective its plan chose.
    ``measured / model`` - 1 is then protocol overhead (Ethernet/IP/TCP, gloo) plus, for
    scatter-reduce, the difference between the averaged shards' payloads and the workers'.
    """
    rows = []
    for count in sorted({cell["nodes"] for cell in cells}):
        by_hook = {cell["hook"]: cell for cell in cells if cell["nodes"] == count}
        allgather = by_hook.get("threelc-s1.0-allgather-separate") or by_hook.get("threelc-s1.0-allgather") or {}
        payload = allgather.get("hook_bytes_per_step")  # (the second name: runs from before header modes)
        compressed = payload / (count - 1) if payload and count > 1 else None
        for name, row in by_hook.items():
            collective = (row.get("plan") or {}).get("collective") or parse_hook(name).collective
            if name == "allreduce":
                model = 2 * (count - 1) / count * row["raw_bytes_per_step"] if row.get("raw_bytes_per_step") else None
            elif collective.endswith("allgather"):
                model = (count - 1) * compressed if compressed else None
            else:
                model = 2 * (count - 1) / count * compressed if compressed else None
            wire = row.get("wire_tx_per_step_node")
            hook_bytes = row.get("hook_bytes_per_step")
            rows.append({"nodes": count, "hook": name, "compressed_bucket_bytes": compressed, "model_bytes": model,
                         "wire_tx_per_step_node": wire, "hook_bytes_per_step": hook_bytes,
                         "measured_over_model": (wire / model) if (wire and model) else None,
                         "median_step_s": row.get("median_step_s"), "plan": row.get("plan"),
                         "hook_over_model": (hook_bytes / model) if (hook_bytes and model) else None,
                         "parameters": row.get("parameters"), "run_dir": row["run_dir"], "error": row.get("error")})
    return rows


def remeasure(results: dict) -> dict:
    """``results`` with every row measured again from its run folder (under ``results["out"]``).

    For a document made with a newer :func:`measure_run` from the runs of an earlier invocation:
    the runs stay the same, only the reading of their logs changes.
    """
    out = Path(results["out"])
    for row in results["cells"] + results.get("scaling_cells", []):
        if not row.get("error"):
            row.update(measure_run(out / row["run_dir"], row.get("window")))
    if "scaling_cells" not in results and results.get("scaling"):  # bench.json from before scaling_cells
        results["scaling_cells"] = []
        for row in results["scaling"]:
            cell = {"nodes": row["nodes"], "hook": row["hook"], "run_dir": row["run_dir"], "error": row.get("error")}
            if not row.get("error"):
                cell.update(measure_run(out / row["run_dir"]))
            results["scaling_cells"].append(cell)
    results["scaling"] = scaling_rows(results.get("scaling_cells", []))
    results["remeasured"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return results


def machine_facts() -> dict:
    """What the numbers were measured on (the document's "machine" section)."""
    import torch

    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo", encoding="utf-8") as handle:
            memory = int(handle.readline().split()[1]) * 1024
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "memory_bytes": memory, "gpu": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__, "kernel": platform.release(),
            "load_average_at_start": list(load) if load else None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``threelc bench train``."""
    parser.add_argument("--quick", action="store_true",
                        help=f"the headline subset: digits; {', '.join(QUICK_HOOKS)}; unshaped, 100mbit, 10mbit; "
                             "fewer steps; scaling at 2 and 4 nodes")
    parser.add_argument("--out", default=None, help="run folders and bench.json (default: runs/bench-train-TIMESTAMP)")
    parser.add_argument("--examples", nargs="+", choices=sorted(EXAMPLES), default=None,
                        help="examples (default: digits text; --quick: digits)")
    parser.add_argument("--rates", nargs="+", default=None,
                        help="link rates, tc syntax, 'none' = unshaped (default: none 100mbit 1gbit 10mbit; "
                             "--quick: none 100mbit 10mbit); the unshaped accuracy runs always run")
    parser.add_argument("--delays", nargs="*", default=None,
                        help="one-way delays between nodes (e.g. 5ms 20ms 50ms): every shaped rate's timing runs "
                             "again with each (default: none)")
    parser.add_argument("--hooks", nargs="+", default=None,
                        help="hooks: allreduce fp16 powersgd-r<R> threelc-s<S>[-allgather|-scatter_reduce][-separate|-inline] "
                             "(default: the issue's 10; --quick: 5)")
    parser.add_argument("--nodes", type=int, default=4, help="emulated nodes, one process each (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of the accuracy runs (default: the example's; digits 300, --quick 200)")
    parser.add_argument("--warmup-steps", type=int, default=10,
                        help="allreduce steps before PowerSGD/3LC compress in the accuracy runs "
                             "(default: %(default)s, the threelc hook's own)")
    parser.add_argument("--timing-steps", type=int, default=None,
                        help="steady steps of each timing run on a shaped link (default: 8; --quick 5)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timing runs of PowerSGD and 3LC per link, in rounds; the document reports the median "
                             "of their median steps and their range (default: %(default)s)")
    parser.add_argument("--scaling-nodes", type=int, nargs="*", default=None,
                        help="node counts of the scaling runs; none to skip (default: 2 4 8; --quick: 2 4)")
    parser.add_argument("--scaling-steps", type=int, default=4, help="steady steps of each scaling run (default: %(default)s)")
    parser.add_argument("--scaling-rate", default="none",
                        help="link rate of the scaling runs, tc syntax; 'none' = unshaped (default: %(default)s: "
                             "bytes only; a shaped rate makes their step times comparable)")
    parser.add_argument("--width", type=int, default=96, help="digits CNN width (default: %(default)s, ~2.0M parameters)")
    parser.add_argument("--d-model", type=int, default=128, help="text transformer width (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before it is stopped (default: %(default)s)")
    parser.add_argument("--doc", default=None,
                        help="the markdown document to write; its plots go to DOC's folder/bench/ (default: "
                             "benchmarks.md in --out, or in the --from-json run's out; 'none' for no document)")
    parser.add_argument("--from-json", default=None, metavar="BENCH_JSON",
                        help="run nothing: rewrite --doc from an earlier run's bench.json")
    parser.add_argument("--remeasure", action="store_true",
                        help="with --from-json: read the figures again from that run's folders (its 'out')")


def _settings(args) -> dict:
    quick = args.quick
    rates = args.rates or (["none", "100mbit", "10mbit"] if quick else ["none", "100mbit", "1gbit", "10mbit"])
    return {
        "quick": quick,
        "examples": args.examples or (["digits"] if quick else ["digits", "text"]),
        "rates": [normalize_rate(rate) for rate in rates],
        "delays": [_checked_delay(delay) for delay in args.delays or []],
        "hooks": args.hooks or list(QUICK_HOOKS if quick else FULL_HOOKS),
        "nodes": args.nodes,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "timing_steps": args.timing_steps or (5 if quick else 8),
        "repeats": args.repeats,
        "scaling_nodes": args.scaling_nodes if args.scaling_nodes is not None else ([2, 4] if quick else [2, 4, 8]),
        "scaling_steps": args.scaling_steps,
        "scaling_rate": normalize_rate(args.scaling_rate),
        "timeout": args.timeout,
    }


def _checked_delay(delay: str) -> str:
    from ..cluster.delayline import parse_delay

    parse_delay(delay)  # raises ValueError on a bad delay, before anything runs
    return str(delay)


def _sized(example: Example, args) -> Example:
    """``example`` with the model size of ``--width`` / ``--d-model``."""
    if example.name == "digits":
        return dataclasses.replace(example, model_args=("--width", str(args.width)))
    options = dict(zip(example.model_args[::2], example.model_args[1::2]))
    options["--d-model"] = str(args.d_model)
    return dataclasses.replace(example, model_args=tuple(item for pair in options.items() for item in pair))


def _write_json(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1), encoding="utf-8")
    tmp.replace(path)  # a crash mid-write leaves the previous, complete file


def _doc_path(option: str | None, out) -> Path | None:
    """``--doc``: a path, ``none``, or (not given) ``benchmarks.md`` in the run's folder ``out``."""
    if option is None:
        return Path(out) / "benchmarks.md"
    return None if option.lower() == "none" else Path(option)


def run(args) -> int:
    """Run ``threelc bench train``: the matrix, the scaling runs, bench.json, the document."""
    logging.basicConfig(level=os.environ.get("THREELC_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    from . import bench_doc

    if args.from_json:
        results = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        if args.remeasure:
            results = remeasure(results)
        doc = _doc_path(args.doc, results["out"])
        if doc:
            bench_doc.write_doc(results, doc)
            print(f"wrote {doc}")
        return 0
    from ..cluster.emulate import Terminated
    from ..cluster.netns import EmulationUnavailable, check_requirements

    try:
        check_requirements(delay=bool(args.delays))
        settings = _settings(args)
        hooks = [parse_hook(name) for name in settings["hooks"]]
    except (EmulationUnavailable, ValueError) as error:
        print(f"threelc bench train: {error}", file=sys.stderr)
        return 2
    if args.nodes < 2:
        print("threelc bench train: --nodes must be at least 2", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("threelc bench train: --repeats must be at least 1", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/bench-train-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    doc = _doc_path(args.doc, out)
    examples = [_sized(EXAMPLES[name], args) for name in settings["examples"]]
    cells = plan_cells(examples, settings["rates"], hooks, steps=settings["steps"], warmup=settings["warmup_steps"],
                       timing_steps=settings["timing_steps"], quick=settings["quick"], delays=settings["delays"],
                       repeats=settings["repeats"])
    if sys.argv[1:3] == ["bench", "train"]:
        command = "threelc bench train " + " ".join(shlex.quote(arg) for arg in sys.argv[3:])
    else:
        command = "threelc bench train (called from Python)"
    results = {"command": command, "settings": settings, "machine": machine_facts(),
               "examples": {example.name: dataclasses.asdict(example) for example in examples},
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "out": str(out), "cells": [], "scaling_cells": [], "scaling": []}
    started = time.perf_counter()
    print(f"threelc bench train: {len(cells)} runs on {args.nodes} emulated nodes, then scaling at "
          f"{settings['scaling_nodes'] or 'no'} nodes; run folders in {out}", flush=True)
    try:
        for index, cell in enumerate(cells, 1):
            cell_start = time.perf_counter()
            row = run_cell(cell, out, nodes=args.nodes, timeout=args.timeout)
            results["cells"].append(row)
            _write_json(out / "bench.json", results)
            if row["error"]:
                figures = f"FAILED: {row['error']}"
            else:
                # (no steady step: a short run that the exchange plan's probe and trial filled)
                step = "-" if row["median_step_s"] is None else f"{row['median_step_s'] * 1e3:.1f}"
                figures = f"step {step:>8} ms  wire {row.get('wire_tx_per_step_node') or 0:12,.0f} B/step/node"
                if cell.kind == "accuracy" and row["final_eval"] is not None:
                    figures += f"  {cell.example.metric} {row['final_eval']:.4f}"
            link = cell.rate if cell.delay is None else f"{cell.rate}+{cell.delay}"
            name = cell.hook.name + (f" #{cell.repeat + 1}" if settings["repeats"] > 1 and cell.kind == "timing" else "")
            print(f"[{index}/{len(cells)}] {cell.example.name:6} {link:>9} {name:28} {figures}"
                  f"  ({time.perf_counter() - cell_start:.0f} s)", flush=True)
        if settings["scaling_nodes"]:
            print("scaling runs ...", flush=True)
            results["scaling_cells"] = run_scaling(out, settings["scaling_nodes"], steps=settings["scaling_steps"],
                                                   timeout=args.timeout, rate=settings["scaling_rate"])
            results["scaling"] = scaling_rows(results["scaling_cells"])
    except (KeyboardInterrupt, Terminated):  # the emulator has already removed its namespaces
        print("threelc bench train: interrupted; writing what finished", file=sys.stderr)
        results["interrupted"] = True
    results["wall_s"] = time.perf_counter() - started
    _write_json(out / "bench.json", results)
    print(f"wrote {out / 'bench.json'} ({results['wall_s'] / 60:.1f} min)")
    if doc:
        bench_doc.write_doc(results, doc)
        print(f"wrote {doc} and its plots")
    print(bench_doc.headline_text(results))
    failed = [row for row in results["cells"] + results["scaling_cells"] if row.get("error")]
    return 1 if failed or results.get("interrupted") else 0
