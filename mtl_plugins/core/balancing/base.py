"""Base class for loss balancing (task weighting).

A balancer maps the per-task losses of a step to weighted losses. It is an ``nn.Module`` so
that learnable weights trained by the framework's optimizer (uncertainty log-variances) are
parameters that the optimizer and checkpoint see; weights with their own update rule (GradNorm,
FAMO) are buffers, stepped by the balancer itself; non-tensor state (epoch histories, RNG)
goes through ``get_extra_state`` / ``set_extra_state``.

Contract:
- ``forward(losses)`` takes ``{task: scalar loss}`` for the tasks *present* in the step
  (absent tasks are simply missing) and returns ``{task: weighted scalar loss}`` for the same
  keys. It must not divide by T of the present tasks only: weights are per task name.
- ``current_weights()`` returns ``{task: float}`` for logging.
- Hooks with default no-ops: ``after_step(losses)`` (called once per optimizer step with the
  detached *unweighted* losses), ``on_epoch_end()``, ``update_kpis(kpis)`` (DTP).
- Balancers that need gradients (GradNorm) set ``needs_shared_grads = True`` and implement
  ``balance_grads(losses, shared_params)``, called by the engine before the task backward
  (the controller passes the last shared layer found in the autograd graph).
- Balancers whose ``after_step`` needs the losses *after* the optimizer step, recomputed on
  the same batch (FAMO), set ``needs_post_step_losses = True``; for every other balancer the
  losses of the step itself are what ``after_step`` expects.

Helpers added for the subclasses (they do not change the contract): per-task option parsing
(:func:`per_task_values`), number checks that raise :class:`MTLConfigError` naming the key and
value, ``_index`` (task name -> position) and ``_move_buffers_to`` (buffer-only balancers follow
the device of the losses, so a balancer that was not moved with the model still works).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..tasks import MTLConfigError, check_known_tasks, check_task_names

PerTask = Union[float, int, Mapping[str, float], Sequence[float], None]


class LossBalancer(nn.Module):
    """Base loss balancer; subclasses override :meth:`task_weights` or :meth:`forward`."""

    needs_shared_grads: bool = False
    needs_post_step_losses: bool = False

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        self.task_names = check_task_names(task_names)

    def check_losses(self, losses: Mapping[str, torch.Tensor]) -> None:
        check_known_tasks(losses.keys(), self.task_names, key="losses")

    def _index(self, tasks: Sequence[str]) -> List[int]:
        """Positions of ``tasks`` in ``task_names``."""
        return [self.task_names.index(t) for t in tasks]

    def _present(self, losses: Mapping[str, torch.Tensor]
                 ) -> Tuple[List[str], torch.device, torch.Tensor]:
        """``(tasks, device, positions)`` of the losses of a step, buffers moved to their device."""
        tasks = list(losses)
        device = losses[tasks[0]].device
        self._move_buffers_to(device)
        return tasks, device, torch.tensor(self._index(tasks), device=device)

    def _move_buffers_to(self, device: torch.device) -> None:
        """Move this module's own buffers to ``device`` if they live elsewhere (no parameters)."""
        for name, buf in self._buffers.items():
            if buf is not None and buf.device != device:
                self._buffers[name] = buf.to(device)

    def task_weights(self) -> torch.Tensor:
        """Current ``[T]`` weights in ``task_names`` order (default: ones)."""
        return torch.ones(len(self.task_names))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        self.check_losses(losses)
        w = self.task_weights()
        return {t: w[self.task_names.index(t)].to(l) * l for t, l in losses.items()}

    def current_weights(self) -> Dict[str, float]:
        w = self.task_weights().detach().float().tolist()
        return dict(zip(self.task_names, w))

    def after_step(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Record the detached, unweighted losses of one optimizer step (default: nothing)."""

    def skip_step(self) -> None:
        """The optimizer did not step (AMP overflow, no task on any rank): drop whatever was
        prepared for this step's update of the balancer's own weights (default: nothing).
        Called by the controller before :meth:`after_step` of such a step."""

    def on_epoch_end(self) -> None:
        """Epoch-level update (default: nothing)."""

    def update_kpis(self, kpis: Mapping[str, float]) -> None:
        """Receive per-task key performance indicators in [0, 1] (default: nothing)."""

    def required_driver(self) -> Optional[str]:
        """What the training loop must call for this balancer to act, beyond ``after_step``:
        ``"epoch_end"`` (:meth:`on_epoch_end` after every epoch), ``"kpis"``
        (:meth:`update_kpis` during training) or ``None``. Adapters refuse a run that cannot
        drive it: the weights would silently stay at their initial values."""
        return None

    def moves_within(self) -> Optional[int]:
        """Real optimizer steps after which, if this balancer acts, its weights (its
        learnable parameters, if it has any) differ from their values before the first step;
        ``None`` when no such deadline exists (fixed weights, epoch- or KPI-driven). Read by
        the no-silent-no-op check (:mod:`~mtl_plugins.core.exercise`)."""
        return None


# --------------------------------------------------------------------------------------------
# Option checks shared by the balancers. Keys are spelled as in the config
# (``balancer.<option>``) so the error names what the user wrote.


def check_number(
    value: object,
    key: str,
    *,
    min_value: Optional[float] = None,
    max_value: Optional[float] = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """Return ``value`` as a finite float inside the given bounds, else raise MTLConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MTLConfigError(f"{key}={value!r}: expected a finite number")
    x = float(value)
    if not math.isfinite(x):
        raise MTLConfigError(f"{key}={value!r}: expected a finite number")
    if min_value is not None and (x < min_value or (not min_inclusive and x == min_value)):
        rel = ">=" if min_inclusive else ">"
        raise MTLConfigError(f"{key}={value!r}: expected a number {rel} {min_value}")
    if max_value is not None and (x > max_value or (not max_inclusive and x == max_value)):
        rel = "<=" if max_inclusive else "<"
        raise MTLConfigError(f"{key}={value!r}: expected a number {rel} {max_value}")
    return x


def per_task_values(
    value: PerTask,
    task_names: Sequence[str],
    key: str,
    default: float,
    *,
    require_all: bool = False,
    **bounds: object,
) -> List[float]:
    """Expand a scalar, a ``{task: value}`` dict or a list in ``task_names`` order to T floats.

    ``None`` gives ``default`` for every task. A dict naming an unknown task raises; a dict
    missing tasks raises when ``require_all`` and otherwise fills ``default``. Every value is
    checked with :func:`check_number` (``bounds`` are its keyword arguments).
    """
    names = list(task_names)
    if value is None:
        raw = {t: default for t in names}
    elif isinstance(value, Mapping):
        unknown = [t for t in value if t not in names]
        if unknown:
            raise MTLConfigError(
                f"{key}: unknown task name(s) {unknown!r}; expected keys from {names!r}"
            )
        missing = [t for t in names if t not in value]
        if missing and require_all:
            raise MTLConfigError(
                f"{key}={dict(value)!r}: missing task(s) {missing!r}; expected one value for "
                f"each of {names!r}"
            )
        raw = {t: value.get(t, default) for t in names}
    elif isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise MTLConfigError(
                f"{key}={list(value)!r}: expected {len(names)} values, one per task in the "
                f"order {names!r}"
            )
        raw = dict(zip(names, value))
    else:
        raw = {t: value for t in names}
    return [check_number(raw[t], f"{key}[{t!r}]", **bounds) for t in names]  # type: ignore[arg-type]


def own_optimizer_step_(balancer: nn.Module, value: torch.Tensor, grad: torch.Tensor) -> None:
    """One step of a balancer's own optimizer on ``value`` (in place): plain SGD
    (``value -= lr * grad``) or Adam with bias correction (Kingma & Ba 2015, Alg. 1; betas
    ``balancer.betas``, eps ``balancer.adam_eps``), with the moments in the balancer's buffers
    ``exp_avg`` / ``exp_avg_sq`` and the step count in ``num_updates`` (so they checkpoint).
    Used by the balancers that train their weights outside the model's optimizer (GradNorm,
    FAMO): no model LR schedule or weight decay reaches them."""
    balancer.num_updates += 1
    if balancer.optimizer == "sgd":
        value.sub_(balancer.lr * grad)
        return
    b1, b2 = balancer.betas
    balancer.exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
    balancer.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bc1 = 1 - b1 ** balancer.num_updates
    bc2 = 1 - b2 ** balancer.num_updates
    denom = (balancer.exp_avg_sq / bc2).sqrt() + balancer.adam_eps
    value.sub_(balancer.lr * (balancer.exp_avg / bc1) / denom)


def stack_detached(losses: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> torch.Tensor:
    """Stack the *detached* scalar losses of ``tasks`` into a float32 (float64 if any loss is
    float64) ``[n]`` tensor.

    Weighted losses are always built per task as ``w_t * L_t`` (never by indexing a stacked
    loss tensor): a per-task backward of one weighted loss must not traverse the graphs of the
    other tasks, which a ``torch.stack`` with graph would do (with zero gradients).
    """
    dtype = torch.float64 if any(losses[t].dtype == torch.float64 for t in tasks) else torch.float32
    return torch.stack([losses[t].detach().reshape(()).to(dtype) for t in tasks])
