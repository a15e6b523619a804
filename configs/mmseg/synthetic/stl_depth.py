# Single-task baseline: depth only, same backbone and schedule as the multi-task model.
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']
tasks = ['depth']
model = dict(tasks=tasks, decode_heads=dict(_delete_=True, depth={{_base_.model.decode_heads.depth}}))
optim_wrapper = dict(mtl=dict(tasks=tasks))
train_dataloader = dict(dataset=dict(tasks=tasks))
val_dataloader = dict(dataset=dict(tasks=tasks))
test_dataloader = val_dataloader
val_evaluator = dict(tasks=tasks)
test_evaluator = val_evaluator
