"""Local steps with compressed outer updates (DiLoCo): ``threelc.local.LocalSteps``.

Per-step compression stops at the codec's ratio.  Communicating less often multiplies it: every
rank takes ``sync_every`` (H) steps of its own optimizer (the *inner* optimizer, e.g. AdamW) on its
own data without averaging gradients, then the ranks average the *pseudo-gradient*

    delta_r = start-of-round parameters - rank r's parameters after H inner steps

and an *outer* Nesterov SGD step applies the mean to the start-of-round parameters (Douillard et
al., "DiLoCo", arXiv:2311.08105: lr 0.7, momentum 0.9).  With ``outer="3lc"`` the mean travels
through the 3LC hook's own bucket path (:func:`threelc.hooks.hook.average`: its codec, its
collectives, worker and server error feedback), so the two savings multiply: measured on a small
transformer at 4 ranks (docs/LOCAL.md), H = 50 with the defaults below (s = 0.5, allgather) sends
567x fewer bytes than per-step allreduce, 11x fewer than the same rounds averaged in float32.

One round, on every rank::

    inner steps 1..H          DDP's backward runs the local hook: the bucket comes back
                              unchanged (no averaging, no bytes); the inner optimizer steps
    after inner step H        delta = start - params           (flat, float32)
    (LocalSteps.step())       mean  = average(delta)           allreduce ("fp32") or 3LC ("3lc")
                              [3LC, passes = k: k - 1 more times  mean += average(0)]
                              momentum = mu * momentum + mean
                              start = start - lr * (mean + mu * momentum)     (Nesterov)
                              params = start                   (bitwise the same on every rank)

With ``passes=k`` (3LC only) one sync runs the 3LC average k times: first on the pseudo-gradients,
then on zeros, so that each further pass sends what the residuals still hold (what the previous
pass left unsent, below s/2 of its block's largest) at its own, finer scale, in the same sync instead
of in later rounds.  Error feedback delivers everything eventually either way; with a handful of
rounds per run the delay is what costs, and k passes cost ~k times the bytes of one.

The first ``warmup_steps`` inner steps average gradients with a plain allreduce, as PyTorch's
``post_localSGD_hook`` does before its ``start_localSGD_iter``; the first round starts after them.
The inner optimizer's state (AdamW's moments) stays local to each rank, as in DiLoCo.

With ``overlap=True`` the sync of round k runs while round k + 1 trains, and its mean drives the
outer step one round late (the "one-outer-step-delayed" update of Kale, Douillard et al., "Eager
updates for overlapped communication and computation in DiLoCo", arXiv:2502.12996, which
Streaming DiLoCo, arXiv:2501.18512, runs with an overlap of tau < H inner steps; here tau = H)::

    after inner step H of round k   delta_k = start_k - params     (against this round's start)
    (LocalSteps.step())             mean_{k-1} = wait(sync of round k - 1)    [none when k = 0]
                                    start_{k+1} = outer step of start_k with mean_{k-1}
                                                  [start_1 = start_0]
                                    launch the average of delta_k (in flight, not waited for)
                                    params = start_{k+1}           (bitwise the same on every rank)
    LocalSteps.finish()             wait(sync of the last round), outer step with its mean,
                                    params = the result (+ any local progress since, mid-round)

The momentum, the Nesterov step and the 3LC passes are those of the blocking sync; only the mean
each outer step uses is one round older, so round k's pseudo-gradient, measured from start_k,
moves start_{k+1}.  A run of K rounds makes K outer steps, the last in ``finish()``, with the
same bytes as without overlap.  The average runs on a process group of its own (created after the
ranks agreed on their options), so it never interleaves with DDP's collectives: fp32 as a gloo
``async_op`` allreduce, 3LC as :func:`threelc.hooks.hook.average` on a background thread (the
hook's worker thread does the work; numba's kernels and gloo release the GIL).

Every rank decodes the same bytes (3LC) or receives the same allreduce result (fp32), and the
start-of-round parameters and outer momentum are the same on every rank, so the replicas are
bitwise identical right after every outer sync.  Ranks with different options raise the same
:class:`~threelc.hooks.ConfigMismatchError` at construction and at every sync (which also
catches ranks resumed from different step counts).
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook inspects the local hook's
# annotations and rejects them as strings.

import logging
import math
import threading

import numpy as np
import torch
import torch.distributed as dist

from . import collectives, hook, optim
from .state import ConfigMismatchError, ThreeLCState, fingerprint
from .stats import HookStats

__all__ = ["LocalSteps", "OUTER", "OUTER_SPARSITY", "SYNC_ALLGATHER_RANKS", "local_hook", "sync_exchange"]

logger = logging.getLogger(__name__)

#: How the pseudo-gradients are averaged: a plain allreduce, or 3LC with error feedback.
OUTER = ("fp32", "3lc")
#: The 3LC sparsity multiplier of the outer sync unless ``sparsity`` is given.  Below the hook's 1.0
#: (the paper's range is [1, 2)): a scale of half each block's peak sends every value of at least a
#: quarter of the peak.  What a sync leaves in the residual waits a whole round (H inner steps), not
#: one step, so a denser payload pays; measured in docs/LOCAL.md (H = 50: s = 0.5 against 1.0).
OUTER_SPARSITY = 0.5
#: Up to this many ranks the 3LC sync uses allgather by default (see :func:`sync_exchange`).
SYNC_ALLGATHER_RANKS = 4
#: Version of the dictionary :meth:`LocalSteps.state_dict` returns (2 added ``"pending"``; 1 still loads).
STATE_DICT_VERSION = 2
#: ThreeLCState options that mean nothing here (the outer sync always compresses its one bucket).
_UNUSED_HOOK_OPTIONS = ("start_iter", "min_numel")


def sync_exchange(world_size: int) -> dict:
    """The 3LC sync's exchange unless ``collective`` or ``coalesce`` is given: fixed, not the hook's
    measured plan.  A close call makes that plan try each candidate for 6 exchanges, which at one
    sync per round would take most of a run's syncs (20 in 1,000 steps at H = 50) and let the
    timing of the moment pick which collective, so which arithmetic, a run gets.

    Allgather up to :data:`SYNC_ALLGATHER_RANKS` ranks, scatter-reduce above.  Allgather quantizes
    once; scatter-reduce quantizes the mean of each shard again, and that second residual, like the
    first, waits a whole round.  Measured at 4 ranks (docs/LOCAL.md, H = 50, s = 0.5, 3 seeds):
    allgather +6.3% against scatter-reduce's +11.1% (the exact sync: +5.5%), for twice the bytes.
    Allgather sends (N - 1) payloads per rank against scatter-reduce's 2 (N - 1) / N, so up to 4
    ranks at most twice as many; above, the bytes grow with N and scatter-reduce is the default.
    """
    collective = "allgather" if world_size <= SYNC_ALLGATHER_RANKS else "scatter_reduce"
    return {"collective": collective, "coalesce": False}


class LocalSteps:
    r"""H local steps of the user's optimizer, then an outer Nesterov step on the averaged,
    optionally 3LC-compressed, pseudo-gradient (DiLoCo).  See the module docstring for the algorithm.

    Construct it on every rank (it is a collective, like DDP's constructor) after the DDP model
    and the inner optimizer, and call :meth:`step` after every inner optimizer step::

        inner = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3)
        local = threelc.local.LocalSteps(ddp_model, inner, sync_every=50, outer="3lc")
        for inputs, targets in batches:
            loss_fn(ddp_model(inputs), targets).backward()
            inner.step()
            inner.zero_grad()
            local.step()          # every 50th call: the outer sync (a collective)

    Parameters
    ----------
    ddp_model : DistributedDataParallel
        The model (``torch.compile`` of one works too).  LocalSteps registers its own comm hook on
        it, so it must not have one already.
    inner_optimizer : torch.optim.Optimizer
        The optimizer the training loop steps, over the model's parameters (not a
        ``threelc.optim.AdamW``, which pairs with the per-step hook instead).
    sync_every : int, default 50
        H: inner steps per round; 1 averages after every step.
    outer_lr, outer_momentum : float, default 0.7, 0.9
        The outer SGD's learning rate and momentum (DiLoCo's values).
    nesterov : bool, default True
        Nesterov momentum (DiLoCo's choice); False for heavy-ball momentum.
    outer : {"3lc", "fp32"}, default "3lc"
        Average the pseudo-gradients through 3LC (the hook's codec and collectives, with worker
        and server error feedback) or with a plain float32 allreduce.
    passes : int, default 1
        3LC averages per sync (``outer="3lc"`` only): the first on the pseudo-gradients, each
        further one on zeros, sending what the residuals hold at a finer scale (~k times the bytes).
    warmup_steps : int, default 0
        Inner steps that average gradients with a plain allreduce before the first round.
    overlap : bool, default False
        Run each sync while the next round trains, and apply its mean one round late (see the
        module docstring); call :meth:`finish` after the last inner step to apply the last round's.
        :meth:`state_dict` waits for a pending sync and saves its mean (not yet applied), so a
        resume continues bitwise as the uninterrupted run.
    stats_dir : str, optional
        Append one JSON line per inner step to ``{stats_dir}/hook-rank{rank}.jsonl`` in the hook's
        format (:mod:`threelc.hooks.stats`): warm-up allreduce bytes, 0 on local steps, the outer
        sync's bytes on sync steps (``compressed`` true with ``outer="3lc"``).
    **hook_options
        :class:`~threelc.hooks.ThreeLCState` options of the 3LC outer sync (``sparsity``,
        ``collective``, ``scale``, ``block_size``, ``error_feedback``, ``codec``,
        ``codec_threads``, ``stats_every``, ``stats_max_bytes``).  Two defaults differ from the
        per-step hook's: ``sparsity`` is :data:`OUTER_SPARSITY` (0.5, not 1.0), and the exchange
        is fixed (:func:`sync_exchange`: allgather up to 4 ranks, scatter-reduce above; no coalescing)
        instead of measured, so a run's arithmetic does not depend on the link's timing.

    Raises
    ------
    ValueError
        A bad argument (the message says which and why).
    TypeError
        ``ddp_model`` is not a DistributedDataParallel model.
    ConfigMismatchError
        On every rank, when the ranks were given different options or models.
    """

    def __init__(self, ddp_model, inner_optimizer, *, sync_every: int = 50, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, outer: str = "3lc", passes: int = 1,
                 warmup_steps: int = 0, overlap: bool = False, stats_dir=None, **hook_options):
        ddp_model = hook._distributed_model(ddp_model)
        _check_arguments(sync_every, outer_lr, outer_momentum, nesterov, outer, passes, warmup_steps, overlap,
                         hook_options)
        process_group = getattr(ddp_model, "process_group", None)
        if outer == "3lc":
            hook_options = {"sparsity": OUTER_SPARSITY, **sync_exchange(dist.get_world_size(process_group)),
                            **hook_options}
        self.parameters = [parameter for parameter in ddp_model.module.parameters() if parameter.requires_grad]
        _check_inner(inner_optimizer, self.parameters)
        # Hyperparameters.
        self.sync_every = int(sync_every)
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.nesterov = nesterov
        self.outer = outer
        self.passes = int(passes)
        self.warmup_steps = int(warmup_steps)
        self.overlap = overlap
        #: The hook state of the outer sync: its options, residuals, statistics and collectives.
        #: ``state.iteration`` counts outer syncs.
        self.state = ThreeLCState(process_group=process_group, stats_dir=stats_dir, **hook_options)
        self.state._hook_called = True  # it serves LocalSteps, not a DDP hook: nothing to warn about
        self.layout = tuple(int(parameter.numel()) for parameter in self.parameters)
        # Internal state.
        #: Inner steps completed (warm-up included).
        self.steps = 0
        self._start: torch.Tensor | None = None  # start-of-round parameters, flat float32
        self._momentum: torch.Tensor | None = None  # the outer momentum buffer, flat float32
        self._pending: _Pending | None = None  # overlap: the sync in flight, or its arrived mean
        #: The per-step log; while a sync is in flight its bytes count in a HookStats of its own.
        self._log: HookStats = self.state._stats
        self._steps_unannounced = 0  # inner optimizer steps since the last step() call
        self._warned_unannounced = False
        inner_optimizer.register_step_post_hook(self._inner_stepped)
        ddp_model.register_comm_hook(self, local_hook)
        self._check_agreement(with_steps=False)
        if self.overlap and dist.get_world_size(self.state.group()) > 1:
            # Agreed by every rank just above, so every rank creates it (no rank waits alone).
            group = self.state.group()
            self.state.process_group = dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                                                      use_local_synchronization=True)
        if self.warmup_steps == 0:
            self._start_round()

    # ------------------------------------------------------------------ training loop
    def averaging(self) -> bool:
        """Whether the coming backward averages gradients (warm-up) instead of keeping them local."""
        return self.steps < self.warmup_steps

    def step(self) -> bool:
        """Close an inner step; after every ``sync_every``-th one, sync (a collective on every rank).

        Returns whether this call synced.
        """
        self._steps_unannounced = 0
        self.steps += 1
        synced = False
        if self.steps == self.warmup_steps:
            self._start_round()
        elif self.steps > self.warmup_steps and (self.steps - self.warmup_steps) % self.sync_every == 0:
            self.sync()
            synced = True
        self._log.finish_step(self.steps - 1, *self.state._owner())
        return synced

    def sync(self) -> None:
        """The outer step: average the pseudo-gradients, apply them to the start-of-round
        parameters with Nesterov SGD, and start the next round from the result.  With
        ``overlap``: launch this round's average, and apply the previous round's mean instead."""
        if self._start is None:
            raise RuntimeError("threelc.local: no round has started yet (still in warm-up)")
        arrived = self._wait_pending()
        self._check_agreement(with_steps=True)
        delta = self._start - self._flat_parameters()
        if self.overlap:
            self._pending = self._launch(delta)
            if arrived is not None:
                self._outer_step(arrived)
        else:
            self._average(delta)
            self.state.iteration += 1
            self._outer_step(delta)
        self._write_parameters(self._start)

    def finish(self) -> bool:
        """``overlap``: wait for the sync in flight and apply its outer step now (blocking); call it
        after the last inner step.  Mid-round, the round's local progress stays on top of the new
        start.  Its bytes go to a log record of its own, numbered ``steps`` (one past the last
        inner step's).  Returns whether there was one to apply (never without ``overlap``)."""
        arrived = self._wait_pending()
        if arrived is None:
            return False
        progress = self._flat_parameters() - self._start
        self._outer_step(arrived)
        self._write_parameters(self._start + progress if progress.any() else self._start)
        self._log.finish_step(self.steps, *self.state._owner())
        return True

    def _outer_step(self, mean: torch.Tensor) -> None:
        """torch.optim.SGD's update, on the flat start-of-round parameters."""
        self._momentum.mul_(self.outer_momentum).add_(mean)
        update = mean.add(self._momentum, alpha=self.outer_momentum) if self.nesterov else self._momentum
        self._start.add_(update, alpha=-self.outer_lr)

    def _average(self, delta: torch.Tensor) -> None:
        """``delta`` becomes its mean over the ranks (fp32 or 3LC), in place; a collective."""
        if dist.get_world_size(self.state.group()) == 1:
            return
        if self.outer == "3lc":
            self._average_3lc(delta)
        else:
            self.state._stats.add_raw(delta.numel() * delta.element_size())
            collectives.allreduce_mean(delta, self.state.group(), self.state._stats)

    def _launch(self, delta: torch.Tensor) -> "_Pending":
        """Start averaging ``delta`` in place without waiting: an async gloo allreduce (fp32) or
        :meth:`_average` on a thread (3LC), counting its bytes apart from the per-step log."""
        self.state._stats = HookStats(None)
        group = self.state.group()
        if self.outer == "fp32" and dist.get_world_size(group) > 1:
            self.state._stats.add_raw(delta.numel() * delta.element_size())
            self.state._stats.add_allreduce(delta.numel() * delta.element_size(), dist.get_world_size(group))
            return _Pending(delta, work=dist.all_reduce(delta.div_(dist.get_world_size(group)), group=group,
                                                        async_op=True))
        return _Pending(delta, thread_target=self._average)

    def _wait_pending(self) -> torch.Tensor | None:
        """The mean of the sync in flight once it arrived (None when there is none); its bytes
        join the current step's, and the sync counter moves on."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        mean = pending.wait()
        if self.state._stats is not self._log:
            self._log.current.add(self.state._stats.current)
            self.state._stats = self._log
            self.state.iteration += 1
        return mean

    def _average_3lc(self, delta: torch.Tensor) -> None:
        """``delta`` becomes its 3LC mean, refined by ``passes - 1`` more averages of the residuals."""
        hook.average(self.state, delta, index=0, layout=self.layout)
        for _ in range(self.passes - 1):
            delta.add_(hook.average(self.state, torch.zeros_like(delta), index=0, layout=self.layout))

    def _start_round(self) -> None:
        self._start = self._flat_parameters()
        if self._momentum is None:
            self._momentum = torch.zeros_like(self._start)

    def _flat_parameters(self) -> torch.Tensor:
        return torch.cat([parameter.detach().reshape(-1).float() for parameter in self.parameters])

    @torch.no_grad()
    def _write_parameters(self, flat: torch.Tensor) -> None:
        offset = 0
        for parameter, size in zip(self.parameters, self.layout):
            parameter.copy_(flat[offset:offset + size].view_as(parameter))
            offset += size

    def _inner_stepped(self, optimizer, args, kwargs) -> None:
        self._steps_unannounced += 1
        if self._steps_unannounced > self.sync_every and not self._warned_unannounced:
            self._warned_unannounced = True
            logger.warning("threelc.local: the inner optimizer stepped %d times without LocalSteps.step(): no outer "
                           "sync happens, the replicas drift apart.  Call local.step() after every inner step.",
                           self._steps_unannounced)

    # ------------------------------------------------------------------ agreement across ranks
    def config(self) -> dict:
        """The options as a JSON-able dict (the 3LC options under ``"hook"``)."""
        return {"sync_every": self.sync_every, "outer_lr": self.outer_lr, "outer_momentum": self.outer_momentum,
                "nesterov": self.nesterov, "outer": self.outer, "passes": self.passes,
                "warmup_steps": self.warmup_steps, "overlap": self.overlap,
                "hook": self.state.config()}

    def _fingerprint_text(self, world_size: int, with_steps: bool) -> str:
        options = {key: value for key, value in self.config().items() if key != "hook"}
        text = f"LocalSteps({options}) parameters={self.layout}"
        if self.outer == "3lc":
            text += f" hook=({self.state.fingerprint_text(world_size, 0)})"
        return text + (f" steps={self.steps} syncs={self.state.iteration}" if with_steps else "")

    def _check_agreement(self, with_steps: bool) -> None:
        """Every rank raises the same ConfigMismatchError unless all ranks have the same options
        (and, ``with_steps``, the same step counts)."""
        group = self.state.group()
        world_size = dist.get_world_size(group)
        if world_size == 1:
            return
        text = self._fingerprint_text(world_size, with_steps)
        device = collectives.comm_device(group, self.parameters[0].device if self.parameters else torch.device("cpu"))
        fingerprints = collectives.exchange_header([fingerprint(text)], group, device, self.state._stats)[:, 0]
        if np.all(fingerprints == fingerprints[0]):
            return
        texts = [None] * world_size
        dist.all_gather_object(texts, text, group=group)
        lines = "\n".join(f"  rank {rank}: {rank_text}" for rank, rank_text in enumerate(texts))
        raise ConfigMismatchError(f"threelc.local: the ranks run LocalSteps with different options, models or step "
                                  f"counts (a checkpoint of another step?):\n{lines}")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Step count, start-of-round parameters, outer momentum, options, the 3LC state
        (residuals, which differ per rank, with their owner record: every rank saves its own), and
        with ``overlap`` the mean of the sync in flight: this waits for it (a collective then),
        keeping it to apply at the next sync as the uninterrupted run would."""
        pending = None
        if self._pending is not None:
            self._pending = _Pending(self._wait_pending())
            pending = self._pending.mean.detach().cpu().clone()
        return {"version": STATE_DICT_VERSION, "steps": self.steps, "config": self.config(),
                "start": None if self._start is None else self._start.detach().cpu().clone(),
                "momentum": None if self._momentum is None else self._momentum.detach().cpu().clone(),
                "pending": pending, "hook": self.state.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s result (options stay as constructed; a change is logged).

        Raises ValueError for another version or another model size, and
        :class:`~threelc.hooks.StateOwnerError` for another rank's state dict.
        """
        if state_dict.get("version") not in (1, STATE_DICT_VERSION):
            raise ValueError(f"unsupported LocalSteps state_dict version {state_dict.get('version')!r} "
                             f"(this version reads {STATE_DICT_VERSION})")
        count = sum(self.layout)
        pending = state_dict.get("pending")
        if pending is not None and not self.overlap:
            raise ValueError("threelc.local: the state dict holds the mean of a sync in flight (saved with "
                             "overlap=True); load it into a LocalSteps with overlap=True")
        for key in ("start", "momentum", "pending"):
            if state_dict.get(key) is not None and state_dict[key].numel() != count:
                raise ValueError(f"threelc.local: the state dict's {key!r} holds {state_dict[key].numel()} values, "
                                 f"the model's trained parameters {count}: another model?")
        changed = {key: (value, self.config()[key]) for key, value in state_dict["config"].items()
                   if key != "hook" and self.config().get(key) != value}
        if changed:
            logger.warning("threelc.local: loading a state saved with other options (saved, now): %s", changed)
        self.state.load_state_dict(state_dict["hook"])
        device = self.parameters[0].device if self.parameters else torch.device("cpu")
        self.steps = int(state_dict["steps"])
        self._start = None if state_dict["start"] is None else state_dict["start"].to(device, torch.float32, copy=True)
        self._momentum = (None if state_dict["momentum"] is None
                          else state_dict["momentum"].to(device, torch.float32, copy=True))
        self._pending = None if pending is None else _Pending(pending.to(device, torch.float32, copy=True))

    def close(self) -> None:
        """Wait for a sync in flight (without applying it), then stop the 3LC state's worker thread."""
        if self._pending is not None:
            self._wait_pending()
        self.state.close()

    def __repr__(self) -> str:
        return f"LocalSteps({self.config()})"


class _Pending:
    """One outer sync in flight (``overlap``): ``mean`` is averaged in place by a gloo ``work``, or
    by ``thread_target(mean)`` on a thread of its own; or it has arrived already (neither)."""

    def __init__(self, mean: torch.Tensor, work=None, thread_target=None):
        self.mean = mean
        self._work = work
        self._error: BaseException | None = None
        self._thread = None
        if thread_target is not None:
            self._thread = threading.Thread(target=self._run, args=(thread_target,), name="threelc-local-sync",
                                            daemon=True)
            self._thread.start()

    def _run(self, target) -> None:
        try:
            target(self.mean)
        except BaseException as error:  # noqa: BLE001 - raised again on the training thread by wait()
            self._error = error

    def wait(self) -> torch.Tensor:
        """Block until the mean has arrived; return it (a failed average raises its error here)."""
        if self._work is not None:
            self._work.wait()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self.mean


def local_hook(local: LocalSteps, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook of :class:`LocalSteps`: a plain allreduce during warm-up, then the bucket as
    it is (each rank keeps its own gradient), like PyTorch's ``post_localSGD_hook``."""
    buffer = bucket.buffer()
    group = local.state.group()
    if local.averaging() and dist.get_world_size(group) > 1:
        local.state._stats.add_raw(buffer.numel() * buffer.element_size())
        collectives.allreduce_mean(buffer, group, local.state._stats)
    future = collectives.future_for(buffer)
    future.set_result(buffer)
    return future


def _check_arguments(sync_every, outer_lr, outer_momentum, nesterov, outer, passes, warmup_steps, overlap,
                     hook_options) -> None:
    if not _is_int(sync_every) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive integer (inner steps per outer sync), got {sync_every!r}")
    if not _is_number(outer_lr) or not outer_lr > 0:
        raise ValueError(f"outer_lr must be a positive finite number (DiLoCo: 0.7), got {outer_lr!r}")
    if not _is_number(outer_momentum) or not 0 <= outer_momentum < 1:
        raise ValueError(f"outer_momentum must be a number in [0, 1) (DiLoCo: 0.9), got {outer_momentum!r}")
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
    if outer not in OUTER:
        raise ValueError(f"outer must be one of {OUTER} (how pseudo-gradients are averaged), got {outer!r}")
    if not _is_int(passes) or passes < 1:
        raise ValueError(f"passes must be a positive integer (3LC averages per outer sync), got {passes!r}")
    if outer == "fp32" and passes != 1:
        raise ValueError(f"passes={passes!r} only applies to outer='3lc' (a float32 allreduce is exact in one pass)")
    if not _is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap must be True or False, got {overlap!r}")
    unused = sorted(set(hook_options) & set(_UNUSED_HOOK_OPTIONS))
    if unused:
        raise ValueError(f"{', '.join(unused)} do not apply to LocalSteps: the outer sync compresses every round "
                         f"(use warmup_steps for uncompressed steps first)")
    if outer == "fp32":
        compression = sorted(set(hook_options) - {"stats_every", "stats_max_bytes", "codec_threads", "codec"})
        if compression:
            raise ValueError(f"{', '.join(compression)} only apply to outer='3lc' (outer='fp32' averages with a plain "
                             f"allreduce)")


def _check_inner(inner_optimizer, parameters) -> None:
    if not isinstance(inner_optimizer, torch.optim.Optimizer):
        raise ValueError(f"inner_optimizer must be a torch.optim.Optimizer, got {type(inner_optimizer).__name__}")
    if isinstance(optim.unwrap(inner_optimizer), optim.AdamW):
        raise ValueError("inner_optimizer is a threelc.optim.AdamW, which pairs with the per-step 3LC hook; local "
                         "steps need no pairing: use torch.optim.AdamW as the inner optimizer")
    own = {id(parameter) for parameter in parameters}
    held = [parameter for group in inner_optimizer.param_groups for parameter in group["params"]]
    if not held or any(id(parameter) not in own for parameter in held):
        raise ValueError("inner_optimizer must hold the DDP model's trainable parameters (build it over "
                         "ddp_model.parameters()), and nothing else")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) \
        and math.isfinite(value)
