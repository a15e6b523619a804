"""MMSegmentation 1.x / MMEngine adapter: registers mtl_plugins' pieces with mmseg.

Add to any mmseg config::

    custom_imports = dict(imports=['mtl_plugins.mmseg'], allow_failed_imports=False)

Registered (all into mmseg's registries, so ``default_scope='mmseg'`` finds them):

- models: ``MultiTaskSegmentor``, ``MultiTaskDataPreProcessor``, heads ``DepthHead``,
  ``NormalHead``, ``EdgeHead``, ``PADNetHead``, ``MTINetHead``; backbone ``SegNet``;
- sampler: ``MultiDatasetSampler`` (round-robin / ratio batches over concatenated datasets);
- optimizer wrapper: ``MTLOptimWrapper``; loops: ``MTLIterBasedTrainLoop``,
  ``MTLEpochBasedTrainLoop``; hook: ``MTLHook``; metric: ``MultiTaskMetric``;
- datasets: ``MultiTaskSegDataset``, ``NYUv2MultiTaskDataset``,
  ``CityscapesMultiTaskDataset``, ``SyntheticScenesDataset``; transforms:
  ``LoadMultiTaskAnnotations``, ``MultiTaskRandomFlip``, ``PackMultiTaskInputs``.

Importing also applies the stack fixes of :mod:`mtl_plugins.compat` (mmengine checkpoints
under torch's ``weights_only`` loading, known warnings).
"""
from ..compat.known_warnings import silence_known_warnings
from ..compat.torch_load import register_safe_globals

silence_known_warnings()
register_safe_globals()

from . import (data_preprocessor, datasets, heads, hooks, loops, metric,  # noqa: E402,F401
               models, optim_wrapper, samplers, segmentor, transforms)
from .optim_wrapper import MTLOptimWrapper  # noqa: E402
from .segmentor import MultiTaskSegmentor, TaskLosses  # noqa: E402

__all__ = ["MTLOptimWrapper", "MultiTaskSegmentor", "TaskLosses"]
