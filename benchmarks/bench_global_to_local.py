"""Global-to-local microbenchmark: Triton vs the eager reference vs ``torch.compile(reference)``.

    .venv/bin/python -m benchmarks.bench_global_to_local [--quick]          # table on CUDA (or CPU)
    .venv/bin/python -m pytest benchmarks/bench_global_to_local.py --benchmark-enable -q   # CPU reference

Reported in GB/s (global output read, weight and table read, output written; backward: grad
and global output read, dX written) against the measured copy bandwidth, and in TFLOP/s
(2*M*D_G*D_L forward, 3x that for forward+backward). GPU target on H200 (issue 3): forward
>= 1.3x eager at D_G=1024, D_L=512, P=8, B*T = 1M bytes, bf16.
"""
from __future__ import annotations

import sys

import pytest
import torch

from benchmarks.common import bench_ms, device_record, format_rows, reference_impls, run_context
from megabyte_kernels import global_to_local, reference

V, PAD = 512, 0


def _shapes(device: str, quick: bool):
    """(B, T, P, D_G, D_L) cases: the issue's target shape on GPU, small ones on CPU or quick."""
    if torch.device(device).type == "cuda" and not quick:
        return [(128, 8192, 8, 1024, 512), (128, 8192, 4, 768, 384)]
    return [(4, 1024, 8, 64, 64)] if quick else [(8, 2048, 8, 128, 64)]


def _inputs(B, T, P, D_G, D_L, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = -(-T // P)
    leaf = lambda *s, scale=0.02: (scale * torch.randn(*s, generator=g)).to(device, dtype).requires_grad_()  # noqa: E731
    ids = torch.randint(0, 256, (B, T), generator=g).to(device)
    return ids, leaf(B, K, P * D_G, scale=1.0), leaf(D_L, D_G), leaf(D_L), leaf(V, D_L)


def traffic_bytes(B: int, T: int, P: int, D_G: int, D_L: int, ids_elt: int, elt: int,
                  vocab: int = V) -> tuple[int, int]:
    """(forward, backward) bytes the op must move, as :func:`run` counts them (M = B*K*P rows):
    global output, weight and table read, output written; backward: dOut read twice, X read,
    dX written, dW and the table gradient."""
    M = B * (-(-T // P)) * P
    fwd = (M * D_G + D_L * D_G + vocab * D_L + M * D_L) * elt + B * T * ids_elt
    bwd = (2 * M * D_L + 2 * M * D_G + 2 * D_L * D_G + vocab * D_L) * elt
    return fwd, bwd


def run(device: str = "cuda", quick: bool = False) -> list[dict]:
    """Rows: op, impl, shape, dtype, pass, ms, GB/s, frac_copy, TFLOP/s, ratio vs eager (> 1 is faster)."""
    device, is_cuda, dtype, rec, copy_gbs = run_context(device, quick=quick)
    impls = reference_impls(reference.global_to_local)
    if is_cuda:
        impls["triton"] = lambda *a, **k: global_to_local(*a, backend="triton", **k)
    rows = []
    for B, T, P, D_G, D_L in _shapes(device, quick):
        ids, x, w, b, table = _inputs(B, T, P, D_G, D_L, dtype, device)
        M = x.numel() // D_G
        es = x.element_size()
        fwd_bytes = (M * D_G + D_L * D_G + V * D_L + M * D_L) * es + ids.numel() * ids.element_size()
        bwd_bytes = (2 * M * D_L + 2 * M * D_G + 2 * D_L * D_G + V * D_L) * es  # dOut read twice, X, dX
        flops = 2 * M * D_G * D_L
        grad = torch.randn(M // P, P, D_L, device=device, dtype=dtype)
        eager = {}
        for name, fn in impls.items():
            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(x, ids, w, b, table, patch_size=P, pad_id=PAD)

            def fwd_bwd(fn=fn):
                out = fn(x, ids, w, b, table, patch_size=P, pad_id=PAD)
                return torch.autograd.grad(out, (x, w, b, table), grad)

            for what, f, nbytes, nflops in (("fwd", fwd, fwd_bytes, flops),
                                            ("fwd+bwd", fwd_bwd, fwd_bytes + bwd_bytes, 3 * flops)):
                row = {"op": "global_to_local", "impl": name, "shape": f"B={B} T={T} P={P} D_G={D_G} D_L={D_L}",
                       "dtype": str(dtype).removeprefix("torch."), "pass": what}
                try:
                    ms = bench_ms(f, device, quick=quick)
                except Exception as e:  # noqa: BLE001 - e.g. no C++ toolchain for torch.compile on CPU
                    rows.append({**row, "ms": float("nan"), "GB/s": float("nan"), "frac_copy": float("nan"),
                                 "TFLOP/s": float("nan"), "ratio_vs_eager": float("nan"),
                                 "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                if name == "eager":
                    eager[what] = ms
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({**row, "ms": ms, "GB/s": gbs, "frac_copy": gbs / copy_gbs,
                             "TFLOP/s": nflops / (ms * 1e-3) / 1e12,
                             "ratio_vs_eager": eager.get(what, float("nan")) / ms})
    for r in rows:
        r.update(copy_GB_s=copy_gbs, **rec)
    return rows


# ------------------------------------------------------------ pytest-benchmark, CPU reference
SHAPE_CPU = (8, 1024, 8, 128, 64)


@pytest.mark.parametrize("what", ["fwd", "fwd+bwd"])
def test_global_to_local_reference_cpu(benchmark, what):
    B, T, P, D_G, D_L = SHAPE_CPU
    ids, x, w, b, table = _inputs(B, T, P, D_G, D_L, torch.float32, "cpu")
    grad = torch.randn(B * T // P, P, D_L)

    def step():
        out = reference.global_to_local(x, ids, w, b, table, patch_size=P, pad_id=PAD)
        return torch.autograd.grad(out, (x, w, b, table), grad) if what == "fwd+bwd" else out.detach()

    result = benchmark(step)
    assert result is not None


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(format_rows([{k: r[k] for k in ("op", "impl", "shape", "dtype", "pass", "ms", "GB/s", "frac_copy",
                                           "TFLOP/s", "ratio_vs_eager")} for r in run(dev, quick)]))
    print(device_record(dev))
