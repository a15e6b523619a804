# Cityscapes, 19-class seg + disparity, dilated ResNet-50 + ASPP heads (paper 001 Table 5).
# FT+: Full Task trained for as many optimizer steps as STA / ISTA (80000, twice FT's 40000).
# Paper 001 (~line 284): "In order to exclude the factor of far more steps, we run Full Task
# experiment with the same step as our methods, short as FT+."
_base_ = ['../_base_/models/r50_d8_aspp_mt.py', '../_base_/datasets/cityscapes_mt.py', '../_base_/schedules/cityscapes_40k_x2.py', '../_base_/mtl_runtime.py']
model = dict(decode_heads=dict(seg=dict(num_classes=19)))
optim_wrapper = dict(mtl=dict(allocation=dict(mode='ft')))
