"""What ``benchmarks/gpu_check.py`` runs, at which sizes, against which goals: plain data and the
results file's reader/writer, no torch (the orchestrator imports only this), shared with its
workers ``benchmarks/gpu_smoke.py`` and ``benchmarks/gpu_bench.py``.

Two scales: ``gpu`` (one H200, the sizes of issue 12) and ``dry`` (``--dry-run-cpu``: the same
stages on CPU in Triton's interpreter at tiny sizes, to test the plumbing).

Every result is one JSON object per line of ``results.jsonl``, appended (and fsynced) the
moment it is known by whichever process knows it; ``kind`` says what it is:

=========== =========================================================================
``meta``     the run: scale, budget, command, git sha, date (the orchestrator)
``preflight`` GPU, driver, versions, tools, measured copy GB/s and bf16 GEMM TFLOP/s
``smoke``    one verdict: kernel x case x dtype x pass, PASS/FAIL, max error and bound
``tests``    the GPU-tier pytest run: return code, counts, wall time
``event``    a benchmark item started / done / skipped (why) / crashed
``bench``    one timed row: item, impl, pass, ms and its figures
``compare``  a ratio of the Triton row to the fastest baseline of the same item and pass
``tuned``    the autotune winners after a benchmark item (kernel -> key -> config)
``parity``   the parity check of an item's autotune winner (PASS/FAIL, errors, configs)
``warm``     a compile-ahead job of the benchmark stage (which configs, wall time)
=========== =========================================================================
"""
from __future__ import annotations

import json
import math
import os

RESULTS = "results.jsonl"
LOG = "gpu_check.log"
PYTEST_LOG = "pytest.log"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
PLOT = "goals.png"
# test hook (documented in gpu_smoke.py): the smoke check of this kernel ("all": every kernel)
# perturbs the kernel's result before comparing, so a parity failure can be provoked on purpose
INJECT_ENV = "MEGABYTE_GPU_CHECK_INJECT_FAULT"

DTYPES = ("bf16", "fp16")
PASSES = ("fwd", "bwd")

# ------------------------------------------------------------------------------------------
# stage 1: smoke cases, (kernel, case label, sizes); each runs in bf16 and fp16, fwd and bwd
# ------------------------------------------------------------------------------------------
SMOKE = {
    "gpu": [
        ("patch_embed", "B=2 T=2045 P=8 D=512", dict(B=2, T=2045, P=8, D=512, V=512, pad_id=257)),
        ("global_to_local", "B=2 T=2045 P=8 D_G=256 D_L=128",
         dict(B=2, T=2045, P=8, D_G=256, D_L=128, V=512, pad_id=257)),
        ("flash_attention", "B=2 H=4 Hkv=2 N=1000 d=64", dict(B=2, H=4, Hkv=2, N=1000, d=64, alibi=False)),
        ("flash_attention", "B=2 H=4 Hkv=1 N=1000 d=128", dict(B=2, H=4, Hkv=1, N=1000, d=128, alibi=False)),
        ("flash_attention", "B=1 H=4 Hkv=1 N=777 d=64 ALiBi", dict(B=1, H=4, Hkv=1, N=777, d=64, alibi=True)),
        ("local_attention", "B*K=4096 H=4 Hkv=1 P=8 d=64", dict(B=4096, H=4, Hkv=1, N=8, d=64, alibi=False)),
    ],
    "dry": [
        ("patch_embed", "B=2 T=21 P=4 D=24", dict(B=2, T=21, P=4, D=24, V=19, pad_id=3)),
        ("global_to_local", "B=2 T=21 P=4 D_G=24 D_L=40", dict(B=2, T=21, P=4, D_G=24, D_L=40, V=19, pad_id=3)),
        ("flash_attention", "B=1 H=2 Hkv=1 N=21 d=16", dict(B=1, H=2, Hkv=1, N=21, d=16, alibi=False)),
        ("flash_attention", "B=1 H=2 Hkv=2 N=21 d=32", dict(B=1, H=2, Hkv=2, N=21, d=32, alibi=False)),
        ("flash_attention", "B=1 H=2 Hkv=1 N=19 d=16 ALiBi", dict(B=1, H=2, Hkv=1, N=19, d=16, alibi=True)),
        ("local_attention", "B*K=5 H=2 Hkv=1 P=8 d=16", dict(B=5, H=2, Hkv=1, N=8, d=16, alibi=False)),
    ],
}


def smoke_key(kernel: str, case: str, dtype: str, pass_: str) -> str:
    return f"{kernel}|{case}|{dtype}|{pass_}"


def smoke_jobs(scale: str, kernels: list[str] | None = None) -> list[list[str]]:
    """The smoke checks split into worker processes (compiling is CPU-bound; a GPU machine has
    16 cores): on the GPU one process per case and dtype, dry one process for everything."""
    cases = [(k, c) for k, c, _ in SMOKE[scale] if not kernels or k in kernels]
    if scale == "dry":
        return [[f"{k}|{c}|{d}" for k, c in cases for d in DTYPES]] if cases else []
    return [[f"{k}|{c}|{d}"] for k, c in cases for d in DTYPES]


# ------------------------------------------------------------------------------------------
# stage 3: benchmark sizes; the parity batch keeps each autotune key (not B) of the benchmark
# ------------------------------------------------------------------------------------------
BENCH = {
    "gpu": dict(
        # FlashAttention's convention: H = 2048 / d, B = 16384 / N; MHA and MQA
        flash=[dict(B=2, H=16, Hkv=16, N=8192, d=128), dict(B=2, H=16, Hkv=1, N=8192, d=128),
               dict(B=1, H=16, Hkv=16, N=16384, d=128), dict(B=1, H=16, Hkv=1, N=16384, d=128)],
        flash_sdpa=("flash", "efficient", "cudnn"),  # math: N x N scores per head, too slow here
        flash_parity_B=1,
        local=dict(B=1 << 20, H=4, Hkv=4, N=8, d=64),  # 1M patches of P = 8 (8M bytes)
        local_sdpa=("flash", "efficient", "cudnn", "math"),
        patch_embed=dict(B=128, T=8192, P=8, D=1024),  # 1M bytes
        global_to_local=dict(B=128, T=8192, P=8, D_G=1024, D_L=512),
        ops_parity_B=2,
        # issue 17: the static decoder at its benchmark config, batch 1 and 16, eager and CUDA graphs
        generation=dict(prompt=1024, new=512, repeats=2, config="bench", batches=(1, 16), graphs=(True, False)),
        train=dict(scale="full", config="bench"),
        long_context=dict(T=1 << 20, dims="BIG"),
        # compile-ahead: one job per (group, config index); the longest autotune list has 5
        warm_groups=("flash", "ops", "model"), warm_configs=5,
    ),
    "dry": dict(
        flash=[dict(B=1, H=2, Hkv=2, N=24, d=16), dict(B=1, H=2, Hkv=1, N=24, d=16)],
        flash_sdpa=("flash", "math"),
        flash_parity_B=1,
        local=dict(B=8, H=2, Hkv=2, N=8, d=16),
        local_sdpa=("math",),
        patch_embed=dict(B=2, T=16, P=4, D=16),
        global_to_local=dict(B=2, T=16, P=4, D_G=16, D_L=16),
        ops_parity_B=1,
        generation=dict(prompt=16, new=8, repeats=1, config="demo", batches=(1, 2), graphs=(False,)),
        train=dict(scale="smoke", config="bench"),
        long_context=dict(T=256, dims="TINY"),
        warm_groups=("flash",), warm_configs=1,  # the interpreter has one config per kernel
    ),
}

# (item, seconds it needs at least: started only with that much of the budget left), in order of value
def bench_items(scale: str) -> list[tuple[str, float]]:
    p = BENCH[scale]
    items = []
    for i in range(len(p["flash"])):
        items += [(f"flash/{i}", 12.0), (f"flash_parity/{i}", 8.0)]
    items += [("local", 8.0), ("patch_embed", 6.0), ("patch_embed_parity", 4.0), ("global_to_local", 6.0),
              ("global_to_local_parity", 4.0), ("generation", 30.0), ("train_step", 25.0),
              ("long_context", 40.0), ("local_variants", 12.0)]
    if scale == "dry":
        items = [(name, 0.0) for name, _ in items]
    return items


def flash_label(s: dict) -> str:
    kind = "MHA" if s["Hkv"] == s["H"] else "MQA" if s["Hkv"] == 1 else f"GQA Hkv={s['Hkv']}"
    return f"N={s['N']} B={s['B']} H={s['H']} {kind} d={s['d']}"


# goals (issues 3-5, 12): (what, comparison, threshold, unit)
GOALS = {
    "flash_fwd_tflops": (">=", 450.0, "TFLOP/s"),
    "flash_fwd_vs_sdpa": (">=", 1.0, "x"),
    "flash_fwdbwd_vs_sdpa": (">=", 1.0, "x"),
    "local_frac_copy": (">=", 0.70, "of copy"),
    "local_vs_sdpa": (">=", 5.0, "x"),
    "pe_frac_copy": (">=", 0.80, "of copy"),
    "pe_vs_eager": (">=", 3.0, "x"),
    "g2l_vs_eager": (">=", 1.3, "x"),
    "generation_bytes_s": (">=", 2000.0, "bytes/s"),
    "generation_batch_bytes_s": (">=", 10000.0, "bytes/s"),
}


# ------------------------------------------------------------------------------------------
# results.jsonl
# ------------------------------------------------------------------------------------------
def json_safe(x):
    """JSON-ready copy: non-finite floats become None, unknown objects their str()."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def append_row(path: str, row: dict) -> None:
    """Append one JSON line and fsync it: a process killed right after loses nothing it wrote.
    One ``os.write`` on an O_APPEND descriptor, so parallel writers do not interleave lines."""
    data = (json.dumps(json_safe(row), sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_rows(path: str) -> list[dict]:
    """Every row of a results file (a torn last line, from a kill mid-write, is skipped)."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return rows
