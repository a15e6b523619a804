"""Training loops that apply FT / STA / ISTA task allocation (paper 001) in MMEngine.

``train_cfg=dict(type='MTLIterBasedTrainLoop', max_iters=..., val_interval=...)`` (or
``MTLEpochBasedTrainLoop``) draws, for every data batch, the allocation plan of the
controller held by ``MTLOptimWrapper`` (``optim_wrapper.mtl.allocation``) and runs one
*iteration* per sub-step: FT and STA one, ISTA ``ceil(T/k)`` on the same batch (same
augmented tensors), each a full ``train_step`` with its own optimizer step, hooks and
logging. Iterations therefore count optimizer steps (the notes' recommendation for paper
001's equal-step comparisons), and ``max_iters``, LR schedules and checkpoint intervals are in
optimizer steps.

The allocation of a sub-step reaches the model through each sample's metainfo
``mtl_alloc`` (tuple of task names); a sample's annotated tasks come from ``mtl_tasks``.
On resume, a batch whose ISTA sub-steps were interrupted by the checkpoint cannot be
replayed (the data loader does not checkpoint batches): its remaining sub-steps are dropped
and the next batch starts a fresh plan. MMEngine's iteration loop skips ``iter`` batches of
the data stream on resume; with ISTA an iteration is a sub-step, so
``MTLIterBasedTrainLoop`` skips the batches the run had drawn (the allocator's batch counter,
in the checkpoint) instead: a run resumed at a batch boundary sees the data of an
uninterrupted one.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
from mmseg.registry import LOOPS

from ..core.controller import MTLController
from .fields import ALLOC_KEY, TASKS_KEY


def _controller(runner) -> MTLController:
    ctl = getattr(runner.optim_wrapper, "controller", None)
    if ctl is None:
        from ..core.tasks import MTLConfigError

        raise MTLConfigError(
            "train_cfg type MTL*TrainLoop needs optim_wrapper=dict(type='MTLOptimWrapper', "
            f"mtl=dict(...)); got {type(runner.optim_wrapper).__name__}")
    return ctl


def available_tasks(data_samples: Sequence, tasks: Sequence[str]) -> torch.Tensor:
    """``[B, T]`` bool: which sample is annotated for which task (metainfo ``mtl_tasks``)."""
    return torch.tensor([[t in ds.metainfo.get(TASKS_KEY, tasks) for t in tasks]
                         for ds in data_samples], dtype=torch.bool)


def set_allocation(data_samples: Sequence, mask: torch.Tensor, tasks: Sequence[str]) -> None:
    for ds, row in zip(data_samples, mask.tolist()):
        ds.set_metainfo({ALLOC_KEY: tuple(t for t, on in zip(tasks, row) if on)})


class _AllocationMixin:
    """Runs one train iteration per allocation sub-step of a data batch."""

    def _sub_steps(self, data_batch: dict) -> int:
        """Start the batch's plan; its sub-steps on every rank: the most any rank's plan has
        (ISTA's ``ceil(T_i / k)`` follows the tasks the rank's samples are annotated for, and
        every rank must make as many iterations, or DDP hangs). A rank past its own plan
        trains the extra sub-steps with nothing allocated (the segmentor's empty-rank path)."""
        ctl = _controller(self.runner)
        if not ctl.allocator.batch_done:
            print_log("ISTA: dropping the remaining sub-steps of a batch interrupted by a "
                      "checkpoint (the batch itself cannot be restored)", logger="current")
            ctl.allocator.discard_batch()
        available = available_tasks(data_batch["data_samples"], ctl.task_names)
        own = ctl.start_batch(available)
        if get_world_size() == 1:
            return own
        steps = torch.tensor(own)
        all_reduce(steps, op="max")
        return int(steps)

    def _allocate_next(self, data_batch: dict) -> None:
        ctl = _controller(self.runner)
        samples = data_batch["data_samples"]
        if ctl.allocator.batch_done:  # this rank's plan is shorter than another rank's
            mask = torch.zeros(len(samples), len(ctl.task_names), dtype=torch.bool)
        else:
            mask = ctl.next_mask()
        set_allocation(samples, mask, ctl.task_names)


class _ResumeAdvance:
    """The loader iterator during MMEngine's resume advance, which calls ``next`` once per
    trained *iteration*: only the first ``batches`` calls draw a batch (the ones the run had
    drawn; ISTA trains several iterations per batch); afterwards a plain pass-through."""

    def __init__(self, inner: Iterator, advance_calls: int, batches: int) -> None:
        self.inner, self.calls, self.batches = inner, advance_calls, batches

    def __iter__(self) -> "_ResumeAdvance":
        return self

    def __next__(self):
        if self.calls > 0:
            self.calls -= 1
            if self.batches <= 0:
                return None  # an ISTA sub-step of an already skipped batch
            self.batches -= 1
        return next(self.inner)


@LOOPS.register_module()
class MTLIterBasedTrainLoop(_AllocationMixin, IterBasedTrainLoop):
    """``IterBasedTrainLoop`` with per-batch task allocation (see the module docstring)."""

    def run(self):
        if self._iter > 0:  # resumed: skip the batches drawn, not the iterations trained
            batches = _controller(self.runner).allocator.batches
            self.dataloader_iterator = _ResumeAdvance(self.dataloader_iterator, self._iter,
                                                      batches)
        return super().run()

    def run_iter(self, data_batch: dict) -> None:
        steps = self._sub_steps(data_batch)
        for s in range(steps):
            self._allocate_next(data_batch)
            super().run_iter(data_batch)
            last = s == steps - 1 or self._iter >= self._max_iters or self.stop_training
            if not last:
                self._maybe_validate()
            if self._iter >= self._max_iters or self.stop_training:
                _controller(self.runner).allocator.discard_batch()
                break

    def _maybe_validate(self) -> None:
        """Upstream's validation check, also between sub-steps of one batch."""
        self._decide_current_val_interval()
        if (self.runner.val_loop is not None and self._iter >= self.val_begin
                and self._iter % self.val_interval == 0):
            self.runner.val_loop.run()
            self.runner.model.train()


@LOOPS.register_module()
class MTLEpochBasedTrainLoop(_AllocationMixin, EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` with per-batch task allocation (see the module docstring)."""

    def run_iter(self, idx: int, data_batch: dict) -> None:
        for _ in range(self._sub_steps(data_batch)):
            self._allocate_next(data_batch)
            super().run_iter(idx, data_batch)
