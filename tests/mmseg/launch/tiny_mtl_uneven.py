# tiny_mtl.py with rank 0's samples annotated for seg only (RankZeroSegOnly): under ISTA
# (k=1) rank 0's plan has 1 sub-step per batch and rank 1's has 3.
_base_ = ['tiny_mtl.py']
train_dataloader = dict(dataset=dict(pipeline=[
    dict(type='RankZeroSegOnly'), dict(type='LoadSyntheticScene'), dict(type='FillVoidPixels'),
    dict(type='PackMultiTaskInputs')]))
