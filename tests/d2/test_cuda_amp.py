"""CUDA only: float16 AMP through the detectron2 adapters, for each allocation mode and with
gradient surgery: MTLTrainer (the controller's loss scaler) and ModelSideMTLRCNN under
detectron2's AMPTrainer (torch's GradScaler). Skipped without a CUDA device;
``tools/gpu_check.sh`` runs them."""
import pytest
import torch

from .conftest import make_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cuda_cfg(dataset, **mtl):
    cfg = make_cfg(**mtl)
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.MODEL.DEVICE = "cuda"
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.BASE_LR = 1e-5  # random init: larger rates diverge in a few steps
    return cfg


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()
            if v.requires_grad and not k.startswith("mtl_controller.")}


def _check_steps(trainer, model, found_inf, iterations=4):
    """Run ``iterations`` steps: a step whose gradients overflowed leaves every weight alone,
    a finite one moves them; at least one step is finite; every weight stays finite."""
    from detectron2.utils.events import EventStorage

    finite_steps = 0
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(iterations):
            storage.iter = it
            before = _params(model)
            trainer.run_step()
            after = _params(model)
            moved = sum(not torch.equal(before[k], v) for k, v in after.items())
            if found_inf():
                assert moved == 0, it
            else:
                finite_steps += 1
                assert moved > 0, it
            assert all(torch.isfinite(v).all() for v in after.values()), it
    assert finite_steps > 0


@pytest.mark.parametrize("mtl", [{"ALLOCATION.MODE": "ft"}, {"ALLOCATION.MODE": "sta"},
                                 {"ALLOCATION.MODE": "ista"},
                                 {"ALLOCATION.MODE": "sta", "BALANCER": "uncertainty"},
                                 {"AGGREGATOR": "pcgrad"},
                                 {"AGGREGATOR": "mgda", "LEVEL": "representation"}],
                         ids=["ft", "sta", "ista", "sta_uncertainty", "pcgrad", "mgda_repr"])
def test_mtl_trainer_float16_amp(shapes_dataset, mtl):
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.modeling import build_model

    from mtl_plugins.d2 import MTLTrainer, build_mtl_controller, task_loss_mapping

    cfg = _cuda_cfg(shapes_dataset, **mtl)
    torch.manual_seed(0)
    model = build_model(cfg)
    trainer = MTLTrainer(model, build_detection_train_loader(cfg),
                         DefaultTrainer.build_optimizer(cfg, model), build_mtl_controller(cfg),
                         task_loss_mapping(cfg), amp_dtype=torch.float16)
    assert trainer.controller.loss_scaler is not None
    _check_steps(trainer, model, lambda: bool(trainer.last_result.found_inf))
    assert next(model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("mtl", [{"ALLOCATION.MODE": "sta"}, {"AGGREGATOR": "pcgrad"}],
                         ids=["sta", "pcgrad"])
def test_model_side_under_amp_trainer_with_grad_scaler(shapes_dataset, mtl):
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import AMPTrainer
    from detectron2.modeling import build_model

    cfg = _cuda_cfg(shapes_dataset, **mtl)
    cfg.MODEL.META_ARCHITECTURE = "ModelSideMTLRCNN"
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    trainer = AMPTrainer(model, build_detection_train_loader(cfg), optimizer)
    scales = []

    def found_inf() -> bool:  # GradScaler backs off exactly when it skipped the step
        scales.append(trainer.grad_scaler.get_scale())
        return len(scales) > 1 and scales[-1] < scales[-2]

    found_inf()
    _check_steps(trainer, model, found_inf)
