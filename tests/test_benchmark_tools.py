"""Smoke runs of the benchmark tools (tools/benchmark_backward.py, tools/benchmark_step.py,
tools/gpu_check.sh) at tiny sizes: the tables' rows and columns, not their timings."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["method", "ms min", "ms med", "x min", "x med", "cpu x", "disp"]


def _run(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _tables(stdout):
    """``[(header line, {row: cells})]`` of every table in the output."""
    tables, lines = [], stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("method ") and i + 1 < len(lines) and set(lines[i + 1]) == {"-"}:
            rows = {}
            for row in lines[i + 2:]:
                cells = row.split()
                if not cells or cells[0] in ("WARNING:", "run", "memory", "max"):
                    break
                rows[cells[0]] = cells[1:]
            tables.append((line, rows))
    return tables


def test_benchmark_backward_quick_two_runs():
    methods = ["plain", "floor", "pcgrad:parameter", "mgda:representation", "sta", "ista"]
    out = _run("tools/benchmark_backward.py", "--quick", "--batch", "2", "--size", "32",
               "--rounds", "2", "--repeat-runs", "2", "--methods", *methods)
    tables = _tables(out)
    assert len(tables) == 3  # run 1, run 2, and the differences
    for header, rows in tables[:2]:
        for col in COLUMNS:
            assert col in header
        assert list(rows) == methods
        assert all(len(cells) == len(COLUMNS) - 1 for cells in rows.values())
        assert rows["plain"][2:4] == ["1.00", "1.00"]  # the reference's own ratios
    header, diffs = tables[2]
    assert "d x min" in header and list(diffs) == methods
    assert "every 'x min' within +-0.03" in out


def test_benchmark_backward_quick_rejects_unknown_method_and_profiles():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = subprocess.run([sys.executable, "tools/benchmark_backward.py", "--quick", "--methods",
                          "nope:parameter"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--methods" in bad.stderr and "nope:parameter" in bad.stderr
    out = _run("tools/benchmark_backward.py", "--quick", "--batch", "2", "--size", "32",
               "--profile", "pcgrad:parameter")
    assert "Self CPU" in out and "aten::" in out


@pytest.mark.parametrize("framework", ["d2", "mmseg"])
def test_benchmark_step_one_round_every_row(framework, tmp_path):
    pytest.importorskip("detectron2" if framework == "d2" else "mmseg")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from benchmark_step import FRAMEWORK_ROWS
    finally:
        sys.path.remove(str(ROOT / "tools"))
    out = _run("tools/benchmark_step.py", "--frameworks", framework, "--rounds", "1",
               "--steps", "1", "--warmup", "0", "--mmseg-batch", "2", "--no-memory",
               "--data-root", str(tmp_path / "shapes"))
    (header, rows), = _tables(out)
    for col in COLUMNS + ["target", "pass"]:
        assert col in header
    assert list(rows) == FRAMEWORK_ROWS[framework]
    assert rows["upstream"][-2:] == ["reference", "-"]
    assert rows["floor"][-2:] == ["floor", "-"]
    assert rows["ft"][-2] == "<=1.03" and rows["mgda:representation"][-2] == "<=1.25"
    floor = float(rows["floor"][2])
    assert rows["pcgrad:parameter"][-2] == f"<={floor + 0.05:.2f}"
    assert all(cells[-1] in ("pass", "FAIL", "-") for cells in rows.values())


def test_benchmark_step_memory_column(tmp_path):
    pytest.importorskip("mmseg")
    out = _run("tools/benchmark_step.py", "--frameworks", "mmseg", "--rows", "ft", "--rounds",
               "1", "--steps", "1", "--warmup", "0", "--mmseg-batch", "2",
               "--data-root", str(tmp_path / "shapes"))
    (header, rows), = _tables(out)
    assert "peak MiB" in header and "vs up" in header
    assert list(rows) == ["upstream", "ft"]
    assert float(rows["upstream"][-2]) > 0 and rows["upstream"][-1] == "+0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_and_fails(tmp_path):
    report = tmp_path / "report.md"
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", "tools/gpu_check.sh", str(report)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr and "no CUDA device" in report.read_text()
