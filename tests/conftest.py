"""Suite-wide set-up: two CPU threads and the stack's known warnings silenced."""
import torch

from mtl_plugins.compat.known_warnings import KNOWN_WARNINGS

torch.set_num_threads(2)


def pytest_configure(config):
    # pytest resets warning filters around each test: register them as its own filters
    for category, message in KNOWN_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")
