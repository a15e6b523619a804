# NYUv2-40, seg + depth, dilated ResNet-50 + ASPP heads (paper 001 Table 2).
# STA + uncertainty weighting.
_base_ = ['../_base_/models/r50_d8_aspp_mt.py', '../_base_/datasets/nyuv2_mt.py', '../_base_/schedules/nyuv2_100e.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='sta', k=1, seed=0), balancer='uncertainty'))
