"""Lightning: :class:`ThreeLCStrategy`, a ``DDPStrategy`` that compresses with 3LC on CPU and GPU.

Lightning's own ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`` registers comm hooks only
when the device is CUDA, so on CPU it silently trains with plain allreduce.  This strategy
registers the hook with :func:`threelc.hooks.register` on every device, and extends Lightning's
checkpoints, which rank 0 writes alone, with one file per rank:
``<checkpoint>.threelc-rank{rank}.pt`` beside ``<checkpoint>`` (see :mod:`.checkpoint`).

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ThreeLCStrategy(hook_options={"sparsity": 1.0}))
    trainer.fit(model)                                   # trainer.fit(model, ckpt_path=...) resumes
    trainer.strategy.threelc_state.stats()
"""

from __future__ import annotations

import os

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from .. import optim
from ..hook import register
from ..state import ThreeLCState
from . import check_option_names
from .checkpoint import FILE_NAME, load_rank_state, save_rank_state

__all__ = ["ThreeLCStrategy"]

_NOT_HERE = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class ThreeLCStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with the 3LC hook registered on CPU and GPU, and per-rank hook
    state saved and restored with Lightning's checkpoints.

    Parameters
    ----------
    hook_options : dict, optional
        Keyword arguments of :func:`threelc.hooks.register` (``sparsity``, ``collective``, ...).
    reshard : bool, default False
        When resuming from a checkpoint saved with another number of ranks: False raises
        :class:`~threelc.hooks.StateOwnerError`; True spreads every saved rank's residuals over
        the new ranks (:func:`threelc.hooks.merge_state_dicts`).
    **kwargs
        ``DDPStrategy``'s arguments (``find_unused_parameters``, ``static_graph``, ``timeout``,
        ``start_method``, ...), except the comm-hook ones this strategy owns.

    After ``trainer.fit`` starts, :attr:`threelc_state` is this rank's
    :class:`~threelc.hooks.ThreeLCState` (for ``stats()``).
    """

    def __init__(self, hook_options: dict | None = None, reshard: bool = False, **kwargs):
        taken = [name for name in _NOT_HERE if kwargs.get(name) is not None]
        if taken:
            raise ValueError(f"threelc: ThreeLCStrategy registers the 3LC hook itself; do not pass {taken} "
                             f"(hook options go in hook_options=...)")
        self.hook_options = dict(hook_options or {})
        check_option_names(self.hook_options)
        self.reshard = bool(reshard)
        self.threelc_state: ThreeLCState | None = None
        self._resume_path: str | None = None
        super().__init__(**kwargs)

    def configure_ddp(self) -> None:
        super().configure_ddp()
        previous = self.threelc_state
        self.threelc_state = register(self.model, **self.hook_options)
        if previous is not None:  # a second fit() with this strategy continues with its residuals
            self.threelc_state.load_state_dict(previous.state_dict())
        self._load_pending()

    # ------------------------------------------------------------------ checkpoints
    def setup_optimizers(self, trainer) -> None:
        """Lightning builds the optimizers after :meth:`configure_ddp`: pair a threelc one then."""
        super().setup_optimizers(trainer)
        paired = [optimizer for optimizer in self.optimizers if isinstance(optim.unwrap(optimizer), optim.AdamW)]
        if self.threelc_state is not None and paired:
            if len(paired) > 1:
                raise ValueError("threelc: one threelc.optim.AdamW per DDP model; configure_optimizers returned "
                                 f"{len(paired)}")
            optim.pair(self.threelc_state, paired[0], self.model.module)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        state = self.threelc_state
        if state is not None:
            # Recorded in rank 0's checkpoint, so a resume knows every rank has a file to load.
            checkpoint["threelc"] = {"world_size": state._owner()[1], "file": FILE_NAME}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if state is not None:
            save_rank_state(state, _path_of(filepath),
                            write=lambda state_dict, path: self.checkpoint_io.save_checkpoint(state_dict, path))

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)
        if self.threelc_state is not None:
            path = _path_of(filepath)(self.threelc_state._owner()[0])
            if get_filesystem(path).exists(path):
                self.checkpoint_io.remove_checkpoint(path)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        trainer = getattr(self.lightning_module, "_trainer", None)
        fitting = trainer is None or trainer.state.fn == TrainerFn.FITTING  # validate/test: no hook
        if "threelc" in checkpoint and fitting:
            path = os.fspath(checkpoint_path)
            # ModelCheckpoint(save_last="link") makes last.ckpt a symbolic link; the files sit by its target.
            self._resume_path = os.path.realpath(path) if os.path.islink(path) else path
            self._load_pending()
        return checkpoint

    def _load_pending(self) -> None:
        """Load the hook state of the checkpoint being resumed, once the state exists."""
        if self._resume_path is None or self.threelc_state is None:
            return
        path_of, self._resume_path = _path_of(self._resume_path), None
        if not load_rank_state(self.threelc_state, path_of, reshard=self.reshard,
                               exists=lambda path: get_filesystem(path).exists(path),
                               read=lambda path: self.checkpoint_io.load_checkpoint(path, weights_only=True)):
            raise FileNotFoundError(f"threelc: the checkpoint was saved by ThreeLCStrategy, but its hook state files "
                                    f"({path_of(0)}, ...) are missing")


def _path_of(filepath):
    """Rank r's hook state file beside the checkpoint ``filepath``."""
    return lambda rank: f"{os.fspath(filepath)}.{FILE_NAME.format(rank=rank)}"
