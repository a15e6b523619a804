"""GradVac: Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, ICLR 2021)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..tasks import MTLConfigError
from ._utils import (ZERO_ROW_RTOL, SeededRNG, check_choice, check_number, check_seed,
                     cancels64, combine64, gramian64, reduce_factor, solver_gramian, to_like)
from .base import GramianWeighting, check_grads


def _check_group_sizes(value: Any, low: int = 1) -> Optional[List[int]]:
    """``value`` as a list of block sizes, each ``>= low``: 1 for the configured ones, 0 for
    those passed per call (the engine's, one per shared parameter: an empty parameter is an
    empty block, all of whose rows are zero, so it changes nothing)."""
    if value is None:
        return None
    try:
        sizes = [int(s) for s in value]
        ok = all(int(s) == s and s >= low for s in value) and len(sizes) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        kind = "positive" if low > 0 else "non-negative"
        raise MTLConfigError(
            f"aggregator gradvac: group_sizes={value!r}: expected a non-empty list of {kind} "
            "integers (sizes of consecutive column blocks of the task-gradient matrix)"
        )
    return sizes


class GradVac(GramianWeighting):
    """Gradient Vaccine: raise pairwise gradient similarity towards an EMA target.

    Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, Sec. 3.2 and Algorithm 1.
    For each task ``i`` and each other task ``j`` (random order, as in PCGrad, of which GradVac
    is the generalisation), with ``phi_ij = cos(g_i', g_j)`` and target ``phi^_ij``:

    - if ``phi_ij < phi^_ij`` (Eq. 2)::

        g_i' <- g_i' + ||g_i'|| (phi^ sqrt(1 - phi^2) - phi sqrt(1 - phi^^2))
                       / (||g_j|| sqrt(1 - phi^^2)) * g_j

      which makes ``cos(g_i', g_j) = phi^_ij`` exactly;
    - then the target follows an EMA (Eq. 3): ``phi^_ij <- (1 - beta) phi^_ij + beta phi_ij``,
      with ``phi^`` initialised to 0 (so the first steps behave like PCGrad).

    The update is ``sum_i g_i'``. ``g_i'`` is the running (already modified) vector and
    ``g_j`` the original one, as in PCGrad.

    Per parameter group: the paper applies the procedure per layer; ``group_sizes`` gives
    the sizes of consecutive column blocks of ``G`` (e.g. one per shared parameter tensor,
    in the order the engine flattens them), each with its own targets ``phi^[b, i, j]``.
    Without ``group_sizes`` the whole matrix is one group. The method is run as coefficient
    bookkeeping on the per-group Gramians (vectorised over groups): the direction is
    ``cat_b (w_b @ G_b)``, never a modified copy of ``G``. With one group, :meth:`weights`
    gives the row weights; with several, use :meth:`forward` (or :meth:`group_weights` on
    per-group Gramians).

    Args:
        beta: EMA rate of the targets (paper: 1e-2). ``0`` keeps the targets at 0 (PCGrad).
        group_sizes: optional column-block sizes (``sum == P``); can also be passed per call.
        reduction: ``'sum'`` (default, the paper) or ``'mean'``.
        shuffle: visit the other tasks in random order (default, as PCGrad/GradVac);
            ``False`` uses the fixed order ``0..T-1`` and makes the method deterministic.
        seed: seed of the order generator (saved in ``state_dict``; same on all DDP ranks).

    State (``_extra_state``): the ``[B, T, T]`` float64 targets and the RNG state. ``T`` and
    the number of groups must stay fixed; pass a zero row for a task absent from a step.
    Zero rows and pairs with a zero row are skipped (no change, no EMA update).
    ``T = 1`` returns the row.
    """

    deterministic = False
    #: the rows must always be the same tasks in the same order (zeros for absent tasks):
    #: the EMA targets are per task pair.
    needs_all_tasks = True
    #: the direction is ``cat_b(group_weights(block Gramians)[b] @ G_b)``: the engine may form
    #: it from per-task gradient tensors when the blocks are its parameters (no group_sizes
    #: of its own), see ``TaskBackward._task_rows_level``
    block_weights_give_direction = True

    def __init_subclass__(cls, **kwargs) -> None:  # (as GramianWeighting's own flag)
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and "block_weights_give_direction" not in cls.__dict__:
            cls.block_weights_give_direction = False

    def __init__(
        self,
        beta: float = 0.01,
        group_sizes: Optional[Sequence[int]] = None,
        reduction: str = "sum",
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.beta = float(check_number("gradvac", "beta", beta, low=0.0, high=1.0))
        self.group_sizes = _check_group_sizes(group_sizes)
        self.reduction = check_choice("gradvac", "reduction", reduction, ("sum", "mean"))
        self.shuffle = bool(check_choice("gradvac", "shuffle", shuffle, (True, False)))
        self.seed = check_seed("gradvac", seed)
        self.deterministic = not self.shuffle
        self._rng = SeededRNG(self.seed)
        self.targets: Optional[torch.Tensor] = None  # [B, T, T] float64, CPU

    # ------------------------------------------------------------------ core bookkeeping
    def group_weights(self, gramians: torch.Tensor) -> torch.Tensor:
        """Row weights ``[B, T]`` for per-group Gramians ``[B, T, T]``; updates the targets."""
        coeff = self.group_coefficients(gramians)
        return coeff.sum(dim=1) * reduce_factor(self.reduction, coeff.shape[1])

    def group_coefficients(self, gramians: torch.Tensor) -> torch.Tensor:
        """``[B, T, T]`` coefficients: modified row ``i`` of group ``b`` is ``C[b, i] @ G_b``.

        Advances the RNG and updates the EMA targets.
        """
        if gramians.dim() != 3 or gramians.shape[1] != gramians.shape[2]:
            raise ValueError(
                f"aggregator gradvac: expected per-group Gramians of shape [B, T, T], got "
                f"{tuple(gramians.shape)}"
            )
        k = gramians.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(k).all()):
            solver_gramian(k[~torch.isfinite(k).flatten(1).all(1)][0], "gradvac")  # raises
        k = 0.5 * (k + k.transpose(1, 2))
        n_groups, t, _ = k.shape
        if self.targets is None:
            self.targets = torch.zeros(n_groups, t, t, dtype=torch.float64)
        elif tuple(self.targets.shape) != (n_groups, t, t):
            raise ValueError(
                f"aggregator gradvac: got {n_groups} group(s) x {t} task(s) but the EMA targets "
                f"are for {self.targets.shape[0]} group(s) x {self.targets.shape[1]} task(s); "
                "T and the parameter groups must stay fixed: pass one row per task of the model, "
                "a zero row for a task absent from the step (see GradVac.needs_all_tasks)"
            )
        tgt = self.targets
        diag = k.diagonal(dim1=1, dim2=2).clamp_min(0.0)  # [B, T]
        top = diag.max(dim=1, keepdim=True).values
        active = (diag > top * ZERO_ROW_RTOL**2) & (top > 0)
        norms = diag.sqrt()
        coeff = torch.eye(t, dtype=torch.float64).expand(n_groups, t, t).clone()
        gen = self._rng.get() if self.shuffle else None
        zeros = torch.zeros(n_groups, dtype=torch.float64)
        for i in range(t):
            others = [j for j in range(t) if j != i]
            if gen is not None and t > 1:
                others = [others[p] for p in torch.randperm(t - 1, generator=gen).tolist()]
            ci = coeff[:, i, :]  # [B, T] view: the running row i in coefficient form
            mi = k[:, :, i].clone()  # [B, T]: inner products of the running row with every g_j
            for j in others:
                ni = (ci * mi).sum(dim=1).clamp_min(0.0).sqrt()
                nj = norms[:, j]
                valid = active[:, i] & active[:, j] & (ni > 0)
                phi = torch.where(valid, (mi[:, j] / (ni * nj).clamp_min(1e-300)).clamp(-1.0, 1.0), zeros)
                target = tgt[:, i, j]
                s_tgt = (1.0 - target * target).clamp_min(1e-16).sqrt()
                s_phi = (1.0 - phi * phi).clamp_min(0.0).sqrt()
                a = ni * (target * s_phi - phi * s_tgt) / (nj.clamp_min(1e-300) * s_tgt)
                a = torch.where(valid & (phi < target), a, zeros)
                ci[:, j] += a
                mi += a.unsqueeze(1) * k[:, :, j]
                tgt[:, i, j] = torch.where(valid, (1.0 - self.beta) * target + self.beta * phi, target)
        return coeff

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        if self.group_sizes is not None and len(self.group_sizes) != 1:
            raise ValueError(
                "aggregator gradvac: weights(gramian) covers a single parameter group but "
                f"group_sizes has {len(self.group_sizes)} groups; call forward(grads) or "
                "group_weights(per_group_gramians)"
            )
        return to_like(self.group_weights(gramian.unsqueeze(0))[0], gramian)

    def forward(self, grads: torch.Tensor, group_sizes: Optional[Sequence[int]] = None,
                out: Optional[torch.Tensor] = None,
                block_gramians: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``cat_b (w_b @ G_b)``. ``group_sizes`` (or the constructor's) splits the columns;
        ``out``: a ``[P]`` buffer for the direction; ``block_gramians``: the ``[B, T, T]``
        float64 Gramians of the column blocks when the caller has them (the engine forms them
        once, :meth:`TaskBackward`, and sums them into the whole Gramian)."""
        check_grads(grads)
        sizes = self.block_sizes(grads.shape[1], group_sizes)
        blocks = torch.split(grads, sizes, dim=1)
        if block_gramians is None:
            gramians = torch.stack([gramian64(b) for b in blocks])
        elif tuple(block_gramians.shape) != (len(sizes), grads.shape[0], grads.shape[0]):
            raise ValueError(
                f"aggregator gradvac: block_gramians has shape {tuple(block_gramians.shape)}; "
                f"expected [{len(sizes)}, {grads.shape[0]}, {grads.shape[0]}] (one Gramian "
                "per column block)")
        else:
            gramians = block_gramians
        w = self.group_weights(gramians)
        if out is None:
            out = torch.empty(grads.shape[1], dtype=grads.dtype, device=grads.device)
        cancels = cancels64(w, gramians).tolist()  # every block's kappa at once
        for b, (blk, piece) in enumerate(zip(blocks, torch.split(out, sizes))):
            combine64(w[b], blk, out=piece, cancels=cancels[b])
        return out

    def block_sizes(self, columns: int, group_sizes: Optional[Sequence[int]] = None
                    ) -> List[int]:
        """The column-block sizes used for ``columns`` columns: ``group_sizes`` if given (a
        size may be 0 here: the engine passes one per shared parameter, and an empty one is
        an empty block that changes nothing), else the constructor's (positive), else one
        block."""
        sizes = _check_group_sizes(group_sizes, low=0) if group_sizes is not None \
            else self.group_sizes
        if sizes is None:
            sizes = [columns]
        if sum(sizes) != columns:
            raise ValueError(
                f"aggregator gradvac: group_sizes sum to {sum(sizes)} but grads has "
                f"{columns} columns; expected one size per consecutive column block"
            )
        return list(sizes)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Dict[str, Any]:
        return {
            "targets": None if self.targets is None else self.targets.clone(),
            "rng": self._rng.state(),
        }

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        targets = state.get("targets")
        self.targets = None if targets is None else targets.detach().to("cpu", torch.float64).clone()
        self._rng.load(state["rng"])

    def extra_repr(self) -> str:
        groups = None if self.group_sizes is None else len(self.group_sizes)
        return (
            f"beta={self.beta}, groups={groups}, reduction={self.reduction!r}, "
            f"shuffle={self.shuffle}, seed={self.seed}"
        )
