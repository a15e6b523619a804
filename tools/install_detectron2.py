"""Install detectron2's Python package from a source release that lacks its C++ sources.

The ``pb1-detectron2==0.6`` source release on PyPI carries FAIR's detectron2 0.6 Python
package, its model-zoo configs, ``projects/`` and ``tools/`` but no ``layers/csrc``, so its
own ``setup.py`` cannot build ``detectron2._C``. This script unpacks it, drops the extension
from ``setup.py``, installs the package without dependencies (the bootstrap installs them
under the project's constraints; ``black==21.4b2`` is a formatting tool, not a runtime
need), copies upstream's ``tools/`` scripts to ``<venv>/share/detectron2/tools`` and
writes ``mtl_plugins_d2_compat.pth`` so that ``import detectron2._C`` resolves to the
placeholder of :mod:`mtl_plugins.compat.detectron2_c` when no compiled extension exists.

Usage: python tools/install_detectron2.py SDIST.tar.gz --python VENV/bin/python
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PTH_NAME = "mtl_plugins_d2_compat.pth"
PTH_LINE = (
    "import importlib.util as _u; _u.find_spec('mtl_plugins') is not None and "
    "__import__('mtl_plugins.compat.detectron2_c', fromlist=['_']).register_finder()\n"
)


def patch_setup(setup_py: Path) -> None:
    """Remove the C++ extension, the build_ext command that compiles it, and ``black``."""
    text = setup_py.read_text()
    for old, new in (
        ("ext_modules=get_extensions(),", "ext_modules=[],"),
        ('cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},', ""),
        # a code formatter pinned to a 2021 beta: not a runtime need, and it breaks `pip check`
        ('"black==21.4b2",', ""),
    ):
        if old not in text:
            raise SystemExit(f"install_detectron2: unexpected setup.py, cannot find {old!r}")
        text = text.replace(old, new)
    setup_py.write_text(text)


def prepare_source(sdist: Path, dest: Path) -> Path:
    """Unpack ``sdist`` into ``dest`` and make it installable without the extension: the
    patched ``setup.py`` (:func:`patch_setup`) and the model-zoo configs where ``setup.py``
    looks for them. Returns the source folder."""
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (src,) = [p for p in dest.iterdir() if p.is_dir()]
    patch_setup(src / "setup.py")
    # The release ships the model-zoo configs inside the package, but setup.py collects them
    # from a top-level configs/ (which it then links into the package): move them there, or
    # the installed model_zoo has no configs.
    zoo_configs = src / "detectron2" / "model_zoo" / "configs"
    if zoo_configs.is_dir() and not (src / "configs").exists():
        zoo_configs.rename(src / "configs")
    return src


def site_packages(python: str) -> Path:
    out = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    )
    return Path(out.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = prepare_source(args.sdist, Path(tmp))
        subprocess.check_call(
            [args.python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", str(src)]
        )
        prefix = Path(subprocess.check_output(
            [args.python, "-c", "import sys; print(sys.prefix)"], text=True).strip())
        tools_dst = prefix / "share" / "detectron2" / "tools"
        if tools_dst.exists():
            shutil.rmtree(tools_dst)
        shutil.copytree(src / "tools", tools_dst)
    (site_packages(args.python) / PTH_NAME).write_text(PTH_LINE)
    print(f"[install] detectron2 0.6 Python package installed; upstream tools in {tools_dst}")


if __name__ == "__main__":
    main()
