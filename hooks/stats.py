"""Per-rank traffic and timing statistics of the 3LC hook, and their JSON-lines log.

One :class:`HookStats` per :class:`~threelc.hooks.ThreeLCState`.  Only the hook's worker thread
writes to it (one bucket at a time), and a step is closed before the future of its last bucket is
completed, so when ``loss.backward()`` returns, :meth:`HookStats.snapshot` already includes that
step.

The schema is a contract: ``threelc report`` and the demo read it.  Both the ``"step"`` and the
``"total"`` dictionaries (and every line of the log, which is a ``"step"`` dictionary plus
``"time"``) have exactly these keys:

===============  ==========================================================================
step             iteration index of the step (``"total"``: number of steps completed)
rank             global rank of this process
world_size       size of the hook's process group
raw_bytes        the gradient bytes of the buckets, in the bucket dtype
sent_bytes       bytes this rank sent to other ranks, as the collectives move them
received_bytes   bytes this rank received from other ranks
ratio            raw_bytes / sent_bytes (``null`` when nothing was sent, e.g. world size 1)
compressed       whether any bucket of the step was 3LC-compressed (false during warm-up)
planning         whether the step measured the link or tried a collective to choose the exchange
                 plan (:mod:`threelc.hooks.plan`): its time is not the steady state's
compress_s       seconds in the 3LC encoder
decompress_s     seconds in the 3LC decoder
comm_s           seconds in collectives (including waiting for slower ranks)
collectives      collectives issued (each costs at least one network round trip)
===============  ==========================================================================

Bytes are counted as the collectives move them: payloads, the small size headers (frames) sent
before or with them and the padding of inline headers' slots, never a rank's bytes to itself.  A plain allreduce (warm-up, small buckets) is
counted as a ring allreduce moves it: ``2 (N - 1) / N * raw`` bytes sent and as many received.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

__all__ = ["HookStats", "STAT_KEYS", "check_writable"]

logger = logging.getLogger(__name__)

#: The keys of every statistics dictionary, in order.
STAT_KEYS = ("step", "rank", "world_size", "raw_bytes", "sent_bytes", "received_bytes", "ratio",
             "compressed", "planning", "compress_s", "decompress_s", "comm_s", "collectives")


class _Counters:
    """Byte counts and timings summed over buckets (one step, or the whole run)."""

    __slots__ = ("raw_bytes", "sent_bytes", "received_bytes", "compressed", "planning", "compress_s",
                 "decompress_s", "comm_s", "collectives")

    def __init__(self):
        self.raw_bytes = 0
        self.sent_bytes = 0
        self.received_bytes = 0
        self.compressed = False
        self.planning = False
        self.compress_s = 0.0
        self.decompress_s = 0.0
        self.comm_s = 0.0
        self.collectives = 0

    def add(self, other: "_Counters") -> None:
        self.raw_bytes += other.raw_bytes
        self.sent_bytes += other.sent_bytes
        self.received_bytes += other.received_bytes
        self.compressed = self.compressed or other.compressed
        self.planning = self.planning or other.planning
        self.compress_s += other.compress_s
        self.decompress_s += other.decompress_s
        self.comm_s += other.comm_s
        self.collectives += other.collectives

    def as_dict(self, step: int, rank: int, world_size: int) -> dict:
        return {
            "step": step,
            "rank": rank,
            "world_size": world_size,
            "raw_bytes": self.raw_bytes,
            "sent_bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "ratio": self.raw_bytes / self.sent_bytes if self.sent_bytes else None,
            "compressed": self.compressed,
            "planning": self.planning,
            "compress_s": self.compress_s,
            "decompress_s": self.decompress_s,
            "comm_s": self.comm_s,
            "collectives": self.collectives,
        }


def check_writable(stats_dir: str) -> None:
    """Create ``stats_dir`` if needed and check that a file can be written in it.

    Raises
    ------
    ValueError
        Saying which folder and why, at construction rather than once per step mid-training.
    """
    try:
        os.makedirs(stats_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=stats_dir):
            pass
    except OSError as error:
        raise ValueError(f"stats_dir {stats_dir!r} cannot be written ({error}); give a writable folder, or "
                         f"stats_dir=None for statistics in memory only") from error


class HookStats:
    """Accumulates the current step's counters, closes steps, and appends them to the log.

    Parameters
    ----------
    stats_dir : str or None
        Folder of the JSON-lines log; ``None`` keeps statistics in memory only.  Checked to be
        writable here.
    every : int
        Log only the steps whose index is a multiple of ``every``.
    max_bytes : int or None
        Stop appending once the log file would grow beyond this size (a warning says so, once).
    """

    def __init__(self, stats_dir: str | None, every: int = 1, max_bytes: int | None = None):
        if stats_dir:
            check_writable(stats_dir)
        self.stats_dir = stats_dir
        self.every = every
        self.max_bytes = max_bytes
        self._warned = False  # the log warns at most once per state
        self.current = _Counters()
        self.total = _Counters()
        self.steps_completed = 0
        self.last_step: dict | None = None
        self.rank = 0
        self.world_size = 1

    # The worker thread calls these while it processes buckets.
    def add_raw(self, nbytes: int) -> None:
        self.current.raw_bytes += int(nbytes)

    def add_traffic(self, sent: int, received: int) -> None:
        """Count one collective and the bytes it moved."""
        self.current.collectives += 1
        self.current.sent_bytes += int(sent)
        self.current.received_bytes += int(received)

    def add_allreduce(self, raw_bytes: int, world_size: int) -> None:
        """Count a plain allreduce as a ring moves it: 2 (N - 1) / N of the raw bytes each way."""
        moved = (2 * (world_size - 1) * int(raw_bytes)) // world_size
        self.add_traffic(moved, moved)

    def mark_compressed(self) -> None:
        self.current.compressed = True

    def mark_planning(self) -> None:
        self.current.planning = True

    def timer(self, field: str) -> "_Timer":
        """Context manager adding its elapsed seconds to ``field`` of the current step."""
        return _Timer(self.current, field)

    def finish_step(self, step: int, rank: int, world_size: int) -> dict:
        """Close the current step: fold it into the totals and append it to the log."""
        self.rank, self.world_size = rank, world_size
        record = self.current.as_dict(step, rank, world_size)
        self.total.add(self.current)
        self.current = _Counters()
        self.steps_completed += 1
        self.last_step = record
        if self.stats_dir and step % self.every == 0:
            self._append(record)
        return record

    def snapshot(self) -> dict:
        """``{"step": <last completed step>, "total": <cumulative>}`` (see the module docstring)."""
        step = self.last_step
        if step is None:
            step = _Counters().as_dict(-1, self.rank, self.world_size)
        return {
            "step": dict(step),
            "total": self.total.as_dict(self.steps_completed, self.rank, self.world_size),
        }

    def _append(self, record: dict) -> None:
        path = os.path.join(self.stats_dir, f"hook-rank{record['rank']}.jsonl")
        line = json.dumps({**record, "time": time.time()}) + "\n"
        try:
            if self.max_bytes is not None and _size(path) + len(line) > self.max_bytes:
                self._warn_once("threelc: the statistics log %s reached its cap of %d bytes (stats_max_bytes); "
                                "later steps are not logged", path, self.max_bytes)
                return
            os.makedirs(self.stats_dir, exist_ok=True)
            with open(path, "a", encoding="utf-8") as log:
                log.write(line)
        except OSError as error:
            # Statistics must never stop training: warn (once) and carry on.
            self._warn_once("threelc: cannot append statistics to %s: %s (later failures are not reported)",
                            path, error)

    def _warn_once(self, message: str, *args) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(message, *args)

    # Checkpointing: the cumulative counters travel with the hook state.
    def state_dict(self) -> dict:
        return {"steps_completed": self.steps_completed,
                **{name: getattr(self.total, name) for name in _Counters.__slots__}}

    def load_state_dict(self, state: dict) -> None:
        self.steps_completed = int(state["steps_completed"])
        for name in _Counters.__slots__:
            # Checkpoints from before a counter existed load it as zero.
            setattr(self.total, name, type(getattr(self.total, name))(state.get(name, 0)))


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


class _Timer:
    __slots__ = ("counters", "field", "start")

    def __init__(self, counters: _Counters, field: str):
        self.counters, self.field = counters, field

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        setattr(self.counters, self.field, getattr(self.counters, self.field) + time.perf_counter() - self.start)
        return False
