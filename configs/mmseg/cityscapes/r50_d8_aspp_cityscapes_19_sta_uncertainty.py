# Cityscapes, 19-class seg + disparity, dilated ResNet-50 + ASPP heads (paper 001 Tables 3 and 6).
# STA + uncertainty weighting.
_base_ = ['../_base_/models/r50_d8_aspp_mt.py', '../_base_/datasets/cityscapes_mt.py', '../_base_/schedules/cityscapes_40k.py', '../_base_/mtl_runtime.py']
model = dict(decode_heads=dict(seg=dict(num_classes=19)))
optim_wrapper = dict(mtl=dict(allocation=dict(mode='sta', k=1, seed=0), balancer='uncertainty'))
