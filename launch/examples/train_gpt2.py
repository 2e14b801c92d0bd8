"""Example: a tiny GPT-2 (Hugging Face transformers, built from a GPT2Config, no download) on
Python's own source, under torchrun.

::

    torchrun --nproc-per-node 4 -m threelc.launch.examples.train_gpt2 --hook threelc --optimizer threelc-adamw \
        --steps 1000 --run-dir runs/gpt2

The task is :mod:`threelc.launch.examples.train_text`'s (next-byte prediction on the standard library's
top-level ``.py`` files, a 256-symbol byte vocabulary, the same validation windows); only the
model differs: GPT-2 blocks (Conv1D projections, GELU, tied input and output embeddings) from a
``transformers.GPT2Config`` with random weights.  Needs ``transformers`` (imported on use).
"""

from __future__ import annotations

import sys

from torch import nn

from .train_text import VOCAB, TextTask, _add_arguments as _add_text_arguments, _build as _build_text
from .trainer import main as train_main

__all__ = ["TinyGPT2", "GPT2Task", "main"]


class TinyGPT2(nn.Module):
    """``GPT2LMHeadModel`` over bytes, returning logits only (what the task's loss needs)."""

    def __init__(self, *, d_model: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=VOCAB, n_positions=context, n_embd=d_model, n_layer=layers, n_head=heads,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(config)

    def forward(self, tokens):
        return self.model(input_ids=tokens).logits


class GPT2Task(TextTask):
    """train_text's task with :class:`TinyGPT2` as the model."""

    name = "tiny-gpt2"

    def build_model(self):
        return TinyGPT2(**self.model_options)

    def describe(self):
        return {**super().describe(), "model": "TinyGPT2 (transformers GPT2LMHeadModel)",
                "parameters": sum(p.numel() for p in self.build_model().parameters())}


def _build(args):
    return _build_text(args, GPT2Task)


def main(argv=None) -> int:
    """Entry point (``python -m threelc.launch.examples.train_gpt2``)."""
    return train_main(argv, description=__doc__.splitlines()[0], add_task_arguments=_add_text_arguments,
                      build_task=_build)


if __name__ == "__main__":
    sys.exit(main())
