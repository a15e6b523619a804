"""Structure-changing multi-task methods (pure PyTorch).

- :mod:`.gradsplit`: GradSplit (paper 000): per-task filter groups whose parameter gradients
  are masked by an asymmetric task relation; an aggregator over the engine's ``G`` and a
  gradient hook for single-task (round-robin) batches.
- :mod:`.roaming`: Maximum Roaming (paper 002): per-task channel masks that roam over the
  filters during training.
- :mod:`.recon`: Recon (paper 004): layer-wise conflict scores, then per-task copies of the
  most conflicting modules.
- :mod:`.separate_optim`: separate per-task optimizer states (paper 000 §4.1).
- :mod:`.context`: the active-task context and the per-task forward helper they share.
"""
from .context import TaskContext, run_per_task
from .gradsplit import (GradSplit, GradSplitHook, SplitEntry, SplitLayout, channel_groups,
                        check_relation, load_relation, relations_from_results,
                        relative_changes, split_layout)
from .recon import (ConflictRecorder, ReconTransform, TaskRouter, load_ranking,
                    make_task_specific, module_layout, recon_param_increase,
                    recon_param_report)
from .roaming import MaximumRoaming, RoamingMask
from .separate_optim import SeparateTaskOptimizers, step_task_optimizers, task_gradients

__all__ = [
    "ConflictRecorder", "GradSplit", "GradSplitHook", "MaximumRoaming", "ReconTransform",
    "RoamingMask", "SeparateTaskOptimizers", "SplitEntry", "SplitLayout", "TaskContext",
    "TaskRouter", "channel_groups", "check_relation", "load_ranking", "load_relation",
    "make_task_specific", "module_layout", "recon_param_increase", "recon_param_report",
    "relations_from_results", "relative_changes", "run_per_task", "split_layout",
    "step_task_optimizers", "task_gradients",
]
