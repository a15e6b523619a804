"""Uncertainty weighting (homoscedastic task uncertainty).

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018 (Sec. 3, regression and classification likelihoods);
survey Eq. 6 (Vandenhende et al., TPAMI 2021).

Derivation from the paper's likelihoods (Kendall et al. Sec. 3.2):

- regression, Gaussian ``p(y|f) = N(f, sigma^2)`` (their Eq. 2, 7):
  ``-log p = ||y - f||^2 / (2 sigma^2) + log sigma + const``, i.e. ``L / (2 sigma^2) + log sigma``
  with ``L = ||y - f||^2``;
- classification, scaled softmax ``p(y|f) = Softmax(f / sigma^2)`` (their Eq. 3, 8-10):
  ``-log Softmax(y, f/sigma^2) ~= L / sigma^2 + log sigma`` with ``L = -log Softmax(y, f)``,
  using their approximation ``(1/sigma) sum_c' exp(f_c'/sigma^2) ~= (sum_c' exp f_c')^(1/sigma^2)``
  (exact at ``sigma = 1``). Their Eq. 10 combines the two:
  ``L_1 / (2 sigma_1^2) + L_2 / sigma_2^2 + log sigma_1 + log sigma_2``.

We learn the log-variance ``s_t = log sigma_t^2`` (unconstrained, numerically stable); with
``1 / sigma^2 = exp(-s)`` and ``log sigma = s / 2`` the two forms are exactly

- regression form (default, every task):  ``0.5 * exp(-s_t) * L_t + 0.5 * s_t``
- classification form (tasks listed in ``classification_tasks``): ``exp(-s_t) * L_t + 0.5 * s_t``

(the classification form is *not* ``exp(-s) L + s``: that would be ``L / sigma^2 + 2 log sigma``;
it is what one gets from reading ``s`` as ``log sigma`` instead of ``log sigma^2``). The survey's
Eq. 6 is the regression form for two tasks; most implementations (MTAN's NYUv2 code, LibMTL)
apply it to every task, so the classification form is opt-in per task.

Initial value: Kendall et al. and the survey give none. We use ``s_t = -0.5`` (weight
``0.5 e^{0.5} = 0.824``), the value of MTAN's SegNet NYUv2-13 code (``logsigma`` initialised to
``[-0.5, -0.5, -0.5]``, the benchmark paper 001's "+Uncertainty" rows follow) and LibMTL's UW.

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
        init_log_var: initial ``s_t`` (scalar, ``{task: value}`` or list); default -0.5 (MTAN's
            and LibMTL's value; the papers give none), i.e. weight ``0.5 e^{0.5}`` in the
            regression form.
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
        init_log_var: PerTask = -0.5,
        classification_tasks: "Sequence[str] | bool" = (),
    ) -> None:
        super().__init__(task_names)
        init = per_task_values(init_log_var, self.task_names, "balancer.init_log_var", -0.5)
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
