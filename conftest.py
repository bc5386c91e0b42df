"""Root pytest configuration.

Without a CUDA device, Triton kernels run on CPU tensors in Triton's interpreter
(DESIGN.md §4): ``TRITON_INTERPRET`` is read at kernel launch, so setting it here, before any
test runs, is enough. Tests marked ``gpu`` are skipped without a CUDA device.

``MEGABYTE_PIN_CONFIGS=1`` pins every autotuned kernel to the first config of its list while
the tests run: no tuning time, and the program a test checks is the same on every run.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MEGABYTE_PIN_CONFIGS", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (GPU tier, DESIGN.md §4)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
