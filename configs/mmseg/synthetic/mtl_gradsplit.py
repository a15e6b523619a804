# Multi-task with GradSplit (paper 000) on the last stage's convs: their filters are split into
# one group per task; group t is updated only by the losses that relation[t] allows (rows:
# receiving group seg/depth/normal, columns: source loss). relation=None is the identity
# (GradSplit_tau=inf). The configured aggregator (here none: the plain sum) handles the rest.
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(
    gradsplit=dict(modules=['backbone.layer4.*'],
                   relation=[[1, 0, 1], [0, 1, 1], [1, 1, 1]],
                   split_norm_affine=False)))
