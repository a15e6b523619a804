"""Loaded by the test launches only (this folder is on their PYTHONPATH): mmengine's
``--launcher pytorch`` calls ``torch.cuda.set_device(LOCAL_RANK)`` unconditionally, which
raises on a machine without a GPU. On such a machine that one call becomes a no-op, so mmseg's
own ``tools/train.py`` runs its DDP path on CPU with gloo; nothing else is changed."""
import torch

if not torch.cuda.is_available():
    torch.cuda.set_device = lambda device: None
