# NYUv2-40, seg + depth, dilated ResNet-50 + ASPP heads (paper 001 Table 2).
# ISTA + uncertainty weighting (paper 001's best NYUv2/Cityscapes rows).
_base_ = ['../_base_/models/r50_d8_aspp_mt.py', '../_base_/datasets/nyuv2_mt.py', '../_base_/schedules/nyuv2_100e.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='ista', k=1, seed=0), balancer='uncertainty'))
# same epochs as FT (paper 001): twice the optimizer steps (T = 2, k = 1)
train_cfg = dict(max_iters=20000, val_interval=2000)
param_scheduler = [dict(type='PolyLR', eta_min=0, power=0.9, begin=0, end=20000, by_epoch=False)]
