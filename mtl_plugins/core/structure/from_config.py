"""The structure methods built from adapter config dicts (mmseg and detectron2 share these).

GradSplit and the Recon search act on the engine's task-gradient matrix G, so the framework
adapters install them as the controller's aggregator (wrapping the configured one) once the
model and the engine's shared-parameter list are known (:func:`structure_aggregator`):

- ``gradsplit=dict(modules=[patterns], relation=None | [[...]] | 'relation.json',
  split_norm_affine, norm_names, remainder, permute_seed, split_reduction, drop_rate=None,
  seed=0, separate_optimizers=False)`` → :class:`~.gradsplit.GradSplit` (``drop_rate``: the
  DropGrad baseline; ``separate_optimizers``: one optimizer state per task, stepped by the
  adapter through :class:`~.separate_optim.SeparateTaskOptimizers`);
- ``recon_search=dict(modules=None | [patterns], S=-0.02, out=path)`` →
  :class:`CPUConflictRecorder` (``out`` is the adapter's business: where to write the ranking).

Maximum Roaming and Recon stage 2 change the model itself, at build time:

- ``roaming=dict(layers=[patterns], p, interval_epochs=0.1 | interval=N, completion=1.0,
  init='exact', seed=0)`` → :func:`build_roaming` (:class:`~.roaming.MaximumRoaming`; Δ in
  epochs, paper 002's form and default, converted by the adapter, or in optimizer steps);
- ``recon=dict(ranking=path, topk=K, init='copy')`` or ``recon=dict(modules=[patterns])`` →
  :func:`build_recon` (:func:`~.recon.make_task_specific`).

Errors name the adapter's key (``key``, e.g. ``"model.roaming"`` or ``"MTL.ROAMING"``; with
``upper=True`` the sub-keys are spelled as yacs keys, ``MTL.ROAMING.P``).
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

from torch import nn

from ..aggregation.base import Aggregator
from ..tasks import MTLConfigError
from .gradsplit import GradSplit, load_relation, split_layout
from .context import TaskContext
from .recon import INITS as RECON_INITS
from .recon import ConflictRecorder, ReconTransform, load_ranking, make_task_specific
from .roaming import MaximumRoaming

GRADSPLIT_KEYS = ("modules", "relation", "split_norm_affine", "norm_names", "remainder",
                  "permute_seed", "split_reduction", "drop_rate", "seed", "separate_optimizers")
RECON_SEARCH_KEYS = ("modules", "S", "out")
ROAMING_KEYS = ("layers", "p", "interval", "interval_epochs", "completion", "init", "seed")
RECON_KEYS = ("ranking", "topk", "modules", "init")


def check_keys(cfg: Any, allowed: Sequence[str], key: str) -> dict:
    """``cfg`` as a dict, after checking it holds only ``allowed`` keys (errors name ``key``)."""
    if not isinstance(cfg, Mapping):
        raise MTLConfigError(f"{key}={cfg!r}: expected a dict")
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise MTLConfigError(f"{key}: unknown key(s) {unknown}; expected {list(allowed)}")
    return dict(cfg)


def check_gradsplit_cfg(cfg: Any, task_names: Sequence[str], key: str,
                        upper: bool = False) -> dict:
    """``cfg`` checked, with ``relation`` resolved to a ``[T, T]`` list (a matrix as given,
    or read from a file by :func:`~.gradsplit.load_relation`) or ``None``."""
    cfg = check_keys(cfg, GRADSPLIT_KEYS, key)
    if not cfg.get("modules"):
        raise MTLConfigError(f"{_sub(key, 'modules', upper)} is missing: the convs to split, "
                             "e.g. modules=['backbone.layer4.*']")
    rel = load_relation(cfg.get("relation"), task_names, key=_sub(key, "relation", upper))
    cfg["relation"] = None if rel is None else rel.int().tolist()
    p = cfg.get("drop_rate")
    if p is not None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise MTLConfigError(f"{_sub(key, 'drop_rate', upper)}={p!r}: expected None "
                                 "(GradSplit) or DropGrad's drop rate in [0, 1) (paper 000 "
                                 "Table 4: 0.5, 0.75)")
        if rel is not None:
            raise MTLConfigError(f"{_sub(key, 'relation', upper)} with "
                                 f"{_sub(key, 'drop_rate', upper)}={p!r}: DropGrad draws random "
                                 "masks and ignores the relation; expected no relation")
    sep = cfg.get("separate_optimizers", False)
    if not isinstance(sep, bool):
        raise MTLConfigError(f"{_sub(key, 'separate_optimizers', upper)}={sep!r}: expected "
                             "True or False")
    return cfg


def check_recon_search_cfg(cfg: Any, key: str) -> dict:
    cfg = check_keys(cfg, RECON_SEARCH_KEYS, key)
    out = cfg.setdefault("out", "recon_ranking.json")
    if not isinstance(out, str) or not out:
        raise MTLConfigError(f"{key}.out={out!r}: expected a file path")
    return cfg


def _sub(key: str, name: str, upper: bool) -> str:
    return f"{key}.{name.upper() if upper else name}"


def check_roaming_cfg(cfg: Any, key: str, upper: bool = False) -> dict:
    """``cfg`` as a dict of :data:`ROAMING_KEYS` with ``layers`` and ``p`` present."""
    cfg = check_keys(cfg, ROAMING_KEYS, key)
    for req in ("layers", "p"):
        if req not in cfg:
            raise MTLConfigError(
                f"{_sub(key, req, upper)} is missing: expected the layers whose output is "
                "masked (names or glob patterns) and the sharing ratio p in (0, 1]")
    if cfg.get("interval") is not None and cfg.get("interval_epochs") is not None:
        raise MTLConfigError(
            f"{_sub(key, 'interval', upper)}={cfg['interval']!r} and "
            f"{_sub(key, 'interval_epochs', upper)}={cfg['interval_epochs']!r}: expected one "
            "of them (Δ in optimizer steps, or in epochs as paper 002 states it; neither: the "
            "paper's 0.1 epoch)")
    return cfg


def build_roaming(model: nn.Module, cfg: Any, task_names: Sequence[str],
                  context: TaskContext, key: str, upper: bool = False) -> MaximumRoaming:
    """Maximum Roaming (paper 002, eq. 2-4) over ``cfg['layers']`` of ``model``, on
    ``context``; the caller registers it as a submodule (its state is then checkpointed)."""
    cfg = check_roaming_cfg(cfg, key, upper)
    layers = cfg.pop("layers")
    layers = layers if isinstance(layers, str) else list(layers)
    try:
        roaming = MaximumRoaming(model, layers, task_names, context=context, **cfg)
    except MTLConfigError as e:
        raise MTLConfigError(f"{key} ({_sub(key, 'layers', upper)}={layers!r}): {e}") from None
    roaming.config_key = _sub(key, "layers", upper)
    return roaming


def check_recon_cfg(cfg: Any, key: str, upper: bool = False) -> dict:
    """``cfg`` as a dict of :data:`RECON_KEYS`: exactly one of ``ranking`` (with ``topk``
    >= 1) and ``modules`` (the ranking file is not read here)."""
    cfg = check_keys(cfg, RECON_KEYS, key)
    ranking, topk = _sub(key, "ranking", upper), _sub(key, "topk", upper)
    if ("ranking" in cfg) == ("modules" in cfg):
        raise MTLConfigError(
            f"{key}: give exactly one of {ranking} (a ranking JSON, with {topk}=K) or "
            f"{_sub(key, 'modules', upper)} (module names); got {cfg!r}")
    if "modules" in cfg and "topk" in cfg:
        raise MTLConfigError(f"{topk}={cfg['topk']!r}: only with {ranking}; expected it unset "
                             "with explicit module names")
    k = cfg.get("topk")
    if "ranking" in cfg and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise MTLConfigError(f"{topk}={k!r}: expected the number of top-ranked modules to "
                             "make task-specific (>= 1)")
    init = cfg.get("init", "copy")
    if init not in RECON_INITS:
        raise MTLConfigError(f"{_sub(key, 'init', upper)}={init!r}: expected one of "
                             f"{list(RECON_INITS)}")
    return cfg


def recon_module_names(cfg: Any, key: str, upper: bool = False
                       ) -> Tuple[List[str], str, Any]:
    """``(module names, key naming their source, its value)`` of a ``recon`` config: the top
    ``topk`` of the ranking JSON (paper 004, Algorithm 1, stage 2) or ``modules``."""
    cfg = check_recon_cfg(cfg, key, upper)
    if "modules" in cfg:
        names = cfg["modules"]
        return ([names] if isinstance(names, str) else list(names)), \
            _sub(key, "modules", upper), names
    path = cfg["ranking"]
    ranking = _sub(key, "ranking", upper)
    try:
        names = load_ranking(path, cfg["topk"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MTLConfigError(f"{ranking}={path!r}: cannot read the ranking ({e}); expected "
                             "the JSON written by the Recon search") from None
    return names, ranking, path


def build_recon(model: nn.Module, cfg: Any, task_names: Sequence[str], context: TaskContext,
                key: str, upper: bool = False,
                shared_params: Optional[Sequence[nn.Parameter]] = None) -> ReconTransform:
    """Recon stage 2 (paper 004, Algorithm 1): the modules of ``cfg`` become per-task copies
    of ``model`` (in place) routed by ``context``; ``shared_params`` (θ_sh before the
    conversion) give the report its % of shared parameters turned task-specific."""
    names, source, value = recon_module_names(cfg, key, upper)
    try:
        return make_task_specific(model, names, task_names, context,
                                  init=dict(cfg).get("init", "copy"),
                                  shared_params=shared_params)
    except MTLConfigError as e:
        raise MTLConfigError(f"{source}={value!r}: {e}") from None


class CPUConflictRecorder(ConflictRecorder):
    """A :class:`ConflictRecorder` whose counters stay on the CPU when the controller moves to
    the GPU (``record`` adds CPU counts); only the wrapped aggregator moves."""

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        self.base._apply(fn, *args, **kwargs)
        return self


def structure_aggregator(model: nn.Module, shared_params: Sequence[nn.Parameter],
                         task_names: Sequence[str], base: Optional[Aggregator],
                         gradsplit: Optional[dict] = None, recon_search: Optional[dict] = None,
                         key: str = "mtl") -> Optional[Aggregator]:
    """``base`` wrapped in GradSplit and/or the Recon recorder (checked configs; see module doc).

    ``shared_params`` must be the list the engine gets: G's columns follow its order.
    """
    agg = base
    shared = list(shared_params)
    if gradsplit is not None:
        cfg = dict(gradsplit)
        modules = cfg.pop("modules")
        relation = cfg.pop("relation", None)
        reduction = cfg.pop("split_reduction", "sum")
        extra = dict(drop_rate=cfg.pop("drop_rate", None), seed=cfg.pop("seed", 0),
                     record_task_rows=cfg.pop("separate_optimizers", False))
        try:
            layout = split_layout(model, modules, task_names, shared, **cfg)
        except MTLConfigError as e:
            raise MTLConfigError(f"{key}.gradsplit.modules={modules!r}: {e}") from None
        try:
            agg = GradSplit(relation, layout, base=agg, split_reduction=reduction, **extra)
        except MTLConfigError as e:
            raise MTLConfigError(f"{key}.gradsplit: {e}") from None
    if recon_search is not None:
        modules = recon_search.get("modules")
        try:
            agg = CPUConflictRecorder(model, modules, recon_search.get("S", -0.02),
                                      shared_params=shared, base=agg, task_names=task_names)
        except MTLConfigError as e:
            raise MTLConfigError(f"{key}.recon_search (modules={modules!r}): {e}") from None
    return agg
