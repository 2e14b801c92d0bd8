"""Per-rank hook state files beside a framework's checkpoint: the rule every integration follows.

Lightning and Accelerate write their checkpoint from rank 0 only, but 3LC's residuals differ
between ranks.  So every rank writes its own ``threelc-rank{rank}.pt`` beside the framework's
files and reads its own back, as the frameworks do with per-process RNG states.  (Gathering all
ranks' residuals into rank 0's checkpoint would hold N model-sized float32 tensors on rank 0.)

On resume, :func:`load_rank_state` loads this rank's file; the state dict's owner record makes a
file of another rank or world size fail loudly.  When the world size changed, it refuses by
default, or with ``reshard=True`` merges every saved rank's residuals
(:func:`~threelc.hooks.merge_state_dicts`), so no gradient mass is lost either way.
"""

from __future__ import annotations

import logging
import os

import torch

from ..state import StateOwnerError, ThreeLCState, merge_state_dicts

__all__ = ["FILE_NAME", "load_rank_state", "save_rank_state"]

logger = logging.getLogger(__name__)

#: The name of rank ``rank``'s hook state file inside a checkpoint folder.
FILE_NAME = "threelc-rank{rank}.pt"


def _read(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_rank_state(state: ThreeLCState, path_of, write=torch.save) -> str:
    """Write this rank's state dict to ``path_of(rank)`` with ``write(state_dict, path)``."""
    path = path_of(state._owner()[0])
    write(state.state_dict(), path)
    return path


def load_rank_state(state: ThreeLCState, path_of, *, reshard: bool = False, exists=os.path.exists,
                    read=_read) -> bool:
    """Load this rank's hook state saved by :func:`save_rank_state`; False if no rank saved one.

    ``path_of(rank)`` names a rank's file.  Raises :class:`~threelc.hooks.StateOwnerError` if the
    run that saved had another world size (unless ``reshard``), and FileNotFoundError if some
    ranks saved and this one did not.
    """
    rank, world_size = state._owner()
    own_path = path_of(rank)
    own = read(own_path) if exists(own_path) else None
    if own is None and not exists(path_of(0)):
        return False
    saved_world_size = int(((own if own is not None else read(path_of(0))).get("owner") or {})
                           .get("world_size", world_size))
    if saved_world_size == world_size:
        if own is None:
            raise FileNotFoundError(
                f"threelc: {own_path} is missing, but rank 0 saved its hook state there: every rank must save its "
                f"own (call the framework's save on every process; on machines without a shared filesystem, each "
                f"node keeps its own ranks' files)")
        state.load_state_dict(own)
        return True
    if not reshard:
        raise StateOwnerError(
            f"threelc: the checkpoint holds the hook state of {saved_world_size} ranks, this run has {world_size}.  "
            f"Residuals are gradient mass not yet applied: pass reshard=True to spread every saved rank's residuals "
            f"over the new ranks (threelc.hooks.merge_state_dicts), or resume with {saved_world_size} ranks.")
    missing = [path_of(saved) for saved in range(saved_world_size) if not exists(path_of(saved))]
    if missing:
        raise FileNotFoundError(f"threelc: resharding needs every saved rank's hook state; missing: {missing}")
    state.load_state_dict(merge_state_dicts([read(path_of(saved)) for saved in range(saved_world_size)]))
    logger.info("threelc: rank %d took its residuals from the merged states of %d saved ranks", rank,
                saved_world_size)
    return True
