"""Smoke runs of the benchmark tools (tools/benchmark_backward.py, tools/benchmark_step.py,
tools/gpu_check.sh) at tiny sizes: the tables' rows and columns, not their timings."""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: torch.compile's CPU backend (the fused Gramian kernel) needs a C++ compiler
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
COLUMNS = ["method", "ms min", "ms med", "x min", "x med", "ci95", "cpu x", "disp"]


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
                if not cells or cells[0] in ("WARNING:", "run", "memory", "max", "'x"):
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
    assert "every 'x med' within +-0.03" in out and "max |d x min|" in out
    assert "'x med' differences beyond the runs' combined 95 % intervals" in out


def test_benchmark_backward_quick_rejects_unknown_method_and_profiles():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = subprocess.run([sys.executable, "tools/benchmark_backward.py", "--quick", "--methods",
                          "nope:parameter"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--methods" in bad.stderr and "nope:parameter" in bad.stderr
    out = _run("tools/benchmark_backward.py", "--quick", "--batch", "2", "--size", "32",
               "--profile", "pcgrad:parameter")
    assert "Self CPU" in out and "aten::" in out


def test_benchmark_backward_pieces_table_adds_up():
    """``--pieces``: one row per piece of parameter-level work above the floor, as ms and as a
    fraction of the plain step, and a last row that is the sum of the three the engine does."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from benchmark_backward import Bench, engine_pieces, format_pieces
    finally:
        sys.path.remove(str(ROOT / "tools"))
    pieces = engine_pieces(Bench(2, 32, "cpu"), rounds=2)
    from mtl_plugins.core.aggregation import c_gramian

    c_row = [] if c_gramian.unavailable() else ["C exact Gramian"]  # needs a C compiler
    fused_row = ["fused exact Gramian"] if HAS_CXX else []  # torch.compile's CPU backend
    rows_rows = [] if c_gramian.unavailable() else ["task rows: C Gramian", "task rows: w @ G"]
    assert list(pieces) == ["plain step", "write of G", "exact Gramian", *c_row,
                            "w @ G into row 0", *fused_row, *rows_rows, "float32 Gramian"]
    assert all(v > 0 for v in pieces.values())
    lines = format_pieces(pieces)
    rows = {line[:28].strip(): line[28:].split() for line in lines[2:]}
    added = ("write of G", "exact Gramian", "w @ G into row 0")
    total = sum(pieces[k] for k in added)
    assert float(rows["engine above the floor"][0]) == pytest.approx(total * 1e3, abs=0.01)
    assert float(rows["exact Gramian"][1]) == pytest.approx(
        pieces["exact Gramian"] / pieces["plain step"], abs=1e-3)
    for kernel in ("C", "fused"):
        if f"{kernel} exact Gramian" in pieces:
            with_kernel = total - pieces["exact Gramian"] + pieces[f"{kernel} exact Gramian"]
            assert float(rows[f"... with the {kernel} kernel"][0]) == pytest.approx(
                with_kernel * 1e3, abs=0.01)
    if rows_rows:
        assert float(rows["... on the task rows"][0]) == pytest.approx(
            (pieces["task rows: C Gramian"] + pieces["task rows: w @ G"]) * 1e3, abs=0.01)


def test_tensor_peak_is_the_most_bytes_tensors_held_at_once():
    """By hand: 4 MiB kept from the build, then per step 8 MiB freed before 4 MiB more is
    made: 12 MiB at once, in every step alike (a held tensor made before the profile would
    not be seen: the build is inside it)."""
    bb = _bb()

    def build():
        kept = torch.zeros(1 << 20)

        def step():
            a = torch.ones(2 << 20)
            del a
            b = torch.ones(1 << 20)
            return kept[0] + b[0]
        return step

    assert bb.tensor_peak_mib(build, steps=3) == pytest.approx(12.0, abs=0.01)


def test_memory_cells_by_hand():
    """Each non-empty column's value and its difference from the reference row; tensor
    peaks to 0.1 MiB, the peak RSS to 1 MiB."""
    bb = _bb()
    cells, header = bb.memory_cells({"peak MiB": {"plain": 800.4, "m": 830.6},
                                     "tensor MiB": {"plain": 68.66, "m": 98.61},
                                     "other MiB": {}}, "plain", "plain")
    assert header == ["peak MiB", "vs plain", "tensor MiB", "vs plain"]
    assert cells == {"plain": ["800", "+0", "68.7", "+0.0"],
                     "m": ["831", "+30", "98.6", "+30.0"]}


def test_benchmark_backward_memory_columns_and_the_budget():
    """``--memory`` on a CPU: the peak RSS and the tensors' peak of each row beside the plain
    step's. The tensors' peak is exact, so the memory budget is checked here: the parameter
    level (task rows, and G with the BLAS Gramian) holds no more than the plain step plus the
    T task gradients at this size; the batched VJPs' graph does not fit it."""
    methods = ["plain", "pcgrad:parameter", "pcgrad:parameter:blas", "mgda:representation",
               "pcgrad:parameter:batched"]
    out = _run("tools/benchmark_backward.py", "--quick", "--rounds", "1", "--memory",
               "--methods", *methods)
    (header, rows), = _tables(out)
    assert header.split()[-8:] == ["peak", "MiB", "vs", "plain", "tensor", "MiB", "vs", "plain"]
    assert list(rows) == methods and rows["plain"][-4:] == [rows["plain"][-4], "+0",
                                                          rows["plain"][-2], "+0.0"]
    budget = float(out.split("tensors: ")[1].split()[0])
    plain = float(rows["plain"][-2])
    grads = budget - plain
    assert grads == pytest.approx(31.8, abs=0.11)  # 3 tasks x 2.78 M shared float32 (rounded)
    for m in methods[1:-1]:
        assert plain <= float(rows[m][-2]) <= budget, m
    assert float(rows["pcgrad:parameter:batched"][-2]) > budget


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
    floor = float(rows["floor"][3])  # x med: the targets use the paired median
    assert rows["pcgrad:parameter"][-2] == f"<={floor + 0.05:.2f}"
    assert rows["pcgrad:parameter:blas"][-2] == f"<={floor + 0.05:.2f}"
    assert rows["pcgrad:parameter:fused"][-2] == f"<={floor + 0.05:.2f}"
    assert all(cells[-1] in ("pass", "FAIL", "-") for cells in rows.values())


def test_benchmark_step_memory_column(tmp_path):
    pytest.importorskip("mmseg")
    out = _run("tools/benchmark_step.py", "--frameworks", "mmseg", "--rows", "ft", "--rounds",
               "1", "--steps", "1", "--warmup", "0", "--mmseg-batch", "2",
               "--data-root", str(tmp_path / "shapes"), "--memory-jobs", "2")
    (header, rows), = _tables(out)
    assert "peak MiB" in header and "vs up" in header and "tensor MiB" in header
    assert list(rows) == ["upstream", "ft"]
    assert float(rows["upstream"][-4]) > 0 and rows["upstream"][-3] == "+0"
    assert float(rows["upstream"][-2]) > 0 and rows["upstream"][-1] == "+0.0"
    assert abs(float(rows["ft"][-1])) <= 0.5  # full-task allocation holds no task gradient


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_and_fails(tmp_path):
    report = tmp_path / "report.md"
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", "tools/gpu_check.sh", str(report)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no CUDA device" in out.stderr and "no CUDA device" in report.read_text()


def _bb():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import benchmark_backward as bb
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return bb


def test_statistics_and_busy_warnings_by_hand():
    bb = _bb()
    # plain: fastest block 1.0, median 1.2 (> 1.15 x min: busy); its CPU time 1.0 each block.
    # m's blocks sat between plain blocks averaging 1.1, 1.2 and 2.0 (wall), 1.0 (CPU)
    samples = {"plain": bb.Samples(wall=[1.0, 1.2, 2.0], cpu=[1.0, 1.0, 1.0],
                                   pair_wall=[1.0, 1.2, 2.0], pair_cpu=[1.0, 1.0, 1.0]),
               "m": bb.Samples(wall=[2.2, 2.0, 3.0], cpu=[1.9, 1.8, 1.8],
                               pair_wall=[1.1, 1.2, 2.0], pair_cpu=[1.0, 1.0, 0.9])}
    stats = bb.summarize(samples, "plain")
    m = stats["m"]
    assert m.ratio_min == pytest.approx(2.0)  # 2.0 / 1.0
    # paired ratios 2.2/1.1, 2.0/1.2, 3.0/2.0 = 2.0, 5/3, 1.5: median 5/3
    assert m.ratio_med == pytest.approx(5 / 3)
    # inclusive quartiles of (1.5, 5/3, 2.0): (1.5 + 5/3) / 2 and (5/3 + 2.0) / 2
    assert m.dispersion == pytest.approx(((5 / 3 + 2.0) / 2 - (1.5 + 5 / 3) / 2) / (5 / 3))
    assert m.cpu_ratio == pytest.approx(1.9)  # median of 1.9, 1.8, 2.0
    assert m.ms_min == pytest.approx(2000.0) and m.ms_med == pytest.approx(2200.0)
    assert stats["plain"].wall_over_cpu == pytest.approx(1.2)
    assert stats["plain"].ratio_med == 1.0 and stats["plain"].ratio_min == 1.0
    warnings = bb.busy_warnings(stats, "plain", "thread", "cpu")
    assert len(warnings) == 3  # median/min 1.2 > 1.15; m's dispersion 0.15 > 0.10; wall/cpu 1.2
    assert "1.20x its fastest" in warnings[0] and "m 0.15" in warnings[1]
    assert "waited for a core" in warnings[2]
    assert bb.busy_warnings(stats, "plain", "process", "cuda")[:2] == warnings[:2]
    ones = [1.0, 1.0]
    quiet = bb.summarize({"plain": bb.Samples(ones, ones, ones, ones),
                          "m": bb.Samples([2.0, 2.02], [2.0, 2.0], ones, ones)}, "plain")
    assert bb.busy_warnings(quiet, "plain", "thread", "cpu") == []
    # two runs: x med 2.01 then 2.03 agrees to +-0.03; 2.01 then 2.05 does not, whatever x min
    one = [1.0]
    later = bb.summarize({"plain": bb.Samples(one, one, one, one),
                          "m": bb.Samples([2.03], [2.0], one, one)}, "plain")
    lines = bb.compare_runs([quiet, later])
    assert "+0.020" in lines[-4] and lines[-1].endswith("yes")
    assert lines[-3].endswith("intervals (sqrt(ci1^2 + ci2^2)): none")  # one block: no interval
    assert lines[-2].startswith("max |d x min| = 0.030")
    later = bb.summarize({"plain": bb.Samples(one, one, one, one),
                          "m": bb.Samples([2.05], [2.0], one, one)}, "plain")
    assert bb.compare_runs([quiet, later])[-1].endswith("NO")


def test_median_interval_and_run_shift_by_hand():
    """``ci95``: half the distance between the order statistics whose ranks are nearest to
    (n - 1.96 sqrt(n)) / 2 and 1 + (n + 1.96 sqrt(n)) / 2 (n = 30: ranks 10 and 21, the
    exact binomial interval's, 95.7 %); compare_runs names the rows whose two medians differ
    by more than both runs' intervals together."""
    bb = _bb()
    assert bb.median_ci([float(v) for v in range(1, 31)]) == 5.5  # ranks 10 and 21 of 1..30
    assert bb.median_ci([float(v) for v in range(1, 121)]) == 11.5  # ranks 49 and 72
    assert bb.median_ci([3.0, 1.0, 2.0]) == 1.0  # ranks clamp to 1 and 3
    assert math.isnan(bb.median_ci([1.0]))

    def run(m_ratios):
        n = len(m_ratios)
        ones = [1.0] * n
        return bb.summarize({"plain": bb.Samples(ones, ones, ones, ones),
                             "m": bb.Samples(list(m_ratios), ones, ones, ones)}, "plain")

    base = run([2.0 + 0.01 * (i % 5) for i in range(20)])  # median 2.02, ci95 0.01
    assert base["m"].ratio_ci == pytest.approx(0.01)
    near = run([2.01 + 0.01 * (i % 5) for i in range(20)])  # +0.01: within sqrt(2) * 0.01
    far = run([2.05 + 0.01 * (i % 5) for i in range(20)])  # +0.05: the machine moved
    assert bb.compare_runs([base, near])[-3].endswith(": none")
    assert bb.compare_runs([base, far])[-3].endswith(": m")


def test_measure_pairs_every_block_with_the_reference_around_it():
    """Each round runs ``R m1 R m2 ... R`` (methods shuffled); a method's pair is the mean of
    the reference blocks just before and after it."""
    bb = _bb()
    calls = []
    clock = iter(range(1000))  # every block takes one tick more than the previous one
    steps = {n: (lambda n=n: calls.append(n)) for n in ("plain", "a", "b")}
    bb.time.perf_counter, real = (lambda: float(next(clock))), bb.time.perf_counter
    try:
        out = bb.measure(steps, rounds=2, block=1, warmup=0, seed=0, device="cpu",
                         reference="plain", progress=False)
    finally:
        bb.time.perf_counter = real
    assert len(calls) == 10
    for r in range(2):
        seq = calls[5 * r:5 * r + 5]
        assert seq[0::2] == ["plain"] * 3 and sorted(seq[1::2]) == ["a", "b"]
    assert len(out["plain"].wall) == 6 and len(out["a"].wall) == 2
    # with a clock that ticks once per call, every block lasts 1 tick and every pair is 1
    assert out["a"].pair_wall == [1.0, 1.0] and out["b"].wall == [1.0, 1.0]
