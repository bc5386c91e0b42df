"""Native C++ CPU ops vs the PyTorch reference ops, on CPU (pytest-benchmark). Results are CPU.

    .venv/bin/python -m pytest benchmarks/bench_native.py --benchmark-enable -q -s
    .venv/bin/python -m benchmarks.run --quick --suites native   # the paired table into results/
    # on a shared, oversubscribed machine: one thread, CPU time instead of wall time
    BENCH_THREADS=1 BENCH_TIMER=cpu .venv/bin/python -m pytest benchmarks/bench_native.py --benchmark-enable \
        --benchmark-timer=time.process_time -q -s

Config: the ``megabyte train`` demo — B=16, T=256, P=4, D_G=64, D_L=128, V=512, learned
positions (T_MAX=256), bias, fp32; the model has 4 global layers / 4 heads and 2 local layers /
4 heads. What is timed:

* ``op``: each fused op, forward + backward (the training path), reference vs native;
* ``step``: the whole training step (forward, loss, backward, AdamW) of the model with
  ``backend="reference"`` vs ``backend="auto"`` (= native for the two fused ops on CPU, the
  reference attention either way);
* ``gen``: the generation path, no grad, batch 1: one patch embedding per patch (ids of two
  patches -> (1, 2, P*D_G)) and one projection per byte (global_to_local of one patch).

At the end the ratios reference / native are printed (> 1: native is faster), twice: from
pytest-benchmark's medians (each backend timed in its own block of rounds), and *paired*: the two
backends called alternately, the ratio the median of the per-pair ratios, which is what to read
on a shared machine whose load drifts between blocks. ``BENCH_THREADS`` sets torch's thread count
(default: torch's); ``BENCH_TIMER=cpu`` times the paired runs with ``time.process_time`` (pass
``--benchmark-timer=time.process_time`` for the blocks): on an oversubscribed machine, where a
multi-millisecond call is likely to be preempted, 1 thread and CPU time give the steady numbers
(wall time then measures the other tenants). Also
printed: native global_to_local with its GEMMs forced to ``at::mm`` (``MEGABYTE_NATIVE_GEMM=aten``)
vs the default engine, and the three GEMMs of global_to_local fwd+bwd alone under each engine:
on the AMD EPYC this was measured on, most of native's gain on this op is the GEMM engine
(oneDNN's sgemm about 2x MKL's there, csrc/README.md), the rest the fused gather/scatter passes.

``run(device, quick)`` (what ``benchmarks/run.py`` calls) times the same closures, paired, and
returns one row per backend and case (``ratio_vs_reference``: > 1 is faster than the reference).
"""
from __future__ import annotations

import os
import platform
import sys
import time

import pytest
import torch

from megabyte_kernels import native, reference

B, T, P, D_G, D_L, V, PAD = 16, 256, 4, 64, 128, 512, 257
RESULTS: dict[tuple[str, str], float] = {}
RUNS: dict[tuple[str, str], object] = {}
PAIRS = {"step": 5, "default": 30}
IMPL = {"reference": (reference.patch_embed, reference.global_to_local),
        "native": (native.patch_embed_native, native.global_to_local_native)}
BACKENDS = ["reference", "native"]


def _timer():
    return time.process_time if os.environ.get("BENCH_TIMER") == "cpu" else time.perf_counter


def _paired(f_ref, f_nat, n):
    """Alternate the two; (median ref, median native, median of per-pair ratios ref/native)."""
    clock = _timer()
    f_ref(), f_nat()
    tr, tn, rs = [], [], []
    for _ in range(n):
        t0 = clock()
        f_ref()
        t1 = clock()
        f_nat()
        t2 = clock()
        tr.append(t1 - t0), tn.append(t2 - t1), rs.append((t1 - t0) / (t2 - t1))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return med(tr), med(tn), med(rs)


def _gemm_floor(engine):
    g = torch.randn(B * T, D_L)  # (B*K*P, D_L)
    x, w = torch.randn(B * T, D_G), torch.randn(D_L, D_G)
    if engine == "aten":
        def run():
            torch.mm(x, w.t()), torch.mm(g, w), torch.mm(g.t(), x)
    else:
        lin = torch.ops.mkldnn._linear_pointwise

        def run():
            lin(x, w, None, "none", [], ""), lin(g, w.t().contiguous(), None, "none", [], "")
            lin(g.t(), x.t(), None, "none", [], "")
    return run


def _median_time(f, n=20):
    ts, clock = [], _timer()
    for _ in range(n):
        t0 = clock()
        f()
        ts.append(clock() - t0)
    return sorted(ts)[n // 2]


def _with_env(f, **env):
    def run():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return f()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
    return run


# ----------------------------------------------------------------------------------------------
# the timed closures, one builder per case: (backend) -> fn

def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    leaf = lambda *s: (0.02 * torch.randn(*s, generator=g)).requires_grad_()  # noqa: E731
    return dict(ids=ids, emb=leaf(V, D_G), pos=leaf(T, D_G), x=leaf(B, T // P, P * D_G), w=leaf(D_L, D_G),
                b=leaf(D_L), ltab=leaf(V, D_L))


def build_patch_embed_train(backend):
    d, f = _data(), IMPL[backend][0]
    grad = torch.randn(B, T // P, P * D_G)

    def run():
        out = f(d["ids"], d["emb"], d["pos"], patch_size=P, pad_id=PAD)
        return torch.autograd.grad(out, (d["emb"], d["pos"]), grad)
    return run


def build_global_to_local_train(backend):
    d, f = _data(), IMPL[backend][1]
    grad = torch.randn(B * T // P, P, D_L)

    def run():
        out = f(d["x"], d["ids"], d["w"], d["b"], d["ltab"], patch_size=P, pad_id=PAD)
        return torch.autograd.grad(out, (d["x"], d["w"], d["b"], d["ltab"]), grad)
    return run


def build_fused_ops_forward(backend):
    d = _data()
    pe, g2l = IMPL[backend]

    @torch.no_grad()
    def run():
        pe(d["ids"], d["emb"], d["pos"], patch_size=P, pad_id=PAD)
        return g2l(d["x"], d["ids"], d["w"], d["b"], d["ltab"], patch_size=P, pad_id=PAD)
    return run


def build_training_step(backend):
    from megabyte import Megabyte, MegabyteConfig

    torch.manual_seed(0)
    cfg = MegabyteConfig(V=V, P=P, D_G=D_G, D_L=D_L, T_MAX=T, g_nheads=4, g_nlayers=4, l_nheads=4, l_nlayers=2,
                         pad_id=PAD, eos_id=258)
    model = Megabyte(cfg, backend="reference" if backend == "reference" else "auto")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))

    def step():
        loss = model(ids, return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step()  # warm-up (AdamW state)
    return step


def build_generation_path(backend):
    """Per generated patch one patch embedding, per generated byte one projection (batch 1)."""
    d = _data()
    pe, g2l = IMPL[backend]
    ids2 = d["ids"][:1, : 2 * P]  # the new patch and the one it embeds
    y = d["x"][:1, :1].detach()  # the global output of one patch
    ids1 = d["ids"][:1, :P]

    @torch.no_grad()
    def run():  # one patch of P bytes: 1 patch embedding + P projections
        out = pe(ids2, d["emb"], d["pos"], patch_size=P, pad_id=PAD)
        for _ in range(P):
            out = g2l(y, ids1, d["w"], d["b"], d["ltab"], patch_size=P, pad_id=PAD)
        return out
    return run


# (key printed and recorded, builder, pytest-benchmark group)
CASES = [
    ("op: patch_embed fwd+bwd", build_patch_embed_train, "patch_embed fwd+bwd"),
    ("op: global_to_local fwd+bwd", build_global_to_local_train, "global_to_local fwd+bwd"),
    ("op: both forward only", build_fused_ops_forward, "both fused ops, forward"),
    ("step: whole training step", build_training_step, "training step"),
    ("gen: 1 patch_embed + P projections", build_generation_path, "generation path (per patch)"),
]


# ----------------------------------------------------------------------------------------------
# benchmarks/run.py entry

def run(device: str = "cpu", quick: bool = False) -> list[dict]:
    """Rows: case, impl (reference / native / native with at::mm GEMMs), shape, dtype, ms (median of the paired
    runs, wall clock, torch's thread count), ratio_vs_reference (median of per-pair ratios)."""
    if torch.device(device).type != "cpu":
        from benchmarks.common import SkipSuite
        raise SkipSuite("the native ops are CPU ops: run with --device cpu")
    native.load()
    rows = []
    shape = f"B={B} T={T} P={P} D_G={D_G} D_L={D_L} V={V}"
    for key, build, _ in CASES:
        ref_fn, nat_fn = build("reference"), build("native")
        n = (3 if quick else PAIRS["step"]) if key.startswith("step") else (20 if quick else PAIRS["default"])
        for _ in range(1 if key.startswith("step") else 5):  # warm-up: allocator, oneDNN primitive cache
            ref_fn(), nat_fn()
        ref, nat, ratio = _paired(ref_fn, nat_fn, n)
        case = key.split(": ", 1)[1]
        rows.append({"case": case, "impl": "reference", "shape": shape, "dtype": "float32", "ms": ref * 1e3,
                     "ratio_vs_reference": 1.0})
        rows.append({"case": case, "impl": "native", "shape": shape, "dtype": "float32", "ms": nat * 1e3,
                     "ratio_vs_reference": ratio})
        if key == "op: global_to_local fwd+bwd":
            engine = torch.ops.megabyte_native.gemm_engine(torch.float32, B * T * D_G * D_L)
            if engine != "aten":  # the same op with its GEMMs on at::mm: what the engine is worth
                ref, nat_aten, ratio = _paired(ref_fn, _with_env(nat_fn, MEGABYTE_NATIVE_GEMM="aten"), n)
                rows.append({"case": case, "impl": "native (GEMMs by at::mm)", "shape": shape, "dtype": "float32",
                             "ms": nat_aten * 1e3, "ratio_vs_reference": ratio})
    return rows


# ----------------------------------------------------------------------------------------------
# pytest-benchmark

@pytest.fixture(scope="module", autouse=True)
def report():
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    native.load()
    yield
    lines = [f"\nnative vs reference, CPU ({platform.machine()}, {torch.get_num_threads()} threads, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, paired timer "
             f"{'process_time' if os.environ.get('BENCH_TIMER') == 'cpu' else 'perf_counter'}); "
             "ratio = reference / native"]
    for what in dict.fromkeys(k[0] for k in RESULTS):
        ref, nat = RESULTS.get((what, "reference")), RESULTS.get((what, "native"))
        if ref and nat:
            lines.append(f"  [blocks] {what:<36} reference {ref * 1e3:9.3f} ms  native {nat * 1e3:9.3f} ms  "
                         f"ratio {ref / nat:5.2f}x")
    for what in dict.fromkeys(k[0] for k in RUNS):
        if (what, "reference") in RUNS and (what, "native") in RUNS:
            n = PAIRS["step"] if what.startswith("step") else PAIRS["default"]
            ref, nat, ratio = _paired(RUNS[(what, "reference")], RUNS[(what, "native")], n)
            lines.append(f"  [paired] {what:<36} reference {ref * 1e3:9.3f} ms  native {nat * 1e3:9.3f} ms  "
                         f"ratio {ratio:5.2f}x")
    g2l = RUNS.get(("op: global_to_local fwd+bwd", "native"))
    if g2l is not None:
        # where the global_to_local gain comes from: the fused gather/scatter passes, and the GEMM
        # engine (MKL through at::mm, or oneDNN; csrc/megabyte_native.cpp says how it is chosen)
        engine = torch.ops.megabyte_native.gemm_engine(torch.float32, B * T * D_G * D_L)
        aten, dflt, ratio = _paired(_with_env(g2l, MEGABYTE_NATIVE_GEMM="aten"), g2l, PAIRS["default"])
        lines.append(f"  [paired] global_to_local native, GEMMs by at::mm {aten * 1e3:9.3f} ms  by {engine} "
                     f"{dflt * 1e3:9.3f} ms  ratio {ratio:5.2f}x")
        floors = [f"at::mm {_median_time(_gemm_floor('aten')) * 1e3:.3f} ms"]
        if engine == "onednn":
            floors.append(f"oneDNN {_median_time(_gemm_floor('onednn')) * 1e3:.3f} ms")
        lines.append(f"  (the 3 GEMMs of global_to_local fwd+bwd alone: {', '.join(floors)}; the reference "
                     f"uses at::mm, native uses {engine} at this size)")
    sys.__stdout__.write("\n".join(lines) + "\n")


def _record(benchmark, what, backend, run):
    RUNS[(what, backend)] = run
    if benchmark.stats is not None:  # None with --benchmark-disable
        RESULTS[(what, backend)] = benchmark.stats.stats.median


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_native_vs_reference(benchmark, case, backend):
    key, build, group = next(c for c in CASES if c[0] == case)
    fn = build(backend)
    benchmark.group = group
    if key.startswith("step"):
        benchmark.pedantic(fn, rounds=8, iterations=1, warmup_rounds=1)
    else:
        benchmark(fn)
    _record(benchmark, key, backend, fn)
