# NYUv2-13, seg + depth, SegNet (paper 001 Tables 1, 5, 7; MTAN's setting, see the bases).
# Full Task (Table 1 "Full Task(FT)"): every sample trains every task, 79500 steps (200 epochs).
_base_ = ['../_base_/models/segnet_mt.py', '../_base_/datasets/nyuv2_13_segnet.py', '../_base_/schedules/nyuv2_segnet_200e.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='ft')))
