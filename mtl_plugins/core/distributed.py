"""What the core needs of ``torch.distributed``: the world size, SyncBN detection, the check of
the DDP wrapper the task backward passes run under, and losses averaged over the ranks that
have each task."""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch

from .tasks import MTLConfigError


def world_size() -> int:
    """The size of the default process group; 1 outside an initialised one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def has_sync_bn(model: "torch.nn.Module | None") -> bool:
    """Whether ``model`` holds a ``SyncBatchNorm`` layer (whose backward is a collective)."""
    if model is None:
        return False
    return any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def check_ddp_for_task_passes(model: "torch.nn.Module", key: str) -> None:
    """Refuse a DDP wrapper built with ``static_graph=True`` when the engine runs one backward
    per task (an aggregator, or representation level): the parameter-level passes go through
    autograd's accumulation step, whose DDP hook a static graph counts in its first
    iteration and then expects in every backward (docs/distributed.md); without this check
    DDP fails on its reducer's internal assert at representation level too. ``key``: the
    config key that sets the wrapper's options, named in the error."""
    if getattr(model, "static_graph", False) is True:
        raise MTLConfigError(
            f"{key}.static_graph=True: DDP's static graph counts the calls of its gradient "
            "hooks in the first iteration, and the per-task backward passes of an aggregator "
            "call them once per task; expected static_graph=False (the default) with an "
            "aggregator or representation level")


def mean_over_ranks(losses: Mapping[str, torch.Tensor], task_names: Sequence[str],
                    device: torch.device) -> Dict[str, torch.Tensor]:
    """The detached losses, each averaged over the DDP ranks that have its task (one
    all-reduce of 2T numbers; every rank must call it, one without any task too), so that
    balancer state built from them is identical on every rank. A single process: the
    detached losses. ``device``: where to reduce when this rank has no loss."""
    detached = {t: v.detach() for t, v in losses.items()}
    if world_size() == 1:
        return detached
    dist = torch.distributed
    if detached:
        device = next(iter(detached.values())).device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    n = len(task_names)
    flat = torch.zeros(2 * n, dtype=torch.float64, device=device)
    for i, t in enumerate(task_names):
        if t in detached:
            flat[i] = detached[t].reshape(()).to(torch.float64)
            flat[n + i] = 1.0
    dist.all_reduce(flat)
    dtype = next(iter(detached.values())).dtype if detached else torch.float32
    return {t: (flat[i] / flat[n + i]).to(dtype) for i, t in enumerate(task_names)
            if flat[n + i] > 0}
