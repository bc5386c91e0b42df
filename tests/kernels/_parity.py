"""Helpers shared by the parity tests of the Triton patch embedding and global-to-local projection
(DESIGN.md §4): the op modules, the device and the NaN-prefilled buffers."""
from __future__ import annotations

import importlib

import pytest
import torch

from megabyte_kernels import _kernel_utils as ku
from tests._device import DEVICE, needs_triton_path  # noqa: F401  (re-exported for the op tests)

# the package re-exports the functions under the modules' names: fetch the modules themselves
pe_mod = importlib.import_module("megabyte_kernels.patch_embed")
g2l_mod = importlib.import_module("megabyte_kernels.global_to_local")


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch):
    """Every buffer the Triton path allocates starts as NaN: each element must be written.

    Autouse in the test modules that import it."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(ku, "alloc", alloc)

