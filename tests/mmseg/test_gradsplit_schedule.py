"""Paper 000's GradSplit training protocol (§4.1) in
``configs/mmseg/synthetic/gradsplit_paper_protocol_r50gn.py``: lr 1e-3, batch 64, linear
warm-up for 3 epochs, then 10 cosine annealing cycles over 100 epochs, 1000 major iterations
(one batch per task) per epoch; the learning rate read from MMEngine's own schedulers."""
import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

import mtl_plugins.mmseg  # noqa: F401

CONFIG = (Path(__file__).resolve().parents[2] / "configs" / "mmseg" / "synthetic" /
          "gradsplit_paper_protocol_r50gn.py")


def test_paper_protocol_settings():
    cfg = Config.fromfile(str(CONFIG))
    assert cfg.optim_wrapper.optimizer.lr == 1e-3
    assert cfg.train_dataloader.batch_size == 64 == cfg.train_dataloader.sampler.batch_size
    assert cfg.train_dataloader.sampler.type == "MultiDatasetSampler"  # round robin
    datasets = cfg.train_dataloader.dataset.datasets
    assert [d.tasks for d in datasets] == [["seg"], ["depth"], ["normal"]]  # one task each
    gs = cfg.optim_wrapper.mtl.gradsplit
    assert gs.modules == ["backbone.layer4.*"] and gs.separate_optimizers is True
    assert cfg.model.backbone.depth == 50 and cfg.model.backbone.norm_cfg.type == "GN"
    # 103 epochs of 1000 major iterations of T = 3 single-task batches
    assert cfg.train_cfg.max_iters == 103 * 1000 * 3


def test_lr_from_mmengine_schedulers_at_warmup_end_and_cycle_boundaries():
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS

    cfg = Config.fromfile(str(CONFIG))
    epoch = 3000  # optimizer steps per epoch: 1000 major iterations x 3 tasks
    warm, cycle, base = 3 * epoch, 10 * epoch, 1e-3
    p = torch.nn.Parameter(torch.zeros(1))
    wrapper = OptimWrapper(torch.optim.Adam([p], lr=cfg.optim_wrapper.optimizer.lr))
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper))
                  for s in cfg.param_scheduler]
    checks = {0: base * 1e-3,                 # warm-up starts at 1e-3 x the rate
              warm // 2: None,                 # (linear: checked below)
              warm: base,                      # warm-up end: the paper's 0.001
              warm + cycle // 2: base / 2,     # half-way down the first cosine cycle
              warm + cycle - 1: None,          # end of cycle 1: near the floor
              warm + cycle: base,              # restart: cycle 2 starts at 0.001 again
              warm + 2 * cycle: base}          # and cycle 3
    got = {}
    last = max(checks)
    for it in range(last + 1):
        if it in checks:
            got[it] = wrapper.param_groups[0]["lr"]
        for s in schedulers:
            s.step()
    for it, want in checks.items():
        if want is not None:
            assert got[it] == pytest.approx(want, rel=1e-6, abs=1e-12), it
    # linear in the step, reaching the base rate on the last warm-up step (MMEngine's LinearLR)
    half = base * (1e-3 + (1 - 1e-3) * (warm // 2) / (warm - 1))
    assert got[warm // 2] == pytest.approx(half, rel=1e-6)
    floor = base * 0.5 * (1 + math.cos(math.pi * (cycle - 1) / cycle))
    assert got[warm + cycle - 1] == pytest.approx(floor, rel=1e-3)
    assert got[warm + cycle - 1] < 1e-10


def test_table4_dropgrad_protocol_config():
    cfg = Config.fromfile(str(CONFIG.with_name("dropgrad_paper_protocol_r18gn.py")))
    assert cfg.model.backbone.depth == 18 and cfg.model.backbone.norm_cfg.type == "GN"
    gs = cfg.optim_wrapper.mtl.gradsplit
    assert gs.drop_rate == 0.5 and "relation" not in gs  # Table 4: DropGrad (p=0.50)
    base = Config.fromfile(str(CONFIG))
    assert cfg.param_scheduler == base.param_scheduler
    assert cfg.train_cfg.max_iters == base.train_cfg.max_iters
