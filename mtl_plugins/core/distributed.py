"""The one question the core asks of ``torch.distributed``: how many ranks train together."""
from __future__ import annotations

import torch


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
