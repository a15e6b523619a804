"""Multi-dataset training for detectron2: batches round-robin (or by ratios) over datasets,
each dataset annotating only some tasks (paper 000's loop; the schedule is
:class:`mtl_plugins.core.sampling.MultiDatasetSchedule`, shared with the mmseg sampler).

``MTL.MULTI_DATASET.ENABLED: True`` makes :class:`~mtl_plugins.d2.trainer.MTLDefaultTrainer`
build its train loader with :func:`build_multi_dataset_train_loader`:

- every dataset dict gets ``"mtl_tasks"``: the tasks of its dataset
  (``MTL.MULTI_DATASET.DATASET_TASKS: ["coco_boxes_only:detection", ...]``; unlisted = all
  ``MTL.TASKS``); the default mapper keeps the key, and the MTL trainer never allocates a task
  an image lacks, so e.g. a boxes-only dataset gives no mask loss;
- :class:`MultiDatasetTrainingSampler` yields whole per-rank batches from one dataset at a
  time, round-robin or by ``MTL.MULTI_DATASET.RATIOS``, sharded across ranks (all ranks draw
  batch ``b`` from the same dataset). With ``DATALOADER.ASPECT_RATIO_GROUPING`` the grouping
  may mix two datasets' images in one batch; the per-image task masks keep that correct.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from torch.utils.data import Sampler

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


class MultiDatasetTrainingSampler(Sampler):
    """Infinite sample indices, ``batch_size`` at a time from one dataset (this rank's share)."""

    def __init__(self, sizes: Sequence[int], batch_size: int,
                 ratios: Optional[Sequence[int]] = None, shuffle: bool = True,
                 seed: Optional[int] = None) -> None:
        from detectron2.utils import comm

        if seed is None:
            seed = comm.shared_random_seed()
        self.schedule = MultiDatasetSchedule(sizes, batch_size, ratios=ratios or None,
                                             shuffle=shuffle, seed=int(seed),
                                             rank=comm.get_rank(),
                                             world_size=comm.get_world_size())

    def __iter__(self) -> Iterator[int]:
        for batch in self.schedule:
            yield from batch


def build_multi_dataset_train_loader(cfg, mapper=None):
    """detectron2's train loader over ``DATASETS.TRAIN`` with the multi-dataset sampler."""
    from detectron2.data import DatasetMapper, build_detection_train_loader
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
    sampler = MultiDatasetTrainingSampler(sizes, cfg.SOLVER.IMS_PER_BATCH // world,
                                          ratios=ratios, seed=cfg.SEED if cfg.SEED >= 0 else None)
    return build_detection_train_loader(
        dataset=dicts, mapper=mapper or DatasetMapper(cfg, True), sampler=sampler,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS)
