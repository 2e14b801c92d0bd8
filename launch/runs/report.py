"""``threelc report RUN_DIR [RUN_DIR ...]``: a comparison table and PNG plots of training runs.

::

    threelc report runs/demo/allreduce runs/demo/threelc --out runs/demo

prints one row per run (hook, settings, bytes per worker per step as the hook counts them and,
for emulated runs, as the links measured them, ratio against a float32 ring allreduce, median
step time, final test accuracy or validation loss) and writes ``report.json`` and
``loss_vs_step.png``, ``loss_vs_bytes.png``, ``loss_vs_time.png`` and ``eval_vs_bytes.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .runlog import Run, load_run
from .summary import cumulative_sent_by_step, summarize

__all__ = ["add_arguments", "run", "format_table", "format_bytes", "plot_runs", "write_report"]

logger = logging.getLogger(__name__)


def format_bytes(value) -> str:
    """Bytes with a decimal unit (GB, MB, kB, B); "-" for None."""
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`~threelc.launch.runs.summary.summarize` rows."""
    columns = [
        ("run", lambda r: r["run"]),
        ("hook", lambda r: r["hook"] or "-"),
        ("settings", lambda r: r["settings"] or "-"),
        ("workers", lambda r: str(r["world_size"])),
        ("hook B/step", lambda r: format_bytes(r["hook_bytes_per_step"])),
        ("wire B/step", lambda r: format_bytes(r["wire_bytes_per_step"])),
        ("ratio", lambda r: "-" if r["ratio_vs_fp32"] is None else f"{r['ratio_vs_fp32']:.1f}x"),
        ("median step", lambda r: "-" if r["median_step_s"] is None else f"{r['median_step_s'] * 1e3:.1f} ms"),
        ("final", lambda r: "-" if r["final_eval"] is None else
            (f"acc {r['final_eval']:.1%}" if r["eval_metric"] == "test_accuracy" else f"val {r['final_eval']:.3f}")),
    ]
    cells = [[header for header, _ in columns]] + [[cell(row) for _, cell in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) if i else text.ljust(width) for i, (text, width) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    notes = ("B/step: bytes each worker sent per steady-state step; hook = the hook's count (ring-allreduce "
             "model for PyTorch's hooks), wire = measured on emulated links (headers included).\n"
             "ratio: bytes of a float32 ring allreduce of the same gradients / hook bytes.")
    return "\n".join(lines) + "\n" + notes


def _smooth(values: list[float], span: int = 10) -> list[float]:
    """Exponential moving average: per-step training loss is too noisy to compare runs by eye."""
    alpha, out, level = 2.0 / (span + 1), [], None
    for value in values:
        level = value if level is None else alpha * value + (1 - alpha) * level
        out.append(level)
    return out


def plot_runs(runs: list[Run], out_dir) -> list[Path]:
    """Write the PNG plots for ``runs`` into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = []
    for run in runs:
        steps = [record["step"] for record in run.metrics]
        sent = cumulative_sent_by_step(run)
        metric = run.config.get("eval_metric", "test_accuracy")
        series.append({
            "label": f"{run.name} ({run.config.get('hook')})",
            "steps": steps,
            "loss": _smooth([record["loss"] for record in run.metrics]),
            "time": [record["time"] for record in run.metrics],
            "sent": [sent.get(step, float("nan")) / 1e6 for step in steps],
            "eval_sent": [sent.get(record["step"], float("nan")) / 1e6 for record in run.metrics if metric in record],
            "eval": [record[metric] for record in run.metrics if metric in record],
            "metric": metric,
        })
    paths = []
    for name, x_key, x_label, log_x in (
        ("loss_vs_step.png", "steps", "step", False),
        ("loss_vs_bytes.png", "sent", "MB sent by rank 0 (hook accounting, log scale)", True),
        ("loss_vs_time.png", "time", "wall time (s)", False),
    ):
        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        for item in series:
            axes.plot(item[x_key], item["loss"], label=item["label"])
        axes.set_xlabel(x_label)
        axes.set_ylabel("training loss (rank 0, EMA over 10 steps)")
        if log_x:
            axes.set_xscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=110)
        plt.close(figure)
        paths.append(out_dir / name)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for item in series:
        axes.plot(item["eval_sent"], item["eval"], "o-", label=item["label"])
    axes.set_xscale("log")
    axes.set_xlabel("MB sent by rank 0 (hook accounting, log scale)")
    axes.set_ylabel(", ".join(sorted({item["metric"] for item in series})))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out_dir / "eval_vs_bytes.png", dpi=110)
    plt.close(figure)
    paths.append(out_dir / "eval_vs_bytes.png")
    return paths


def write_report(run_dirs, out_dir) -> tuple[list[dict], list[Path]]:
    """Load runs, write ``report.json`` and the plots into ``out_dir``; return (rows, plot paths)."""
    runs = [load_run(path) for path in run_dirs]
    rows = [summarize(run) for run in runs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = plot_runs(runs, out_dir)
    with open(out_dir / "report.json", "w", encoding="utf-8") as handle:
        json.dump({"runs": rows, "plots": [path.name for path in paths]}, handle, indent=2)
    return rows, paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (with config.json)")
    parser.add_argument("--out", default=None, help="where report.json and the plots go (default: beside the first run)")


def run(args) -> int:
    logging.basicConfig(level=os.environ.get("THREELC_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out) if args.out else Path(args.run_dirs[0]).resolve().parent / "report"
    try:
        rows, paths = write_report(args.run_dirs, out)
    except FileNotFoundError as error:
        print(f"threelc report: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    print(f"\nwrote {out / 'report.json'} and {len(paths)} plots: {', '.join(path.name for path in paths)}")
    return 0
