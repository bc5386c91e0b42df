"""A performance model of the target rows of gpu-check, on CPU, from the launchers and the AOT table.

    python -m benchmarks.perf_model                     # print; write results/perf-model.{md,json,png}
    python -m benchmarks.perf_model --measured DIR      # a gpu-check run's ceilings and autotune winners (into DIR)
    python -m benchmarks.perf_model --out DIR           # write elsewhere (the tests)

For every target row of issue 15 at gpu-check's sizes (``benchmarks/gpu_plan.py``, scale ``gpu``):

**Work.** FLOPs counted as FlashAttention counts them (DESIGN.md §5, the convention of the
TFLOP/s that gpu-check reports): causal attention forward ``4·B·Hq·N²·d / 2`` (the triangle),
forward + backward 3.5× that (backward 2.5×). Local attention the same with N = P. global_to_local
``2·M·D_G·D_L``; patch_embed none. Bytes that must move: the counts the benchmarks use
(``bench_causal_attention.local_attention_bytes``, ``bench_patch_embed.traffic_bytes``,
``bench_global_to_local.traffic_bytes``); for flash attention q, k, v read and o written once
(forward; the backward adds q, k, v, o, dO read and dq, dk, dv written).

**Floor.** ``floor = max(bytes / BW, FLOPs / PEAK)``, H200 ceilings BW = 4.3 TB/s (copy, read +
write) and PEAK = 790 TFLOP/s (bf16 GEMM), or the ceilings a gpu-check preflight measured.

**Launches.** Each op's launcher runs for real on CPU tensors of the benchmark's sizes (never
touched: allocation is lazy) with every Triton launch ``kernel[grid](...)`` intercepted: the
model sees the kernels, grids, arguments and autotune config lists the GPU would get, so a
change of a launcher shows here without editing this file.

**Blocks per SM** of a compiled config (the AOT table ``results/aot-sm90.json``: registers per
thread, shared memory per block, warps), with the H100/H200 SM limits::

    b = min(32, 2048 // (32·w), (65536 // (ceil(32·regs / 256)·256)) // w, 233472 // (smem + 1024))

(registers are allocated per warp in 256s; 228 KiB shared memory per SM, 1 KiB reserved per block).

**Wave efficiency** ``E = Σ work / (S·b · makespan)``: the programs, in launch (pid) order, each
start on the slot (S = 132 SMs × b) that frees first. A program's work: for the flash kernels
the score elements of its tiles, the causal triangle included (forward and dQ: a row block i of
BLOCK_M rows walks keys up to the diagonal, ``BLOCK_M·(i+1)·BLOCK_M``; dK/dV: a key block j walks
the query rows below it, ``BLOCK_N·(N − j·BLOCK_N)`` per query head it visits, heads per program
= B·Hq / (programs per key block)); other kernels: equal work per program.

**Latency hiding** ``L = min(1, b·w / W_SAT)``, an assumption (not a measurement): an SM needs
``W_SAT`` = 16 resident warps to overlap one block's softmax / epilogue with another's tensor-core
work (compute-bound kernels), 32 to keep enough loads in flight for DRAM (memory-bound kernels).

**Prediction** per kernel ``t = work / (ceiling · E · L)``: compute-bound kernels (flash) the
FLOPs they execute (their tiles' ``2·d`` per score element and GEMM: forward 2 GEMMs, dK/dV 4, dQ
3, so diagonal blocks and the backward's recomputation count) over PEAK; the others
``max(bytes / BW, FLOPs / PEAK)`` with bytes = the sizes of their tensor arguments (each read or
written once). An op's prediction is the sum over its launches, each at the config the GPU run
picked (``--measured``) or else the one the model finds fastest (the autotuner keeps the fastest).
``utilisation = floor / prediction``. gpu-check prints measured / floor and measured / predicted
from the committed table (``benchmarks/gpu_summary.py``), with its own measured ceilings.

Not modelled: L2 reuse, clock behaviour under load, the exp2 / MUFU pipe, instruction issue,
pipelining depth (num_stages), launch overhead. The MQA/GQA dK/dV rows of issue 15 (B = 1 and 4,
N = 8K) are printed as a separate utilisation table.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import heapq
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
AOT = os.path.join(RESULTS, "aot-sm90.json")
OUT_STEM = "perf-model"

# H200 ceilings until a gpu-check run measured its own (DESIGN.md §5)
COPY_GB_S, GEMM_TFLOP_S = 4300.0, 790.0
# H100 / H200 (sm_90) SM limits
SMS, REGS_PER_SM, REG_GRANULE_WARP, SMEM_PER_SM, SMEM_PER_BLOCK, SMEM_RESERVED = 132, 65536, 256, 233472, 232448, 1024
THREADS_PER_SM, BLOCKS_PER_SM = 2048, 32
W_SAT = {"compute": 16, "memory": 32}  # resident warps per SM that hide latency (an assumption)

# the flash kernels' tile walk (module docstring): which block is the program's, which is walked,
# which way the causal triangle runs, how many GEMMs of 2·d FLOPs per score element
FLASH_WORK = {
    "_flash_fwd_kernel": dict(own="BLOCK_M", walk="BLOCK_N", rising=True, gemms=2),
    "_flash_bwd_dq_kernel": dict(own="BLOCK_M", walk="BLOCK_N", rising=True, gemms=3),
    "_flash_bwd_dkdv_kernel": dict(own="BLOCK_N", walk="BLOCK_M", rising=False, gemms=4),
}


# ------------------------------------------------------------------------------------ formulas
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def attention_flops(B: int, Hq: int, N: int, d: int, what: str) -> float:
    """FlashAttention's count: 4·B·Hq·N²·d halved for causal, ×3.5 for "fwd+bwd"."""
    return 4 * B * Hq * N * N * d / 2 * (3.5 if what == "fwd+bwd" else 1.0)


def floor_ms(nbytes: float, flops: float, copy_gb_s: float = COPY_GB_S, tflop_s: float = GEMM_TFLOP_S) -> float:
    """max(bytes / BW, FLOPs / PEAK) in ms."""
    return max(nbytes / (copy_gb_s * 1e9), flops / (tflop_s * 1e12)) * 1e3


def blocks_per_sm(regs: int, shared: int, warps: int) -> dict:
    """Resident blocks of a compiled kernel on one sm_90 SM, and which limit binds."""
    regs_warp = cdiv(32 * max(regs, 1), REG_GRANULE_WARP) * REG_GRANULE_WARP
    lim = {"blocks": BLOCKS_PER_SM, "threads": THREADS_PER_SM // (32 * warps),
           "registers": (REGS_PER_SM // regs_warp) // warps,
           "shared": SMEM_PER_SM // (shared + SMEM_RESERVED) if shared <= SMEM_PER_BLOCK else 0}
    b = min(lim.values())
    return {"blocks": b, "limit": min(lim, key=lambda k: (lim[k], k != "registers"))}


def wave_efficiency(work: list[float] | None, n: int, slots: int) -> float:
    """Σ work / (slots · makespan), programs started in launch order on the slot that frees first;
    ``work=None``: n programs of equal work (closed form n / (slots · ceil(n / slots)))."""
    if n == 0 or slots <= 0:
        return 0.0
    if work is None:
        return n / (slots * cdiv(n, slots))
    free = [0.0] * min(slots, len(work))
    heapq.heapify(free)
    end = 0.0
    for w in work:
        t = heapq.heappop(free) + w
        end = max(end, t)
        heapq.heappush(free, t)
    return sum(work) / (slots * end)


def latency_hiding(blocks: int, warps: int, kind: str) -> float:
    return min(1.0, blocks * warps / W_SAT[kind])


def flash_work(name: str, meta: dict, n_programs: int, N: int, heads: int) -> list[float]:
    """Score elements each program of a flash kernel computes, in pid order (row blocks fastest)."""
    f = FLASH_WORK[name]
    own, walk = meta[f["own"]], meta[f["walk"]]
    nb = cdiv(N, own)
    per_prog_heads = heads / (n_programs / nb)  # query heads a program visits
    work = []
    for pid in range(n_programs):
        i = pid % nb
        if f["rising"]:  # keys 0 .. end of its diagonal, in whole walk blocks
            cols = cdiv(min(N, (i + 1) * own), walk) * walk
        else:  # query rows from its first diagonal row to N, in whole walk blocks
            cols = cdiv(N - i * own, walk) * walk
        work.append(own * cols * per_prog_heads)
    return work


# ------------------------------------------------------------------------------------ AOT table
def load_aot(path: str = AOT) -> tuple[dict, list[dict]]:
    """(provenance, rows) of the AOT table: its meta plus the file's sha256."""
    with open(path, "rb") as f:
        raw = f.read()
    table = json.loads(raw)
    meta = dict(table["meta"], file=os.path.relpath(path, ROOT), sha256=hashlib.sha256(raw).hexdigest()[:16])
    return meta, table["rows"]


def match_aot(rows: list[dict], fn_name: str, meta: dict, warps: int, stages: int | None, dtype: str) -> dict | None:
    """The compile of the AOT table for this kernel and config: the block sizes and warps (and
    stages when known) must be equal; among those, the one agreeing with most other arguments."""
    best, best_score = None, -1
    for r in rows:
        if not r.get("ok") or r["dtype"] != dtype or not r["kernel"].endswith(":" + fn_name):
            continue
        if r["num_warps"] != warps or (stages is not None and r["num_stages"] != stages):
            continue
        fixed = {**r["constexprs"], **r["ints"]}
        if any(meta.get(k) != v for k, v in fixed.items() if k.startswith("BLOCK")):
            continue
        score = sum(meta.get(k) == v for k, v in fixed.items())
        if score > best_score:
            best, best_score = r, score
    return best


# ------------------------------------------------------------------------------------ launches
def capture(fn) -> list[dict]:
    """Run ``fn`` with every Triton launch intercepted (nothing is compiled or run): in launch
    order, {kernel (name), args (by name), configs (the autotune list the launch keeps, or its
    one launch config), grid (a tuple or the launcher's function of the config), keys (the
    autotune key's argument names)}."""
    from unittest import mock

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import KernelInterface

    launches = []

    def getitem(self, grid):
        def launch(*args, **kwargs):
            jit = self.fn if isinstance(self, Autotuner) else self
            while not hasattr(jit, "arg_names"):  # heuristics / nested autotuners
                jit = jit.fn
            named = dict(zip(jit.arg_names, args), **kwargs)
            if isinstance(self, Autotuner):  # its list as the launch prunes it (by dtype, say)
                kept = self.configs
                if self.early_config_prune:
                    kept = self.early_config_prune(self.configs, dict(zip(jit.arg_names, args)), **kwargs)
                configs = [dict(c.all_kwargs()) for c in kept]
                keys = list(self.keys)
            else:
                configs = [{"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages")}]
                keys = []
            launches.append(dict(kernel=jit.__name__, args=named, configs=configs, grid=grid, keys=keys))
        return launch

    with mock.patch.object(KernelInterface, "__getitem__", getitem):
        fn()
    return launches


def _grid_size(grid, meta: dict) -> int:
    g = grid(meta) if callable(grid) else grid
    return math.prod(g)


def _tensor_bytes(args: dict) -> int:
    """Bytes of the distinct tensors among a launch's arguments."""
    import torch

    seen = {}
    for v in args.values():
        if isinstance(v, torch.Tensor):
            seen[(v.data_ptr(), v.untyped_storage().nbytes())] = v.numel() * v.element_size()
    return sum(seen.values())


# ------------------------------------------------------------------------------------ the ops
def _register_ops() -> None:
    """Import the kernel modules (``megabyte_kernels`` imports them lazily): their custom ops."""
    import importlib

    for mod in ("flash_attention", "local_attention", "patch_embed", "global_to_local"):
        importlib.import_module(f"megabyte_kernels.{mod}")


def op_cases(p: dict) -> list[dict]:
    """The target rows: item and pass as gpu-check names them, sizes, bytes, FLOPs, the launch."""
    import torch

    from benchmarks import bench_causal_attention as bca
    from benchmarks import bench_global_to_local as bg2l
    from benchmarks import bench_patch_embed as bpe
    from benchmarks.gpu_plan import flash_label
    _register_ops()

    bf16 = torch.bfloat16
    E = lambda *s, dtype=bf16: torch.empty(*s, dtype=dtype)  # noqa: E731 - lazily allocated, never read
    ops = torch.ops.megabyte
    cases = []
    for i, s in enumerate(p["flash"]):
        B, H, Hkv, N, d = s["B"], s["H"], s["Hkv"], s["N"], s["d"]
        qkvo = 2 * (B * H * N * d + B * Hkv * N * d) * 2  # q, o (B, H, N, d); k, v (B, Hkv, N, d), bf16

        def fwd(B=B, H=H, Hkv=Hkv, N=N, d=d):
            q, k, v = E(B, H, N, d), E(B, Hkv, N, d), E(B, Hkv, N, d)
            ops.flash_attn_fwd(q, k, v, None, d ** -0.5)

        def bwd(B=B, H=H, Hkv=Hkv, N=N, d=d):
            q, k, v = E(B, H, N, d), E(B, Hkv, N, d), E(B, Hkv, N, d)
            o, lse = ops.flash_attn_fwd(q, k, v, None, d ** -0.5)
            ops.flash_attn_bwd(E(B, H, N, d), q, k, v, o, lse, None, d ** -0.5)

        base = dict(item=f"flash/{i}", shape=flash_label(s), sizes=dict(s), N=N, d=d, B=B, H=H)
        cases.append(dict(base, what="fwd", bytes=qkvo, flops=attention_flops(B, H, N, d, "fwd"), run=fwd))
        # backward: q, k, v, o, dO read, dq, dk, dv written
        # (lse, delta: rows of N fp32, left out): twice the forward's bytes
        cases.append(dict(base, what="fwd+bwd", bytes=3 * qkvo, flops=attention_flops(B, H, N, d, "fwd+bwd"),
                          run=bwd))
    lo = p["local"]
    B, H, Hkv, N, d = lo["B"], lo["H"], lo["Hkv"], lo["N"], lo["d"]

    def local(B=B, H=H, Hkv=Hkv, N=N, d=d):
        ops.local_attn_fwd(E(B, H, N, d), E(B, Hkv, N, d), E(B, Hkv, N, d), None, d ** -0.5)

    cases.append(dict(item="local", what="fwd", shape=f"B*K={B:,} H={H} Hkv={Hkv} P={N} d={d}", sizes=dict(lo),
                      bytes=bca.local_attention_bytes(B * H * N * d, B * Hkv * N * d, 2, "fwd"),
                      flops=attention_flops(B, H, N, d, "fwd"), run=local))
    pe = p["patch_embed"]
    B, T, P, D = pe["B"], pe["T"], pe["P"], pe["D"]

    def patch(B=B, T=T, P=P, D=D):
        ops.patch_embed_fwd(torch.zeros(B, T, dtype=torch.long), E(bpe.V, D), E(T, D), None, P, bpe.PAD)

    cases.append(dict(item="patch_embed", what="fwd", shape=f"B={B} T={T} P={P} D_G={D}", sizes=dict(pe),
                      bytes=bpe.traffic_bytes(B, T, P, D, 8, 2)[0], flops=0.0, run=patch))
    g = p["global_to_local"]
    B, T, P, D_G, D_L = g["B"], g["T"], g["P"], g["D_G"], g["D_L"]
    K = cdiv(T, P)

    def g2l(B=B, T=T, P=P, D_G=D_G, D_L=D_L, K=K):
        ops.global_to_local_fwd(E(B, K, P * D_G), torch.zeros(B, T, dtype=torch.long), E(D_L, D_G), E(D_L),
                                E(bg2l.V, D_L), None, P, bg2l.PAD, False)

    cases.append(dict(item="global_to_local", what="fwd", shape=f"B={B} T={T} P={P} D_G={D_G} D_L={D_L}",
                      sizes=dict(g), bytes=bg2l.traffic_bytes(B, T, P, D_G, D_L, 8, 2)[0],
                      flops=2.0 * B * K * P * D_G * D_L, run=g2l))
    return cases


def _config_label(cfg: dict) -> str:
    blocks = "x".join(str(v) for k, v in cfg.items() if k.startswith("BLOCK"))
    return f"{blocks} w{cfg.get('num_warps')} s{cfg.get('num_stages')}".replace(" sNone", "")


def model_launch(launch: dict, case: dict, aot_rows: list[dict], ceil: dict) -> dict:
    """Every config of one launch: grid, AOT compile, blocks per SM, E, L, modelled ms."""
    name, args = launch["kernel"], launch["args"]
    out = []
    for cfg in launch["configs"]:
        meta = {**args, **{k: v for k, v in cfg.items() if v is not None}}
        warps, stages = cfg.get("num_warps") or 4, cfg.get("num_stages")
        n = _grid_size(launch["grid"], meta)
        blocks = {k: v for k, v in (cfg if any(k.startswith("BLOCK") for k in cfg) else meta).items()
                  if k.startswith("BLOCK")}
        row = dict(config=_config_label({**blocks, "num_warps": warps, "num_stages": stages}),
                   cfg={k: v for k, v in cfg.items() if k.startswith("BLOCK") or k.startswith("num_")},
                   programs=n)
        aot = match_aot(aot_rows, name, meta, warps, stages, "bf16")
        if name in FLASH_WORK:
            work = flash_work(name, meta, n, case["N"], case["B"] * case["H"])
            flops = sum(work) * 2 * case["d"] * FLASH_WORK[name]["gemms"]
            nbytes, kind = 0.0, "compute"
        else:
            work = None
            nbytes = _tensor_bytes(args)
            flops = 2.0 * args["M"] * args["N"] * args["Kd"] if name == "_g2l_matmul_kernel" else 0.0
            kind = bound(nbytes, flops, ceil)
        row.update(kind=kind, flops=flops, bytes=nbytes)
        if aot is None:
            row.update(aot=None, ms=None, note="no compile of this config in the AOT table")
            out.append(row)
            continue
        occ = blocks_per_sm(aot["regs"], aot["shared"], warps)
        b = occ["blocks"]
        E = wave_efficiency(work, n, SMS * b) if b else 0.0
        L = latency_hiding(b, warps, kind) if b else 0.0
        ms = floor_ms(nbytes, flops, ceil["copy_gb_s"], ceil["tflop_s"]) / (E * L) if b else None
        row.update(aot=aot["name"], regs=aot["regs"], spills=aot["spill_stores"], shared=aot["shared"],
                   warps=warps, blocks_per_sm=b, limit=occ["limit"], wave_eff=E, hiding=L, ms=ms)
        out.append(row)
    return {"kernel": name, "keys": {k: args.get(k) for k in launch["keys"]}, "configs": out}


def _picked(launch: dict, tuned: dict) -> int | None:
    """Index of the config a gpu-check run's autotuner picked for this launch (its key), if known."""
    for at_name, cache in tuned.items():
        if not at_name.startswith(launch["kernel"]):
            continue
        for key, cfg in cache.items():
            try:
                k = ast.literal_eval(key)
            except (ValueError, SyntaxError):
                continue
            if list(k[:len(launch["keys"])]) != list(launch["keys"].values()):
                continue
            want = dict(part.split(": ") for part in cfg.split(", "))
            for i, c in enumerate(launch["configs"]):
                if all(str(c["cfg"].get(f, want.get(f))) == want.get(f) for f in want if f in c["cfg"]):
                    return i
    return None


def _pick(lch: dict, tuned: dict) -> int | None:
    """The config a launch is predicted at: the GPU run's autotune winner when known, else the
    model's fastest (first of equals); None when no config has a prediction."""
    ok = [i for i, c in enumerate(lch["configs"]) if c["ms"]]
    won = _picked(lch, tuned)
    lch["picked_by"] = "gpu run" if won in ok else "model (fastest)"
    return won if won in ok else min(ok, key=lambda i: lch["configs"][i]["ms"]) if ok else None


def bound(nbytes: float, flops: float, ceil: dict) -> str:
    """"compute" when FLOPs / PEAK exceeds bytes / BW, else "memory"."""
    return "compute" if flops / (ceil["tflop_s"] * 1e12) > nbytes / (ceil["copy_gb_s"] * 1e9) else "memory"


def predict(ceil: dict, tuned: dict | None = None, aot_path: str = AOT) -> dict:
    """The whole model: {meta, rows}, a row per target (module docstring)."""
    from benchmarks.gpu_plan import BENCH

    aot_meta, aot_rows = load_aot(aot_path)
    rows = []
    for case in op_cases(BENCH["gpu"]):
        launches = [model_launch(lch, case, aot_rows, ceil) for lch in capture(case["run"])]
        times = []
        for lch in launches:
            lch["picked"] = _pick(lch, tuned or {})
            times.append(None if lch["picked"] is None else lch["configs"][lch["picked"]]["ms"])
        total = None if None in times else sum(times)
        fl = floor_ms(case["bytes"], case["flops"], ceil["copy_gb_s"], ceil["tflop_s"])
        rows.append(dict(item=case["item"], what=case["what"], shape=case["shape"], sizes=case["sizes"],
                         bytes=case["bytes"], flops=case["flops"], floor_ms=fl,
                         bound=bound(case["bytes"], case["flops"], ceil), predicted_ms=total,
                         utilisation=fl / total if total else None, launches=launches))
    return {"meta": {"ceilings": ceil, "sms": SMS, "w_sat": W_SAT, "aot": aot_meta}, "rows": rows}


def dkdv_utilisation(aot_path: str = AOT, shapes=((1, 8192), (4, 8192))) -> list[dict]:
    """Issue 15's MQA backward figure: the dK/dV kernel at B = 1 and 4, N = 8K, d = 128, H = 16,
    Hkv = 1, per config: programs, blocks per SM, E and E·L."""
    import torch

    _register_ops()

    _, aot_rows = load_aot(aot_path)
    ceil = {"copy_gb_s": COPY_GB_S, "tflop_s": GEMM_TFLOP_S}
    out = []
    for B, N in shapes:
        H, d = 16, 128

        def run():
            E = lambda *s: torch.empty(*s, dtype=torch.bfloat16)  # noqa: E731
            q, k = E(B, H, N, d), E(B, 1, N, d)
            torch.ops.megabyte.flash_attn_bwd(E(B, H, N, d), q, k, E(B, 1, N, d), E(B, H, N, d),
                                              torch.empty(B, H, N), None, d ** -0.5)

        case = dict(N=N, d=d, B=B, H=H)
        for lch in capture(run):
            if "dkdv" in lch["kernel"] or "dk" in lch["kernel"]:
                m = model_launch(lch, case, aot_rows, ceil)
                for c in m["configs"]:
                    out.append(dict(shape=f"B={B} N={N} H={H} Hkv=1 d={d}", kernel=lch["kernel"], config=c["config"],
                                    programs=c["programs"], blocks_per_sm=c.get("blocks_per_sm"),
                                    wave_eff=c.get("wave_eff"), util=(c["wave_eff"] * c["hiding"])
                                    if c.get("wave_eff") is not None else None))
    return out


# ------------------------------------------------------------------------------------ output
def measured_inputs(folder: str) -> tuple[dict, dict]:
    """(ceilings, autotune winners) of a gpu-check result folder's results.jsonl."""
    from benchmarks.gpu_plan import RESULTS as JSONL
    from benchmarks.gpu_plan import read_rows

    rows = read_rows(os.path.join(folder, JSONL))
    pf = [r for r in rows if r.get("kind") == "preflight" and r.get("copy_GB_s") and r.get("gemm_TFLOP_s")]
    ceil = {"copy_gb_s": COPY_GB_S, "tflop_s": GEMM_TFLOP_S, "source": "H200 nominal"}
    if pf:
        ceil = {"copy_gb_s": pf[-1]["copy_GB_s"], "tflop_s": pf[-1]["gemm_TFLOP_s"],
                "source": f"measured by gpu-check preflight ({os.path.basename(os.path.normpath(folder))})"}
    tuned = {}
    for r in rows:
        if r.get("kind") == "tuned":
            for name, cache in r.get("configs", {}).items():
                tuned.setdefault(name, {}).update(cache)
    return ceil, tuned


def _f(x, fmt=".3g") -> str:
    return "?" if x is None else format(x, fmt)


def markdown(model: dict, dkdv: list[dict], sha: str, command: str) -> str:
    m = model["meta"]
    c, a = m["ceilings"], m["aot"]
    lines = [f"# Performance model of gpu-check's target rows (H200, bf16)", "",
             f"`{command}` at git {sha}; AOT table `{a['file']}` (git {a['git_sha']}, {a['date']}, triton "
             f"{a['triton']}, sha256 {a['sha256']}). Ceilings: copy {c['copy_gb_s']:,.0f} GB/s, bf16 GEMM "
             f"{c['tflop_s']:,.0f} TFLOP/s ({c['source']}); {m['sms']} SMs; latency hiding saturates at "
             f"{m['w_sat']['compute']} (compute) / {m['w_sat']['memory']} (memory) resident warps per SM "
             "(an assumption). The formulas: `benchmarks/perf_model.py`'s docstring. A prediction, not a "
             "measurement.", "",
             "| item | pass | shape | GB moved | GFLOP (causal) | bound | floor ms | predicted ms | utilisation "
             "| predicted figure |", "|---|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in model["rows"]:
        fig = ""
        if r["predicted_ms"]:
            if r["bound"] == "compute":
                fig = f"{r['flops'] / r['predicted_ms'] / 1e9:,.0f} TFLOP/s"
            else:
                fig = f"{r['bytes'] / r['predicted_ms'] / 1e6 / c['copy_gb_s']:.0%} of copy"
        lines.append(f"| {r['item']} | {r['what']} | {r['shape']} | {r['bytes'] / 1e9:.3g} | {r['flops'] / 1e9:,.0f} | "
                     f"{r['bound']} | {r['floor_ms']:.4g} | {_f(r['predicted_ms'], '.4g')} | "
                     f"{_f(r['utilisation'], '.2f')} | {fig} |")
    lines += ["", "## Per launch and config", "",
              "`*` the config the prediction uses (picked by a GPU run's autotuner when known, else the model's "
              "fastest). E: wave efficiency; L: latency hiding.", "",
              "| item | pass | kernel | config | programs | regs | spill B | shared B | blocks/SM (limit) | E | L "
              "| ms |", "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in model["rows"]:
        for lch in r["launches"]:
            for i, cf in enumerate(lch["configs"]):
                mark = " *" if i == lch["picked"] else ""
                if cf.get("aot") is None:
                    lines.append(f"| {r['item']} | {r['what']} | {lch['kernel']} | {cf['config']}{mark} | "
                                 f"{cf['programs']:,} | {cf.get('note')} | | | | | | |")
                    continue
                lines.append(f"| {r['item']} | {r['what']} | {lch['kernel']} | {cf['config']}{mark} | "
                             f"{cf['programs']:,} | {cf['regs']} | {cf['spills']} | {cf['shared']} | "
                             f"{cf['blocks_per_sm']} ({cf['limit']}) | {cf['wave_eff']:.2f} | {cf['hiding']:.2f} | "
                             f"{_f(cf['ms'], '.4g')} |")
    lines += ["", "## MQA backward: the dK/dV grid (issue 15)", "",
              "Utilisation of the dK/dV kernel alone, E·L, with E the wave efficiency on 132 SMs.", "",
              "| shape | kernel | config | programs | blocks/SM | E | E·L |", "|---|---|---|---:|---:|---:|---:|"]
    for r in dkdv:
        lines.append(f"| {r['shape']} | {r['kernel']} | {r['config']} | {r['programs']:,} | {_f(r['blocks_per_sm'])} | "
                     f"{_f(r['wave_eff'], '.2f')} | {_f(r['util'], '.2f')} |")
    return "\n".join(lines) + "\n"


def slim(model: dict, dkdv: list[dict], sha: str, command: str) -> dict:
    """The JSON written: the model without the launch arguments, plus provenance."""
    return {"meta": dict(model["meta"], git_sha=sha, command=command), "rows": model["rows"], "dkdv": dkdv}


def plot(model: dict, path: str) -> str | None:
    """Floor and prediction per row, ms (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - no matplotlib: no plot
        return None
    rows = model["rows"]
    labels = [f"{r['item']} {r['what']}\n{r['shape']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.5 * len(rows)))
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [r["floor_ms"] for r in rows], height=0.4, label="floor")
    ax.barh([i + 0.2 for i in y], [r["predicted_ms"] or 0 for r in rows], height=0.4, label="predicted")
    ax.set_yticks(list(y), labels, fontsize=6)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ms (log scale)")
    ax.set_title("perf model: floor and predicted time per target row (H200, bf16)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", default=None, help="a gpu-check result folder: its ceilings and autotune winners")
    ap.add_argument("--out", default=None,
                    help="folder of perf-model.md/.json/.png (default benchmarks/results, or the --measured folder)")
    ap.add_argument("--aot", default=AOT, help="the AOT table read")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    for var in ("TRITON_INTERPRET", "MEGABYTE_PIN_CONFIGS"):  # the GPU's full autotune lists
        if os.environ.pop(var, None):
            print(f"perf_model: {var} ignored (the model reads the GPU's autotune lists)", file=sys.stderr)
    from benchmarks.common import git_sha

    ceil, tuned = ({"copy_gb_s": COPY_GB_S, "tflop_s": GEMM_TFLOP_S, "source": "H200 nominal"}, {})
    if a.measured:
        ceil, tuned = measured_inputs(a.measured)
    model = predict(ceil, tuned, a.aot)
    dkdv = dkdv_utilisation(a.aot)
    command = "python -m benchmarks.perf_model" + (f" --measured {a.measured}" if a.measured else "")
    sha = git_sha()
    md = markdown(model, dkdv, sha, command)
    print(md)
    out = a.out or a.measured or RESULTS  # a run's model stays next to the run, not over the committed one
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, OUT_STEM)
    with open(stem + ".json", "w") as f:
        json.dump(slim(model, dkdv, sha, command), f, indent=1, default=str)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(md)
    if not a.no_plot:
        plot(model, stem + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
