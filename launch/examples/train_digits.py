"""Example: a small CNN on scikit-learn's bundled 8x8 handwritten digits, under torchrun.

::

    torchrun --nproc-per-node 4 -m threelc.launch.examples.train_digits --hook threelc --steps 300 --run-dir runs/digits

``--width`` sizes the network: about ``218 * width**2`` parameters (16 -> ~56k, 32 -> ~223k,
96 -> ~2.0M, 128 -> ~3.6M).  The 1797 images are split once (seed 0, 20% test); the test
accuracy is reported every ``--eval-every`` steps.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .data import sharded_batches
from .trainer import main as train_main

__all__ = ["DigitsCNN", "DigitsTask", "load_digits_split", "main"]


class DigitsCNN(nn.Module):
    """conv(w) -> conv(2w) -> pool -> conv(4w) -> pool -> fc(8w) -> fc(10), ReLU between."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * width, 8 * width), nn.ReLU(), nn.Linear(8 * width, 10),
        )

    def forward(self, images):
        return self.classifier(self.features(images))


def load_digits_split(test_fraction: float = 0.2):
    """(train_x, train_y, test_x, test_y) as tensors; a fixed, stratified split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[:, None]  # N x 1 x 8 x 8 in [0, 1]
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=0, stratify=digits.target)
    return (torch.from_numpy(train_x), torch.from_numpy(train_y).long(),
            torch.from_numpy(test_x), torch.from_numpy(test_y).long())


class DigitsTask:
    """The digits classification task for :mod:`threelc.launch.examples.trainer`."""

    name = "digits-cnn"
    eval_metric = "test_accuracy"

    def __init__(self, *, width: int = 32, batch_size: int = 32, lr: float = 0.05, seed: int = 0):
        self.width = width
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed
        self.train_x, self.train_y, self.test_x, self.test_y = load_digits_split()

    def build_model(self):
        return DigitsCNN(self.width)

    def build_optimizer(self, parameters):
        return torch.optim.SGD(parameters, lr=self.lr, momentum=0.9)

    def batches(self, rank, world_size):
        for index in sharded_batches(len(self.train_x), self.batch_size, rank, world_size, self.seed):
            yield self.train_x[index], self.train_y[index]

    def loss(self, model, inputs, targets):
        return nn.functional.cross_entropy(model(inputs), targets)

    def evaluate(self, model):
        logits = model(self.test_x)
        return {"test_accuracy": float((logits.argmax(1) == self.test_y).float().mean()),
                "test_loss": float(nn.functional.cross_entropy(logits, self.test_y))}

    def describe(self):
        return {"model": "DigitsCNN", "width": self.width,
                "parameters": sum(p.numel() for p in DigitsCNN(self.width).parameters()),
                "train_examples": len(self.train_x), "test_examples": len(self.test_x), "optimizer": "sgd-momentum-0.9",
                "lr": self.lr}


def _add_arguments(group):
    group.add_argument("--width", type=int, default=32, help="channel width; ~218*width^2 parameters (default: %(default)s)")


def _build(args):
    return DigitsTask(width=args.width, batch_size=args.batch_size, lr=0.05 if args.lr is None else args.lr, seed=args.seed)


def main(argv=None) -> int:
    """Entry point (``python -m threelc.launch.examples.train_digits``)."""
    return train_main(argv, description=__doc__.splitlines()[0], add_task_arguments=_add_arguments, build_task=_build)


if __name__ == "__main__":
    sys.exit(main())
