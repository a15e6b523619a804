# Runtime shared by the mtl_plugins mmseg configs (mmseg's default_runtime plus the plugin).
custom_imports = dict(imports=['mtl_plugins.mmseg'], allow_failed_imports=False)
default_scope = 'mmseg'
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
tta_model = None
# task weights and pairwise task-gradient cosines into the log every log_interval iterations
custom_hooks = [dict(type='MTLHook', log_interval=20)]
