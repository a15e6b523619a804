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


def _check_steps(trainer, model, found_inf, finite_wanted=2, max_iterations=24):
    """Run steps until ``finite_wanted`` of them were finite (at most ``max_iterations``): a
    step whose gradients overflowed leaves every weight alone, a finite one moves them; every
    weight stays finite. From a random init the first steps overflow float16 at the initial
    loss scale 2**16 (on an H200 the first 4 did, for both loss scalers); each overflow
    halves the scale, so a finite step comes within 16."""
    from detectron2.utils.events import EventStorage

    finite_steps, history = 0, []
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(max_iterations):
            storage.iter = it
            before = _params(model)
            trainer.run_step()
            after = _params(model)
            moved = sum(not torch.equal(before[k], v) for k, v in after.items())
            overflow = found_inf()
            history.append("inf" if overflow else "ok")
            if overflow:
                assert moved == 0, (it, history)
            else:
                finite_steps += 1
                assert moved > 0, (it, history)
            assert all(torch.isfinite(v).all() for v in after.values()), (it, history)
            if finite_steps >= finite_wanted:
                break
    assert finite_steps >= finite_wanted, history


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
    scaler = trainer.controller.loss_scaler
    assert scaler is not None
    scales = [scaler.scale]

    def found_inf() -> bool:  # the engine's scaler backs off exactly when it skipped the step
        inf = bool(trainer.last_result.found_inf)
        scales.append(scaler.scale)
        assert (scales[-1] < scales[-2]) == inf, scales
        return inf

    _check_steps(trainer, model, found_inf)
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
