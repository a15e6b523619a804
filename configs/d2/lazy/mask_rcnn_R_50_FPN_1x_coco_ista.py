"""Paper 001, Table 4, COCO row, ISTA: each batch is used for 2 sub-steps (each image trains
one task, then the other), each a real optimizer step. Iterations (``train.max_iter``, the LR
schedule, checkpoint and eval periods) count optimizer steps in every allocation mode, so the
model zoo's 90k iterations are 90k optimizer steps (45k batches), as for the baseline and STA.
Paper 001, line ~252: "All hyper-parameters follow the default configuration in detectron2"
(the paper gives no other COCO schedule)."""
from .mask_rcnn_R_50_FPN_1x_coco_ft import dataloader, lr_multiplier, model, optimizer, train

train.mtl.allocation.mode = "ista"
train.output_dir = "./output/lazy/mask_rcnn_R_50_FPN_1x_coco_ista"
