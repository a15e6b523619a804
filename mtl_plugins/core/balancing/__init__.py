"""Loss balancing (task weighting): map per-task losses to weighted per-task losses.

Every balancer follows the contract of :class:`~.base.LossBalancer`. Build one from a config
with :func:`build_balancer`::

    build_balancer("dwa", ["seg", "depth"])
    build_balancer(dict(type="uncertainty", classification_tasks=["seg"]), ["seg", "depth"])

What each needs from the training loop besides ``forward``:

============  ==============================================================================
fixed         nothing
uncertainty   its ``log_vars`` parameter in the optimizer (no weight decay)
gradnorm      ``balance_grads(losses, shared_params)`` before the backward, ``after_step()``
              after ``optimizer.step()`` (steps its weights with their own optimizer)
dwa           ``after_step(losses)`` every step, ``on_epoch_end()`` every epoch
dtp           ``update_kpis({task: kpi in [0, 1]})``
rlw           nothing (one ``forward`` per step)
gls           nothing
famo          ``after_step(losses recomputed on the same batch after the step)``, or
              ``update='next_forward'`` for no extra forward
============  ==============================================================================
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Sequence, Type, Union

from ..tasks import MTLConfigError, check_task_names
from .base import LossBalancer
from .dtp import DynamicTaskPrioritization
from .dwa import DynamicWeightAverage
from .famo import FAMO
from .fixed import FixedWeights
from .gls import GeometricLossStrategy
from .gradnorm import GradNorm
from .rlw import RandomLossWeighting
from .uncertainty import UncertaintyWeighting

BALANCERS: Dict[str, Type[LossBalancer]] = {
    "fixed": FixedWeights,
    "uncertainty": UncertaintyWeighting,
    "gradnorm": GradNorm,
    "dwa": DynamicWeightAverage,
    "dtp": DynamicTaskPrioritization,
    "rlw": RandomLossWeighting,
    "gls": GeometricLossStrategy,
    "famo": FAMO,
}

BalancerConfig = Union[str, Mapping[str, Any], LossBalancer, None]


def build_balancer(cfg: BalancerConfig, task_names: Sequence[str]) -> LossBalancer:
    """Build a balancer from a name, a ``dict(type=name, **kwargs)``, or ``None`` (fixed 1s).

    An already built :class:`LossBalancer` is returned as is if its tasks match.
    Unknown names, a missing ``type`` and unknown or missing keyword arguments raise
    :class:`MTLConfigError` naming the key ``balancer``, the value and what is accepted; option
    values are checked by the balancer's constructor (errors name ``balancer.<option>``).
    """
    names = check_task_names(task_names)
    if cfg is None:
        return FixedWeights(names)
    if isinstance(cfg, LossBalancer):
        if tuple(cfg.task_names) != names:
            raise MTLConfigError(
                f"balancer: the given {type(cfg).__name__} was built for tasks "
                f"{list(cfg.task_names)!r}, expected {list(names)!r}"
            )
        return cfg
    if isinstance(cfg, str):
        kind, kwargs = cfg, {}
    elif isinstance(cfg, Mapping):
        if "type" not in cfg:
            raise MTLConfigError(
                f"balancer={dict(cfg)!r}: missing key 'type'; expected one of {sorted(BALANCERS)}"
            )
        kwargs = {k: v for k, v in cfg.items() if k != "type"}
        kind = cfg["type"]
    else:
        raise MTLConfigError(
            f"balancer={cfg!r}: expected a name, a dict with key 'type', or None"
        )
    if not isinstance(kind, str) or kind.lower() not in BALANCERS:
        raise MTLConfigError(
            f"balancer type={kind!r}: unknown loss balancer; expected one of {sorted(BALANCERS)}"
        )
    cls = BALANCERS[kind.lower()]
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise MTLConfigError(f"balancer={cfg!r}: option names must be strings, got {bad!r}")
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p not in ("self", "task_names")]
    unknown = [k for k in kwargs if k not in accepted]
    if "task_names" in kwargs:
        unknown.append("task_names")
    if unknown:
        raise MTLConfigError(
            f"balancer type={kind!r}: unknown option(s) {unknown!r}; {cls.__name__} accepts "
            f"{accepted!r}"
        )
    try:
        sig.bind(None, names, **kwargs)
    except TypeError as err:  # pragma: no cover - all options have defaults today
        raise MTLConfigError(f"balancer type={kind!r}: {err}") from None
    return cls(names, **kwargs)


__all__ = [
    "BALANCERS",
    "build_balancer",
    "LossBalancer",
    "FixedWeights",
    "UncertaintyWeighting",
    "GradNorm",
    "DynamicWeightAverage",
    "DynamicTaskPrioritization",
    "RandomLossWeighting",
    "GeometricLossStrategy",
    "FAMO",
]
