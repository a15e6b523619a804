"""MTLTrainer: FT/STA/ISTA iterations, gradient surgery, checkpoint/resume of the MTL state."""
import pytest
import torch

from .conftest import make_cfg


def _trainer(cfg, dataset):
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.modeling import build_model

    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

    cfg.DATASETS.TRAIN = (dataset,)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = DefaultTrainer.build_optimizer(cfg, model)
    steps = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    trainer = MTLTrainer(model, build_detection_train_loader(cfg), optimizer,
                         build_mtl_controller(cfg), task_loss_mapping(cfg))
    return trainer, steps


def _history(trainer, key):
    return [v for v, _ in trainer.storage.history(key).values()]


@pytest.mark.parametrize("mode,n_steps", [("ft", 1), ("sta", 1), ("ista", 2)])
def test_allocation_modes_step_the_optimizer(shapes_dataset, mode, n_steps):
    trainer, steps = _trainer(make_cfg(**{"ALLOCATION.MODE": mode}), shapes_dataset)
    head = trainer.model.roi_heads.mask_head.predictor.weight
    before = head.detach().clone()
    trainer.train(0, n_steps)  # an iteration is one optimizer step: ISTA's batch takes two
    assert len(steps) == n_steps  # ISTA: one real optimizer step per sub-step
    assert trainer.controller.allocator.batches == 1  # one data batch in every mode
    det = _history(trainer, "mtl/images/detection")
    mask = _history(trainer, "mtl/images/mask")
    assert len(det) == len(mask) == n_steps
    if mode == "ft":
        assert det == mask == [2.0]
    elif mode == "sta":  # k = 1: every image trains exactly one task
        assert det[0] + mask[0] == 2.0 and len(det) == 1
    else:  # every (image, task) pair trained exactly once over the two sub-steps
        assert sum(det) == sum(mask) == 2.0
        assert det[0] + mask[0] == det[1] + mask[1] == 2.0
    assert all(torch.isfinite(torch.tensor(_history(trainer, "total_loss"))))
    if sum(mask):
        assert not torch.equal(before, head.detach())


def test_pcgrad_through_the_trainer(shapes_dataset):
    trainer, steps = _trainer(make_cfg(AGGREGATOR="pcgrad"), shapes_dataset)
    trainer.train(0, 1)
    assert len(steps) == 1
    result = trainer.last_result
    assert result.tasks == ["detection", "mask"] and result.cosines() is not None
    cos = _history(trainer, "mtl/cos/detection-mask")
    assert len(cos) == 1 and -1.0 <= cos[0] <= 1.0
    # every trainable parameter received a gradient: shared ones the PCGrad direction
    model = trainer.model
    assert model.backbone.bottom_up.res5[0].conv1.weight.grad is not None
    assert model.roi_heads.mask_head.predictor.weight.grad is not None
    assert model.proposal_generator.rpn_head.conv.weight.grad is not None


def test_parameter_split(shapes_dataset):
    from detectron2.modeling import build_model

    from mtl_plugins.d2 import split_task_parameters, task_loss_mapping

    cfg = make_cfg()
    model = build_model(cfg)
    shared, tasks = split_task_parameters(model, task_loss_mapping(cfg))
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(p for p in model.backbone.parameters() if p.requires_grad) == ids(shared)
    assert ids(model.roi_heads.mask_head.parameters()) == ids(tasks["mask"])
    heads = model.roi_heads
    det = list(model.proposal_generator.parameters()) + \
        list(heads.box_head.parameters()) + list(heads.box_predictor.parameters())
    assert ids(det) == ids(tasks["detection"])


def test_checkpoint_resume_restores_mtl_state(shapes_dataset, tmp_path):
    from mtl_plugins.d2 import MTLDefaultTrainer

    cfg = make_cfg(**{"ALLOCATION.MODE": "sta", "BALANCER": "uncertainty"})
    cfg.DATASETS.TRAIN = (shapes_dataset,)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.MAX_ITER = 1
    cfg.OUTPUT_DIR = str(tmp_path)
    torch.manual_seed(0)
    first = MTLDefaultTrainer(cfg)
    assert isinstance(first.scheduler, torch.optim.lr_scheduler.LRScheduler)
    first.resume_or_load(resume=False)
    first.train()
    assert (tmp_path / "model_final.pth").exists()
    saved = first.controller.state_dict()
    drawn = first.controller.allocator.batches
    # the learnable loss weights moved and live in their own param group
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in saved.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point())

    second = MTLDefaultTrainer(cfg)
    assert drawn >= 1 and second.controller.allocator.batches == 0
    second.resume_or_load(resume=True)
    assert second.start_iter == 1
    assert second.controller.allocator.batches == drawn
    for key, value in second.controller.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, saved[key], msg=key)


def test_representation_level_mgda_with_sta(shapes_dataset):
    """Aggregation on the FPN features (recorded by a backbone hook), under STA."""
    trainer, steps = _trainer(make_cfg(**{"AGGREGATOR": "mgda", "LEVEL": "representation",
                                          "ALLOCATION.MODE": "sta"}), shapes_dataset)
    fpn = trainer.model.backbone.fpn_output2.weight
    before = fpn.detach().clone()
    trainer.train(0, 1)
    assert len(steps) == 1
    present = [t for t in ("detection", "mask") if _history(trainer, f"mtl/images/{t}")[0] > 0]
    assert trainer.last_result.tasks == present
    assert not torch.equal(before, fpn.detach())  # the shared FPN got the aggregated gradient


def test_amp_and_partial_labels(shapes_dataset):
    """SOLVER.AMP.ENABLED: autocast forward + the controller's dynamic loss scaler (bf16 on
    CPU); ``mtl_tasks`` (the annotated tasks) bounds the allocation: FT trains only those."""
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.modeling import build_model

    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

    cfg = make_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    cfg.DATASETS.TRAIN = (shapes_dataset,)
    torch.manual_seed(0)
    model = build_model(cfg)
    controller = build_mtl_controller(cfg)
    assert controller.loss_scaler is not None
    trainer = MTLTrainer(model, build_detection_train_loader(cfg),
                         DefaultTrainer.build_optimizer(cfg, model), controller,
                         task_loss_mapping(cfg), amp_dtype=torch.bfloat16)
    batch = next(trainer._data_loader_iter)
    batch[0]["mtl_tasks"] = ("detection",)
    trainer._data_loader_iter = iter([batch])
    trainer.train(0, 1)
    assert _history(trainer, "mtl/images/detection") == [2.0]
    assert _history(trainer, "mtl/images/mask") == [1.0]
    assert _history(trainer, "mtl/skipped_step") == [0.0]
    assert _history(trainer, "mtl/loss_scale")[0] > 1.0


def test_step_without_any_task_skips_the_optimizer_and_keeps_the_weights(shapes_dataset):
    """A batch whose images are annotated for no task: no optimizer step (momentum and weight
    decay leave every weight alone), the step is logged as skipped, and the balancer's
    bookkeeping (``after_step``) runs as for any step, as it must on every DDP rank."""
    trainer, steps = _trainer(make_cfg(), shapes_dataset)
    batch = next(trainer._data_loader_iter)
    before = {}

    def batches():
        yield batch
        before.update({k: v.detach().clone() for k, v in trainer.model.named_parameters()})
        yield [dict(d, mtl_tasks=()) for d in batch]

    trainer._data_loader_iter = batches()
    after_step = trainer.controller.after_step
    seen = []
    trainer.controller.after_step = lambda losses, stepped: (
        seen.append((sorted(losses), stepped)), after_step(losses, stepped))
    trainer.train(0, 2)
    assert len(steps) == 1 and before
    for name, value in trainer.model.named_parameters():
        assert torch.equal(value, before[name]), name
    assert _history(trainer, "mtl/skipped_step") == [0.0, 1.0]
    assert _history(trainer, "mtl/images/detection") == [2.0, 0.0]
    assert seen == [(["detection", "mask"], True), ([], False)]  # the skip does not count


@pytest.mark.parametrize("mode", ["sta", "ista"])
def test_allocation_with_the_vanilla_meta_architecture_is_refused(shapes_dataset, tmp_path,
                                                                 mode):
    """Defect 6: detectron2's GeneralizedRCNN ignores the allocation (random whole-task
    dropout); the yacs trainer refuses it, naming the key, the value and the meta-arch."""
    from mtl_plugins.core.tasks import MTLConfigError
    from mtl_plugins.d2 import MTLDefaultTrainer

    cfg = make_cfg(**{"ALLOCATION.MODE": mode})
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.DATASETS.TRAIN = (shapes_dataset,)
    cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(MTLConfigError, match=rf"MTL.ALLOCATION.MODE='{mode}' needs .*model is "
                                             r"GeneralizedRCNN, expected MODEL.META_ARCHITECTURE"
                                             r": MTLGeneralizedRCNN"):
        MTLDefaultTrainer(cfg)
    cfg.MTL.ALLOCATION.MODE = "ft"  # every image trains every task: any R-CNN will do
    assert MTLDefaultTrainer(cfg).controller.allocator.mode == "ft"


def test_dwa_with_a_period_in_iterations_moves_its_weights(shapes_dataset):
    """No silent no-op (defect 5): with ``MTL.BALANCER_ARGS.period`` (iterations), DWA closes
    its periods inside detectron2's loop and its weights leave 1 once the losses moved."""
    cfg = make_cfg(BALANCER="dwa", BALANCER_ARGS={"period": 1})
    cfg.SOLVER.BASE_LR = 1e-5  # random init: keep the three steps finite
    trainer, steps = _trainer(cfg, shapes_dataset)
    trainer.train(0, 3)
    assert trainer.controller.balancer.num_periods == 3
    weights = _history(trainer, "mtl/weight/detection")
    assert weights[:2] == [1.0, 1.0] and abs(weights[2] - 1.0) > 1e-6
    assert abs(sum(trainer.controller.current_weights().values()) - 2.0) < 1e-5


def test_ista_iterations_are_optimizer_and_scheduler_steps_and_resume_mid_batch(
        shapes_dataset, tmp_path):
    """Issue 11, item 1: SOLVER.MAX_ITER, the LR schedule and the iteration counter count
    optimizer steps under ISTA (3 iterations = 3 steps = 1.5 batches); a checkpoint written
    inside a batch resumes by dropping its remaining sub-step (its data is not saved)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from mtl_plugins.d2 import MTLDefaultTrainer

    cfg = make_cfg(**{"ALLOCATION.MODE": "ista"})
    cfg.DATASETS.TRAIN = (shapes_dataset,)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.BASE_LR = 1e-5
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.STEPS = (2,)  # x0.1 from the third optimizer step on
    cfg.OUTPUT_DIR = str(tmp_path)
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        torch.manual_seed(0)
        first = MTLDefaultTrainer(cfg)
        first.resume_or_load(resume=False)
        first.train()
        assert len(steps) == 3 and first.scheduler.last_epoch == 3 and first.iter == 3
        lrs = _history(first, "lr")
        assert lrs == pytest.approx([1e-5, 1e-5, 1e-6])
        alloc = first.controller.allocator
        assert alloc.batches == 2 and alloc.held_batches == [1]  # 2nd batch: 1 of 2 steps

        cfg.SOLVER.MAX_ITER = 5
        second = MTLDefaultTrainer(cfg)
        second.resume_or_load(resume=True)
        assert second.start_iter == 3
        assert second.controller.allocator.held_batches == [1]  # the plan, not the data
        steps.clear()
        second.train()
        alloc = second.controller.allocator
        # the held sub-step is dropped; iterations 3 and 4 train a new batch's two sub-steps
        assert len(steps) == 2 and second.scheduler.last_epoch == 5
        assert alloc.batches == 3 and alloc.held_batches == []
        assert sum(_history(second, "mtl/images/detection")) == 2.0  # both images, once
    finally:
        handle.remove()


def test_gap_mode_replays_held_batches_gap_steps_later(shapes_dataset):
    """Paper 001, Table 7, through MTLTrainer: MTL.ALLOCATION.MODE 'gap', GAP 2: steps train
    batches 0, 1, 0, 1, each image's second visit with its other task."""
    cfg = make_cfg(**{"ALLOCATION.MODE": "gap", "ALLOCATION.GAP": 2})
    cfg.SOLVER.BASE_LR = 1e-5  # random init: keep the four steps finite
    trainer, steps = _trainer(cfg, shapes_dataset)
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append(
        [(id(x["image"]), x["mtl_alloc"]) for x in args[0]]))
    trainer.train(0, 4)
    assert len(steps) == 4 and trainer.controller.allocator.batches == 2
    images = [tuple(i for i, _ in step) for step in seen]
    assert images[0] == images[2] and images[1] == images[3] and images[0] != images[1]
    for first, second in ((seen[0], seen[2]), (seen[1], seen[3])):
        for (_, a), (_, b) in zip(first, second):
            assert len(a) == len(b) == 1 and set(a) | set(b) == {"detection", "mask"}
