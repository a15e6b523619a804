"""Dynamic loss scaling for the per-task backward engine under mixed precision.

The engine scales every task's loss by the same factor before its backward, unscales the
task gradients before any aggregation (gradient surgery must see true gradients: PCGrad's
projections and MGDA's min-norm point are not scale-invariant), and reports non-finite
gradients so that the optimizer step is skipped. :class:`DynamicLossScaler` follows the
schedule of ``torch.amp.GradScaler`` (grow by ``growth_factor`` after ``growth_interval``
finite steps, back off by ``backoff_factor`` on overflow) but is driven by the engine, not
bound to an optimizer.
"""
from __future__ import annotations

from typing import Any, Dict


class DynamicLossScaler:
    """Loss scale with growth/backoff; ``state_dict`` carries scale and growth tracker."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True) -> None:
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval >= 1):
            raise ValueError(
                f"loss scaler: growth_factor={growth_factor} (>1), backoff_factor="
                f"{backoff_factor} (in (0,1)), growth_interval={growth_interval} (>=1) expected")
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.enabled = enabled
        self._good_steps = 0

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow; grow after ``growth_interval`` finite steps."""
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self._good_steps = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "good_steps": self._good_steps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
