"""GradSplit: task-group-wise gradient masking of split conv filters (paper 000).

The output channels (filters) of each chosen conv are split into T contiguous groups; group t
belongs to task t. The forward pass is unchanged. In the backward pass, group t's parameters
(filter rows, bias entries, optionally the following norm's affine entries) receive only the
gradients of the tasks t' with ``relation[t, t'] = 1``:

    θ_t ← θ_t − α Σ_t' m[t, t'] ∇_{θ_t} L_t'          (paper 000, eq. 4)

``relation`` is ``[receiver group t, source loss t']``; the diagonal is always 1. Input
gradients (what flows to earlier layers) are not masked.

Two mechanisms, same rule:

- :class:`GradSplit` is an aggregator for the backward engine
  (:class:`~mtl_plugins.core.backward.TaskBackward`): it receives the engine's ``G [T, P]``
  (one row per task, already computed in place), applies the mask on the split columns
  (described by a :class:`SplitLayout` from :func:`split_layout`) and hands the remaining
  columns to a wrapped base aggregator (default: plain sum). Nothing is recomputed.
- :class:`GradSplitHook` is for single-task batches (round-robin multi-dataset training,
  paper 000 §3.3): each backward carries one task's loss, so the mask is applied to ``.grad``
  directly (after the backward, :meth:`GradSplitHook.mask_grads_`) or by parameter hooks
  during it (``with hook.source_task(t): loss.backward()``).

:func:`relations_from_results` estimates ``relation`` from single-task and pair-task results
(paper 000 §3.2, τ = −0.01); :func:`load_relation` reads it from a file (the JSON written by
``tools/gradsplit_relations.py --out``, or the results JSON that tool reads).

``GradSplit(None, layout, drop_rate=p)`` is the **DropGrad** baseline of paper 000 (Table 4,
Table 7): the fixed relation mask is replaced by a stochastic binary mask ``w`` drawn anew at
every step, independently for every (filter, source task) pair, ``w = 0`` with probability p
(§3.1, "When w_t' is a stochastic binary mask, it is equivalent to dropping-out gradients [40]
[...] with the drop rate p"; §4.4, "it drops gradients randomly from every filter so that the
dominant task gradients of a filter can vary during training").

``record_task_rows=True`` keeps each task's masked gradient row, so that each task can be
stepped by its own optimizer (:mod:`.separate_optim`, paper 000 §4.1, "We used separate
optimizers for tasks").
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..aggregation._utils import SeededRNG, check_seed
from ..aggregation.base import Aggregator, check_grads
from ..aggregation.mean import Sum
from ..tasks import MTLConfigError, check_task_names
from ._modules import select_modules

REMAINDERS = ("shared", "last")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def _splittable(m: nn.Module) -> bool:
    return (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed) or \
        isinstance(m, nn.Linear)


def _out_channels(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features


# --------------------------------------------------------------------------- relations
def check_relation(relation: Any, n_tasks: int, key: str = "relation") -> torch.Tensor:
    """A ``[T, T]`` 0/1 float tensor with a diagonal of ones, or :class:`MTLConfigError`."""
    try:
        rel = torch.as_tensor(relation, dtype=torch.float32).clone()
    except (TypeError, ValueError, RuntimeError):
        raise MTLConfigError(f"{key}={relation!r}: expected a [T, T] 0/1 matrix") from None
    if rel.shape != (n_tasks, n_tasks):
        raise MTLConfigError(f"{key}: shape {tuple(rel.shape)}; expected ({n_tasks}, {n_tasks}) "
                             "(rows: receiving filter group t, columns: source loss t')")
    if not bool(((rel == 0) | (rel == 1)).all()):
        raise MTLConfigError(f"{key}={rel.tolist()}: expected entries 0 or 1")
    if not bool((rel.diagonal() == 1).all()):
        raise MTLConfigError(f"{key}={rel.tolist()}: the diagonal must be 1 (a task always "
                             "updates its own filter group)")
    return rel


def _pair_key(key: Any) -> Tuple[str, str]:
    if isinstance(key, (tuple, list)) and len(key) == 2:
        return str(key[0]), str(key[1])
    if isinstance(key, str):
        for sep in (",", "+", "|", "&"):
            if sep in key:
                a, b = (s.strip() for s in key.split(sep, 1))
                return a, b
    raise MTLConfigError(f"pairwise key {key!r}: expected a pair (t, t') or a string 't,t''")


def relative_changes(single: Mapping[str, float], pairwise: Mapping[Any, Mapping[str, float]],
                     task_names: Optional[Sequence[str]] = None,
                     lower_is_better: Sequence[str] = ()) -> Tuple[Tuple[str, ...], torch.Tensor]:
    """``(task_names, A)`` with ``A[t, t'] = (acc_t^{t,t'} − acc_t^{t}) / acc_t^{t}``
    (the effect of training with t' on task t; sign flipped for lower-is-better tasks, so
    ``A < 0`` always means "hurts"); the diagonal is 0.

    ``single``: ``{t: metric of the single-task model}``; ``pairwise``: ``{(t, t') or "t,t'":
    {t: metric, t': metric}}`` (one pair model gives both directions).
    """
    names = check_task_names(list(single) if task_names is None else task_names)
    for t in names:
        if t not in single:
            raise MTLConfigError(f"single: no result for task {t!r}; expected one per task "
                                 f"of {list(names)}")
        v = single[t]
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v == 0:
            raise MTLConfigError(f"single[{t!r}]={v!r}: expected a finite non-zero number")
    unknown = [t for t in lower_is_better if t not in names]
    if unknown:
        raise MTLConfigError(f"lower_is_better: unknown task(s) {unknown}; expected a subset "
                             f"of {list(names)}")
    pairs: Dict[frozenset, Mapping[str, float]] = {}
    for key, res in pairwise.items():
        a, b = _pair_key(key)
        for t in (a, b):
            if t not in names:
                raise MTLConfigError(f"pairwise[{key!r}]: unknown task {t!r}; expected tasks "
                                     f"of {list(names)}")
        pairs[frozenset((a, b))] = res
    n = len(names)
    change = torch.zeros(n, n, dtype=torch.float64)
    for i, t in enumerate(names):
        for j, s in enumerate(names):
            if i == j:
                continue
            res = pairs.get(frozenset((t, s)))
            if res is None or t not in res:
                raise MTLConfigError(f"pairwise: no result for task {t!r} of the pair model "
                                     f"({t!r}, {s!r}); expected {{'{t},{s}': {{'{t}': ..., "
                                     f"'{s}': ...}}}}")
            sign = -1.0 if t in lower_is_better else 1.0
            change[i, j] = sign * (float(res[t]) - float(single[t])) / abs(float(single[t]))
    return names, change


def relations_from_results(single: Mapping[str, float],
                           pairwise: Mapping[Any, Mapping[str, float]],
                           tau: float = -0.01, task_names: Optional[Sequence[str]] = None,
                           lower_is_better: Sequence[str] = ()) -> torch.Tensor:
    """The GradSplit relation ``m [T, T]`` (paper 000 §3.2).

    ``m[t, t'] = 0`` when ``t ≠ t'`` and training with t' hurts t by more than the tolerance:
    ``A(t'→t) < τ`` (``τ = −0.01``: a 1% relative drop is tolerated); otherwise 1.
    Rows: receiving filter group t; columns: source loss t'. ``tau=math.inf`` gives the
    identity (GradSplit_τ=inf). Task order: ``task_names`` or the order of ``single``.
    """
    if not isinstance(tau, (int, float)) or math.isnan(tau):
        raise MTLConfigError(f"tau={tau!r}: expected a number (paper: -0.01)")
    _, change = relative_changes(single, pairwise, task_names, lower_is_better)
    rel = (change >= tau).to(torch.float32)
    rel.fill_diagonal_(1.0)
    return rel


def load_relation(value: Any, task_names: Sequence[str], key: str = "relation"
                  ) -> Optional[torch.Tensor]:
    """The ``[T, T]`` relation of a config value: ``None`` (identity), a matrix, or a path.

    A path names a JSON file, either the one ``tools/gradsplit_relations.py --out`` writes
    (``{"tasks": [...], "tau": τ, "relation": [[...]]}``; rows and columns are reordered to
    ``task_names``) or the results file that tool reads (``{"single": ..., "pairwise": ...,
    "lower_is_better": [...], "tau": τ}``; the relation is estimated with
    :func:`relations_from_results`, τ from the file or −0.01, paper 000 §4.1). Errors name
    ``key``, the value and what was expected.
    """
    names = tuple(task_names)
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        return check_relation(value, len(names), key)
    path = os.fspath(value)
    if not os.path.isfile(path):
        raise MTLConfigError(f"{key}={path!r}: no such file; expected a [T, T] 0/1 matrix or "
                             "the JSON written by tools/gradsplit_relations.py --out")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        raise MTLConfigError(f"{key}={path!r}: cannot read it as JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise MTLConfigError(f"{key}={path!r}: expected a JSON object with 'tasks' and "
                             "'relation' (or 'single' and 'pairwise')")
    if "relation" in data:
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or sorted(map(str, tasks)) != sorted(names) or \
                len(tasks) != len(names):
            raise MTLConfigError(f"{key}={path!r}: the file's tasks {tasks!r} are not the "
                                 f"model's tasks {list(names)}; expected the same task set")
        rel = check_relation(data["relation"], len(names), f"{key}={path!r}: relation")
        order = [tasks.index(t) for t in names]
        return check_relation(rel[order][:, order], len(names), key)
    if "single" in data and "pairwise" in data:
        if sorted(data["single"]) != sorted(names):
            raise MTLConfigError(f"{key}={path!r}: 'single' has results for "
                                 f"{sorted(data['single'])}; expected the model's tasks "
                                 f"{list(names)}")
        try:
            return relations_from_results(data["single"], data["pairwise"],
                                          tau=data.get("tau", -0.01), task_names=names,
                                          lower_is_better=data.get("lower_is_better", ()))
        except MTLConfigError as e:
            raise MTLConfigError(f"{key}={path!r}: {e}") from None
    raise MTLConfigError(f"{key}={path!r}: keys {sorted(data)}; expected 'tasks' and "
                         "'relation' (tools/gradsplit_relations.py --out) or 'single' and "
                         "'pairwise' (its input)")


# --------------------------------------------------------------------------- layout
@dataclass
class SplitEntry:
    """One split parameter: columns ``[offset, offset + numel)`` of G, ``channels`` rows."""

    name: str
    param: nn.Parameter
    offset: int
    channels: int
    group: torch.Tensor  # [channels] long: task index, -1 = shared remainder
    module: str = ""     # the split conv/linear: its weight, bias and norm share its filters

    @property
    def numel(self) -> int:
        return self.param.numel()


@dataclass
class SplitLayout:
    """Where the split parameters sit in the engine's ``G`` and their channel groups."""

    task_names: Tuple[str, ...]
    entries: List[SplitEntry]
    param_sizes: List[int]  # one per shared parameter (requires_grad), engine order
    modules: List[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(self.param_sizes)

    def split_numel(self) -> int:
        return sum(e.numel for e in self.entries)


def channel_groups(channels: int, n_tasks: int, remainder: str = "shared",
                   permute_seed: Optional[int] = None) -> torch.Tensor:
    """``[channels]`` group index: contiguous blocks of ``channels // T`` per task in task
    order; the ``channels % T`` leftover channels are shared (-1) or go to the last group."""
    n = channels // n_tasks
    if n < 1:
        raise MTLConfigError(f"GradSplit: a layer has {channels} output channels for "
                             f"{n_tasks} tasks; expected at least one channel per task")
    group = torch.full((channels,), -1, dtype=torch.long)
    group[:n * n_tasks] = torch.arange(n_tasks).repeat_interleave(n)
    if remainder == "last":
        group[n * n_tasks:] = n_tasks - 1
    if permute_seed is not None:
        perm = torch.randperm(channels, generator=torch.Generator().manual_seed(permute_seed))
        group = group[perm]
    return group


def _following_norm(model: nn.Module, name: str, conv: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    own = getattr(conv, "norm", None)
    if isinstance(own, _NORMS):
        return f"{name}.norm", own
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    idx = [i for i, (n, _) in enumerate(leaves) if n == name]
    if not idx or idx[0] + 1 >= len(leaves):
        return None
    n, m = leaves[idx[0] + 1]
    if isinstance(m, _NORMS):
        return n, m
    return None


def split_layout(model: nn.Module, module_names: Sequence[str] | str,
                 task_names: Sequence[str], shared_params: Sequence[torch.Tensor],
                 split_norm_affine: bool = False,
                 norm_names: Optional[Mapping[str, str]] = None,
                 remainder: str = "shared",
                 permute_seed: Optional[int] = None) -> SplitLayout:
    """The :class:`SplitLayout` of the convs ``module_names`` (names or glob patterns such as
    ``"backbone.layer4.*"``; patterns keep the non-transposed convs and linears they match)
    inside the engine's ``shared_params`` (the same list, in the same order, that is given to
    the engine; parameters with ``requires_grad=False`` are skipped, as the engine does).

    ``split_norm_affine``: also split the per-channel affine parameters of the norm that
    follows each conv (``conv.norm`` for detectron2 convs, else the next leaf module when it is
    a BatchNorm/GroupNorm with the same channels; or ``norm_names={conv: norm}``).
    ``remainder``: ``"shared"`` (leftover ``C mod T`` channels get every task's gradient) or
    ``"last"`` (they join the last group). ``permute_seed``: a seeded random channel-to-group
    assignment instead of contiguous blocks.
    """
    names = check_task_names(task_names)
    if remainder not in REMAINDERS:
        raise MTLConfigError(f"remainder={remainder!r}: expected one of {list(REMAINDERS)}")
    convs = select_modules(model, module_names, "module_names", _splittable,
                           "a conv (nn.Conv1d/2d/3d, not transposed) or nn.Linear")
    shared = [p for p in shared_params if p.requires_grad]
    offsets: Dict[int, int] = {}
    start = 0
    for p in shared:
        offsets[id(p)] = start
        start += p.numel()
    pnames = {id(p): n for n, p in model.named_parameters()}
    entries: List[SplitEntry] = []
    norm_names = dict(norm_names or {})
    for cname, conv in convs.items():
        c = _out_channels(conv)
        group = channel_groups(c, len(names), remainder, permute_seed)
        params = [p for p in (conv.weight, conv.bias) if p is not None and p.requires_grad]
        if split_norm_affine:
            if cname in norm_names:
                nname = norm_names[cname]
                try:
                    norm = model.get_submodule(nname)
                except AttributeError:
                    raise MTLConfigError(f"norm_names[{cname!r}]={nname!r}: unknown module "
                                         "name") from None
                found: Optional[Tuple[str, nn.Module]] = (nname, norm)
            else:
                found = _following_norm(model, cname, conv)
            if found is None:
                raise MTLConfigError(
                    f"split_norm_affine=True: no norm layer follows conv {cname!r}; pass "
                    f"norm_names={{{cname!r}: 'name.of.its.norm'}}")
            nname, norm = found
            for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)):
                if p is None or not p.requires_grad:
                    continue  # frozen or non-affine norm: nothing to split
                if p.numel() != c:
                    raise MTLConfigError(f"norm {nname!r} has {p.numel()} affine entries; "
                                         f"expected {c} (the channels of {cname!r})")
                params.append(p)
        for p in params:
            if id(p) not in offsets:
                raise MTLConfigError(
                    f"module_names: parameter {pnames.get(id(p), tuple(p.shape))!r} of "
                    f"{cname!r} is not in shared_params; GradSplit splits shared parameters "
                    "only (pass the same list the engine receives)")
            if any(e.param is p for e in entries):
                continue
            entries.append(SplitEntry(pnames.get(id(p), cname), p, offsets[id(p)], c,
                                      group.clone(), cname))
    entries.sort(key=lambda e: e.offset)
    return SplitLayout(names, entries, [p.numel() for p in shared], list(convs))


def _extended(relation: torch.Tensor) -> torch.Tensor:
    """``[T + 1, T]``: the relation plus a row of ones for the shared channels (index -1)."""
    return torch.cat([relation, torch.ones(1, relation.shape[1], dtype=relation.dtype)])


# --------------------------------------------------------------------------- aggregator
class GradSplit(Aggregator):
    """GradSplit as an aggregator over the engine's task-gradient matrix ``G [T, P]``.

    Args:
        relation: ``[T, T]`` 0/1, ``relation[t, t']`` = may source loss t' update filter
            group t (diagonal 1). ``None``: the identity (GradSplit_τ=inf).
        layout: a :class:`SplitLayout` from :func:`split_layout` (same ``shared_params`` as
            the engine).
        base: the aggregator for the non-split columns (default :class:`Sum`, the plain
            summed loss of the paper's multi-head baseline). Any aggregator works; it sees
            only the non-split columns.
        split_reduction: ``"sum"`` (paper eq. 4) or ``"mean"`` (divide the split columns by
            T, to match a ``Mean`` base).
        drop_rate: ``None`` (GradSplit) or p in [0, 1): **DropGrad** (paper 000 §3.1 and
            Table 4): every step, each split filter drops each source task's gradient with
            probability p, ``Σ_t' w[c, t'] ∇_{θ_c} L_t'`` with ``w ~ Bernoulli(1 − p)`` drawn
            per (filter, task) (no rescaling: ``w`` is the binary mask of §3.1). Needs
            ``relation=None``; the filter groups play no part.
        seed: seed of DropGrad's CPU generator (its state is in ``state_dict``); the same on
            every rank, so every rank draws the same masks.
        record_task_rows: keep :attr:`task_rows` ``[T, P]``, each task's contribution to the
            direction (masked on the split columns), whose sum is the direction; for
            separate per-task optimizers (:mod:`.separate_optim`). Needs a plain ``Sum``
            base (other aggregators do not split into per-task parts).

    The rows of G must be every task of the model in the layout's order: ``needs_all_tasks``
    is set, so the engine gives a zero row for a task absent from the step.
    """

    needs_all_tasks = True

    def __init__(self, relation: Any, layout: SplitLayout, base: Optional[Aggregator] = None,
                 split_reduction: str = "sum", drop_rate: Optional[float] = None,
                 seed: int = 0, record_task_rows: bool = False) -> None:
        super().__init__()
        if not isinstance(layout, SplitLayout):
            raise MTLConfigError(f"layout={layout!r}: expected a SplitLayout from split_layout()")
        t = len(layout.task_names)
        if drop_rate is not None:
            if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or \
                    not 0.0 <= float(drop_rate) < 1.0:
                raise MTLConfigError(f"drop_rate={drop_rate!r}: expected a number in [0, 1) "
                                     "(DropGrad's drop rate p; paper 000 Table 4: 0.5, 0.75)")
            if relation is not None:
                raise MTLConfigError(f"relation={relation!r} with drop_rate={drop_rate!r}: "
                                     "DropGrad uses random masks, not the relation; expected "
                                     "relation=None")
        if relation is None:
            relation = torch.eye(t)
        self.register_buffer("relation", check_relation(relation, t))
        self.layout = layout
        self.base = Sum() if base is None else base
        if not isinstance(self.base, Aggregator):
            raise MTLConfigError(f"base={base!r}: expected an Aggregator")
        if split_reduction not in ("sum", "mean"):
            raise MTLConfigError(f"split_reduction={split_reduction!r}: expected 'sum' or 'mean'")
        self.split_reduction = split_reduction
        self.drop_rate = None if drop_rate is None else float(drop_rate)
        self.seed = check_seed("gradsplit", seed)
        self._rng = SeededRNG(self.seed)
        self.record_task_rows = bool(record_task_rows)
        if self.record_task_rows and not self._plain_base():
            raise MTLConfigError(
                f"record_task_rows=True (separate optimizers) with base "
                f"{type(self.base).__name__}: a per-task part of the direction exists only for "
                "the plain sum; expected no other aggregator")
        #: ``[T, P]`` per-task parts of the last direction (``record_task_rows``), else None
        self.task_rows: Optional[torch.Tensor] = None
        self.deterministic = bool(getattr(self.base, "deterministic", True)) and \
            self.drop_rate is None
        self._rest: Dict[torch.device, torch.Tensor] = {}

    def _plain_base(self) -> bool:
        return isinstance(self.base, Sum) and type(self.base).forward is Sum.forward

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.base, "needs_losses", False))

    def _rest_index(self, device: torch.device) -> torch.Tensor:
        if device not in self._rest:
            keep = torch.ones(self.layout.numel, dtype=torch.bool)
            for e in self.layout.entries:
                keep[e.offset:e.offset + e.numel] = False
            self._rest[device] = keep.nonzero().squeeze(1).to(device)
        return self._rest[device]

    def _rest_sizes(self) -> List[int]:
        split = {e.offset for e in self.layout.entries}
        sizes, start = [], 0
        for n in self.layout.param_sizes:
            if start not in split:
                sizes.append(n)
            start += n
        return sizes

    def draw_masks(self) -> Dict[str, torch.Tensor]:
        """DropGrad: one ``[C, T]`` 0/1 keep mask per split module (shared by its weight,
        bias and norm entries), ``P(keep) = 1 − p``, from the seeded CPU generator."""
        assert self.drop_rate is not None
        gen = self._rng.get()
        masks: Dict[str, torch.Tensor] = {}
        for e in self.layout.entries:
            key = e.module or e.name
            if key not in masks:
                u = torch.rand(e.channels, len(self.layout.task_names), generator=gen)
                masks[key] = (u >= self.drop_rate).to(torch.float32)
        return masks

    def entry_mask(self, entry: SplitEntry, masks: Optional[Mapping[str, torch.Tensor]] = None
                   ) -> torch.Tensor:
        """``[C, T]``: which source loss t' updates each output channel of ``entry``: the
        relation row of the channel's group, or (DropGrad) this step's random mask."""
        if masks is not None:
            return masks[entry.module or entry.name]
        return _extended(self.relation.cpu())[entry.group]

    def masked_block(self, grads: torch.Tensor, entry: SplitEntry,
                     relation: Optional[torch.Tensor] = None,
                     mask: Optional[torch.Tensor] = None,
                     rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[numel]``: ``Σ_t' m[c, t'] G[t', c, :]`` for one split parameter, with
        ``m = mask`` or the relation row of the channel's group. ``rows`` (``[T, numel]``)
        receives each task's masked part when given."""
        if mask is None:
            rel = self.relation if relation is None else relation
            mask = _extended(rel.cpu())[entry.group]
        m = mask.to(grads)  # [C, T]
        block = grads[:, entry.offset:entry.offset + entry.numel].view(
            grads.shape[0], entry.channels, -1)
        out = torch.zeros(block.shape[1:], dtype=grads.dtype, device=grads.device)
        scale = 1.0 / grads.shape[0] if self.split_reduction == "mean" else 1.0
        for s in range(grads.shape[0]):
            if rows is not None:
                part = rows[s].view(entry.channels, -1)
                torch.mul(block[s], m[:, s:s + 1] * scale, out=part)
                out += part
            else:
                out.addcmul_(m[:, s:s + 1], block[s])
        if rows is None and scale != 1.0:
            out *= scale
        return out.reshape(-1)

    def forward(self, grads: torch.Tensor, losses: Optional[torch.Tensor] = None,
                group_sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
        check_grads(grads)
        t = len(self.layout.task_names)
        if grads.shape[0] != t:
            raise ValueError(f"GradSplit: grads has {grads.shape[0]} rows; expected one per "
                             f"task of the layout ({t}: {list(self.layout.task_names)}), in "
                             "that order (the engine does this for needs_all_tasks)")
        if grads.shape[1] != self.layout.numel:
            raise ValueError(f"GradSplit: grads has {grads.shape[1]} columns; the layout was "
                             f"built for {self.layout.numel} (pass the engine the same "
                             "shared_params as split_layout)")
        if group_sizes is not None and list(group_sizes) != self.layout.param_sizes:
            raise ValueError("GradSplit: the engine's shared parameters differ from the "
                             "layout's (group_sizes mismatch); rebuild the layout")
        kwargs: Dict[str, Any] = {}
        if self.needs_losses and losses is not None:
            kwargs["losses"] = losses
        rows = grads.clone() if self.record_task_rows else None
        if self._plain_base():
            direction = grads.sum(dim=0)  # split columns are overwritten below
        else:
            rest = self._rest_index(grads.device)
            direction = torch.zeros(grads.shape[1], dtype=grads.dtype, device=grads.device)
            if rest.numel():
                if "group_sizes" in inspect.signature(self.base.forward).parameters and \
                        getattr(self.base, "group_sizes", None) is None:
                    kwargs["group_sizes"] = self._rest_sizes()
                direction[rest] = self.base(grads.index_select(1, rest), **kwargs)
        masks = self.draw_masks() if self.drop_rate is not None else None
        for e in self.layout.entries:
            direction[e.offset:e.offset + e.numel] = self.masked_block(
                grads, e, mask=self.entry_mask(e, masks),
                rows=None if rows is None else rows[:, e.offset:e.offset + e.numel])
        self.task_rows = rows
        return direction

    def get_extra_state(self) -> Dict[str, Any]:
        return {"rng": self._rng.state()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self._rng.load(state["rng"])

    def extra_repr(self) -> str:
        mode = "" if self.drop_rate is None else f", dropgrad p={self.drop_rate}, seed={self.seed}"
        return (f"tasks={list(self.layout.task_names)}, split_params={len(self.layout.entries)}"
                f", split_reduction={self.split_reduction!r}{mode}")


# --------------------------------------------------------------------------- hook
class GradSplitHook:
    """GradSplit for backward passes that carry one task's loss (round-robin batches).

    ``mask_grads_(task)`` zeroes, in the split parameters' ``.grad``, the channel groups t
    with ``relation[t, task] = 0`` (call it after ``loss.backward()``, before the step; valid
    when ``.grad`` holds only that task's gradient). ``with hook.source_task(task):`` instead
    masks each split parameter's gradient as autograd produces it (tensor hooks), so several
    single-task backward passes may accumulate into ``.grad``. Input gradients are untouched.
    """

    def __init__(self, relation: Any, layout: SplitLayout) -> None:
        self.layout = layout
        self.relation = check_relation(
            torch.eye(len(layout.task_names)) if relation is None else relation,
            len(layout.task_names))
        self._ext = _extended(self.relation)

    def _task_index(self, task: Union[str, int]) -> int:
        names = self.layout.task_names
        if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(names):
            return task
        if task in names:
            return names.index(task)  # type: ignore[arg-type]
        raise MTLConfigError(f"task={task!r}: unknown task; expected one of {list(names)}")

    def channel_mask(self, entry: SplitEntry, task: Union[str, int]) -> torch.Tensor:
        """``[C]`` 0/1: which output channels of ``entry`` task ``task``'s loss may update."""
        return self._ext[entry.group, self._task_index(task)]

    def _shaped(self, entry: SplitEntry, task: Union[str, int], like: torch.Tensor) -> torch.Tensor:
        m = self.channel_mask(entry, task).to(device=like.device, dtype=like.dtype)
        return m.view(-1, *([1] * (like.dim() - 1)))

    @torch.no_grad()
    def mask_grads_(self, task: Union[str, int]) -> None:
        for e in self.layout.entries:
            g = e.param.grad
            if g is not None:
                g.mul_(self._shaped(e, task, g))

    @contextlib.contextmanager
    def source_task(self, task: Union[str, int]) -> Iterator[None]:
        idx = self._task_index(task)
        handles = []
        try:
            for e in self.layout.entries:
                mask = self._shaped(e, idx, e.param)
                handles.append(e.param.register_hook(lambda g, m=mask: g * m.to(g)))
            yield
        finally:
            for h in handles:
                h.remove()
