# Cityscapes, 19-class seg + disparity, dilated ResNet-50 + ASPP heads (paper 001 Tables 3 and 6).
# ISTA + PCGrad (paper 001 Table 6).
# Schedule: same epochs as FT, i.e. twice FT's optimizer steps (T = 2, k = 1), in
# ../_base_/schedules/cityscapes_40k_x2.py. Paper 001 (~line 284): "For the results in
# NYUv2-13 and Cityscapes, we run all experiments for the same epoch. However, STA and ISTA only
# use part of tasks for one step so that the length of an epoch increases resulting in growing
# steps."
_base_ = ['../_base_/models/r50_d8_aspp_mt.py', '../_base_/datasets/cityscapes_mt.py', '../_base_/schedules/cityscapes_40k_x2.py', '../_base_/mtl_runtime.py']
model = dict(decode_heads=dict(seg=dict(num_classes=19)))
optim_wrapper = dict(mtl=dict(allocation=dict(mode='ista', k=1, seed=0), aggregator='pcgrad'))
