"""Hugging Face Trainer: :class:`ThreeLCCallback`, a ``TrainerCallback`` that compresses with 3LC.

The Trainer has no comm-hook argument.  The callback registers the hook on
``trainer.model_wrapped`` (the DDP model, ready by ``on_train_begin``), writes each rank's hook
state into ``checkpoint-N/threelc-rank{rank}.pt`` on ``on_save`` (every process calls it, as the
Trainer writes ``rng_state_{rank}.pth`` from every process), and loads it back when
``trainer.train(resume_from_checkpoint=...)`` resumes.

    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(ThreeLCCallback(trainer, sparsity=1.0))
    trainer.train()                        # or trainer.train(resume_from_checkpoint=True / "out/checkpoint-20")

Which folder was resumed: the Trainer does not tell callbacks, so the callback looks, in order,
at its own ``resume_from_checkpoint`` argument, ``TrainingArguments.resume_from_checkpoint``, and
``<output_dir>/checkpoint-<global_step>``, and loads the first whose files carry the resumed
trainer state's fingerprint (its step and log history); files of another run raise an error.
Hyperparameter search (checkpoints under ``<output_dir>/run-<trial>/``) is not supported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import optim
from ..hook import register
from ..state import ThreeLCState
from . import check_option_names
from .checkpoint import FILE_NAME, load_rank_state, save_rank_state

__all__ = ["ThreeLCCallback"]

logger = logging.getLogger(__name__)


class ThreeLCCallback(TrainerCallback):
    """Register the 3LC hook on the Trainer's DDP model and checkpoint every rank's hook state.

    Parameters
    ----------
    trainer : transformers.Trainer
        The trainer this callback is added to (``trainer.add_callback(...)``).
    resume_from_checkpoint : str, optional
        The checkpoint folder to take the hook state from when resuming, if it is neither
        ``<output_dir>/checkpoint-<step>`` nor ``TrainingArguments.resume_from_checkpoint``.
    reshard : bool, default False
        When resuming from a checkpoint saved with another number of processes: False raises
        :class:`~threelc.hooks.StateOwnerError`; True spreads every saved rank's residuals over
        the new ranks (:func:`threelc.hooks.merge_state_dicts`).
    **options
        Keyword arguments of :func:`threelc.hooks.register` (``sparsity``, ``collective``, ...).

    :attr:`threelc_state` is this rank's :class:`~threelc.hooks.ThreeLCState` once training began
    (None with a single process, where there is nothing to compress).
    """

    def __init__(self, trainer, *, resume_from_checkpoint: str | None = None, reshard: bool = False, **options):
        check_option_names(options)
        self.trainer = trainer
        self.resume_from_checkpoint = resume_from_checkpoint
        self.reshard = bool(reshard)
        self.options = options
        self.threelc_state: ThreeLCState | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size < 2:
            logger.warning("threelc: the Trainer runs a single process, so there is nothing to compress and the 3LC "
                           "hook is not registered; start several, e.g. torchrun --nproc-per-node 2 train.py")
            return
        previous = self.threelc_state
        options = dict(self.options)
        if "optimizer" not in options and isinstance(optim.unwrap(kwargs.get("optimizer")), optim.AdamW):
            options["optimizer"] = kwargs["optimizer"]  # Trainer(optimizers=(threelc.optim.AdamW(...), ...))
        self.threelc_state = register(self.trainer.model_wrapped, **options)
        if state.global_step > 0:
            self._resume(args, state)
        elif previous is not None:  # a second train() in this process continues with its residuals
            self.threelc_state.load_state_dict(previous.state_dict())

    def on_save(self, args, state, control, **kwargs):
        if self.threelc_state is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        fingerprint = _trainer_fingerprint(state)
        save_rank_state(self.threelc_state, _path_of(folder),
                        write=lambda state_dict, path: torch.save({**state_dict, "trainer": fingerprint}, path))

    def _resume(self, args, state) -> None:
        fingerprint = _trainer_fingerprint(state)
        candidates = [self.resume_from_checkpoint,
                      args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None,
                      os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        foreign = []
        for folder in dict.fromkeys(candidate for candidate in candidates if candidate):
            path_of = _path_of(folder)
            if not os.path.exists(path_of(0)):
                continue
            if torch.load(path_of(0), map_location="cpu", weights_only=True).get("trainer") != fingerprint:
                foreign.append(folder)
                continue
            load_rank_state(self.threelc_state, path_of, reshard=self.reshard)
            return
        if foreign:
            raise FileNotFoundError(
                f"threelc: the hook state in {foreign} belongs to another checkpoint than the one resumed (step "
                f"{state.global_step}); pass ThreeLCCallback(trainer, resume_from_checkpoint=<the folder resumed>)")
        logger.warning("threelc: resumed at step %d, but no 3LC hook state was found (looked in %s); the residuals "
                       "start from zero.  If that checkpoint was saved with ThreeLCCallback, pass "
                       "ThreeLCCallback(trainer, resume_from_checkpoint=<its folder>)", state.global_step,
                       [candidate for candidate in candidates if candidate])


def _trainer_fingerprint(state) -> str:
    """The trainer state's step and log history, hashed: ties hook state files to one checkpoint."""
    text = json.dumps({"step": state.global_step, "log": state.log_history}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _path_of(folder: str):
    return lambda rank: os.path.join(os.fspath(folder), FILE_NAME.format(rank=rank))
