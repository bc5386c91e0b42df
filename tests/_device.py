"""The one place every Triton-path test takes its device from (DESIGN.md §4).

On a CUDA machine the interpreter is off (the root conftest leaves ``TRITON_INTERPRET`` unset)
and the Triton tests run on CUDA tensors; elsewhere they run on CPU tensors in Triton's
interpreter. With neither (``TRITON_INTERPRET=0`` on a CPU machine, or no triton package) they
skip: a test that built CPU tensors for ``backend="triton"`` would fail with "needs CUDA
tensors" on a GPU machine, so no test builds its own device.
"""
from __future__ import annotations

import pytest
import torch

from megabyte_kernels.backends import interpreting, triton_available

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_RUNS = triton_available() and (HAS_CUDA or interpreting())

needs_triton_path = pytest.mark.skipif(
    not TRITON_RUNS, reason="the Triton path needs CUDA or TRITON_INTERPRET=1 (and the triton package)")
