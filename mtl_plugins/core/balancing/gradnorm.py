"""GradNorm: gradient normalisation for adaptive loss balancing.

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018 (the L_grad objective and Algorithm 1); survey Eq. 7
(Vandenhende et al., TPAMI 2021), which omits the exponent alpha (alpha = 1 gives the survey's
form).

With ``W`` the parameters of the last shared layer (or a shared representation) and the
learnable task weights ``w_t``:

- ``G_t = || grad_W (w_t L_t) ||_2 = |w_t| * || grad_W L_t ||_2``
- ``G_bar = mean_t G_t``
- ``L~_t = L_t / L_t(0)`` (``L_t(0)``: the task's loss the first time it is seen)
- ``r_t = L~_t / mean_j L~_j``
- ``L_grad = sum_t | G_t - G_bar * r_t^alpha |`` with the target ``G_bar * r_t^alpha`` held
  constant; ``L_grad`` is differentiated with respect to the ``w_t`` only.
- After the optimizer step, ``w <- T * w / sum(w)`` (renormalisation).

The network itself is trained on ``sum_t w_t L_t`` with ``w_t`` treated as constants, which is
what :meth:`GradNorm.forward` returns (the weights are detached there).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..distributed import world_size
from .base import LossBalancer, PerTask, check_number, per_task_values


class GradNorm(LossBalancer):
    """GradNorm task weights ``weights_param`` (``nn.Parameter`` of shape ``[T]``).

    Args:
        task_names: the tasks.
        alpha: asymmetry exponent on the relative inverse training rate (default 1.5; the
            paper's range is 0.12-3, and alpha = 1 is the survey's Eq. 7).
        init_weights: initial weights (scalar, dict or list; default 1 each). They are
            renormalised to sum to T at construction.
        min_weight: floor applied when renormalising, so that no weight reaches 0 or flips sign.

    Protocol, per optimizer step (the engine's job):

    1. compute the task losses;
    2. ``balancer.balance_grads(losses, shared_params)``: one ``autograd.grad`` per present task
       through the shared parameters (``retain_graph=True``); writes the gradient of ``L_grad``
       into ``weights_param.grad`` (added to what is there) and returns ``L_grad`` (detached);
    3. backward ``sum(balancer(losses).values())`` (weights detached) for the network;
    4. ``optimizer.step()``: the optimizer must contain ``weights_param`` (own param group, no
       weight decay; the weights' learning rate is a hyperparameter the papers do not fix);
    5. ``balancer.renormalize_()``.

    ``forward`` always uses ``T * w / sum(w)`` (clamped at ``min_weight``), so a forgotten step
    5 does not change the loss scale; step 5 keeps the parameter itself normalised, which is
    what the optimizer's step size is relative to.
    """

    needs_shared_grads = True

    def __init__(
        self,
        task_names: Sequence[str],
        alpha: float = 1.5,
        init_weights: PerTask = None,
        min_weight: float = 1e-4,
    ) -> None:
        super().__init__(task_names)
        self.alpha = check_number(alpha, "balancer.alpha", min_value=0.0)
        self.min_weight = check_number(
            min_weight, "balancer.min_weight", min_value=0.0, min_inclusive=False
        )
        init = per_task_values(
            init_weights, self.task_names, "balancer.init_weights", 1.0,
            min_value=0.0, min_inclusive=False,
        )
        w = torch.tensor(init, dtype=torch.float32)
        self.weights_param = nn.Parameter(w * (len(init) / w.sum()))
        # L_t(0); NaN until the task has been seen with a positive loss.
        self.register_buffer("initial_losses", torch.full((len(init),), float("nan")))

    # ---------------------------------------------------------------------------- weights
    def task_weights(self) -> torch.Tensor:
        w = self.weights_param.detach().clamp_min(self.min_weight)
        return w * (len(self.task_names) / w.sum())

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Clamp the weights at ``min_weight`` and rescale them in place so ``sum(w) = T``.

        Call after every optimizer step that updated ``weights_param``.
        """
        w = self.weights_param
        w.clamp_(min=self.min_weight)
        w.mul_(len(self.task_names) / w.sum())

    # ---------------------------------------------------------------------------- GradNorm
    def balance_grads(
        self,
        losses: Mapping[str, torch.Tensor],
        shared_params: Union[torch.Tensor, Iterable[torch.Tensor]],
        scale: Optional[float] = None,
    ) -> torch.Tensor:
        """Accumulate ``d L_grad / d w`` into ``weights_param.grad``; return ``L_grad``.

        Args:
            losses: ``{task: scalar loss}`` for the tasks present in the step, with graph. The
                graph is retained (the network backward comes afterwards).
            shared_params: the parameters of the last shared layer, or a shared feature tensor
                (representation mode: gradient norms of ``dL_t/dZ``).
            scale: optional loss scale (AMP): gradients are taken of ``scale * L_t`` and the
                norms divided by ``scale`` again, to avoid fp16 underflow in the task
                gradients. The result is the same as without ``scale`` up to rounding.

        Tasks absent from ``losses``, tasks whose loss does not require grad, and tasks whose
        loss is not positive (e.g. STA's ``0 * pred.sum()`` guard for a task with no allocated
        sample) are left out of this step's ``L_grad``: they get zero weight gradient and do
        not enter ``G_bar`` or the mean of ``L~``. ``L_t(0)`` is recorded the first time a task
        has a positive loss.

        ``G_t = w_t * ||grad_W L_t||`` is built from the plain gradient norm: the gradient of
        ``L_grad`` with respect to ``w_t`` is ``sign(G_t - target_t) * ||grad_W L_t||``, exactly
        what differentiating ``||grad_W (w_t L_t)||`` built with ``create_graph=True`` gives,
        without the double-backward graph through the network.
        """
        self.check_losses(losses)
        params = _as_param_list(shared_params)
        representation = isinstance(shared_params, torch.Tensor) and \
            not isinstance(shared_params, nn.Parameter)
        tasks = [t for t, l in losses.items() if l.requires_grad]
        world = world_size()
        if not tasks and world == 1:
            return torch.zeros(())
        device = losses[tasks[0]].device if tasks else self.weights_param.device
        self._move_buffers_to(device)
        norm, values, present = self._task_stats(losses, tasks, params, representation,
                                                 scale, world, device)
        idx = torch.arange(len(self.task_names), device=device)
        positive = present & torch.isfinite(values) & (values > 0)
        # record L_t(0) for tasks seen with a positive loss for the first time
        l0 = self.initial_losses.index_select(0, idx)
        l0 = torch.where(torch.isnan(l0) & positive, values, l0)
        self.initial_losses.index_copy_(0, idx, l0)
        valid = positive & torch.isfinite(l0)
        validf = valid.float()
        count = validf.sum().clamp_min(1.0)

        w = self.weights_param.to(device).index_select(0, idx)  # differentiable, raw weights
        g_task = w * norm  # G_t (w_t > 0 after renormalisation)
        with torch.no_grad():
            ratio = torch.where(valid, values / l0.clamp_min(1e-12), torch.zeros_like(values))
            r = ratio / (ratio.sum() / count).clamp_min(1e-12)
            g_bar = (g_task * validf).sum() / count
            target = g_bar * r.pow(self.alpha)
        l_grad = ((g_task - target).abs() * validf).sum()
        (grad_w,) = torch.autograd.grad(l_grad, self.weights_param)
        if self.weights_param.grad is None:
            self.weights_param.grad = grad_w.detach().clone()
        else:
            self.weights_param.grad.add_(grad_w.detach().to(self.weights_param.grad))
        return l_grad.detach()

    def _task_stats(self, losses: Mapping[str, torch.Tensor], tasks: Sequence[str],
                    params: List[torch.Tensor], representation: bool,
                    scale: Optional[float], world: int, device: torch.device
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(||grad_W L_t||, L_t, present)``, each ``[T]`` over all tasks.

        Under DDP (``world > 1``) ``L_t`` is the task's loss averaged over the ranks that have
        it (the rule of :mod:`mtl_plugins.core.backward`) and the norm is that of its
        gradient: parameters ``W``: the norm of the rank-averaged gradient (one all-reduce of
        ``T x |W|`` numbers); a representation ``Z`` (each rank holds its own samples' part):
        ``sqrt(sum_r ||grad_{Z_r} L_t,r||^2) / c_t``. Every rank then computes the same
        ``L_grad`` and the same ``L_t(0)``."""
        n = len(self.task_names)
        # squared norms suffice unless parameter gradients must be averaged over ranks first
        squares = representation or world == 1
        width = 1 if squares else sum(p.numel() for p in params)
        grads = torch.zeros(n, width, dtype=torch.float32, device=device)
        stats = torch.zeros(2, n, dtype=torch.float64, device=device)  # loss sums, counts
        for t in tasks:
            i = self.task_names.index(t)
            target = losses[t] * scale if scale is not None else losses[t]
            gs = torch.autograd.grad(target, params, retain_graph=True, allow_unused=True)
            if squares:
                sq = [g.detach().float().pow(2).sum() for g in gs if g is not None]
                grads[i, 0] = torch.stack(sq).sum() if sq else 0.0
            else:
                grads[i] = torch.cat([(g.detach() if g is not None else torch.zeros_like(p))
                                      .reshape(-1).float() for g, p in zip(gs, params)])
            stats[0, i] = losses[t].detach().reshape(()).double()
            stats[1, i] = 1.0
        if world > 1:
            torch.distributed.all_reduce(grads)
            torch.distributed.all_reduce(stats)
        counts = stats[1].clamp_min(1.0)
        if squares:
            norm = grads[:, 0].sqrt() / counts.float()
        else:
            norm = (grads / counts.float()[:, None]).norm(dim=1)
        if scale is not None:
            norm = norm / scale
        return norm, (stats[0] / counts).float(), stats[1] > 0

    def moves_within(self) -> Optional[int]:
        """The weights move with the first optimizer step that updates them."""
        return 1

    def forward(self, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``{t: w_t * L_t}`` with ``w`` detached (GradNorm trains ``w`` only through ``L_grad``)."""
        return super().forward(losses)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, min_weight={self.min_weight}"


def _as_param_list(shared: Union[torch.Tensor, Iterable[torch.Tensor]]) -> List[torch.Tensor]:
    if isinstance(shared, torch.Tensor):
        params = [shared]
    else:
        params = list(shared)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(
            "GradNorm.balance_grads: shared_params has no tensor that requires grad; pass the "
            "parameters of the last shared layer (or the shared representation)"
        )
    return params
