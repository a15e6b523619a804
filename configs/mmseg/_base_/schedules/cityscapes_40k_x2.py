# The Cityscapes 40k schedule (cityscapes_40k.py) at the same number of *epochs* for STA and
# ISTA, and for FT+ (FT at the same number of steps, paper 001 Table 5).
# Paper 001 (001_*.txt ~line 284): "For the results in NYUv2-13 and Cityscapes, we run all
# experiments for the same epoch. However, STA and ISTA only use part of tasks for one step so
# that the length of an epoch increases resulting in growing steps. In order to exclude the
# factor of far more steps, we run Full Task experiment with the same step as our methods,
# short as FT+."
# An epoch trains every (sample, task) annotation once: T/k = 2 times FT's optimizer steps for
# STA and ISTA alike (T = 2, k = 1; see nyuv2_segnet_200e_x2.py) -> 80000 steps, poly to the
# same eta_min as FT.
_base_ = ['./cityscapes_40k.py']
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=80000,
                        by_epoch=False)]
train_cfg = dict(max_iters=80000, val_interval=8000)
default_hooks = dict(checkpoint=dict(interval=8000))
