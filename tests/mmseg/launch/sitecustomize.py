"""Loaded by the test launches only (this folder is on their PYTHONPATH).

mmengine's ``--launcher pytorch`` calls ``torch.cuda.set_device(LOCAL_RANK)`` unconditionally,
which raises on a machine without a GPU. On such a machine that one call becomes a no-op, so
mmseg's own ``tools/train.py`` runs its DDP path on CPU with gloo.

Two pieces of log-only work are skipped, to shorten each of the many short test launches (about
a second per process; no test reads either): the runner's environment report (mmengine's
``collect_env``: imports and probes of the installed stack) and yapf's pretty-printing of the
config text (the config is still logged, dumped and stored in checkpoints, unformatted: the
same Python text before yapf re-indents it). Nothing else is changed."""
import torch

if not torch.cuda.is_available():
    torch.cuda.set_device = lambda device: None

import mmengine.config.config as _config  # noqa: E402
import mmengine.runner.runner as _runner  # noqa: E402

_config.FormatCode = lambda text, **kwargs: (text, False)
_runner.collect_env = lambda: {"(environment report)": "skipped by the test launch"}
