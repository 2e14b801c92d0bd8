"""``threelc demo``: DDP training on real data with plain allreduce and with 3LC, side by side.

One command, no setup::

    threelc demo

launches ``torchrun`` twice on this machine (4 gloo workers each): the digits CNN of
:mod:`threelc.launch.examples.train_digits`, once with PyTorch's default allreduce and once with the 3LC
hook at its default settings.  It then prints bytes per worker per step, compression ratio,
final test accuracy and median step time, and writes a run folder with the per-rank JSON lines,
``summary.json`` and PNG plots.

Bytes here are what the collectives move between the workers (counted by the hooks); they
travel over this machine's loopback.  ``--nodes N`` runs the same two trainings on N emulated
machines with shaped links instead (root only), adding the bytes measured on the links.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .runs.report import format_table, write_report

__all__ = ["add_arguments", "run"]

HOOKS = ("allreduce", "threelc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=4, help="torchrun workers (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default: %(default)s)")
    parser.add_argument("--width", type=int, default=32, help="CNN width; ~218*width^2 parameters (default: %(default)s)")
    parser.add_argument("--sparsity", type=float, default=1.0, help="3LC sparsity multiplier (default: %(default)s)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/demo-TIMESTAMP)")
    parser.add_argument("--nodes", type=int, default=0,
                        help="run on this many emulated machines (workers split evenly; needs root) instead of loopback")
    parser.add_argument("--rate", default="100mbit", help="emulated link rate with --nodes (default: %(default)s)")


def _training_args(args, hook: str, run_dir: Path) -> list[str]:
    return ["-m", "threelc.launch.examples.train_digits", "--hook", hook, "--steps", str(args.steps), "--width", str(args.width),
            "--sparsity", str(args.sparsity), "--eval-every", str(max(1, args.steps // 10)), "--run-dir", str(run_dir)]


def _run_local(args, hook: str, run_dir: Path) -> int:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.workers),
               *_training_args(args, hook, run_dir)]
    # One thread per worker for torch and for numba (the 3LC codec): workers share the cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    return subprocess.run(command, env=env).returncode


def _run_emulated(args, hook: str, run_dir: Path) -> int:
    from .cluster.emulate import emulate, format_table as wire_table

    if args.workers % args.nodes:
        raise SystemExit(f"threelc demo: --workers {args.workers} does not split evenly over --nodes {args.nodes}")
    record = emulate(_training_args(args, hook, run_dir), nodes=args.nodes, rate=args.rate, delay=None,
                     nproc_per_node=args.workers // args.nodes, out=run_dir, timeout=600, port=29500)
    print(wire_table(record))
    return max(abs(code or 0) for code in record["exit_codes"])


def _missing_modules() -> list[str]:
    """The demo's optional dependencies that are not installed (the data set and the plots)."""
    import importlib.util

    return [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]


def run(args) -> int:
    missing = _missing_modules()
    if missing:
        print(f"threelc demo needs {' and '.join(missing)}: pip install scikit-learn matplotlib "
              "(or the project's [demo] extra)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or f"runs/demo-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    where = f"{args.nodes} emulated nodes at {args.rate}" if args.nodes else "this machine (gloo over loopback)"
    print(f"threelc demo: digits CNN (width {args.width}), {args.workers} workers on {where}, {args.steps} steps per run")
    run_dirs = []
    for index, hook in enumerate(HOOKS, 1):
        run_dir = out / hook
        print(f"\n[{index}/{len(HOOKS)}] training with {hook} ...", flush=True)
        code = _run_emulated(args, hook, run_dir) if args.nodes else _run_local(args, hook, run_dir)
        if code != 0:
            print(f"threelc demo: the {hook} run failed (exit code {code}); its output is above", file=sys.stderr)
            return 1
        run_dirs.append(run_dir)
    rows, plots = write_report(run_dirs, out)
    fp32, compressed = rows
    measured_ratio = (fp32["hook_bytes_per_step"] / compressed["hook_bytes_per_step"]
                      if compressed["hook_bytes_per_step"] else None)
    summary = {
        "runs": rows,
        "bytes_ratio_allreduce_over_threelc": measured_ratio,
        "wire_ratio_allreduce_over_threelc": (fp32["wire_bytes_per_step"] / compressed["wire_bytes_per_step"]
                                              if compressed["wire_bytes_per_step"] else None),
        "demo_wall_s": time.perf_counter() - started,
        "settings": {key: value for key, value in vars(args).items() if not callable(value)},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "plots": [path.name for path in plots],
    }
    with open(out / "summary.json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    print("\n" + format_table(rows))
    if measured_ratio:
        print(f"\n3LC sent {measured_ratio:.0f}x fewer bytes per worker per step than allreduce "
              f"({fp32['hook_bytes_per_step']:,.0f} -> {compressed['hook_bytes_per_step']:,.0f} B, steady state after "
              f"{compressed['warmup_steps']} warm-up steps and the hook's steps choosing its exchange plan); test accuracy {fp32['final_eval']:.1%} -> "
              f"{compressed['final_eval']:.1%}.")
    print(f"\nrun folder: {out}\n  summary.json, report.json, {', '.join(path.name for path in plots)}\n"
          f"  allreduce/ and threelc/: config.json, metrics.jsonl, hook-rank*.jsonl\n"
          f"demo took {summary['demo_wall_s']:.0f} s")
    return 0
