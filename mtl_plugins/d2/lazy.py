"""LazyConfig side of the detectron2 integration: ``train.mtl`` (a dict) → the MTL trainer.

``tools/lazyconfig_train_net.py`` builds :class:`~mtl_plugins.d2.trainer.MTLTrainer` instead
of ``SimpleTrainer``/``AMPTrainer`` when the config has ``train.mtl``::

    train.mtl = dict(
        tasks=["detection", "mask"],
        task_losses=None,               # None = built-in groups; else {task: [loss keys]}
        allocation=dict(mode="sta", k=1, seed=0, gap=1),   # ft | sta | ista | gap
        balancer=None,                  # None | name | dict(type=name, **kwargs)
        aggregator=None,                # None | name | dict(type=name, **kwargs)
        level="parameter",              # or "representation"
        task_reduction="sum",           # or "mean"
        gramian_kernel="auto",          # or "blas" | "c" | "fused" (same numbers)
        gradsplit=None,                 # None | dict(modules=[...], relation=None | [[..]] |
                                        #   "relation.json", drop_rate=None, seed=0,
                                        #   separate_optimizers=False)
        recon_search=None,              # None | dict(modules=None, S=-0.02, out="....json")
    )

It is the counterpart of the yacs ``cfg.MTL`` node
(:func:`~mtl_plugins.d2.config.build_mtl_controller`,
:func:`~mtl_plugins.d2.config.structure_configs`): missing keys take the same defaults, and
every wrong key or value raises :class:`MTLConfigError` naming ``train.mtl.<key>``, the value
and what is expected. Multi-dataset loading (``MTL.MULTI_DATASET``) has no counterpart here.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from ..core.controller import MTLController
from ..core.structure.from_config import (check_gradsplit_cfg, check_keys,
                                          check_recon_search_cfg)
from ..core.tasks import MTLConfigError, check_task_names
from .config import check_balancer_acts, check_step_settings, task_loss_mapping
from .trainer import MTLTrainer, unwrap_ddp, check_allocation_model

#: the config path of the MTL dict in a LazyConfig
KEY = "train.mtl"
#: the keys ``train.mtl`` accepts
MTL_KEYS = ("tasks", "task_losses", "allocation", "balancer", "aggregator", "level",
            "task_reduction", "gramian_kernel", "gradsplit", "recon_search", "check_exercised")
ALLOCATION_KEYS = ("mode", "k", "seed", "gap")
#: the yacs key names in the messages of the shared checks, and their LazyConfig names
YACS_NAMES = (("MTL.TASK_LOSSES", f"{KEY}.task_losses"), ("MTL.TASKS", f"{KEY}.tasks"),
              ("MTL.gradsplit", f"{KEY}.gradsplit"), ("MTL.recon_search", f"{KEY}.recon_search"))


class LazyMTL(NamedTuple):
    """What :class:`~mtl_plugins.d2.trainer.MTLTrainer` needs besides model, loader, optimizer."""

    controller: MTLController
    task_losses: Dict[str, Tuple[str, ...]]
    gradsplit: Optional[dict]
    recon_search: Optional[dict]


def to_plain(value: Any) -> Any:
    """``value`` with every mapping turned into a ``dict`` and every non-string sequence into a
    ``list`` (OmegaConf's ``DictConfig``/``ListConfig`` included, interpolations resolved)."""
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [to_plain(v) for v in value]
    return value


def lazy_key_error(err: MTLConfigError, key: str = KEY) -> MTLConfigError:
    """``err`` with the yacs key names of the shared checks (``task_loss_mapping``,
    ``MTLTrainer``) replaced by their names under ``key`` (:data:`YACS_NAMES`)."""
    message = str(err)
    for yacs, lazy in YACS_NAMES:
        message = message.replace(yacs, key + lazy[len(KEY):])
    return MTLConfigError(message)


def _check_tasks(tasks: Any, key: str) -> Tuple[str, ...]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise MTLConfigError(f"{key}.tasks={tasks!r}: expected a list of task names, "
                             "e.g. ['detection', 'mask']")
    return check_task_names(tasks, key=f"{key}.tasks")


def _check_task_losses(spec: Any, tasks: Sequence[str], key: str) -> Dict[str, Tuple[str, ...]]:
    """``{task: loss keys}`` by :func:`task_loss_mapping` (``None`` = built-in groups)."""
    if spec is not None:
        good = isinstance(spec, Mapping) and all(
            isinstance(keys, str) or (isinstance(keys, list)
                                      and all(isinstance(k, str) and k for k in keys))
            for keys in spec.values())
        if not good:
            raise MTLConfigError(f"{key}.task_losses={spec!r}: expected None (built-in groups) "
                                 "or a dict {task: [loss keys]}, e.g. "
                                 "{'detection': ['loss_cls', ...], 'mask': ['loss_mask']}")
    try:
        return task_loss_mapping(SimpleNamespace(TASKS=list(tasks), TASK_LOSSES=spec or []))
    except MTLConfigError as err:
        raise lazy_key_error(err, key) from None


def _allocation(allocation: Any, key: str) -> dict:
    """``<key>.allocation`` with its defaults filled (unknown keys refused)."""
    return {"mode": "ft", "k": 1, "seed": 0, "gap": 1,
            **check_keys(allocation, ALLOCATION_KEYS, f"{key}.allocation")}


def build_mtl_from_dict(mtl: Mapping, amp: bool = False, rank: int = 0,
                        key: str = KEY) -> LazyMTL:
    """The MTL trainer's parts described by a LazyConfig's ``train.mtl`` (see the module doc).

    Args:
        mtl: the ``train.mtl`` dict (a ``DictConfig`` or a plain mapping); missing keys take
            the defaults of the yacs ``MTL`` node (``add_mtl_config``).
        amp: ``train.amp.enabled``: the controller gets its own dynamic loss scaler, which
            replaces ``AMPTrainer``'s ``GradScaler`` (as ``SOLVER.AMP.ENABLED`` does for yacs).
        rank: the process rank: each rank draws its own allocation stream (as
            ``build_mtl_controller``).
        key: the config path named in errors (``model.mtl`` for ``ModelSideMTLRCNN``).
    """
    cfg = check_keys(to_plain(mtl), MTL_KEYS, key)
    tasks = _check_tasks(cfg.get("tasks", ["detection", "mask"]), key)
    task_losses = _check_task_losses(cfg.get("task_losses"), tasks, key)
    allocation = _allocation(cfg.get("allocation", {}), key)
    level, reduction = cfg.get("level", "parameter"), cfg.get("task_reduction", "sum")
    kernel = cfg.get("gramian_kernel", "auto")
    check_step_settings({**{f"allocation.{k}": v for k, v in allocation.items()},
                         "level": level, "task_reduction": reduction, "gramian_kernel": kernel},
                        len(tasks), lambda field: f"{key}.{field}")
    methods = {name: cfg.get(name) for name in ("balancer", "aggregator")}
    try:
        controller = MTLController(list(tasks), allocation=allocation, level=level,
                                   task_reduction=reduction, amp=bool(amp), rank=rank,
                                   check_exercised=cfg.get("check_exercised", 10),
                                   gramian_kernel=kernel, **methods)
    except MTLConfigError as err:
        named = ", ".join(f"{key}.{k}={v!r}" for k, v in methods.items() if v is not None)
        message = str(err).replace("gramian_kernel=", f"{key}.gramian_kernel=")
        raise MTLConfigError(f"{named or key}: {message}") from None
    check_balancer_acts(controller, f"{key}.balancer", f"{key}.balancer.period")
    controller.config_keys = {k: f"{key}.{k}" for k in ("balancer", "aggregator",
                                                        "check_exercised")}
    if controller.needs_post_step_losses:
        raise MTLConfigError(
            f"{key}.balancer={methods['balancer']!r}: FAMO with update='after_step' needs the "
            "losses recomputed on the same batch after each step, which the detectron2 step "
            "does not do; expected update='next_forward'")
    gradsplit = recon = None
    if cfg.get("gradsplit") is not None:
        gradsplit = check_gradsplit_cfg(cfg["gradsplit"], tasks, f"{key}.gradsplit")
    if cfg.get("recon_search") is not None:
        recon = check_recon_search_cfg(cfg["recon_search"], f"{key}.recon_search")
    return LazyMTL(controller, task_losses, gradsplit, recon)


def check_model(model: nn.Module, parts: LazyMTL) -> None:
    """Check that the model restricts its losses to the allocated images as ``train.mtl`` says.

    ``MTLGeneralizedRCNN`` (any model with ``mtl_task_losses``) must map the losses to the
    tasks exactly as ``train.mtl.task_losses``; a model without it ignores ``mtl_alloc`` and is
    accepted only with ``allocation.mode='ft'`` (every image trains every task).
    """
    check_allocation_model(model, parts.controller.allocator.mode, f"{KEY}.allocation.mode",
                           "lazy")
    ours = getattr(unwrap_ddp(model), "mtl_task_losses", None)
    if ours is None:
        return
    ours = {t: tuple(k) for t, k in ours.items()}
    if ours != parts.task_losses:
        raise MTLConfigError(
            f"model.mtl_task_losses={ours!r} differs from {KEY}.task_losses (resolved: "
            f"{parts.task_losses!r}); expected the same tasks and loss keys in both")


def build_mtl_trainer(model: nn.Module, data_loader, optimizer: torch.optim.Optimizer,
                      parts: LazyMTL) -> MTLTrainer:
    """:class:`MTLTrainer` from :func:`build_mtl_from_dict`'s parts, after :func:`check_model`;
    its configuration errors (GradSplit / Recon module patterns) name ``train.mtl.<key>``.

    The controller's learnable parameters (uncertainty weighting) join ``optimizer`` as their
    own group here: build the LR scheduler afterwards (detectron2's ``hooks.LRScheduler``
    builds it in ``before_train``).
    """
    check_model(model, parts)
    try:
        return MTLTrainer(model, data_loader, optimizer, parts.controller, parts.task_losses,
                          gradsplit=parts.gradsplit, recon_search=parts.recon_search)
    except MTLConfigError as err:
        raise lazy_key_error(err) from None
