"""One object that composes task allocation, loss balancing and the per-task backward.

The framework adapters (mmseg's optimizer wrapper, detectron2's trainer) hold one
:class:`MTLController` and call, per optimizer step::

    mask = controller.next_mask(available)          # FT/STA/ISTA allocation
    ... forward; per-task losses over the allocated samples (masked_task_mean) ...
    result = controller.backward(losses, shared_params, task_params, features=z)
    if not result.found_inf:
        optimizer.step()
    controller.after_step(losses)                   # balancer bookkeeping

The order inside :meth:`backward` is: finite check (naming the task) → GradNorm's weight
gradient (if used) → balancing ``λ_t l_t`` → task reduction (sum or 1/T) → the engine
(aggregation at parameter or representation level, AMP, DDP). The controller is an
``nn.Module``: the balancer's learnable weights, the aggregator's state and (through
``get_extra_state``) the allocator's RNG and ISTA position and the loss scale are all in its
``state_dict``, so a framework checkpoint of the model that owns it carries everything.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from .aggregation import build_aggregator
from .allocation import REDUCTIONS, TaskAllocator
from .amp import DynamicLossScaler
from .backward import BackwardResult, TaskBackward, Tensors
from .balancing import build_balancer
from .distributed import mean_over_ranks, world_size
from .tasks import MTLConfigError, check_finite_losses, check_task_names


class MTLController(nn.Module):
    """Allocation + balancing + aggregation for one multi-task model.

    Args:
        task_names: the model's tasks.
        allocation: ``dict(mode="ft"|"sta"|"ista"|"gap", k=1, seed=0, gap=1)`` (see
            :class:`~mtl_plugins.core.allocation.TaskAllocator`); ``None`` is FT.
        balancer: a balancer name or ``dict(type=..., ...)``; ``None`` is fixed weights of 1.
        aggregator: an aggregator name or ``dict(type=..., ...)``; ``None`` is the plain summed
            loss (one backward).
        level: ``"parameter"`` or ``"representation"`` (where the aggregator acts).
        task_reduction: ``"sum"`` (Σ_t λ_t l_t) or ``"mean"`` ((1/T) Σ_t λ_t l_t, paper 001).
        amp: ``False``, ``True`` or a dict of :class:`DynamicLossScaler` arguments.
        rank: the DDP rank: each rank draws its own allocation stream (see
            :class:`~mtl_plugins.core.allocation.TaskAllocator`).
        vjp: ``"sequential"`` or ``"batched"`` task gradients (see ``TaskBackward``).
    """

    def __init__(self, task_names: Sequence[str], allocation: Optional[Mapping[str, Any]] = None,
                 balancer: Any = None, aggregator: Any = None, level: str = "parameter",
                 task_reduction: str = "sum", amp: bool | Mapping[str, Any] = False,
                 rank: int = 0, vjp: str = "sequential") -> None:
        super().__init__()
        self.task_names = check_task_names(task_names)
        alloc_cfg = dict(allocation or {})
        unknown = set(alloc_cfg) - {"mode", "k", "seed", "gap"}
        if unknown:
            raise MTLConfigError(f"allocation: unknown key(s) {sorted(unknown)}; expected "
                                 "'mode', 'k', 'seed', 'gap'")
        self.allocator = TaskAllocator(self.task_names, rank=rank, **alloc_cfg)
        self.balancer = build_balancer(balancer, self.task_names)
        self.aggregator = build_aggregator(aggregator) if aggregator is not None else None
        if task_reduction not in REDUCTIONS:
            raise MTLConfigError(f"task_reduction={task_reduction!r}: expected one of "
                                 f"{list(REDUCTIONS)}")
        self.task_reduction = task_reduction
        if amp:
            self.loss_scaler: Optional[DynamicLossScaler] = DynamicLossScaler(
                **(dict(amp) if isinstance(amp, Mapping) else {}))
        else:
            self.loss_scaler = None
        self.engine = TaskBackward(self.task_names, self.aggregator, level=level,
                                   loss_scaler=self.loss_scaler, vjp=vjp)

    def set_aggregator(self, aggregator) -> None:
        """Replace the aggregator (e.g. wrap it in GradSplit once the model is known); the
        engine keeps its level, loss scaler and VJP mode."""
        self.aggregator = aggregator
        old = self.engine
        self.engine = TaskBackward(self.task_names, aggregator, level=old.level,
                                   loss_scaler=self.loss_scaler, check_losses=old.check_losses,
                                   vjp=old.vjp)
        self.engine.sync_bn = old.sync_bn

    # ------------------------------------------------------------------ allocation
    def start_batch(self, available: torch.Tensor | int,
                    agree: Optional[Callable[[int], int]] = None) -> int:
        """Draw the allocation plan of a new batch; returns its number of optimizer steps
        (``agree``: see :meth:`TaskAllocator.start_batch`)."""
        return self.allocator.start_batch(available, agree)

    def next_mask(self) -> torch.Tensor:
        """The ``[B, T]`` allocation mask of the next (sub-)step."""
        return self.allocator.next_mask()

    # ------------------------------------------------------------------ balancing
    def weighted_losses(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``λ_t l_t`` (and the 1/T of ``task_reduction="mean"``) for the present tasks."""
        weighted = self.balancer(losses)
        if self.task_reduction == "mean":
            weighted = {t: v / len(self.task_names) for t, v in weighted.items()}
        return weighted

    def current_weights(self) -> Dict[str, float]:
        return self.balancer.current_weights()

    # ------------------------------------------------------------------ backward
    def backward(self, losses: Mapping[str, torch.Tensor], shared_params: Tensors,
                 task_params: Optional[Mapping[str, Tensors]] = None,
                 features: Optional[torch.Tensor | Tensors] = None,
                 gradnorm_params: Optional[Tensors] = None,
                 keepalive: Optional[torch.Tensor] = None) -> BackwardResult:
        """Balance the per-task ``losses`` and write ``.grad`` (see the module docstring).

        Args:
            gradnorm_params: for GradNorm, the parameters of the last shared layer whose
                gradient norms it balances (default: the last shared parameter with more
                than one dimension).
            keepalive: the zero-weighted term that keeps the absent tasks' heads in DDP's
                backward (plain path; see :class:`~mtl_plugins.core.backward.TaskBackward`).
                Under DDP, ``losses`` may be empty on a rank whose batch has no task.
        """
        weighted = self.balanced_losses(losses, shared_params, gradnorm_params)
        # learnable loss weights (e.g. uncertainty) train with the engine's backward;
        # GradNorm's weights got their own gradient in balanced_losses
        extras = [] if self.balancer.needs_shared_grads else list(self.balancer.parameters())
        result = self.engine(weighted, shared_params, task_params, features=features,
                             extra_params=extras, keepalive=keepalive)
        result.weighted_losses = {t: v.detach() for t, v in weighted.items()}
        return result

    def balanced_losses(self, losses: Mapping[str, torch.Tensor], shared_params: Tensors,
                        gradnorm_params: Optional[Tensors] = None) -> Dict[str, torch.Tensor]:
        """The first half of :meth:`backward`: finite check (naming the task), GradNorm's
        weight gradient written to its ``.grad`` (if used), then ``λ_t l_t`` with the task
        reduction. For adapters that run the backward themselves (a single summed backward of
        the returned losses equals :meth:`backward` without an aggregator)."""
        if self.loss_scaler is None:
            check_finite_losses(losses)
        if self.balancer.needs_shared_grads:
            params = list(gradnorm_params) if gradnorm_params is not None else \
                [p for p in shared_params if p.requires_grad and p.dim() > 1][-1:]
            # under DDP every rank joins GradNorm's all-reduces, a rank without any task too
            if losses or world_size() > 1:
                self.balancer.balance_grads(losses, params)
            self._all_reduce_balancer_grads()
        # every rank calls the balancer, with no task too (RLW draws its weights in step)
        return self.weighted_losses(losses)

    def _all_reduce_balancer_grads(self) -> None:
        dist = torch.distributed
        if world_size() == 1:
            return
        for p in self.balancer.parameters():  # every rank reduces every weight (no hang)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()

    def after_step(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Balancer bookkeeping after ``optimizer.step()``.

        ``losses``: the unweighted per-task losses of the step (FAMO with
        ``update="after_step"`` needs them recomputed on the same batch after the step:
        see :attr:`needs_post_step_losses`).
        """
        self.balancer.after_step(mean_over_ranks(
            losses, self.task_names, next(self.buffers(), torch.zeros(())).device))
        renormalize = getattr(self.balancer, "renormalize_", None)
        if renormalize is not None:
            renormalize()

    @property
    def needs_post_step_losses(self) -> bool:
        return bool(getattr(self.balancer, "needs_post_step_losses", False))

    def on_epoch_end(self) -> None:
        self.balancer.on_epoch_end()

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Dict[str, Any]:
        return {"allocator": self.allocator.state_dict(),
                "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.allocator.load_state_dict(state["allocator"])
        if self.loss_scaler is not None and state.get("loss_scaler") is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
