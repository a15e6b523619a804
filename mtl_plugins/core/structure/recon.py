"""Recon: find the layers whose task gradients conflict most, make them task-specific
(paper 004, Algorithm 1).

Stage 1 (search). During a short run of the ordinary shared model, for every shared layer k
and every task pair i < j, count the iterations where ``cos(g_i^(k), g_j^(k)) < S``
(paper 004 Def. 3, the S-conflict score; a "layer" is a module owning parameters, weight and
bias concatenated). :class:`ConflictRecorder` is an aggregator wrapper: given to the backward
engine it reads the engine's ``G`` rows (nothing recomputed), counts, and returns the wrapped
base aggregator's direction (default: plain sum = joint training). ``ranking()`` sorts the
layers by score; ``to_json`` writes the ranking file.

Stage 2. :func:`make_task_specific` replaces the top-K modules by :class:`TaskRouter` s holding
one deep copy per task; a router dispatches on the active task of a :class:`TaskContext`, and
:func:`~mtl_plugins.core.structure.context.run_per_task` runs the model once per task. The
copies are task-specific parameters for the engine (``task_params``); the remaining shared
parameters are ``transform.shared_parameters()``. The paper retrains from scratch after the
transform: rebuild the optimizer with the new parameters. A router loads a state dict of the
un-converted model (pretrained weights) into every copy (:func:`route_state_dict`);
:func:`unrouted_state_dict` gives the names such a checkpoint uses.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

from ..aggregation.base import Aggregator, check_grads
from ..aggregation.mean import Sum
from ..tasks import MTLConfigError, check_task_names
from ._modules import nested, parent_and_attr, select_modules
from .context import TaskContext, run_per_task

INITS = ("copy", "reset")
R = TypeVar("R")


# --------------------------------------------------------------------------- stage 1
@dataclass
class ModuleColumns:
    """One scored layer: its columns of G (weight and bias together)."""

    name: str
    ranges: List[Tuple[int, int]]

    @property
    def numel(self) -> int:
        return sum(b - a for a, b in self.ranges)


def _matches(owner: str, pattern: str) -> bool:
    return owner == pattern or owner.startswith(pattern + ".") or \
        fnmatch.fnmatchcase(owner, pattern)


def module_layout(model: nn.Module, shared_params: Sequence[torch.Tensor],
                  module_names: Optional[Sequence[str] | str] = None) -> List[ModuleColumns]:
    """The layers of ``shared_params`` (engine order; ``requires_grad=False`` skipped as the
    engine does) with their column ranges in G. A layer is the module that owns the
    parameters (name without ``.weight``/``.bias``; the root module is ``""``).
    ``module_names``: keep the layers equal to, inside, or matching (glob) these names."""
    shared = [p for p in shared_params if p.requires_grad]
    owner = {id(p): n.rpartition(".")[0] for n, p in model.named_parameters()}
    patterns = [module_names] if isinstance(module_names, str) else module_names
    layers: Dict[str, ModuleColumns] = {}
    start = 0
    for p in shared:
        name = owner.get(id(p))
        if name is None:
            raise MTLConfigError(f"shared_params: a parameter of shape {tuple(p.shape)} is not "
                                 "a parameter of model")
        if patterns is None or any(_matches(name, pat) for pat in patterns):
            layers.setdefault(name, ModuleColumns(name, [])).ranges.append(
                (start, start + p.numel()))
        start += p.numel()
    if patterns is not None:
        for pat in patterns:
            if not any(_matches(n, pat) for n in layers):
                raise MTLConfigError(f"shared_module_names: {pat!r} matches no module owning "
                                     "shared parameters that require grad")
    return list(layers.values())


class ConflictRecorder(Aggregator):
    """Counts, per shared layer, the task pairs whose gradients conflict (cos < S).

    Args:
        model: the model (or its shared trunk) whose parameter names define the layers.
        shared_module_names: names/patterns of the layers to score (``None``: every layer
            of ``shared_params``). Heads are never scored: they are not in ``shared_params``.
        S: severity threshold in (−1, 0] (paper: −0.1 … 0; default −0.02, NYUv2/PASCAL).
        shared_params: the engine's shared parameter list, in its order (default: the
            parameters of ``model`` that require grad).
        base: the aggregator that makes the update during the search (default :class:`Sum`,
            joint training as in the paper's code); any aggregator works.
        task_names: for the JSON file only.

    Use it as the engine's aggregator (``TaskBackward(tasks, ConflictRecorder(...))``): the
    rows are then every task in order (``needs_all_tasks``; an absent task is a zero row,
    skipped). Or call :meth:`record` with any ``[T, P]`` matrix. A pair with a zero gradient
    in a layer is not counted (notes B10-7). Under DDP the engine all-reduces G first, so every
    rank counts the same global cosines.
    """

    needs_all_tasks = True

    def __init__(self, model: nn.Module, shared_module_names: Optional[Sequence[str] | str] = None,
                 S: float = -0.02, shared_params: Optional[Sequence[torch.Tensor]] = None,
                 base: Optional[Aggregator] = None,
                 task_names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        if isinstance(S, bool) or not isinstance(S, (int, float)) or not -1.0 < S <= 0.0:
            raise MTLConfigError(f"S={S!r}: expected a severity threshold in (-1, 0] "
                                 "(paper: -0.1 to 0, default -0.02)")
        self.S = float(S)
        params = list(model.parameters()) if shared_params is None else list(shared_params)
        self.layers = module_layout(model, params, shared_module_names)
        if not self.layers:
            raise MTLConfigError("ConflictRecorder: no shared layer with parameters that "
                                 "require grad to score")
        self.numel = sum(p.numel() for p in params if p.requires_grad)
        self.task_names = None if task_names is None else list(check_task_names(task_names))
        self.base = Sum() if base is None else base
        self.deterministic = bool(getattr(self.base, "deterministic", True))
        self._base_params = set(inspect.signature(self.base.forward).parameters)
        self.register_buffer("counts", torch.zeros(len(self.layers), dtype=torch.long))
        self.register_buffer("iterations", torch.zeros((), dtype=torch.long))
        self.register_buffer("pairs", torch.zeros((), dtype=torch.long))

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.base, "needs_losses", False))

    @property
    def layer_names(self) -> List[str]:
        return [m.name for m in self.layers]

    @torch.no_grad()
    def record(self, grads: torch.Tensor) -> torch.Tensor:
        """Count this iteration's conflicts; returns the ``[layers]`` counts of this step."""
        check_grads(grads)
        if grads.shape[1] != self.numel:
            raise ValueError(f"ConflictRecorder: grads has {grads.shape[1]} columns; expected "
                             f"{self.numel} (the shared_params it was built with)")
        t = grads.shape[0]
        grams = torch.zeros(len(self.layers), t, t, dtype=torch.float64, device=grads.device)
        for k, layer in enumerate(self.layers):
            for a, b in layer.ranges:
                block = grads[:, a:b].double()
                grams[k] += block @ block.T
        norms = grams.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()  # [K, T]
        scale = norms.amax(dim=1, keepdim=True).clamp(min=1e-300)
        valid = norms > 1e-12 * scale
        cos = grams / (norms.unsqueeze(2) * norms.unsqueeze(1)).clamp(min=1e-300)
        upper = torch.triu(torch.ones(t, t, dtype=torch.bool, device=grads.device), 1)
        hits = (cos < self.S) & upper & valid.unsqueeze(2) & valid.unsqueeze(1)
        step = hits.sum(dim=(1, 2)).cpu()
        self.counts += step
        self.iterations += 1
        self.pairs += t * (t - 1) // 2
        return step

    def forward(self, grads: torch.Tensor, gramian: Optional[torch.Tensor] = None,
                losses: Optional[torch.Tensor] = None,
                group_sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
        self.record(grads)
        kwargs: Dict[str, Any] = {}
        for key, value in (("gramian", gramian), ("losses", losses), ("group_sizes", group_sizes)):
            if value is not None and key in self._base_params:
                kwargs[key] = value
        return self.base(grads, **kwargs)

    def ranking(self) -> List[Tuple[str, int]]:
        """``[(layer, score)]`` by descending S-conflict score (ties: model order)."""
        order = sorted(range(len(self.layers)), key=lambda k: -int(self.counts[k]))
        return [(self.layers[k].name, int(self.counts[k])) for k in order]

    def top(self, k: int) -> List[str]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise MTLConfigError(f"K={k!r}: expected a number of layers >= 0")
        return [n for n, _ in self.ranking()[:k]]

    def reset(self) -> None:
        self.counts.zero_()
        self.iterations.zero_()
        self.pairs.zero_()

    def to_dict(self) -> Dict[str, Any]:
        sizes = {m.name: m.numel for m in self.layers}
        return {"method": "recon", "S": self.S, "iterations": int(self.iterations),
                "pairs_counted": int(self.pairs), "tasks": self.task_names,
                "shared_params": self.numel,  # |θ_sh|: the parameters of the engine's G
                "ranking": [{"module": n, "score": s, "params": sizes[n]}
                            for n, s in self.ranking()]}

    def to_json(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"layers": self.layer_names, "S": self.S}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        if list(state["layers"]) != self.layer_names:
            raise MTLConfigError("ConflictRecorder state: the layers differ from this model's")

    def extra_repr(self) -> str:
        return f"S={self.S}, layers={len(self.layers)}"


def load_ranking(path: str, k: Optional[int] = None) -> List[str]:
    """The layer names of a ranking JSON (``ConflictRecorder.to_json``), best first; top-k."""
    with open(path) as fh:
        data = json.load(fh)
    names = [r["module"] for r in data["ranking"]]
    return names if k is None else names[:k]


# --------------------------------------------------------------------------- stage 2
def _route_unrouted_keys(router: "TaskRouter", state_dict: Dict[str, Any], prefix: str,
                         *args: Any) -> None:
    """Load-state-dict pre-hook of :class:`TaskRouter`: a state dict of the un-converted model
    (pretrained weights, ``prefix + k``) fills every copy (:func:`route_state_dict`)."""
    route_state_dict(state_dict, prefix, list(router.copies))


class TaskRouter(nn.Module):
    """Replaces a shared module by one copy per task (``copies[t]``); ``forward`` runs the
    active task's copy (the :class:`TaskContext` must have a task).

    Loading a state dict that holds the un-converted module's entries (``<name>.weight``, e.g.
    pretrained weights) gives them to every copy that has no ``<name>.copies.<t>.weight`` of
    its own (:func:`route_state_dict`): ``load_state_dict``, mmseg's ``load_from`` /
    ``init_cfg=Pretrained`` and detectron2 ``.pth`` weights load into the copies unchanged."""

    def __init__(self, module: nn.Module, task_names: Sequence[str], context: TaskContext,
                 init: str = "copy", name: str = "") -> None:
        super().__init__()
        if init not in INITS:
            raise MTLConfigError(f"init={init!r}: expected one of {list(INITS)}")
        self.copies = nn.ModuleDict({t: copy.deepcopy(module) for t in task_names})
        self.init = init
        if init == "reset":
            for c in self.copies.values():
                for m in c.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
        self.context = context
        self.name = name
        self.register_load_state_dict_pre_hook(_route_unrouted_keys)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        task = self.context.require(f"TaskRouter({self.name!r})")
        return self.copies[task](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def route_state_dict(state_dict: Dict[str, Any], prefix: str, task_names: Sequence[str]) -> None:
    """In place: every un-routed entry ``prefix + k`` (a checkpoint of the model before
    :func:`make_task_specific`, e.g. pretrained weights) becomes ``prefix + "copies.<t>." + k``
    for every task whose copy has no entry of its own; the un-routed entry is consumed.

    Every copy then starts from the pretrained tensor, as ``init="copy"`` does from the
    current weights (paper 004, Sec. 4: the copies of θ_sh^cf start equal).
    """
    routed = prefix + "copies."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(routed)]:
        value = state_dict.pop(key)
        rest = key[len(prefix):]
        for t in task_names:
            state_dict.setdefault(f"{routed}{t}.{rest}", value)


@contextlib.contextmanager
def copies_initialised_as_one(model: nn.Module) -> Iterator[None]:
    """For a framework's weight initialisation (mmengine's ``init_weights``): inside, every
    ``init="copy"`` router is replaced by its first copy, so the initialisation sees (and
    draws random numbers for) the un-converted model; on exit that copy's parameters and
    buffers go into every other copy and the routers are put back. Paper 004 (Sec. 4):
    "θ_1^cf, …, θ_T^cf will all be initialized with θ_sh^cf" — otherwise an initialiser
    that walks every module would give each copy its own random draw. ``init="reset"``
    routers stay in place (each copy its own initialisation, as that option means)."""
    placed: List[Tuple[str, TaskRouter]] = []
    for name, router in routers(model).items():
        if router.init != "copy":
            continue
        parent, attr = parent_and_attr(model, name)
        setattr(parent, attr, next(iter(router.copies.values())))
        placed.append((name, router))
    try:
        yield
    finally:
        for name, router in placed:
            parent, attr = parent_and_attr(model, name)
            setattr(parent, attr, router)
            first, *others = router.copies.values()
            state = first.state_dict()
            with torch.no_grad():
                for other in others:
                    other.load_state_dict(state)


def routers(model: nn.Module) -> Dict[str, TaskRouter]:
    """``{name: router}`` of every :class:`TaskRouter` in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TaskRouter)}


def route_pretrained(model: nn.Module, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`route_state_dict` for every router of ``model`` (in place; returned)."""
    for name, router in routers(model).items():
        route_state_dict(state_dict, f"{name}." if name else "", list(router.copies))
    return state_dict


def unrouted_state_dict(model: nn.Module) -> Dict[str, Any]:
    """``model.state_dict()`` under the names of the un-converted model: each router's first
    copy as ``<router>.<k>``, the other copies left out (the names a pretrained checkpoint
    uses, for name-matching heuristics such as detectron2's)."""
    state = model.state_dict()
    for name, router in routers(model).items():
        base = f"{name}." if name else ""
        first = next(iter(router.copies))
        for key in [k for k in state if k.startswith(f"{base}copies.")]:
            task, _, rest = key[len(f"{base}copies."):].partition(".")
            value = state.pop(key)
            if task == first:
                state[base + rest] = value
    return state


def router_task_parameters(model: nn.Module, task_names: Optional[Sequence[str]] = None
                           ) -> Dict[str, List[nn.Parameter]]:
    """``{task: parameters of its copies}`` over every router of ``model`` (looked up now: a
    norm inside a copy may have been converted, e.g. to SyncBN). ``task_names`` restricts
    and orders the tasks (default: the routers' tasks)."""
    found = routers(model)
    tasks = list(task_names) if task_names is not None else list(dict.fromkeys(
        t for r in found.values() for t in r.copies))
    return {t: [p for r in found.values() if t in r.copies for p in r.copies[t].parameters()]
            for t in tasks}


def _unique_numel(params: Any) -> int:
    seen: Dict[int, int] = {}
    for p in params:
        seen[id(p)] = p.numel()
    return sum(seen.values())


def recon_param_increase(model: nn.Module, module_names: Sequence[str], n_tasks: int) -> int:
    """Parameters added by converting ``module_names``: ``(T − 1) ×`` their parameters."""
    return recon_param_report(model, module_names, n_tasks).increase


@dataclass(frozen=True)
class ReconParamReport:
    """The two sizes paper 004 reports for Recon (004_964368d7e7a36fae.txt, ~l. 193): "As
    shown in Table 1-5, Recon increases the model size by 0.52% to 57.25%. Recon turns
    1.42%, 1.46%, 12.77%, 0.26%, 9.80% shared parameters to task-specific on
    Multi-Fashion+MNIST, CelebA, CityScapes, NYUv2 and PASCAL-Context respectively."

    ``converted``: |θ_sh^cf|, the parameters of the converted modules (one copy);
    ``increase``: ``(T − 1)·converted``, added to the model; ``total``: the model's
    parameters before; ``shared``: |θ_sh|, the shared parameters before (``None`` if not
    given)."""

    converted: int
    increase: int
    total: int
    shared: Optional[int] = None

    @property
    def model_increase_pct(self) -> float:
        """Increase of the whole model's size, in % (the #P columns of Tables 1-5)."""
        return 100.0 * self.increase / max(self.total, 1)

    @property
    def shared_converted_pct(self) -> Optional[float]:
        """% of the shared parameters turned task-specific: ``100·|θ_sh^cf| / |θ_sh|``."""
        return None if self.shared is None else 100.0 * self.converted / max(self.shared, 1)

    def describe(self) -> str:
        text = (f"+{self.increase} parameters (+{self.model_increase_pct:.2f}% of the "
                f"{self.total} model parameters)")
        if self.shared is not None:
            text += (f"; {self.shared_converted_pct:.2f}% of the {self.shared} shared "
                     f"parameters turned task-specific ({self.converted})")
        return text


def recon_param_report(model: nn.Module, module_names: Sequence[str], n_tasks: int,
                       shared_params: Optional[Sequence[torch.Tensor]] = None
                       ) -> ReconParamReport:
    """:class:`ReconParamReport` of converting ``module_names`` of ``model`` (not yet
    converted) for ``n_tasks`` tasks; ``shared_params``: θ_sh (e.g. the engine's shared
    list), each tensor counted once. A converted parameter outside ``shared_params`` (a
    frozen one the engine does not see) still counts in ``converted``."""
    mods = select_modules(model, module_names, "module_names")
    converted = _unique_numel(p for m in mods.values() for p in m.parameters())
    shared = None if shared_params is None else _unique_numel(shared_params)
    return ReconParamReport(converted, (n_tasks - 1) * converted,
                            _unique_numel(model.parameters()), shared)


@dataclass
class ReconTransform:
    """What :func:`make_task_specific` did."""

    model: nn.Module
    context: TaskContext
    converted: List[str]
    routers: Dict[str, TaskRouter]
    task_params: Dict[str, List[nn.Parameter]]
    params_before: int
    params_after: int
    extra: Dict[str, Any] = field(default_factory=dict)
    #: sizes of the conversion (paper 004 reports the model increase and the % of θ_sh)
    report: Optional[ReconParamReport] = None

    @property
    def param_increase(self) -> int:
        return self.params_after - self.params_before

    @property
    def relative_increase(self) -> float:
        return self.param_increase / max(self.params_before, 1)

    def shared_parameters(self, module: Optional[nn.Module] = None) -> List[nn.Parameter]:
        """The parameters of ``module`` (default: the model) that are not task copies."""
        own = {id(p) for ps in self.task_params.values() for p in ps}
        return [p for p in (module or self.model).parameters() if id(p) not in own]

    def forward_per_task(self, fn: Callable[[str], R],
                         tasks: Optional[Sequence[str]] = None) -> Dict[str, R]:
        """``{t: fn(t)}`` with the routers on task t (``fn = lambda t: heads[t](trunk(x))``)."""
        return run_per_task(self.context, fn, tasks)


def make_task_specific(model: nn.Module, module_names: Sequence[str] | str,
                       task_names: Sequence[str], context: Optional[TaskContext] = None,
                       init: str = "copy",
                       shared_params: Optional[Sequence[torch.Tensor]] = None
                       ) -> ReconTransform:
    """Replace each module of ``module_names`` (names or glob patterns, e.g. the top-K of a
    ranking) by a :class:`TaskRouter` with one deep copy per task, in place.

    ``init="copy"``: every copy starts from the module's current weights (the paper's theory;
    required with pretrained weights). ``"reset"``: each copy calls ``reset_parameters()``
    (the released code, training from scratch). Returns a :class:`ReconTransform` with the
    per-task parameter lists (give them to the engine as task-specific parameters) and the
    parameter increase, ``(T − 1) ×`` the converted modules' parameters, and ``report``
    (:class:`ReconParamReport`; its share of θ_sh when ``shared_params``, the shared
    parameters before the conversion, are given).
    """
    names = check_task_names(task_names)
    ctx = context if context is not None else TaskContext(names)
    if tuple(ctx.task_names) != names:
        raise MTLConfigError(f"context: tasks {list(ctx.task_names)}; expected {list(names)}")
    mods = select_modules(model, module_names, "module_names")
    bad = nested(list(mods))
    if bad:
        raise MTLConfigError(f"module_names: {bad[0][1]!r} is inside {bad[0][0]!r}; convert "
                             "one or the other, not both")
    for n, m in mods.items():
        if isinstance(m, TaskRouter) or any(isinstance(x, TaskRouter) for x in m.modules()):
            raise MTLConfigError(f"module_names: {n!r} is already task-specific")
    before = _unique_numel(model.parameters())
    report = recon_param_report(model, list(mods), len(names), shared_params)
    routers: Dict[str, TaskRouter] = {}
    for n, m in mods.items():
        router = TaskRouter(m, names, ctx, init=init, name=n)
        parent, attr = parent_and_attr(model, n)
        setattr(parent, attr, router)
        routers[n] = router
    task_params = {t: [p for r in routers.values() for p in r.copies[t].parameters()]
                   for t in names}
    return ReconTransform(model, ctx, list(mods), routers, task_params, before,
                          _unique_numel(model.parameters()), report=report)
