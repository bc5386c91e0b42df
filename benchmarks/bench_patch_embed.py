"""Patch embedding microbenchmark: Triton vs the eager reference vs ``torch.compile(reference)``.

    .venv/bin/python -m benchmarks.bench_patch_embed [--quick]          # table on CUDA (or CPU)
    .venv/bin/python -m pytest benchmarks/bench_patch_embed.py --benchmark-enable -q   # CPU reference

Memory-bound: reported in GB/s (bytes the op must move: ids, the used table rows, output;
backward: grad read, table grads written) and as a fraction of the measured copy bandwidth.
GPU target on H200 (issue 3): forward >= 80% of copy bandwidth and >= 3x eager at
B*T = 1M bytes, P=8, D_G=1024, V=512, learned positions, bf16.
"""
from __future__ import annotations

import sys

import pytest
import torch

from benchmarks.common import bench_ms, device_record, format_rows, reference_impls, run_context
from megabyte_kernels import patch_embed, reference

V, PAD = 512, 0


def _shapes(device: str, quick: bool):
    """(B, T, P, D_G) cases: the issue's target shape on GPU, small ones on CPU or quick."""
    if torch.device(device).type == "cuda" and not quick:
        return [(128, 8192, 8, 1024), (16, 65536, 8, 1024), (128, 8192, 4, 512)]
    return [(4, 1024, 8, 128)] if quick else [(8, 2048, 8, 256)]


def _inputs(B, T, P, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g).to(device)
    table = (0.02 * torch.randn(V, D, generator=g)).to(device, dtype).requires_grad_()
    pos = (0.02 * torch.randn(T, D, generator=g)).to(device, dtype).requires_grad_()
    return ids, table, pos


def traffic_bytes(B: int, T: int, P: int, D: int, ids_elt: int, elt: int, vocab: int = V) -> tuple[int, int]:
    """(forward, backward) bytes the op must move, as :func:`run` counts them: ids, the used
    table rows and the output; backward: the gradient read once, both table gradients written."""
    K = -(-T // P)
    out_bytes = B * K * P * D * elt
    tables = (vocab + K * P) * D * elt
    return B * T * ids_elt + out_bytes + tables, out_bytes + tables


def run(device: str = "cuda", quick: bool = False) -> list[dict]:
    """Rows: op, impl, shape, dtype, pass, ms, GB/s, frac_copy, ratio vs eager (> 1 is faster)."""
    device, is_cuda, dtype, rec, copy_gbs = run_context(device, quick=quick)
    impls = reference_impls(reference.patch_embed)
    if is_cuda:
        impls["triton"] = lambda *a, **k: patch_embed(*a, backend="triton", **k)
    rows = []
    for B, T, P, D in _shapes(device, quick):
        ids, table, pos = _inputs(B, T, P, D, dtype, device)
        K = -(-T // P)
        es = table.element_size()
        out_bytes = B * K * P * D * es
        fwd_bytes = ids.numel() * ids.element_size() + out_bytes + (V + K * P) * D * es
        bwd_bytes = out_bytes + (V + K * P) * D * es  # grad read once, both table grads written
        grad = torch.randn(B, K, P * D, device=device, dtype=dtype)
        eager = {}
        for name, fn in impls.items():
            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(ids, table, pos, patch_size=P, pad_id=PAD)

            def fwd_bwd(fn=fn):
                out = fn(ids, table, pos, patch_size=P, pad_id=PAD)
                return torch.autograd.grad(out, (table, pos), grad)

            for what, f, nbytes in (("fwd", fwd, fwd_bytes), ("fwd+bwd", fwd_bwd, fwd_bytes + bwd_bytes)):
                try:
                    ms = bench_ms(f, device, quick=quick)
                except Exception as e:  # noqa: BLE001 - e.g. no C++ toolchain for torch.compile on CPU
                    rows.append({"op": "patch_embed", "impl": name, "shape": f"B={B} T={T} P={P} D_G={D}",
                                 "dtype": str(dtype).removeprefix("torch."), "pass": what, "ms": float("nan"),
                                 "GB/s": float("nan"), "frac_copy": float("nan"), "ratio_vs_eager": float("nan"),
                                 "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                if name == "eager":
                    eager[what] = ms
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({"op": "patch_embed", "impl": name, "shape": f"B={B} T={T} P={P} D_G={D}",
                             "dtype": str(dtype).removeprefix("torch."), "pass": what, "ms": ms, "GB/s": gbs,
                             "frac_copy": gbs / copy_gbs, "ratio_vs_eager": eager.get(what, float("nan")) / ms})
    for r in rows:
        r.update(copy_GB_s=copy_gbs, **rec)
    return rows


# ------------------------------------------------------------ pytest-benchmark, CPU reference
B_CPU, T_CPU, P_CPU, D_CPU = 8, 1024, 8, 128


@pytest.mark.parametrize("what", ["fwd", "fwd+bwd"])
def test_patch_embed_reference_cpu(benchmark, what):
    ids, table, pos = _inputs(B_CPU, T_CPU, P_CPU, D_CPU, torch.float32, "cpu")
    grad = torch.randn(B_CPU, T_CPU // P_CPU, P_CPU * D_CPU)

    def step():
        out = reference.patch_embed(ids, table, pos, patch_size=P_CPU, pad_id=PAD)
        return torch.autograd.grad(out, (table, pos), grad) if what == "fwd+bwd" else out.detach()

    result = benchmark(step)
    assert result is not None


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(format_rows([{k: r[k] for k in ("op", "impl", "shape", "dtype", "pass", "ms", "GB/s", "frac_copy",
                                           "ratio_vs_eager")} for r in run(dev, quick)]))
    print(device_record(dev))
