"""Multi-dataset training for detectron2: batches round-robin (or by ratios) over datasets,
each dataset annotating only some tasks (paper 000's loop; the schedule is
:class:`mtl_plugins.core.sampling.MultiDatasetSchedule`, shared with the mmseg sampler).

``MTL.MULTI_DATASET.ENABLED: True`` makes :class:`~mtl_plugins.d2.trainer.MTLDefaultTrainer`
build its train loader with :func:`build_multi_dataset_train_loader`:

- every dataset dict gets ``"mtl_tasks"``: the tasks of its dataset
  (``MTL.MULTI_DATASET.DATASET_TASKS: ["coco_boxes_only:detection", ...]``; unlisted = all
  ``MTL.TASKS``); the default mapper keeps the key, and the MTL trainer never allocates a task
  an image lacks, so e.g. a boxes-only dataset gives no mask loss;
- :class:`MultiDatasetBatchSampler` yields whole per-rank batches (lists of indices) from one
  dataset at a time, round-robin or by ``MTL.MULTI_DATASET.RATIOS``, sharded across ranks
  (all ranks draw batch ``b`` from the same dataset); with
  ``DATALOADER.ASPECT_RATIO_GROUPING`` it groups the images of each dataset by orientation
  (landscape / portrait) itself, so a batch never mixes datasets;
- the loader's workers load whole batches (:class:`BatchDataset`): detectron2's own loader
  splits the index stream across its ``DATALOADER.NUM_WORKERS`` workers and each worker
  batches its share, which would mix datasets in a batch; here every batch comes from one
  dataset whatever the worker count.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.sampling import MultiDatasetSchedule
from ..core.tasks import MTLConfigError, check_known_tasks


def dataset_tasks(cfg) -> Dict[str, Tuple[str, ...]]:
    """``{dataset name: tasks}`` from ``MTL.MULTI_DATASET.DATASET_TASKS`` (checked)."""
    tasks = tuple(cfg.MTL.TASKS)
    out: Dict[str, Tuple[str, ...]] = {}
    for entry in cfg.MTL.MULTI_DATASET.DATASET_TASKS:
        name, sep, listed = str(entry).partition(":")
        given = tuple(t.strip() for t in listed.split(",") if t.strip())
        if not sep or not name or not given:
            raise MTLConfigError(f"MTL.MULTI_DATASET.DATASET_TASKS entry {entry!r}: expected "
                                 "'dataset_name:task1,task2'")
        if name not in cfg.DATASETS.TRAIN:
            raise MTLConfigError(f"MTL.MULTI_DATASET.DATASET_TASKS entry {entry!r}: dataset "
                                 f"{name!r} is not in DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}")
        check_known_tasks(given, tasks, key=f"MTL.MULTI_DATASET.DATASET_TASKS[{name!r}]")
        out[name] = given
    return {name: out.get(name, tasks) for name in cfg.DATASETS.TRAIN}


def multi_dataset_dicts(names: Sequence[str], tasks: Dict[str, Tuple[str, ...]]
                        ) -> Tuple[List[dict], List[int]]:
    """The concatenated dataset dicts (each tagged with ``mtl_tasks``) and each dataset's size."""
    from detectron2.data import DatasetCatalog

    dicts: List[dict] = []
    sizes: List[int] = []
    for name in names:
        part = DatasetCatalog.get(name)
        if not part:
            raise MTLConfigError(f"DATASETS.TRAIN: dataset {name!r} is empty")
        for d in part:
            d["mtl_tasks"] = tasks[name]
        dicts.extend(part)
        sizes.append(len(part))
    return dicts, sizes


class MultiDatasetBatchSampler(Sampler):
    """Infinite per-rank batches of global indices, each from one dataset.

    Args:
        sizes: the datasets' sizes (in ``DATASETS.TRAIN`` order).
        batch_size: images per rank and batch.
        ratios: batches of each dataset per period (``None``: round-robin).
        shuffle: shuffle each dataset's epochs.
        seed: the schedule's seed (the same on every rank; default: a shared random seed).
        landscape: with aspect-ratio grouping, ``[bool]`` per global index (width > height);
            ``None``: no grouping.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int,
                 ratios: Optional[Sequence[int]] = None, shuffle: bool = True,
                 seed: Optional[int] = None, landscape: Optional[Sequence[bool]] = None) -> None:
        from detectron2.utils import comm

        if seed is None:
            seed = comm.shared_random_seed()
        shard = dict(shuffle=shuffle, rank=comm.get_rank(), world_size=comm.get_world_size())
        self.schedule = MultiDatasetSchedule(sizes, batch_size, ratios=ratios or None,
                                             seed=int(seed), **shard)
        self.batch_size = batch_size
        self.landscape = None if landscape is None else list(landscape)
        # with grouping: each dataset's own stream of single images (this rank's shard),
        # and its two orientation buckets
        self._streams = [MultiDatasetSchedule([n], 1, seed=int(seed) + d, **shard)
                         for d, n in enumerate(sizes)] if landscape is not None else []
        self._buckets: List[Tuple[List[int], List[int]]] = [([], []) for _ in sizes]

    def _grouped_batch(self, d: int) -> List[int]:
        """The next batch of dataset ``d`` whose images all have the same orientation."""
        buckets = self._buckets[d]
        while True:
            index = self.schedule.offsets[d] + self._streams[d].next_batch()[0]
            bucket = buckets[0 if self.landscape[index] else 1]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                bucket.clear()
                return batch

    def __iter__(self) -> Iterator[List[int]]:
        if self.landscape is None:
            yield from self.schedule
            return
        b = 0
        while True:
            yield self._grouped_batch(self.schedule.dataset_of_batch(b))
            b += 1


class BatchDataset(Dataset):
    """``dataset[indices]``: the list of ``dataset[i]`` (a data-loader worker loads a whole
    batch)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Sequence[int]) -> List:
        return [self.dataset[i] for i in indices]


def _as_is(batch: List) -> List:
    """The data loader's ``collate_fn``: the batch list unchanged."""
    return batch


def build_multi_dataset_train_loader(cfg, mapper=None):
    """The train loader over ``DATASETS.TRAIN``: batches of :class:`MultiDatasetBatchSampler`,
    each loaded whole by one of ``DATALOADER.NUM_WORKERS`` workers (in order, round-robin over
    the workers) or in the main process (0 workers)."""
    from detectron2.data import DatasetMapper
    from detectron2.data.build import worker_init_reset_seed
    from detectron2.data.common import DatasetFromList, MapDataset, ToIterableDataset
    from detectron2.utils import comm

    names = list(cfg.DATASETS.TRAIN)
    ratios = list(cfg.MTL.MULTI_DATASET.RATIOS)
    if ratios and len(ratios) != len(names):
        raise MTLConfigError(f"MTL.MULTI_DATASET.RATIOS={ratios}: expected one positive int per "
                             f"DATASETS.TRAIN entry {names}")
    dicts, sizes = multi_dataset_dicts(names, dataset_tasks(cfg))
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise MTLConfigError(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH}: expected a "
                             f"multiple of the {world} ranks")
    landscape = [d["width"] > d["height"] for d in dicts] \
        if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
    sampler = MultiDatasetBatchSampler(sizes, cfg.SOLVER.IMS_PER_BATCH // world, ratios=ratios,
                                       seed=cfg.SEED if cfg.SEED >= 0 else None,
                                       landscape=landscape)
    dataset = BatchDataset(MapDataset(DatasetFromList(dicts, copy=False),
                                      mapper or DatasetMapper(cfg, True)))
    return DataLoader(ToIterableDataset(dataset, sampler), batch_size=None,
                      num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=_as_is,
                      worker_init_fn=worker_init_reset_seed)
