# NYUv2-13, seg + depth, SegNet (paper 001 Tables 1, 5, 7; MTAN's setting, see the bases).
# STA + uncertainty weighting (Table 1 "STA+Uncertainty").
# Schedule: same epochs as FT = twice FT's optimizer steps (159000), nyuv2_segnet_200e_x2.py.
# Paper 001 (~line 284): "For the results in NYUv2-13 and Cityscapes, we run all experiments
# for the same epoch. However, STA and ISTA only use part of tasks for one step so that the
# length of an epoch increases resulting in growing steps."
_base_ = ['../_base_/models/segnet_mt.py', '../_base_/datasets/nyuv2_13_segnet.py', '../_base_/schedules/nyuv2_segnet_200e_x2.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='sta', k=1, seed=0), balancer='uncertainty'))
