"""The 3LC DDP communication hook: ``threelc.hooks``.

Two lines in a DDP training script::

    from threelc.hooks import register
    state = register(ddp_model, sparsity=1.0)        # or:
    ddp_model.register_comm_hook(ThreeLCState(process_group=None), threelc_hook)

Layout: :mod:`.state` (options, residuals, checkpointing), :mod:`.hook` (the hook and the
per-bucket algorithm), :mod:`.collectives` (size headers and uneven payload exchange),
:mod:`.plan` (which collective, and whether buckets are coalesced, from the measured link),
:mod:`.worker` (the FIFO thread that issues collectives in order), :mod:`.faults` (corrupt
payloads and how every rank raises the same typed error), :mod:`.stats` (per-rank
statistics and their JSON-lines log), :mod:`.overhead` (a loopback benchmark);
:mod:`.codecs` (the numba and torch codec adapters the algorithm is written against),
:mod:`.device_codec` (the torch codec: the numba codec's bytes, on any device);
:mod:`.never_called` (the warning for a state whose hook never ran), :mod:`.integrations`
(Lightning, Accelerate, Hugging Face Trainer; also importable as ``threelc.integrations``);
:mod:`.optim` (``threelc.optim``: the AdamW paired with the hook) and :mod:`.local` (``threelc.local``:
local steps with 3LC-compressed outer syncs).
"""

from .faults import CorruptPayloadError
from .hook import register, threelc_hook
from .state import ConfigMismatchError, StateOwnerError, ThreeLCState, merge_state_dicts
from .stats import STAT_KEYS

__all__ = ["ThreeLCState", "threelc_hook", "register", "ConfigMismatchError", "CorruptPayloadError", "StateOwnerError",
           "merge_state_dicts", "STAT_KEYS"]
