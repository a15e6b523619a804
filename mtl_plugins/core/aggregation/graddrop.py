"""GradDrop: gradient sign dropout (Chen et al., NeurIPS 2020)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch

from ._utils import (SeededRNG, _row_of, check_choice, check_number, check_seed,
                     check_vector, check_vector_length, reduce_factor)
from .base import Aggregator, check_grads


class GradDrop(Aggregator):
    """Gradient sign dropout: keep, per element, only the gradients of one sign.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020, Sec. 3 / Algorithm 1:

    - sign purity per element: ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)`` (in [0, 1]);
    - ``U ~ Uniform(0, 1)`` per element; masks
      ``M_i = 1[P > U] 1[g_i > 0] + 1[P <= U] 1[g_i < 0]``;
    - update ``sum_i (l_i + (1 - l_i) M_i) * g_i`` with leak ``l_i`` in [0, 1].

    (``f(P) = P``, the paper's default monotone map. Ties ``P == U`` keep the negative side,
    which makes all-negative elements kept even when ``U == 0``; ties have probability 0.)

    It acts element-wise on the gradient matrix itself, not on the Gramian, so it is an
    :class:`Aggregator`, not a Gramian weighting. The paper applies it to the gradient of a
    shared *activation* (representation level, e.g. the backbone output); applying it to
    flattened shared-parameter gradients is the variant used by the CAGrad/Recon code.

    Args:
        leak: ``l`` in [0, 1], one number or one per task (default 0: pure GradDrop;
            ``1`` returns the plain sum).
        reduction: ``'sum'`` (default, the paper) or ``'mean'``.
        batch_size: when the columns are a flattened ``[batch, ...]`` activation gradient
            (row-major, batch first), compute ``P`` on the batch-summed gradient and draw one
            ``U`` per non-batch element, both broadcast over the batch, as the paper does for
            batched activations. ``None`` (default): per column. Can be passed per call.
        seed: seed of the ``torch.Generator`` (created on the gradients' device) that draws
            ``U``; its state is saved in ``state_dict``. Same seed on every rank gives the same
            draws when the gradients were all-reduced first (parameter level).

    Zero elements contribute nothing and an all-zero column gives ``P = 1/2`` (no NaN). A
    NaN/inf entry makes its column's output NaN (the masks multiply); the engine checks G's
    finiteness before aggregating.
    ``T = 1`` returns the row. Memory: one ``[P]`` purity, one ``[P]`` uniform draw, the
    output (none when it is written into ``grads[0]``, ``out=``) and one task's mask and
    masked row at a time.
    """

    deterministic = False

    def __init__(
        self,
        leak: Union[float, Sequence[float]] = 0.0,
        reduction: str = "sum",
        batch_size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.leak = check_vector("graddrop", "leak", leak, low=0.0, high=1.0)
        self.reduction = check_choice("graddrop", "reduction", reduction, ("sum", "mean"))
        if batch_size is not None:
            check_number("graddrop", "batch_size", batch_size, low=1, integer=True)
        self.batch_size = batch_size
        self.seed = check_seed("graddrop", seed)
        self._rng = SeededRNG(self.seed)

    def forward(self, grads: torch.Tensor, batch_size: Optional[int] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The GradDrop update of the rows of ``grads``; ``out``: a ``[P]`` tensor to write it
        into, which may be ``grads[0]`` (the engine's direction buffer: row 0 is read before
        it is overwritten) but no other row of ``grads``."""
        check_grads(grads)
        t, p = grads.shape
        assert self.leak is not None
        check_vector_length("graddrop", "leak", self.leak, t)
        leak = self.leak.expand(t) if self.leak.numel() == 1 else self.leak
        bs = self.batch_size if batch_size is None else batch_size
        if bs is not None and (bs < 1 or p % bs != 0):
            raise ValueError(
                f"aggregator graddrop: batch_size={bs} does not divide the {p} columns of grads"
            )
        if out is None:
            out = torch.empty(p, dtype=grads.dtype, device=grads.device)
        elif out.shape != (p,) or out.dtype != grads.dtype or out.device != grads.device:
            raise ValueError(f"out: expected a [{p}] {grads.dtype} tensor on {grads.device}, got "
                             f"{out.dtype} of shape {tuple(out.shape)} on {out.device}")
        elif out.untyped_storage().data_ptr() == grads.untyped_storage().data_ptr() \
                and _row_of(out, grads) != 0:
            raise ValueError("out: shares memory with grads without being its row 0; expected "
                             "a separate [P] tensor or grads[0]")
        keep_pos = self._keep_positive(grads, bs)
        for i in range(t):  # one task's mask at a time, no masked copy of a row
            row = grads[i]
            li = float(leak[i])
            keep = None
            if li < 1.0:
                # M_i = 1[g_i > 0] where P > U, else 1[g_i <= 0] (1[g_i < 0] but for zero
                # entries, which add nothing either way)
                keep = (row > 0) == keep_pos
                if li > 0.0:  # l_i + (1 - l_i) M_i
                    keep = keep.to(row.dtype).mul_(1.0 - li).add_(li)
            if keep is None and i:
                out.add_(row)
            elif keep is None:
                out.copy_(row)
            elif i:
                out.addcmul_(row, keep)
            else:
                torch.mul(row, keep, out=out)
        factor = reduce_factor(self.reduction, t)
        return out if factor == 1.0 else out.mul_(factor)

    def _keep_positive(self, grads: torch.Tensor, bs: Optional[int]) -> torch.Tensor:
        """Boolean ``[P]``: ``P > U`` per column (sign purity over a uniform draw), the
        ``[P]`` intermediates formed in place: no ``[T, P]`` temporary."""
        t, p = grads.shape
        work_dtype = torch.float32 if grads.dtype in (torch.float16, torch.bfloat16) else grads.dtype
        summed = grads if bs is None else grads.reshape(t, bs, p // bs).sum(dim=1)
        num = summed.sum(dim=0, dtype=work_dtype)
        den = summed[0].abs().to(work_dtype)
        for r in summed[1:]:
            den.add_(r.abs())
        purity = num.div_(den.clamp_min_(torch.finfo(work_dtype).tiny)).add_(1.0).mul_(0.5)
        del den, summed
        u = torch.rand(
            purity.shape, generator=self._rng.get(grads.device), device=grads.device, dtype=work_dtype
        )
        keep_pos = purity > u
        if bs is not None:
            keep_pos = keep_pos.unsqueeze(0).expand(bs, -1).reshape(p)
        return keep_pos

    def get_extra_state(self) -> Dict[str, Any]:
        return {"rng": self._rng.state()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._rng.load(state["rng"])

    def extra_repr(self) -> str:
        assert self.leak is not None
        leak = self.leak.tolist()
        return (
            f"leak={leak[0] if len(leak) == 1 else leak}, reduction={self.reduction!r}, "
            f"batch_size={self.batch_size}, seed={self.seed}"
        )
