"""Causal attention microbenchmark: both Triton families vs SDPA (each backend), torch.compile of
the reference, the eager reference, and flash-attn when importable.

    .venv/bin/python -m benchmarks.bench_causal_attention [--quick]          # table on CUDA (or CPU)
    .venv/bin/python -m pytest benchmarks/bench_causal_attention.py --benchmark-enable -q   # CPU reference

Global family (flash attention) is compute-bound: TFLOP/s counted as FlashAttention does,
4·B·Hq·N²·d halved for causal, x2.5 for the backward (fwd+bwd = 3.5x the forward's count).
Local family (packed, N = P <= 64) is memory-bound: GB/s with q, k, v, o read/written once
(backward: q, k, v, dO read, dq, dk, dv written) against the measured copy bandwidth.
Targets on H200, bf16 (issue 4): flash d=128 N=8K/16K forward >= 450 TFLOP/s and >= 1.0x the
fastest SDPA backend, fwd+bwd >= 1.0x SDPA; local P=8 d=64 forward >= 70% of copy bandwidth and
>= 5x SDPA. ``ratio_vs_sdpa`` is the fastest SDPA backend's time over this row's (> 1 is faster).
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import bench_ms, device_record, format_rows, reference_impls, run_context
from benchmarks.perf_model import attention_flops
from megabyte_kernels import reference
from megabyte_kernels.attention import causal_attention, flash_attention, local_attention


def _shapes(device: str, quick: bool):
    """(family, B, Hq, Hkv, N, d) cases: the issue's targets on GPU, small ones on CPU or quick."""
    if torch.device(device).type == "cuda":
        if quick:
            return [("flash", 2, 8, 8, 4096, 128), ("local", 65536, 4, 4, 8, 64)]
        return [
            ("flash", 4, 16, 16, 8192, 128), ("flash", 2, 16, 16, 16384, 128), ("flash", 4, 16, 1, 8192, 128),
            ("local", 1 << 20, 4, 4, 8, 64), ("local", 1 << 20, 8, 1, 8, 64),
        ]
    if quick:
        return [("flash", 1, 4, 4, 256, 64), ("local", 512, 4, 4, 8, 64)]
    return [("flash", 1, 8, 8, 1024, 64), ("local", 8192, 4, 4, 8, 64)]


def _inputs(B, Hq, Hkv, N, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda H: torch.randn(B, H, N, d, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    return mk(Hq), mk(Hkv), mk(Hkv)


def _sdpa_backends(device):
    """{name: context manager factory} for each SDPA backend; 'default' lets PyTorch choose."""
    from contextlib import nullcontext

    out = {"default": nullcontext}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return out
    names = ["MATH"] if torch.device(device).type != "cuda" else [
        "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    for n in names:
        if hasattr(SDPBackend, n):
            out[n.lower()] = lambda b=getattr(SDPBackend, n): sdpa_kernel(b)
    return out


def _impls(device, family):
    is_cuda = torch.device(device).type == "cuda"
    impls = reference_impls(reference.causal_attention)
    for name, ctx in _sdpa_backends(device).items():
        def sdpa(q, k, v, ctx=ctx):
            with ctx():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        impls[f"sdpa[{name}]"] = sdpa
    if not is_cuda:  # the CPU path of backend="native": batched matmuls up to CPU_MATMUL_MAX_N
        impls["native"] = lambda q, k, v: causal_attention(q, k, v, backend="native")
    if is_cuda:
        impls["triton"] = flash_attention if family == "flash" else local_attention
        if family == "flash":
            try:
                from flash_attn import flash_attn_func

                impls["flash-attn"] = lambda q, k, v: flash_attn_func(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
            except ImportError:
                pass
    return impls


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def sdpa_impls(backends, gqa: bool) -> dict:
    """``{"sdpa[name]": fn(q, k, v) or None}`` for the named SDPA backends (keys of
    :data:`SDPA_BACKENDS`), causal, ``enable_gqa`` when the key/value heads are fewer than the
    query heads; None for a backend this torch does not have."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {f"sdpa[{b}]": None for b in backends}
    out = {}
    for b in backends:
        enum = getattr(SDPBackend, SDPA_BACKENDS[b], None)

        def fn(q, k, v, enum=enum):
            with sdpa_kernel(enum):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        out[f"sdpa[{b}]"] = None if enum is None else fn
    return out


def attention_tflops(B: int, Hq: int, N: int, d: int, what: str, ms: float) -> float:
    """TFLOP/s as FlashAttention counts (:func:`benchmarks.perf_model.attention_flops`)."""
    return attention_flops(B, Hq, N, d, what) / (ms * 1e-3) / 1e12


def local_attention_bytes(q_numel: int, kv_numel: int, elt: int, what: str) -> int:
    """Bytes packed (local) attention must move: q, k, v read and o written once; the backward
    adds q, dO read and dq written, k, v read and dk, dv written."""
    fwd = (2 * q_numel + 2 * kv_numel) * elt
    return fwd if what == "fwd" else fwd + (3 * q_numel + 4 * kv_numel) * elt


def run(device: str = "cuda", quick: bool = False) -> list[dict]:
    """Rows: op, family, impl, shape, dtype, pass, ms, TFLOP/s or GB/s (+ frac_copy), ratio_vs_sdpa."""
    device, is_cuda, dtype, rec, copy_gbs = run_context(device, quick=quick)
    rows = []
    for family, B, Hq, Hkv, N, d in _shapes(device, quick):
        q, k, v = _inputs(B, Hq, Hkv, N, d, dtype, device)
        do = torch.randn_like(q)
        es = q.element_size()
        flops = {"fwd": 4 * B * Hq * N * N * d / 2}
        flops["fwd+bwd"] = flops["fwd"] * 3.5
        nbytes = {"fwd": (2 * q.numel() + 2 * k.numel()) * es}
        nbytes["fwd+bwd"] = nbytes["fwd"] + (3 * q.numel() + 4 * k.numel()) * es
        shape = f"B={B} Hq={Hq} Hkv={Hkv} N={N} d={d}"
        results = []
        for name, fn in _impls(device, family).items():
            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(q, k, v)

            def fwd_bwd(fn=fn):
                return torch.autograd.grad(fn(q, k, v), (q, k, v), do)

            for what, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                row = {"op": "causal_attention", "family": family, "impl": name, "shape": shape,
                       "dtype": str(dtype).removeprefix("torch."), "pass": what}
                try:
                    ms = bench_ms(f, device, quick=quick)
                except Exception as e:  # noqa: BLE001 - unavailable backend, OOM, no compiler toolchain
                    row.update(ms=float("nan"), error=f"{type(e).__name__}: {e}"[:200])
                    results.append(row)
                    if is_cuda:
                        torch.cuda.empty_cache()
                    continue
                row["ms"] = ms
                if family == "flash":
                    row["TFLOP/s"] = flops[what] / (ms * 1e-3) / 1e12
                else:
                    row["GB/s"] = nbytes[what] / (ms * 1e-3) / 1e9
                    row["frac_copy"] = row["GB/s"] / copy_gbs
                results.append(row)
        for what in ("fwd", "fwd+bwd"):
            sdpa = [r["ms"] for r in results if r["pass"] == what and r["impl"].startswith("sdpa")
                    and r["ms"] == r["ms"]]
            best = min(sdpa) if sdpa else float("nan")
            for r in results:
                if r["pass"] == what:
                    r["ratio_vs_sdpa"] = best / r["ms"] if r["ms"] == r["ms"] else float("nan")
        rows += results
        del q, k, v, do
        if is_cuda:
            torch.cuda.empty_cache()
    for r in rows:
        r.update(copy_GB_s=copy_gbs, **rec)
    return rows


# ------------------------------------------------------------ pytest-benchmark, CPU reference
CPU_CASES = {"flash": (1, 4, 4, 512, 64), "local": (4096, 4, 4, 8, 64)}


@pytest.mark.parametrize("family", sorted(CPU_CASES))
@pytest.mark.parametrize("what", ["fwd", "fwd+bwd"])
def test_causal_attention_reference_cpu(benchmark, family, what):
    q, k, v = _inputs(*CPU_CASES[family], torch.float32, "cpu")
    do = torch.randn_like(q)

    def step():
        o = reference.causal_attention(q, k, v)
        return torch.autograd.grad(o, (q, k, v), do) if what == "fwd+bwd" else o.detach()

    result = benchmark(step)
    assert result is not None


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cols = ("op", "family", "impl", "shape", "dtype", "pass", "ms", "TFLOP/s", "GB/s", "frac_copy", "ratio_vs_sdpa")
    print(format_rows([{c: r.get(c, "") for c in cols} for r in run(dev, quick)]))
    print(device_record(dev))
