# NYUv2-13, seg + depth, SegNet (paper 001 Tables 1, 5, 7; MTAN's setting, see the bases).
# FT+ (Table 5): Full Task for as many optimizer steps as STA / ISTA (159000).
# Paper 001 (~line 284): "In order to exclude the factor of far more steps, we run Full Task
# experiment with the same step as our methods, short as FT+."
_base_ = ['../_base_/models/segnet_mt.py', '../_base_/datasets/nyuv2_13_segnet.py', '../_base_/schedules/nyuv2_segnet_200e_x2.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='ft')))
