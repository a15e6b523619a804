"""Checkpoint a module's non-tensor ``_extra_state`` as fixed-size ``uint8`` tensors.

Modules of this package keep state that is not a tensor (allocation RNG and ISTA position,
Maximum Roaming's generator and layer names, an aggregator's targets) in
``get_extra_state()``; ``state_dict()`` then holds Python objects under ``<name>._extra_state``.
fvcore's ``Checkpointer`` (detectron2's ``DetectionCheckpointer``) refuses such values on load
("Unsupported type found in checkpoint!"), and drops any tensor whose shape differs from the
model's. :func:`install_tensor_state` registers two hooks on a model so that its state dict
carries each such object as

- ``<name>._extra_state.nbytes``: a 0-d ``int64`` tensor, the length of the serialised object;
- ``<name>._extra_state.<i>``: ``uint8`` chunks of :data:`CHUNK` bytes (the last zero-padded),

every entry of a fixed shape, so fvcore's shape check never discards one. Loading reassembles
the bytes and deserialises them with ``torch.load(..., weights_only=True)`` before the
modules read their extra state. Plain ``torch.save``/``load_state_dict`` round-trips too.
"""
from __future__ import annotations

import io
from typing import Any, Dict, List

import torch
from torch import nn

#: bytes per chunk tensor
CHUNK = 4096
EXTRA = "_extra_state"
NBYTES = ".nbytes"


def _encode_value(value: Any) -> List[torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    data = bytearray(buffer.getvalue())
    n = len(data)
    data.extend(b"\0" * (-n % CHUNK))
    flat = torch.frombuffer(data, dtype=torch.uint8).clone()
    return [torch.tensor(n, dtype=torch.int64), *flat.split(CHUNK)]


def _decode_value(key: str, nbytes: torch.Tensor, chunks: List[torch.Tensor]) -> Any:
    n = int(nbytes)
    data = torch.cat([c.reshape(-1).to(torch.uint8) for c in chunks]).cpu().numpy().tobytes()
    if len(data) < n:
        raise RuntimeError(f"checkpoint entry {key!r}: {len(data)} bytes in its chunks, "
                           f"expected {n}; the checkpoint is truncated")
    return torch.load(io.BytesIO(data[:n]), map_location="cpu", weights_only=True)


def _encode_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str,
                 local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(EXTRA)]:
        value = state_dict[key]
        if isinstance(value, torch.Tensor):
            continue
        nbytes, *chunks = _encode_value(value)
        del state_dict[key]
        state_dict[key + NBYTES] = nbytes
        for i, chunk in enumerate(chunks):
            state_dict[f"{key}.{i}"] = chunk


def _decode_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any,
                 strict: bool, missing_keys: List[str], unexpected_keys: List[str],
                 error_msgs: List[str]) -> None:
    for size_key in [k for k in state_dict if k.startswith(prefix) and k.endswith(EXTRA + NBYTES)]:
        key = size_key[:-len(NBYTES)]
        nbytes = state_dict.pop(size_key)
        count = -(-int(nbytes) // CHUNK)
        names = [f"{key}.{i}" for i in range(count)]
        absent = [n for n in names if n not in state_dict]
        if absent:
            raise RuntimeError(f"checkpoint entry {key!r}: chunk(s) {absent} are missing; "
                               f"expected {count} chunks of {CHUNK} bytes")
        state_dict[key] = _decode_value(key, nbytes, [state_dict.pop(n) for n in names])


def install_tensor_state(model: nn.Module) -> nn.Module:
    """Make ``model.state_dict()`` tensor-only (see the module docstring); returns ``model``."""
    model.register_state_dict_post_hook(_encode_hook)
    model.register_load_state_dict_pre_hook(_decode_hook)
    return model
