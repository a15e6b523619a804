"""RLW: Random Loss Weighting.

Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022 (Sec. 3, "Random Loss Weighting"):

``L = sum_t lambda_t L_t``,  ``lambda = f(lambda~)``,  ``lambda~ ~ p(lambda~)`` drawn afresh at
every step, with ``f`` a normalisation onto the probability simplex. The paper's recommended
default, used here, is ``lambda~ ~ N(0, I)`` and ``f = softmax``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from ..distributed import world_size
from ..tasks import MTLConfigError
from .base import LossBalancer, check_number

DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


class RandomLossWeighting(LossBalancer):
    """Random weights on the simplex, redrawn at every ``forward``.

    Args:
        task_names: the tasks.
        distribution: how ``lambda`` is drawn (T values, one per task, including absent ones):

            - ``"normal"`` (default): ``softmax(z)``, ``z ~ N(0, I)``;
            - ``"uniform"``: ``u / sum(u)``, ``u ~ U(0, 1)`` (our normalisation choice);
            - ``"dirichlet"``: ``Dirichlet(concentration * 1)``, already on the simplex.
        concentration: Dirichlet concentration (default 1.0: uniform over the simplex).
        seed: seed of the balancer's own CPU ``torch.Generator`` (default 0). Use the same seed
            on every DDP rank so that all ranks draw the same weights.
        scale: multiplies the weights (default 1.0: the weights sum to 1, so the total loss is
            ``1/T`` of the equal-weight sum; ``scale=T`` matches the equal-weight loss scale).

    Protocol: none beyond ``forward``; each ``forward`` call draws new weights (call it once per
    optimizer step). ``current_weights()`` reports the last draw (1/T each before the first).

    State (extra_state): the generator state and the last draw, so a resumed run continues the
    same weight sequence.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        distribution: str = "normal",
        concentration: float = 1.0,
        seed: Optional[int] = 0,
        scale: float = 1.0,
    ) -> None:
        super().__init__(task_names)
        if distribution not in DISTRIBUTIONS:
            raise MTLConfigError(
                f"balancer.distribution={distribution!r}: expected one of {list(DISTRIBUTIONS)}"
            )
        self.distribution = distribution
        self.concentration = check_number(
            concentration, "balancer.concentration", min_value=0.0, min_inclusive=False
        )
        self.scale = check_number(scale, "balancer.scale", min_value=0.0, min_inclusive=False)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise MTLConfigError(f"balancer.seed={seed!r}: expected an integer or None")
        self.seed = seed
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        n = len(self.task_names)
        self._last = torch.full((n,), self.scale / n)

    def sample(self) -> torch.Tensor:
        """Draw ``[T]`` weights (CPU, float32) and remember them as the current weights."""
        n = len(self.task_names)
        g = self.generator
        if self.distribution == "normal":
            w = torch.softmax(torch.randn(n, generator=g, dtype=torch.float64), dim=0)
        elif self.distribution == "uniform":
            u = torch.rand(n, generator=g, dtype=torch.float64)
            w = u / u.sum()
        else:
            w = _sample_dirichlet(n, self.concentration, g)
        self._last = (w * self.scale).float()
        return self._last

    def task_weights(self) -> torch.Tensor:
        return self._last

    def moves_within(self) -> Optional[int]:
        """A new random draw every step."""
        return 1

    def forward(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        self.check_losses(losses)
        if self.seed is None and world_size() > 1:
            raise MTLConfigError(
                "balancer.seed=None: under DDP every rank would draw its own random weights "
                "and the ranks would train different objectives; expected an integer seed "
                "(the same on every rank)")
        self.sample()
        return super().forward(losses)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"generator": self.generator.get_state(), "last": self._last.clone()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"].cpu())
        self._last = state["last"].cpu().float()

    def extra_repr(self) -> str:
        return f"distribution={self.distribution!r}, scale={self.scale}"


def _sample_dirichlet(n: int, concentration: float, g: torch.Generator) -> torch.Tensor:
    """Dirichlet(concentration * 1_n) drawn from ``g``'s stream.

    ``torch.distributions.Dirichlet`` takes no generator, so the draw runs on the global CPU
    generator temporarily loaded with ``g``'s state (inside ``fork_rng``, which restores the
    global state afterwards); ``g`` then takes over the advanced state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(g.get_state())
        conc = torch.full((n,), concentration, dtype=torch.float64)
        w = torch.distributions.Dirichlet(conc).sample()
        g.set_state(torch.get_rng_state())
    return w
