# Recon stage 2 (paper 004): the top-K layers of a stage-1 ranking become per-task copies;
# each copy is a task-specific parameter (trained by its task's loss only). Retrains from
# scratch. Point `model.recon.ranking` at your search's output, e.g.
#   --cfg-options model.recon.ranking=work_dirs/mtl_recon_search/recon_ranking.json
# (the default is an example ranking of the tiny model on synthetic scenes).
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']
model = dict(recon=dict(ranking='{{ fileDirname }}/recon_ranking_example.json', topk=2))
