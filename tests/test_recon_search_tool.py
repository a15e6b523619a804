"""tools/recon_search.py --config: the Recon search trained from a detectron2 / mmseg config,
its printed ranking and parameter increase checked against the JSON it wrote and against
``recon_param_increase`` on an independently built model."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

from mtl_plugins.core.structure.recon import recon_param_increase

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\S+)$", re.M)
INCREASE = re.compile(r"parameter increase: \+(\d+) \(\+([\d.]+)% of the (\d+) model parameters\)")
SHARED = re.compile(r"shared parameters turned task-specific: (\d+) of (\d+) \(([\d.]+)%\)")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("recon_search_tool",
                                                  ROOT / "tools" / "recon_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_report(out: str, ranking: dict, model, topk: int, shared_params) -> list:
    """The printed table is the JSON's ranking; the printed increase is recomputed on
    ``model``; the share of θ_sh turned task-specific is counted here from parameter names
    (``shared_params``: θ_sh as the trainer splits it); returns the top-k names."""
    rows = [(int(r), int(s), int(p), m) for r, s, p, m in ROW.findall(out)]
    assert rows == [(i, r["score"], r["params"], r["module"])
                    for i, r in enumerate(ranking["ranking"], 1)]
    top = [r["module"] for r in ranking["ranking"][:topk]]
    inc, pct, total = INCREASE.search(out).groups()
    expected = recon_param_increase(model, top, len(ranking["tasks"]))
    assert int(inc) == expected > 0
    assert int(total) == sum(p.numel() for p in model.parameters())
    assert float(pct) == pytest.approx(100.0 * expected / int(total), abs=0.006)
    # paper 004 (~l. 193) reports both: the model increase and the % of θ_sh converted
    converted = sum(p.numel() for n, p in model.named_parameters()
                    if any(n.startswith(m + ".") for m in top))
    shared = sum(p.numel() for p in shared_params)
    assert ranking["shared_params"] == shared
    got_converted, got_shared, got_pct = SHARED.search(out).groups()
    assert (int(got_converted), int(got_shared)) == (converted, shared)
    assert float(got_pct) == pytest.approx(100.0 * converted / shared, abs=0.006)
    assert 0 < float(got_pct) < 100
    return top


def test_d2_config(tool, tmp_path, monkeypatch, capsys):
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg

    from mtl_plugins.d2 import MTLDefaultTrainer, add_mtl_config

    monkeypatch.setenv("MTL_D2_SYNTHETIC_ROOT", str(tmp_path / "data"))
    work, copy = tmp_path / "search", tmp_path / "ranking.json"
    assert tool.main(["--config", str(ROOT / "configs/d2/mask_rcnn_R_50_FPN_synthetic_cpu.yaml"),
                      "--steps", "2", "--topk", "3", "--S", "0", "--work-dir", str(work),
                      "--json", str(copy), "SEED", "0"]) == 0
    out = capsys.readouterr().out
    ranking = json.loads((work / "recon_ranking.json").read_text())
    assert json.loads(copy.read_text()) == ranking
    assert ranking["iterations"] == 2 and ranking["S"] == 0.0
    assert ranking["tasks"] == ["detection", "mask"]
    cfg = get_cfg()
    add_mtl_config(cfg)
    cfg.merge_from_file(str(work / "config.yaml"))  # written by default_setup: the run's config
    assert cfg.MTL.RECON_SEARCH.ENABLED and cfg.SOLVER.MAX_ITER == 2 and not cfg.DATASETS.TEST
    model = MTLDefaultTrainer.build_model(cfg)
    top = _check_report(out, ranking, model, 3,
                        [p for p in model.backbone.parameters() if p.requires_grad])
    assert f"top-3: {top}" in out
    assert f"MTL.RECON.RANKING {copy} MTL.RECON.TOPK 3" in out


def test_mmseg_config(tool, tmp_path, capsys):
    pytest.importorskip("mmseg")
    from mmengine.config import Config
    from mmseg.registry import MODELS

    work = tmp_path / "search"
    assert tool.main(["--config", str(ROOT / "configs/mmseg/synthetic/mtl_ft.py"),
                      "--steps", "2", "--topk", "2", "--work-dir", str(work),
                      "train_dataloader.batch_size=2", "train_dataloader.dataset.num_samples=4",
                      "default_hooks.checkpoint.interval=100"]) == 0
    out = capsys.readouterr().out
    path = work / "recon_ranking.json"
    ranking = json.loads(path.read_text())
    assert ranking["iterations"] == 2 and ranking["tasks"] == ["seg", "depth", "normal"]
    cfg = Config.fromfile(work / "mtl_ft.py")  # dumped by the Runner: the run's config
    assert cfg.optim_wrapper.mtl.recon_search.S == -0.02 and cfg.val_cfg is None
    assert any(h["type"] == "MTLHook" for h in cfg.custom_hooks)
    model = MODELS.build(cfg.model)
    _check_report(out, ranking, model, 2, list(model.backbone.parameters()))
    assert f"model.recon.ranking={path} model.recon.topk=2" in out


def test_config_errors_name_the_argument(tool, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match=r"--config 'x\.txt': expected a detectron2 \.yaml or an "
                       r"mmseg \.py config"):
        tool.main(["--config", "x.txt"])
    with pytest.raises(SystemExit, match="--config 'missing.py': no such file"):
        tool.main(["--config", "missing.py"])
    with pytest.raises(SystemExit):
        tool.main(["--config", "c.yaml", "--lr", "0.1"])
    assert "--lr: toy-mode option(s), not used with --config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["SOLVER.MAX_ITER", "2"])
    assert "need --config" in capsys.readouterr().err

    config = tmp_path / "c.py"
    config.write_text("")
    monkeypatch.setitem(tool.TRAINERS, ".py",
                        lambda path, args: (None, str(tmp_path / "none.json"), ""))
    with pytest.raises(SystemExit, match=r"did not write its ranking '.*none\.json'"):
        tool.main(["--config", str(config)])
