"""Small models and reference aggregators shared by the backward-engine tests."""
from typing import Dict, Tuple

import torch
from torch import nn

from mtl_plugins.core.aggregation.base import Aggregator, GramianWeighting

TASKS = ("seg", "depth", "normal")


class SumRows(GramianWeighting):
    """Weights of one: the aggregate is the plain sum of task gradients."""

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype)


class UnitSum(Aggregator):
    """Sum of the normalised rows: nonlinear in G, so averaging before or after differs."""

    def forward(self, grads: torch.Tensor) -> torch.Tensor:
        return (grads / grads.norm(dim=1, keepdim=True).clamp(min=1e-12)).sum(0)


class Recorder(Aggregator):
    """Stores the matrix it receives and returns its sum."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = None

    def forward(self, grads: torch.Tensor) -> torch.Tensor:
        self.seen = grads.clone()
        return grads.sum(0)


class TinyMTL(nn.Module):
    def __init__(self, tasks=TASKS, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
                                    for t in tasks})

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        z = self.encoder(x)
        return z, {t: h(z).squeeze(1) for t, h in self.heads.items()}


def task_losses(outputs: Dict[str, torch.Tensor], y: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {t: ((o - y[:, i]) ** 2).mean() for i, (t, o) in enumerate(outputs.items())}


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def nearly_collinear(coef=(1.0, -0.5, 2.0), P=20000, eps=1e-3, seed=0) -> torch.Tensor:
    """float32 rows ``c_t b + eps n_t`` (conflicting: c has both signs): the Gramian's small
    eigenvalues (~P eps^2) are ~1e-6 of the large one, below the resolution of a float32
    Gramian entry. Before the float64 Gramian, Aligned-MTL was 5e-2 off, MGDA 6e-2, UPGrad
    3e-2, IMTL-G 2e-1 and DualProj 2e-5 (relative)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(P, generator=g, dtype=torch.float64)
    return torch.stack([c * base + eps * torch.randn(P, generator=g, dtype=torch.float64)
                        for c in coef]).float()


def engine_step(model: "TinyMTL", engine, x: torch.Tensor, y: torch.Tensor, drop=()):
    """One engine step of ``model`` on ``(x, y)`` without the tasks in ``drop``:
    ``(BackwardResult, {name: .grad clone})`` of the parameters that got one; ``.grad`` is
    cleared afterwards (so G may be reused)."""
    from mtl_plugins.core.backward import split_parameters

    model.zero_grad(set_to_none=True)
    z, out = model(x)
    losses = {t: l for t, l in task_losses(out, y).items() if t not in drop}
    shared, heads = split_parameters(model.encoder, model.heads)
    result = engine(losses, shared, heads, features=z)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return result, grads


def kernel_steps(kernels, aggregator, steps: int = 1, level: str = "parameter"):
    """``{kernel: [engine_step(...), ...]}``: ``steps`` engine steps of one TinyMTL per Gramian
    kernel on the same batch, each with a fresh ``aggregator()``."""
    from mtl_plugins.core.backward import TaskBackward

    x, y = batch()
    out = {}
    for kernel in kernels:
        engine = TaskBackward(TASKS, aggregator(), level=level, gramian_kernel=kernel)
        model = TinyMTL()
        out[kernel] = [engine_step(model, engine, x, y) for _ in range(steps)]
    return out


def assert_same_steps(steps, reference, rows: bool = False) -> None:
    """Two kernels' :func:`kernel_steps`: the same Gramians (to 1e-13: only the order of the
    float64 sums differs) and the same gradients (to float32 rounding). ``rows``: ``steps``
    come from the engine's per-task rows, whose ``w @ G`` rounds its float64 sum once where
    G's float32 product rounds each term, so entries that cancel differ by the rounding of
    the terms (1e-6 of each tensor's largest entry)."""
    for (result, grads), (ref_result, ref_grads) in zip(steps, reference, strict=True):
        assert result.tasks == ref_result.tasks
        assert torch.allclose(result.gramian, ref_result.gramian, rtol=1e-13, atol=0)
        assert grads.keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            atol = 1e-6 * float(g.abs().max()) + 1e-12 if rows and g.numel() else 1e-9
            assert torch.allclose(grads[n], g, rtol=1e-6, atol=atol), n
