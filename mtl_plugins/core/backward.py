"""The per-task backward engine: task gradients in, ``.grad`` out.

Given the per-task losses of one step, :class:`TaskBackward` writes ``.grad`` so that

- every task-specific parameter gets its own task's gradient (only its task reaches it),
- every shared parameter gets the aggregate of the task gradients (gradient surgery),

at one of two levels:

- ``"parameter"``: the task-gradient matrix ``G`` is ``[T, P]`` over the P shared parameters.
  G is zeroed and task t's backward (one per task, through the shared part, as the floor
  makes) accumulates into row t: the shared ``.grad`` are views of that row while it runs.
  Memory is ``G`` itself (reused from step to step), the graph and the few parameter
  gradients autograd has computed but not yet added; time is the floor (forward + T backward
  passes through the shared part) plus the fill of G, its Gramian and ``w @ G``. Per
  parameter, Python only sets ``.grad``: no dispatcher call, which on a GPU bounds a small
  model's step. The aggregation makes one host sync, the copy of the Gramian the aggregator
  solves on (:func:`_host_gramian`); the loss check and DDP's task counts make their own.
  On a CPU, in a single process, with the C kernel and an aggregator whose direction is
  ``weights(G G^T) @ G`` (the Gramian methods; GradVac per layer), G is not filled at all: each
  task's backward leaves its gradients in the tensors a plain backward makes, the C
  kernel forms the Gramian and ``w @ G`` from them and writes the direction into the first
  task's tensors, which become ``.grad`` (:meth:`TaskBackward._task_rows_level`): no zero
  fill, no read-add-write of G per task, and nothing but ``.grad`` held between steps (an
  aggregator with forward hooks keeps G: the task rows do not call its ``forward``).
- ``"representation"``: ``G`` is ``[T, |z|]`` over a shared feature tensor ``z`` (or several,
  e.g. multi-scale outputs) from which every head starts. T cheap backward passes through the
  heads give G; the aggregate ``d`` is then back-propagated once through the encoder
  (``z.backward(d)``). This is how MGDA-UB (Sener & Koltun 2018, Sec. 3.3) and GradDrop
  (Chen et al. 2020) are defined, and it makes any aggregator about as cheap as a plain step.

Tasks absent from the step (no key in ``losses``) are left out of the aggregation.

**AMP.** With a :class:`~mtl_plugins.core.amp.DynamicLossScaler`, each task's loss is scaled
before its backward and G is unscaled before aggregation (surgery must see true gradients).
If any task gradient is not finite, the result reports ``found_inf=True``, the gradients are
zeroed, the scale backs off and the caller must skip the optimizer step.

**DDP.** When ``torch.distributed`` is initialised with more than one rank, one rule holds
on every path: *each task's gradient is the mean over the ranks whose batch has the task*
(a rank without the task does not dilute it), and every rank ends with the same ``.grad``.

- With an aggregator, the engine all-reduces the per-task gradients itself (one collective
  over G and the task-specific gradients) and averages each task over the ranks that have
  it, *before* aggregating: a 2-rank run matches a 1-rank run on the union batch for
  deterministic aggregators. The forward must then run without DDP's own gradient hooks
  (``model.no_sync()`` or the unwrapped module), since the task backward passes are not the
  single backward DDP expects.
- Without an aggregator (plain summed loss) the engine does one ordinary backward and DDP
  averages the gradients over all W ranks; the engine first all-reduces which tasks each
  rank has (T numbers) and weights task t's loss by ``W / c_t`` (``c_t`` ranks have it), so
  DDP's mean is the same per-task mean. Parameters outside the DDP module (learnable loss
  weights) are averaged by the engine.

A rank whose batch has no task at all still takes part in every collective: it passes an
empty ``losses`` and, on the plain path, a ``keepalive`` term (a zero-valued scalar connected
to every head, e.g. ``0 * Σ`` of the heads' outputs) so that DDP's backward reaches every
parameter. When no rank has any task, :attr:`BackwardResult.empty` tells the caller to skip
the optimizer step, on every rank alike (as a single process skips an empty batch).
"""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .aggregation import c_gramian
from .aggregation._utils import chunk_columns, work_buffer
from .aggregation.base import Aggregator
from .aggregation.gramian_kernels import check_gramian_kernel, exact_block_gramians, exact_gramian
from .amp import DynamicLossScaler
from .distributed import world_size
from .tasks import MTLConfigError, check_finite_losses, check_known_tasks, check_task_names

LEVELS = ("parameter", "representation")
VJP_MODES = ("sequential", "batched")
Tensors = Sequence[torch.Tensor]


@dataclass(frozen=True)
class _Layout:
    """The shared parameters laid out along a row of G: their ``ids`` and ``sizes`` (what
    the layout is kept for), the ``(start, end)`` column ``offsets`` of each and the row
    length ``numel``."""
    ids: Tuple[int, ...]
    sizes: Tuple[int, ...]
    offsets: List[Tuple[int, int]]
    numel: int


@dataclass
class BackwardResult:
    """What one call of the engine did.

    Attributes:
        tasks: the tasks that took part, in the row order of ``gramian``.
        found_inf: a task gradient was NaN/inf (AMP overflow): skip the optimizer step.
        gramian: ``G G^T`` of the (unscaled, all-reduced) task gradients, float64 on CPU;
            ``None`` for the plain summed-loss path. Pairwise cosines come from it.
        loss_scale: the loss scale used for this step (1.0 without AMP).
        weighted_losses: the balanced ``λ_t l_t`` the engine received (detached), set by
            :meth:`MTLController.backward`.
        empty: no rank had any task this step: skip the optimizer step (the gradients are
            zero or ``None``).
    """

    tasks: List[str]
    found_inf: bool = False
    empty: bool = False
    gramian: Optional[torch.Tensor] = None
    loss_scale: float = 1.0
    weighted_losses: Optional[Dict[str, torch.Tensor]] = None

    def cosines(self) -> Optional[torch.Tensor]:
        """Pairwise cosine similarities of the task gradients (``[T, T]``) or ``None``."""
        if self.gramian is None:
            return None
        norms = self.gramian.diagonal().clamp(min=1e-30).sqrt()
        return self.gramian / (norms[:, None] * norms[None, :])


def _sums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One sum per tensor, stacked: in float32 (float64 for a float64 tensor; the stack then
    is float64). A finite sum proves its tensor finite (a NaN or inf entry makes any IEEE sum NaN or
    inf); a non-finite one may also come from finite entries overflowing float32, which
    :func:`_confirmed_finite` settles. 20x cheaper than float64 sums on a CPU (0.08 vs
    1.8 ms for the benchmark model's head gradients: summing with a cast is not vectorised)
    and cheaper than ``torch._foreach_norm``."""
    return torch.stack([t.sum(dtype=torch.float64 if t.dtype == torch.float64 else
                              torch.float32) for t in tensors])


def _confirmed_finite(tensors: Sequence[torch.Tensor], sums: Sequence[float]) -> bool:
    """Whether every tensor is free of NaN/inf, given its :func:`_sums` on the host: the
    tensors whose sum is not finite are summed again in float64, which cannot overflow on
    float32/half entries, so a step whose float32 sums merely overflowed is not skipped.
    No work (and no second host sync) unless a sum is not finite."""
    suspects = [t for t, s in zip(tensors, sums) if not math.isfinite(s)]
    return not suspects or bool(torch.isfinite(
        torch.stack([t.sum(dtype=torch.float64) for t in suspects])).all())


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no tensor holds NaN/inf (:func:`_sums`, :func:`_confirmed_finite`): one
    host sync, two when a float32 sum was not finite."""
    return not tensors or _confirmed_finite(tensors, _sums(tensors).tolist())


def _host_gramian(gramian: torch.Tensor, others: Sequence[torch.Tensor]
                  ) -> Optional[torch.Tensor]:
    """The float64 Gramian on the host (from a GPU a copy, on a CPU the tensor itself, which
    the engine forms afresh each step), or None when it or a tensor of ``others`` (the
    head gradients) holds NaN/inf: G has a NaN/inf entry iff its Gramian's diagonal (sums of
    squares) is not finite, and each other tensor is checked by its sum (:func:`_sums`,
    :func:`_confirmed_finite`). One device-to-host copy of the Gramian and those sums: the
    step's one host sync on a GPU, made before the aggregate is launched, so that the
    optimizer's kernels queue behind it instead of waiting for a copy of the Gramian made
    after it. The aggregator gets this copy: its solve runs on the host anyway
    (``solver_gramian``), and its weights reach G's device with the product ``w @ G``. On a
    CPU with float32 head gradients the C kernel sums them in float64 in one call
    (:func:`~.aggregation.c_gramian.sums64`: a sum is finite iff its tensor is), no tensor
    op at all."""
    t = gramian.shape[0]
    exact = c_gramian.sums64(others) if others and gramian.is_cpu else None
    parts = [gramian.detach().reshape(-1).to(torch.float64)]
    if others and exact is None:
        parts.append(_sums(others))
    host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu()  # (cat promotes the sums)
    values = host.tolist()  # decided in Python: tiny tensor ops cost 5-45 us here on a CPU
    if not all(map(math.isfinite, values[:t * t])):
        return None
    if exact is not None:
        if not all(map(math.isfinite, exact)):
            return None
    elif others and not _confirmed_finite(others, values[t * t:]):
        return None
    return host[:t * t].view(t, t)


def _forward_hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs hooks besides its ``forward``: its own forward
    (pre-)hooks or global ones (``register_module_forward_hook``)."""
    return bool(getattr(module, "_forward_hooks", None)
                or getattr(module, "_forward_pre_hooks", None)
                or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def _scaled(loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``loss * scale``, or ``loss`` itself when the scale is 1 (no AMP): no tensor op and
    no autograd node per task."""
    return loss if scale == 1.0 else loss * scale


def _own_row(grad: torch.Tensor) -> bool:
    """Whether a ``.grad`` autograd left can be a task row as it is: dense and contiguous
    (autograd's layout contract gives that for a contiguous parameter; a sparse gradient,
    or a post-accumulate-grad hook that set ``.grad`` to another layout, do not). The C
    kernel reads the rows by address. Like ``GradScaler.unscale_`` and
    ``clip_grad_norm_``, the engine then writes into ``.grad`` tensors in place (the
    unscaling, the direction into the first task's): a hook that kept a tensor a ``.grad``
    shares memory with sees it change."""
    return grad.layout is torch.strided and grad.is_contiguous()


def _owned(grad: torch.Tensor) -> torch.Tensor:
    """A dense contiguous copy of ``grad`` (see :func:`_own_row`)."""
    if grad.layout is not torch.strided:
        return grad.to_dense().contiguous()
    return grad.clone(memory_format=torch.contiguous_format)


def task_rank_counts(present: Sequence[bool], device: torch.device) -> List[int]:
    """How many ranks have each task (``present``: this rank's flags, one per task); one
    all-reduce of T numbers. ``present`` itself, as 0/1, in a single process."""
    if world_size() == 1:
        return [int(bool(p)) for p in present]
    flags = torch.tensor([float(bool(p)) for p in present], device=device)
    torch.distributed.all_reduce(flags)
    return [int(round(c)) for c in flags.tolist()]


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or-ed over the DDP ranks (itself in a single process)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class TaskBackward:
    """Computes per-task gradients and writes the aggregated ``.grad``.

    Args:
        task_names: every task of the model (row order of G).
        aggregator: an :class:`~mtl_plugins.core.aggregation.base.Aggregator`, or ``None``
            for the plain summed loss (one backward, no per-task gradients).
        level: ``"parameter"`` or ``"representation"``.
        loss_scaler: a :class:`DynamicLossScaler` for mixed precision, or ``None``.
        check_losses: raise ``FloatingPointError`` naming the task on a NaN/inf loss
            (before any backward, so weights are never touched). With a loss scaler, a
            non-finite loss is an overflow instead: the step is reported and skipped.
        vjp: parameter level: ``"sequential"`` (T backward passes, each task's gradients
            accumulated straight into its row of G, or kept as the task rows on a CPU with
            the C kernel; the default) or
            ``"batched"`` (one ``vmap``-ed backward through the shared part,
            ``is_grads_batched``, plus one backward through the heads; falls back to
            sequential when an op has no batching rule).
        gramian_kernel: how the exact float64 Gramian of G (and GradVac's per-layer ones)
            is formed, :mod:`~.aggregation.gramian_kernels`: ``"auto"`` (the default: the C
            kernel for float32 G on a CPU when it builds, else BLAS), ``"blas"`` (chunked
            cast + BLAS, :func:`~.aggregation._utils.gramian64`), ``"c"``
            (:mod:`~.aggregation.c_gramian`: one read of G, ~6x faster than BLAS on this
            project's CPU) or ``"fused"`` (one pass compiled by ``torch.compile``,
            :mod:`~.aggregation.fused_gramian`: a build at the first step). The same numbers
            to ~1e-14. ``"c"`` and ``"fused"`` are refused without an aggregator (the plain
            summed loss forms no Gramian).
    """

    def __init__(self, task_names: Sequence[str], aggregator: Optional[Aggregator] = None,
                 level: str = "parameter", loss_scaler: Optional[DynamicLossScaler] = None,
                 check_losses: bool = True, vjp: str = "sequential",
                 gramian_kernel: str = "auto") -> None:
        self.task_names = check_task_names(task_names)
        if vjp not in VJP_MODES:
            raise MTLConfigError(f"vjp={vjp!r}: expected one of {list(VJP_MODES)}")
        self.vjp = vjp
        self.gramian_kernel = check_gramian_kernel(gramian_kernel, aggregator is not None)
        if level not in LEVELS:
            raise MTLConfigError(f"level={level!r}: expected one of {list(LEVELS)}")
        self.aggregator = aggregator
        self.level = level
        self.loss_scaler = loss_scaler
        self.check_losses = check_losses
        # the aggregator protocol (mtl_plugins.core.aggregation): per-task state needs one
        # row per model task (zeros when absent); some methods take the losses or the
        # column-block (layer) sizes of G
        self._all_rows = bool(getattr(aggregator, "needs_all_tasks", False))
        params = inspect.signature(aggregator.forward).parameters if aggregator is not None else {}
        self._takes_groups = "group_sizes" in params
        self._takes_gramian = "gramian" in params
        self._takes_out = "out" in params
        self._takes_blocks = "block_gramians" in params
        self._buffer: Optional[torch.Tensor] = None
        # each row of G as views shaped like the shared parameters (row 0's are the .grad of
        # the direction), kept with G
        self._layout: Optional[_Layout] = None  # where the shared parameters sit in a row
        self._views_of: Optional[_Layout] = None  # the layout the kept views were made for
        self._views: List[List[torch.Tensor]] = []
        self._work: Optional[torch.Tensor] = None  # gramian64's float64 scratch (CPU), kept
        #: the model has SyncBatchNorm layers (set by the adapters): see _check_sync_bn
        self.sync_bn = False
        self.aggregations = 0  # aggregator calls (the no-silent-no-op check reads it)

    # ------------------------------------------------------------------ helpers
    @property
    def _needs_losses(self) -> bool:
        """Whether the aggregator takes the task losses: read each step, since some decide it
        from a setting (MGDA's ``normalization='loss'``)."""
        return bool(getattr(self.aggregator, "needs_losses", False))

    @property
    def scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def _present(self, losses: Mapping[str, torch.Tensor]) -> List[str]:
        check_known_tasks(losses.keys(), self.task_names, key="losses")
        if not losses and world_size() == 1:
            raise ValueError(
                "losses is empty: no task has a loss this step (every task was unallocated "
                "or unlabelled in this batch)")
        return [t for t in self.task_names if t in losses]

    def _check_task_params(self, task_params: Optional[Mapping[str, Tensors]],
                           shared: Tensors) -> Dict[str, List[torch.Tensor]]:
        task_params = dict(task_params or {})
        check_known_tasks(task_params.keys(), self.task_names, key="task_params")
        seen = {id(p): "shared" for p in shared}
        out: Dict[str, List[torch.Tensor]] = {}
        for task in self.task_names:
            params = [p for p in task_params.get(task, ()) if p.requires_grad]
            for p in params:
                owner = seen.setdefault(id(p), task)
                if owner != task:
                    raise MTLConfigError(
                        f"task_params[{task!r}] holds a parameter of shape {tuple(p.shape)} "
                        f"that is also in {owner!r}: task-specific parameters must belong to "
                        "exactly one task and not be shared")
            out[task] = params
        return out

    def _finish(self, result: BackwardResult, params: Tensors, found_inf: bool) -> BackwardResult:
        if found_inf:
            for p in params:
                p.grad = None
        if self.loss_scaler is not None:
            self.loss_scaler.update(found_inf)
        result.found_inf = found_inf
        return result

    # ------------------------------------------------------------------ entry point
    def __call__(self, losses: Mapping[str, torch.Tensor], shared_params: Tensors,
                 task_params: Optional[Mapping[str, Tensors]] = None,
                 features: Optional[torch.Tensor | Tensors] = None,
                 extra_params: Tensors = (),
                 keepalive: Optional[torch.Tensor] = None) -> BackwardResult:
        """Write ``.grad`` for one step; see the module docstring.

        Args:
            losses: ``{task: scalar}`` for the tasks present this step (already weighted
                by loss balancing, if any).
            shared_params: the parameters every task shares (the encoder).
            task_params: ``{task: parameters}`` used by one task only (its head).
            features: for ``level="representation"``: the shared tensor(s) the heads start
                from, still attached to the encoder's graph.
            extra_params: parameters outside the encoder/head split, such as learnable loss
                weights (uncertainty weighting): they get the gradient of the summed loss.
            keepalive: plain path only: a finite scalar connected to the parts of the model
                the present tasks do not reach (the absent tasks' heads); it is added with
                weight 0, so that DDP's backward reaches every parameter.
        """
        tasks = self._present(losses)
        seen = set()  # a parameter listed twice counts once (its .grad is one tensor)
        shared = [p for p in shared_params
                  if p.requires_grad and id(p) not in seen and not seen.add(id(p))]
        if not shared:
            raise MTLConfigError("shared_params: no parameter that requires grad was given")
        per_task = self._check_task_params(task_params, shared)
        if self.check_losses and self.loss_scaler is None:
            check_finite_losses({t: losses[t] for t in tasks})
        extras = [p for p in extra_params if p.requires_grad]
        everything = shared + [p for t in tasks for p in per_task[t]] + extras
        counts = None
        if world_size() > 1:  # ranks per task: the mean over the ranks that have it (docstring)
            counts = dict(zip(self.task_names, task_rank_counts(
                [t in losses for t in self.task_names], shared[0].device)))
        if counts is not None and self.aggregator is not None:
            self._check_sync_bn(counts)
        if self.aggregator is None:  # gradients accumulate, as with any backward
            # a head no rank trains keeps grad None, as in a single process (the keepalive
            # term only gives it zeros for DDP's sake)
            dormant = [] if counts is None else [
                p for t in self.task_names if counts[t] == 0 for p in per_task[t]
                if p.grad is None]
            result = self._plain(losses, tasks, everything, extras, keepalive, counts)
            for p in dormant:
                p.grad = None
            return result
        for p in everything:
            if p.grad is not None:
                raise RuntimeError(
                    "TaskBackward: a parameter already holds a .grad; zero the gradients "
                    "with set_to_none=True before the step (an aggregator cannot accumulate "
                    "across micro-batches)")
        if self.level == "parameter":
            return self._parameter_level(losses, tasks, shared, per_task, extras, counts)
        if features is None:
            raise MTLConfigError("level='representation' needs the shared features tensor(s) "
                                 "the task heads start from: pass features=...")
        feats = [features] if isinstance(features, torch.Tensor) else list(features)
        return self._representation_level(losses, tasks, shared, per_task, feats, extras,
                                          counts)

    def _check_sync_bn(self, counts: Dict[str, int]) -> None:
        """Refuse what would hang: with an aggregator each rank runs one backward per task it
        has (through the trunk, or the heads at representation level), and every
        SyncBatchNorm backward is a collective; a task present on some ranks only makes
        the ranks' collectives differ. Every rank sees the same counts and raises alike."""
        world = world_size()
        partial = [t for t, c in counts.items() if 0 < c < world]
        if self.sync_bn and partial:
            raise MTLConfigError(
                f"aggregator={type(self.aggregator).__name__} with SyncBatchNorm under DDP: "
                f"task(s) {partial} are present on only some of the {world} ranks this step "
                "(STA/ISTA allocation or partially annotated data), so the ranks would run "
                "different numbers of SyncBN backward collectives and hang; expected every "
                "task on every rank (allocation mode 'ft', fully annotated batches), plain "
                "BN/GN norms (mmseg: norm_cfg=dict(type='BN'), detectron2: NORM 'BN'/'GN'), "
                "or no aggregator")

    @staticmethod
    def _rank_weighted(losses: Mapping[str, torch.Tensor], tasks: List[str],
                       counts: Optional[Dict[str, int]]) -> Dict[str, torch.Tensor]:
        """``W / c_t · l_t`` under DDP (so that a mean over all W ranks is the mean over the
        c_t ranks that have task t), the losses themselves in a single process."""
        if counts is None:
            return dict(losses)
        world = world_size()
        return {t: losses[t] * (world / counts[t]) for t in tasks}

    # ------------------------------------------------------------------ plain sum
    def _plain(self, losses: Mapping[str, torch.Tensor], tasks: List[str], params: Tensors,
               extras: Tensors, keepalive: Optional[torch.Tensor],
               counts: Optional[Dict[str, int]]) -> BackwardResult:
        scale = self.scale
        world = world_size()
        ref = params[0]
        weighted = self._rank_weighted(losses, tasks, counts)
        terms = [weighted[t].reshape(()) for t in tasks]
        empty = counts is not None and not any(counts.values())
        if keepalive is not None:
            if self.check_losses and not bool(torch.isfinite(keepalive.detach()).all()):
                raise FloatingPointError(
                    f"keepalive={float(keepalive.detach().sum())}: the zero-weighted term that "
                    "keeps the absent tasks' heads in DDP's backward is not finite (a head "
                    "returned NaN/inf on a batch where no sample has its task)")
            terms.append(keepalive.reshape(()) * 0.0)
        if not terms:
            raise RuntimeError(
                "TaskBackward: this rank has no task this step and no keepalive term; under "
                "DDP every rank must run a backward that reaches every parameter (pass "
                "keepalive=<a zero-weighted scalar connected to every head>)")
        total = torch.stack(terms).sum()
        if self.loss_scaler is None:
            total.backward()
            if world > 1 and extras:
                self._all_reduce_mean(extras)
            return BackwardResult(tasks, empty=empty)
        # unscale only this backward's contribution: earlier micro-batches' gradients
        # (gradient accumulation) are already unscaled
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        (total * scale).backward()
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            g.div_(scale)
        found_inf = not _all_finite(grads)
        if world > 1 and extras:
            self._all_reduce_mean(extras)
        for p, g in zip(params, earlier):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        found_inf = _any_rank(found_inf, ref.device)
        return self._finish(BackwardResult(tasks, loss_scale=scale, empty=empty), params,
                            found_inf)

    # ------------------------------------------------------------------ parameter level
    def _parameter_level(self, losses: Mapping[str, torch.Tensor], tasks: List[str],
                         shared: List[torch.Tensor], per_task: Dict[str, List[torch.Tensor]],
                         extras: List[torch.Tensor],
                         counts: Optional[Dict[str, int]]) -> BackwardResult:
        scale = self.scale
        world = world_size()
        rows = list(self.task_names) if world > 1 or self._all_rows else list(tasks)
        layout = self._shared_layout(shared)
        if self._uses_task_rows(shared, counts):
            return self._task_rows_level(losses, tasks, shared, per_task, extras, layout)
        grads = self._task_buffer(len(rows), layout.numel, shared[0])
        views = self._row_views(grads, shared, layout)
        weighted = self._rank_weighted(losses, tasks, counts)
        if not (self.vjp == "batched" and self._batched_rows(weighted, tasks, rows, grads,
                                                            shared, layout.offsets, per_task,
                                                            extras, scale)):
            self._task_passes(weighted, tasks, shared, per_task, extras, scale,
                              [views[rows.index(t)] for t in tasks])
        # the losses reach the aggregator only when it takes them (and the all-reduce under
        # DDP): a handful of tiny tensor ops, 0.15 ms of a 50 ms mmseg iteration, skipped else
        loss_values = self._loss_row(losses, rows, grads.device) \
            if counts is not None or self._needs_losses else None
        if counts is not None:  # every rank now reduces every task's head (zeros if absent)
            tasks = [t for t in self.task_names if counts[t] > 0]
            if not self._all_rows:
                rows = tasks
            grads, loss_values = self._all_reduce_tasks(grads, loss_values, counts, per_task,
                                                        extras)
        head_params = [p for t in tasks for p in per_task[t]] + extras
        head_grads = [p.grad for p in head_params if p.grad is not None]
        if scale != 1.0:
            grads.div_(scale)
            if head_grads:
                torch._foreach_div_(head_grads, scale)
        if not tasks:  # no rank had any task: nothing to aggregate, no step
            return self._skip(rows, shared + head_params, scale)
        # G has a NaN/inf entry iff its Gramian's diagonal (sums of squares) is not finite;
        # float64 accumulation: a float32 G @ G.T loses nearly collinear rows' small eigenvalues
        group_sizes = self._engine_groups(list(layout.sizes))
        blocks = self._block_gramians(grads, group_sizes)
        gramian = self._gramian(grads) if blocks is None else blocks.sum(dim=0)
        result = BackwardResult(rows, loss_scale=scale)
        result.gramian = _host_gramian(gramian, head_grads)
        if result.gramian is None:
            return self._finish(result, shared + head_params, True)
        direction = self._aggregate(grads, result.gramian, loss_values, group_sizes,
                                    out=self._direction_buffer(grads), blocks=blocks)
        del grads
        if direction.data_ptr() == views[0][0].data_ptr():  # G's row 0, not a reduced copy
            views = views[0]
        else:
            views = [direction[a:b].view_as(p) for p, (a, b) in zip(shared, layout.offsets)]
        for p, view in zip(shared, views):
            p.grad = view
        return self._finish(result, shared + head_params, False)

    def _uses_task_rows(self, shared: List[torch.Tensor],
                        counts: Optional[Dict[str, int]]) -> bool:
        """Whether this step keeps each task's gradients as autograd made them
        (:meth:`_task_rows_level`) instead of filling G: a single process, sequential
        passes, an aggregator whose direction is ``weights(G G^T) @ G``
        (``weights_give_direction``: the Gramian methods) or, per parameter,
        ``group_weights(block Gramians)[b] @ G_b`` (``block_weights_give_direction``:
        GradVac, with the engine's blocks, one per parameter), and the C kernel for
        float32 CPU gradients (``gramian_kernel`` ``"auto"`` where it builds, or ``"c"``).
        The task rows call the aggregator's ``weights`` / ``group_weights``, not its
        ``forward``: an aggregator with forward hooks keeps G, so that they run."""
        agg = self.aggregator
        whole = (getattr(agg, "weights_give_direction", False)
                 and not self._takes_blocks and not self._takes_groups)
        per_parameter = (self._takes_blocks and getattr(agg, "block_weights_give_direction", False)
                         and getattr(agg, "group_sizes", None) is None)
        return (counts is None and self.vjp == "sequential" and (whole or per_parameter)
                and not _forward_hooked(agg)
                and self.gramian_kernel in ("auto", "c") and not c_gramian.unavailable()
                and all(map(c_gramian.plain_float32, shared)))

    def _task_rows_level(self, losses: Mapping[str, torch.Tensor], tasks: List[str],
                         shared: List[torch.Tensor], per_task: Dict[str, List[torch.Tensor]],
                         extras: List[torch.Tensor], layout: "_Layout") -> BackwardResult:
        """Parameter level without G: T backward passes, each leaving its task's gradients
        in the tensors a plain backward makes (``.grad`` None before each, taken away after;
        copied where a sparse or non-contiguous one is left: :func:`_own_row`), the Gramian
        (GradVac: one per parameter) and ``w @ G`` (GradVac: per parameter) formed from
        those tensors by the C kernel (:class:`~.aggregation.c_gramian.SegmentedRows`), the
        direction written into the first row's tensors, which become ``.grad``. Against
        filling G: no zero fill and no read-add-write of G per task (0.6 ms of a 50 ms mmseg
        iteration, docs/benchmarks.md), and between steps only ``.grad`` is held, not G.
        Memory during the step: at most the T task gradients, and only the tasks' made so
        far while a backward runs (G holds all T rows from the first pass: its peak is
        10.8 MiB higher on the benchmark model, docs/benchmarks.md). The same Gramian to ~1e-14 and
        direction to float32 rounding (its float64 sum is rounded once) as the G path."""
        scale = self.scale
        rows = list(self.task_names) if self._all_rows else list(tasks)
        self._buffer, self._views_of, self._views = None, None, []  # G is not held
        grads = self._task_passes(losses, tasks, shared, per_task, extras, scale)
        head_params = [p for t in tasks for p in per_task[t]] + extras
        head_grads = [p.grad for p in head_params if p.grad is not None]
        unscale = [g for t in tasks for g in grads[t] if g is not None] + head_grads
        if scale != 1.0 and unscale:
            torch._foreach_div_(unscale, scale)
        none = [None] * len(shared)
        segments = c_gramian.SegmentedRows([grads.get(t, none) for t in rows], layout.sizes,
                                           checked=False)
        # GradVac: a Gramian per parameter (its layers), summed into the whole one as on G
        blocks = segments.gramian(per_segment=True) if self._takes_blocks else None
        result = BackwardResult(rows, loss_scale=scale)
        result.gramian = _host_gramian(segments.gramian() if blocks is None
                                       else blocks.sum(dim=0), head_grads)
        if result.gramian is None:
            return self._finish(result, shared + head_params, True)
        self.aggregations += 1
        if blocks is not None:
            weights = self.aggregator.group_weights(blocks)  # [parameters, T]
        else:
            kwargs = {"losses": self._loss_row(losses, rows, torch.device("cpu"))} \
                if self._needs_losses else {}
            weights = self.aggregator.weights(result.gramian, **kwargs)
        for p, d in zip(shared, segments.combine(weights)):
            p.grad = d if d.shape == p.shape else d.view_as(p)
        return self._finish(result, shared + head_params, False)

    @staticmethod
    def _task_passes(losses: Mapping[str, torch.Tensor], tasks: List[str],
                     shared: List[torch.Tensor], per_task: Dict[str, List[torch.Tensor]],
                     extras: List[torch.Tensor], scale: float,
                     views: Optional[List[List[torch.Tensor]]] = None
                     ) -> Dict[str, List[Optional[torch.Tensor]]]:
        """T backward passes, one per task, through the shared parameters and the task's own
        (its head, the extras); the own parameters accumulate into their ``.grad`` as in any
        backward. The shared parameters' ``.grad`` is None when it returns or raises, so no
        task's gradient is ever left as the step's.

        With ``views`` (task i's row of G as views shaped like the shared parameters:
        :meth:`_row_views`), the shared ``.grad`` are those views while task i's backward
        runs, so autograd adds each parameter's gradient into its slice of G (zeroed) in
        place as it is computed and frees it: memory is G and the graph, plus the few
        parameter gradients computed and not yet added. A
        parameter the task does not reach keeps zeros in its slice, a sparse gradient is
        added densely, an absent task's row stays zero. Returns an empty dict then.

        Without ``views`` (the task rows: :meth:`_task_rows_level`), ``.grad`` is None before
        each pass and the task's gradients are taken away after it, as autograd made them
        (copied where a sparse or non-contiguous one is left: :func:`_own_row`); returns
        them per task, None where the task does not reach a parameter.

        Hooks registered on a parameter (``register_hook``: GradSplit's masks) apply, as
        they do for ``.backward()``; post-accumulate-grad hooks run once per task
        (``autograd.grad`` runs none): DDP's, registered that way, must not act on these
        passes (``no_sync()``, and not ``static_graph=True``, whose first iteration counts
        every call: docs/distributed.md). Two earlier ways of filling G, measured
        (docs/benchmarks.md): a post-accumulate-grad hook per shared parameter copying each
        gradient into its slice cost a Python call and four dispatcher calls per parameter
        and task, a third of a plain step on a GPU; ``autograd.grad`` and one copy of the
        task's gradients into its row held the whole task's gradients beside G (10.6 MiB
        over the budget on the benchmark model) for the same time on a CPU."""
        kept: Dict[str, List[Optional[torch.Tensor]]] = {}
        try:
            for i, task in enumerate(tasks):
                if views is not None:
                    for p, view in zip(shared, views[i]):
                        p.grad = view
                torch.autograd.backward(_scaled(losses[task], scale),
                                        inputs=shared + per_task[task] + extras,
                                        retain_graph=i < len(tasks) - 1)
                if views is None:
                    kept[task] = [g if g is None or _own_row(g) else _owned(g)
                                  for g in [p.grad for p in shared]]
                    for p in shared:
                        p.grad = None
        except BaseException:
            for p in shared:
                p.grad = None
            raise
        if views is not None:  # (each task's pass set its own views: cleared once, here)
            for p in shared:
                p.grad = None
        return kept

    @staticmethod
    def _batched_rows(losses, tasks, rows, grads, shared, offsets, per_task, extras,
                      scale) -> bool:
        """One batched VJP (``is_grads_batched``) for all rows of G, then one backward for
        the heads and extras (each head is reached by its own task's loss only). Returns
        False, having written nothing, when autograd cannot batch the graph."""
        stacked = torch.stack([_scaled(losses[t].reshape(()), scale) for t in tasks])
        eye = torch.eye(len(tasks), dtype=stacked.dtype, device=stacked.device)
        try:
            out = torch.autograd.grad(stacked, shared, grad_outputs=eye, is_grads_batched=True,
                                      retain_graph=True, allow_unused=True)
        except RuntimeError:
            return False
        index = torch.tensor([rows.index(t) for t in tasks], device=grads.device)
        for g, (a, b) in zip(out, offsets):
            if g is not None:
                grads[index, a:b] = g.reshape(len(tasks), -1)
        del out
        own = [p for t in tasks for p in per_task[t]] + extras
        if own:
            torch.autograd.backward(stacked.sum(), inputs=own)
        return True

    def _task_buffer(self, rows: int, numel: int, ref: torch.Tensor) -> torch.Tensor:
        """The ``[rows, numel]`` matrix G, zeroed, one buffer reused from step to step.

        Reusing memory already mapped is several times cheaper than a fresh allocation
        (page faults on every step); the buffer held between steps is exactly the T task
        gradients.
        """
        buf = self._buffer
        if buf is None or buf.shape != (rows, numel) or buf.dtype != ref.dtype \
                or buf.device != ref.device:
            self._buffer = None  # free the old one before allocating
            self._views_of, self._views = None, []  # (views of it too)
            buf = self._buffer = torch.zeros(rows, numel, dtype=ref.dtype, device=ref.device)
        else:
            buf.zero_()
        return buf

    def _shared_layout(self, shared: List[torch.Tensor]) -> "_Layout":
        """Where each shared parameter's gradient sits in a row of G, kept and made again
        only when the parameters change (their ids and sizes), not per step."""
        ids, sizes = tuple(map(id, shared)), tuple(map(torch.Tensor.numel, shared))
        layout = self._layout
        if layout is None or layout.ids != ids or layout.sizes != sizes:
            ends = list(itertools.accumulate(sizes))
            layout = self._layout = _Layout(ids, sizes, list(zip([0] + ends[:-1], ends)),
                                            ends[-1])
        return layout

    def _row_views(self, grads: torch.Tensor, shared: List[torch.Tensor],
                   layout: "_Layout") -> List[List[torch.Tensor]]:
        """Every row of G (the kept buffer) as views shaped like the shared parameters,
        ``G[r, a:b].view_as(p)``: the ``.grad`` a task's backward accumulates into
        (:meth:`_task_passes`), and, for row 0 when the aggregator wrote the direction there,
        the ``.grad`` the parameters get. Kept with G and made again only when G or the
        layout changes: a slice and a view per parameter, row and step are dispatcher
        calls that a GPU step, bound by them on a small model, feels."""
        if self._views_of is not layout:  # (a new G resets it: _task_buffer)
            self._views_of = layout
            self._views = [[row[a:b].view_as(p) for p, (a, b) in zip(shared, layout.offsets)]
                           for row in grads]
        return self._views

    def _direction_buffer(self, grads: torch.Tensor) -> Optional[torch.Tensor]:
        """Where the aggregator writes the shared direction (``.grad`` then views it): row 0
        of G, which is no longer needed once the Gramian is formed (``combine64`` computes
        each chunk before overwriting it). No memory beyond G, and no fresh P-sized tensor
        per step (page faults on a CPU, docs/backward_engine.md). None for aggregators
        without ``out``. The caller's ``.grad`` must be None before the next step (checked),
        so G is never rewritten while the optimizer still reads it."""
        return grads[0] if self._takes_out else None

    @staticmethod
    def _loss_row(losses: Mapping[str, torch.Tensor], rows: List[str],
                  device: torch.device) -> torch.Tensor:
        """The (unscaled, detached) loss of each row's task; 0 for an absent task."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([losses[t].detach().reshape(()).to(device=device, dtype=torch.float64)
                            if t in losses else zero for t in rows])

    @staticmethod
    def _skip(rows: List[str], params: Tensors, scale: float) -> BackwardResult:
        """No rank had any task: no gradient, and the caller skips the optimizer step."""
        for p in params:
            p.grad = None
        return BackwardResult(rows, loss_scale=scale, empty=True)

    def _block_gramians(self, grads: torch.Tensor, group_sizes: List[int]
                        ) -> Optional[torch.Tensor]:
        """``[B, T, T]`` float64 Gramians of the column blocks, for an aggregator that works
        per block (GradVac: ``block_gramians``), formed once: their sum is the whole Gramian.
        None for the others."""
        if not self._takes_blocks:
            return None
        sizes = self.aggregator.block_sizes(grads.shape[1], group_sizes)
        return exact_block_gramians(grads, sizes, self.gramian_kernel, self._scratch)

    def _gramian(self, grads: torch.Tensor) -> torch.Tensor:
        """The exact float64 Gramian of G with the engine's ``gramian_kernel``."""
        return exact_gramian(grads, self.gramian_kernel, self._scratch)

    def _scratch(self, grads: torch.Tensor) -> Optional[torch.Tensor]:
        """The float64 scratch of :func:`gramian64` for G on a CPU, kept from step to step and
        grown when G outgrows it (no allocation per step under glibc: see
        :func:`~.aggregation._utils.work_buffer`). None on other devices, whose caching
        allocators make a per-call buffer free and where a kept one would hold memory (and
        its stream) between steps."""
        if grads.device.type != "cpu":
            return None
        rows, numel = grads.shape
        work = self._work
        if work is None or work.shape[0] < rows + 1 \
                or work.shape[1] < min(numel, chunk_columns(grads.device)):
            self._work = None  # free the old one before allocating
            self._work = work = work_buffer(rows, numel, grads.device)
        return work

    def _engine_groups(self, layer_sizes: List[int]) -> Optional[List[int]]:
        """The column groups the engine hands a per-layer aggregator (``group_sizes``): one
        per shared parameter, unless the aggregator was built with its own (then None)."""
        if not self._takes_groups or getattr(self.aggregator, "group_sizes", None) is not None:
            return None
        return layer_sizes

    def _aggregate(self, grads: torch.Tensor, gramian: torch.Tensor,
                   loss_values: Optional[torch.Tensor],
                   group_sizes: Optional[List[int]],
                   out: Optional[torch.Tensor] = None,
                   blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
        kwargs = {}
        if self._takes_gramian:
            kwargs["gramian"] = gramian
        if out is not None:
            kwargs["out"] = out
        if blocks is not None:
            kwargs["block_gramians"] = blocks
        if self._needs_losses:
            kwargs["losses"] = loss_values.to(grads.device)
        if group_sizes is not None:
            kwargs["group_sizes"] = group_sizes
        self.aggregations += 1
        return self.aggregator(grads, **kwargs)

    def _all_reduce_tasks(self, grads: torch.Tensor, loss_values: torch.Tensor,
                          counts: Dict[str, int], per_task: Dict[str, List[torch.Tensor]],
                          extras: List[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over the W ranks of G (one row per model task, zeros where a rank lacks the
        task), of every task's head gradients and of the extras, in one all-reduce; the
        losses are averaged over the ``counts[t]`` ranks that have each task. The task losses
        were weighted by ``W / c_t`` (:meth:`_rank_weighted`), so each task's mean over all
        ranks is its mean over the ranks that have it. Returns the rows of the tasks present on
        any rank (all rows for aggregators with per-task state)."""
        dist = torch.distributed
        world = world_size()
        params = [p for t in self.task_names for p in per_task.get(t, [])] + list(extras)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buffer = torch.cat([grads.reshape(-1), loss_values.to(grads)]
                           + [p.grad.reshape(-1) for p in params])
        dist.all_reduce(buffer)
        buffer /= world
        n_g, n_t = grads.numel(), len(self.task_names)
        grads = buffer[:n_g].view_as(grads)
        c = torch.tensor([float(counts[t]) for t in self.task_names], dtype=torch.float64,
                         device=grads.device)
        loss_values = buffer[n_g:n_g + n_t].double() * world / c.clamp(min=1)
        offset = n_g + n_t
        for p in params:
            p.grad.copy_(buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self._drop_dormant(per_task, counts)
        if self._all_rows:
            return grads, loss_values
        keep = [i for i, t in enumerate(self.task_names) if counts[t] > 0]
        return grads[keep], loss_values[keep]

    # ------------------------------------------------------------------ representation level
    def _representation_level(self, losses: Mapping[str, torch.Tensor], tasks: List[str],
                              shared: List[torch.Tensor],
                              per_task: Dict[str, List[torch.Tensor]],
                              feats: List[torch.Tensor],
                              extras: List[torch.Tensor],
                              counts: Optional[Dict[str, int]]) -> BackwardResult:
        scale = self.scale
        for z in feats:
            if not z.requires_grad:
                raise MTLConfigError("features: the shared representation does not require "
                                     "grad; pass the encoder output, not a detached copy")
        sizes = [z.numel() for z in feats]
        rows = list(self.task_names) if self._all_rows else list(tasks)
        world = world_size()
        if counts is not None and not any(counts.values()):
            return self._skip(rows, shared + [p for t in tasks for p in per_task[t]] + extras,
                              scale)
        # float32 at least: under autocast the features are half precision, and the unscaled
        # task gradients, their Gramian and the aggregate must not be
        grads = torch.zeros(len(rows), sum(sizes), device=feats[0].device,
                            dtype=torch.promote_types(feats[0].dtype, torch.float32))
        for task in tasks:
            i = rows.index(task)
            own = per_task[task] + extras
            out = torch.autograd.grad(_scaled(losses[task], scale), feats + own,
                                      allow_unused=True,
                                      retain_graph=True)
            col = 0
            for z, g in zip(feats, out[:len(feats)]):
                if g is not None:
                    grads[i, col:col + z.numel()] = g.reshape(-1)
                col += z.numel()
            # heads and extras follow the per-task rule (W / c_t, then the mean over ranks);
            # G stays per rank and unweighted: each rank aggregates its own batch
            share = 1.0 if counts is None else world / counts[task]
            for p, g in zip(own, out[len(feats):]):
                if g is not None:
                    g = g * share if share != 1.0 else g
                    p.grad = g if p.grad is None else p.grad + g
        head_params = [p for t in tasks for p in per_task[t]] + extras
        if scale != 1.0:
            grads.div_(scale)
            for p in head_params:
                if p.grad is not None:
                    p.grad.div_(scale)
        gramian = self._gramian(grads)  # float64, as at parameter level
        result = BackwardResult(rows, loss_scale=scale)
        head_grads = [p.grad for p in head_params if p.grad is not None]
        # G is per rank at this level: every rank must take the same branch (collectives)
        host = _host_gramian(gramian, head_grads)
        if _any_rank(host is None, grads.device):
            return self._finish(result, shared + head_params, True)
        if tasks:
            result.gramian = host
            direction = self._aggregate(grads, host,
                                        self._loss_row(losses, rows, grads.device)
                                        if self._needs_losses else None, None)
            del grads
            pieces = list(torch.split(direction * scale, sizes))
            torch.autograd.backward(feats, [d.view_as(z).to(z.dtype)
                                            for d, z in zip(pieces, feats)], inputs=shared)
        else:  # other ranks have tasks: this rank adds zeros to the mean over ranks
            direction = grads.new_zeros(sum(sizes))
        if scale != 1.0:
            for p in shared:
                if p.grad is not None:
                    p.grad.div_(scale)
        found_inf = _any_rank(not _all_finite([p.grad for p in shared if p.grad is not None]),
                              direction.device)
        if counts is not None:
            head_params = [p for t in self.task_names for p in per_task[t]] + extras
            if not found_inf:
                self._all_reduce_mean(shared + head_params)
                self._drop_dormant(per_task, counts)
        return self._finish(result, shared + head_params, found_inf)

    def _drop_dormant(self, per_task: Dict[str, List[torch.Tensor]],
                      counts: Dict[str, int]) -> None:
        """``grad = None`` for the heads of tasks no rank has (the optimizer then leaves them
        alone, as in a single process), after a collective gave them zeros."""
        for t in self.task_names:
            if counts[t] == 0:
                for p in per_task.get(t, []):
                    p.grad = None

    @staticmethod
    def _all_reduce_mean(params: Tensors) -> None:
        """DDP's semantics for one ordinary backward: average every ``.grad`` over ranks."""
        dist = torch.distributed
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def split_parameters(shared: nn.Module, heads: Mapping[str, nn.Module]
                     ) -> tuple[List[nn.Parameter], Dict[str, List[nn.Parameter]]]:
    """``(shared_params, task_params)`` from an encoder module and a dict of task heads."""
    return (list(shared.parameters()),
            {t: list(m.parameters()) for t, m in heads.items()})
