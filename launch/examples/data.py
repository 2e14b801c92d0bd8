"""Seeded, sharded batch streams shared by the examples."""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["sharded_batches"]


def sharded_batches(num_examples: int, batch_size: int, rank: int, world_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless index batches: each epoch a seeded permutation, split evenly across ranks.

    Every rank draws the same permutation (same seed and epoch) and takes every
    ``world_size``-th index from position ``rank``, so ranks see disjoint data, as
    ``DistributedSampler`` does, without needing a Dataset.
    """
    if num_examples < world_size * batch_size:
        raise ValueError(f"{num_examples} examples cannot fill a batch of {batch_size} on each of {world_size} ranks")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_examples, generator=generator)
        shard = order[rank::world_size]
        for start in range(0, len(shard) - batch_size + 1, batch_size):
            yield shard[start:start + batch_size]
