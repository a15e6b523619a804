# NYUv2-40, seg + depth, dilated ResNet-50 + ASPP heads (paper 001 Table 2).
# Full Task + uncertainty weighting (Kendall et al. 2018).
_base_ = ['../_base_/models/r50_d8_aspp_mt.py', '../_base_/datasets/nyuv2_mt.py', '../_base_/schedules/nyuv2_100e.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='ft'), balancer='uncertainty'))
