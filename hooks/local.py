"""Local steps with compressed outer updates (DiLoCo): ``threelc.local.LocalSteps``.

Per-step compression stops at the codec's ratio.  Communicating less often multiplies it: every
rank takes ``sync_every`` (H) steps of its own optimizer (the *inner* optimizer, e.g. AdamW) on its
own data without averaging gradients, then the ranks average the *pseudo-gradient*

    delta_r = start-of-round parameters - rank r's parameters after H inner steps

and an *outer* Nesterov SGD step applies the mean to the start-of-round parameters (Douillard et
al., "DiLoCo", arXiv:2311.08105: lr 0.7, momentum 0.9).  With ``outer="3lc"`` the mean travels
through the 3LC hook's own bucket path (:func:`threelc.hooks.hook.average`: its codec, its
collectives, worker and server error feedback), so H = 50 local steps and ~50-100x compression
multiply into ~2,500-5,000x fewer bytes than per-step allreduce.

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
pass left unsent, below half its block's largest) at its own, finer scale, in the same sync instead
of in later rounds.  Error feedback delivers everything eventually either way; with a handful of
rounds per run the delay is what costs, and k passes cost ~k times the bytes of one.

The first ``warmup_steps`` inner steps average gradients with a plain allreduce, as PyTorch's
``post_localSGD_hook`` does before its ``start_localSGD_iter``; the first round starts after them.
The inner optimizer's state (AdamW's moments) stays local to each rank, as in DiLoCo.

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

import numpy as np
import torch
import torch.distributed as dist

from . import collectives, hook, optim
from .state import ConfigMismatchError, ThreeLCState, fingerprint

__all__ = ["LocalSteps", "OUTER", "local_hook"]

logger = logging.getLogger(__name__)

#: How the pseudo-gradients are averaged: a plain allreduce, or 3LC with error feedback.
OUTER = ("fp32", "3lc")
#: Version of the dictionary :meth:`LocalSteps.state_dict` returns.
STATE_DICT_VERSION = 1
#: ThreeLCState options that mean nothing here (the outer sync always compresses its one bucket).
_UNUSED_HOOK_OPTIONS = ("start_iter", "min_numel")


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
    stats_dir : str, optional
        Append one JSON line per inner step to ``{stats_dir}/hook-rank{rank}.jsonl`` in the hook's
        format (:mod:`threelc.hooks.stats`): warm-up allreduce bytes, 0 on local steps, the outer
        sync's bytes on sync steps (``compressed`` true with ``outer="3lc"``).
    **hook_options
        :class:`~threelc.hooks.ThreeLCState` options of the 3LC outer sync (``sparsity``,
        ``collective``, ``scale``, ``block_size``, ``error_feedback``, ``codec``,
        ``codec_threads``, ``stats_every``, ``stats_max_bytes``).

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
                 warmup_steps: int = 0, stats_dir=None, **hook_options):
        ddp_model = hook._distributed_model(ddp_model)
        _check_arguments(sync_every, outer_lr, outer_momentum, nesterov, outer, passes, warmup_steps, hook_options)
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
        process_group = getattr(ddp_model, "process_group", None)
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
        self._steps_unannounced = 0  # inner optimizer steps since the last step() call
        self._warned_unannounced = False
        inner_optimizer.register_step_post_hook(self._inner_stepped)
        ddp_model.register_comm_hook(self, local_hook)
        self._check_agreement(with_steps=False)
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
        self.state._stats.finish_step(self.steps - 1, *self.state._owner())
        return synced

    def sync(self) -> None:
        """The outer step: average the pseudo-gradients, apply them to the start-of-round
        parameters with Nesterov SGD, and start the next round from the result."""
        if self._start is None:
            raise RuntimeError("threelc.local: no round has started yet (still in warm-up)")
        self._check_agreement(with_steps=True)
        delta = self._start - self._flat_parameters()
        if dist.get_world_size(self.state.group()) > 1:
            if self.outer == "3lc":
                self._average_3lc(delta)
            else:
                self.state._stats.add_raw(delta.numel() * delta.element_size())
                collectives.allreduce_mean(delta, self.state.group(), self.state._stats)
        self.state.iteration += 1
        # torch.optim.SGD's update, on the flat start-of-round parameters.
        self._momentum.mul_(self.outer_momentum).add_(delta)
        update = delta.add(self._momentum, alpha=self.outer_momentum) if self.nesterov else self._momentum
        self._start.add_(update, alpha=-self.outer_lr)
        self._write_parameters(self._start)

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
                "warmup_steps": self.warmup_steps,
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
        """Step count, start-of-round parameters, outer momentum, options, and the 3LC state
        (residuals, which differ per rank, with their owner record: every rank saves its own)."""
        return {"version": STATE_DICT_VERSION, "steps": self.steps, "config": self.config(),
                "start": None if self._start is None else self._start.detach().cpu().clone(),
                "momentum": None if self._momentum is None else self._momentum.detach().cpu().clone(),
                "hook": self.state.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s result (options stay as constructed; a change is logged).

        Raises ValueError for another version or another model size, and
        :class:`~threelc.hooks.StateOwnerError` for another rank's state dict.
        """
        if state_dict.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"unsupported LocalSteps state_dict version {state_dict.get('version')!r} "
                             f"(this version reads {STATE_DICT_VERSION})")
        count = sum(self.layout)
        for key in ("start", "momentum"):
            if state_dict[key] is not None and state_dict[key].numel() != count:
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

    def close(self) -> None:
        """Stop the 3LC state's worker thread."""
        self.state.close()

    def __repr__(self) -> str:
        return f"LocalSteps({self.config()})"


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


def _check_arguments(sync_every, outer_lr, outer_momentum, nesterov, outer, passes, warmup_steps,
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
