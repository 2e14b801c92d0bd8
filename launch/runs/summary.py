"""One row of numbers per run folder: the figures ``threelc report`` and ``threelc demo`` print.

Bytes are per worker per step over the steady-state steps (after warm-up: the steps the hook
compressed, or all but the first for hooks that never compress):

* ``hook_bytes_per_step``: what the hook (or, for PyTorch's hooks, the ring-allreduce model)
  says each rank sent (*collective bytes*);
* ``wire_bytes_per_step``: measured on the emulated links (``emulate.json``), per worker, or
  ``None`` for runs on one machine;
* ``ratio_vs_fp32``: what a float32 ring allreduce of the same gradients would send, divided by
  the hook's bytes (1.0 for allreduce, ~2 for fp16).

The two definitions those figures rest on live here too, for the training loop's accounting
and the emulator's wire bytes to share: :func:`steady_window` (which steps count) and
:func:`ring_allreduce_bytes` (the ring model).
"""

from __future__ import annotations

import statistics

from .runlog import Run

__all__ = ["summarize", "settings_label", "cumulative_sent_by_step", "steady_window", "ring_allreduce_bytes"]


def ring_allreduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring allreduce of ``nbytes``."""
    return 2.0 * (world_size - 1) / world_size * nbytes if world_size > 1 else 0.0


def steady_window(hook_lines: list[dict]) -> tuple[int, int] | None:
    """(first, last) iteration index of steady-state training in one rank's hook log.

    Starts at the second compressed iteration if the hook compressed after a warm-up (warm-up
    iterations use allreduce; the first compressed one also carries one-time work: threelc's
    exchange-plan probe, residual allocation, PowerSGD's first factors), else at the second
    iteration (the first includes DDP's bucket rebuild); and after the last step threelc flagged
    ``planning`` (its probe and its measured trial of both collectives).  ``None`` if too short.
    """
    steps = [line["step"] for line in hook_lines]
    if not steps:
        return None
    compressed = [line["step"] for line in hook_lines if line.get("compressed")]
    if compressed and not all(line.get("compressed") for line in hook_lines):
        first = compressed[1] if len(compressed) > 1 else compressed[0]
    else:
        first = min(steps) + 1
    planning = [line["step"] for line in hook_lines if line.get("planning")]
    if planning:
        first = max(first, max(planning) + 1)
    last = max(steps)
    return (first, last) if last >= first else None


def settings_label(config: dict) -> str:
    """The hook's own settings, e.g. ``s=1.0 allgather`` or ``rank 1``."""
    hook = config.get("hook")
    if hook == "threelc":
        return f"s={config.get('sparsity')} {config.get('collective')}"
    if hook == "powersgd":
        return f"rank {config.get('powersgd_rank')}"
    return ""


def cumulative_sent_by_step(run: Run, rank: int = 0) -> dict[int, float]:
    """metrics step -> bytes ``rank`` sent up to and including that step (hook iteration step-1)."""
    total, out = 0.0, {}
    for line in sorted(run.hook.get(rank, []), key=lambda line: line["step"]):
        total += line["sent_bytes"]
        out[line["step"] + 1] = total
    return out


def _steady_lines(run: Run) -> list[dict]:
    lines = []
    for rank_lines in run.hook.values():
        window = steady_window(rank_lines)
        if window:
            lines += [line for line in rank_lines if window[0] <= line["step"] <= window[1]]
    return lines


def _warmup_steps(run: Run, steady: list[dict]) -> int | None:
    """Iterations before the hook first compressed (the steady window starts one later: that first
    compressed iteration carries one-time work); for a hook that never compresses, before the window."""
    compressed = [line["step"] for lines in run.hook.values() for line in lines if line.get("compressed")]
    if compressed:
        return min(compressed)
    return min(line["step"] for line in steady) if steady else None


def _wire_per_worker_step(run: Run) -> float | None:
    if not run.emulate:
        return None
    nodes = [node.get("steady") for node in run.emulate.get("nodes", [])]
    if not nodes or any(node is None for node in nodes):
        return None
    per_node = statistics.mean(node["tx_bytes_per_step"] for node in nodes)
    return per_node / max(1, run.emulate.get("nproc_per_node", 1))


def summarize(run: Run) -> dict:
    """The comparison row of one run (see the module docstring)."""
    config = run.config
    metric = config.get("eval_metric", "test_accuracy")
    evaluated = [record for record in run.metrics if metric in record]
    steady = _steady_lines(run)
    sent = statistics.mean(line["sent_bytes"] for line in steady) if steady else None
    raw = statistics.mean(line["raw_bytes"] for line in steady) if steady else None
    world_size = config.get("world_size", 1)
    fp32 = ring_allreduce_bytes(raw, world_size) if raw else None
    step_times = [record["step_s"] for record in run.metrics[1:]] or [record["step_s"] for record in run.metrics]
    return {
        "run": run.name,
        "path": str(run.path),
        "task": config.get("task"),
        "hook": config.get("hook"),
        "settings": settings_label(config),
        "world_size": world_size,
        "nodes": (run.emulate or {}).get("cluster", {}).get("nodes", config.get("nnodes", 1)),
        "rate": (run.emulate or {}).get("cluster", {}).get("rate"),
        "parameters": config.get("task_config", {}).get("parameters"),
        "steps": len(run.metrics),
        "warmup_steps": _warmup_steps(run, steady),
        "raw_bytes_per_step": raw,
        "hook_bytes_per_step": sent,
        "wire_bytes_per_step": _wire_per_worker_step(run),
        "ratio_vs_fp32": (fp32 / sent) if (fp32 and sent) else None,
        "median_step_s": statistics.median(step_times) if step_times else None,
        "wall_s": run.metrics[-1]["time"] if run.metrics else None,
        "eval_metric": metric,
        "final_eval": evaluated[-1][metric] if evaluated else None,
        "final_loss": run.metrics[-1]["loss"] if run.metrics else None,
    }
