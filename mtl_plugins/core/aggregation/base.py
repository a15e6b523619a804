"""Base classes for gradient aggregators.

An aggregator maps the task-gradient matrix ``G`` of shape ``[T, P]`` (row t: the gradient of
task t's loss with respect to the P shared parameters, or to a shared representation) to one
update direction of shape ``[P]``. Following TorchJD's split, most aggregators are a
*weighting* of the rows computed from the ``T x T`` Gramian ``G G^T``: the direction is then
``w @ G``, which never materialises modified copies of G (memory: G plus T x T).

Aggregators are ``nn.Module`` s so that their state (EMA targets, RNG state, previous
weights) travels with ``state_dict`` into framework checkpoints; non-tensor state goes
through ``get_extra_state`` / ``set_extra_state``.
"""
from __future__ import annotations

import abc

import torch
from torch import nn

from ._utils import combine64, gramian64


class Aggregator(nn.Module, abc.ABC):
    """Maps a ``[T, P]`` task-gradient matrix to a ``[P]`` direction."""

    #: whether the aggregator is a deterministic function of its input (no RNG); used by
    #: tests and by the DDP equivalence check.
    deterministic: bool = True

    @abc.abstractmethod
    def forward(self, grads: torch.Tensor) -> torch.Tensor:
        """Return the aggregated direction for ``grads`` of shape ``[T, P]``."""


class GramianWeighting(Aggregator):
    """An aggregator whose direction is ``weights(G G^T) @ G``.

    Subclasses implement :meth:`weights`. The Gramian is accumulated in float64 from ``G``'s
    entries (:func:`~._utils.gramian64`), not formed in ``G``'s dtype and then cast: on nearly
    collinear rows a float32 Gramian loses the small eigenvalues the solvers depend on. The
    direction ``w @ G`` is accumulated in float64 too (:func:`~._utils.combine64`) and
    returned in ``G``'s dtype.

    :attr:`weights_give_direction`: the direction is exactly ``weights(G G^T) @ G`` (with
    ``losses=`` for an aggregator whose ``needs_losses`` is set), so the engine may form it
    from per-task gradient tensors without filling a ``[T, P]`` matrix
    (:class:`~.c_gramian.SegmentedRows`). A subclass that overrides ``forward`` is taken to
    do something else (False) unless it sets the attribute itself.
    """

    weights_give_direction: bool = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and "weights_give_direction" not in cls.__dict__:
            cls.weights_give_direction = False

    @abc.abstractmethod
    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        """Return ``[T]`` row weights from the ``[T, T]`` Gramian (float64)."""

    def forward(self, grads: torch.Tensor, gramian: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``weights(G G^T) @ G``; ``gramian`` may be passed in when the caller has it (it
        should then be float64, as :func:`~._utils.gramian64` forms it); ``out``: a ``[P]``
        buffer for the direction (:func:`~._utils.combine64`)."""
        check_grads(grads)
        if gramian is None:
            gramian = gramian64(grads)
        gramian = gramian.double()
        return combine64(self.weights(gramian), grads, gramian, out=out)


def check_grads(grads: torch.Tensor) -> None:
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(
            f"grads: expected a [T, P] task-gradient matrix with T >= 1, got shape {tuple(grads.shape)}"
        )
