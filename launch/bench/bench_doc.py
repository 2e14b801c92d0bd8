"""What ``threelc bench train`` concludes from its runs, and ``docs/benchmarks.md`` written from them.

Input: the ``bench.json`` of one run of :mod:`threelc.launch.bench.bench_train` (its ``cells`` and
``scaling`` rows).  Definitions used throughout:

* **compute floor**: the fastest median step time of any hook on the unshaped network: the step
  with the network as far out of the way as this machine allows.  Not fp32 allreduce's own
  unshaped step: moving its megabytes per step per node through veth links costs the shared
  CPU cores far more than a real NIC would, so it is no floor;
* **target metric**: fp32 allreduce's final test accuracy minus 1 point (digits), or its final
  validation loss plus 0.05 nats (text) - "as good as allreduce, within the issue's tolerance";
* **time to target**: seconds of training steps (evaluation excluded) until the first evaluation
  that meets the target.  Measured on the unshaped network; on a shaped link, estimated from
  the accuracy run's steps to the target: its warm-up steps at fp32 allreduce's median step time
  on that link, the other steps at the hook's (marked ``~``).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

from ..cluster.delayline import parse_delay
from ..runs.report import format_bytes

__all__ = ["Analysis", "analyze", "merge_repeats", "wire_overhead", "check_targets", "headline_text", "write_doc",
           "plot_bench"]

logger = logging.getLogger(__name__)

UNSHAPED = "unshaped"
TARGET_RATE = "100mbit"
SLOW_RATE = "10mbit"
#: Evaluations averaged in the "mean of last evaluations" column.
LAST_EVALS = 5
#: Figures of repeated timing runs (``--repeats``) that the merged row holds as the median over the runs.
REPEAT_MEDIANS = ("median_step_s", "wire_tx_per_step_node", "wire_rx_per_step_node", "wire_tx_mean_per_step_node",
                  "hook_bytes_per_step")


def wire_overhead(wire_tx: float | None, hook_bytes: float | None) -> float | None:
    """What the wire carried beyond the hook's own count of bytes, as a share of that count."""
    return (wire_tx / hook_bytes - 1) if (wire_tx and hook_bytes) else None


def merge_repeats(rows: list[dict]) -> list[dict]:
    """One row per cell: the runs of a repeated timing cell (``--repeats``; rows with the same
    example, rate, delay and hook) merged into the first run's row, with the median over the runs
    of each of :data:`REPEAT_MEDIANS` and of the hook's profile (the wire overhead is that of the
    median bytes, so a row's columns agree), and ``repeat_steps_s``: every
    run's median step, in the order they ran.  A cell whose runs did not all succeed keeps the
    first failure's error: a median of the survivors could hide what made one fail.
    """
    groups: dict = {}
    for row in rows:
        key = (row["example"], row["rate"], row.get("delay"), row["hook"], row["kind"])
        groups.setdefault(key, []).append(row)
    merged = []
    for runs in groups.values():
        if len(runs) == 1:
            merged.append(runs[0])
            continue
        row = dict(runs[0])
        failed = [run for run in runs if run.get("error")]
        row["repeat_steps_s"] = [run.get("median_step_s") for run in runs]
        if failed:
            row["error"] = f"{len(failed)} of {len(runs)} runs failed; first: {failed[0]['error']}"
            merged.append(row)
            continue
        for key in REPEAT_MEDIANS:
            values = [run.get(key) for run in runs if run.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row["wire_overhead"] = wire_overhead(row["wire_tx_per_step_node"], row["hook_bytes_per_step"])
        for key in ("profile", "cpu_per_step"):  # by name: the median of the runs that have it
            tables = [run.get(key) or {} for run in runs]
            names = sorted({name for table in tables for name in table})
            row[key] = {name: statistics.median(table[name] for table in tables if table.get(name) is not None)
                        for name in names} or runs[0].get(key)
        merged.append(row)
    return merged


def _rate_bits(rate: str) -> float | None:
    if rate == UNSHAPED:
        return None
    from ..cluster.netns import parse_rate

    return parse_rate(rate)


def _rate_order(rate: str) -> float:
    """Unshaped first, then fastest to slowest."""
    bits = _rate_bits(rate)
    return -math.inf if bits is None else -bits


class Analysis:
    """The rows of one example, indexed, with the derived figures (speed-ups, targets, time to target)."""

    def __init__(self, results: dict, example: str):
        self.example = example
        self.info = results["examples"][example]
        self.higher_is_better = self.info["higher_is_better"]
        self.metric = self.info["metric"]
        every = merge_repeats([row for row in results["cells"] if row["example"] == example])
        cells = [row for row in every if not row.get("delay")]
        #: Timing rows of ``--delays``: (rate, delay, hook) -> row.
        self.delayed = {(row["rate"], row["delay"], row["hook"]): row for row in every if row.get("delay")}
        self.hooks = list(dict.fromkeys(row["hook"] for row in cells))
        self.rates = sorted(dict.fromkeys(row["rate"] for row in cells), key=_rate_order)
        self.cell = {(row["rate"], row["hook"]): row for row in cells}
        self.nodes = cells[0]["nodes"] if cells else None
        self.cpus = (results.get("machine") or {}).get("cpus")
        unshaped = {hook: self.value(UNSHAPED, hook, "median_step_s") for hook in self.hooks}
        unshaped = {hook: step for hook, step in unshaped.items() if step}
        #: (hook, seconds) of the compute floor (see the module docstring).
        self.floor_hook = min(unshaped, key=unshaped.get) if unshaped else None
        self.floor = unshaped.get(self.floor_hook)
        reference = self.row(UNSHAPED, "allreduce")
        reference_final = reference.get("final_eval") if reference else None
        if reference_final is None:
            self.target = None
        else:
            slack = self.info["target_slack"]
            self.target = reference_final - slack if self.higher_is_better else reference_final + slack

    def row(self, rate: str, hook: str) -> dict | None:
        """The successful row of (rate, hook), else ``None``."""
        row = self.cell.get((rate, hook))
        return row if row and not row.get("error") else None

    def value(self, rate: str, hook: str, key: str):
        row = self.row(rate, hook)
        return None if row is None else row.get(key)

    def speedup(self, rate: str, hook: str) -> float | None:
        """fp32 allreduce's median step time over the hook's, on the same link."""
        mine, fp32 = self.value(rate, hook, "median_step_s"), self.value(rate, "allreduce", "median_step_s")
        return fp32 / mine if (mine and fp32) else None

    def byte_ratio(self, rate: str, hook: str) -> float | None:
        """fp32 allreduce's wire bytes per step per node over the hook's, on the same link."""
        mine, fp32 = self.value(rate, hook, "wire_tx_per_step_node"), self.value(rate, "allreduce", "wire_tx_per_step_node")
        return fp32 / mine if (mine and fp32) else None

    def last_evals_mean(self, hook: str) -> float | None:
        """Mean of the accuracy run's last :data:`LAST_EVALS` evaluations: a final value with less
        evaluation-to-evaluation noise than the last point (which the targets use)."""
        curve = (self.row(UNSHAPED, hook) or {}).get("curve") or []
        values = [value for _, value, _ in curve[-LAST_EVALS:]]
        return sum(values) / len(values) if values else None

    def steps_to_target(self, hook: str) -> tuple[int, float] | None:
        """(step, seconds of training steps) at which the accuracy run first met the target."""
        row = self.row(UNSHAPED, hook)
        if row is None or self.target is None:
            return None
        for step, value, elapsed in row.get("curve", []):
            if (value >= self.target) if self.higher_is_better else (value <= self.target):
                return step, elapsed
        return None

    def time_to_target(self, rate: str, hook: str) -> tuple[float, bool] | None:
        """(seconds, measured?) to the target on ``rate``; see the module docstring."""
        reached = self.steps_to_target(hook)
        if reached is None:
            return None
        step, elapsed = reached
        if rate == UNSHAPED:
            return elapsed, True
        mine, fp32 = self.value(rate, hook, "median_step_s"), self.value(rate, "allreduce", "median_step_s")
        if not mine or not fp32:
            return None
        warmup = self.row(UNSHAPED, hook).get("warmup") or 0
        return min(step, warmup) * fp32 + max(0, step - warmup) * mine, False


def analyze(results: dict) -> dict[str, Analysis]:
    """One :class:`Analysis` per example of the run."""
    return {example: Analysis(results, example) for example in dict.fromkeys(row["example"] for row in results["cells"])}


def headline_hook(analysis: Analysis) -> str | None:
    """The 3LC configuration the targets are judged on: the hook's defaults (s = 1.0, ``auto``).

    ``auto`` is scatter-reduce above 2 nodes, so ``threelc-s1.0-scatter_reduce`` stands in for it
    when the run named collectives explicitly.
    """
    explicit = "threelc-s1.0-" + ("allgather" if (analysis.nodes or 0) <= 2 else "scatter_reduce")
    for name in ("threelc-s1.0", explicit):
        if name in analysis.hooks:
            return name
    return next((hook for hook in analysis.hooks if hook.startswith("threelc")), None)


def codec_seconds(analysis: Analysis, hook: str) -> float:
    """Rank 0's compress + decompress seconds per step in ``hook``'s unshaped run (0 without a profile)."""
    profile = (analysis.row(UNSHAPED, hook) or {}).get("profile") or {}
    return (profile.get("compress_s") or 0) + (profile.get("decompress_s") or 0)


def break_even_rate(analysis: Analysis, hook: str) -> tuple[float, float] | None:
    """(codec seconds per step, link rate in bit/s) below which compressing with ``hook`` pays.

    The rule a hook could switch itself off by: compression pays when the link needs longer for
    fp32 allreduce's bytes than the codec needs per step (rank 0's compress + decompress on the
    unshaped run), i.e. on links slower than ``fp32 bytes * 8 / codec seconds``.  It ignores
    that the codec overlaps backward and the compressed bytes' own time, which roughly cancel.
    """
    codec = codec_seconds(analysis, hook)
    fp32 = analysis.value(UNSHAPED, "allreduce", "wire_tx_per_step_node")
    return (codec, fp32 * 8 / codec) if (codec and fp32) else None


def own_floor(analysis: Analysis, hook: str) -> dict | None:
    """``hook``'s distance from the compute floor at the target rate, split in two.

    The compute floor is the fastest hook's unshaped step.  ``over_own``: the step at the target
    rate over the hook's own unshaped step; ``link_s``: their difference, what the shaped link
    costs; ``above_floor_s``: the unshaped step minus the floor, what the hook costs on any link.
    """
    shaped, unshaped = analysis.value(TARGET_RATE, hook, "median_step_s"), analysis.value(UNSHAPED, hook, "median_step_s")
    if not (shaped and unshaped and analysis.floor):
        return None
    return {"over_own": shaped / unshaped, "link_s": shaped - unshaped, "above_floor_s": unshaped - analysis.floor}


def check_targets(analysis: Analysis, hook: str) -> list[dict]:
    """Issue 5's targets (item 5) for ``hook``: measured value, threshold, met (None: not measured)."""
    floor = analysis.floor
    step_target = analysis.value(TARGET_RATE, hook, "median_step_s")
    step_unshaped = analysis.value(UNSHAPED, hook, "median_step_s")
    powersgd = analysis.value(TARGET_RATE, "powersgd-r1", "median_step_s")
    final, fp32_final = analysis.value(UNSHAPED, hook, "final_eval"), analysis.value(UNSHAPED, "allreduce", "final_eval")

    def entry(name, measured, threshold, met, unit):
        return {"target": name, "measured": measured, "threshold": threshold, "met": met, "unit": unit}

    def ratio(numerator, denominator):
        return numerator / denominator if (numerator and denominator) else None

    rows = []
    over_floor = ratio(step_target, floor)
    rows.append(entry(f"step time at {TARGET_RATE} <= 1.1x the compute floor", over_floor, 1.1,
                      None if over_floor is None else over_floor <= 1.1, "x floor"))
    speedup = analysis.speedup(TARGET_RATE, hook)
    rows.append(entry(f">= 12x faster than fp32 allreduce at {TARGET_RATE}", speedup, 12,
                      None if speedup is None else speedup >= 12, "x"))
    versus = ratio(powersgd, step_target)
    rows.append(entry(f"faster than PowerSGD rank 1 at {TARGET_RATE}", versus, 1,
                      None if versus is None else versus > 1, "x (PowerSGD / 3LC step time)"))
    fewer = analysis.byte_ratio(TARGET_RATE, hook)
    rows.append(entry(f">= 40x fewer wire bytes than fp32 allreduce at {TARGET_RATE}", fewer, 40,
                      None if fewer is None else fewer >= 40, "x"))
    if analysis.higher_is_better:
        gap = None if (final is None or fp32_final is None) else (fp32_final - final) * 100
        rows.append(entry("accuracy within 1 point of fp32 allreduce", gap, 1.0, None if gap is None else gap <= 1.0,
                          "points below allreduce"))
    else:
        gap = None if (final is None or fp32_final is None) else final - fp32_final
        rows.append(entry("validation loss within 0.05 nats of fp32 allreduce", gap, 0.05,
                          None if gap is None else gap <= 0.05, "nats above allreduce"))
    slow = analysis.speedup(SLOW_RATE, hook)
    rows.append(entry(f">= 20x faster than fp32 allreduce at {SLOW_RATE}", slow, 20,
                      None if slow is None else slow >= 20, "x"))
    overhead = ratio(step_unshaped, analysis.value(UNSHAPED, "allreduce", "median_step_s"))
    rows.append(entry("unshaped: <= 1.1x fp32 allreduce's step time", overhead, 1.1,
                      None if overhead is None else overhead <= 1.1, "x allreduce"))
    return rows


# ---------------------------------------------------------------------------- formatting
def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.0f} ms" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def _times(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _metric(analysis: Analysis, value) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if analysis.higher_is_better else f"{value:.3f}"


def _time_to_target(analysis: Analysis, rate: str, hook: str) -> str:
    if analysis.steps_to_target(hook) is None:
        return "not reached" if analysis.row(UNSHAPED, hook) and analysis.target is not None else "-"
    entry = analysis.time_to_target(rate, hook)
    if entry is None:  # no step time on this link
        return "-"
    seconds, measured = entry
    return ("" if measured else "~") + (f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _met(value) -> str:
    return {True: "**met**", False: "**missed**", None: "not measured"}[value]


def _measured(row: dict) -> str:
    value = row["measured"]
    if value is None:
        return "-"
    unit = row["unit"]
    if value < 0 and unit.endswith(" below allreduce"):  # "-0.83 points below" reads better as "0.83 above"
        return f"{-value:.2f} {unit.replace(' below ', ' above ')}"
    if value < 0 and unit.endswith(" above allreduce"):
        return f"{-value:.2f} {unit.replace(' above ', ' below ')}"
    return f"{value:.2f} {unit}"


def example_tables(analysis: Analysis) -> str:
    """Markdown: step time per rate, speed-up, wire bytes, final metric, time to target."""
    metric_name = "test accuracy" if analysis.higher_is_better else "validation loss"
    header = ["hook"] + [f"step @ {rate}" for rate in analysis.rates] + [f"speed-up @ {rate}" for rate in analysis.rates
                                                                        if rate != UNSHAPED]
    rows = []
    for hook in analysis.hooks:
        rows.append([hook] + [_ms(analysis.value(rate, hook, "median_step_s")) for rate in analysis.rates]
                    + [_times(analysis.speedup(rate, hook)) for rate in analysis.rates if rate != UNSHAPED])
    timing = _table(header, rows)
    byte_rate = TARGET_RATE if TARGET_RATE in analysis.rates else analysis.rates[-1]
    header = ["hook", f"wire B/step/node @ {byte_rate}", "fewer than fp32", "hook's count", "wire overhead",
              f"final {metric_name}", "vs fp32", f"mean of last {LAST_EVALS} evaluations"] + [
                  f"to target @ {rate}" for rate in analysis.rates]
    rows = []
    fp32_final = analysis.value(UNSHAPED, "allreduce", "final_eval")
    for hook in analysis.hooks:
        final = analysis.value(UNSHAPED, hook, "final_eval")
        if final is None or fp32_final is None:
            delta = "-"
        elif analysis.higher_is_better:
            delta = f"{(final - fp32_final) * 100:+.1f} pt"
        else:
            delta = f"{final - fp32_final:+.3f}"
        overhead = analysis.value(byte_rate, hook, "wire_overhead")
        rows.append([hook, format_bytes(analysis.value(byte_rate, hook, "wire_tx_per_step_node")),
                     _times(analysis.byte_ratio(byte_rate, hook)),
                     format_bytes(analysis.value(byte_rate, hook, "hook_bytes_per_step")),
                     "-" if overhead is None else f"{overhead:+.1%}",
                     _metric(analysis, final), delta, _metric(analysis, analysis.last_evals_mean(hook))]
                    + [_time_to_target(analysis, rate, hook) for rate in analysis.rates])
    return timing + "\n\n" + _table(header, rows)


def curve_table(analysis: Analysis, columns: int = 10) -> str:
    """Markdown: each hook's evaluation at up to ``columns`` evenly spaced evaluated steps (unshaped runs)."""
    curves = {hook: {step: value for step, value, _ in (analysis.row(UNSHAPED, hook) or {}).get("curve", [])}
              for hook in analysis.hooks}
    steps = sorted(set().union(*curves.values())) if curves else []
    if not steps:
        return ""
    stride = max(1, math.ceil(len(steps) / columns))
    shown = steps[::-1][::stride][::-1]  # always include the last step
    scale = 100 if analysis.higher_is_better else 1
    rows = [[hook] + ["-" if step not in curves[hook] else f"{curves[hook][step] * scale:.{1 if scale == 100 else 3}f}"
                      for step in shown] for hook in analysis.hooks]
    return _table(["step"] + [str(step) for step in shown], rows)


def profile_table(analysis: Analysis, rate: str) -> str:
    """Markdown: where a step's time goes on ``rate`` (rank 0's medians over steady steps)."""
    bits = _rate_bits(rate)
    header = ["hook", "median step", "compute floor", "wire B/step/node", "bytes / link rate", "hook: compress",
              "hook: decompress", "hook: in collectives"]
    rows = []
    for hook in analysis.hooks:
        row = analysis.row(rate, hook)
        if row is None:
            continue
        profile = row.get("profile") or {}
        wire = row.get("wire_tx_per_step_node")
        rows.append([hook, _ms(row.get("median_step_s")), _ms(analysis.floor), format_bytes(wire),
                     _ms(wire * 8 / bits) if (wire and bits) else "-",
                     _ms(profile.get("compress_s")), _ms(profile.get("decompress_s")), _ms(profile.get("comm_s"))])
    return _table(header, rows)


#: Thread names of :func:`cpu_table`'s columns (:mod:`threelc.launch.runs.cputime`); other threads go to "other".
CPU_COLUMNS = (("training thread", ("main",)), ("threelc-hook", ("threelc-hook",)),
               ("gloo", ("gloo_tcp_loop", "pt_gloo_runloop")))


def cpu_table(analysis: Analysis, rate: str) -> str:
    """Markdown: CPU milliseconds per step per rank by thread (the ranks' mean) on ``rate``, for
    the timing runs that recorded them (an accuracy run's samples also hold its evaluations);
    empty when none did.  The last column is every node's CPU per step over what the host's cores
    offer in one step: near 100%, CPU sets the step, not the link."""
    rows = []
    for hook in analysis.hooks:
        row = analysis.row(rate, hook) or {}
        cpu, step = row.get("cpu_per_step"), row.get("median_step_s")
        if not cpu or row.get("kind") != "timing":
            continue
        named = [sum(cpu.get(name, 0.0) for name in names) for _, names in CPU_COLUMNS]
        total = sum(cpu.values())
        busy = f"{total * analysis.nodes / (step * analysis.cpus):.0%}" if (step and analysis.cpus) else "-"
        rows.append([hook, _ms(step), *(_ms(value) for value in named), _ms(total - sum(named)), _ms(total), busy])
    if not rows:
        return ""
    return _table(["hook", "median step", *(title for title, _ in CPU_COLUMNS), "other", "CPU per step per rank",
                   "nodes' CPU / cores' time"], rows)


def scaling_table(rows: list[dict]) -> str:
    """Markdown: measured wire bytes per node against the byte model, per N and collective."""
    body = []
    for row in rows:
        payload = format_bytes(row.get("compressed_bucket_bytes")) if row["hook"] != "allreduce" else "-"
        plan = row.get("plan") or {}
        # "auto": the plan chose the collective (and how the headers travel)
        chosen = plan and not any(name in row["hook"] for name in ("allgather", "scatter_reduce"))
        inline = " + inline headers" if plan.get("header") == "inline" else ""
        hook = f"{row['hook']} (plan: {plan['collective']}{inline})" if chosen else row["hook"]
        body.append([str(row["nodes"]), hook, _ms(row.get("median_step_s")), payload,
                     format_bytes(row.get("model_bytes")), format_bytes(row.get("hook_bytes_per_step")),
                     "-" if row.get("hook_over_model") is None else f"{row['hook_over_model']:.2f}",
                     format_bytes(row.get("wire_tx_per_step_node")),
                     "-" if row.get("measured_over_model") is None else f"{row['measured_over_model']:.2f}",
                     row.get("error") or ""])
    return _table(["N", "hook", "median step", "C (one rank's payload)", "model B/step/node", "hook's count", "hook / model",
                   "wire B/step/node", "wire / model", "error"], body)


# ---------------------------------------------------------------------------- plots
def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported here: only plotting needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    _pyplot().close(figure)
    return path


def _plot_step_time(name: str, analysis: Analysis, out_dir: Path) -> Path:
    """Bars: median step time per hook, one bar per link rate, the compute floor dashed."""
    figure, axes = _pyplot().subplots(figsize=(7.5, 3.4))
    width = 0.8 / max(1, len(analysis.rates))
    for offset, rate in enumerate(analysis.rates):
        heights = [(analysis.value(rate, hook, "median_step_s") or float("nan")) * 1e3 for hook in analysis.hooks]
        axes.bar([i + offset * width for i in range(len(analysis.hooks))], heights, width, label=rate)
    if analysis.floor:
        axes.axhline(analysis.floor * 1e3, color="black", linewidth=0.8, linestyle="--", label="compute floor")
    axes.set_yscale("log")
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(analysis.hooks))])
    axes.set_xticklabels([hook.replace("threelc-", "3lc-").replace("scatter_reduce", "sr").replace("allgather", "ag")
                          for hook in analysis.hooks], rotation=30, ha="right", fontsize=7)
    axes.set_ylabel("median step (ms, log)")
    axes.set_title(f"{name}: step time per hook and link rate ({analysis.nodes} nodes)", fontsize=9)
    axes.legend(fontsize=7, ncol=2)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, out_dir / f"step_time_{name}.png")


def _plot_accuracy_vs_bytes(name: str, analysis: Analysis, out_dir: Path) -> Path:
    """Scatter: each hook's final metric against its unshaped wire bytes per step per node."""
    figure, axes = _pyplot().subplots(figsize=(7.5, 3.4))
    # A legend, not labels beside the points: several hooks land on almost the same spot.
    for index, hook in enumerate(analysis.hooks):
        wire, final = analysis.value(UNSHAPED, hook, "wire_tx_per_step_node"), analysis.value(UNSHAPED, hook, "final_eval")
        if wire and final is not None:
            axes.scatter([wire], [final * (100 if analysis.higher_is_better else 1)], s=24,
                         marker="osD^v<>ph*"[index % 10], label=hook.replace("threelc-", "3lc-"))
    axes.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.set_xscale("log")
    axes.set_xlabel("wire bytes per step per node (log)")
    axes.set_ylabel("final test accuracy (%)" if analysis.higher_is_better else "final validation loss")
    axes.set_title(f"{name}: {analysis.metric} against bytes", fontsize=9)
    axes.grid(alpha=0.3)
    return _save(figure, out_dir / f"accuracy_vs_bytes_{name}.png")


def _plot_scaling(scaling: list[dict], out_dir: Path) -> Path:
    """Measured wire bytes (points) and the byte model (lines) against the node count, per hook."""
    figure, axes = _pyplot().subplots(figsize=(6, 3.4))
    for index, hook in enumerate(dict.fromkeys(row["hook"] for row in scaling)):
        rows = sorted((row for row in scaling if row["hook"] == hook), key=lambda row: row["nodes"])
        color = f"C{index}"
        axes.plot([row["nodes"] for row in rows], [row["wire_tx_per_step_node"] for row in rows], "o", color=color,
                  label=f"{hook} (wire)")
        axes.plot([row["nodes"] for row in rows], [row["model_bytes"] or float("nan") for row in rows], "-",
                  color=color, alpha=0.6, label=f"{hook} (model)")
    axes.set_yscale("log")
    axes.set_xlabel("nodes")
    axes.set_ylabel("bytes per step per node (log)")
    axes.set_title("scaling: measured wire bytes against the byte model", fontsize=9)
    axes.legend(fontsize=6)
    axes.grid(alpha=0.3)
    return _save(figure, out_dir / "scaling.png")


def plot_bench(results: dict, out_dir: Path) -> list[Path]:
    """Small PNGs into ``out_dir``: step time per hook per rate, metric against bytes, scaling."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, analysis in analyze(results).items():
        paths.append(_plot_step_time(name, analysis, out_dir))
        paths.append(_plot_accuracy_vs_bytes(name, analysis, out_dir))
    scaling = [row for row in results.get("scaling", []) if not row.get("error")]
    if scaling:
        paths.append(_plot_scaling(scaling, out_dir))
    return paths


# ---------------------------------------------------------------------------- the document
def headline_text(results: dict) -> str:
    """A few lines with the headline figures (printed by the CLI, quoted by README)."""
    analyses = analyze(results)
    analysis = analyses.get("digits") or next(iter(analyses.values()), None)
    if analysis is None:
        return "no results"
    hook = headline_hook(analysis)
    if hook is None:
        return "no threelc run"
    lines = [f"headline ({analysis.example}, {analysis.nodes} nodes, {hook} vs fp32 allreduce):"]
    for rate in analysis.rates:
        step, fp32 = analysis.value(rate, hook, "median_step_s"), analysis.value(rate, "allreduce", "median_step_s")
        lines.append(f"  {rate:>9}: step {_ms(step)} vs {_ms(fp32)} ({_times(analysis.speedup(rate, hook))} faster), "
                     f"wire {format_bytes(analysis.value(rate, hook, 'wire_tx_per_step_node'))} vs "
                     f"{format_bytes(analysis.value(rate, 'allreduce', 'wire_tx_per_step_node'))} per step per node "
                     f"({_times(analysis.byte_ratio(rate, hook))} fewer)")
    lines.append(f"  final {analysis.metric}: {_metric(analysis, analysis.value(UNSHAPED, hook, 'final_eval'))} vs "
                 f"{_metric(analysis, analysis.value(UNSHAPED, 'allreduce', 'final_eval'))}")
    for target in check_targets(analysis, hook):
        lines.append(f"  target {target['target']}: {_measured(target)} -> {_met(target['met']).strip('*')}")
    return "\n".join(lines)


def _machine(results: dict) -> str:
    machine = results.get("machine", {})
    memory = machine.get("memory_bytes")
    load = machine.get("load_average_at_start")
    return (f"{machine.get('cpus')} CPU cores, {memory / 2**30:.0f} GiB memory, "
            f"{'a GPU' if machine.get('gpu') else 'no GPU'} (CPU training, gloo), Python {machine.get('python')}, "
            f"torch {machine.get('torch')}, Linux {machine.get('kernel')}; load average "
            f"{'-' if not load else f'{load[0]:.1f}'} when the run started."
            if memory else "unknown")


def _intro(results: dict) -> list[str]:
    """Title, how the page was made (run, command) and the machine."""
    settings = results["settings"]
    return [
        "# Benchmarks: 3LC against PyTorch's hooks on an emulated cluster",
        "",
        f"Written by `threelc bench train` from one run; regenerate it rather than editing it. "
        f"Run started {results.get('started')}, took {results.get('wall_s', 0) / 60:.0f} min"
        + (f"; its run folders were read again on {results['remeasured']} (`--from-json ... --remeasure`) with "
           "the per-step median estimator of wire bytes described below." if results.get("remeasured") else "."),
        "",
        "```",
        results["command"],
        "```",
        "",
        f"**Machine**: {_machine(results)} The cluster is emulated: {settings['nodes']} network namespaces, one "
        "torchrun node (one training process) each, joined by veth links through a bridge, shaped in both "
        "directions with tc's token bucket (`threelc emulate`).  Wire bytes are the kernel's link counters "
        "(Ethernet/IP/TCP headers included), over steady-state steps only.",
        "",
    ]


def _ceiling_text(analysis: Analysis) -> list[str]:
    """How much faster than fp32 allreduce any hook could be on this machine, per shaped rate."""
    ceilings = [f"{analysis.value(rate, 'allreduce', 'median_step_s') / analysis.floor:.1f}x at {rate}"
                for rate in (TARGET_RATE, SLOW_RATE)
                if analysis.floor and analysis.value(rate, "allreduce", "median_step_s")]
    if not ceilings:
        return []
    return ["", "Ceiling: no hook can be faster than fp32 allreduce by more than fp32 allreduce's step time over "
            f"the compute floor ({analysis.floor_hook}, {_ms(analysis.floor)}) on this machine: "
            f"{', '.join(ceilings)}."]


def _own_floor_text(analysis: Analysis, hook: str) -> list[str]:
    """``hook``'s step at the target rate split into what the link costs and what the hook costs."""
    own = own_floor(analysis, hook)
    if not own:
        return []
    return ["", f"`{hook}` at {TARGET_RATE}: {own['over_own']:.2f}x its own unshaped step, so the link costs "
            f"it {_ms(max(own['link_s'], 0.0))} per step.  Its unshaped step is {_ms(own['above_floor_s'])} "
            "above the compute floor, a cost it pays on any link; its codec (compress and decompress on "
            f"rank 0) takes {_ms(codec_seconds(analysis, hook))} per step."]


def _switch_off_text(analysis: Analysis, hook: str) -> list[str]:
    """The link rate below which compressing with ``hook`` pays (see :func:`break_even_rate`)."""
    even = break_even_rate(analysis, hook)
    if not even:
        return []
    return ["", f"Switch-off rule (documented, not automatic: the hook itself compresses every bucket of at "
            f"least `min_numel` values after warm-up): `{hook}` spends {_ms(even[0])} per step in its codec, "
            f"as long as fp32 allreduce's {format_bytes(analysis.value(UNSHAPED, 'allreduce', 'wire_tx_per_step_node'))} "
            f"per step per node need on a {even[1] / 1e9:.2f} Gbit/s link.  Compress on slower links; on "
            f"faster ones plain allreduce is the better choice for this model on these cores."]


def _other_settings_table(analysis: Analysis, hook: str, targets: list[dict]) -> list[str]:
    """The same targets for every other 3LC setting of the run, one column each."""
    others = [other for other in analysis.hooks if other.startswith("threelc") and other != hook]
    if not others:
        return []
    header = ["target"] + [f"`{other}`" for other in others]
    table = [[row["target"]] for row in targets]
    for other in others:
        for index, row in enumerate(check_targets(analysis, other)):
            table[index].append(f"{_measured(row)} ({_met(row['met']).strip('*')})")
    return ["", "The same targets for the other 3LC settings:", "", _table(header, table)]


def _where_the_time_goes(analysis: Analysis, targets: list[dict]) -> list[str]:
    """Per-rate profile tables, only when a target was missed."""
    if not any(row["met"] is False for row in targets):
        return []
    parts = ["", "### Where the time goes (missed targets)", "",
             "Rank 0's medians over steady steps.  *bytes / link rate* is the least time the link needs for "
             "one step's bytes; the hook columns are the threelc hook's own statistics (compress and "
             "decompress run on its worker thread while backward continues; *in collectives* includes waiting "
             "for slower ranks).  PyTorch's hooks only report time in collectives."]
    for rate in analysis.rates:
        parts += ["", f"{rate}:", "", profile_table(analysis, rate)]
        cpu = cpu_table(analysis, rate)
        if cpu:
            parts += ["", f"CPU per step per rank at {rate}, by thread (the ranks' mean over the timing window; "
                      "*nodes' CPU / cores' time*: every node's CPU per step over the host's cores times the step: "
                      "near 100%, the nodes' CPU, not the link, sets the step):", "", cpu]
    return parts


def _targets_section(name: str, analysis: Analysis) -> list[str]:
    """``## Targets (...)``: issue 5's targets judged on the hook's defaults, and what explains them."""
    hook = headline_hook(analysis)
    if hook is None:
        return []
    targets = check_targets(analysis, hook)
    parts = [f"## Targets ({name}, {analysis.nodes} nodes, judged on `{hook}`: the hook's defaults)", ""]
    if name != "digits":
        parts += [f"Issue 5 sets its targets on the digits CNN; the same checks on {name}, for comparison.", ""]
    parts.append(_table(["target (issue 5)", "measured", "met?"],
                        [[row["target"], _measured(row), _met(row["met"])] for row in targets]))
    parts += _ceiling_text(analysis)
    parts += _own_floor_text(analysis, hook)
    parts += _switch_off_text(analysis, hook)
    parts += _other_settings_table(analysis, hook, targets)
    parts += _where_the_time_goes(analysis, targets)
    parts.append("")
    return parts


def _example_section(results: dict, name: str, analysis: Analysis) -> list[str]:
    """``## {example}: all hooks``: the run's settings, the tables, the curves, the plots, failed runs."""
    info = analysis.info
    settings = results["settings"]
    target_text = (f"fp32 allreduce's final accuracy minus {info['target_slack'] * 100:.0f} point = "
                   f"{_metric(analysis, analysis.target)}" if analysis.higher_is_better else
                   f"fp32 allreduce's final validation loss plus {info['target_slack']} = "
                   f"{_metric(analysis, analysis.target)}")
    accuracy_row = analysis.row(UNSHAPED, "allreduce") or {}
    timing_rows = [row for row in results["cells"] if row["example"] == name and row["kind"] == "timing"]
    parts = [
        f"## {name}: all hooks",
        "",
        f"{info['module']} {' '.join(info['model_args'])} ({accuracy_row.get('parameters') or 0:,} parameters), "
        f"per-worker batch {info['batch_size']}, {analysis.nodes} nodes.  Accuracy runs (unshaped): "
        f"{accuracy_row.get('steps', '?')} steps, {settings['warmup_steps']} warm-up steps of allreduce for PowerSGD "
        f"and 3LC.  Timing runs (shaped links): 2 warm-up + {timing_rows[0]['steps'] - 2 if timing_rows else '?'} "
        f"steady steps.  Target: {target_text}.  Compute floor: {_ms(analysis.floor)} "
        f"(`{analysis.floor_hook}`, unshaped).",
        "",
        example_tables(analysis),
        "",
        f"{'Test accuracy (%)' if analysis.higher_is_better else 'Validation loss'} during the accuracy runs:",
        "",
        curve_table(analysis),
        "",
        f"![step time](bench/step_time_{name}.png) ![{analysis.metric} against bytes](bench/accuracy_vs_bytes_{name}.png)",
        "",
    ]
    repeats = repeats_table(analysis)
    if repeats:
        parts += [f"Repeated timing runs (`--repeats {settings.get('repeats')}`, in rounds: every hook once, then "
                  "again): each run's median step, and the median of those, which the tables above use.  spread: "
                  "(slowest - fastest) / median.", "", repeats, ""]
    failed = [row for row in results["cells"] if row["example"] == name and row.get("error")]
    if failed:
        parts += ["Failed runs: " + "; ".join(f"{row['rate']} {row['hook']}: {row['error']}" for row in failed), ""]
    return parts


def repeats_table(analysis: Analysis) -> str:
    """The repeated timing runs (``--repeats``): per link and hook, every run's median step in the
    order they ran, their median (the figure the other tables use) and their spread; empty
    without repeats."""
    rows = []
    repeated = [(rate, None, hook, row) for (rate, hook), row in analysis.cell.items()]
    repeated += [(rate, delay, hook, row) for (rate, delay, hook), row in analysis.delayed.items()]
    for rate, delay, hook, row in repeated:
        steps = [step for step in row.get("repeat_steps_s") or [] if step is not None]
        if len(steps) < 2 or row.get("error"):
            continue
        link = rate if delay is None else f"{rate} + {delay}"
        rows.append([link, hook, str(len(steps)), _ms(statistics.median(steps)), _ms(min(steps)), _ms(max(steps)),
                     f"{(max(steps) - min(steps)) / statistics.median(steps):.0%}", ", ".join(_ms(step) for step in steps)])
    if not rows:
        return ""
    return _table(["link", "hook", "runs", "median", "fastest", "slowest", "spread", "each run (in order)"], rows)


def delay_table(analysis: Analysis, rate: str) -> str:
    """Median step per hook (rows) and one-way delay (columns) on ``rate``; x = fp32 allreduce's step
    at the same delay over the hook's."""
    delays = sorted({delay for (row_rate, delay, _) in analysis.delayed if row_rate == rate}, key=parse_delay)

    def step(hook, delay):
        row = analysis.row(rate, hook) if delay is None else analysis.delayed.get((rate, delay, hook))
        return None if row is None or row.get("error") else row.get("median_step_s")

    rows = []
    for hook in analysis.hooks:
        cells = []
        for delay in (None, *delays):
            mine, fp32 = step(hook, delay), step("allreduce", delay)
            cells.append(_ms(mine) + (f" ({fp32 / mine:.1f}x)" if mine and fp32 and hook != "allreduce" else ""))
        rows.append([hook, *cells])
    return _table(["hook", "no delay", *delays], rows)


def _delay_section(name: str, analysis: Analysis) -> list[str]:
    """``### name: step time against delay`` (empty without ``--delays`` runs)."""
    rates = sorted({rate for (rate, _, _) in analysis.delayed}, key=_rate_order)
    if not rates:
        return []
    parts = [f"### {name}: step time against one-way delay", "",
             "Timing runs as above, with a one-way delay between every two nodes (the emulator's user-space delay "
             "line: a round trip takes twice the delay).  Median step; in brackets fp32 allreduce's step at the same "
             "delay over the hook's.", ""]
    for rate in rates:
        parts += [f"At {rate}:", "", delay_table(analysis, rate), ""]
    return parts


def _scaling_section(results: dict) -> list[str]:
    """``## Scaling``: wire bytes per node against the byte model (empty without scaling runs)."""
    if not results.get("scaling"):
        return []
    rate = results.get("settings", {}).get("scaling_rate", "unshaped")
    links = ("unshaped links (the step times measure the shared cores, not a link)" if rate == "unshaped"
             else f"links shaped to {rate}")
    return [
        "## Scaling: wire bytes per node against the byte model",
        "",
        f"digits CNN width 32 (a small model), {links}, one process per node; median step over the steady steps "
        "(after warm-up and the first compressed step).  `threelc-s1.0` is the hook's default, "
        "`collective=\"auto\"`, with the collective its measured plan chose.  C is one rank's compressed bucket, taken from the allgather run's own count at the same N (bytes per "
        "step / (N - 1)); the model is (N - 1) C for allgather, 2 (N - 1) / N C for scatter-reduce and "
        "2 (N - 1) / N * 4P for fp32 ring allreduce.  *hook / model* checks the collective's algorithm (what the "
        "hook itself counts: payloads and size headers); *wire / model* adds the protocols: Ethernet/IP/TCP "
        "headers and ACKs, and gloo's framing, a fixed cost per message that weighs heavily on payloads of a "
        "few kB (scatter-reduce sends 2 (N - 1) messages per bucket and step, plus size headers).",
        "",
        scaling_table(results["scaling"]),
        "",
        "![scaling](bench/scaling.png)",
        "",
    ]


def _method_section(plots: list[Path]) -> list[str]:
    """``## How it was measured``: the definitions behind every figure of the page."""
    return [
        "## How it was measured",
        "",
        "- Every cell is a fresh `threelc emulate` job: same seeds, same data order, same model initialization.",
        "- Accuracy runs use the unshaped network; timing runs on shaped links start compressing after 2 steps and "
        "time only the steady steps after the first compressed one (which also carries one-time work: threelc's "
        "exchange-plan probe, PowerSGD's first factors) and after the steps threelc flags `planning` (a measured "
        "trial of the close plans when its model's call is close: up to 24 steps).  Every 3LC timing run gets as "
        "many more steps as the longest possible trial and is timed over its last `--timing-steps` steps, so the "
        "default and the pinned settings are timed at the same stage of the network's (growing) payloads.  "
        "A link's rate changes when bytes arrive, not which bytes: the "
        "accuracy curve of a hook is the same on every link, so time to target on a shaped link (marked `~`) is the "
        "unshaped run's steps to target, warm-up steps at fp32 allreduce's step time on that link and the rest at the "
        "hook's.",
        "- Median step time: rank 0's wall time of forward, backward and optimizer step, median over steady steps.",
        "- Wire bytes per step per node: for each node, the median of the per-step deltas of its link's tx counter "
        "over the steady steps, averaged over nodes.  A median, because a sender's last bytes of a collective can "
        "still be in its socket buffer when it samples its counters, so they count in the next step: after the "
        "warm-up's allreduce that tail can reach hundreds of kB (0.8 MB once in the run of 2026-11-28) and would be "
        "charged to the first compressed step.  *hook's "
        "count* is what the hook says it sent (for PyTorch's hooks, the ring-allreduce model of launch/examples/comm.py); "
        "*wire overhead* = wire / hook's count - 1.",
        "- Noise: the emulated nodes' training processes share this machine's cores, and a timing run has few steady steps; "
        "step times that differ by less than ~15% (e.g. PowerSGD rank 1 against 3LC) are not a ranking.",
        "- Compute floor: the fastest median step of any hook on the unshaped network (per example, named in its "
        "section).  fp32 allreduce's unshaped step is no floor here: moving its megabytes per step through veth "
        "costs the shared CPU cores much more than a NIC would.",
        "- PowerSGD: PyTorch's hook with error feedback and warm start, its start iteration equal to 3LC's warm-up; "
        "its collectives are serialized per bucket (needed on gloo with several buckets; see launch/examples/comm.py).",
        f"- Plots: {', '.join(f'`bench/{path.name}`' for path in plots)}; every figure above, per run, in "
        "`bench/bench.json` (`threelc bench train --from-json docs/bench/bench.json --doc docs/benchmarks.md` "
        "re-renders this page).",
        "",
    ]


#: A line in the document after which other scripts' sections follow (the AdamW benchmark's):
#: :func:`write_doc` rewrites what comes before it and keeps the rest as it is.
KEEP_MARKER = "<!-- threelc bench train writes the sections above; it keeps everything below this line -->"


def _kept_tail(doc: Path) -> str:
    """The part of an existing ``doc`` from :data:`KEEP_MARKER` on ("" without one)."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    start = text.find(KEEP_MARKER)
    return "" if start < 0 else "\n" + text[start:]


def write_doc(results: dict, doc: Path) -> Path:
    """Write ``doc`` (markdown) and its plots into ``doc``'s folder ``bench/``; return ``doc``."""
    doc = Path(doc)
    plot_dir = doc.parent / "bench"
    plots = plot_bench(results, plot_dir)
    # The numbers behind the document, so it can be checked or re-rendered (--from-json) later.
    (plot_dir / "bench.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    analyses = analyze(results)
    parts = _intro(results)
    for name, analysis in analyses.items():
        parts += _targets_section(name, analysis)
    for name, analysis in analyses.items():
        parts += _example_section(results, name, analysis)
        parts += _delay_section(name, analysis)
    parts += _scaling_section(results)
    parts += _method_section(plots)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(parts) + _kept_tail(doc), encoding="utf-8")
    logger.info("wrote %s and %d plots", doc, len(plots))
    return doc
