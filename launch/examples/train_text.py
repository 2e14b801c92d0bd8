"""Example: a small character-level transformer language model on Python's own source, under torchrun.

::

    torchrun --nproc-per-node 4 -m threelc.launch.examples.train_text --hook threelc --steps 300 --run-dir runs/text

The corpus is the ``.py`` files at the top of the standard library's directory (the folder of
the ``os`` module), sorted by name, read at run time and cut at ``--corpus-chars`` bytes; the last
10% is the validation split.  Characters are bytes (a 256-symbol vocabulary), so any text works.
Validation loss (nats per byte) is reported every ``--eval-every`` steps.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .trainer import main as train_main

__all__ = ["CharTransformer", "TextTask", "load_stdlib_corpus", "main"]

VOCAB = 256


def load_stdlib_corpus(max_chars: int = 1_000_000) -> bytes:
    """The standard library's top-level ``.py`` files, concatenated in name order, cut at ``max_chars``."""
    directory = Path(os.__file__).parent
    chunks, size = [], 0
    for path in sorted(directory.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_chars:
            break
    return b"".join(chunks)[:max_chars]


class CharTransformer(nn.Module):
    """Byte embedding + learned positions -> pre-norm causal transformer encoder -> byte logits."""

    def __init__(self, *, d_model: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, d_model)
        self.position = nn.Parameter(torch.zeros(context, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                           batch_first=True, norm_first=True)
        # enable_nested_tensor only matters for padding masks, which a causal LM does not use.
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens):
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.head(self.norm(hidden))


#: The optimizers the example offers, and each one's default learning rate.  "threelc-adamw" is
#: threelc.optim.AdamW, which the trainer pairs with the threelc hook (--freeze-step, --refresh).
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.15, "threelc-adamw": 1e-3}
OPTIMIZERS = tuple(DEFAULT_LR)


class TextTask:
    """Next-byte prediction on the standard-library corpus for :mod:`threelc.launch.examples.trainer`."""

    name = "char-transformer"
    eval_metric = "val_loss"

    def __init__(self, *, d_model=128, layers=2, heads=4, context=64, corpus_chars=1_000_000,
                 batch_size=32, lr=None, seed=0, val_batches=8, optimizer="adamw", adam_options=None):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        self.optimizer = optimizer
        self.adam_options = dict(adam_options or {})  # threelc.optim.AdamW's freeze_step, refresh, compress, ...
        self.model_options = {"d_model": d_model, "layers": layers, "heads": heads, "context": context}
        self.context = context
        self.batch_size = batch_size
        self.lr = DEFAULT_LR[optimizer] if lr is None else lr
        self.seed = seed
        self.val_batches = val_batches
        corpus = load_stdlib_corpus(corpus_chars)
        self.corpus_sha256 = hashlib.sha256(corpus).hexdigest()
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        split = int(0.9 * len(data))
        self.train_data, self.val_data = data[:split], data[split:]
        if len(self.val_data) <= context + 1:
            raise ValueError(f"corpus of {len(data)} bytes is too small for context {context}")
        # A fixed validation set: the same windows every evaluation, so curves are comparable.
        windows = val_batches * batch_size
        generator = torch.Generator().manual_seed(12345)
        self.val_starts = torch.randint(0, len(self.val_data) - context - 1, (windows,), generator=generator)

    @staticmethod
    def _windows(data, starts, context):
        offsets = torch.arange(context + 1)
        chunk = data[starts[:, None] + offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def build_model(self):
        return CharTransformer(**self.model_options)

    def build_optimizer(self, parameters):
        if self.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=self.lr, momentum=0.9)
        if self.optimizer == "threelc-adamw":
            from threelc.optim import AdamW

            return AdamW(parameters, lr=self.lr, weight_decay=0.0, **self.adam_options)
        return torch.optim.AdamW(parameters, lr=self.lr, weight_decay=0.0)

    def batches(self, rank, world_size):
        # Ranks draw different random windows: one seed per (seed, rank).
        generator = torch.Generator().manual_seed(self.seed * 1000 + rank)
        high = len(self.train_data) - self.context - 1
        while True:
            starts = torch.randint(0, high, (self.batch_size,), generator=generator)
            yield self._windows(self.train_data, starts, self.context)

    def loss(self, model, inputs, targets):
        logits = model(inputs)
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def evaluate(self, model):
        total = 0.0
        for chunk in self.val_starts.split(self.batch_size):
            inputs, targets = self._windows(self.val_data, chunk, self.context)
            total += float(self.loss(model, inputs, targets)) * len(chunk)
        return {"val_loss": total / len(self.val_starts)}

    def describe(self):
        return {"model": "CharTransformer", **self.model_options,
                "parameters": sum(p.numel() for p in CharTransformer(**self.model_options).parameters()),
                "train_bytes": len(self.train_data), "val_bytes": len(self.val_data),
                "corpus": "stdlib top-level *.py, sorted", "corpus_sha256": self.corpus_sha256,
                "optimizer": self.optimizer, "lr": self.lr, **self.adam_options}


def _add_arguments(group):
    group.add_argument("--d-model", type=int, default=128, help="embedding width (default: %(default)s)")
    group.add_argument("--layers", type=int, default=2, help="transformer layers (default: %(default)s)")
    group.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    group.add_argument("--context", type=int, default=64, help="context length in bytes (default: %(default)s)")
    group.add_argument("--corpus-chars", type=int, default=1_000_000, help="corpus size in bytes (default: %(default)s)")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                       help="adamw (lr 1e-3), sgd with momentum 0.9 (lr 0.15), or threelc-adamw (threelc.optim.AdamW, "
                            "lr 1e-3, paired with --hook threelc): 3LC's accuracy gap on this model depends on it, see "
                            "docs/LAUNCH.md (default: %(default)s)")
    group.add_argument("--freeze-step", type=int, default=None,
                       help="threelc-adamw: full-precision steps before v freezes (default: the optimizer's)")
    group.add_argument("--refresh", choices=("doubling", "none"), default=None,
                       help="threelc-adamw: full-precision refreshes of v at freeze_step * 2**k (default: the optimizer's)")
    group.add_argument("--adam-compress", choices=("gradient", "momentum", "preconditioned", "update"), default=None,
                       help="threelc-adamw: what the hook compresses after the freeze (default: the optimizer's)")
    group.add_argument("--embedding-scale", choices=("row", "block"), default=None,
                       help="threelc-adamw: one 3LC scale per embedding row, or the hook's blocks (default: the optimizer's)")
    group.add_argument("--transpose-conv1d", action=argparse.BooleanOptionalAction, default=None,
                       help="threelc-adamw: compress Hugging Face Conv1D weight gradients transposed (default: the "
                            "optimizer's)")
    group.add_argument("--floor-variance", nargs="?", const=True, default=None, type=_floor_variance,
                       metavar="transient|carry",
                       help="threelc-adamw: on compressed steps no coordinate steps more than lr: alone, by raising "
                            "the stored v; 'transient': by capping each step, v untouched; 'carry': by capping each "
                            "step and carrying the excess to the next ones (default: the optimizer's)")
    group.add_argument("--block-sizes", nargs="+", type=_block_size, default=None, metavar="PATTERN=VALUES",
                       help="threelc-adamw: values per 3LC scale for the parameters whose names match PATTERN "
                            "(fnmatch, e.g. '*.c_attn.weight=256'); the hook's block size elsewhere")


def _floor_variance(text: str) -> str:
    """The value of ``--floor-variance MODE`` ("transient" or "carry"; the flag alone is True)."""
    if text not in ("transient", "carry"):
        raise argparse.ArgumentTypeError(f"expected 'transient' or 'carry' (or the flag alone), got {text!r}")
    return text


def _block_size(text: str) -> tuple:
    """``PATTERN=VALUES`` of --block-sizes as ``(pattern, values)``."""
    pattern, _, values = text.rpartition("=")
    if not pattern or not values.isdigit():
        raise argparse.ArgumentTypeError(f"expected PATTERN=VALUES (e.g. '*.c_attn.weight=256'), got {text!r}")
    return pattern, int(values)


def adam_options(args) -> dict:
    """threelc.optim.AdamW's keyword arguments that were given on the command line."""
    given = {"freeze_step": args.freeze_step, "refresh": args.refresh, "compress": args.adam_compress,
             "embedding_scale": args.embedding_scale, "transpose_conv1d": args.transpose_conv1d,
             "floor_variance": args.floor_variance,
             "block_sizes": dict(args.block_sizes) if args.block_sizes else None}
    return {key: value for key, value in given.items() if value is not None}


def _build(args, task_class=None):
    return (task_class or TextTask)(d_model=args.d_model, layers=args.layers, heads=args.heads, context=args.context,
                    corpus_chars=args.corpus_chars, batch_size=args.batch_size,
                    lr=args.lr, seed=args.seed, optimizer=args.optimizer, adam_options=adam_options(args))


def main(argv=None) -> int:
    """Entry point (``python -m threelc.launch.examples.train_text``)."""
    return train_main(argv, description=__doc__.splitlines()[0], add_task_arguments=_add_arguments, build_task=_build)


if __name__ == "__main__":
    sys.exit(main())
