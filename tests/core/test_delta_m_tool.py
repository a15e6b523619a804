"""tools/delta_m.py: Δm between two runs' result files of either framework."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import delta_m as tool  # noqa: E402


def test_detectron2_results_and_metrics_log(tmp_path):
    ft = tmp_path / "ft.json"
    ft.write_text(json.dumps({"bbox": {"AP": 38.0, "AP50": 58.0}, "segm": {"AP": 34.0}}))
    sta_log = tmp_path / "metrics.json"
    sta_log.write_text("\n".join(json.dumps(r) for r in [
        {"iteration": 10, "total_loss": 1.0},
        {"iteration": 20, "bbox/AP": 38.5, "bbox/AP50": 58.4, "segm/AP": 34.6}]))
    assert tool.load_results(sta_log) == {"detection": {"AP": 38.5, "AP50": 58.4},
                                          "mask": {"AP": 34.6}}
    # paper 001's raw-difference ΔMTL over the two APs: ((38.5-38) + (34.6-34)) / 2 = 0.55
    out = tool.main([str(sta_log), str(ft), "--variant", "raw_diff",
                     "--select", "detection=AP", "mask=AP"])
    assert "Δm = +0.55" in out


def test_mmseg_dump_main_metric(tmp_path):
    a, b = tmp_path / "mtl.json", tmp_path / "stl.json"
    a.write_text(json.dumps({"seg": {"mIoU": 44.0}, "depth": {"abs_err": 0.5}}))
    b.write_text(json.dumps({"seg": {"mIoU": 40.0}, "depth": {"abs_err": 0.55}}))
    out = tool.main([str(a), str(b), "--main", "seg=mIoU", "depth=abs_err"])
    assert f"Δm = +{(10 + 100 * 0.05 / 0.55) / 2:.2f} %" in out


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "log.json"
    bad.write_text('{"iteration": 1}\n{"iteration": 2}\n')
    with pytest.raises(Exception, match="no evaluation row"):
        tool.load_results(bad)
