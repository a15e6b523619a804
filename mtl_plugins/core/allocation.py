"""Task allocation: Full Task (FT), STA, ISTA and the STA–ISTA "gap" interpolation (Li, Guo,
Li, Zhang & Zuo, *On Steering Multi-Annotations per Sample for Multi-Task Learning*, paper
001, Alg. 1 and 2, Sec. 4.4 / Table 7).

An allocator decides, for every optimizer step, which sample trains which task: a boolean
mask of shape ``[batch, T]``. The framework adapters turn that mask into per-task losses over
the allocated samples only (:func:`masked_task_mean` and :func:`pooled_task_mean`).

- **FT**: every sample trains every task it is annotated for (one step per batch).
- **STA** (stochastic task allocation, Alg. 1): every sample trains a uniformly random subset
  of size ``k`` of its annotated tasks (one step per batch). The paper uses ``k = 1``.
- **ISTA** (interleaved STA, Alg. 2): the same batch is reused for ``ceil(T_i / k)``
  sub-steps, each allocating ``k`` tasks not yet used by that sample, until every
  (sample, task) pair was trained exactly once; every sub-step is a real optimizer step (the
  adapters' job). Drawing the sub-step allocations one after the other from the remaining
  tasks is the same distribution as cutting one uniformly random permutation of each
  sample's tasks into chunks of ``k``, which is what :meth:`TaskAllocator.plan` does.
- **gap** (paper 001, Sec. 4.4, "Interpolation between STA and ISTA", Table 7): "at step t,
  a batch of examples is trained by the model with task allocations {ST_i}. At step
  t + gap, the same batch of examples is learned again with another allocation {ŜT_i}
  which are randomly chosen. ISTA is a special case where the gap is 1." Our reading: the
  "another allocation ... randomly chosen" is Alg. 2's next draw, a uniformly random
  ``k``-subset of each sample's *remaining* tasks (``RS_i``) — any other reading would not
  make gap = 1 ISTA. The plan of a batch is ISTA's; only the step at which each sub-step is
  trained changes: batches come in blocks of ``gap``; the block's batches are drawn and
  trained with their first sub-step at steps ``t .. t+gap-1``, then replayed in the same
  order with their second sub-step at ``t+gap .. t+2·gap-1``, and so on (sub-step ``s`` of
  the ``j``-th batch of a block at step ``t + s·gap + j``), so every replay comes exactly
  ``gap`` steps after the previous visit of its batch. ``gap = 1`` is ISTA step for step.
  A batch whose plan is shorter than another's of the same block (partial labels) is left
  out of the rounds it has no sub-step for (no empty steps).

Every mode is the same scheduler: FT, STA and ISTA are blocks of one batch (ISTA with
``ceil(T/k)`` sub-steps, FT/STA with one). Adapters ask :attr:`TaskAllocator.wants_batch`
before every optimizer step: when true they hand the next data batch to
:meth:`~TaskAllocator.start_batch`; :meth:`~TaskAllocator.next_step` then names the batch the
step trains (a new one or a held one) and its mask. :class:`HeldBatches` keeps the data of
the held batches on the adapters' side.

Samples never get a task they are not annotated for (``available`` mask; partial labels and
multi-dataset batches). A sample with fewer than ``k`` tasks gets all of them; under ISTA a
sample with fewer tasks than another simply has nothing allocated in the last sub-steps.

**Random streams.** The plan of the b-th batch is drawn from a generator seeded with
``(seed, rank, b)`` (:func:`stream_seed`): every DDP rank draws its own, independent
allocation (paper 001 draws per sample), and the state is the batch counter ``b``, which is
the same on every rank. A checkpoint written by rank 0 therefore resumes every rank on its
own stream: N batches + resume + N batches draw exactly the plans of 2N uninterrupted
batches, on every rank (a saved generator state would put rank 0's stream on all ranks).

**State and resume.** :meth:`~TaskAllocator.state_dict` holds mode, k, gap, seed, the batch
counter, the plans of the held batches, the block and the queue of pending (sub-step,
batch) steps. The data of a held batch is not in it (data loaders do not checkpoint
batches): after a resume the adapters find held plans without data
(:meth:`HeldBatches.drop_lost`) and drop them (:meth:`~TaskAllocator.discard_batch`); the
next step starts a new block with the next batch of the stream. The (sample, task) pairs
those batches had not trained yet are never trained; the step count of the run is
unaffected (iterations count optimizer steps). A checkpoint taken at a block boundary
(``ceil(T/k)·gap`` steps for fully annotated data) resumes exactly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .tasks import MTLConfigError, check_task_names

MODES = ("ft", "sta", "ista", "gap")
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
    """Draws the per-step ``[batch, T]`` allocation masks of FT, STA, ISTA or gap, and says
    which batch every optimizer step trains.

    Args:
        task_names: the T task names, in the column order of every mask.
        mode: ``"ft"``, ``"sta"``, ``"ista"`` or ``"gap"``.
        k: tasks per sample per step (paper 001: 1). Ignored for FT.
        seed: base seed of the allocation streams (the same on every rank).
        rank: this process's DDP rank: each rank draws its own stream (not saved: a
            checkpoint resumes every rank on its own stream).
        gap: ``mode="gap"`` only: the steps between two visits of a batch (paper 001,
            Table 7: 1 = ISTA, 2, 4, 8, 16); must be 1 for the other modes.

    Usage, per optimizer step::

        if allocator.wants_batch:                   # a new data batch is due
            allocator.start_batch(available)        # available: [B, T] bool, or batch size
        b, mask = allocator.next_step()             # the batch (index) and its [B, T] mask
        ... forward batch b, losses over mask, backward, optimizer step ...
    """

    def __init__(self, task_names: Sequence[str], mode: str = "ft", k: int = 1,
                 seed: int = 0, rank: int = 0, gap: int = 1) -> None:
        self.task_names = check_task_names(task_names)
        if mode not in MODES:
            raise MTLConfigError(f"allocation.mode={mode!r}: expected one of {list(MODES)}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self.task_names):
            raise MTLConfigError(
                f"allocation.k={k!r}: expected an integer in [1, {len(self.task_names)}] "
                f"(the number of tasks)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MTLConfigError(f"allocation.seed={seed!r}: expected an integer")
        check_gap(mode, gap, "allocation.gap")
        self.mode = mode
        self.k = k
        self.gap = gap
        self.seed = seed
        self.rank = int(rank)
        self.batches = 0  # plans drawn so far: the position in every rank's stream
        self.generator = torch.Generator()
        self._plans: Dict[int, torch.Tensor] = {}  # held batch -> [S, B, T] bool
        self._block: List[int] = []  # the batches of the current block, in draw order
        self._queue: List[Tuple[int, int, int]] = []  # pending (sub-step, slot, batch), sorted
        self._closed = False  # the current block takes no more batches (close_block)

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
        permutation); sub-step s allocates the chunk ``[s*k, (s+1)*k)`` of that order (ISTA
        and gap alike). The order is drawn from :attr:`generator` as it stands
        (:meth:`start_batch` seeds it).
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

    @property
    def wants_batch(self) -> bool:
        """True when the next step trains a batch not drawn yet: nothing is pending, or (gap)
        the block has room and its pending steps are all replays."""
        if not self._queue:
            return True
        return self._queue[0][0] > 0 and len(self._block) < self.gap and not self._closed

    @property
    def held_batches(self) -> List[int]:
        """The indices of the drawn batches that still have steps to train."""
        return sorted(self._plans)

    def start_batch(self, available: torch.Tensor | int,
                    agree: Optional[Callable[[int], int]] = None) -> int:
        """Draw the plan of a new batch (index :attr:`batches` before the call) and return
        its number of sub-steps.

        ``agree`` maps this rank's sub-step count to the count every rank uses (under DDP:
        the largest of any rank, so that every rank makes the same optimizer steps); the
        plan is padded with empty masks up to it.
        """
        if not self.wants_batch:
            raise RuntimeError(
                f"allocation: start_batch called with {len(self._queue)} step(s) of held "
                f"batches {self.held_batches} due first (mode={self.mode!r}); train "
                "next_step() until wants_batch")
        if not self._queue:
            self._block, self._closed = [], False  # the previous block is complete
        index = self.batches
        self.generator.manual_seed(stream_seed(self.seed, self.rank, index))
        self.batches += 1
        plan = self.plan(available)
        own = int(plan.shape[0])
        steps = own if agree is None else int(agree(own))
        if steps < own:
            raise ValueError(f"allocation: agree({own}) returned {steps}; expected at least "
                             "this rank's own sub-step count")
        if steps > own:
            plan = torch.cat([plan, plan.new_zeros(steps - own, *plan.shape[1:])])
        slot = len(self._block)
        self._block.append(index)
        self._plans[index] = plan
        self._queue.extend((s, slot, index) for s in range(steps))
        self._queue.sort()
        return steps

    def next_step(self) -> Tuple[int, torch.Tensor]:
        """``(batch index, [B, T] mask)`` of the next optimizer step."""
        if not self._queue or (self.wants_batch and self._queue[0][0] > 0):
            raise RuntimeError("allocation: next_step called while a new batch is due; call "
                               "start_batch(available) first")
        s, _, index = self._queue.pop(0)
        mask = self._plans[index][s]
        if not any(b == index for _, _, b in self._queue):
            del self._plans[index]
        return index, mask

    def next_mask(self) -> torch.Tensor:
        """The ``[B, T]`` mask of the next step (:meth:`next_step` without the index)."""
        return self.next_step()[1]

    def close_block(self) -> None:
        """Let the current block take no more batches: its pending replays are due now (the
        end of an epoch, where gap mode has fewer than ``gap`` batches left to draw)."""
        if self._queue:
            self._closed = True

    def discard_batch(self) -> None:
        """Drop the pending steps of every held batch (their data cannot be replayed, e.g.
        after a resume, or at the end of training); the next step starts a new block."""
        self._plans, self._block, self._queue, self._closed = {}, [], [], False

    def state_dict(self) -> Dict[str, Any]:
        return {"mode": self.mode, "k": self.k, "gap": self.gap, "seed": self.seed,
                "batches": self.batches,
                "plan": [[b, p.clone()] for b, p in sorted(self._plans.items())],
                "block": list(self._block), "queue": [list(q) for q in self._queue],
                "closed": self._closed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "batches" not in state:
            raise MTLConfigError(
                "allocation: the checkpoint's allocator state has no batch counter "
                f"(keys {sorted(state)}): it was written by an older mtl_plugins whose single "
                "saved generator put rank 0's stream on every rank; start from its weights "
                "(load_from) instead of resuming")
        saved = dict(state)
        saved.setdefault("gap", 1)  # written before the gap mode existed
        for key in ("mode", "k", "gap"):
            if saved[key] != getattr(self, key):
                raise MTLConfigError(
                    f"allocation.{key}: checkpoint has {saved[key]!r}, config has "
                    f"{getattr(self, key)!r}; resume with the configuration that was saved")
        self.seed = int(state["seed"])  # the run's streams go on, whatever the config says
        self.batches = int(state["batches"])
        if "queue" in state:
            self._plans = {int(b): p for b, p in state["plan"]}
            self._block = [int(b) for b in state["block"]]
            self._queue = [(int(s), int(j), int(b)) for s, j, b in state["queue"]]
            self._closed = bool(state["closed"])
            return
        # written before the gap mode: one ISTA plan and the position inside it
        plan, position = state["plan"], int(state["position"])
        self.discard_batch()
        if plan is not None and position < plan.shape[0]:
            index = self.batches - 1
            self._plans, self._block = {index: plan}, [index]
            self._queue = [(s, 0, index) for s in range(position, plan.shape[0])]


def steps_per_batch(mode: str, num_tasks: int, k: int) -> int:
    """Optimizer steps one data batch makes when its samples have every task:
    ``ceil(T / k)`` for ISTA and gap (every (sample, task) pair once per batch), else 1. What
    converts a schedule in epochs (e.g. Maximum Roaming's Δ) to optimizer steps."""
    return math.ceil(num_tasks / k) if mode in ("ista", "gap") else 1


def check_gap(mode: Any, gap: Any, key: str) -> None:
    """Refuse a ``gap`` (config key ``key``) that is not a positive integer, or not 1 with a
    mode other than ``"gap"`` (only the gap mode replays batches after a gap)."""
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise MTLConfigError(f"{key}={gap!r}: expected an integer >= 1 (paper 001, Table 7: "
                             "1, 2, 4, 8, 16)")
    if gap != 1 and mode != "gap":
        raise MTLConfigError(f"{key}={gap!r} with allocation mode {mode!r}: only mode='gap' "
                             "replays batches after a gap; expected gap=1 or mode='gap'")


#: what an adapter logs when :meth:`HeldBatches.drop_lost` dropped batches after a resume
DROPPED_ON_RESUME = ("allocation: dropping the remaining sub-steps of the batches held when "
                     "the checkpoint was written (batches themselves cannot be restored)")


class HeldBatches:
    """The adapters' side of :class:`TaskAllocator`: the data of the batches it holds.

    Per optimizer step::

        held.drop_lost()                    # after a resume: held plans without their data
        if held.allocator.wants_batch:
            held.add(next_data_batch, available, agree)
        data, mask = held.next_step()
    """

    def __init__(self, allocator: TaskAllocator) -> None:
        self.allocator = allocator
        self.data: Dict[int, Any] = {}

    def drop_lost(self) -> bool:
        """Drop the allocator's held batches when one of them has no data here (the state was
        loaded from a checkpoint: batches are not checkpointed); True if any was dropped."""
        lost = [b for b in self.allocator.held_batches if b not in self.data]
        if lost:
            self.allocator.discard_batch()
            self.data.clear()
        return bool(lost)

    def add(self, data: Any, available: torch.Tensor | int,
            agree: Optional[Callable[[int], int]] = None) -> int:
        """Start ``data`` as the allocator's next batch; its number of sub-steps."""
        steps = self.allocator.start_batch(available, agree)
        self.data[self.allocator.batches - 1] = data
        return steps

    def next_step(self) -> Tuple[Any, torch.Tensor]:
        """``(data, mask)`` of the next optimizer step; forgets data no longer needed."""
        index, mask = self.allocator.next_step()
        data = self.data[index]
        held = set(self.allocator.held_batches)
        for b in [b for b in self.data if b not in held]:
            del self.data[b]
        return data, mask

    def clear(self) -> None:
        """Forget every held batch (data and pending steps): end of training."""
        self.allocator.discard_batch()
        self.data.clear()


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
