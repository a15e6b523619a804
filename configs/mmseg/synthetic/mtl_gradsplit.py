# Multi-task with GradSplit (paper 000) on every conv of the backbone's last stage (layer4:
# conv1/conv2 of both blocks and the downsample conv; paper 000 §3.1, ~line 93: "we apply
# GradSplit to the last layer (e.g., Layer4 of ResNet-50) of the shared backbone"): their
# filters are split into one group per task; group t is updated only by the losses that
# relation[t] allows (rows: receiving group seg/depth/normal, columns: source loss).
# relation=None is the identity (GradSplit_tau=inf); relation='relation.json' reads the file
# written by tools/gradsplit_relations.py --out. Each task has its own optimizer state
# (paper 000 §4.1, ~line 146: "We used separate optimizers for tasks following [18]").
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(
    gradsplit=dict(modules=['backbone.layer4.*'],
                   relation=[[1, 0, 1], [0, 1, 1], [1, 1, 1]],
                   split_norm_affine=False,
                   separate_optimizers=True)))
