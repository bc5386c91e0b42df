"""The one pinning switch, ``MEGABYTE_PIN_CONFIGS=1``: every autotuned kernel runs the first
config of its list (the test suite and gpu-check's smoke stage), and none is left out.

Without it the flash-attention autotuners (they had no early prune) tuned ~14 configs cold in
every GPU test. The GPU lists are looked at here without a GPU: the autotuners are built as on
a CUDA machine (interpreter off) and only their pruning is called.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megabyte_kernels import _kernel_utils as ku

ROOT = Path(__file__).resolve().parents[2]


def _early_prune(autotuner):
    prune = autotuner.early_config_prune
    assert prune is not None, f"{autotuner.base_fn.__name__}: no early_config_prune: it would tune every config"
    return prune(autotuner.configs, {})


@pytest.mark.parametrize("kind,kernel", [("fwd", "_flash_fwd_kernel"), ("dkdv", "_flash_bwd_dkdv_kernel"),
                                         ("dq", "_flash_bwd_dq_kernel")])
@pytest.mark.parametrize("block_d,dtype", [(64, torch.bfloat16), (128, torch.float16), (256, torch.bfloat16),
                                           (64, torch.float32)])
def test_flash_autotuners_obey_the_switch(kind, kernel, block_d, dtype, monkeypatch):
    from megabyte_kernels import flash_attention as fa

    for mod in (fa, ku):  # the GPU lists, as on a CUDA machine
        monkeypatch.setattr(mod, "interpreting", lambda: False)
    monkeypatch.setattr(fa, "_TUNED", {})
    tuned = fa._tuned(getattr(fa, kernel), kind, block_d, dtype)
    full = fa.gpu_configs(kind, block_d, dtype)
    assert len(tuned.configs) == len(full) > 1
    monkeypatch.setenv(ku.PIN_CONFIGS_ENV, "1")
    pinned = _early_prune(tuned)
    assert [c.kwargs for c in pinned] == [tuned.configs[0].kwargs]
    monkeypatch.setenv(ku.PIN_CONFIGS_ENV, "0")
    assert len(_early_prune(tuned)) == len(full)


def test_byte_op_autotuners_obey_the_switch(monkeypatch):
    """patch_embed's forward and global_to_local's GEMM prune through the switch, over their
    full GPU lists (the interpreter gives their autotuners one config, so call the pruning)."""
    pe = importlib.import_module("megabyte_kernels.patch_embed")
    g2l = importlib.import_module("megabyte_kernels.global_to_local")
    assert pe._patch_embed_fwd_kernel.early_config_prune is ku.prune_pinned
    assert g2l._g2l_matmul_kernel.early_config_prune is g2l._prune_by_dtype
    both = g2l.MATMUL_CONFIGS_16 + g2l.MATMUL_CONFIGS_32
    bf16 = {"A": torch.empty(4, 4, dtype=torch.bfloat16)}
    monkeypatch.setenv(ku.PIN_CONFIGS_ENV, "1")
    assert ku.prune_pinned(pe.FWD_CONFIGS, {}) == pe.FWD_CONFIGS[:1]
    assert g2l._prune_by_dtype(both, bf16) == g2l.MATMUL_CONFIGS_16[:1]
    monkeypatch.setenv(ku.PIN_CONFIGS_ENV, "0")
    assert ku.prune_pinned(pe.FWD_CONFIGS, {}) == pe.FWD_CONFIGS
    assert g2l._prune_by_dtype(both, bf16) == g2l.MATMUL_CONFIGS_16


def test_the_suite_runs_pinned():
    """The root conftest pins configs for every test (and leaves an explicit setting alone)."""
    assert ku.configs_pinned()


def test_native_tests_stay_out_of_the_gpu_step():
    """gpu-check's stage 2 selects -m "not aot and not native": no native-op test is collected
    (they need ninja and a C++ compiler, which the GPU machine may lack)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "not aot and not native", "tests/kernels/test_native.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 5, proc.stdout[-2000:]  # 5: no test collected
    assert "deselected" in proc.stdout
