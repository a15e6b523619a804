"""``MultiDatasetSampler``: batches drawn round-robin (or by ratios) from concatenated datasets.

MMEngine glue for :class:`mtl_plugins.core.sampling.MultiDatasetSchedule` (paper 000's
multi-dataset training, where each dataset annotates only some tasks)::

    train_dataloader = dict(
        batch_size=8,
        sampler=dict(type='MultiDatasetSampler', batch_size=8, ratios=None),  # None: round-robin
        dataset=dict(type='ConcatDataset', ignore_keys=['mtl_tasks', 'classes', 'palette'],
                     datasets=[dict(type='NYUv2MultiTaskDataset', tasks=['seg', 'depth'], ...),
                               dict(type='CityscapesMultiTaskDataset', tasks=['seg'], ...)]))

The sampler yields the indices of whole batches from one dataset at a time, so its
``batch_size`` must equal the dataloader's. It is infinite (use it with an iteration-based
loop, like mmengine's ``InfiniteSampler``), shards by rank, and every rank draws its batch
``b`` from the same dataset. Each sample carries its dataset's tasks (``mtl_tasks``), so the
segmentor trains each batch on the tasks it has.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

from mmengine.dataset import ConcatDataset
from mmengine.dist import get_dist_info, sync_random_seed
from mmseg.registry import DATA_SAMPLERS
from torch.utils.data import Sampler

from ..core.sampling import MultiDatasetSchedule
from ..core.tasks import MTLConfigError


@DATA_SAMPLERS.register_module()
class MultiDatasetSampler(Sampler):
    """See the module docstring.

    Args:
        dataset: an mmengine ``ConcatDataset`` (``cumulative_sizes`` gives the datasets).
        batch_size: the dataloader's batch size.
        ratios: batches of each dataset per period (positive ints), ``None`` = round-robin.
        shuffle: shuffle each dataset's epochs.
        seed: shared by every rank (default: a synchronised random seed).
    """

    def __init__(self, dataset: ConcatDataset, batch_size: int,
                 ratios: Optional[Sequence[int]] = None, shuffle: bool = True,
                 seed: Optional[int] = None) -> None:
        cumulative = getattr(dataset, "cumulative_sizes", None)
        if cumulative is None:
            raise MTLConfigError(
                f"MultiDatasetSampler: dataset is a {type(dataset).__name__}; expected "
                "dict(type='ConcatDataset', datasets=[...]) with one entry per dataset")
        sizes = [b - a for a, b in zip([0] + list(cumulative[:-1]), cumulative)]
        rank, world = get_dist_info()
        self.schedule = MultiDatasetSchedule(
            sizes, batch_size, ratios=ratios, shuffle=shuffle,
            seed=sync_random_seed() if seed is None else seed, rank=rank, world_size=world)
        self._size = sum(sizes) // world

    def __iter__(self) -> Iterator[int]:
        for batch in self.schedule:
            yield from batch

    def __len__(self) -> int:
        return self._size

    def set_epoch(self, epoch: int) -> None:
        """Epochs are per dataset inside the schedule; nothing to do."""
