"""Tier 3 (DESIGN.md §4): the kernels compiled ahead of time for sm_90 and sm_80, without a GPU.

Each kernel is compiled at the config the test suite and gpu-check's smoke stage run (the first
of its autotune list, ``MEGABYTE_PIN_CONFIGS=1``), the way a real launch at a typical shape
compiles it (Triton's launch-time specialization: tests/aot.py; the shapes:
benchmarks/aot_table.py), freshly (an empty Triton cache), in subprocesses without
``TRITON_INTERPRET``: for sm_90 in bf16 and fp32, for sm_80 in fp16 (Ampere's type rules).

Checked: every compile succeeds and fits the per-block shared memory; on sm_90 every pinned
16-bit config is spill-free and every ``tl.dot`` kernel at head dim <= 128 runs on wgmma; and the
sm_90 figures equal the committed table ``benchmarks/results/aot-sm90.json`` (every config of
every list, made by ``make aot-table``), so a kernel or a config list changed without
regenerating the table fails here.
"""
from __future__ import annotations

import json
import os

import pytest

from benchmarks.aot_table import TABLE, compile_all, table_cases

pytestmark = pytest.mark.aot

# The most shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): 227 KB on
# H100/H200, 163 KB on A100 (the per-SM capacities, 228 and 164 KB, are 1 KB more).
SMEM_LIMIT = {90: 232448, 80: 166912}

# Kernels built on tl.dot, and where their head dim is (None: no head dim, always <= 128).
DOT_KERNELS = {
    "megabyte_kernels.flash_attention:_flash_fwd_kernel": "BLOCK_D",
    "megabyte_kernels.flash_attention:_flash_bwd_dkdv_kernel": "BLOCK_D",
    "megabyte_kernels.flash_attention:_flash_bwd_dq_kernel": "BLOCK_D",
    "megabyte_kernels.local_attention:_local_fwd_kernel": "BLOCK_D",
    "megabyte_kernels.local_attention:_local_bwd_kernel": "BLOCK_D",
    "megabyte_kernels._kernel_utils:_onehot_grad_kernel": None,
    "megabyte_kernels.global_to_local:_g2l_matmul_kernel": None,
    "megabyte_kernels.global_to_local:_atb_kernel": None,
}
# Pinned 16-bit sm_90 dot kernels at head dim <= 128 allowed to use mma.sync, with the reason.
_LOCAL_TILES = ("the packed local attention steps through 32-row tiles (local_attention.tile_rows_target(): "
                "a memory-bound kernel, sized for several programs per SM and a quarter of each score tile "
                "used, not a sixteenth): below wgmma's 64 rows its dots run on mma.sync by design")
_LOCAL_KERNELS = ("megabyte_kernels.local_attention:_local_fwd_kernel", "megabyte_kernels.local_attention:_local_bwd_kernel")


def wgmma_exception(case: dict) -> str | None:
    """Why a pinned case may use mma.sync, or None."""
    a = case["args"]
    if case["kernel"] in _LOCAL_KERNELS and min(a["BLOCK_Q"], a["BLOCK_KV"]) < 64:
        return _LOCAL_TILES
    return None


# The figures a fresh compile must reproduce from the committed table.
COMPARED = ("regs", "spill_stores", "spill_loads", "shared", "wgmma", "mma_sync", "ptx_sha")
REGENERATE = "run `make aot-table` (python -m benchmarks.aot_table) and commit benchmarks/results/aot-sm90.*"


def _pinned_cases() -> list[dict]:
    """The pinned configs: sm_90 in bf16 and fp32, sm_80 in fp16 (not fp32 there: its IEEE dots
    compile to the same FMA code on both, at 5-30 s a compile)."""
    return (table_cases(pinned_only=True, dtypes=("bf16", "fp32"), arch=90)
            + table_cases(pinned_only=True, dtypes=("fp16",), arch=80))


@pytest.fixture(scope="module")
def compiled():
    """(case, result) of every pinned config, compiled in two subprocesses side by side."""
    cases = _pinned_cases()
    pairs = list(zip(cases, compile_all(cases, workers=2, progress=False)))
    print()  # the figures, for `make aot` (pytest -s)
    for c, r in pairs:
        figures = (f"regs {r['regs']:>3}  spill {r['spill_stores']:>5} B  shared {r['shared']:>6} B  "
                   f"wgmma {r['wgmma']!s:<5}  mma.sync {r['mma_sync']}" if r["ok"] else "FAILED")
        print(f"  {_label(c):<58} {figures}")
    return pairs


@pytest.fixture(scope="module")
def table():
    """The committed table, by case name."""
    if not os.path.exists(TABLE):
        pytest.fail(f"{TABLE} is missing: {REGENERATE}")
    with open(TABLE) as f:
        data = json.load(f)
    return data["meta"], {r["name"]: r for r in data["rows"]}


def _label(case):
    return f"sm_{case['arch']} {case['name']}"


def _head_dim(case):
    key = DOT_KERNELS[case["kernel"]]
    return case["args"][key] if key else 0


def test_every_pinned_config_compiles(compiled):
    failed = [f"{_label(c)}: {r['error'][-600:]}" for c, r in compiled if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_launch_specialization_is_applied(compiled):
    """The compiles carry the launch's attributes: aligned pointers and ints divisible by 16 marked,
    the id stride 1 of contiguous ids a constexpr; and the flash forward pipelines with cp.async
    (without the attributes it does not, and has half the shared memory)."""
    by_name = {c["name"]: r for c, r in compiled if c["arch"] == 90}
    fwd = next(r for n, r in by_name.items() if n.startswith("flash_fwd bf16 d=128 #0"))
    assert {"Q", "K", "V", "O", "LSE", "N", "D"} <= set(fwd["attrs"]), fwd["attrs"]
    assert fwd["cp_async"], "the specialized flash forward must use cp.async"
    pe = next(r for n, r in by_name.items() if n.startswith("patch_embed_fwd bf16 #0"))
    assert "stride_it" not in pe["signature"] and "pad_id" not in pe["attrs"], pe


def test_shared_memory_fits_one_block(compiled, table):
    """Every pinned compile, and every config of the sm_90 table, fits the per-block limit."""
    over = [f"{_label(c)}: {r['shared']} B" for c, r in compiled
            if r["ok"] and r["shared"] > SMEM_LIMIT[c["arch"]]]
    over += [f"table {n}: {r['shared']} B" for n, r in table[1].items() if r["ok"] and r["shared"] > SMEM_LIMIT[90]]
    assert not over, f"shared memory over the per-block limit {SMEM_LIMIT}:\n" + "\n".join(over)


def test_pinned_16bit_configs_do_not_spill(compiled):
    """The config the tests and the smoke check run is spill-free on the H200, for every 16-bit list."""
    spills = [f"{_label(c)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B loads, {r['regs']} regs"
              for c, r in compiled if c["arch"] == 90 and c["dtype"] != "fp32" and r["ok"]
              and (r["spill_stores"] or r["spill_loads"])]
    assert not spills, ("the first config of each 16-bit list must compile for sm_90 without register spills "
                        "(benchmarks/results/aot-sm90.md lists the spill-free ones):\n" + "\n".join(spills))


def test_dot_kernels_use_wgmma(compiled):
    """Every tl.dot kernel at head dim <= 128 runs on Hopper's wgmma in bf16 (mma.sync is the Ampere
    instruction: on an H200 it leaves most of the tensor-core throughput unused)."""
    missing = []
    for c, r in compiled:
        if c["arch"] != 90 or c["dtype"] == "fp32" or c["kernel"] not in DOT_KERNELS or _head_dim(c) > 128:
            continue
        if not r["ok"] or wgmma_exception(c):
            continue
        if not r["wgmma"] or r["mma_sync"]:
            missing.append(f"{_label(c)}: wgmma={r['wgmma']} mma.sync={r['mma_sync']}")
    assert not missing, "dot kernels at head dim <= 128 that do not run on wgmma alone:\n" + "\n".join(missing)


def test_wgmma_exceptions_are_current(compiled):
    """An exempted pinned config must still use mma.sync, and the exemption must apply to some."""
    exempt = [(c, r) for c, r in compiled if c["arch"] == 90 and c["dtype"] != "fp32" and wgmma_exception(c)]
    stale = [c["name"] for c, r in exempt if r["ok"] and not r["mma_sync"]]
    assert exempt and not stale, f"wgmma_exception() exempts configs that no longer use mma.sync: {stale}"


def test_table_lists_every_config(table):
    """The committed table has exactly the current kernels x configs (no compile needed)."""
    meta, rows = table
    want = {c["name"] for c in table_cases()}
    missing, extra = sorted(want - set(rows)), sorted(set(rows) - want)
    assert not missing and not extra, (f"the AOT table is stale: not in it {missing}, no longer a config "
                                       f"{extra}: {REGENERATE}")
    failed = [n for n, r in rows.items() if not r["ok"]]
    assert not failed, f"the committed table has failed compiles: {failed}"


def test_pinned_compiles_match_table(compiled, table):
    """Each fresh sm_90 compile reproduces its committed row: a kernel body, launch specialization or
    config changed without regenerating the table shows up as a difference."""
    import triton

    meta, rows = table
    if meta["triton"] != triton.__version__:
        pytest.skip(f"the table was made with triton {meta['triton']}, this is {triton.__version__}")
    drift = []
    for c, r in compiled:
        if c["arch"] != 90 or not r["ok"]:
            continue
        row = rows.get(c["name"])
        if row is None:
            drift.append(f"{c['name']}: not in the table")
            continue
        diff = {k: (row.get(k), r.get(k)) for k in COMPARED if row.get(k) != r.get(k)}
        if diff:
            drift.append(f"{c['name']}: " + ", ".join(f"{k} table {a} != now {b}" for k, (a, b) in diff.items()))
    assert not drift, f"the AOT table does not match the code: {REGENERATE}\n" + "\n".join(drift)


def test_index_0_is_the_config_pinning_runs(monkeypatch):
    """The table's "#0" rows are what ``MEGABYTE_PIN_CONFIGS=1`` launches: the GEMM's autotune list
    holds both widths' configs, and its prune must pin the first of the operands' own list."""
    import importlib

    import torch

    g2l = importlib.import_module("megabyte_kernels.global_to_local")
    monkeypatch.setenv("MEGABYTE_PIN_CONFIGS", "1")
    both = g2l.MATMUL_CONFIGS_16 + g2l.MATMUL_CONFIGS_32
    for dtype, own in ((torch.bfloat16, g2l.MATMUL_CONFIGS_16), (torch.float32, g2l.MATMUL_CONFIGS_32)):
        assert g2l._prune_by_dtype(both, {"A": torch.empty(1, dtype=dtype)}) == [own[0]]
