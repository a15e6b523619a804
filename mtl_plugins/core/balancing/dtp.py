"""DTP: Dynamic Task Prioritization.

Guo, Haque, Huang, Yeung & Fei-Fei, "Dynamic Task Prioritization for Multitask Learning",
ECCV 2018 (task-level focal weighting, Sec. 3); survey Eq. 9 (Vandenhende et al., TPAMI 2021):

``w_t = -(1 - kappa_t)^gamma_t * log(kappa_t)``

where ``kappa_t`` in (0, 1) is a key performance indicator of task t (an accuracy, or a
thresholded error for regression), smoothed over time with an exponential moving average
``kappa_bar <- alpha * kappa + (1 - alpha) * kappa_bar``, and ``gamma_t >= 0`` is the
task-level focusing parameter. Tasks with a low KPI (hard tasks) get a large weight.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

from ..tasks import check_known_tasks
from .base import LossBalancer, PerTask, check_number, per_task_values


class DynamicTaskPrioritization(LossBalancer):
    """Focal task weights from smoothed KPIs supplied by the training loop.

    Args:
        task_names: the tasks.
        gamma: focusing parameter, scalar or per task (default 1.0).
        alpha: weight of the newest KPI in the moving average (default 0.1; 1.0 uses the raw
            KPI, which suits KPIs that are already averaged, e.g. from a validation run). The
            first KPI of a task initialises its average.
        eps: the smoothed KPI is clipped to ``[eps, 1 - eps]`` before the log (default 1e-4).
        init_weight: weight of a task that has no KPI yet (default 1.0).

    Protocol: ``update_kpis({task: kpi})`` whenever KPIs are available (per step from training
    batch metrics, or per validation); every KPI must be a finite number in [0, 1]. Tasks may
    be left out of a call. ``forward`` only reads the weights.

    State: the smoothed KPIs, a buffer (NaN until a task's first KPI).
    """

    def __init__(
        self,
        task_names: Sequence[str],
        gamma: PerTask = 1.0,
        alpha: float = 0.1,
        eps: float = 1e-4,
        init_weight: float = 1.0,
    ) -> None:
        super().__init__(task_names)
        self.gammas = per_task_values(gamma, self.task_names, "balancer.gamma", 1.0, min_value=0.0)
        self.alpha = check_number(
            alpha, "balancer.alpha", min_value=0.0, max_value=1.0, min_inclusive=False
        )
        self.eps = check_number(
            eps, "balancer.eps", min_value=0.0, max_value=0.5, min_inclusive=False,
            max_inclusive=False,
        )
        self.init_weight = check_number(init_weight, "balancer.init_weight", min_value=0.0)
        self.register_buffer(
            "kpis", torch.full((len(self.task_names),), float("nan"), dtype=torch.float64)
        )

    def required_driver(self) -> Optional[str]:
        return "kpis"

    @torch.no_grad()
    def update_kpis(self, kpis: Mapping[str, float]) -> None:
        """Fold ``{task: kpi in [0, 1]}`` into the moving averages (one host sync per call)."""
        check_known_tasks(kpis.keys(), self.task_names, key="kpis")
        for task, value in kpis.items():
            raw = value.item() if isinstance(value, torch.Tensor) else value
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not (
                math.isfinite(raw) and 0.0 <= raw <= 1.0
            ):
                raise ValueError(
                    f"kpis[{task!r}]={value!r}: expected a finite KPI in [0, 1] (an accuracy or "
                    "a thresholded error, higher = better)"
                )
            i = self.task_names.index(task)
            old = float(self.kpis[i])
            new = raw if math.isnan(old) else self.alpha * raw + (1.0 - self.alpha) * old
            self.kpis[i] = new

    def task_weights(self) -> torch.Tensor:
        kappa = self.kpis.clamp(self.eps, 1.0 - self.eps)
        gamma = torch.tensor(self.gammas, dtype=kappa.dtype, device=kappa.device)
        w = -torch.pow(1.0 - kappa, gamma) * torch.log(kappa)
        w = torch.where(torch.isnan(self.kpis), torch.full_like(w, self.init_weight), w)
        return w.float()

    def extra_repr(self) -> str:
        return f"gamma={self.gammas}, alpha={self.alpha}, eps={self.eps}"
