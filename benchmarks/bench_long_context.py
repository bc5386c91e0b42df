"""Peak memory and time of one training step at long context (issue: million-byte contexts).

    python -m benchmarks.bench_long_context            # GPU: T = 2^20 bytes, ~100M-parameter model
    python -m benchmarks.bench_long_context --quick    # CPU/GPU: T = 2^14, a tiny model (plumbing)

One step = bf16 autocast forward + backward + AdamW step, at batch 1, after one warm-up step
(so the optimizer state exists); the peak is ``torch.cuda.max_memory_allocated`` over that step.
Two variants per size: ``chunked`` (activation checkpointing of every transformer block + the
loss computed 8192 positions at a time, ``Megabyte.forward(..., loss_chunk=8192)``, so the
(T, V) logits never exist) and ``plain`` (neither; may run out of memory, which is recorded as a
row). The target: the ``chunked`` step at T = 2^20 fits on one H200 (141 GB) with room.

The ~100M model: P = 8, D_G = 128 (global width 1024), 8 global layers x 16 heads (multi-query),
D_L = 512, 4 local layers x 8 heads, ALiBi positions (no T_MAX-row table), V = 512.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from megabyte.config import MegabyteConfig
from megabyte.model import Megabyte

try:  # run as a module of the suite or as a script
    from .common import device_record
except ImportError:  # pragma: no cover
    from benchmarks.common import device_record

BIG = dict(P=8, D_G=128, D_L=512, g_nheads=16, g_nlayers=8, l_nheads=8, l_nlayers=4)
TINY = dict(P=8, D_G=16, D_L=32, g_nheads=2, g_nlayers=1, l_nheads=2, l_nlayers=1)
LOSS_CHUNK = 8192


def _model(T: int, dims: dict, device) -> Megabyte:
    cfg = MegabyteConfig(V=512, T_MAX=T, positions="alibi", **dims)
    return Megabyte(cfg).to(device)


def _step(model, opt, ids, chunked: bool, autocast) -> float:
    opt.zero_grad(set_to_none=True)
    with autocast:
        loss = model(ids, return_loss=True, **({"loss_chunk": LOSS_CHUNK} if chunked else {})).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def measure(T: int, dims: dict, chunked: bool, device) -> dict:
    device = torch.device(device)
    cuda = device.type == "cuda"
    row = {"bench": "long_context", "T": T, "variant": "chunked" if chunked else "plain", "batch": 1,
           "loss_chunk": LOSS_CHUNK if chunked else None, "checkpointing": chunked}
    model = opt = None
    try:
        torch.manual_seed(0)
        model = _model(T, dims, device)
        row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        row["backend"] = model.backend
        model.set_checkpointing(chunked, chunked)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))
        ids = torch.randint(0, 256, (1, T), device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
        _step(model, opt, ids, chunked, autocast)  # warm-up: kernels compiled, optimizer state allocated
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        row["loss"] = _step(model, opt, ids, chunked, autocast)
        if cuda:
            torch.cuda.synchronize(device)
        row["step_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
        row["bytes_per_s"] = round(T / (row["step_ms"] / 1e3))
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            total = torch.cuda.get_device_properties(device).total_memory
            row.update(peak_GiB=round(peak / 2**30, 2), resident_GiB=round(base / 2**30, 2),
                       device_GiB=round(total / 2**30, 1), peak_frac=round(peak / total, 3))
    except torch.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    except Exception as e:  # recorded, the other rows still run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    return row


def run(device: str | torch.device = "cuda", quick: bool = False) -> list[dict]:
    """Rows for T = 2^20 with the ~100M model (GPU), or T = 2^14 with a tiny model (``quick``)."""
    rec = device_record(device)
    T, dims = (2**14, TINY) if quick else (2**20, BIG)
    rows = []
    for chunked in (True, False):
        row = measure(T, dims, chunked, device)
        rows.append({**row, **{k: v for k, v in rec.items() if k not in row}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    for row in run(a.device, a.quick or not torch.cuda.is_available()):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
