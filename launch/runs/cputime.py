"""CPU time per thread of a training process, by thread name, and per step over a window.

On the emulated cluster several nodes share the host's cores, so a step costs what all its
threads' CPU costs: the training thread's forward and backward, the hook's worker thread (the 3LC
codec and its framing), the backend's own threads (gloo moves the bytes on threads of its own).
The trainer samples :func:`sample` every :data:`EVERY` steps into ``cpu-rank{R}.jsonl``;
:func:`per_step` turns two samples into CPU seconds per step per thread name.

Linux only (``/proc/self/task``); elsewhere :func:`sample` is empty and nothing is written.
Threads are named by the kernel's ``comm`` (15 characters; the hook names its worker
``threelc-hook``, gloo names its ``gloo_tcp_loop`` and ``pt_gloo_runloop``); the training
process's own thread is :data:`MAIN`.  Times come from ``schedstat`` (nanoseconds on the CPU),
else from ``stat`` (clock ticks).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MAIN", "EVERY", "sample", "per_step"]

#: The name of the process's main (training) thread in :func:`sample`.
MAIN = "main"
#: Steps between two samples of the trainer (a sample reads two small files per thread: ~0.1-0.5 ms).
EVERY = 10

_TASKS = Path("/proc/self/task")


def _cpu_seconds(task: Path) -> float:
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def sample() -> dict[str, float]:
    """CPU seconds so far of this process's threads, summed per thread name ({} off Linux)."""
    if not _TASKS.is_dir():
        return {}
    main = str(os.getpid())
    totals: dict[str, float] = {}
    for task in _TASKS.iterdir():
        try:
            name = MAIN if task.name == main else (task / "comm").read_text().strip()
            seconds = _cpu_seconds(task)
        except OSError:  # the thread ended between listing and reading
            continue
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


def per_step(records: list[dict], first: int, last: int) -> tuple[dict[str, float], int] | None:
    """CPU seconds per step per thread name over the steps ``first..last`` (metrics numbering),
    from the samples (``{"step": k, "cpu": sample()}``, taken after step k) that lie closest
    inside that range: the one at or after ``first - 1`` and the last at or before ``last``.
    Returns ``(seconds per step by name, steps between the two samples)``, or None when fewer
    than two samples fall inside.  A thread that ended between the samples is left out; one that
    started counts from zero."""
    inside = sorted((record for record in records if first - 1 <= record["step"] <= last), key=lambda r: r["step"])
    if len(inside) < 2 or inside[-1]["step"] == inside[0]["step"]:
        return None
    begin, end = inside[0], inside[-1]
    steps = end["step"] - begin["step"]
    return {name: (seconds - begin["cpu"].get(name, 0.0)) / steps for name, seconds in end["cpu"].items()}, steps
