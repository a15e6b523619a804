# Multi-task: STA allocation (k = 1) with PCGrad on the shared backbone.
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='sta', k=1, seed=0), aggregator='pcgrad'))
