"""Capture real gradients from the examples' models, for codec benchmarks.

One process, no DDP: build an example's task, train it a few steps (so the gradients are those of
a model in training, not of its initialization), and return the last step's gradients as one flat
float32 array plus the per-parameter sizes (the segments the DDP hook would use).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["capture_gradients"]


def _task(name: str, size: int):
    if name == "digits":
        from ..examples.train_digits import DigitsTask

        return DigitsTask(width=size)
    if name == "text":
        from ..examples.train_text import TextTask

        return TextTask(d_model=size, corpus_chars=200_000)
    raise ValueError(f"unknown example {name!r}: expected 'digits' or 'text'")


def capture_gradients(example: str = "digits", size: int = 96, steps: int = 20, seed: int = 0):
    """Train ``example`` for ``steps`` steps; return (flat float32 gradients, segment sizes).

    ``size`` is the digits CNN's width (96: ~2M parameters) or the transformer's d_model.
    """
    torch.manual_seed(seed)
    task = _task(example, size)
    model = task.build_model()
    optimizer = task.build_optimizer(model.parameters())
    batches = task.batches(0, 1)
    for _ in range(steps):
        inputs, targets = next(batches)
        optimizer.zero_grad()
        task.loss(model, inputs, targets).backward()
        optimizer.step()
    parameters = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in parameters]).numpy().astype(np.float32)
    return flat, [p.numel() for p in parameters]
