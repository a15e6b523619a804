"""Maximum Roaming: per-task channel masks that roam over the filters (paper 002).

Every chosen shared layer gets, per task t, a binary mask ``m_t ∈ {0,1}^C`` over its output
channels with ``|A_t| = n`` active channels (sharing ratio p: ``n = round(p·C)``). Task t's
forward multiplies the layer output by ``m_t`` (after normalisation, before the activation;
paper 002 eq. 2), so task t neither uses nor trains the other channels. Every Δ updates,
each task in each layer swaps one channel it uses for one it has never used (paper 002
Def. 1, eq. 4)::

    i⁻ ~ U(A_t(c)),  i⁺ ~ U({1..C} \\ B_t(c)),  m[i⁻] = 0,  m[i⁺] = 1,  B_t ← B_t ∪ {i⁺}

until every channel was visited (``B_t`` = all): then that task's mask in that layer is
frozen. Every task needs its own forward pass, in training and at inference
(:meth:`MaximumRoaming.forward_per_task`).

The masks follow the modules by *name*: frameworks replace modules after the model is built
(mmengine's ``revert_sync_batchnorm`` on a single process, SyncBN conversion under DDP), which
would leave a hook on a module that no longer runs. A forward pre-hook on the model looks the
layers up again before every forward and moves a mask onto a replacement module, so the masks
act whatever the framework did to the modules (and :meth:`check_applied` verifies it).

State (masks, visited sets, swap counters, update counter, RNG) lives in buffers and
``extra_state``: a checkpoint of any module that owns the :class:`MaximumRoaming` carries it
and loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import math
import re
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, TypeVar

import torch
from torch import nn

from ..tasks import MTLConfigError, check_task_names
from ._modules import select_modules
from .context import TaskContext, run_per_task

INITS = ("exact", "bernoulli")
#: Δ in epochs when a config gives neither ``interval`` nor ``interval_epochs``: paper 002
#: (002_26f1328748d165ef.txt, ~l. 174, the study of p): "Figure 2 reports achieved F-scores as
#: p varies, with Δ = 0.1 and r(c) = 100%", Δ being in epochs (~l. 112: "Δ has to be
#: significantly large (we express it in terms of training epochs)"); ~l. 184: "the model's
#: performance increases for a wide range of Δ values (~ 0.05 -1 epochs)".
DEFAULT_INTERVAL_EPOCHS = 0.1
R = TypeVar("R")


def optimizer_steps_per_epoch(samples: int, batch_size: int, world_size: int = 1,
                              accumulation: int = 1, steps_per_batch: int = 1) -> float:
    """Optimizer steps in one epoch of ``samples`` training samples: ``samples / (batch_size ·
    world_size · accumulation) · steps_per_batch`` (``batch_size`` per process; ISTA makes
    ``steps_per_batch`` optimizer steps per data batch). Converts paper 002's Δ (in epochs,
    ``c = ⌊E/Δ⌋``) into optimizer steps."""
    for name, v in (("samples", samples), ("batch_size", batch_size),
                    ("world_size", world_size), ("accumulation", accumulation),
                    ("steps_per_batch", steps_per_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MTLConfigError(f"{name}={v!r}: expected an integer >= 1 (to convert the "
                                 "roaming interval from epochs to optimizer steps)")
    return samples / (batch_size * world_size * accumulation) * steps_per_batch


def _channels(m: nn.Module) -> Optional[int]:
    for attr in ("out_channels", "out_features", "num_features", "num_channels"):
        v = getattr(m, attr, None)
        if isinstance(v, int):
            return v
    return None


def is_norm(m: nn.Module) -> bool:
    """A normalisation layer: torch's BN / SyncBN / IN / GN / LN, or a class named ``...Norm``
    / ``...Norm2d`` (detectron2's ``FrozenBatchNorm2d`` and ``NaiveSyncBatchNorm``, ...)."""
    return isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or \
        re.search(r"Norm(\dd)?$", type(m).__name__) is not None


def active_count(channels: int, n_tasks: int, p: float) -> int:
    """Active channels per task: ``round(p·C)``, raised to ``ceil(C/T)`` so that every
    channel can be covered by some task (paper 002 eq. 3), at least 1."""
    return max(1, int(round(p * channels)), math.ceil(channels / n_tasks))


class RoamingMask(nn.Module):
    """The masks of one layer: buffers ``mask`` and ``visited`` (``[T, C]`` bool) and
    ``swaps`` (``[T]`` long, swaps done per task).

    ``forward(x, task_index)`` multiplies channel dim 1 of ``x`` by ``mask[task_index]``.
    """

    def __init__(self, channels: int, n_tasks: int, p: float, init: str = "exact",
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if channels < 1:
            raise MTLConfigError(f"channels={channels}: expected >= 1")
        self.channels, self.n_tasks, self.p = channels, n_tasks, p
        self.n_active = active_count(channels, n_tasks, p)
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        mask = torch.zeros(n_tasks, channels, dtype=torch.bool)
        if p >= 1.0:
            mask[:] = True
        elif init == "exact":
            # cover: a random permutation dealt round-robin (every channel used by one task),
            # then each task switches on random unused channels up to n_active
            perm = torch.randperm(channels, generator=g)
            for i, c in enumerate(perm.tolist()):
                mask[i % n_tasks, c] = True
            for t in range(n_tasks):
                free = (~mask[t]).nonzero().squeeze(1)
                need = self.n_active - int(mask[t].sum())
                if need > 0:
                    pick = free[torch.randperm(free.numel(), generator=g)[:need]]
                    mask[t, pick] = True
        else:  # bernoulli: the paper's init, then give uncovered channels to a random task
            mask = torch.rand(n_tasks, channels, generator=g) < p
            for c in (~mask.any(0)).nonzero().squeeze(1).tolist():
                mask[int(torch.randint(n_tasks, (1,), generator=g)), c] = True
        self.register_buffer("mask", mask)
        self.register_buffer("visited", mask.clone())
        self.register_buffer("swaps", torch.zeros(n_tasks, dtype=torch.long))
        self._scale: Dict[tuple, torch.Tensor] = {}

    def remaining(self) -> torch.Tensor:
        """``[T]``: channels each task has never visited (updates left before it freezes)."""
        return (~self.visited).sum(1)

    def plan(self, completion: float = 1.0) -> torch.Tensor:
        """``[T]``: the swaps each task makes in this layer, ``round(r·|{1..C} \\ B_t(0)|)``
        (paper 002 eqs. 5-6: r(c) = c / |{1..C} \\ B_t(0)|; r = 1 runs until ``B_t`` holds
        every channel). Per task: after the Bernoulli init the tasks start with different
        counts. ``|{1..C} \\ B_t(0)|`` is ``swaps + remaining`` (each swap visits one channel),
        so the plan needs no state of its own."""
        initial = self.swaps + self.remaining()
        return torch.round(completion * initial.double()).long()

    @torch.no_grad()
    def update(self, generator: torch.Generator, max_swaps: Optional[torch.Tensor] = None
               ) -> int:
        """One roaming step for every task (``max_swaps``: ``[T]``, stop a task after that
        many swaps, see :meth:`plan`); returns the number of swaps done."""
        done = 0
        for t in range(self.n_tasks):
            if max_swaps is not None and int(self.swaps[t]) >= int(max_swaps[t]):
                continue
            unvisited = (~self.visited[t]).nonzero().squeeze(1)
            active = self.mask[t].nonzero().squeeze(1)
            if unvisited.numel() == 0 or active.numel() == 0:
                continue  # plan finished for this task in this layer: frozen
            i_minus = active[int(torch.randint(active.numel(), (1,), generator=generator))]
            i_plus = unvisited[int(torch.randint(unvisited.numel(), (1,), generator=generator))]
            self.mask[t, i_minus] = False
            self.mask[t, i_plus] = True
            self.visited[t, i_plus] = True
            self.swaps[t] += 1
            done += 1
        self._scale.clear()
        return done

    def scale(self, task_index: int, like: torch.Tensor) -> torch.Tensor:
        key = (task_index, like.device, like.dtype, like.dim())
        s = self._scale.get(key)
        if s is None:
            s = self.mask[task_index].to(device=like.device, dtype=like.dtype)
            s = s.view(1, -1, *([1] * (like.dim() - 2)))
            self._scale[key] = s
        return s

    def forward(self, x: torch.Tensor, task_index: int) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise RuntimeError(f"RoamingMask: output of shape {tuple(x.shape)}; expected "
                               f"{self.channels} channels in dim 1")
        return x * self.scale(task_index, x)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._scale.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, tasks={self.n_tasks}, active={self.n_active}"


class _MaskHook:
    """Forward hook of one masked layer: multiplies its output by the active task's mask."""

    def __init__(self, roaming: "MaximumRoaming", index: int) -> None:
        self.roaming, self.index = roaming, index

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        roaming = self.roaming
        if not roaming._enabled:
            return output
        task = roaming.context.require("MaximumRoaming")
        if roaming._norm_hooks and all(roaming._applied):
            roaming._finish_norm_check()  # a second pass: the whole first one was checked
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(f"MaximumRoaming: {type(module).__name__} returned "
                               f"{type(output).__name__}; expected a tensor")
        roaming._applied[self.index] += 1
        out = roaming.masks[self.index](output, roaming.task_names.index(task))
        if roaming._norm_hooks:  # first masked forward: check what reads the zeros
            roaming._masked_outputs[id(out)] = (weakref.ref(out), roaming.layer_names[self.index])
        return out


class _NormCheck:
    """Forward pre-hook of a normalisation layer during the first masked forward: refuses a
    norm whose input is a masked output (it would undo the zeros)."""

    def __init__(self, roaming: "MaximumRoaming", name: str) -> None:
        self.roaming, self.name = roaming, name

    def __call__(self, module: nn.Module, args: Any) -> None:
        seen = self.roaming._masked_outputs
        if not seen or not args or not isinstance(args[0], torch.Tensor):
            return
        entry = seen.get(id(args[0]))
        if entry is None or entry[0]() is not args[0]:
            return
        layer = entry[1]
        raise MTLConfigError(
            f"{self.roaming.config_key}: the masked output of {layer!r} goes straight into the "
            f"normalisation layer {self.name!r} ({type(module).__name__}), which re-adds its "
            "bias β to the zeroed channels (and normalises them with statistics of the others), "
            "so every task would still use and train the channels its mask removes; expected "
            f"the mask on the norm's output: {self.name!r} instead of {layer!r} (paper 002 "
            "eq. 2: the mask comes after normalisation, before the activation)")


class MaximumRoaming(nn.Module):
    """Maximum Roaming over the layers ``layer_names`` of ``model``.

    Args:
        model: the network (the masks are attached to its modules by forward hooks; the
            module's own parameters and state-dict keys are unchanged).
        layer_names: names or glob patterns of the modules whose *output* is masked: name
            the norm that follows a conv (post-norm, pre-activation, as in the paper), or the
            conv itself when it has no norm or the activation is outside it. Patterns keep
            modules with a channel count (convs, linears, BN/GN).
        task_names: the tasks (mask rows).
        p: sharing ratio in (0, 1]: each task uses ``round(p·C)`` channels of every layer
            (at least ``ceil(C/T)``, so that the channels can be covered).
        interval: Δ in optimizer steps: :meth:`step` (called after every optimizer step)
            swaps every ``interval`` calls. Give this or ``interval_epochs``, not both.
        interval_epochs: Δ in epochs, as the paper states it (paper 002, Sec. 3: c = ⌊E/Δ⌋,
            E in epochs; good range ≈ 0.05-1 epoch). Converted to ``interval = max(1,
            round(Δ · steps per epoch))`` optimizer steps by :meth:`set_steps_per_epoch`,
            which the framework adapter calls once the training data is known; :meth:`step`
            refuses to run before. Default (neither given): :data:`DEFAULT_INTERVAL_EPOCHS`
            = 0.1, the paper's setting.
        completion: r in [0, 1], the fraction of the plan to run: a task stops after
            ``round(r·(C − |A_t(0)|))`` swaps in a layer (1.0: until it visited every channel).
        init: ``"exact"`` (exact per-task count, round-robin cover; default) or
            ``"bernoulli"`` (the paper's Bernoulli(p) draw plus the coverage fix).
        seed: seed of the CPU generator for the init and the swaps (state in checkpoints;
            the same seed on every DDP rank gives the same masks).
        context: a shared :class:`TaskContext` (e.g. with Recon routers); default a new one.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str] | str,
                 task_names: Sequence[str], p: float, interval: Optional[int] = None,
                 completion: float = 1.0, init: str = "exact", seed: int = 0,
                 context: Optional[TaskContext] = None,
                 interval_epochs: Optional[float] = None) -> None:
        super().__init__()
        names = check_task_names(task_names)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise MTLConfigError(f"p={p!r}: expected a sharing ratio in (0, 1] (paper: 0.6-0.8)")
        if interval is not None and interval_epochs is not None:
            raise MTLConfigError(
                f"interval={interval!r} and interval_epochs={interval_epochs!r}: expected one "
                "of them (Δ in optimizer steps, or in epochs as paper 002 states it)")
        if interval is None and interval_epochs is None:
            interval_epochs = DEFAULT_INTERVAL_EPOCHS
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int)
                                     or interval < 1):
            raise MTLConfigError(f"interval={interval!r}: expected an integer >= 1 (optimizer "
                                 "steps between two roaming updates)")
        if interval_epochs is not None and (
                isinstance(interval_epochs, bool) or not isinstance(interval_epochs, (int, float))
                or not math.isfinite(interval_epochs) or interval_epochs <= 0):
            raise MTLConfigError(f"interval_epochs={interval_epochs!r}: expected Δ > 0 in "
                                 "epochs (paper 002: 0.05-1, default 0.1)")
        if not isinstance(completion, (int, float)) or not 0.0 <= completion <= 1.0:
            raise MTLConfigError(f"completion={completion!r}: expected r in [0, 1]")
        if init not in INITS:
            raise MTLConfigError(f"init={init!r}: expected one of {list(INITS)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MTLConfigError(f"seed={seed!r}: expected an integer")
        layers = select_modules(model, layer_names, "layer_names",
                                lambda m: _channels(m) is not None,
                                "a module with a channel count (conv, linear, BN, GN)")
        self.task_names = names
        self.context = context if context is not None else TaskContext(names)
        if tuple(self.context.task_names) != names:
            raise MTLConfigError(f"context: tasks {list(self.context.task_names)}; expected "
                                 f"{list(names)}")
        self.p, self.completion, self.init = float(p), completion, init
        self.interval_epochs: Optional[float] = \
            None if interval_epochs is None else float(interval_epochs)
        self.layer_names: List[str] = list(layers)
        self._generator = torch.Generator().manual_seed(seed)
        self.masks = nn.ModuleList([RoamingMask(_channels(m), len(names), self.p, init,
                                                self._generator) for m in layers.values()])
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # Δ in optimizer steps; 0 until set_steps_per_epoch converted interval_epochs. Not in
        # the state dict: it follows from the config and the data, which the adapters convert
        # again on every start (a resumed run keeps its configured Δ)
        self.register_buffer("interval_steps", torch.tensor(interval or 0, dtype=torch.long),
                             persistent=False)
        self._enabled = True
        self._hooked: Dict[str, Any] = {}  # layer name -> (module, hook handle)
        self._applied = [0] * len(self.masks)  # masked forwards per layer (check_applied)
        #: the config key named by errors about the layers (adapters set theirs)
        self.config_key = "layer_names"
        # until one forward ran masked: pre-hooks on every norm checking that none reads a
        # masked output directly (re-registered on the current modules before each forward)
        self._norm_hooks: Dict[str, Any] = {}
        self._masked_outputs: Dict[int, Any] = {}
        self._norm_check_done = False
        self._attach(model)
        self._hook_norms(model)  # also for forwards of a submodule (no root pre-hook)
        # bound methods and _MaskHook objects (not closures): ``copy.deepcopy`` of the model
        # (EMA copies, model soups) gives a copy whose hooks use the copy's masks
        self._root_handle = model.register_forward_pre_hook(self._before_forward)
        self._root_post_handle = model.register_forward_hook(self._after_forward)

    # ------------------------------------------------------------------ forward side
    def _before_forward(self, root: nn.Module, args: Any) -> None:
        self._attach(root)
        if not self._norm_check_done:
            self._hook_norms(root)

    def _after_forward(self, root: nn.Module, args: Any, output: Any) -> None:
        self._masked_outputs.clear()
        if any(self._applied) and self._norm_hooks:  # one masked forward passed the check
            self._finish_norm_check()

    def _finish_norm_check(self) -> None:
        self._unhook_norms()
        self._masked_outputs.clear()
        self._norm_check_done = True

    def _hook_norms(self, root: nn.Module) -> None:
        self._unhook_norms()
        self._masked_outputs.clear()
        self._norm_hooks = {n: m.register_forward_pre_hook(_NormCheck(self, n))
                            for n, m in root.named_modules() if n and is_norm(m)}

    def _unhook_norms(self) -> None:
        for handle in self._norm_hooks.values():
            handle.remove()
        self._norm_hooks = {}

    def _attach(self, root: nn.Module) -> None:
        """Hook every layer's *current* module (re-done when a module was replaced)."""
        for i, name in enumerate(self.layer_names):
            module = root.get_submodule(name)
            hooked = self._hooked.get(name)
            if hooked is not None and hooked[0] is module:
                continue
            if hooked is not None:
                hooked[1].remove()
            self._hooked[name] = (module, module.register_forward_hook(
                _MaskHook(self, i), prepend=True))  # the mask is part of the output

    def check_applied(self, key: str = "roaming") -> None:
        """Raise if a masked layer has not run masked since the last call (a layer outside
        the forward, or a module the framework replaced behind a name this object cannot
        find): the configured method would otherwise be a silent no-op."""
        missing = [n for n, c in zip(self.layer_names, self._applied) if c == 0]
        self._applied = [0] * len(self.masks)
        if missing:
            raise MTLConfigError(
                f"{key}.layers: the Maximum Roaming masks of {missing} were not applied in the "
                "last training forward (the layer did not run); expected every masked layer "
                "to be part of the forward of every task")

    def set_task(self, task: "str | int | None") -> None:
        """Select the active task's masks (``None``: no task; a masked forward then raises)."""
        self.context.set_task(task)

    def task(self, task: "str | int"):
        """``with roaming.task(t):`` — forward passes use task t's masks."""
        return self.context.active(task)

    def forward_per_task(self, fn: Callable[[str], R],
                         tasks: Optional[Sequence[str]] = None) -> Dict[str, R]:
        """``{t: fn(t)}``, each call under task t's masks: the shared trunk runs once per
        task, as MR requires in training and inference (e.g. ``fn = lambda t:
        heads[t](trunk(x))``)."""
        return run_per_task(self.context, fn, tasks)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Forward passes without masks (e.g. FLOP counting)."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked = {}
        self._unhook_norms()
        self._root_handle.remove()
        self._root_post_handle.remove()

    # ------------------------------------------------------------------ roaming
    def max_swaps(self, mask: RoamingMask) -> torch.Tensor:
        """``[T]``: the swaps of each task in ``mask``'s layer at completion rate r."""
        return mask.plan(self.completion)

    @property
    def interval(self) -> Optional[int]:
        """Δ in optimizer steps (``None`` while ``interval_epochs`` awaits the steps per
        epoch)."""
        steps = int(self.interval_steps)
        return steps if steps > 0 else None

    def set_steps_per_epoch(self, steps_per_epoch: float) -> int:
        """Convert ``interval_epochs`` into optimizer steps, ``max(1, round(Δ ·
        steps_per_epoch))`` (see :func:`optimizer_steps_per_epoch`); returns the interval.
        With an explicit ``interval`` in steps, it is kept and returned."""
        if self.interval_epochs is None:
            return int(self.interval_steps)
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, (int, float)) \
                or not math.isfinite(steps_per_epoch) or steps_per_epoch <= 0:
            raise MTLConfigError(f"steps_per_epoch={steps_per_epoch!r}: expected the optimizer "
                                 "steps of one training epoch (> 0)")
        steps = max(1, int(round(self.interval_epochs * steps_per_epoch)))
        self.interval_steps.fill_(steps)
        return steps

    def step(self) -> int:
        """Call once after every optimizer step; every ``interval`` calls, one roaming update
        (:meth:`update_masks`). Returns the number of swaps done (0 between updates)."""
        interval = self.interval
        if interval is None:
            raise MTLConfigError(
                f"roaming interval_epochs={self.interval_epochs}: the optimizer steps per epoch "
                "are unknown, so Δ cannot be converted to steps; expected the adapter to call "
                "set_steps_per_epoch() before training (mmseg: custom_hooks=[dict(type="
                "'MTLHook')]; detectron2: the yacs config / mtl_steps_per_epoch), or Δ in "
                "optimizer steps (interval=N)")
        self.num_updates += 1
        if int(self.num_updates) % interval:
            return 0
        return self.update_masks()

    def update_masks(self) -> int:
        """One swap per task per layer (until that task visited every channel)."""
        return sum(m.update(self._generator, self.max_swaps(m)) for m in self.masks)

    @property
    def finished(self) -> bool:
        """Every task in every layer has run its plan: with r = 1 every task has visited every
        channel of every layer (paper 002 Lemma 1); with r < 1, ``round(r·|{1..C} \\ B_t(0)|)``
        swaps per task and layer."""
        return all(bool((m.swaps >= self.max_swaps(m)).all()) for m in self.masks)

    def updates_to_finish(self) -> int:
        """Roaming updates the whole plan needs from the start: ``max`` over layers and tasks of
        ``round(r·|{1..C} \\ B_t(0)|)`` (with the exact init ``round(r·(C − n))``, paper 002
        Lemma 1: ``(1 − p)·S_max`` updates)."""
        return max((int(self.max_swaps(m).max()) for m in self.masks), default=0)

    def layer_mask(self, name: str) -> RoamingMask:
        if name not in self.layer_names:
            raise MTLConfigError(f"layer {name!r}: not a roaming layer; expected one of "
                                 f"{self.layer_names}")
        return self.masks[self.layer_names.index(name)]

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> Dict[str, Any]:
        return {"rng": self._generator.get_state(), "layer_names": list(self.layer_names),
                "task_names": list(self.task_names)}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        if list(state["layer_names"]) != self.layer_names or \
                list(state["task_names"]) != list(self.task_names):
            raise MTLConfigError(
                f"MaximumRoaming state: layers {state['layer_names']} / tasks "
                f"{state['task_names']}; expected {self.layer_names} / {list(self.task_names)}")
        self._generator.set_state(state["rng"])

    def extra_repr(self) -> str:
        return (f"tasks={list(self.task_names)}, p={self.p}, interval={self.interval}, "
                f"interval_epochs={self.interval_epochs}, "
                f"completion={self.completion}, init={self.init!r}, layers={len(self.masks)}")
