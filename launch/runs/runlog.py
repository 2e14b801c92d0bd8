"""Run folders: what a training run writes, and how tools read it back.

A run folder holds::

    config.json            the run's settings (hook, model, world size, ...)
    metrics.jsonl          rank 0, one line per step: step, loss, time, step_s [, eval keys]
    hook-rank{R}.jsonl     one line per step per rank: the hook's byte accounting
    link-node{I}.jsonl     per step, a node's interface counters (only under ``threelc emulate``)
    cpu-rank{R}.jsonl      every few steps, each rank's CPU seconds per thread name (Linux; :mod:`.cputime`)
    emulate.json           measured wire bytes per node (only under ``threelc emulate``)

The writer and the reader live together so the format has one definition.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RunWriter",
    "Run",
    "append_jsonl",
    "read_jsonl",
    "load_run",
    "hook_stats_path",
    "link_stats_path",
    "cpu_stats_path",
    "RUN_DIR_ENV",
    "default_run_dir",
]

logger = logging.getLogger(__name__)

#: ``threelc emulate`` sets this so a training script writes into the emulator's folder.
RUN_DIR_ENV = "THREELC_RUN_DIR"


def hook_stats_path(run_dir, rank: int) -> Path:
    """Where rank ``rank`` appends its per-step hook accounting (the hook's contract)."""
    return Path(run_dir) / f"hook-rank{rank}.jsonl"


def link_stats_path(run_dir, node_rank: int) -> Path:
    """Where node ``node_rank`` appends its per-step interface counters."""
    return Path(run_dir) / f"link-node{node_rank}.jsonl"


def cpu_stats_path(run_dir, rank: int) -> Path:
    """Where rank ``rank`` appends its threads' CPU seconds (:mod:`threelc.launch.runs.cputime`)."""
    return Path(run_dir) / f"cpu-rank{rank}.jsonl"


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line; opened per call so a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path) -> list[dict]:
    """All records of a JSON-lines file; a truncated last line (crashed writer) is skipped."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d: skipping a malformed line", path, number)
    return records


class RunWriter:
    """Writes ``config.json`` and ``metrics.jsonl`` of one run (call it on rank 0 only)."""

    def __init__(self, run_dir, config: dict):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        # A rerun into the same folder starts a fresh log instead of interleaving two runs.
        if self.metrics_path.exists():
            self.metrics_path.unlink()
        with open(self.run_dir / "config.json", "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)

    def log(self, record: dict) -> None:
        """Append one step's metrics."""
        append_jsonl(self.metrics_path, record)

    def write_json(self, name: str, payload: dict) -> Path:
        """Write another JSON file (e.g. ``final.json``) into the run folder."""
        path = self.run_dir / name
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
        return path


@dataclass
class Run:
    """Everything a run folder holds, parsed."""

    path: Path
    config: dict
    metrics: list[dict]
    hook: dict[int, list[dict]] = field(default_factory=dict)  # rank -> per-step records
    links: dict[int, list[dict]] = field(default_factory=dict)  # node rank -> per-step counters
    cpu: dict[int, list[dict]] = field(default_factory=dict)  # rank -> CPU seconds per thread name, every few steps
    emulate: dict | None = None
    final: dict | None = None

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path):
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _numbered(run_dir: Path, prefix: str) -> dict[int, list[dict]]:
    found = {}
    for path in sorted(run_dir.glob(f"{prefix}*.jsonl")):
        suffix = path.stem[len(prefix):]
        if suffix.isdigit():
            found[int(suffix)] = read_jsonl(path)
    return found


def load_run(run_dir) -> Run:
    """Parse a run folder; raise ``FileNotFoundError`` if it has no ``config.json``."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json")
    if config is None:
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    return Run(
        path=run_dir,
        config=config,
        metrics=read_jsonl(run_dir / "metrics.jsonl"),
        hook=_numbered(run_dir, "hook-rank"),
        links=_numbered(run_dir, "link-node"),
        cpu=_numbered(run_dir, "cpu-rank"),
        emulate=_read_json(run_dir / "emulate.json"),
        final=_read_json(run_dir / "final.json"),
    )


def default_run_dir(fallback: str | None) -> str | None:
    """The run folder the emulator chose (``$THREELC_RUN_DIR``), else ``fallback``."""
    return os.environ.get(RUN_DIR_ENV) or fallback
