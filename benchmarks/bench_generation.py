"""Generation speed: cached incremental decoding vs full recomputation, ms per byte and ratio.

    python -m benchmarks.bench_generation [--device cpu|cuda] [--quick] [--threads N]

Model (stated in every result row): the ``megabyte train`` demo size — P=4, D_G=64 (global
width 256), D_L=128, 4 global layers / 4 heads, 2 local layers / 4 heads, multi-query, V=512 —
with learned positions and T_MAX=2048 so that 1024 + 512 bytes fit. Random weights (speed does
not depend on them). Batch 1, greedy. The cached decoder (``megabyte.generation.generate``)
includes its prefill of the prompt; the recompute baseline
(``megabyte.generation.generate_uncached``) runs one full forward per new byte. Both must
produce the same bytes; the row records whether they did. ``--quick``: a 256-byte prompt and 64
new bytes.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch

from megabyte import Megabyte, MegabyteConfig
from megabyte.generation import generate, generate_uncached

CONFIG = dict(V=512, P=4, D_G=64, D_L=128, T_MAX=2048, g_nheads=4, g_nlayers=4, l_nheads=4, l_nlayers=2,
              initializer_range=0.02, pad_id=257, eos_id=258)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def run(device: str | torch.device = "cpu", quick: bool = False) -> list[dict]:
    """One row: cached and recomputed ms/byte, their ratio, bytes/s, and the setting."""
    device = torch.device(device)
    prompt_len, new = (256, 64) if quick else (1024, 512)
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig(**CONFIG)).to(device).eval()
    prompt = torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(temperature=0)
    generate(model, prompt[:, :64], 8, **kw)  # warm-up (allocator, kernels)
    generate_uncached(model, prompt[:, :64], 2, **kw)
    t_cached, ids_cached = _time(lambda: generate(model, prompt, new, **kw), device, repeats=1 if quick else 2)
    t_full, ids_full = _time(lambda: generate_uncached(model, prompt, new, **kw), device, repeats=1)
    row = {
        "bench": "generation", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "git": _git_sha(),
        "config": "P=4 D_G=64 D_L=128 g4x4 l2x4 MQA learned T_MAX=2048 V=512 fp32, batch 1, greedy",
        "backend": model.backend, "prompt_bytes": prompt_len, "new_bytes": new,
        "cached_ms_per_byte": 1e3 * t_cached / new, "recompute_ms_per_byte": 1e3 * t_full / new,
        "ratio": t_full / t_cached, "cached_bytes_per_s": new / t_cached,
        "same_bytes": bool(torch.equal(ids_cached, ids_full)),
    }
    return [row]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    for r in run(a.device, a.quick):
        print(f"generation benchmark ({r['device_name']}, {r['threads']} threads, torch {r['torch']}, git {r['git']})")
        print(f"  model: {r['config']}, backend {r['backend']}")
        print(f"  {r['new_bytes']} new bytes after a {r['prompt_bytes']}-byte prompt")
        print(f"  cached decoding : {r['cached_ms_per_byte']:8.3f} ms/byte  ({r['cached_bytes_per_s']:.0f} bytes/s, prefill included)")
        print(f"  full recompute  : {r['recompute_ms_per_byte']:8.3f} ms/byte")
        print(f"  speed-up        : {r['ratio']:8.1f}x   same bytes: {r['same_bytes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
