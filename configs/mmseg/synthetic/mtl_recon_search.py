# Recon stage 1 (paper 004): joint training that counts, per shared layer, the task pairs
# whose gradients conflict (cos < S). MTLHook writes the ranking to the work dir
# (`recon_ranking.json`) at each checkpoint and at the end; feed it to mtl_recon.py.
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']
optim_wrapper = dict(mtl=dict(
    recon_search=dict(modules=None, S=-0.02, out='recon_ranking.json')))
