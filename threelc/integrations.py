"""``threelc.integrations``: the 3LC hook in Lightning, Accelerate and the Hugging Face Trainer.

Each name imports its framework on first use (``import threelc.integrations`` imports none):

* :class:`ThreeLCStrategy` (Lightning): ``Trainer(strategy=ThreeLCStrategy(hook_options={...}))``;
* :func:`register_accelerate` (Accelerate): ``register_accelerate(accelerator, model, **options)``
  after ``accelerator.prepare(...)``;
* :class:`ThreeLCCallback` (Hugging Face Trainer): ``trainer.add_callback(ThreeLCCallback(trainer))``.

All three save every rank's hook state beside the framework's checkpoint and restore it on
resume.  They live in :mod:`threelc.hooks.integrations`; docs/INTEGRATIONS.md has the recipes.
"""

import importlib

__all__ = ["ThreeLCStrategy", "register_accelerate", "ThreeLCCallback"]

_MODULES = {"ThreeLCStrategy": "lightning", "register_accelerate": "accelerate", "ThreeLCCallback": "transformers"}


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'threelc.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(f"threelc.hooks.integrations.{_MODULES[name]}"), name)


def __dir__():
    return sorted(__all__)
