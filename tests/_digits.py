"""A small real task for the hook's convergence tests: a CNN on scikit-learn's digits (8x8)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["train_digits"]


def _data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(images, digits.target, test_size=0.2, random_state=0, stratify=digits.target)


def _model():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def train_digits(rank: int, world_size: int, hook_options: dict | None, epochs: int = 12, batch: int = 32,
                 lr: float = 0.05) -> dict:
    """Train on this rank's half of each epoch; return test accuracy and the hook's step stats.

    ``hook_options=None`` trains with DDP's default allreduce.  The returned ``ratio`` is
    raw / sent bytes over the compressed steps only.
    """
    import warnings

    from threelc.hooks import register

    # The first conv's weight (16, 1, 3, 3) has two valid stride layouts; DDP warns, harmlessly.
    warnings.filterwarnings("ignore", message="Grad strides do not match")
    x_train, x_test, y_train, y_test = _data()
    torch.manual_seed(0)
    model = _model()
    ddp = DDP(model)
    state = register(ddp, **hook_options) if hook_options is not None else None
    optimizer = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9)
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    order_rng = np.random.default_rng(0)
    raw = sent = 0
    for _ in range(epochs):
        order = order_rng.permutation(len(x_train))
        mine = order[rank::world_size]
        for start in range(0, len(mine) - batch + 1, batch):
            index = torch.from_numpy(mine[start:start + batch])
            loss = nn.functional.cross_entropy(ddp(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if state is not None:
                step = state.stats()["step"]
                if step["compressed"]:
                    raw += step["raw_bytes"]
                    sent += step["sent_bytes"]
    with torch.no_grad():
        predictions = model(torch.from_numpy(x_test)).argmax(1).numpy()
    accuracy = float((predictions == y_test).mean())
    parameters = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"accuracy": accuracy, "ratio": raw / sent if sent else None, "parameters": parameters,
            "stats": state.stats() if state is not None else None}
