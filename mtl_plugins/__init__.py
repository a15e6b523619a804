"""mtl_plugins: multi-task learning methods for Detectron2 and MMSegmentation.

``mtl_plugins.core`` holds every algorithm in pure PyTorch; ``mtl_plugins.mmseg`` and
``mtl_plugins.d2`` register them with each framework. Importing this package imports
nothing heavy.
"""
__version__ = "0.1.0"
