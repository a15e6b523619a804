# Multi-task with Maximum Roaming (paper 002): per-task channel masks on the outputs of the
# last stage's norms (post-norm, pre-activation), each task uses p = 50% of the channels and
# swaps one every `interval` optimizer steps. The backbone runs once per task (train and test).
# Masks, visited sets, counter and RNG are in the model's checkpoint (`roaming.*`).
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']
model = dict(roaming=dict(layers=['backbone.layer4.*.bn*'], p=0.5, interval=10, seed=0))
