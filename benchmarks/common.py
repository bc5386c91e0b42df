"""Shared helpers of the microbenchmarks: timing, copy bandwidth, and the record of where a
result was measured (DESIGN.md §5: GPU name, torch and triton versions, git sha, command).

Keep this API additive: several benchmark modules import it.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SkipSuite(Exception):
    """Raised by a benchmark module's ``run()`` that does not apply to the device asked for:
    ``benchmarks/run.py`` records the message as the suite's note, not as an error."""


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_record(device: str | torch.device) -> dict:
    """Where and with what a result was measured; CPU results say CPU."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
            "git_sha": git_sha(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def bench_ms(fn: Callable[[], object], device: str | torch.device, *, quick: bool = False) -> float:
    """Median time of ``fn()`` in milliseconds: ``triton.testing.do_bench`` on CUDA, a
    median of wall-clock repeats (after one warm-up) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + (0.2 if quick else 1.0)
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


_COPY_GBS: dict[tuple, float] = {}


def copy_bandwidth(device: str | torch.device, nbytes: int = 1 << 30, *, quick: bool = False) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + bytes written per second) of a
    ``dst.copy_(src)`` of ``nbytes``; cached per device and size."""
    device = torch.device(device)
    if quick:
        nbytes = min(nbytes, 1 << 26)
    key = (str(device), nbytes)
    if key not in _COPY_GBS:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = bench_ms(lambda: dst.copy_(src), device, quick=quick)
        _COPY_GBS[key] = 2 * nbytes / (ms * 1e-3) / 1e9
    return _COPY_GBS[key]


def compiled(fn: Callable) -> Callable | None:
    """``torch.compile(fn)``, or None when compilation is unavailable here."""
    try:
        return torch.compile(fn)
    except Exception:  # noqa: BLE001 - a missing compiler toolchain is a skipped row, not an error
        return None


def run_context(device: str | torch.device, *, quick: bool = False) -> tuple:
    """What an op benchmark's ``run()`` starts from: ``(device as str, is_cuda, dtype, record,
    copy_gbs)`` with dtype bf16 on CUDA and fp32 elsewhere, the :func:`device_record` and the
    measured :func:`copy_bandwidth` in GB/s."""
    device = str(device)
    is_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if is_cuda else torch.float32
    rec = device_record(device)
    copy_gbs = copy_bandwidth(device, quick=quick)
    return device, is_cuda, dtype, rec, copy_gbs


def reference_impls(ref_fn: Callable) -> dict[str, Callable]:
    """The baseline rows of an op benchmark: ``{"eager": ref_fn, "torch.compile": compiled(ref_fn)}``,
    without the latter when compilation is unavailable here."""
    impls = {"eager": lambda *a, **k: ref_fn(*a, **k)}
    comp = compiled(ref_fn)
    if comp is not None:
        impls["torch.compile"] = comp
    return impls


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of result rows (the keys of the first row are the columns)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(cell(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
