"""Multi-dataset batch scheduling: round-robin (or by ratios) over datasets, one dataset a batch.

Paper 000 (GradSplit, notes B.5) trains one network on several datasets, each annotating
only some tasks, with batches drawn round-robin from the datasets. :class:`MultiDatasetSchedule`
is that logic, once, for every framework adapter (an mmengine sampler in
``mtl_plugins.mmseg.samplers``, a detectron2 training sampler in
``mtl_plugins.d2.multi_dataset``):

- the datasets are concatenated (global index = offset of the dataset + local index);
- batch ``b`` comes from dataset ``d_b``: ``b mod D`` for round-robin, or the smooth
  weighted round-robin order for integer ``ratios`` (e.g. ``[2, 1]``: 0, 1, 0, 0, 1, 0, ...
  — every dataset appears as evenly as its ratio allows, deterministically);
- each dataset has its own infinite stream of shuffled epochs (seeded by ``seed``, the
  dataset and its epoch), sharded across ``world_size`` ranks so that the ranks see disjoint
  samples and the same dataset order (every rank's batch ``b`` comes from the same dataset).

:meth:`state_dict` / :meth:`load_state_dict` keep the position (batches emitted, each
dataset's epoch and offset) so that a resumed run continues the same stream.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from .tasks import MTLConfigError


def weighted_round_robin(ratios: Sequence[int]) -> List[int]:
    """One period of smooth weighted round-robin over ``len(ratios)`` datasets.

    Each step adds every ratio to its dataset's credit and picks the dataset with the most
    credit (first on ties), which then pays the total: the period has ``sum(ratios)``
    entries, dataset d appearing ``ratios[d]`` times, spread as evenly as possible.
    """
    credit = [0] * len(ratios)
    total = sum(ratios)
    order = []
    for _ in range(total):
        credit = [c + r for c, r in zip(credit, ratios)]
        pick = max(range(len(ratios)), key=lambda i: credit[i])
        credit[pick] -= total
        order.append(pick)
    return order


class MultiDatasetSchedule:
    """Infinite stream of batches of global indices, each batch from one dataset.

    Args:
        sizes: number of samples of each dataset (in concatenation order).
        batch_size: samples per batch (per rank).
        ratios: positive integers, batches of each dataset per period; ``None`` is
            round-robin (all ones).
        shuffle: shuffle each dataset's epochs.
        seed: base seed; rank-independent (the order must agree across ranks).
        rank, world_size: this process's shard.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int,
                 ratios: Optional[Sequence[int]] = None, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise MTLConfigError(f"sampler: dataset sizes {self.sizes}: expected one or more "
                                 "non-empty datasets")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MTLConfigError(f"sampler.batch_size={batch_size!r}: expected an int >= 1")
        ratios = [1] * len(self.sizes) if ratios is None else list(ratios)
        if len(ratios) != len(self.sizes) or any(
                not isinstance(r, int) or r < 1 for r in ratios):
            raise MTLConfigError(
                f"sampler.ratios={ratios!r}: expected {len(self.sizes)} positive integers "
                "(batches of each dataset per period), one per dataset")
        small = [i for i, s in enumerate(self.sizes) if s < world_size]
        if small:
            raise MTLConfigError(f"sampler: dataset(s) {small} have fewer samples than the "
                                 f"{world_size} ranks")
        self.batch_size = batch_size
        self.ratios = ratios
        self.period = weighted_round_robin(ratios)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._batches = 0
        self._epoch = [0] * len(self.sizes)
        self._pos = [0] * len(self.sizes)
        self._perm: List[Optional[List[int]]] = [None] * len(self.sizes)

    def _shard(self, d: int) -> List[int]:
        """This rank's share of dataset ``d``'s current epoch (local indices)."""
        if self._perm[d] is None:
            n = self.sizes[d]
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100003 + d * 1009 + self._epoch[d])
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = list(range(n))
            usable = n - n % self.world_size  # every rank the same count
            self._perm[d] = order[self.rank:usable:self.world_size]
        return self._perm[d]

    def _take(self, d: int) -> int:
        shard = self._shard(d)
        if self._pos[d] >= len(shard):
            self._epoch[d] += 1
            self._pos[d] = 0
            self._perm[d] = None
            shard = self._shard(d)
        index = shard[self._pos[d]]
        self._pos[d] += 1
        return self.offsets[d] + index

    def dataset_of_batch(self, b: int) -> int:
        return self.period[b % len(self.period)]

    def next_batch(self) -> List[int]:
        """Global indices of the next batch (all from one dataset)."""
        d = self.dataset_of_batch(self._batches)
        self._batches += 1
        return [self._take(d) for _ in range(self.batch_size)]

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> Dict[str, Any]:
        return {"batches": self._batches, "epoch": list(self._epoch), "pos": list(self._pos),
                "sizes": list(self.sizes), "ratios": list(self.ratios)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["sizes"] != self.sizes or state["ratios"] != self.ratios:
            raise MTLConfigError(
                f"sampler: checkpoint has dataset sizes {state['sizes']} and ratios "
                f"{state['ratios']}, this run {self.sizes} and {self.ratios}")
        self._batches = int(state["batches"])
        self._epoch = list(state["epoch"])
        self._pos = list(state["pos"])
        self._perm = [None] * len(self.sizes)
