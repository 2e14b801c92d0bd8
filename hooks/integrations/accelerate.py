"""Accelerate: :func:`register_accelerate`, one call after ``accelerator.prepare(...)``.

Accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` takes only its built-in hooks (a
custom one is ignored without a word), so the hook is registered on the prepared model instead.
The same call hooks every rank's hook state into ``accelerator.save_state`` /
``accelerator.load_state`` (their pre-hooks run on every process): each rank writes and reads
``threelc-rank{rank}.pt`` inside the state folder (see :mod:`.checkpoint`).

    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    state = register_accelerate(accelerator, model, sparsity=1.0)

On CPU, ``accelerate launch --cpu --num_processes 2`` starts ONE process (its CPU launcher runs
several only through ``mpirun`` with ``--mpirun_hostfile``); ``torchrun --nproc-per-node 2`` works.
"""

from __future__ import annotations

import logging
import os

from ..hook import register
from ..state import ThreeLCState
from .checkpoint import FILE_NAME, load_rank_state, save_rank_state

__all__ = ["register_accelerate"]

logger = logging.getLogger(__name__)


def register_accelerate(accelerator, model, *, reshard: bool = False, **options) -> ThreeLCState:
    """Register the 3LC hook on an Accelerate-prepared model; save/load each rank's hook state
    with ``accelerator.save_state`` / ``accelerator.load_state``.

    Parameters
    ----------
    accelerator : accelerate.Accelerator
    model : torch.nn.Module
        What ``accelerator.prepare`` returned for the model (DistributedDataParallel, possibly
        inside ``torch.compile``).
    reshard : bool, default False
        When ``load_state`` meets a state saved with another number of processes: False raises
        :class:`~threelc.hooks.StateOwnerError`; True spreads every saved rank's residuals over
        the new ranks (:func:`threelc.hooks.merge_state_dicts`).
    **options
        Keyword arguments of :func:`threelc.hooks.register` (``sparsity``, ``collective``, ...),
        including ``optimizer=``: a prepared ``threelc.optim.AdamW`` pairs as it is.

    Raises
    ------
    TypeError
        If ``model`` is not a prepared DistributedDataParallel model; with one process Accelerate
        does not wrap it, and the message says how to start several.
    """
    if accelerator.num_processes < 2:
        raise TypeError(
            f"threelc: Accelerate runs {accelerator.num_processes} process here (distributed_type "
            f"{accelerator.distributed_type}), so prepare() did not wrap the model in DistributedDataParallel and "
            f"there is nothing to compress.  Start several processes: on CPU, `accelerate launch --cpu "
            f"--num_processes 2` starts only one; use `torchrun --nproc-per-node 2 script.py`.  To run the same "
            f"script on one process, call register_accelerate only when accelerator.num_processes > 1.")
    state = register(model, **options)
    # A second model (e.g. a GAN's discriminator) gets files of its own: threelc-model1-rank{r}.pt.
    model_index = getattr(accelerator, "_threelc_models", 0)
    accelerator._threelc_models = model_index + 1
    accelerator.register_save_state_pre_hook(
        lambda models, weights, output_dir: save_rank_state(state, _path_of(output_dir, model_index)))
    accelerator.register_load_state_pre_hook(lambda models, input_dir: _load(state, input_dir, model_index, reshard))
    return state


def _load(state: ThreeLCState, input_dir: str, model_index: int, reshard: bool) -> None:
    if not load_rank_state(state, _path_of(input_dir, model_index), reshard=reshard):
        # No rank saved one: a checkpoint from before 3LC was used, so there are no residuals to lose.
        logger.warning("threelc: %s holds no 3LC hook state; the residuals start from zero", input_dir)


def _path_of(folder: str, model_index: int):
    name = FILE_NAME if model_index == 0 else FILE_NAME.replace("threelc-", f"threelc-model{model_index}-")
    return lambda rank: os.path.join(os.fspath(folder), name.format(rank=rank))
