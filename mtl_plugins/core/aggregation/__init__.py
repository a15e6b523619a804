"""Gradient aggregation: map a ``[T, P]`` task-gradient matrix to one ``[P]`` direction.

Every aggregator is an ``nn.Module`` (state in ``state_dict``) with
``forward(grads[T, P]) -> [P]``. Most are :class:`GramianWeighting` s: they compute row weights
from the ``T x T`` Gramian ``G G^T`` only (``weights(gramian) -> [T]``), so the engine can
form ``w @ G`` without any modified copy of ``G``:

========================  ===========================  =====================================
name (``type``)           class                        kind
========================  ===========================  =====================================
``mean``                  :class:`Mean`                Gramian weighting (constant)
``sum``                   :class:`Sum`                 Gramian weighting (constant)
``pcgrad``                :class:`PCGrad`              Gramian weighting (random order)
``gradvac``               :class:`GradVac`             Gramian weighting per parameter group
``cagrad``                :class:`CAGrad`              Gramian weighting
``mgda``                  :class:`MGDA`                Gramian weighting (``losses`` for
                                                       ``normalization='loss'/'loss+'``)
``imtl``                  :class:`IMTLG`               Gramian weighting
``nashmtl``               :class:`NashMTL`             Gramian weighting (stateful)
``aligned_mtl``           :class:`AlignedMTL`          Gramian weighting
``upgrad``                :class:`UPGrad`              Gramian weighting
``dualproj``              :class:`DualProj`            Gramian weighting
``graddrop``              :class:`GradDrop`            element-wise on ``G`` (needs ``G``)
========================  ===========================  =====================================

Conventions shared by all: the Gramian and the direction ``w @ G`` are accumulated in
float64 from ``G``'s entries (``_utils.gramian64`` / ``combine64``), solvers run in float64 on
the CPU (one ``T x T`` copy per step), the direction has the dtype and device of ``grads``; a row that is exactly zero is a
task absent from the step (it never makes the result NaN); ``T = 1`` returns the row or a
documented multiple of it. "UB" variants (MGDA-UB, Aligned-MTL-UB) are the same classes
applied by the backward engine to representation gradients.

Hints for the backward engine (read with ``getattr(agg, name, False)``):

- ``needs_losses`` (MGDA with ``normalization='loss'/'loss+'``): call
  ``agg(grads, losses=...)`` with one loss per row;
- ``needs_all_tasks`` (GradVac, NashMTL): state is kept per task, so the rows must always be
  all tasks of the model in a fixed order, with a zero row for a task absent from a step;
- GradVac takes ``group_sizes`` (one per shared parameter tensor, in flattening order) in
  its constructor, as an attribute, or per call: ``agg(grads, group_sizes=...)``.

Build from configuration with :func:`build_aggregator`::

    build_aggregator("pcgrad")
    build_aggregator("cagrad", c=0.4)
    build_aggregator(dict(type="cagrad", c=0.4, rescale=1))   # framework config style
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Type, Union

from ..tasks import MTLConfigError
from .aligned_mtl import AlignedMTL
from .base import Aggregator, GramianWeighting, check_grads
from .cagrad import CAGrad
from .dualproj import DualProj
from .graddrop import GradDrop
from .gradvac import GradVac
from .imtl import IMTLG
from .mean import Mean, Sum
from .mgda import MGDA
from .nashmtl import NashMTL
from .pcgrad import PCGrad
from .upgrad import UPGrad

AGGREGATORS: Dict[str, Type[Aggregator]] = {
    "mean": Mean,
    "sum": Sum,
    "pcgrad": PCGrad,
    "gradvac": GradVac,
    "graddrop": GradDrop,
    "cagrad": CAGrad,
    "mgda": MGDA,
    "imtl": IMTLG,
    "nashmtl": NashMTL,
    "aligned_mtl": AlignedMTL,
    "upgrad": UPGrad,
    "dualproj": DualProj,
}

#: accepted spellings that map to a name of :data:`AGGREGATORS` (after lower-casing and
#: replacing ``-`` by ``_``).
ALIASES: Dict[str, str] = {
    "ew": "mean",
    "equal_weighting": "mean",
    "imtl_g": "imtl",
    "imtlg": "imtl",
    "nash_mtl": "nashmtl",
    "nash": "nashmtl",
    "alignedmtl": "aligned_mtl",
    "amtl": "aligned_mtl",
}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def build_aggregator(cfg: Union[str, Mapping[str, Any], Aggregator], **kwargs: Any) -> Aggregator:
    """Build an aggregator from a name or a config dict.

    ``cfg`` is either a name (``"pcgrad"``; case-insensitive, ``-``/``_`` alike, a few aliases
    such as ``"imtl_g"``), a dict ``{"type": name, **constructor_kwargs}`` (the form the
    MMEngine / Detectron2 adapters pass: ``aggregator=dict(type='cagrad', c=0.4)``; the dict
    is not modified), or an already built :class:`Aggregator` (returned unchanged; extra
    kwargs are then an error). ``kwargs`` are merged over the dict's entries.

    Raises :class:`MTLConfigError` naming the key ``aggregator``, the value and the known
    names for an unknown name, and naming the accepted arguments for unknown or missing
    constructor arguments; constructors raise it for bad values.
    """
    if isinstance(cfg, Aggregator):
        if kwargs:
            raise MTLConfigError(
                f"aggregator={cfg!r} is already built; unexpected extra arguments {sorted(kwargs)}"
            )
        return cfg
    if isinstance(cfg, str):
        name, params = cfg, dict(kwargs)
    elif isinstance(cfg, Mapping):
        params = dict(cfg)
        if "type" not in params:
            raise MTLConfigError(
                f"aggregator={dict(cfg)!r}: missing key 'type'; expected one of {sorted(AGGREGATORS)}"
            )
        name = params.pop("type")
        params.update(kwargs)
    else:
        raise MTLConfigError(
            f"aggregator={cfg!r}: expected a name (str), a dict with key 'type', or an Aggregator"
        )
    if not isinstance(name, str) or _canonical(name) not in AGGREGATORS:
        raise MTLConfigError(
            f"aggregator type={name!r}: unknown aggregator; expected one of {sorted(AGGREGATORS)}"
        )
    cls = AGGREGATORS[_canonical(name)]
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise MTLConfigError(
            f"aggregator type={name!r}: unknown argument(s) {unknown} for {cls.__name__}; "
            f"accepted: {accepted}"
        )
    try:
        sig.bind(None, **params)
    except TypeError as exc:
        raise MTLConfigError(
            f"aggregator type={name!r}: bad arguments {params!r} for {cls.__name__} ({exc}); "
            f"accepted: {accepted}"
        ) from None
    return cls(**params)


__all__ = [
    "AGGREGATORS",
    "ALIASES",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "GradDrop",
    "GradVac",
    "GramianWeighting",
    "IMTLG",
    "MGDA",
    "Mean",
    "NashMTL",
    "PCGrad",
    "Sum",
    "UPGrad",
    "build_aggregator",
    "check_grads",
]
