"""GradSplit and the Recon search as aggregators, built from adapter config dicts.

Both act on the engine's task-gradient matrix G, so the framework adapters install them as
the controller's aggregator (wrapping the configured one) once the model and the engine's
shared-parameter list are known (:func:`structure_aggregator`):

- ``gradsplit=dict(modules=[patterns], relation=None | [[...]], split_norm_affine, norm_names,
  remainder, permute_seed, split_reduction)`` → :class:`~.gradsplit.GradSplit`;
- ``recon_search=dict(modules=None | [patterns], S=-0.02, out=path)`` →
  :class:`CPUConflictRecorder` (``out`` is the adapter's business: where to write the ranking).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import nn

from ..aggregation.base import Aggregator
from ..tasks import MTLConfigError
from .gradsplit import GradSplit, check_relation, split_layout
from .recon import ConflictRecorder

GRADSPLIT_KEYS = ("modules", "relation", "split_norm_affine", "norm_names", "remainder",
                  "permute_seed", "split_reduction")
RECON_SEARCH_KEYS = ("modules", "S", "out")


def check_keys(cfg: Any, allowed: Sequence[str], key: str) -> dict:
    """``cfg`` as a dict, after checking it holds only ``allowed`` keys (errors name ``key``)."""
    if not isinstance(cfg, Mapping):
        raise MTLConfigError(f"{key}={cfg!r}: expected a dict")
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise MTLConfigError(f"{key}: unknown key(s) {unknown}; expected {list(allowed)}")
    return dict(cfg)


def check_gradsplit_cfg(cfg: Any, num_tasks: int, key: str) -> dict:
    cfg = check_keys(cfg, GRADSPLIT_KEYS, key)
    if not cfg.get("modules"):
        raise MTLConfigError(f"{key}.modules is missing: the convs to split, e.g. "
                             "modules=['backbone.layer4.*']")
    if cfg.get("relation") is not None:
        check_relation(cfg["relation"], num_tasks, key=f"{key}.relation")
    return cfg


def check_recon_search_cfg(cfg: Any, key: str) -> dict:
    cfg = check_keys(cfg, RECON_SEARCH_KEYS, key)
    out = cfg.setdefault("out", "recon_ranking.json")
    if not isinstance(out, str) or not out:
        raise MTLConfigError(f"{key}.out={out!r}: expected a file path")
    return cfg


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
        try:
            layout = split_layout(model, modules, task_names, shared, **cfg)
        except MTLConfigError as e:
            raise MTLConfigError(f"{key}.gradsplit.modules={modules!r}: {e}") from None
        agg = GradSplit(relation, layout, base=agg, split_reduction=reduction)
    if recon_search is not None:
        modules = recon_search.get("modules")
        try:
            agg = CPUConflictRecorder(model, modules, recon_search.get("S", -0.02),
                                      shared_params=shared, base=agg, task_names=task_names)
        except MTLConfigError as e:
            raise MTLConfigError(f"{key}.recon_search (modules={modules!r}): {e}") from None
    return agg
