"""Task allocation: Full Task (FT), STA and ISTA (Li, Guo, Li, Zhang & Zuo, paper 001, Alg. 1
and 2).

An allocator decides, for every step, which sample trains which task: a boolean mask of shape
``[batch, T]``. The framework adapters turn that mask into per-task losses over the allocated
samples only (:func:`masked_task_mean` and :func:`pooled_task_mean`).

- **FT**: every sample trains every task it is annotated for (one step per batch).
- **STA** (stochastic task allocation, Alg. 1): every sample trains a uniformly random subset
  of size ``k`` of its annotated tasks (one step per batch). The paper uses ``k = 1``.
- **ISTA** (interleaved STA, Alg. 2): the same batch is reused for ``ceil(T_i / k)``
  sub-steps, each allocating ``k`` tasks not yet used by that sample, until every
  (sample, task) pair was trained exactly once; every sub-step is followed by a real
  optimizer step (the adapters' job). Drawing the sub-step allocations one after the other
  from the remaining tasks is the same distribution as cutting one uniformly random
  permutation of each sample's tasks into chunks of ``k``, which is what :meth:`plan` does.

Samples never get a task they are not annotated for (``available`` mask; partial labels and
multi-dataset batches). A sample with fewer than ``k`` tasks gets all of them; under ISTA a
sample with fewer tasks than another simply has nothing allocated in the last sub-steps.

**Random streams.** The plan of the b-th batch is drawn from a generator seeded with
``(seed, rank, b)`` (:func:`stream_seed`): every DDP rank draws its own, independent
allocation (paper 001 draws per sample), and the state is the batch counter ``b``, which is
the same on every rank. A checkpoint written by rank 0 therefore resumes every rank on its
own stream: N batches + resume + N batches draw exactly the plans of 2N uninterrupted
batches, on every rank (a saved generator state would put rank 0's stream on all ranks).

State (seed, batch counter, the ISTA plan and position inside the current batch) goes
through :meth:`state_dict` / :meth:`load_state_dict`. The plan of an interrupted ISTA batch
is kept for :attr:`batch_done`; the adapters drop it on resume (the data loader cannot
replay the batch), so a checkpoint taken between batches is the one that resumes exactly.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch

from .tasks import MTLConfigError, check_task_names

MODES = ("ft", "sta", "ista")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of SplitMix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, rank: int, index: int) -> int:
    """The generator seed of batch ``index`` on ``rank``: the three integers mixed by
    SplitMix64, so that neighbouring seeds, ranks and batches give unrelated streams."""
    x = 0
    for part in (seed, rank, index):
        x = _splitmix64(x ^ (part & _MASK64))
    return x >> 1  # torch.Generator.manual_seed takes a non-negative int64


class TaskAllocator:
    """Draws per-step ``[batch, T]`` allocation masks for FT, STA or ISTA.

    Args:
        task_names: the T task names, in the column order of every mask.
        mode: ``"ft"``, ``"sta"`` or ``"ista"``.
        k: tasks per sample per step (paper 001: 1). Ignored for FT.
        seed: base seed of the allocation streams (the same on every rank).
        rank: this process's DDP rank: each rank draws its own stream (not saved: a
            checkpoint resumes every rank on its own stream).

    Usage per data batch::

        n = allocator.start_batch(available)       # available: [B, T] bool, or batch size
        for _ in range(n):                           # ISTA: n = ceil(T/k); FT/STA: 1
            mask = allocator.next_mask()            # [B, T] bool
            ... forward, losses over mask, backward, optimizer step ...
    """

    def __init__(self, task_names: Sequence[str], mode: str = "ft", k: int = 1,
                 seed: int = 0, rank: int = 0) -> None:
        self.task_names = check_task_names(task_names)
        if mode not in MODES:
            raise MTLConfigError(f"allocation.mode={mode!r}: expected one of {list(MODES)}")
        if not isinstance(k, int) or not 1 <= k <= len(self.task_names):
            raise MTLConfigError(
                f"allocation.k={k!r}: expected an integer in [1, {len(self.task_names)}] "
                f"(the number of tasks)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MTLConfigError(f"allocation.seed={seed!r}: expected an integer")
        self.mode = mode
        self.k = k
        self.seed = seed
        self.rank = int(rank)
        self.batches = 0  # plans drawn so far: the position in every rank's stream
        self.generator = torch.Generator()
        self._plan: Optional[torch.Tensor] = None  # [S, B, T] bool
        self._position = 0

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def _as_available(self, available: torch.Tensor | int) -> torch.Tensor:
        if isinstance(available, int):
            if available < 1:
                raise ValueError(f"available={available}: expected a batch size >= 1")
            return torch.ones(available, self.num_tasks, dtype=torch.bool)
        if available.dim() != 2 or available.shape[1] != self.num_tasks:
            raise ValueError(
                f"available: expected a [batch, {self.num_tasks}] mask over tasks "
                f"{list(self.task_names)}, got shape {tuple(available.shape)}")
        return available.to(device="cpu", dtype=torch.bool)

    def plan(self, available: torch.Tensor | int) -> torch.Tensor:
        """All sub-step masks for one batch: ``[S, B, T]`` bool (S = 1 for FT and STA).

        Each sample's annotated tasks are put in a uniformly random order (its own
        permutation); sub-step s allocates the chunk ``[s*k, (s+1)*k)`` of that order. The
        order is drawn from :attr:`generator` as it stands (:meth:`start_batch` seeds it).
        """
        avail = self._as_available(available)
        if self.mode == "ft":
            return avail.unsqueeze(0).clone()
        b, t = avail.shape
        # random order of the available tasks per sample: sort random keys, unavailable last
        keys = torch.rand(b, t, generator=self.generator)
        keys[~avail] = 2.0
        order = keys.argsort(dim=1)  # [B, T] task indices, available ones first
        rank = order.argsort(dim=1)  # rank[i, task] = position of task in sample i's order
        chunk = torch.div(rank, self.k, rounding_mode="floor")  # sub-step of each (i, task)
        if self.mode == "sta":
            return ((chunk == 0) & avail).unsqueeze(0)
        steps = max(1, math.ceil(int(avail.sum(1).max()) / self.k))
        return torch.stack([(chunk == s) & avail for s in range(steps)])

    def start_batch(self, available: torch.Tensor | int) -> int:
        """Draw the plan for a new batch and return its number of sub-steps."""
        if self._plan is not None and self._position < self._plan.shape[0]:
            raise RuntimeError(
                f"allocation: start_batch called with {self._plan.shape[0] - self._position} "
                "sub-step(s) of the previous batch left; ISTA must finish a batch first")
        self.generator.manual_seed(stream_seed(self.seed, self.rank, self.batches))
        self.batches += 1
        self._plan = self.plan(available)
        self._position = 0
        return int(self._plan.shape[0])

    def next_mask(self) -> torch.Tensor:
        """The ``[B, T]`` mask of the next sub-step of the current batch."""
        if self._plan is None or self._position >= self._plan.shape[0]:
            raise RuntimeError("allocation: next_mask called without a batch in progress; "
                               "call start_batch(available) first")
        mask = self._plan[self._position]
        self._position += 1
        return mask

    def discard_batch(self) -> None:
        """Drop the remaining sub-steps of the current batch (its data cannot be replayed)."""
        self._plan = None

    @property
    def batch_done(self) -> bool:
        """True when every sub-step of the current batch was handed out (or none started)."""
        return self._plan is None or self._position >= self._plan.shape[0]

    def state_dict(self) -> Dict[str, Any]:
        return {"mode": self.mode, "k": self.k, "seed": self.seed, "batches": self.batches,
                "plan": None if self._plan is None else self._plan.clone(),
                "position": self._position}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "batches" not in state:
            raise MTLConfigError(
                "allocation: the checkpoint's allocator state has no batch counter "
                f"(keys {sorted(state)}): it was written by an older mtl_plugins whose single "
                "saved generator put rank 0's stream on every rank; start from its weights "
                "(load_from) instead of resuming")
        for key in ("mode", "k"):
            if state[key] != getattr(self, key):
                raise MTLConfigError(
                    f"allocation.{key}: checkpoint has {state[key]!r}, config has "
                    f"{getattr(self, key)!r}; resume with the configuration that was saved")
        self.seed = int(state["seed"])  # the run's streams go on, whatever the config says
        self.batches = int(state["batches"])
        self._plan = state["plan"]
        self._position = int(state["position"])


REDUCTIONS = ("sum", "mean")


def combine_task_losses(task_losses: Dict[str, torch.Tensor], num_tasks: int,
                        reduction: str = "sum") -> torch.Tensor:
    """The multi-task objective from per-task losses.

    ``"sum"``: ``Σ_t l_t`` (detectron2/mmseg's convention: the loss dict is summed, so
    k = T reproduces FT exactly); ``"mean"``: ``(1/T) Σ_t l_t`` with T the number of tasks
    of the model (paper 001, Alg. 1 line 9), whether or not a task is present this step.
    """
    if reduction not in REDUCTIONS:
        raise MTLConfigError(f"task_reduction={reduction!r}: expected one of {list(REDUCTIONS)}")
    if not task_losses:
        raise ValueError("task_losses is empty: no task produced a loss this step")
    total = torch.stack(list(task_losses.values())).sum()
    return total / num_tasks if reduction == "mean" else total


def masked_task_mean(per_sample: torch.Tensor, sample_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_sample`` ([B]) over the allocated samples (``sample_mask``, [B] bool).

    With no allocated sample the result is ``0 * per_sample.sum()``: zero, finite, and still
    connected to the graph (so DDP sees every parameter used), never NaN.
    """
    if per_sample.shape != sample_mask.shape:
        raise ValueError(f"per_sample {tuple(per_sample.shape)} and sample_mask "
                         f"{tuple(sample_mask.shape)} must have the same shape")
    weights = sample_mask.to(per_sample.dtype)
    count = weights.sum()
    return (per_sample * weights).sum() / count.clamp(min=1.0)


def pooled_task_mean(loss_sum: torch.Tensor, count: torch.Tensor,
                     sample_mask: torch.Tensor) -> torch.Tensor:
    """Element-pooled mean over the allocated samples, for dense losses.

    ``loss_sum[i]`` is the summed loss over sample i's valid pixels, ``count[i]`` their
    number; the result is ``Σ_i m_i loss_sum_i / Σ_i m_i count_i`` — the usual pixel-pooled
    mean restricted to the allocated samples (the same value as setting every pixel of a
    non-allocated sample to the ignore index). Zero with the graph kept when nothing counts.
    """
    weights = sample_mask.to(loss_sum.dtype)
    total = (loss_sum * weights).sum()
    n = (count.to(loss_sum.dtype) * weights).sum()
    return total / n.clamp(min=1.0)
