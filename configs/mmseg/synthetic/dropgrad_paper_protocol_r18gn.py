# The DropGrad row of paper 000 Table 4 ("DropGrad (p=0.50)"; caption: "Hyper-parameter p is
# the drop rate of DropGrad [40]. ResNet-18-GN is used as the shared backbone."), with the
# paper's training protocol of gradsplit_paper_protocol_r50gn.py (§4.1: lr 1e-3, batch 64,
# 3-epoch linear warm-up, 10 cosine cycles over 100 epochs, round robin, separate task
# optimizers) on the synthetic single-task datasets: the protocol, not Table 4's numbers.
# DropGrad replaces GradSplit's relation mask on the same convs (layer4, as Table 4's
# "Layer 4" GradSplit row it is compared with) by random per-(filter, task) masks.
_base_ = ['./gradsplit_paper_protocol_r50gn.py']
model = dict(
    backbone=dict(depth=18),
    decode_heads=dict(seg=dict(in_channels=512), depth=dict(in_channels=512),
                      normal=dict(in_channels=512)))
optim_wrapper = dict(mtl=dict(
    gradsplit=dict(_delete_=True, modules=['backbone.layer4.*'], drop_rate=0.5, seed=0,
                   separate_optimizers=True)))
