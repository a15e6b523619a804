# Multi-task with Maximum Roaming (paper 002, /work/shared/papers/002_26f1328748d165ef.txt):
# per-task channel masks on every shared convolutional layer of the backbone. The backbone runs
# once per task (train and test). Masks, visited sets, counter and RNG are in the model's
# checkpoint (`roaming.*`).
_base_ = ['../_base_/models/resnet18_tiny_heads.py', '../_base_/datasets/synthetic_scenes.py',
          '../_base_/schedules/synthetic_300it.py', '../_base_/mtl_runtime.py']
model = dict(roaming=dict(
    # ~l. 339: "Maximum Roaming [is] applied to every shared convolutional layer in the
    # network. This excludes those in the task respective prediction heads." Every conv of
    # the ResNet is followed by a BN, and eq. 2 masks after normalisation, before the
    # activation, so the masks sit on the BN outputs: the 3 stem convs (stem.1/4/7), the 16
    # block convs (bn1/bn2) and the 3 downsample convs (downsample.1): 22 layers. (A mask on
    # a conv whose output enters a BN is refused: the BN would re-add β to the zeros.)
    layers=['backbone.stem.[147]', 'backbone.layer*.bn*', 'backbone.layer*.downsample.1'],
    # ~l. 182: "Using a fixed sharing ratio, p = 0.5, we report ... a grid search over [Δ and
    # r]" (the benchmarks use 0.6 on Cityscapes and 0.8 on NYUv2).
    p=0.5,
    # ~l. 112: "Δ has to be significantly large (we express it in terms of training epochs)";
    # ~l. 174: "with Δ = 0.1 and r(c) = 100%". Converted to optimizer steps by MTLHook:
    # 512 samples / batch 8 = 64 steps per epoch -> Δ = 6 steps.
    interval_epochs=0.1,
    completion=1.0,
    seed=0))
