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

The weights have their own optimizer (Algorithm 1 updates ``w`` with ``grad_w L_grad``
separately from the network): its own learning rate ``lr`` and rule (Adam by default), its
state in buffers (checkpointed with the model or controller), never seen by the framework's
optimizer, so the model's learning-rate schedule and weight decay do not touch them. Neither
the survey nor our notes give the GradNorm paper's weight learning rate ("The survey doesn't
say which alpha, which weight LR, or which layer W it used", notes/seed-survey.md Sec. 3.4);
the default Adam with ``lr = 1e-4`` is LibMTL's NYUv2 setting (its weights share the model's
Adam at 1e-4). Adam makes the step size independent of the scale of ``||grad_W L_t||``
(which varies by orders of magnitude with the chosen layer ``W``), so one default serves a
SegNet's last conv and an R50-FPN's output convs alike.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..distributed import world_size
from ..tasks import MTLConfigError
from .base import LossBalancer, PerTask, check_number, own_optimizer_step_, per_task_values

OPTIMIZERS = ("adam", "sgd")


class GradNorm(LossBalancer):
    """GradNorm task weights ``raw_weights`` (a buffer of shape ``[T]``) with their own optimizer.

    Args:
        task_names: the tasks.
        alpha: asymmetry exponent on the relative inverse training rate (default 1.5; the
            paper's range is 0.12-3, and alpha = 1 is the survey's Eq. 7).
        init_weights: initial weights (scalar, dict or list; default 1 each). They are
            renormalised to sum to T at construction.
        min_weight: floor applied when renormalising, so that no weight reaches 0 or flips sign.
        lr: learning rate of the weights' own optimizer (default 1e-4, see the module
            docstring); independent of the model's learning rate and schedule.
        optimizer: ``"adam"`` (default; betas 0.9/0.999, eps 1e-8, no weight decay) or
            ``"sgd"`` (the plain step ``w <- w - lr * grad_w L_grad`` of Algorithm 1).

    Protocol, per optimizer step (the engine's job; :class:`~mtl_plugins.core.controller.
    MTLController` does it):

    1. compute the task losses;
    2. ``balancer.balance_grads(losses, shared_params)``: one ``autograd.grad`` per present task
       through the shared parameters (``retain_graph=True``); adds the gradient of ``L_grad``
       to :attr:`weight_grad` and returns ``L_grad`` (detached);
    3. backward ``sum(balancer(losses).values())`` (weights detached) for the network;
       ``optimizer.step()`` for the network;
    4. ``balancer.after_step(losses)``: one step of the weights' own optimizer on
       :attr:`weight_grad` (skipped if it is missing or not finite, e.g. an AMP overflow), then
       the renormalisation ``w <- T w / sum(w)``.

    ``forward`` always uses ``T * w / sum(w)`` (clamped at ``min_weight``).
    """

    needs_shared_grads = True

    def __init__(
        self,
        task_names: Sequence[str],
        alpha: float = 1.5,
        init_weights: PerTask = None,
        min_weight: float = 1e-4,
        lr: float = 1e-4,
        optimizer: str = "adam",
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
        self.lr = check_number(lr, "balancer.lr", min_value=0.0, min_inclusive=False)
        if optimizer not in OPTIMIZERS:
            raise MTLConfigError(
                f"balancer.optimizer={optimizer!r}: expected one of {list(OPTIMIZERS)}"
            )
        self.optimizer = optimizer
        self.betas = (0.9, 0.999)
        self.adam_eps = 1e-8
        n = len(init)
        w = torch.tensor(init, dtype=torch.float32)
        # the weights and their optimizer state are buffers: no framework optimizer sees them
        self.register_buffer("raw_weights", w * (n / w.sum()))
        self.register_buffer("exp_avg", torch.zeros(n))
        self.register_buffer("exp_avg_sq", torch.zeros(n))
        self.register_buffer("num_updates", torch.zeros(()))
        # L_t(0); NaN until the task has been seen with a positive loss.
        self.register_buffer("initial_losses", torch.full((n,), float("nan")))
        #: d L_grad / d w accumulated by :meth:`balance_grads` since the last weight step
        self.weight_grad: Optional[torch.Tensor] = None

    # ---------------------------------------------------------------------------- weights
    def task_weights(self) -> torch.Tensor:
        w = self.raw_weights.clamp_min(self.min_weight)
        return w * (len(self.task_names) / w.sum())

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Clamp the weights at ``min_weight`` and rescale them in place so ``sum(w) = T``."""
        w = self.raw_weights
        w.clamp_(min=self.min_weight)
        w.mul_(len(self.task_names) / w.sum())

    def after_step(self, losses: Mapping[str, torch.Tensor]) -> None:
        """One step of the weights' own optimizer on :attr:`weight_grad`, then renormalise."""
        self.step_weights_()

    def skip_step(self) -> None:
        """A skipped optimizer step moves neither the network nor the GradNorm weights."""
        self.weight_grad = None

    @torch.no_grad()
    def step_weights_(self) -> bool:
        """Apply and clear :attr:`weight_grad`; returns whether the weights moved.

        Adam (``torch.optim.Adam``'s update without weight decay) or plain SGD with ``lr``,
        then :meth:`renormalize_`. A missing or non-finite gradient (no task in the step, an
        AMP overflow) is dropped without touching the weights or the optimizer state.
        """
        grad, self.weight_grad = self.weight_grad, None
        if grad is None or not bool(torch.isfinite(grad).all()):
            return False
        own_optimizer_step_(self, self.raw_weights, grad.to(self.raw_weights))
        self.renormalize_()
        return True

    # ---------------------------------------------------------------------------- GradNorm
    def balance_grads(
        self,
        losses: Mapping[str, torch.Tensor],
        shared_params: Union[torch.Tensor, Iterable[torch.Tensor]],
        scale: Optional[float] = None,
    ) -> torch.Tensor:
        """Accumulate ``d L_grad / d w`` into :attr:`weight_grad`; return ``L_grad``.

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
        device = losses[tasks[0]].device if tasks else self.raw_weights.device
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

        w = self.raw_weights.detach().clone().requires_grad_(True)  # a leaf for L_grad only
        g_task = w.index_select(0, idx) * norm  # G_t (w_t > 0 after renormalisation)
        with torch.no_grad():
            ratio = torch.where(valid, values / l0.clamp_min(1e-12), torch.zeros_like(values))
            r = ratio / (ratio.sum() / count).clamp_min(1e-12)
            g_bar = (g_task * validf).sum() / count
            target = g_bar * r.pow(self.alpha)
        l_grad = ((g_task - target).abs() * validf).sum()
        (grad_w,) = torch.autograd.grad(l_grad, w)
        if self.weight_grad is None:
            self.weight_grad = grad_w.detach()
        else:
            self.weight_grad = self.weight_grad + grad_w.detach().to(self.weight_grad)
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
        return (f"alpha={self.alpha}, min_weight={self.min_weight}, lr={self.lr}, "
                f"optimizer={self.optimizer!r}")


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


def last_shared_layer(losses: Mapping[str, torch.Tensor],
                      shared_params: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """The weights of the last shared layer: the shared parameters the task losses reach
    first in their backward graph, whatever the order the parameters were registered in.

    GradNorm's ``W`` is "the last shared layer of weights" (Chen et al., Sec. 3.2; survey
    Sec. 3.1.2: "To save on computation, the last shared layer is used"): the shared layer
    computed last before the task heads. Registration order is not computation order (a
    detectron2 FPN registers its output convs before the bottom-up ResNet), so this reads the
    autograd graph of ``losses``:

    1. the candidates are the shared weights with more than one dimension (convolution and
       linear weights, not norms and biases) that some loss depends on;
    2. a candidate ``q`` is discarded when it lies *upstream* of another candidate ``p``: it
       feeds the input of ``p``'s operation (``q`` is computed before ``p``).

    What remains are the layers no other shared layer consumes: in a ResNet the last block's
    ``conv3`` (the earlier blocks feed it, also through the identity shortcuts); in an FPN the
    output convolutions of every level (parallel layers, all kept). The result keeps the order
    of ``shared_params``. Raises ``ValueError`` when no loss depends on a shared weight.
    """
    shared = [p for p in shared_params if p.requires_grad and p.dim() > 1]
    bit = {id(p): 1 << i for i, p in enumerate(shared)}
    roots = [l.grad_fn for l in losses.values() if l.grad_fn is not None]
    # the graph below the losses: children of every node, and the weights' AccumulateGrad nodes
    children: Dict[object, List[object]] = {}
    leaf_of: Dict[object, int] = {}
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in children:
            continue
        var = getattr(node, "variable", None)
        if var is not None and id(var) in bit:
            leaf_of[node] = bit[id(var)]
        kids = [n for n, _ in node.next_functions if n is not None]
        children[node] = kids
        stack.extend(k for k in kids if k not in children)
    # reach[node]: bitmask of the shared weights below node (iterative post-order)
    reach: Dict[object, int] = {}
    for root in roots:
        todo = [(root, False)]
        while todo:
            node, expanded = todo.pop()
            if node in reach:
                continue
            if expanded:
                mask = leaf_of.get(node, 0)
                for k in children[node]:
                    mask |= reach[k]
                reach[node] = mask
            else:
                todo.append((node, True))
                todo.extend((k, False) for k in children[node] if k not in reach)
    found = 0
    for root in roots:
        found |= reach[root]
    if not found:
        raise ValueError(
            "GradNorm: no task loss depends on a shared weight with more than one dimension; "
            "pass the last shared layer's parameters (gradnorm_params) explicitly")
    # upstream: the weights below the *other* inputs of the operation that consumes a weight
    # (walking up through single-input wrappers such as a transpose or a dtype cast)
    parents: Dict[object, List[object]] = {}
    for node, kids in children.items():
        for k in kids:
            parents.setdefault(k, []).append(node)
    upstream = 0
    for leaf, own in leaf_of.items():
        chain = {leaf}
        ops = list(parents.get(leaf, []))
        while ops:
            op = ops.pop()
            others = [k for k in children[op] if k not in chain]
            if not others:  # a wrapper around the weight alone: its consumer is the operation
                chain.add(op)
                ops.extend(parents.get(op, []))
                continue
            for k in others:
                upstream |= reach[k] & ~own
    keep = found & ~upstream
    return [p for p in shared if bit[id(p)] & keep]
