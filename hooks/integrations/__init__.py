"""Framework integrations of the 3LC hook: ``threelc.hooks.integrations`` (re-exported as ``threelc.integrations``).

* :mod:`.lightning`: :class:`~.lightning.ThreeLCStrategy`, a Lightning ``DDPStrategy`` that
  registers the hook on CPU and GPU alike and checkpoints every rank's hook state;
* :mod:`.accelerate`: :func:`~.accelerate.register_accelerate`, one call after
  ``accelerator.prepare(...)``; ``save_state``/``load_state`` carry every rank's hook state;
* :mod:`.transformers`: :class:`~.transformers.ThreeLCCallback`, a ``TrainerCallback`` that
  registers the hook and saves each rank's state inside ``checkpoint-N/``;
* :mod:`.checkpoint`: the rule they share: every rank writes and reads its own file,
  ``threelc-rank{rank}.pt``, beside the framework's checkpoint (docs/INTEGRATIONS.md says why).

Each framework module imports its framework when it is imported; this package imports none.
"""

import inspect

__all__ = ["check_option_names"]


def check_option_names(options: dict) -> None:
    """Raise ValueError for an option :func:`threelc.hooks.register` does not take (a typo caught
    when the integration is built; values are checked when the hook state is, at registration)."""
    from ..hook import register
    from ..state import ThreeLCState

    known = (set(inspect.signature(ThreeLCState).parameters) | set(inspect.signature(register).parameters)) - {
        "options", "ddp_model"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"threelc: unknown hook option(s) {unknown}; known: {sorted(known)}")
