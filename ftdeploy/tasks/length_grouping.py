"""A training order that groups texts of similar length (as Hugging Face Trainer's ``group_by_length``):
seeded per epoch, so a resumed run and every process of a distributed one see the same batches."""

from __future__ import annotations

import torch

GROUP_BATCHES = 50  # batches per sorted group: long enough to group by length, short enough to stay random


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in a random order per epoch (seed + epoch) in which every run of ``batch_size``
    consecutive indices holds texts of similar length: a random permutation is cut into groups of
    ``GROUP_BATCHES`` batches, each group sorted by length and cut into batches, and the batches
    shuffled.

    >>> s = LengthGroupedSampler([5, 1, 9, 2, 8, 3], batch_size=2, seed=0)
    >>> sorted(list(s)) == list(range(6)) and all(abs([5, 1, 9, 2, 8, 3][a] - [5, 1, 9, 2, 8, 3][b]) <= 3
    ...     for a, b in zip(list(s)[::2], list(s)[1::2]))
    True
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * GROUP_BATCHES
        groups = [sorted(order[i:i + size], key=lambda j: -self.lengths[j]) for i in range(0, len(order), size)]
        batches = [g[i:i + self.batch_size] for g in groups for i in range(0, len(g), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]
