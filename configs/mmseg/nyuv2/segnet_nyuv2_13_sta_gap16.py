# NYUv2-13, seg + depth, SegNet (paper 001 Tables 1, 5, 7; MTAN's setting, see the bases).
# STA-Gap=16 (Table 7): a batch trained at step t is trained again at step t + 16 with
# another allocation (mode 'gap' of the allocator, docs/methods/allocation.md).
# Paper 001 (~line 332): "at step t, a batch of examples is trained by the model with task
# allocations {ST_i}. At step t + gap, the same batch of examples is learned again with
# another allocation ... ISTA is a special case where the gap is 1."
# Schedule: every batch is trained twice, so the same-epoch schedule is twice FT's optimizer
# steps (159000), nyuv2_segnet_200e_x2.py. Paper 001 (~line 284): "For the results in NYUv2-13
# and Cityscapes, we run all experiments for the same epoch."
_base_ = ['../_base_/models/segnet_mt.py', '../_base_/datasets/nyuv2_13_segnet.py', '../_base_/schedules/nyuv2_segnet_200e_x2.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(allocation=dict(mode='gap', k=1, gap=16)))
