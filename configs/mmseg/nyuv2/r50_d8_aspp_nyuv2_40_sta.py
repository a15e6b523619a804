# NYUv2-40, seg + depth, dilated ResNet-50 + ASPP heads (paper 001 Table 2).
# STA (paper 001 Alg. 1): each sample trains one random task per step (k = 1).
# Schedule: the same optimizer steps as FT (10000, ../_base_/schedules/nyuv2_100e.py).
# Paper 001 (~line 286): "In Mask R-CNN on Cityscapes and NYUv2-40 experiments, STA and ISTA
# run for the same steps while also outperforming baseline by a margin". (The "same epoch"
# rule, ~line 284, is for NYUv2-13 and Cityscapes only.)
_base_ = ['../_base_/models/r50_d8_aspp_mt.py', '../_base_/datasets/nyuv2_mt.py', '../_base_/schedules/nyuv2_100e.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='sta', k=1, seed=0)))
