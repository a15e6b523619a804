# Cityscapes, 19-class seg + disparity, dilated ResNet-50 + ASPP heads (paper 001 Tables 3 and 6).
# ISTA + uncertainty weighting (paper 001's best NYUv2/Cityscapes rows).
_base_ = ['../_base_/models/r50_d8_aspp_mt.py', '../_base_/datasets/cityscapes_mt.py', '../_base_/schedules/cityscapes_40k.py', '../_base_/mtl_runtime.py']
model = dict(decode_heads=dict(seg=dict(num_classes=19)))
optim_wrapper = dict(mtl=dict(allocation=dict(mode='ista', k=1, seed=0), balancer='uncertainty'))
# same epochs as FT (paper 001): twice the optimizer steps (T = 2, k = 1)
train_cfg = dict(max_iters=80000, val_interval=8000)
param_scheduler = [dict(type='PolyLR', eta_min=0, power=0.9, begin=0, end=80000, by_epoch=False)]
