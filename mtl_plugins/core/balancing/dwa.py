"""DWA: Dynamic Weight Averaging.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019 (MTAN,
Sec. on Dynamic Weight Average); survey Eq. 8 (Vandenhende et al., TPAMI 2021):

``w_k(t) = K * exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T)``,  ``r_k(t-1) = L_k(t-1) / L_k(t-2)``

with K tasks, temperature T (default 2), ``L_k(e)`` the *average training loss of task k over
epoch e*, and ``w_k = 1`` for the first two epochs (no two previous averages yet). The weights
sum to K.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch

from ..tasks import MTLConfigError
from .base import LossBalancer, check_number


class DynamicWeightAverage(LossBalancer):
    """DWA weights from the ratio of the last two period-averaged task losses.

    Args:
        task_names: the tasks.
        temperature: softmax temperature T (default 2.0, as in MTAN).
        period: ``None`` (default, faithful): a period is an epoch, closed by
            :meth:`on_epoch_end`. An integer K closes a period every K calls of
            :meth:`after_step` instead (for iteration-based runners; K = iterations per epoch
            reproduces the epoch version). ``on_epoch_end`` is then a no-op.

    Protocol: ``after_step(losses)`` once per optimizer step with the detached unweighted
    losses of the step (tasks present only); ``on_epoch_end()`` at the end of every training
    epoch (when ``period`` is None). ``forward`` only reads the weights, so it can be called any
    number of times.

    Absent tasks: a task contributes to a period's average only over the steps it was present;
    a task without an average in either of the last two periods gets ``r_k = 1`` (neutral).
    Non-finite losses are not accumulated.

    State, saved by ``state_dict``: buffers (kept on the losses' device, so ``after_step`` never
    synchronises with the host) for the running sums and counts of the open period, the last two
    period averages (NaN where a task had no step) and the current weights; extra state for the
    number of closed periods and of steps in the open period.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        temperature: float = 2.0,
        period: Optional[int] = None,
    ) -> None:
        super().__init__(task_names)
        self.temperature = check_number(
            temperature, "balancer.temperature", min_value=0.0, min_inclusive=False
        )
        if period is not None and (
            isinstance(period, bool) or not isinstance(period, int) or period < 1
        ):
            raise MTLConfigError(
                f"balancer.period={period!r}: expected None (epochs) or a positive integer "
                "number of steps"
            )
        self.period = period
        n = len(self.task_names)
        nan = float("nan")
        self.register_buffer("loss_sums", torch.zeros(n))
        self.register_buffer("loss_counts", torch.zeros(n))
        # history[0] = L(t-2), history[1] = L(t-1)
        self.register_buffer("history", torch.full((2, n), nan))
        self.register_buffer("weights", torch.ones(n))
        # host-side counters (extra_state): no device sync to test "period full?"
        self.num_periods = 0
        self.period_steps = 0

    def task_weights(self) -> torch.Tensor:
        return self.weights

    @torch.no_grad()
    def after_step(self, losses: Mapping[str, torch.Tensor]) -> None:
        self.check_losses(losses)
        if losses:
            tasks, device, idx = self._present(losses)
            values = torch.stack([losses[t].detach().reshape(()).float() for t in tasks])
            finite = torch.isfinite(values)
            self.loss_sums.index_add_(0, idx, torch.where(finite, values, torch.zeros_like(values)))
            self.loss_counts.index_add_(0, idx, finite.float())
        self.period_steps += 1
        if self.period is not None and self.period_steps >= self.period:
            self._close_period()

    def on_epoch_end(self) -> None:
        if self.period is None:
            self._close_period()

    def required_driver(self) -> Optional[str]:
        return "epoch_end" if self.period is None else None

    def moves_within(self) -> Optional[int]:
        """The weights leave 1 when the second period closes: ``2 * period`` steps (epochs:
        no deadline in steps)."""
        return None if self.period is None else 2 * self.period

    @torch.no_grad()
    def _close_period(self) -> None:
        if self.period_steps == 0:
            return  # nothing recorded (e.g. on_epoch_end called twice)
        counts = self.loss_counts
        avg = torch.where(
            counts > 0, self.loss_sums / counts.clamp_min(1.0), torch.full_like(counts, float("nan"))
        )
        self.history[0].copy_(self.history[1])
        self.history[1].copy_(avg)
        self.loss_sums.zero_()
        self.loss_counts.zero_()
        self.period_steps = 0
        self.num_periods += 1
        if self.num_periods >= 2:
            prev2, prev1 = self.history[0], self.history[1]
            ratio = prev1 / prev2
            ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
            k = len(self.task_names)
            self.weights.copy_(k * torch.softmax(ratio / self.temperature, dim=0))

    def get_extra_state(self) -> Dict[str, int]:
        return {"num_periods": self.num_periods, "period_steps": self.period_steps}

    def set_extra_state(self, state: Dict[str, int]) -> None:
        self.num_periods = int(state["num_periods"])
        self.period_steps = int(state["period_steps"])

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, period={self.period}"
