"""Local steps with 3LC-compressed outer updates (DiLoCo): ``threelc.local.LocalSteps``.

A thin re-export of :mod:`threelc.hooks.local` (the implementation lives with the hook, on the
torch side of the package; importing this module imports torch)::

    inner = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3)
    local = threelc.local.LocalSteps(ddp_model, inner, sync_every=50, outer="3lc")
    # per step: loss.backward(); inner.step(); inner.zero_grad(); local.step()
"""

from threelc.hooks.local import OUTER, OUTER_SPARSITY, SYNC_ALLGATHER_RANKS, LocalSteps, sync_exchange

__all__ = ["LocalSteps", "OUTER", "OUTER_SPARSITY", "SYNC_ALLGATHER_RANKS", "sync_exchange"]
