"""Uncertainty weighting (homoscedastic task uncertainty).

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018 (Sec. 3, regression and classification likelihoods);
survey Eq. 6 (Vandenhende et al., TPAMI 2021).

The paper's objective for a regression task is ``L_t / (2 sigma_t^2) + log sigma_t`` and for a
classification (softmax) task ``L_t / sigma_t^2 + log sigma_t``. We learn the log-variance
``s_t = log sigma_t^2`` (numerically stable, unconstrained), which turns them into

- regression form (default, every task):  ``0.5 * exp(-s_t) * L_t + 0.5 * s_t``
- classification form (tasks listed in ``classification_tasks``): ``exp(-s_t) * L_t + 0.5 * s_t``

since ``log sigma_t = s_t / 2``. Most implementations (and the survey's experiments) apply the
regression form to every task; the classification form is opt-in per task.

Gradient of the weighted loss with respect to the log-variance (checked in the tests):
``d/ds_t = -c_t exp(-s_t) L_t + 0.5`` with ``c_t = 0.5`` (regression) or ``1`` (classification);
it vanishes at ``s_t = log(2 c_t L_t)``, so the weight ``c_t exp(-s_t)`` tends to ``1/(2 L_t)``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from ..tasks import MTLConfigError, check_known_tasks
from .base import LossBalancer, PerTask, per_task_values


class UncertaintyWeighting(LossBalancer):
    """Learned log-variances ``s_t`` (``nn.Parameter`` ``log_vars`` of shape ``[T]``).

    Args:
        task_names: the tasks.
        init_log_var: initial ``s_t`` (scalar, ``{task: value}`` or list); default 0, i.e.
            ``sigma = 1`` and weight 0.5 in the regression form.
        classification_tasks: tasks that use the classification form ``exp(-s) L + s/2``;
            ``True`` means every task, ``False``/empty means none (default).

    Protocol: nothing beyond ``forward``; ``log_vars`` is stepped by the framework optimizer
    together with the model. Keep it out of weight decay (weight decay pulls ``s`` to 0, i.e.
    towards weight 0.5 regardless of the loss). The weighted loss includes ``+ s_t / 2`` and can
    be negative; log the raw task losses for monitoring.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        init_log_var: PerTask = 0.0,
        classification_tasks: "Sequence[str] | bool" = (),
    ) -> None:
        super().__init__(task_names)
        init = per_task_values(init_log_var, self.task_names, "balancer.init_log_var", 0.0)
        if classification_tasks is True:
            cls = list(self.task_names)
        elif classification_tasks is False or classification_tasks is None:
            cls = []
        elif isinstance(classification_tasks, str):
            raise MTLConfigError(
                f"balancer.classification_tasks={classification_tasks!r}: expected a list of "
                f"task names (or True/False), not a string"
            )
        else:
            cls = list(classification_tasks)
            check_known_tasks(cls, self.task_names, key="balancer.classification_tasks")
        self.classification_tasks = tuple(t for t in self.task_names if t in cls)
        factors = [1.0 if t in cls else 0.5 for t in self.task_names]
        self.log_vars = nn.Parameter(torch.tensor(init, dtype=torch.float32))
        self.register_buffer("factors", torch.tensor(factors, dtype=torch.float32), persistent=False)

    def task_weights(self) -> torch.Tensor:
        """The multiplier ``c_t exp(-s_t)`` on each task loss (differentiable in ``log_vars``)."""
        return self.factors.to(self.log_vars.device) * torch.exp(-self.log_vars)

    def moves_within(self) -> Optional[int]:
        """The log-variances move with the first optimizer step."""
        return 1

    def forward(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        self.check_losses(losses)
        if not losses:
            return {}
        device = next(iter(losses.values())).device
        s_all = self.log_vars.to(device)  # differentiable copy if the balancer lives elsewhere
        c_all = self.factors.to(device)
        out: Dict[str, torch.Tensor] = {}
        for t, loss in losses.items():
            i = self.task_names.index(t)
            s = s_all[i]
            out[t] = c_all[i] * torch.exp(-s) * loss.float() + 0.5 * s
        return out

    def extra_repr(self) -> str:
        return f"classification_tasks={list(self.classification_tasks)}"
