"""mtl_plugins: multi-task learning methods for Detectron2 and MMSegmentation.

detectron2 is not on the package registries, so it cannot be a requirement here: see
README.md ("How detectron2 and mmcv get in") and tools/install.sh.
"""
from setuptools import find_packages, setup

setup(
    name="mtl_plugins",
    version="0.1.0",
    description="Multi-task learning (task allocation, loss balancing, gradient surgery, "
    "GradSplit, Maximum Roaming, Recon) for Detectron2 and MMSegmentation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=("mtl_plugins", "mtl_plugins.*")),
    # the C source of the CPU Gramian kernel, compiled at first use (c_gramian.py)
    package_data={"mtl_plugins.core.aggregation": ["gramian.c"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.0", "numpy", "scipy"],
    extras_require={
        "mmseg": ["mmengine>=0.10,<0.11", "mmcv>=2.0.0rc4,<2.2.0", "mmsegmentation>=1.2,<1.3",
                  "ftfy", "regex", "matplotlib"],
        # detectron2 itself comes from its repository or tools/install_detectron2.py
        "d2": ["torchvision", "fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.10", "pycocotools>=2.0.2",
               "cityscapesscripts", "omegaconf>=2.1", "hydra-core>=1.1", "yacs>=0.1.8"],
        "test": ["pytest>=7", "pytest-timeout"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
