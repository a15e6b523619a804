"""One object that composes task allocation, loss balancing and the per-task backward.

The framework adapters (mmseg's optimizer wrapper, detectron2's trainer) hold one
:class:`MTLController` and call, per optimizer step::

    held = HeldBatches(controller.allocator)        # FT/STA/ISTA/gap allocation
    if controller.allocator.wants_batch:            # a new data batch is due
        held.add(next_batch, available)
    data, mask = held.next_step()                   # a new or a held batch, its mask
    ... forward; per-task losses over the allocated samples (masked_task_mean) ...
    result = controller.backward(losses, shared_params, task_params, features=z)
    stepped = not (result.found_inf or result.empty)
    if stepped:
        optimizer.step()
    controller.after_step(losses, stepped)          # bookkeeping, no-silent-no-op check

The order inside :meth:`backward` is: finite check (naming the task) → GradNorm's weight
gradient (if used) → balancing ``λ_t l_t`` → task reduction (sum or 1/T) → the engine
(aggregation at parameter or representation level, AMP, DDP). The controller is an
``nn.Module``: the balancer's learnable weights, the aggregator's state and (through
``get_extra_state``) the allocator's RNG and ISTA position and the loss scale are all in its
``state_dict``, so a framework checkpoint of the model that owns it carries everything.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .aggregation import build_aggregator
from .allocation import REDUCTIONS, TaskAllocator
from .amp import DynamicLossScaler
from .backward import BackwardResult, TaskBackward, Tensors
from .balancing import build_balancer
from .balancing.gradnorm import last_shared_layer
from .distributed import mean_over_ranks, world_size
from .exercise import ExerciseCheck, counter_moved, tensors_changed
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
        gramian_kernel: ``"auto"``, ``"blas"``, ``"c"`` or ``"fused"``: how the exact
            Gramian of G is formed (see ``TaskBackward``).
        check_exercised: the window, in real optimizer steps, after which every configured
            piece must have acted (:mod:`~mtl_plugins.core.exercise`); 0 switches it off.

    Adapters set :attr:`config_keys` to the config keys their users write (e.g.
    ``MTL.BALANCER``), so that errors name them.
    """

    def __init__(self, task_names: Sequence[str], allocation: Optional[Mapping[str, Any]] = None,
                 balancer: Any = None, aggregator: Any = None, level: str = "parameter",
                 task_reduction: str = "sum", amp: bool | Mapping[str, Any] = False,
                 rank: int = 0, vjp: str = "sequential", check_exercised: int = 10,
                 gramian_kernel: str = "auto") -> None:
        super().__init__()
        self.task_names = check_task_names(task_names)
        self.exercise = ExerciseCheck(check_exercised)
        self._first_losses: Optional[Dict[str, float]] = None
        self._losses_moved = False
        self.config_keys: Dict[str, str] = {"balancer": "balancer", "aggregator": "aggregator",
                                            "check_exercised": "check_exercised"}
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
                                   loss_scaler=self.loss_scaler, vjp=vjp,
                                   gramian_kernel=gramian_kernel)
        #: GradNorm's last shared layer, resolved at the first step (None until then)
        self.gradnorm_layer: Optional[List[torch.Tensor]] = None
        # its positions among the trainable shared parameters (checkpointed: a resumed run
        # measures the layer the run chose, not one chosen again from other tasks)
        self._gradnorm_index: Optional[List[int]] = None

    def set_aggregator(self, aggregator) -> None:
        """Replace the aggregator (e.g. wrap it in GradSplit once the model is known); the
        engine keeps its level, loss scaler, VJP mode and Gramian kernel."""
        self.aggregator = aggregator
        old = self.engine
        self.engine = TaskBackward(self.task_names, aggregator, level=old.level,
                                   loss_scaler=self.loss_scaler, check_losses=old.check_losses,
                                   vjp=old.vjp, gramian_kernel=old.gramian_kernel)
        self.engine.sync_bn = old.sync_bn
        self.engine.aggregations = old.aggregations

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
                gradient norms it balances (default: found in the autograd graph of the
                first step's losses by :func:`~mtl_plugins.core.balancing.gradnorm.
                last_shared_layer`, then kept: :attr:`gradnorm_layer`).
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
        if not self.exercise.armed:  # the probes' snapshots, before the first step
            self.exercise.arm(self._exercise_probes())
        if self.loss_scaler is None:
            check_finite_losses(losses)
        if self.balancer.needs_shared_grads:
            params = list(gradnorm_params) if gradnorm_params is not None else \
                self._last_shared_layer(losses, shared_params)
            # under DDP every rank joins GradNorm's all-reduces, a rank without any task too;
            # its weight gradient is then the same on every rank (rank-averaged statistics)
            if losses or world_size() > 1:
                self.balancer.balance_grads(losses, params)
        # every rank calls the balancer, with no task too (RLW draws its weights in step)
        return self.weighted_losses(losses)

    def _last_shared_layer(self, losses: Mapping[str, torch.Tensor],
                           shared_params: Tensors) -> List[torch.Tensor]:
        """GradNorm's ``W``: resolved from the autograd graph at the first step with a loss
        (``last_shared_layer``) and kept, so that every step measures the same layer. Under
        DDP the ranks take the union of their choices (a rank without any task contributes
        none): GradNorm all-reduces the gradients of ``W``, so every rank needs the same one."""
        if self.gradnorm_layer is not None:
            return self.gradnorm_layer
        params = [p for p in shared_params if p.requires_grad]
        if self._gradnorm_index is not None:  # resumed: the layer the run chose
            self.gradnorm_layer = [params[i] for i in self._gradnorm_index]
            return self.gradnorm_layer
        chosen = last_shared_layer(losses, params) if losses else []
        if world_size() > 1:
            ids = {id(p) for p in chosen}
            mask = torch.tensor([float(id(p) in ids) for p in params], device=params[0].device)
            torch.distributed.all_reduce(mask, op=torch.distributed.ReduceOp.MAX)
            chosen = [p for p, m in zip(params, mask.tolist()) if m > 0]
        if not chosen:  # no rank had a task yet: any common choice, not kept
            return params[-1:]
        self.gradnorm_layer = chosen
        ids = {id(p) for p in chosen}
        self._gradnorm_index = [i for i, p in enumerate(params) if id(p) in ids]
        return chosen

    def after_step(self, losses: Mapping[str, torch.Tensor], stepped: bool = True) -> None:
        """Balancer bookkeeping after ``optimizer.step()``, then the no-silent-no-op check.

        ``losses``: the unweighted per-task losses of the step (FAMO with
        ``update="after_step"`` needs them recomputed on the same batch after the step:
        see :attr:`needs_post_step_losses`). ``stepped``: the optimizer really stepped (not
        skipped for an AMP overflow or an empty step); only such steps count towards the
        :mod:`~mtl_plugins.core.exercise` window.
        """
        buffer = next(self.buffers(), None)  # (no tensor made per step when there is none)
        device = buffer.device if buffer is not None else torch.get_default_device()
        averaged = mean_over_ranks(losses, self.task_names, device)
        self._note_losses(averaged)
        if not stepped:
            self.balancer.skip_step()
        self.balancer.after_step(averaged)
        self.exercise.step(stepped, device, self.config_keys["check_exercised"])

    def _note_losses(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Whether the losses ever changed (weights computed from losses cannot move if they
        never did): compared with the first step's, while the check is still pending."""
        if not self.exercise.pending or self._losses_moved:
            return
        values = {t: float(v) for t, v in losses.items()}
        if self._first_losses is None:
            self._first_losses = values
        elif values != {t: self._first_losses.get(t) for t in values}:
            self._losses_moved = True

    def _exercise_probes(self) -> list:
        """What each configured piece must have done by its deadline (see
        :mod:`~mtl_plugins.core.exercise`)."""
        probes = []
        if self.aggregator is not None:
            probes.append((None, self.config_keys["aggregator"], type(self.aggregator).__name__,
                           counter_moved(lambda: self.engine.aggregations,
                                         "the backward engine never aggregated task gradients",
                                         "the adapter's step bypassed MTLController.backward")))
        bal = self.balancer
        own = bal.moves_within()
        if own is not None:
            learnable = [p for p in bal.parameters() if p.requires_grad]
            if learnable:
                what = "its learnable weights"
                hint = ("no optimizer updated them: are they in the optimizer's parameter "
                        "groups, with a learning rate above 0?")
                make = tensors_changed(lambda: learnable, what, hint)
            else:
                weights = tensors_changed(lambda: [bal.task_weights()], "its task weights",
                                          f"expected them to move within {own} steps while "
                                          "the losses changed")

                def make():
                    probe = weights()
                    return lambda: None if not self._losses_moved else probe()
            probes.append((own, self.config_keys["balancer"], type(bal).__name__, make))
        return probes

    @property
    def needs_post_step_losses(self) -> bool:
        return bool(getattr(self.balancer, "needs_post_step_losses", False))

    def on_epoch_end(self) -> None:
        self.balancer.on_epoch_end()

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Dict[str, Any]:
        return {"allocator": self.allocator.state_dict(),
                "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
                "exercise": self.exercise.state_dict(), "gradnorm_layer": self._gradnorm_index}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.allocator.load_state_dict(state["allocator"])
        self.exercise.load_state_dict(state.get("exercise"))
        self._gradnorm_index = state.get("gradnorm_layer")
        self.gradnorm_layer = None
        if self.loss_scaler is not None and state.get("loss_scaler") is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
