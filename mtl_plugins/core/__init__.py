"""Pure-PyTorch multi-task learning algorithms (imports neither detectron2 nor mmseg/mmengine).

- :mod:`.tasks`: task names and the validation every other piece relies on.
- :mod:`.allocation`: Full Task, STA and ISTA allocation (paper 001).
- :mod:`.balancing`: loss weighting (fixed, uncertainty, GradNorm, DWA, DTP, RLW, GLS, FAMO).
- :mod:`.aggregation`: gradient aggregation over a [T, P] task-gradient matrix.
- :mod:`.backward`: the per-task backward engine (parameter or representation level, AMP, DDP).
- :mod:`.metrics`: segmentation, depth and normal metrics and the Δm variants.
"""
