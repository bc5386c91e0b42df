"""Generation speed: the static decoder, the dynamic (host-driven cached) decoder and full
recomputation; ms per byte, kernel-launching ops per byte and host syncs per byte.

    python -m benchmarks.bench_generation [--device cpu|cuda] [--quick] [--threads N]
                                          [--config demo|bench] [--batch B ...] [--graphs]

Models (stated in every row), random weights (speed does not depend on them), fp32, greedy:

* ``demo`` (default): the ``megabyte train`` demo size — P=4, D_G=64 (global width 256), D_L=128,
  4 global layers / 4 heads, 2 local layers / 4 heads, multi-query, V=512 — learned positions,
  T_MAX=2048 so that 1024 + 512 bytes fit;
* ``bench``: the benchmark config of issue 17 — P=8, D_G=128 (global width 1024), D_L=256,
  12 global layers / 16 heads, 6 local layers / 4 heads, multi-query.

Per row (one batch size, graphs on or off): the static decoder (``generate(decoder="static")``,
the default; CUDA graphs when ``--graphs`` on a GPU, capture time included and reported) and the
dynamic one (``decoder="cached"``), each timed over the whole call (prefill included; the best of
``repeats``), and at batch 1 the recompute baseline (``generate_uncached``, one full forward per
byte, timed once). ``ms_per_byte`` is per decoding step (one byte for every row); ``bytes_per_s``
counts the bytes of all rows. All paths must give the same bytes (``same_bytes``).

Per-byte op counts come from the torch profiler, for the decode loop only: the counts of a run
of ``n2`` new bytes minus those of ``n1`` (past the prefill, the first steps and the graph
captures), over ``n2 - n1``. ``ops_per_byte``: leaf ATen ops that compute (views, allocations
and metadata ops excluded) — what launches a kernel on a GPU; ``syncs_per_byte``:
``aten::_local_scalar_dense`` (``.item()``), ``aten::is_nonzero`` (``bool(tensor)``) and
``aten::nonzero``; on CUDA ``launches_per_byte`` also counts the runtime's kernel and graph
launches. ``--quick``: a 256-byte prompt and 64 new bytes.
"""
from __future__ import annotations

import argparse
import collections
import platform
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import git_sha
from megabyte import Megabyte, MegabyteConfig
from megabyte.generation import generate, generate_uncached

CONFIG = dict(V=512, P=4, D_G=64, D_L=128, T_MAX=2048, g_nheads=4, g_nlayers=4, l_nheads=4, l_nlayers=2,
              initializer_range=0.02, pad_id=257, eos_id=258)
CONFIGS = {
    "demo": (CONFIG, "P=4 D_G=64 D_L=128 g4x4 l2x4 MQA learned T_MAX=2048 V=512 fp32, greedy"),
    "bench": (dict(V=512, P=8, D_G=128, D_L=256, T_MAX=4096, g_nheads=16, g_nlayers=12, l_nheads=4, l_nlayers=6,
                   initializer_range=0.02, pad_id=257, eos_id=258),
              "P=8 D_G=128 D_L=256 g12x16 l6x4 MQA learned T_MAX=4096 V=512 fp32, greedy"),
}
SYNC_OPS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero")
# ATen ops that launch no kernel: views, metadata, allocations, eval-mode dropout
NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::transpose", "aten::t",
    "aten::permute", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::select",
    "aten::slice", "aten::narrow", "aten::alias", "aten::detach", "aten::detach_", "aten::_unsafe_view",
    "aten::unflatten", "aten::flatten", "aten::split", "aten::chunk", "aten::unbind", "aten::empty",
    "aten::empty_strided", "aten::empty_like", "aten::resize_", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::to", "aten::contiguous", "aten::dropout", "aten::item", "aten::is_nonzero",
    "aten::_local_scalar_dense", "aten::set_", "aten::result_type", "aten::broadcast_tensors",
}
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaMemcpyAsync", "cudaMemsetAsync")


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


def op_counts(fn, device: torch.device) -> collections.Counter:
    """``kernels`` (leaf computing ATen ops), each sync op, and ``launches`` (CUDA) of one ``fn()``."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    c = collections.Counter()
    events = prof.events()
    for e in events:
        if e.name in SYNC_OPS:
            c[e.name] += 1
        if e.name in LAUNCHES:
            c["launches"] += 1
    c["kernels"] = sum(_kernels(e) for e in events if e.cpu_parent is None)
    return c


def _kernels(e) -> int:
    """Computing ATen ops under event ``e``: its children's when some of them compute (a composite
    such as ``aten::linear`` -> ``aten::addmm``), else 1 for a computing op itself, else 0."""
    below = sum(_kernels(ch) for ch in e.cpu_children)
    if below:
        return below
    return int(e.name.startswith("aten::") and e.name not in NO_KERNEL)


def per_byte_counts(gen, n1: int, n2: int, device: torch.device) -> dict:
    """Profiler counts per decoded byte: (counts of ``gen(n2)`` - counts of ``gen(n1)``) / (n2 - n1)."""
    a, b = op_counts(lambda: gen(n1), device), op_counts(lambda: gen(n2), device)
    per = {k: (b[k] - a[k]) / (n2 - n1) for k in set(a) | set(b) | {"kernels", "launches"}}
    out = {"ops_per_byte": per["kernels"], "syncs_per_byte": sum(per.get(k, 0.0) for k in SYNC_OPS)}
    if device.type == "cuda":
        out["launches_per_byte"] = per["launches"]
    return out


def run(device: str | torch.device = "cpu", quick: bool = False) -> list[dict]:
    """Rows of the demo config at batch 1 (graphs on when on CUDA)."""
    prompt_len, new = (256, 64) if quick else (1024, 512)
    device = torch.device(device)
    return [measure(device, prompt_len, new, repeats=1 if quick else 2, graphs=device.type == "cuda")]


def measure(device: str | torch.device, prompt_len: int, new: int, repeats: int = 2, *, batch: int = 1,
            config: str = "demo", graphs: bool = False, recompute: bool | None = None,
            dynamic: bool = True) -> dict:
    """One row: the static decoder, the dynamic one (unless ``dynamic=False``) and, at batch 1 or
    when ``recompute``, full recomputation, for ``batch`` prompts of ``prompt_len`` bytes and
    ``new`` new bytes each."""
    device = torch.device(device)
    cfg, label = CONFIGS[config]
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig(**cfg)).to(device).eval()
    prompt = torch.randint(0, 256, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).to(device)
    graphs = graphs and device.type == "cuda"
    static = dict(temperature=0, decoder="static", cuda_graphs=graphs)
    paths = {"static": dict(temperature=0, decoder="static", cuda_graphs=graphs)}
    if dynamic:
        paths["dynamic"] = dict(temperature=0, decoder="cached")
    for kw in paths.values():
        generate(model, prompt[:, :64], 8, **kw)  # warm-up (allocator, kernels)
    info: dict = {}
    t_static, ids_static = _time(lambda: generate(model, prompt, new, info=info, **paths["static"]), device, repeats)
    t_dyn, same = None, True
    if dynamic:
        t_dyn, ids_dyn = _time(lambda: generate(model, prompt, new, **paths["dynamic"]), device, repeats)
        same = bool(torch.equal(ids_static, ids_dyn))
    recompute = batch == 1 if recompute is None else recompute
    t_full = None
    if recompute:
        generate_uncached(model, prompt[:, :64], 2, temperature=0)
        t_full, ids_full = _time(lambda: generate_uncached(model, prompt, new, temperature=0), device, repeats=1)
        same = same and bool(torch.equal(ids_static, ids_full))
    u0 = model.config.P
    n1, n2 = min(3 * u0, new // 2), min(3 * u0 + 4 * u0, new)
    counts = {}
    if n2 > n1:
        for name, kw in paths.items():
            for k, v in per_byte_counts(lambda n: generate(model, prompt, n, **kw), n1, n2, device).items():
                counts[f"{name}_{k}"] = v
    row = {
        "bench": "generation", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "git": git_sha(),
        "config": f"{label}, batch {batch}", "backend": model.backend, "batch": batch,
        "prompt_bytes": prompt_len, "new_bytes": new, "graphs": graphs,
        "graphs_used": sum(n.endswith("CUDA graph") for n in info.get("graph_notes", [])),
        "capture_s": info.get("capture_s", 0.0),
        "static_ms_per_byte": 1e3 * t_static / new, "dynamic_ms_per_byte": None if t_dyn is None else 1e3 * t_dyn / new,
        "recompute_ms_per_byte": None if t_full is None else 1e3 * t_full / new,
        "static_bytes_per_s": batch * new / t_static,
        "dynamic_bytes_per_s": None if t_dyn is None else batch * new / t_dyn,
        "static_vs_dynamic": None if t_dyn is None else t_dyn / t_static,
        "ratio": None if t_full is None else t_full / t_static,
        **counts, "profiled_bytes": f"{n1}..{n2}", "same_bytes": same,
    }
    if info.get("graph_notes") and row["graphs_used"] < len(info["graph_notes"]):
        row["graph_notes"] = "; ".join(info["graph_notes"])
    return row


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_row(r: dict) -> None:
    print(f"generation benchmark ({r['device_name']}, {r['threads']} threads, torch {r['torch']}, git {r['git']})")
    print(f"  model: {r['config']}, backend {r['backend']}")
    print(f"  {r['new_bytes']} new bytes after a {r['prompt_bytes']}-byte prompt per row (prefill included); "
          f"profiled bytes {r['profiled_bytes']}")
    g = f", CUDA graphs {r['graphs_used']} (capture {r['capture_s']:.3f} s)" if r["graphs"] else ""
    print(f"  {'path':<16}{'ms/byte':>9}{'bytes/s':>10}{'ops/byte':>10}{'syncs/byte':>12}"
          + ("  launches/byte" if "static_launches_per_byte" in r else ""))
    for name in ("static", "dynamic"):
        if r[f"{name}_ms_per_byte"] is None:
            continue
        line = (f"  {name:<16}{r[f'{name}_ms_per_byte']:9.3f}{r[f'{name}_bytes_per_s']:10.0f}"
                f"{_fmt(r.get(f'{name}_ops_per_byte'), '10.1f')}{_fmt(r.get(f'{name}_syncs_per_byte'), '12.2f')}")
        if f"{name}_launches_per_byte" in r:
            line += f"{r[f'{name}_launches_per_byte']:15.1f}"
        print(line)
    if r["recompute_ms_per_byte"] is not None:
        print(f"  {'full recompute':<16}{r['recompute_ms_per_byte']:9.3f}")
    print(f"  static vs dynamic {_fmt(r['static_vs_dynamic'], '.2f')}x, vs recompute {_fmt(r['ratio'], '.1f')}x{g}; "
          f"same bytes: {r['same_bytes']}")
    if r.get("graph_notes"):
        print(f"  graph notes: {r['graph_notes']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs for the static decoder (CUDA only)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    prompt_len, new = (256, 64) if a.quick else (1024, 512)
    for b in a.batch:
        print_row(measure(a.device, prompt_len, new, repeats=1 if a.quick else 2, batch=b, config=a.config,
                          graphs=a.graphs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
