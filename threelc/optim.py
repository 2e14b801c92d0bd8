"""Compression-aware optimizers to pair with the 3LC hook: ``threelc.optim.AdamW``.

A thin re-export of :mod:`threelc.hooks.optim` (the implementation lives with the hook, on the
torch side of the package; importing this module imports torch)::

    opt = threelc.optim.AdamW(ddp_model.parameters(), lr=3e-4, weight_decay=0.1)
    state = threelc.hooks.register(ddp_model, optimizer=opt)
"""

from threelc.hooks.optim import COMPRESS, REFRESH, AdamW, UnpairedOptimizerError

__all__ = ["AdamW", "REFRESH", "COMPRESS", "UnpairedOptimizerError"]
