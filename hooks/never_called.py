"""Warnings for two silent failures: a hook state whose hook never ran (compression that did not
happen), and an Adam optimizer that is not paired with the hook (compression that cost accuracy).

A :class:`~threelc.hooks.ThreeLCState` does nothing by itself; only DDP calling
:func:`~threelc.hooks.threelc_hook` compresses anything.  Frameworks can drop a hook without a
word (Lightning registers comm hooks on CUDA only; Accelerate's ``comm_hook`` takes only its
built-in hooks), and the run then trains with plain allreduce.  So every state is watched:

* the first time any ``torch.optim`` optimizer steps after the state was created, a state whose
  hook has not run logs a warning (DDP calls the hook during backward, before the step; warm-up
  iterations and world size 1 call it too, so correct use never warns);
* at interpreter exit, a state that was registered on a DDP model but never called warns (an
  optimizer outside ``torch.optim``, or a model run through ``ddp_model.module``).

The same first optimizer step checks the optimizer: a ``torch.optim.Adam`` or ``AdamW`` (not
:class:`threelc.optim.AdamW`) stepping parameters of the model a state is registered on, while no
optimizer is paired with that state, logs a warning.  Adam divides by a second moment of the
gradients it receives, and 3LC's error-fed ternary gradients inflate it: on two transformers this
cost 22-26% of validation loss against allreduce (README, "AdamW").  The Hugging Face Trainer's
default optimizer is torch's AdamW, so a user who adds the callback and nothing else gets there.

Each state warns at most once of each.  The optimizer hook is global and removes itself when no
state is left to watch.
"""

from __future__ import annotations

import atexit
import logging
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import optim

__all__ = ["watch"]

logger = logging.getLogger(__name__)

_pending: weakref.WeakSet = weakref.WeakSet()  # states not yet checked after an optimizer step
_registered: weakref.WeakSet = weakref.WeakSet()  # states registered on a DDP model, checked at exit
_step_hook = None
_at_exit_installed = False

HOW_TO_REGISTER = ("Register it on the DistributedDataParallel model: threelc.hooks.register(ddp_model, ...), or with "
                   "a framework: threelc.integrations.ThreeLCStrategy (Lightning; its DDPStrategy(ddp_comm_hook=...) "
                   "registers hooks only on CUDA), threelc.integrations.register_accelerate(accelerator, model) "
                   "(Accelerate's DistributedDataParallelKwargs(comm_hook=...) takes only its built-in hooks), "
                   "threelc.integrations.ThreeLCCallback (Hugging Face Trainer); see docs/INTEGRATIONS.md.")


def watch(state) -> None:
    """Check ``state`` at the next optimizer step (and, once registered, at exit)."""
    global _step_hook, _at_exit_installed
    _pending.add(state)
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_after_optimizer_step)
    if not _at_exit_installed:
        atexit.register(_at_exit)
        _at_exit_installed = True


def watch_registered(state) -> None:
    """``state`` was registered on a DDP model: it must have run by the end of the process."""
    _registered.add(state)


#: Optimizers whose second moment 3LC's compressed gradients inflate (threelc.optim.AdamW excepted).
ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _step_hook
    for state in list(_pending):
        _pending.discard(state)
        if not state._hook_called:
            _warn(state, "an optimizer stepped")
        if _unpaired_adam(state, optimizer):
            logger.warning(
                "threelc: %s steps parameters whose gradients the 3LC hook of %r compresses, and no optimizer is "
                "paired with the hook: Adam divides by a second moment of the compressed gradients, which 3LC's "
                "error feedback inflates (on two transformers 22-26%% above allreduce's validation loss; README, "
                "\"AdamW\").  Use threelc.optim.AdamW, a drop-in, and pair it: "
                "threelc.hooks.register(ddp_model, optimizer=opt); with a framework, docs/INTEGRATIONS.md "
                "(\"With threelc.optim.AdamW\").", f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
                state)
    if not _pending and _step_hook is not None:
        _step_hook.remove()
        _step_hook = None


def _unpaired_adam(state, optimizer) -> bool:
    """Whether ``optimizer`` is a torch Adam over parameters of ``state``'s model while nothing is
    paired with ``state`` (a state that knows no parameter names, as LocalSteps' own, never matches)."""
    if state.optimizer is not None or not isinstance(optimizer, ADAM_TYPES) or isinstance(optimizer, optim.AdamW):
        return False
    names = state._parameter_names
    return any(id(parameter) in names for group in optimizer.param_groups for parameter in group["params"])


def _at_exit() -> None:
    for state in list(_registered):
        if not state._hook_called:
            _warn(state, "the process is exiting")


def _warn(state, moment: str) -> None:
    if state._never_called_warned:
        return
    state._never_called_warned = True
    if state in _registered:
        reason = ("It is registered on a DistributedDataParallel model whose backward never ran: was the model "
                  "called through ddp_model.module(...) (which bypasses DDP), or another model trained?")
    else:
        reason = "It was never registered on the DistributedDataParallel model that trained."
    logger.warning("threelc: %s, but the 3LC hook of %r has never run, so no gradient was compressed: gradients "
                   "were averaged by plain allreduce, or not at all. %s %s", moment, state, reason, HOW_TO_REGISTER)
