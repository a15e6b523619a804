# NYUD-v2 (survey 003, Table V(a)): HRNet-18 PADNet with seg + depth as final tasks and
# normals + edges as auxiliary (deep-supervision) tasks, survey loss weights
# (seg 1, depth 1, normal 10, edge 50), FT training, Adam 1e-4, 100 epochs.
_base_ = ['../_base_/models/hr18s_mt.py', '../_base_/datasets/nyuv2_mt_aux.py',
          '../_base_/schedules/nyuv2_100e.py', '../_base_/mtl_runtime.py']
model = dict(decoder=dict(type='PADNetHead', tasks=['seg', 'depth'], aux_tasks={{_base_.aux_tasks}},
                          in_channels=(18, 36, 72, 144), num_classes=40,
                          norm_cfg={{_base_.norm_cfg}}))
# every trained task (final and auxiliary) takes part in balancing and allocation
optim_wrapper = dict(mtl=dict(tasks={{_base_.aux_tasks}}))
