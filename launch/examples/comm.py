"""Attach a gradient-communication hook to a DDP model by name, with byte accounting.

``threelc`` is this project's hook (it writes its own per-step JSON lines).  The baselines are
PyTorch's built-in hooks; for them this module writes JSON lines in the same format, counting
what their allreduces move under the ring model: an allreduce of ``B`` bytes sends and receives
``2 (N - 1) / N * B`` bytes per rank.  Those are *collective bytes* (a model of the algorithm),
not bytes measured on a wire; ``threelc emulate`` measures the wire.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from ..runs.runlog import append_jsonl, hook_stats_path
from ..runs.summary import ring_allreduce_bytes

__all__ = ["HOOKS", "attach_hook", "attach_local_steps", "HookHandle"]

logger = logging.getLogger(__name__)

HOOKS = ("allreduce", "fp16", "powersgd", "threelc")


class HookHandle:
    """What the training loop holds: ``step_done(step)`` after each optimizer step.

    For the baselines it writes the step's accounting line; the threelc hook writes its own, so
    there it only keeps ``state`` for ``stats()``.  With ``local`` (a
    :class:`threelc.local.LocalSteps`), ``step_done`` closes its inner step, which syncs every H steps.
    """

    def __init__(self, name: str, state=None, accounting: "_CollectiveAccounting | None" = None, local=None):
        self.name = name
        self.state = state
        self.accounting = accounting
        self.local = local

    def step_done(self, iteration: int) -> bool:
        """Close iteration ``iteration`` (0 for the first step, as the threelc hook counts); returns
        whether it ran a local-steps outer sync."""
        if self.accounting is not None:
            self.accounting.write_step(iteration)
        return self.local is not None and self.local.step()

    def finish(self) -> bool:
        """After the last step: apply a local-steps outer update still in flight (``--outer-overlap``);
        returns whether there was one."""
        return self.local is not None and self.local.finish()

    def close(self) -> None:
        """Release the hook's resources (the threelc hook's worker thread)."""
        if self.state is not None and hasattr(self.state, "close"):
            self.state.close()

    def totals(self) -> dict:
        """Totals over the run: raw_bytes, sent_bytes, received_bytes (this rank)."""
        if self.accounting is not None:
            return dict(self.accounting.total)
        if self.state is not None and hasattr(self.state, "stats"):
            totals = dict(self.state.stats().get("total", {}))
            if hasattr(self.state, "plan"):  # the threelc hook: how it exchanged compressed buckets
                totals["plan"] = self.state.plan()
            return totals
        return {}


class _CollectiveAccounting:
    """Per-step byte accounting, in the threelc hook's JSON-lines format, for allreduce hooks."""

    def __init__(self, rank: int, world_size: int, stats_dir):
        self.rank = rank
        self.world_size = world_size
        self.path = hook_stats_path(stats_dir, rank) if stats_dir else None
        if self.path is not None and self.path.exists():
            self.path.unlink()
        self.total = {"raw_bytes": 0, "sent_bytes": 0.0, "received_bytes": 0.0}
        self._reset()

    def _reset(self):
        self.raw_bytes = 0
        self.collective_bytes = 0
        self.comm_s = 0.0
        self.compressed = False

    def add(self, raw_bytes: int, allreduced_bytes: int, compressed: bool) -> None:
        self.raw_bytes += raw_bytes
        self.collective_bytes += allreduced_bytes
        self.compressed = self.compressed or compressed

    def timed(self, future: torch.futures.Future, start: float) -> torch.futures.Future:
        """Chain a callback that adds the time from issue to completion to ``comm_s``."""

        def _done(fut):
            self.comm_s += time.perf_counter() - start
            return fut.value()

        return future.then(_done)

    def write_step(self, step: int) -> None:
        moved = ring_allreduce_bytes(self.collective_bytes, self.world_size)
        self.total["raw_bytes"] += self.raw_bytes
        self.total["sent_bytes"] += moved
        self.total["received_bytes"] += moved
        if self.path is not None:
            append_jsonl(self.path, {
                "step": step,
                "rank": self.rank,
                "world_size": self.world_size,
                "raw_bytes": self.raw_bytes,
                "sent_bytes": moved,
                "received_bytes": moved,
                "ratio": self.raw_bytes / moved if moved else None,
                "compressed": self.compressed,
                "compress_s": 0.0,
                "decompress_s": 0.0,
                "comm_s": self.comm_s,
                "time": time.time(),
                "accounting": "ring-allreduce-model",
            })
        self._reset()


def _allreduce_hook(accounting: _CollectiveAccounting):
    def hook(process_group, bucket):
        buffer = bucket.buffer()
        nbytes = buffer.numel() * buffer.element_size()
        accounting.add(nbytes, nbytes, compressed=False)
        return accounting.timed(default_hooks.allreduce_hook(process_group, bucket), time.perf_counter())

    return hook


def _fp16_hook(accounting: _CollectiveAccounting):
    def hook(process_group, bucket):
        buffer = bucket.buffer()
        accounting.add(buffer.numel() * buffer.element_size(), buffer.numel() * 2, compressed=True)
        return accounting.timed(default_hooks.fp16_compress_hook(process_group, bucket), time.perf_counter())

    return hook


def _powersgd_hook(accounting: _CollectiveAccounting):
    """PyTorch's PowerSGD hook, serialized, with the elements its allreduces move counted.

    PowerSGD issues its second and third allreduce from future callbacks; on gloo with several
    buckets those can run in a different order on different ranks ("collective mismatch").
    Waiting for each bucket's future before returning keeps every rank's order identical.
    The state's ``total_numel_after_compression`` grows by exactly what the allreduces move
    (uncompressed tensors + P + Q) in a compressing iteration; warm-up iterations allreduce
    the whole bucket.
    """

    def hook(state, bucket):
        buffer = bucket.buffer()
        nbytes = buffer.numel() * buffer.element_size()
        compressing = state.iter >= state.start_powerSGD_iter
        numel_before = state.total_numel_after_compression
        start = time.perf_counter()
        future = powerSGD_hook.powerSGD_hook(state, bucket)
        future.wait()
        accounting.comm_s += time.perf_counter() - start
        moved = (state.total_numel_after_compression - numel_before) if compressing else buffer.numel()
        accounting.add(nbytes, moved * buffer.element_size(), compressed=compressing)
        return future

    return hook


def _register_threelc(ddp_model, *, sparsity, collective, stats_dir, warmup_steps, scale, block_size, min_numel,
                      optimizer, header=None):
    try:
        from threelc.hooks import register
        from threelc.hooks.optim import AdamW as ThreeLCAdamW
    except ImportError as error:  # the hook is developed in parallel; say so plainly
        raise RuntimeError(f"the threelc hook is not available ({error}); use --hook allreduce|fp16|powersgd") from error
    options = {"sparsity": sparsity, "collective": collective, "stats_dir": stats_dir}
    if isinstance(optimizer, ThreeLCAdamW):  # a threelc optimizer pairs; a torch one runs as before
        options["optimizer"] = optimizer
    if warmup_steps is not None:
        options["start_iter"] = warmup_steps  # ThreeLCState's name for its allreduce warm-up
    # Unset options keep the hook's own defaults.
    options.update({key: value for key, value in (("scale", scale), ("block_size", block_size), ("min_numel", min_numel),
                                                  ("header", header))
                    if value is not None})
    return register(ddp_model, **options)


def attach_hook(
    ddp_model,
    name: str,
    *,
    sparsity: float = 1.0,
    collective: str = "auto",
    stats_dir=None,
    powersgd_rank: int = 1,
    warmup_steps: int | None = None,
    scale: str | None = None,
    block_size: int | None = None,
    min_numel: int | None = None,
    optimizer=None,
    header: str | None = None,
) -> HookHandle:
    """Register hook ``name`` (one of :data:`HOOKS`) on ``ddp_model`` and return its handle.

    ``warmup_steps``: uncompressed allreduce iterations before compression starts (PowerSGD's
    ``start_powerSGD_iter``, default 2; the threelc hook's ``start_iter``, default 10).
    ``min_numel``: the threelc hook's smallest compressed bucket (default 1024); a value above
    every bucket's size allreduces everything, so a paired ``threelc.optim.AdamW`` runs its
    schedule on exact gradients (the ablation in docs/benchmarks.md).
    ``optimizer``: the training optimizer; a ``threelc.optim.AdamW`` is paired with the threelc
    hook (other hooks leave it unpaired, and it refuses to step).
    ``header``: the threelc hook's ``header`` option (default: the hook's own, ``"auto"``).
    """
    if name not in HOOKS:
        raise ValueError(f"unknown hook {name!r}; choose one of {', '.join(HOOKS)}")
    if name == "threelc":
        state = _register_threelc(ddp_model, sparsity=sparsity, collective=collective, stats_dir=stats_dir,
                                  warmup_steps=warmup_steps, scale=scale, block_size=block_size,
                                  min_numel=min_numel, optimizer=optimizer, header=header)
        return HookHandle(name, state=state)
    accounting = _CollectiveAccounting(dist.get_rank(), dist.get_world_size(), stats_dir)
    if name == "allreduce":
        ddp_model.register_comm_hook(None, _allreduce_hook(accounting))
        return HookHandle(name, accounting=accounting)
    if name == "fp16":
        ddp_model.register_comm_hook(None, _fp16_hook(accounting))
        return HookHandle(name, accounting=accounting)
    # PowerSGD needs start_powerSGD_iter >= 2 with error feedback (DDP rebuilds buckets after step 1).
    state = powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=powersgd_rank,
        start_powerSGD_iter=max(2, 2 if warmup_steps is None else warmup_steps),
        use_error_feedback=True,
        warm_start=True,
    )
    ddp_model.register_comm_hook(state, _powersgd_hook(accounting))
    return HookHandle(name, state=state, accounting=accounting)


def attach_local_steps(ddp_model, optimizer, *, sync_every: int, outer: str, outer_lr: float, outer_momentum: float,
                       passes: int = 1, warmup_steps: int | None = None, overlap: bool = False, stats_dir=None,
                       sparsity: float | None = None,
                       collective: str | None = None, scale: str | None = None,
                       block_size: int | None = None) -> HookHandle:
    """Train with :class:`threelc.local.LocalSteps` (``optimizer`` is its inner optimizer) instead of a
    per-step hook; the 3LC options apply to ``outer="3lc"``.  Its statistics log counts the warm-up
    allreduces and the outer syncs in the hook's format."""
    from threelc.local import LocalSteps

    options = {}
    if outer == "3lc":
        options = {key: value for key, value in (("sparsity", sparsity), ("collective", collective), ("scale", scale),
                                                 ("block_size", block_size)) if value is not None}
    local = LocalSteps(ddp_model, optimizer, sync_every=sync_every, outer=outer, outer_lr=outer_lr,
                       outer_momentum=outer_momentum, passes=passes, warmup_steps=warmup_steps or 0,
                       overlap=overlap, stats_dir=stats_dir, **options)
    return HookHandle(f"local-{outer}", state=local.state, local=local)
