"""No silent no-op: every configured MTL piece must show that it acted in the first steps.

A method named in a config that never acts (an aggregator whose adapter path bypasses the
engine, learnable loss weights that no optimizer updates, DWA whose period never closes
twice) trains a model that looks right and is not what the config says. The
:class:`ExerciseCheck` held by :class:`~mtl_plugins.core.controller.MTLController` records,
from the first step on, what each configured piece did, and after a window of real optimizer
steps (steps that AMP or an empty batch skipped do not count) it raises
:class:`~mtl_plugins.core.tasks.MTLConfigError` naming the config key, the value and what was
expected of the piece. Each piece has its own deadline:

=====================================  ===================================================
piece                                  acted when (checked after ``steps`` real steps, or
                                       the piece's own deadline if later)
=====================================  ===================================================
aggregator (GradSplit, Recon search    the engine called it at least once
wrappers included)
learnable balancer (uncertainty)       its parameters differ from their values before the
                                       first step (the optimizer updated them)
computed balancer (GradNorm, DWA with  its weights differ from those before the first step,
a period, RLW, GLS, FAMO)              if the losses changed at all (deadline:
                                       :meth:`LossBalancer.moves_within`)
=====================================  ===================================================

Fixed weights, epoch-driven DWA and KPI-driven DTP have no deadline in steps: the adapters
refuse runs that cannot drive the latter two (``LossBalancer.required_driver``). The verdict
is agreed over DDP ranks (one all-reduce, at the deadline only), so every rank raises alike.
``steps=0`` switches the check off. The count of real steps is checkpointed: a resumed run
past the window is not checked again; one resumed inside it is checked at the same step as
an uninterrupted one, against the state at the resume.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from .distributed import world_size
from .tasks import MTLConfigError

#: ``probe() -> None`` (acted) or the reason it did not.
Probe = Callable[[], Optional[str]]


class ExerciseCheck:
    """Deadlines for the configured pieces of one controller; see the module docstring.

    Args:
        steps: the window in real optimizer steps (0: no check). A piece whose own
            deadline is later is checked at its deadline.
    """

    def __init__(self, steps: int = 10) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise MTLConfigError(f"check_exercised={steps!r}: expected a non-negative integer "
                                 "number of optimizer steps (0 switches the check off)")
        self.steps = steps
        self.count = 0
        # (deadline, config key, config value, probe); armed by ``arm`` before the first step
        self._pending: List[Tuple[int, str, str, Probe]] = []
        self._armed = False

    def arm(self, probes: List[Tuple[Optional[int], str, str, Callable[[], Probe]]]) -> None:
        """Snapshot the state the probes compare against (before the first optimizer step).

        ``probes``: ``(own deadline or None, key, value, make_probe)``; ``make_probe()`` takes
        the snapshot and returns the probe. Called once; later calls do nothing."""
        if self._armed:
            return
        self._armed = True
        if self.steps == 0:
            return
        for own, key, value, make in probes:
            deadline = max(self.steps, own or 0)
            if deadline > self.count:  # a resume past the deadline is not checked again
                self._pending.append((deadline, key, value, make()))

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def pending(self) -> bool:
        """Some probe is still to run (or the check is not armed yet)."""
        return self.steps > 0 and (not self._armed or bool(self._pending))

    def step(self, stepped: bool, device: torch.device, key: str = "check_exercised") -> None:
        """Count one step (``stepped``: the optimizer really stepped) and run due probes;
        ``key``: this check's own config key, named in the error."""
        if not stepped:
            return
        self.count += 1
        due = [p for p in self._pending if p[0] <= self.count]
        if not due:
            return
        self._pending = [p for p in self._pending if p[0] > self.count]
        failures = [(key, value, why) for _, key, value, probe in due
                    for why in [probe()] if why is not None]
        if world_size() > 1:  # every rank raises alike, or none does
            dist = torch.distributed
            if dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            flag = torch.tensor([float(bool(failures))], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and not failures:
                failures = [("(another rank)", "", "a configured piece did not act there")]
        if failures:
            lines = "; ".join(f"{name}={value}: {why}" for name, value, why in failures)
            raise MTLConfigError(
                f"configured MTL method(s) did not act in the first {self.count} optimizer "
                f"steps (no silent no-op): {lines}. Fix the set-up, or set {key}=0 to switch this "
                "check off if that is intended")

    def state_dict(self) -> Dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: Optional[Dict[str, int]]) -> None:
        # a checkpoint written before the check existed: its run is past any window
        self.count = int(state["count"]) if state is not None else 1 << 62


def tensors_changed(read: Callable[[], List[torch.Tensor]], what: str,
                    hint: str) -> Callable[[], Probe]:
    """A probe factory: acted when any tensor ``read()`` returns differs from its value at
    arming (``read`` is called again at the deadline: tensors may be replaced, not only
    updated in place)."""
    def make() -> Probe:
        before = [t.detach().clone() for t in read()]

        def probe() -> Optional[str]:
            now = [t.detach() for t in read()]
            if any(not torch.equal(b.to(t.device), t) for b, t in zip(before, now)):
                return None
            return f"{what} did not change; {hint}"
        return probe
    return make


def counter_moved(read: Callable[[], int], what: str, hint: str) -> Callable[[], Probe]:
    """A probe factory: acted when ``read()`` grew since arming."""
    def make() -> Probe:
        start = read()

        def probe() -> Optional[str]:
            return None if read() > start else f"{what}; {hint}"
        return probe
    return make
