"""Training loops that apply FT / STA / ISTA / gap task allocation (paper 001) in MMEngine.

``train_cfg=dict(type='MTLIterBasedTrainLoop', max_iters=..., val_interval=...)`` (or
``MTLEpochBasedTrainLoop``) asks the allocator of the controller held by ``MTLOptimWrapper``
(``optim_wrapper.mtl.allocation``) before every *iteration* which batch it trains, and each
iteration is one full ``train_step`` with its own optimizer step, hooks and logging: FT and
STA train every loader batch once; ISTA trains each batch for ``ceil(T/k)`` consecutive
iterations (same augmented tensors); ``mode='gap'`` holds ``gap`` batches and replays each
one ``gap`` iterations after its previous visit (paper 001, Table 7; see
:mod:`mtl_plugins.core.allocation`). Iterations therefore count optimizer steps, in every
mode, and ``max_iters``, LR schedules (``by_epoch=False``), validation and checkpoint
intervals are in optimizer steps. The iteration loop stops at ``max_iters`` even inside a
batch's sub-steps (the rest of the held batches is dropped); the epoch loop ends an epoch
only after the held batches' replays (every (sample, task) pair once per epoch).

The allocation of an iteration reaches the model through each sample's metainfo
``mtl_alloc`` (tuple of task names); a sample's annotated tasks come from ``mtl_tasks``.
On resume, held batches (an ISTA batch interrupted by the checkpoint, or gap mode's block)
cannot be replayed (the data loader does not checkpoint batches): their remaining sub-steps
are dropped and the next iteration starts a new batch. MMEngine's iteration loop skips
``iter`` batches of the data stream on resume; with ISTA/gap an iteration is a sub-step, so
``MTLIterBasedTrainLoop`` skips the batches the run had drawn (the allocator's batch counter,
in the checkpoint) instead: a run resumed at a block boundary sees the data of an
uninterrupted one.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop
from mmseg.registry import LOOPS

from ..core.allocation import DROPPED_ON_RESUME, HeldBatches
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
    """Trains the iterations the allocator asks for, one per optimizer step."""

    def _held(self) -> HeldBatches:
        ctl = _controller(self.runner)
        held = getattr(self, "_mtl_held", None)
        if held is None or held.allocator is not ctl.allocator:
            held = self._mtl_held = HeldBatches(ctl.allocator)
        return held

    def _start(self, data_batch: dict) -> None:
        """Hand the loader's batch to the allocator. Its sub-steps are agreed over the
        ranks (the most any rank's plan has: ISTA's ``ceil(T_i / k)`` follows the tasks the
        rank's samples are annotated for, and every rank must make as many iterations, or
        DDP hangs); a rank past its own plan trains the extra sub-steps with nothing
        allocated (the segmentor's empty-rank path)."""
        held = self._held()
        if held.drop_lost():
            print_log(DROPPED_ON_RESUME, logger="current")
        ctl = _controller(self.runner)
        held.add(data_batch, available_tasks(data_batch["data_samples"], ctl.task_names),
                 agree=None if get_world_size() == 1 else _agree_max)

    def _train_due(self, train_one: Callable[[dict], None],
                   stop: Callable[[], bool] = lambda: False) -> None:
        """Train iterations until the allocator wants a new batch (or ``stop()``: the held
        batches are then dropped); validation (iteration loop) between them."""
        held = self._held()
        tasks = _controller(self.runner).task_names
        while not held.allocator.wants_batch:
            data, mask = held.next_step()
            set_allocation(data["data_samples"], mask, tasks)
            train_one(data)
            if stop():
                held.clear()
                return
            if not held.allocator.wants_batch:
                self._between_steps()

    def _between_steps(self) -> None:
        """Called between two iterations of one loader batch's turn."""


def _agree_max(steps: int) -> int:
    count = torch.tensor(steps)
    all_reduce(count, op="max")
    return int(count)


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
        self._start(data_batch)
        self._train_due(super().run_iter,
                        lambda: self._iter >= self._max_iters or self.stop_training)

    def _between_steps(self) -> None:
        """Upstream's validation check, also between iterations of one loader batch."""
        self._decide_current_val_interval()
        if (self.runner.val_loop is not None and self._iter >= self.val_begin
                and self._iter % self.val_interval == 0):
            self.runner.val_loop.run()
            self.runner.model.train()


@LOOPS.register_module()
class MTLEpochBasedTrainLoop(_AllocationMixin, EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` with per-batch task allocation (see the module docstring)."""

    def run_epoch(self) -> None:
        """Upstream's epoch, then the replays of the batches still held (gap mode: the
        last block has fewer than ``gap`` batches), before ``after_train_epoch``."""
        self.runner.call_hook("before_train_epoch")
        self.runner.model.train()
        idx = -1
        for idx, data_batch in enumerate(self.dataloader):
            self.run_iter(idx, data_batch)
        self._held().allocator.close_block()
        self._train_due(lambda data: super(MTLEpochBasedTrainLoop, self).run_iter(idx, data))
        self.runner.call_hook("after_train_epoch")
        self._epoch += 1

    def run_iter(self, idx: int, data_batch: dict) -> None:
        self._start(data_batch)
        self._train_due(lambda data: super(MTLEpochBasedTrainLoop, self).run_iter(idx, data))
