# Multi-task: seg + depth + normal, ISTA allocation (k = 1: three sub-steps per batch, each a
# real optimizer step) with uncertainty weighting (paper 001's best combination).
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='ista', k=1, seed=0), balancer='uncertainty'))
