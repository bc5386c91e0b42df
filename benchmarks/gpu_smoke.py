"""Stage 1 of gpu-check: every Triton kernel once, forward and backward, bf16 and fp16, at one
mid-sized shape, against the float64 reference with DESIGN.md §4's tolerances.

    MEGABYTE_PIN_CONFIGS=1 PYTHONPATH=$PWD python3 -m benchmarks.gpu_smoke --scale gpu \\
        --jsonl DIR/results.jsonl [--only "flash_attention|B=2 H=4 Hkv=2 N=1000 d=64|bf16" ...]

(``benchmarks/gpu_check.py`` runs it, several processes in parallel, with the configs pinned so
that nothing is autotuned.) The cases are ``benchmarks/gpu_plan.py``'s ``SMOKE``. For each one:
every buffer the Triton path allocates starts as NaN (``megabyte_kernels._kernel_utils.alloc``,
swapped as the parity tests
do), so an element no kernel writes shows up; the backward runs twice and must agree bitwise;
then one verdict per pass, written to the results file the moment it is known:

* attention (flash and local): FlashAttention's rule, error against float64 at most 2x the
  error of the PyTorch reference at the same precision, plus 1e-3 (fp16) / 1e-2 (bf16);
* patch_embed, global_to_local: ``|got - ref| <= atol + rtol * |ref|`` with the per-dtype
  ``(atol, rtol)`` of ``tests/kernels/test_patch_embed.py`` and ``test_global_to_local.py``
  (gradients: atol x 4 for patch_embed, x the gradient's magnitude for global_to_local).

The same check functions verify the autotune winners in stage 3 (``benchmarks/gpu_bench.py``).

Test hook: ``MEGABYTE_GPU_CHECK_INJECT_FAULT=<kernel>`` (or ``all``) adds 1.0 to one element of
that kernel's forward output and first gradient before they are compared, so the check must
FAIL; ``tests/test_gpu_check.py`` uses it (``gpu_check --inject-fault``). Never set it otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
import time

import torch

from benchmarks.gpu_plan import DTYPES, INJECT_ENV, PASSES, SMOKE, append_row, smoke_key
from megabyte_kernels import global_to_local, patch_embed, reference
from megabyte_kernels.attention import flash_attention, local_attention

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# FlashAttention's floor per dtype (DESIGN.md §4, tests/kernels/test_causal_attention.py)
FA_FLOOR = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2}
# (atol, rtol) per dtype: tests/kernels/test_patch_embed.py and test_global_to_local.py
CLOSE_TOL = {
    "patch_embed": {"fp32": (1e-5, 1e-5), "fp16": (2e-3, 2e-3), "bf16": (2e-2, 2e-2)},
    "global_to_local": {"fp32": (1e-4, 1e-5), "fp16": (1e-2, 2e-3), "bf16": (8e-2, 2e-2)},
}
# CUDA errors after which the context is unusable: the worker stops, the orchestrator goes on
STICKY_CUDA_ERRORS = ("illegal memory access", "unspecified launch failure", "device-side assert",
                      "misaligned address", "illegal instruction", "uncorrectable ECC", "CUDA error: unknown error")


def context_lost(e: BaseException) -> bool:
    """True when ``e`` is a CUDA error that leaves the process's CUDA context unusable."""
    return torch.cuda.is_available() and any(s in str(e) for s in STICKY_CUDA_ERRORS)


def short(e: BaseException, n: int = 300) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:n]


# ------------------------------------------------------------------------------------------
# tolerance rules
# ------------------------------------------------------------------------------------------
def fa_check(name: str, got: torch.Tensor, ref_low: torch.Tensor, ref64: torch.Tensor, dtype: str) -> dict:
    """FlashAttention's rule: max |got - ref64| <= 2 * max |ref_low - ref64| + floor(dtype)."""
    floor = FA_FLOOR[dtype]
    finite = bool(torch.isfinite(got).all())
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    base = (ref_low.double() - ref64).abs().max().item() if got.numel() else 0.0
    bound = 2 * base + floor
    return {"name": name, "ok": finite and err <= bound, "err": err if finite else float("inf"), "bound": bound,
            "ratio": err / bound if finite else float("inf"), "finite": finite,
            "rule": f"2 x torch {dtype} error {base:.2g} + {floor:g}"}


def close_check(name: str, got: torch.Tensor, ref64: torch.Tensor, atol: float, rtol: float) -> dict:
    """Elementwise ``|got - ref64| <= atol + rtol * |ref64|``; ratio = worst |err| / allowed."""
    finite = bool(torch.isfinite(got).all())
    diff = (got.double() - ref64).abs()
    allowed = atol + rtol * ref64.abs()
    ratio_t = diff / allowed
    worst = int(ratio_t.argmax()) if got.numel() else 0
    ratio = ratio_t.reshape(-1)[worst].item() if got.numel() else 0.0
    return {"name": name, "ok": finite and ratio <= 1.0, "err": diff.max().item() if finite and got.numel() else
            (float("inf") if not finite else 0.0), "bound": allowed.reshape(-1)[worst].item() if got.numel() else atol,
            "ratio": ratio if finite else float("inf"), "finite": finite, "rule": f"atol {atol:g} + rtol {rtol:g} x |ref|"}


def injected(kernel: str, t: torch.Tensor) -> torch.Tensor:
    """The test hook: ``t`` with 1.0 added to its first element when this kernel is the target."""
    target = os.environ.get(INJECT_ENV, "")
    if target not in (kernel, "all"):
        return t
    t = t.detach().clone().contiguous()
    t.view(-1)[0] += 1.0
    return t


@contextlib.contextmanager
def nan_outputs():
    """Every buffer the Triton path allocates starts as NaN while inside (the parity tests'
    fixture, ``tests/kernels/_parity.py``): an element no kernel writes stays NaN and fails."""
    ku = importlib.import_module("megabyte_kernels._kernel_utils")

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    swaps = [(ku, "alloc", alloc)]  # every buffer of every op's Triton path comes from ku.alloc
    saved = [(m, n, getattr(m, n)) for m, n, _ in swaps]
    try:
        for m, n, f in swaps:
            setattr(m, n, f)
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


def _grads_twice(out, inputs, grad) -> tuple[list[torch.Tensor], bool]:
    """Gradients of ``out`` w.r.t. ``inputs`` (NaN-prefilled buffers), computed twice: (grads, bitwise equal)."""
    with nan_outputs():
        g1 = torch.autograd.grad(out, inputs, grad, retain_graph=True)
        g2 = torch.autograd.grad(out, inputs, grad)
    same = all(torch.equal(a, b) for a, b in zip(g1, g2))
    return list(g1), same


def _determinism(same: bool) -> list[dict]:
    return [] if same else [{"name": "determinism", "ok": False, "err": float("nan"), "bound": 0.0,
                             "ratio": float("inf"), "finite": True, "rule": "backward run twice: results differ"}]


# ------------------------------------------------------------------------------------------
# the checks: generators yielding (pass, [check, ...]) as soon as each pass is known
# ------------------------------------------------------------------------------------------
def check_patch_embed(p: dict, dtype: str, device: str):
    """Global patch embedding with learned positions, ids int64, T not a multiple of P."""
    dt, (atol, rtol) = TORCH_DTYPES[dtype], CLOSE_TOL["patch_embed"][dtype]
    g = torch.Generator().manual_seed(0)
    B, T, P, D, V = p["B"], p["T"], p["P"], p["D"], p["V"]
    K = -(-T // P)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    table = torch.randn(V, D, generator=g).to(device, dt).requires_grad_()
    pos = torch.randn(K * P, D, generator=g).to(device, dt).requires_grad_()
    kw = dict(patch_size=P, pad_id=p["pad_id"])
    with nan_outputs():
        out = patch_embed(ids, table, pos, backend="triton", **kw)
    r_table, r_pos = (t.detach().double().requires_grad_() for t in (table, pos))
    ref = patch_embed(ids, r_table, r_pos, backend="reference", **kw)
    yield "fwd", [close_check("out", injected("patch_embed", out), ref, atol, rtol)]
    grad = torch.randn(out.shape, generator=g).to(device, dt)
    grads, same = _grads_twice(out, (table, pos), grad)
    ref_grads = torch.autograd.grad(ref, (r_table, r_pos), grad.double())
    grads[0] = injected("patch_embed", grads[0])
    yield "bwd", [close_check(n, a, r, atol * 4, rtol) for n, a, r in zip(("d_table", "d_pos"), grads, ref_grads)] \
        + _determinism(same)


def check_global_to_local(p: dict, dtype: str, device: str):
    """Global-to-local projection with bias (no local pad, in-patch shift): the benchmark's epilogue."""
    dt, (atol, rtol) = TORCH_DTYPES[dtype], CLOSE_TOL["global_to_local"][dtype]
    g = torch.Generator().manual_seed(0)
    B, T, P, D_G, D_L, V = p["B"], p["T"], p["P"], p["D_G"], p["D_L"], p["V"]
    K = -(-T // P)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    leaf = lambda t: t.to(device, dt).requires_grad_()  # noqa: E731
    x = leaf(torch.randn(B, K, P * D_G, generator=g))
    w = leaf(torch.randn(D_L, D_G, generator=g) * D_G ** -0.5)
    b = leaf(torch.randn(D_L, generator=g))
    table = leaf(torch.randn(V, D_L, generator=g))
    params = (x, w, b, table)
    kw = dict(patch_size=P, pad_id=p["pad_id"])
    with nan_outputs():
        out = global_to_local(x, ids, w, b, table, backend="triton", **kw)
    r = [t.detach().double().requires_grad_() for t in params]
    ref = global_to_local(r[0], ids, r[1], r[2], r[3], backend="reference", **kw)
    yield "fwd", [close_check("out", injected("global_to_local", out), ref, atol, rtol)]
    grad = torch.randn(out.shape, generator=g).to(device, dt)
    grads, same = _grads_twice(out, params, grad)
    ref_grads = torch.autograd.grad(ref, r, grad.double())
    grads[0] = injected("global_to_local", grads[0])
    checks = [close_check(n, a, rg, atol * max(1.0, rg.abs().max().item()), rtol)
              for n, a, rg in zip(("d_x", "d_w", "d_b", "d_table"), grads, ref_grads)]
    yield "bwd", checks + _determinism(same)


def attention_reference(q, k, v, do, slopes, dtype: torch.dtype, max_bytes: float = 4 * 2**30):
    """(o, dq, dk, dv) of ``reference.causal_attention`` computed at ``dtype``, query heads in
    chunks so that a chunk's N x N buffers stay under ``max_bytes`` (float64 at N = 16384 holds
    2 GiB of scores per head); dk, dv summed over each group's heads in fp32 (float64)."""
    B, H, N, d = q.shape
    G = H // k.shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_head = 4 * B * N * N * torch.finfo(dtype).bits // 8  # scores, probabilities, their gradients
    chunk = int(max(1, min(H, max_bytes // max(1, per_head))))
    o, dq = torch.empty(q.shape, dtype=dtype, device=q.device), torch.empty(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for h0 in range(0, H, chunk):
        h1 = min(H, h0 + chunk)
        idx = torch.arange(h0, h1, device=q.device) // G
        qc = q[:, h0:h1].detach().to(dtype).requires_grad_()
        kc = k.detach().to(dtype)[:, idx].requires_grad_()
        vc = v.detach().to(dtype)[:, idx].requires_grad_()
        sl = None if slopes is None else slopes[h0:h1]
        oc = reference.causal_attention(qc, kc, vc, alibi_slopes=sl)
        gq, gk, gv = torch.autograd.grad(oc, (qc, kc, vc), do[:, h0:h1].to(dtype))
        o[:, h0:h1], dq[:, h0:h1] = oc.detach(), gq
        dk.index_add_(1, idx, gk.to(acc))
        dv.index_add_(1, idx, gv.to(acc))
        del oc, gq, gk, gv, qc, kc, vc
    return o, dq, dk.to(dtype), dv.to(dtype)


def check_attention(p: dict, dtype: str, device: str, family: str = "flash", seed: int = 0, inputs=None):
    """Flash (any N) or packed local (N = P) attention, q (B, H, N, d), k/v (B, Hkv, N, d),
    ALiBi when ``p["alibi"]``; FlashAttention's tolerance rule. ``inputs``: (q, k, v, do) to use."""
    dt = TORCH_DTYPES[dtype]
    fn = flash_attention if family == "flash" else local_attention
    kernel = f"{family}_attention"
    B, H, Hkv, N, d = p["B"], p["H"], p["Hkv"], p["N"], p["d"]
    if inputs is None:
        g = torch.Generator().manual_seed(seed)
        mk = lambda h: torch.randn(B, h, N, d, generator=g).to(device, dt).requires_grad_()  # noqa: E731
        q, k, v = mk(H), mk(Hkv), mk(Hkv)
        do = torch.randn(B, H, N, d, generator=g).to(device, dt)
    else:
        q, k, v, do = inputs
    slopes = (torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], device=device)
              if p.get("alibi") else None)
    with nan_outputs():
        o = fn(q, k, v, alibi_slopes=slopes)
    o64, *g64 = attention_reference(q, k, v, do, slopes, torch.float64)
    olo, *glo = attention_reference(q, k, v, do, slopes, dt)
    yield "fwd", [fa_check("o", injected(kernel, o.detach()), olo, o64, dtype)]
    del o64, olo
    grads, same = _grads_twice(o, (q, k, v), do)
    grads[0] = injected(kernel, grads[0])
    yield "bwd", [fa_check(n, a, lo, hi, dtype) for n, a, lo, hi in zip(("dq", "dk", "dv"), grads, glo, g64)] \
        + _determinism(same)


CHECKS = {
    "patch_embed": check_patch_embed,
    "global_to_local": check_global_to_local,
    "flash_attention": lambda p, dt, dev: check_attention(p, dt, dev, "flash"),
    "local_attention": lambda p, dt, dev: check_attention(p, dt, dev, "local"),
}


# ------------------------------------------------------------------------------------------
# verdicts
# ------------------------------------------------------------------------------------------
def verdict(checks: list[dict]) -> dict:
    """The pass's verdict from its checks: PASS when all hold; the worst check (by err/bound) named."""
    worst = max(checks, key=lambda c: c["ratio"] if math.isfinite(c["ratio"]) else float("inf"))
    return {"verdict": "PASS" if all(c["ok"] for c in checks) else "FAIL", "worst": worst["name"],
            "err": worst["err"], "bound": worst["bound"], "ratio": worst["ratio"], "rule": worst["rule"],
            "checks": checks}


def verdict_line(row: dict) -> str:
    """``PASS  kernel case  dtype pass  worst: max err <= bound (rule)  [s]``"""
    head = f"{row['verdict']:4s}  {row['kernel']} {row['case']}  {row['dtype']} {row['pass']}"
    if row.get("error"):
        return f"{head}  error: {row['error']}"
    rel = "<=" if row["verdict"] == "PASS" else ">"
    extra = "" if row.get("finite", True) else " (non-finite values: an unwritten element?)"
    return (f"{head}  {row['worst']}: max err {row['err']:.3g} {rel} bound {row['bound']:.3g} "
            f"({row['rule']}){extra}  [{row['wall_s']:.1f} s]")


def run_case(kernel: str, case: str, params: dict, dtype: str, device: str, jsonl: str | None) -> list[dict]:
    """Both passes of one case; each verdict printed and appended to ``jsonl`` when known. An
    exception fails the passes it reached (and the CUDA context, when lost, is re-raised)."""
    rows, t0 = [], time.perf_counter()

    def emit(pass_: str, **fields) -> None:
        row = {"kind": "smoke", "key": smoke_key(kernel, case, dtype, pass_), "kernel": kernel, "case": case,
               "dtype": dtype, "pass": pass_, "device": device, "wall_s": time.perf_counter() - t0, **fields}
        if "checks" in fields:
            row["finite"] = all(c["finite"] for c in fields["checks"])
        rows.append(row)
        if jsonl:
            append_row(jsonl, row)
        print(verdict_line(row), flush=True)

    try:
        for pass_, checks in CHECKS[kernel](params, dtype, device):
            emit(pass_, **verdict(checks))
    except Exception as e:  # noqa: BLE001 - a kernel that raises fails its check
        done = {r["pass"] for r in rows}
        for pass_ in PASSES:
            if pass_ not in done:
                emit(pass_, verdict="FAIL", error=short(e))
        if context_lost(e):
            raise
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SMOKE), default="gpu")
    ap.add_argument("--only", action="append", default=[], metavar="KERNEL|CASE|DTYPE",
                    help="run only these (repeatable); default: every case of the scale in every dtype")
    ap.add_argument("--jsonl", default=None, help="append each verdict to this results file")
    ap.add_argument("--deadline", type=float, default=None, help="start no check after this time.time()")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = {(k, c): p for k, c, p in SMOKE[a.scale]}
    todo = [s.split("|") for s in a.only] or [[k, c, d] for k, c in cases for d in DTYPES]
    print(f"smoke: {len(todo)} case(s) on {device}, configs "
          f"{'pinned' if os.environ.get('MEGABYTE_PIN_CONFIGS', '0') not in ('', '0') else 'autotuned'}", flush=True)
    ok = True
    for kernel, case, dtype in todo:
        if a.deadline is not None and time.time() > a.deadline:
            print(f"NOT RUN  {kernel} {case}  {dtype}: the smoke stage's time limit was reached", flush=True)
            ok = False
            continue
        try:
            rows = run_case(kernel, case, cases[(kernel, case)], dtype, device, a.jsonl)
        except Exception as e:  # noqa: BLE001 - the CUDA context is gone: nothing more can run here
            print(f"smoke: CUDA context lost ({short(e)}); the remaining checks of this process are not run",
                  flush=True)
            return 3
        ok &= all(r["verdict"] == "PASS" for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
