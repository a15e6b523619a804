"""mmseg's own tools/train.py and tools/test.py (unmodified, from the installed package) on
the synthetic multi-task configs: training, checkpointing the MTL state, --resume, testing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtl_plugins.mmseg  # noqa: F401  (safe globals for torch.load of mmengine checkpoints)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "mmseg" / "synthetic"
SMALL = ["train_dataloader.batch_size=4", "train_dataloader.dataset.num_samples=16",
         "val_dataloader.batch_size=4", "val_dataloader.dataset.num_samples=8",
         "test_dataloader.batch_size=4", "test_dataloader.dataset.num_samples=8",
         "default_hooks.logger.interval=1", "custom_hooks.0.log_interval=1"]


def _tool(name: str) -> str:
    import mmseg

    return str(Path(mmseg.__file__).parent / ".mim" / "tools" / name)


#: the launch tests' sitecustomize (skips the runner's log-only environment report and config
#: pretty-printing, see there)
LAUNCH = Path(__file__).resolve().parent / "launch"


def _run(args, cwd: Path) -> str:
    path = os.pathsep.join([str(LAUNCH), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    return log


def _scalars(work: Path):
    files = sorted(work.glob("*/vis_data/scalars.json"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def test_train_resume_and_test_ista_uncertainty(tmp_path):
    cfg = str(CONFIGS / "mtl_ista_uncertainty.py")
    work = tmp_path / "ista"
    opts = ["train_cfg.max_iters=3", "train_cfg.val_interval=3",
            "default_hooks.checkpoint.interval=3"] + SMALL
    _run([_tool("train.py"), cfg, "--work-dir", str(work), "--cfg-options", *opts], tmp_path)
    ckpt = torch.load(work / "iter_3.pth", map_location="cpu", weights_only=True)
    mtl = ckpt["optimizer"]["mtl"]
    assert mtl["balancer.log_vars"].shape == (3,)
    assert not torch.equal(mtl["balancer.log_vars"], torch.zeros(3))
    assert mtl["_extra_state"]["allocator"]["mode"] == "ista"
    rows = _scalars(work)
    # ISTA: 3 tasks, k = 1 -> one optimizer step per task per batch; every step logged
    assert [r["step"] for r in rows if "loss" in r][:3] == [1, 2, 3]
    assert any("mtl_weight/seg" in r for r in rows)

    # resume to 6 iterations from the checkpoint (torch's weights_only loading)
    opts6 = ["train_cfg.max_iters=6", "train_cfg.val_interval=6",
             "default_hooks.checkpoint.interval=3"] + SMALL
    log = _run([_tool("train.py"), cfg, "--work-dir", str(work), "--resume",
                "--cfg-options", *opts6], tmp_path)
    assert "resumed" in log.lower() and "iter: 3" in log
    ckpt6 = torch.load(work / "iter_6.pth", map_location="cpu", weights_only=True)
    assert ckpt6["meta"]["iter"] == 6
    assert not torch.equal(ckpt6["optimizer"]["mtl"]["balancer.log_vars"], mtl["balancer.log_vars"])

    dump = tmp_path / "metrics.json"
    log = _run([_tool("test.py"), cfg, str(work / "iter_6.pth"), "--work-dir", str(work),
                "--cfg-options", f"test_evaluator.dump_file={dump}", *SMALL], tmp_path)
    metrics = json.loads(dump.read_text())
    assert set(metrics) == {"seg", "depth", "normal"}
    assert 0 <= metrics["seg"]["mIoU"] <= 100 and metrics["depth"]["abs_err"] > 0
    assert 0 <= metrics["normal"]["mean"] <= 180


def test_train_sta_pcgrad_logs_gradient_cosines(tmp_path):
    work = tmp_path / "sta"
    opts = ["train_cfg.max_iters=2", "train_cfg.val_interval=100",
            "default_hooks.checkpoint.interval=2"] + SMALL
    _run([_tool("train.py"), str(CONFIGS / "mtl_sta_pcgrad.py"), "--work-dir", str(work),
          "--cfg-options", *opts], tmp_path)
    rows = _scalars(work)
    cos = [k for r in rows for k in r if k.startswith("mtl_cos/")]
    assert cos, rows
    assert all(-1.0 <= r[k] <= 1.0 for r in rows for k in r if k.startswith("mtl_cos/"))
