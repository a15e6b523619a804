"""The installer's pieces that a normal run skips (the mmcv source build's compiler wrapper)."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cxx_wrapper_rewrites_only_the_std_flag(tmp_path):
    fake = tmp_path / "fake_cxx"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    args = ["-O3", "-std=c++17", "a file.cpp", "-DX=1", "-std=c++17"]
    out = subprocess.run([str(ROOT / "tools" / "cxx_std20.sh"), *args], capture_output=True,
                         text=True, check=True, env={**os.environ, "MTL_REAL_CXX": str(fake)})
    assert out.stdout.splitlines() == ["-O3", "-std=c++20", "a file.cpp", "-DX=1", "-std=c++20"]


def test_cxx_wrapper_compiles_cxx20(tmp_path):
    src = tmp_path / "t.cpp"
    src.write_text("#include <span>\nint main(){int a[2]={1,2}; std::span<int> s(a); "
                   "return s.size() == 2 ? 0 : 1;}\n")
    subprocess.run([str(ROOT / "tools" / "cxx_std20.sh"), "-std=c++17", str(src), "-o",
                    str(tmp_path / "t")], check=True)
    assert subprocess.run([str(tmp_path / "t")]).returncode == 0
