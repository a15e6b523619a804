"""Support of the launch tests, imported by ``tiny_mtl.py``.

``FillVoidPixels``: the synthetic scenes' void pixels (sky: seg 255, depth 0, normal 0) made
valid (class 0, depth 1, normal +z), so every pixel counts in every loss and a mean over a batch
is the mean of its samples: then 2 ranks x b equal 1 process x 2b exactly. (With voids, each
rank's loss is a mean over its own valid pixels and DDP averages the rank means, as upstream
mmseg does: not the pixel mean of the union batch.)

``RankZeroSegOnly``: on rank 0 every sample is annotated for seg only (the others: all tasks),
so ISTA's plans have different lengths on the two ranks.

``RankDumpHook``: every rank writes its own state after training (mmengine checkpoints hold
rank 0's only), so the launch tests can compare ranks: the model's state dict, the MTL
wrapper's state (controller, balancer, aggregator, allocator) and the allocation of the last
step of each sample."""
import os

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS, TRANSFORMS

from mtl_plugins.mmseg.fields import IGNORE_VALUES, RESULTS_KEYS, TASKS_KEY


@TRANSFORMS.register_module()
class FillVoidPixels(BaseTransform):
    VALID = {"seg": 0, "depth": 1.0}

    def transform(self, results: dict) -> dict:
        seg = results[RESULTS_KEYS["seg"]]
        void = seg == IGNORE_VALUES["seg"]
        seg[void] = self.VALID["seg"]
        if RESULTS_KEYS["depth"] in results:
            results[RESULTS_KEYS["depth"]][void] = self.VALID["depth"]
        if RESULTS_KEYS["normal"] in results:
            normal = results[RESULTS_KEYS["normal"]]
            normal[void] = np.asarray([0.0, 0.0, 1.0], dtype=normal.dtype)
        return results


@TRANSFORMS.register_module()
class RankZeroSegOnly(BaseTransform):
    def transform(self, results: dict) -> dict:
        if int(os.environ.get("RANK", "0")) == 0:
            results[TASKS_KEY] = ("seg",)
        return results


@HOOKS.register_module()
class RankDumpHook(Hook):
    priority = "LOWEST"

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.samples = []  # per iteration, the batch's sample indices (the data each rank saw)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self.samples.append([ds.metainfo.get("img_path") for ds in data_batch["data_samples"]])

    def after_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save({"model": model.state_dict(), "optim": runner.optim_wrapper.state_dict(),
                    "iter": runner.iter, "samples": self.samples},
                   os.path.join(self.out_dir, f"rank{get_rank()}.pt"))
