"""The workers of gpu-check's preflight and benchmark stage (``benchmarks/gpu_check.py`` runs them).

    python3 -m benchmarks.gpu_bench preflight --scale gpu --jsonl R.jsonl
    python3 -m benchmarks.gpu_bench warm --scale gpu --jsonl R.jsonl --group flash --index 2
    python3 -m benchmarks.gpu_bench run --scale gpu --jsonl R.jsonl --deadline T [--items flash/0,...]

``preflight``: GPU, driver, versions, ninja and a C++ compiler, and the two ceilings measured:
device copy bandwidth (a 1 GiB ``copy_``, bytes read + written) and bf16 GEMM TFLOP/s (8192³ on
random data), both ``triton.testing.do_bench`` medians.

``run``: the benchmark items of ``benchmarks/gpu_plan.py`` in order of value, autotuned (configs
not pinned); every row appended to the results file the moment it is measured; an item that
does not fit the time left is recorded as skipped. Flash attention (bf16, causal, d=128,
H=16, B=16384/N, MHA and MQA) forward and forward+backward against each SDPA backend, then the
parity of each shape's autotune winner at batch 1 (same autotune key, so the benchmark's winner
is reused: FlashAttention's tolerance against float64, NaN-poisoned outputs); local attention
(P=8, d=64, H=4, 1M patches) in GB/s against the copy bandwidth and SDPA; patch_embed and
global_to_local at 1M bytes against the eager reference, with the parity of their winners;
cached generation, one training step (Triton vs reference), the T=2^20 memory row.

``warm``: compile ahead, in parallel with the smoke stage: the process makes every autotuned
kernel run only the ``index``-th config of its list and runs a group's workloads once, so that
Triton's on-disk cache holds each config when the benchmark's autotuner compiles it (compiling
is CPU-bound and single-threaded; the GPU machine has 16 cores). Only a time saver.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

import torch

from benchmarks import bench_causal_attention as bca
from benchmarks import bench_global_to_local as bg2l
from benchmarks import bench_patch_embed as bpe
from benchmarks.common import bench_ms, copy_bandwidth
from benchmarks.gpu_plan import BENCH, append_row, bench_items, flash_label, read_rows
from benchmarks.gpu_smoke import check_attention, check_global_to_local, check_patch_embed, context_lost, short
from benchmarks.gpu_smoke import verdict as pass_verdict
from megabyte_kernels import global_to_local, patch_embed, reference
from megabyte_kernels.attention import flash_attention, local_attention


class ContextLost(RuntimeError):
    """The CUDA context is unusable (an illegal access, say): this process must stop."""


class Ctx:
    """What every item needs: scale and sizes, device, dtype, results file, deadline, timer."""

    def __init__(self, scale: str, jsonl: str, deadline: float | None):
        self.scale, self.plan, self.jsonl = scale, BENCH[scale], jsonl
        self.deadline = deadline if deadline is not None else time.time() + 3600
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16
        self.copy_gbs: float | None = None

    def left(self) -> float:
        return self.deadline - time.time()

    def emit(self, row: dict) -> dict:
        append_row(self.jsonl, row)
        return row

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def timer(self, fn) -> float:
        """Median ms: ``do_bench`` on the GPU; on CPU (the dry run, Triton's interpreter: plumbing,
        not figures) a single call, compilation and all."""
        if self.cuda:
            return bench_ms(fn, self.device)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def randn(self, *shape, seed: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        """Random ``self.dtype`` tensor made on the device (2^31 elements need no host copy)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        t = torch.randn(*shape, generator=g, device=self.device, dtype=self.dtype)
        if scale != 1.0:
            t.mul_(scale)
        return t.requires_grad_(grad)

    def randint(self, high: int, shape, seed: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randint(0, high, shape, generator=g, device=self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------
# preflight
# ------------------------------------------------------------------------------------------
def _which_cxx() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15).stdout.strip()
        if out:
            return out.splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        v = torch._C._cuda_getDriverVersion()  # the CUDA driver API version, e.g. 12080
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
    except Exception:  # noqa: BLE001
        return None


def preflight(ctx: Ctx) -> dict:
    """Versions and tools, then the measured ceilings (each guarded: a failure is recorded)."""
    import numpy

    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    row = {"kind": "preflight", "python": platform.python_version(), "executable": sys.executable,
           "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "triton": triton_v,
           "numpy": numpy.__version__, "cuda_available": ctx.cuda, "cpu_count": os.cpu_count(),
           "ninja": shutil.which("ninja"), "cxx": _which_cxx(),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
           "MEGABYTE_PIN_CONFIGS": os.environ.get("MEGABYTE_PIN_CONFIGS")}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   driver=_driver(), gpu_count=torch.cuda.device_count())
    else:
        row["gpu"] = None
    ctx.say(f"preflight: python {row['python']}, torch {row['torch']} (CUDA {row['cuda_runtime']}), triton "
            f"{row['triton']}, numpy {row['numpy']}; GPU {row.get('gpu')} driver {row.get('driver')}; "
            f"ninja {row['ninja'] or 'absent'}; C++ compiler {row['cxx'] or 'absent'}")
    try:
        nbytes = 1 << 30 if ctx.cuda else 1 << 26
        row["copy_GB_s"] = copy_bandwidth(ctx.device, nbytes, quick=not ctx.cuda)
        row["copy_bytes"] = nbytes
        ctx.say(f"preflight: device copy {row['copy_GB_s']:.0f} GB/s (read + write, {nbytes >> 20} MiB)")
    except Exception as e:  # noqa: BLE001
        row["copy_error"] = short(e)
    try:
        n = 8192 if ctx.cuda else 256
        a, b = ctx.randn(n, n, seed=1), ctx.randn(n, n, seed=2)
        ms = ctx.timer(lambda: a @ b)
        row.update(gemm_n=n, gemm_TFLOP_s=2 * n**3 / (ms * 1e-3) / 1e12)
        ctx.say(f"preflight: bf16 GEMM {n}^3 {row['gemm_TFLOP_s']:.1f} TFLOP/s")
        del a, b
    except Exception as e:  # noqa: BLE001
        row["gemm_error"] = short(e)
    ctx.free()
    return ctx.emit(row)


# ------------------------------------------------------------------------------------------
# timing helpers
# ------------------------------------------------------------------------------------------
def _pass_fn(f, what: str, inputs: tuple, grad_of: tuple, grad):
    """``f(*inputs)`` under no_grad ("fwd") or with the gradients of ``grad_of`` ("fwd+bwd")."""
    if what == "fwd":
        def run():
            with torch.no_grad():
                return f(*inputs)
    else:
        def run():
            return torch.autograd.grad(f(*inputs), grad_of, grad)
    return run


def timed(ctx: Ctx, item: str, impl: str, what: str, fn, figures, **info) -> dict:
    """Time ``fn``, add ``figures(ms)``, append the row; an error is recorded as the row's."""
    row = {"kind": "bench", "item": item, "impl": impl, "pass": what, **info}
    try:
        ms = ctx.timer(fn)
        row["ms"] = ms
        row.update(figures(ms))
    except Exception as e:  # noqa: BLE001 - unsupported backend, out of memory, compile failure
        row["error"] = short(e)
        if context_lost(e):
            ctx.emit(row)
            raise ContextLost(row["error"]) from e
        ctx.free()
    ctx.emit(row)
    figs = "  ".join(f"{k} {v:.3g}" for k, v in row.items()
                     if k in ("ms", "TFLOP/s", "GB/s", "frac_copy") and isinstance(v, float))
    ctx.say(f"  {item:24s} {impl:28s} {what:8s} " + (figs or f"error: {row['error']}"))
    return row


def compare(ctx: Ctx, item: str, what: str, rows: list[dict], base_prefix: str, **extra) -> dict:
    """The ratio row: fastest ``base_prefix*`` row's ms over the Triton row's (> 1: Triton faster)."""
    mine = next((r for r in rows if r["impl"] == "triton" and "ms" in r), None)
    base = [r for r in rows if r["impl"].startswith(base_prefix) and "ms" in r]
    best = min(base, key=lambda r: r["ms"]) if base else None
    row = {"kind": "compare", "item": item, "pass": what, "vs": base_prefix,
           "ratio": best["ms"] / mine["ms"] if mine and best else None,
           "best": best["impl"] if best else None, "best_ms": best["ms"] if best else None,
           "triton_ms": mine["ms"] if mine else None,
           "ran": [r["impl"] for r in rows if "ms" in r],
           "errored": {r["impl"]: r["error"] for r in rows if "error" in r}, **extra}
    for key in ("TFLOP/s", "GB/s", "frac_copy"):
        if mine and key in mine:
            row[f"triton_{key}"] = mine[key]
        if best and key in best:
            row[f"best_{key}"] = best[key]
    ctx.say(f"  {item:24s} triton vs fastest {base_prefix} ({row['best']}) {what}: "
            + (f"{row['ratio']:.2f}x" if row["ratio"] else "no ratio (a side did not run)"))
    return ctx.emit(row)


# ------------------------------------------------------------------------------------------
# autotune winners
# ------------------------------------------------------------------------------------------
def autotuners() -> dict:
    """{name: triton Autotuner} of every autotuned kernel of megabyte_kernels built so far."""
    from triton.runtime.autotuner import Autotuner

    out = {}
    for modname in ("patch_embed", "global_to_local", "flash_attention", "local_attention"):
        mod = importlib.import_module(f"megabyte_kernels.{modname}")
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner):
                out[name] = obj
    fa = importlib.import_module("megabyte_kernels.flash_attention")
    for key, at in getattr(fa, "_TUNED", {}).items():
        out["{}[{} {}]".format(*key[:3])] = at
    return out


def tuned_configs() -> dict:
    """{kernel: {autotune key: winning config}} as strings."""
    return {n: {str(k): str(c) for k, c in at.cache.items()} for n, at in autotuners().items() if at.cache}


def _cache_keys() -> set:
    return {(n, k) for n, at in autotuners().items() for k in at.cache}


def parity_item(ctx: Ctx, item: str, checks_gen, kernels: tuple[str, ...], shape: str) -> dict:
    """Run a parity generator (gpu_smoke's checks) once; the row says PASS/FAIL, the configs the
    kernels ran with, and whether the benchmark's autotune winners were reused (no new key)."""
    before = _cache_keys()
    row = {"kind": "parity", "item": item, "shape": shape, "dtype": "bf16", "passes": {}}
    t0 = time.perf_counter()
    try:
        for pass_, checks in checks_gen:
            row["passes"][pass_] = pass_verdict(checks)
        bad = [p for p, v in row["passes"].items() if v["verdict"] != "PASS"]
        row["verdict"] = "FAIL" if bad else "PASS"
        worst = max(row["passes"].values(), key=lambda v: v["ratio"])
        row.update(worst=worst["worst"], ratio=worst["ratio"], err=worst["err"], bound=worst["bound"])
    except torch.OutOfMemoryError as e:
        row.update(verdict="not run", error=f"out of memory: {short(e)}")
    except Exception as e:  # noqa: BLE001
        row.update(verdict="FAIL", error=short(e))
        if context_lost(e):
            ctx.emit(row)
            raise ContextLost(row["error"]) from e
    ats = autotuners()
    row["configs"] = {n: str(getattr(at, "best_config", None)) for n, at in ats.items()
                      if any(k in n for k in kernels) and getattr(at, "best_config", None) is not None}
    new = _cache_keys() - before
    row["winner"] = ("autotuned afresh here (the benchmark's tuning is not in this process)" if new else
                     "the benchmark's autotune winners (same keys, no retuning)" if before else
                     "single config (no autotuning: interpreter or pinned)")
    row["wall_s"] = time.perf_counter() - t0
    ctx.say(f"  {item:24s} parity of the autotune winner, {shape}: {row['verdict']}"
            + (f" (worst {row.get('worst')}: err/bound {row['ratio']:.2f})" if "ratio" in row else
               f" ({row.get('error')})") + f"; {row['winner']}")
    ctx.free()
    return ctx.emit(row)


# ------------------------------------------------------------------------------------------
# the items
# ------------------------------------------------------------------------------------------
def _attention_rows(ctx, item, q, k, v, do, impls, figures, info, backends):
    """Each impl forward, then forward+backward; a compare row after each pass. An SDPA backend
    without grouped-query support is tried again on key/value heads expanded to Hq (labelled)."""
    G = q.shape[1] // k.shape[1]
    plain = bca.sdpa_impls(backends, gqa=False) if G > 1 else {}
    for what in ("fwd", "fwd+bwd"):
        rows = []
        for name, f in impls.items():
            if ctx.left() <= 0:
                break
            if f is None:
                rows.append(ctx.emit({"kind": "bench", "item": item, "impl": name, "pass": what, **info,
                                      "error": "backend not in this torch"}))
                continue
            fn = _pass_fn(f, what, (q, k, v), (q, k, v), do)
            r = timed(ctx, item, name, what, fn, lambda ms: figures(what, ms), **info)
            rows.append(r)
            if "error" in r and plain.get(name) is not None:
                ke, ve = (t.detach().repeat_interleave(G, dim=1).requires_grad_() for t in (k, v))
                fn = _pass_fn(plain[name], what, (q, ke, ve), (q, ke, ve), do)
                rows.append(timed(ctx, item, f"{name} kv expanded", what, fn, lambda ms: figures(what, ms), **info))
                del ke, ve
        compare(ctx, item, what, rows, "sdpa", shape=info.get("shape"))


def item_flash(ctx: Ctx, i: int) -> None:
    s = ctx.plan["flash"][i]
    B, H, Hkv, N, d = s["B"], s["H"], s["Hkv"], s["N"], s["d"]
    q = ctx.randn(B, H, N, d, seed=1, grad=True)
    k, v = ctx.randn(B, Hkv, N, d, seed=2, grad=True), ctx.randn(B, Hkv, N, d, seed=3, grad=True)
    do = ctx.randn(B, H, N, d, seed=4)
    impls = {"triton": lambda q, k, v: flash_attention(q, k, v)}
    impls.update(bca.sdpa_impls(ctx.plan["flash_sdpa"], gqa=Hkv != H))
    info = dict(shape=flash_label(s), dtype="bf16", **s)
    _attention_rows(ctx, f"flash/{i}", q, k, v, do, impls,
                    lambda what, ms: {"TFLOP/s": bca.attention_tflops(B, H, N, d, what, ms)}, info,
                    ctx.plan["flash_sdpa"])
    ctx.emit({"kind": "tuned", "item": f"flash/{i}", "configs": tuned_configs()})


def item_flash_parity(ctx: Ctx, i: int) -> None:
    s = dict(ctx.plan["flash"][i], B=ctx.plan["flash_parity_B"], alibi=False)
    parity_item(ctx, f"flash_parity/{i}", check_attention(s, "bf16", ctx.device, "flash"), ("flash",),
                flash_label(s))


def item_local(ctx: Ctx) -> None:
    s = ctx.plan["local"]
    B, H, Hkv, N, d = s["B"], s["H"], s["Hkv"], s["N"], s["d"]
    q = ctx.randn(B, H, N, d, seed=1, grad=True)
    k, v = ctx.randn(B, Hkv, N, d, seed=2, grad=True), ctx.randn(B, Hkv, N, d, seed=3, grad=True)
    do = ctx.randn(B, H, N, d, seed=4)
    impls = {"triton": lambda q, k, v: local_attention(q, k, v)}
    impls.update(bca.sdpa_impls(ctx.plan["local_sdpa"], gqa=Hkv != H))
    copy = ctx.copy_gbs

    def figures(what, ms):
        gbs = bca.local_attention_bytes(q.numel(), k.numel(), q.element_size(), what) / (ms * 1e-3) / 1e9
        return {"GB/s": gbs, "frac_copy": gbs / copy if copy else None}

    info = dict(shape=f"B*K={B} H={H} Hkv={Hkv} P={N} d={d}", dtype="bf16", copy_GB_s=copy, **s)
    _attention_rows(ctx, "local", q, k, v, do, impls, figures, info, ctx.plan["local_sdpa"])


def item_local_variants(ctx: Ctx) -> None:
    """The local forward and forward+backward at the target's shape, bf16, beside the ``local``
    item's rows: on the model's strided views (q rearranged from (B*K, P, H*d), k and v halves of a
    (B*K, P, 2*Hkv*d) projection: read in place, no copies), and on contiguous tensors with 16- and
    64-row tiles instead of the default (``local_attention.TILE_ROWS_16BIT``): the tile size the
    performance model can only estimate, measured."""
    from megabyte_kernels import local_attention as la

    s = ctx.plan["local"]
    B, H, Hkv, N, d = s["B"], s["H"], s["Hkv"], s["N"], s["d"]
    default = la.TILE_ROWS_16BIT
    xq = ctx.randn(B, N, H * d, seed=1, grad=True)
    xkv = ctx.randn(B, N, 2 * Hkv * d, seed=2, grad=True)
    views = (xq.view(B, N, H, d).transpose(1, 2),
             *(t.reshape(B, N, Hkv, d).transpose(1, 2) for t in xkv.chunk(2, dim=-1)))
    do_view = ctx.randn(B, N, H * d, seed=4).view(B, N, H, d).transpose(1, 2)
    q = ctx.randn(B, H, N, d, seed=1, grad=True)
    k, v = ctx.randn(B, Hkv, N, d, seed=2, grad=True), ctx.randn(B, Hkv, N, d, seed=3, grad=True)
    do = ctx.randn(B, H, N, d, seed=4)
    variants = [("triton, the model's views", default, views, (xq, xkv), do_view),
                ("triton 16-row tiles", 16, (q, k, v), (q, k, v), do),
                ("triton 64-row tiles", 64, (q, k, v), (q, k, v), do)]
    info = dict(shape=f"B*K={B} H={H} Hkv={Hkv} P={N} d={d}", dtype="bf16", copy_GB_s=ctx.copy_gbs, **s)
    try:
        for what in ("fwd", "fwd+bwd"):
            for name, rows, inputs, leaves, grad in variants:
                if ctx.left() <= 0:
                    return

                def f(*x, rows=rows):  # the forward sets the rows its backward launch reads too
                    la.TILE_ROWS_16BIT = rows
                    return local_attention(*x)

                def figures(ms, what=what):
                    gbs = bca.local_attention_bytes(q.numel(), k.numel(), q.element_size(), what) / (ms * 1e-3) / 1e9
                    return {"GB/s": gbs, "frac_copy": gbs / ctx.copy_gbs if ctx.copy_gbs else None,
                            "tile_rows": rows}
                timed(ctx, "local_variants", name, what, _pass_fn(f, what, inputs, leaves, grad), figures, **info)
    finally:
        la.TILE_ROWS_16BIT = default


def _op_rows(ctx, item, impls, grad_of, grad, nbytes: dict, info, flops: dict | None = None):
    """Time each impl forward and forward+backward; GB/s against the copy bandwidth; compare vs eager."""
    for what in ("fwd", "fwd+bwd"):
        rows = []
        for name, f in impls.items():
            if ctx.left() <= 0:
                break

            def figures(ms, what=what):
                gbs = nbytes[what] / (ms * 1e-3) / 1e9
                fig = {"GB/s": gbs, "frac_copy": gbs / ctx.copy_gbs if ctx.copy_gbs else None}
                if flops:
                    fig["TFLOP/s"] = flops[what] / (ms * 1e-3) / 1e12
                return fig
            rows.append(timed(ctx, item, name, what, _pass_fn(f, what, (), grad_of, grad), figures, **info))
        compare(ctx, item, what, rows, "eager", shape=info.get("shape"))
    ctx.emit({"kind": "tuned", "item": item, "configs": tuned_configs()})


def item_patch_embed(ctx: Ctx) -> None:
    s = ctx.plan["patch_embed"]
    B, T, P, D = s["B"], s["T"], s["P"], s["D"]
    ids = ctx.randint(256, (B, T), seed=0)
    table = ctx.randn(bpe.V, D, seed=1, scale=0.02, grad=True)
    pos = ctx.randn(T, D, seed=2, scale=0.02, grad=True)
    grad = ctx.randn(B, -(-T // P), P * D, seed=3)
    kw = dict(patch_size=P, pad_id=bpe.PAD)
    impls = {"triton": lambda: patch_embed(ids, table, pos, backend="triton", **kw),
             "eager": lambda: reference.patch_embed(ids, table, pos, **kw)}
    fwd, bwd = bpe.traffic_bytes(B, T, P, D, ids.element_size(), table.element_size())
    info = dict(shape=f"B={B} T={T} P={P} D_G={D}", dtype="bf16", copy_GB_s=ctx.copy_gbs, **s)
    _op_rows(ctx, "patch_embed", impls, (table, pos), grad, {"fwd": fwd, "fwd+bwd": fwd + bwd}, info)


def item_patch_embed_parity(ctx: Ctx) -> None:
    s = ctx.plan["patch_embed"]
    p = dict(s, B=ctx.plan["ops_parity_B"], V=bpe.V, pad_id=bpe.PAD)
    parity_item(ctx, "patch_embed_parity", check_patch_embed(p, "bf16", ctx.device), ("patch_embed",),
                f"B={p['B']} T={p['T']} P={p['P']} D_G={p['D']}")


def item_global_to_local(ctx: Ctx) -> None:
    s = ctx.plan["global_to_local"]
    B, T, P, D_G, D_L = s["B"], s["T"], s["P"], s["D_G"], s["D_L"]
    K = -(-T // P)
    ids = ctx.randint(256, (B, T), seed=0)
    x = ctx.randn(B, K, P * D_G, seed=1, grad=True)
    w = ctx.randn(D_L, D_G, seed=2, scale=0.02, grad=True)
    b = ctx.randn(D_L, seed=3, scale=0.02, grad=True)
    table = ctx.randn(bg2l.V, D_L, seed=4, scale=0.02, grad=True)
    grad = ctx.randn(B * K, P, D_L, seed=5)
    kw = dict(patch_size=P, pad_id=bg2l.PAD)
    impls = {"triton": lambda: global_to_local(x, ids, w, b, table, backend="triton", **kw),
             "eager": lambda: reference.global_to_local(x, ids, w, b, table, **kw)}
    fwd, bwd = bg2l.traffic_bytes(B, T, P, D_G, D_L, ids.element_size(), x.element_size())
    flops = 2 * B * K * P * D_G * D_L
    info = dict(shape=f"B={B} T={T} P={P} D_G={D_G} D_L={D_L}", dtype="bf16", copy_GB_s=ctx.copy_gbs, **s)
    _op_rows(ctx, "global_to_local", impls, (x, w, b, table), grad, {"fwd": fwd, "fwd+bwd": fwd + bwd}, info,
             flops={"fwd": flops, "fwd+bwd": 3 * flops})


def item_global_to_local_parity(ctx: Ctx) -> None:
    s = ctx.plan["global_to_local"]
    p = dict(s, B=ctx.plan["ops_parity_B"], V=bg2l.V, pad_id=bg2l.PAD)
    parity_item(ctx, "global_to_local_parity", check_global_to_local(p, "bf16", ctx.device), ("g2l",),
                f"B={p['B']} T={p['T']} P={p['P']} D_G={p['D_G']} D_L={p['D_L']}")


def _num(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def item_generation(ctx: Ctx) -> None:
    """The static decoder against the dynamic one, per batch size and with / without CUDA graphs
    (``bench_generation.measure``; recompute only at batch 1), most valuable row first."""
    from benchmarks import bench_generation

    s = ctx.plan["generation"]
    for batch in s["batches"]:
        for graphs in s["graphs"]:
            if ctx.left() < 5.0:
                ctx.say(f"  generation               batch {batch} graphs {graphs}: skipped, budget spent")
                continue
            row = bench_generation.measure(ctx.device, s["prompt"], s["new"], repeats=s["repeats"], batch=batch,
                                           config=s["config"], graphs=graphs and ctx.cuda,
                                           recompute=batch == 1 and graphs == s["graphs"][0],
                                           dynamic=graphs == s["graphs"][0])
            ctx.emit({"kind": "bench", "item": "generation", "impl": row["backend"], "pass": "generate", **row})
            ctx.say(f"  generation               batch {batch}, graphs {row['graphs']} ({row['graphs_used']} "
                    f"captured, {row['capture_s']:.2f} s): static {row['static_bytes_per_s']:.0f} bytes/s, "
                    f"dynamic {_num(row['dynamic_bytes_per_s'])}; ops/byte {row.get('static_ops_per_byte')} vs "
                    f"{row.get('dynamic_ops_per_byte')}, syncs/byte {row.get('static_syncs_per_byte')} vs "
                    f"{row.get('dynamic_syncs_per_byte')}; same bytes: {row['same_bytes']}")


def item_train_step(ctx: Ctx) -> None:
    from benchmarks import bench_model

    s = ctx.plan["train"]
    impls = ["megabyte[triton]" if ctx.cuda else "megabyte[auto]", "megabyte[reference]"]
    rows = bench_model.run(ctx.device, quick=False, smoke=s["scale"] == "smoke", configs=[s["config"]],
                           impls=impls, budget_s=1.0 if ctx.cuda else 0.2,
                           deadline=time.perf_counter() + ctx.left(), log=ctx.say)
    for r in rows:
        ctx.emit({"kind": "bench", "item": "train_step", "pass": "train", **r})


def item_long_context(ctx: Ctx) -> None:
    from benchmarks import bench_long_context as blc

    s = ctx.plan["long_context"]
    row = blc.measure(s["T"], getattr(blc, s["dims"]), True, ctx.device)
    ctx.emit({"kind": "bench", "item": "long_context", "impl": row.get("backend"), "pass": "train", **row})
    ctx.say(f"  long_context             T={s['T']}: " + (row.get("error") or
            f"{row.get('step_ms')} ms/step, peak {row.get('peak_GiB')} GiB of {row.get('device_GiB')} GiB"))


ITEMS = {
    "flash": item_flash, "flash_parity": item_flash_parity, "local": item_local,
    "local_variants": item_local_variants,
    "patch_embed": item_patch_embed, "patch_embed_parity": item_patch_embed_parity,
    "global_to_local": item_global_to_local, "global_to_local_parity": item_global_to_local_parity,
    "generation": item_generation, "train_step": item_train_step, "long_context": item_long_context,
}


def run_item(ctx: Ctx, name: str) -> None:
    """``flash/2`` -> item_flash(ctx, 2); ``local`` -> item_local(ctx)."""
    base, _, idx = name.partition("/")
    fn = ITEMS[base]
    fn(ctx, int(idx)) if idx else fn(ctx)


def run_items(ctx: Ctx, names: list[str]) -> int:
    """Each item in order, with start / done / skipped / failed events; 3 when the CUDA context
    is lost (the orchestrator restarts a fresh worker for the items left)."""
    need = dict(bench_items(ctx.scale))
    pf = [r for r in read_rows(ctx.jsonl) if r.get("kind") == "preflight" and r.get("copy_GB_s")]
    try:
        ctx.copy_gbs = pf[-1]["copy_GB_s"] if pf else copy_bandwidth(ctx.device, 1 << 30 if ctx.cuda else 1 << 26)
    except Exception as e:  # noqa: BLE001
        ctx.say(f"copy bandwidth unknown ({short(e)}): no fractions of it")
    for name in names:
        left = ctx.left()
        if left < need.get(name, 0.0) or left <= 0:
            ctx.emit({"kind": "event", "item": name, "event": "skipped",
                      "reason": f"{max(left, 0):.0f} s left, the item needs {need.get(name, 0):.0f} s"})
            ctx.say(f"[{name}] skipped: {max(left, 0):.0f} s left")
            continue
        ctx.emit({"kind": "event", "item": name, "event": "start"})
        ctx.say(f"[{name}] ...")
        t0 = time.perf_counter()
        try:
            run_item(ctx, name)
        except ContextLost as e:
            ctx.emit({"kind": "event", "item": name, "event": "crashed", "reason": f"CUDA context lost: {e}"})
            ctx.say(f"[{name}] CUDA context lost: {e}; this worker stops")
            return 3
        except Exception as e:  # noqa: BLE001 - one failing item must not lose the others
            ctx.emit({"kind": "event", "item": name, "event": "failed", "reason": short(e),
                      "traceback": traceback.format_exc()[-2000:]})
            ctx.say(f"[{name}] failed: {short(e)}")
            if context_lost(e):
                return 3
        else:
            ctx.emit({"kind": "event", "item": name, "event": "done", "wall_s": time.perf_counter() - t0})
            ctx.say(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
        ctx.free()
    return 0


# ------------------------------------------------------------------------------------------
# compile ahead
# ------------------------------------------------------------------------------------------
def pick_config(index: int) -> None:
    """Every autotuned kernel of megabyte_kernels (the flash ones as they are built) compiles and
    runs only the ``index``-th config of its pruned list (the last when the list is shorter)."""
    fa = importlib.import_module("megabyte_kernels.flash_attention")

    def wrap(at):
        if not getattr(at, "_gpu_check_pick", False):
            orig = at.early_config_prune

            def prune(configs, named_args, **kw):
                kept = orig(configs, named_args, **kw) if orig else list(configs)
                return [kept[min(index, len(kept) - 1)]]
            at.early_config_prune = prune
            at._gpu_check_pick = True
        return at

    for at in autotuners().values():
        wrap(at)
    orig_tuned = fa._tuned
    fa._tuned = lambda *a, **k: wrap(orig_tuned(*a, **k))


def warm_flash(ctx: Ctx) -> None:
    """Flash forward + backward at each benchmark shape's specialization (batch 1)."""
    seen = set()
    for s in ctx.plan["flash"]:
        key = (s["H"], s["Hkv"], s["d"])
        if key in seen:
            continue
        seen.add(key)
        q = ctx.randn(1, s["H"], s["N"], s["d"], seed=1, grad=True)
        k, v = (ctx.randn(1, s["Hkv"], s["N"], s["d"], seed=j, grad=True) for j in (2, 3))
        torch.autograd.grad(flash_attention(q, k, v), (q, k, v), torch.ones_like(q))


def warm_ops(ctx: Ctx) -> None:
    """patch_embed and global_to_local forward + backward at the benchmark's widths."""
    B = ctx.plan["ops_parity_B"]
    s = ctx.plan["patch_embed"]
    ids = ctx.randint(256, (B, s["T"]), seed=0)
    table, pos = ctx.randn(bpe.V, s["D"], seed=1, grad=True), ctx.randn(s["T"], s["D"], seed=2, grad=True)
    out = patch_embed(ids, table, pos, patch_size=s["P"], pad_id=bpe.PAD, backend="triton")
    torch.autograd.grad(out, (table, pos), torch.ones_like(out))
    s = ctx.plan["global_to_local"]
    K = -(-s["T"] // s["P"])
    ids = ctx.randint(256, (B, s["T"]), seed=0)
    x = ctx.randn(B, K, s["P"] * s["D_G"], seed=1, grad=True)
    w, b = ctx.randn(s["D_L"], s["D_G"], seed=2, grad=True), ctx.randn(s["D_L"], seed=3, grad=True)
    table = ctx.randn(bg2l.V, s["D_L"], seed=4, grad=True)
    out = global_to_local(x, ids, w, b, table, patch_size=s["P"], pad_id=bg2l.PAD, backend="triton")
    torch.autograd.grad(out, (x, w, b, table), torch.ones_like(out))


def warm_model(ctx: Ctx) -> None:
    """One Triton training step at the benchmark config, and the long-context model at T = 2^14."""
    from benchmarks import bench_long_context as blc
    from benchmarks import bench_model

    c = bench_model.CONFIGS[ctx.plan["train"]["scale"]][ctx.plan["train"]["config"]]
    built = bench_model.build_megabyte(c, ctx.device, torch.bfloat16, "triton")
    bench_model.Trainer(built, c, ctx.device).step()
    del built
    ctx.free()
    blc.measure(2**14, getattr(blc, ctx.plan["long_context"]["dims"]), True, ctx.device)


WARM = {"flash": warm_flash, "ops": warm_ops, "model": warm_model}


def warm(ctx: Ctx, groups: str, index: int) -> int:
    pick_config(index)
    rc = 0
    for group in groups.split("+"):
        t0 = time.perf_counter()
        row = {"kind": "warm", "group": group, "index": index}
        try:
            WARM[group](ctx)
        except Exception as e:  # noqa: BLE001 - compile-ahead only saves time; the benchmark compiles itself
            row["error"] = short(e)
            rc = 1
        row["wall_s"] = time.perf_counter() - t0
        ctx.emit(row)
        ctx.say(f"warm {group} config {index}: " + (f"error {row['error']}" if "error" in row else "compiled")
                + f" in {row['wall_s']:.1f} s")
        ctx.free()
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["preflight", "warm", "run"])
    ap.add_argument("--scale", choices=sorted(BENCH), default="gpu")
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--deadline", type=float, default=None, help="time.time() after which nothing starts")
    ap.add_argument("--items", default=None, help="comma-separated items (default: all, in order)")
    ap.add_argument("--group", default="flash", help="warm: the workloads (flash, ops, model; a+b for several)")
    ap.add_argument("--index", type=int, default=0, help="warm: which config of each autotune list")
    a = ap.parse_args(argv)
    ctx = Ctx(a.scale, a.jsonl, a.deadline)
    if a.command == "preflight":
        preflight(ctx)
        return 0
    if a.command == "warm":
        return warm(ctx, a.group, a.index)
    names = a.items.split(",") if a.items else [n for n, _ in bench_items(a.scale)]
    return run_items(ctx, names)


if __name__ == "__main__":
    sys.exit(main())
