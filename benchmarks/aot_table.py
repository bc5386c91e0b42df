"""The ahead-of-time resource table: every Triton kernel, every autotune config, compiled for sm_90.

``python -m benchmarks.aot_table`` (``make aot-table``) compiles each kernel of megabyte_kernels
with each config of its autotune list (or the tile its launcher's heuristic picks) for sm_90,
the 16-bit lists in bf16 and the fp32 lists in fp32, the way a real launch at a typical shape
compiles it (``tests/aot.py``: Triton's own launch-time specialization), and writes per compile
the registers, spill bytes (ptxas -v), shared memory, and whether the PTX uses ``wgmma`` or only
``mma.sync``, to ``benchmarks/results/aot-sm90.json`` (read by ``tests/kernels/test_aot.py``) and
``aot-sm90.md``. 172 compiles, 3-5 minutes on two cores: run by hand after changing a
kernel or a config list, and commit the result.

The typical launch (its int arguments decide which of them the launch marks divisible by 16 or
turns into the constexpr 1):

* flash attention (global): B = 2, N = 8192, H = 16 query heads, multi-query (G = 16, the
  model's default ``g_kv_heads=1``), with and without ALiBi (fp32: with), head dim d = 64 / 128 / 256
  for the three head-dim classes (BLOCK_D = d), scale d^-1/2; the dK/dV kernel with the head
  slices ``dkdv_head_splits`` picks there for 132 SMs (fp32 partials); the strides of the model's
  layout (``megabyte/model.py``'s ``Attention``): q, o, dO and dq (B, N, H*d) storage seen as
  (B, H, N, d), k and v the two halves of a (B, N, 2*Hkv*d) projection, dk and dv (and their
  fp32 partials) (B, N, Hkv*d) storage, as ``empty_in_layout_of`` (``torch.empty_like``) lays
  them out for such a k;
* local attention: 2^20 patches of P = 8 bytes at d = 64 with H = 4 (G = 1) and H = 8 (G = 8,
  multi-query), and 2^17 patches of P = 64 at d = 128, H = 4 (G = 1), with and without ALiBi
  (fp32: with); the tile and warps from ``tiling()`` / ``num_warps_for()`` evaluated as on a GPU;
* patch embedding and global-to-local: 1 M bytes as B = 128 rows of T = 8192 int64 ids
  (contiguous: id stride 1), P = 8, D_G = 1024, D_L = 512, V = 512, pad_id = 257, T_MAX = 8192,
  learned positions, the pad patch / bias / local pad on (the larger programs).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
TABLE = os.path.join(RESULTS, "aot-sm90.json")

FA = "megabyte_kernels.flash_attention"
LA = "megabyte_kernels.local_attention"
PE = "megabyte_kernels.patch_embed"
KU = "megabyte_kernels._kernel_utils"
G2L = "megabyte_kernels.global_to_local"
ELT = {"bf16": 2, "fp16": 2, "fp32": 4}

# the typical launch (module docstring)
B_FLASH, N_SEQ, H_FLASH, G_FLASH = 2, 8192, 16, 16
B_BYTES, T_BYTES, P_BYTES, D_G, D_L, V, PAD_ID = 128, 8192, 8, 1024, 512, 512, 257
M_ROWS = B_BYTES * T_BYTES
LOCAL_SHAPES = ((64, 8, 1, 4, 1 << 20), (64, 8, 8, 8, 1 << 20), (128, 64, 1, 4, 1 << 17))  # d, P, G, H, patches


def _case(name, kernel, args, *, warps, stages, dtype, list_name, index, arch=90):
    """A compile case (tests/aot.py) plus where it comes from: the autotune list and the position
    in it (index 0 is the config that ``MEGABYTE_PIN_CONFIGS=1`` runs)."""
    return {"name": name, "kernel": kernel, "args": args, "arch": arch, "num_warps": warps, "num_stages": stages,
            "dtype": dtype, "list": list_name, "index": index}


# ------------------------------------------------------------------------------------ flash
def _alibi_variants(dtype):
    """HAS_ALIBI values compiled: both for 16-bit (the two model variants run both programs, and
    neither is the larger everywhere), ALiBi alone for fp32 (5-30 s a compile)."""
    return (True,) if dtype == "fp32" else (False, True)


def _flash_strides(kernel, d):
    """The stride arguments of a flash kernel (a JITFunction): the (batch, head, row) strides of each
    of its (B, H, N, d) tensors in the model's layout (module docstring)."""
    hkv = H_FLASH // G_FLASH
    qs = (N_SEQ * H_FLASH * d, d, H_FLASH * d)  # rearrange(to_q(x), "b n (h d) -> b h n d")
    kvs = (N_SEQ * 2 * hkv * d, d, 2 * hkv * d)  # a half of to_kv(x), rearranged the same way
    dkvs = (N_SEQ * hkv * d, d, hkv * d)  # torch.empty_like of such a half: (B, N, Hkv*d) storage
    args = {}
    for name, strides in (("q", qs), ("k", kvs), ("v", kvs), ("o", qs), ("do", qs), ("dq", qs), ("dk", dkvs),
                          ("dv", dkvs)):
        args.update(_strides(name, strides))
    return {k: v for k, v in args.items() if k in kernel.arg_names}


def _flash_cases(dtype):
    """Forward, dK/dV, dQ at every config of their list per head-dim class, and the preprocessing."""
    fa = importlib.import_module(FA)

    t = "*" + dtype
    out = []
    for d in (64, 128, 256):
        ptrs = {"fwd": dict(Q=t, K=t, V=t, O=t, LSE="*fp32", Slopes="*fp32"),
                "dkdv": dict(Q=t, K=t, V=t, DO=t, LSE="*fp32", DELTA="*fp32", DK=t, DV=t, Slopes="*fp32"),
                "dq": dict(Q=t, K=t, V=t, DO=t, LSE="*fp32", DELTA="*fp32", DQ=t, Slopes="*fp32")}
        # the dK/dV launch: S slices of the G heads, writing fp32 partials when S > 1
        max_bn = max(c[1] for c in fa.gpu_configs("dkdv", d, _torch_dtype(dtype)))
        splits = fa.dkdv_head_splits(-(-N_SEQ // max_bn) * B_FLASH * H_FLASH // G_FLASH, G_FLASH, 132)
        if splits > 1:
            ptrs["dkdv"].update(DK="*fp32", DV="*fp32")
        dkdv_ints = dict(HPS=G_FLASH // splits, stride_split=0 if splits == 1 else B_FLASH * N_SEQ * d)
        kernels = {"fwd": "_flash_fwd_kernel", "dkdv": "_flash_bwd_dkdv_kernel", "dq": "_flash_bwd_dq_kernel"}
        for kind, kname in kernels.items():
            rows = fa.gpu_configs(kind, d, _torch_dtype(dtype))
            lname = f"GPU_FP32['{kind}']" if dtype == "fp32" else f"GPU_{kind.upper()}['{fa._d_class(d)}']"
            for alibi in _alibi_variants(dtype):
                common = dict(scale=d ** -0.5, N=N_SEQ, D=d, H=H_FLASH, G=G_FLASH, N_BUCKET=fa._n_bucket(N_SEQ),
                              HAS_ALIBI=alibi, EVEN_D=True, UPCAST=False,
                              DOT_PREC="ieee" if dtype == "fp32" else "tf32", BLOCK_D=d)
                for i, (bm, bn, w, s) in enumerate(rows):
                    args = {**ptrs[kind], **common, **(dkdv_ints if kind == "dkdv" else {}),
                            **_flash_strides(getattr(fa, kname), d), "BLOCK_M": bm, "BLOCK_N": bn}
                    out.append(_case(f"flash_{kind} {dtype} d={d}{' alibi' if alibi else ''} #{i} {bm}x{bn} w{w} s{s}",
                                     f"{FA}:{kname}", args, warps=w, stages=s, dtype=dtype, list_name=lname, index=i))
        pre = dict(O=t, DO=t, DELTA="*fp32", N=N_SEQ, D=d, H=H_FLASH,
                   **_flash_strides(fa._flash_bwd_preprocess_kernel, d), BLOCK_M=fa.pre_block_m(d), BLOCK_D=d)
        out.append(_case(f"flash_bwd_preprocess {dtype} d={d} #0 {pre['BLOCK_M']}x{d} w4 s3",
                         f"{FA}:_flash_bwd_preprocess_kernel", pre, warps=4, stages=3, dtype=dtype,
                         list_name="pre_block_m()", index=0))
    return out


# ------------------------------------------------------------------------------------ local
def _local_cases(dtype):
    """Forward and backward of the packed local attention at the tile its heuristics pick."""
    la = importlib.import_module(LA)

    t = "*" + dtype
    out = []
    for d, P, G, H, patches in LOCAL_SHAPES:
        with mock.patch.object(la, "interpreting", lambda: False):  # the GPU's heuristic
            tile = la.tiling(P, G, la.tile_rows_target(d, ELT[dtype]))
            cpp = la.chunks_per_program(-(-patches * H // G // tile["KS"]), 132)
        tiles = f"{tile['BLOCK_Q']}x{tile['BLOCK_KV']}"
        # The model's layout: q, o, dO, dq rearranged from (B*K, P, H*d); k, v halves of (B*K, P, 2*Hkv*d);
        # dk, dv dense in k's dim order (torch.empty_like of k): (B*K, P, Hkv*d) storage.
        Hkv = H // G
        qs, kvs, dkvs = (P * H * d, d, H * d), (P * 2 * Hkv * d, d, 2 * Hkv * d), (P * Hkv * d, d, Hkv * d)
        for alibi in _alibi_variants(dtype):
            common = dict(Slopes="*fp32", scale=d ** -0.5, P=P, G=G, H=H, NKV_SEQ=patches * Hkv, D=d,
                          KS=tile["KS"], NQC=tile["NQC"], CPP=cpp, HAS_ALIBI=alibi, UPCAST=False,
                          DOT_PREC="ieee" if dtype == "fp32" else "tf32", BLOCK_Q=tile["BLOCK_Q"],
                          BLOCK_KV=tile["BLOCK_KV"], BLOCK_D=d)
            fwd = dict(Q=t, K=t, V=t, O=t, **common, **_strides("q", qs), **_strides("k", kvs), **_strides("v", kvs),
                       **_strides("o", qs))
            bwd = dict(Q=t, K=t, V=t, DO=t, DQ=t, DK=t, DV=t, **common, **_strides("q", qs), **_strides("k", kvs),
                       **_strides("v", kvs), **_strides("do", qs), **_strides("dq", qs), **_strides("dk", dkvs),
                       **_strides("dv", dkvs))
            for kname, args in (("_local_fwd_kernel", fwd), ("_local_bwd_kernel", bwd)):
                w = la.num_warps_for(kname == "_local_bwd_kernel", tile["BLOCK_KV"], ELT[dtype])
                name = f"local_{kname.split('_')[2]} {dtype} d={d} P={P} G={G}{' alibi' if alibi else ''} #0 {tiles} w{w}"
                out.append(_case(name, f"{LA}:{kname}", args, warps=w, stages=la.num_stages_for(ELT[dtype]),
                                 dtype=dtype, list_name="tiling()/num_warps_for()", index=0))
    return out


def _strides(name: str, strides) -> dict:
    """The (batch, head, row) stride arguments of tensor ``name``: stride_{name}b/h/n."""
    return {f"stride_{name}{axis}": s for axis, s in zip("bhn", strides)}


# ------------------------------------------------------------------------------------ patch_embed
def _patch_embed_cases(dtype):
    """The forward at every config of FWD_CONFIGS, the one-hot gradient, the leading-axis sums."""
    pe = importlib.import_module(PE)

    t = "*" + dtype
    out = []
    fwd = dict(Ids="*i64", Table=t, Pos=t, PadPatch=t, Out=t, N=M_ROWS, T=T_BYTES, KP=T_BYTES, D=D_G, P=P_BYTES,
               pad_id=PAD_ID, stride_ib=T_BYTES, stride_it=1, HAS_POS=True, HAS_PAD_PATCH=True)
    for i, cfg in enumerate(pe.FWD_CONFIGS):
        kw = cfg.kwargs
        out.append(_case(f"patch_embed_fwd {dtype} #{i} {kw['BLOCK_R']}x{kw['BLOCK_D']} w{cfg.num_warps}",
                         f"{PE}:_patch_embed_fwd_kernel", {**fwd, **kw}, warps=cfg.num_warps,
                         stages=cfg.num_stages, dtype=dtype, list_name="FWD_CONFIGS", index=i))
    bv, bn, bd, w, s = importlib.import_module(KU).onehot_config(_torch_dtype(dtype))
    # the launcher's split of the rows: a multiple of BLOCK_N rows per split
    oh = dict(Codes="*i32", G=t, Partial="*fp32", N=M_ROWS, D=D_G, VE=V, rows_per_split=bn * 1024, ones_row=-1,
              BLOCK_V=bv, BLOCK_N=bn, BLOCK_D=bd, UPCAST=False, PRECISION="ieee")
    out.append(_case(f"onehot_grad {dtype} #0 {bv}x{bn}x{bd} w{w} s{s}", f"{KU}:_onehot_grad_kernel", oh,
                     warps=w, stages=s, dtype=dtype, list_name="onehot_config()", index=0))
    # d pos_table (dOut summed over the batch) and the sum of fp32 partials (one-hot, dW)
    sums = [("pos", t, t, dict(S=B_BYTES, R_in=T_BYTES, R_out=T_BYTES, D=D_G, stride_xs=T_BYTES * D_G))]
    if dtype != "fp32":
        sums.append(("partials", "*fp32", t, dict(S=14, R_in=D_L, R_out=D_L, D=D_G, stride_xs=D_L * D_G)))
    for what, x, o, ints in sums:
        args = dict(X=x, Out=o, **ints, BLOCK_R=8, BLOCK_D=256)
        out.append(_case(f"sum_leading {dtype} {what} #0 8x256 w4", f"{KU}:_sum_leading_kernel", args, warps=4,
                         stages=3, dtype=dtype, list_name="_sum_leading()", index=0))
    return out


# ------------------------------------------------------------------------------------ global_to_local
def _g2l_cases(dtype):
    """The GEMM with its fused epilogue (forward) and without (dX) at every config of its list, and
    the dW kernel; fp32 also with TF32 (``torch.backends.cuda.matmul.allow_tf32``) at the first."""
    g2l = importlib.import_module(G2L)

    t = "*" + dtype
    configs = g2l.MATMUL_CONFIGS_32 if dtype == "fp32" else g2l.MATMUL_CONFIGS_16
    lname = "MATMUL_CONFIGS_32" if dtype == "fp32" else "MATMUL_CONFIGS_16"
    # forward: X (M, D_G) @ W^T with W (D_L, D_G) read through its strides, the epilogue on
    fwd = dict(A=t, Bmat=t, C=t, Bias=t, Ids="*i64", Table=t, LocalPad=t, M=M_ROWS, N=D_L, Kd=D_G, stride_am=D_G,
               stride_ak=1, stride_bk=1, stride_bn=D_G, T=T_BYTES, KP=T_BYTES, P=P_BYTES, S=1, pad_id=PAD_ID, V=V,
               stride_ib=T_BYTES, stride_it=1, EPILOGUE=True, HAS_BIAS=True, CROSS_PATCH=False, HAS_LOCAL_PAD=True,
               UPCAST=False)
    # dX = dOut (M, D_L) @ W (D_L, D_G): the launcher passes dOut for the unused pointers, zeros/ones for the ints
    dx = dict(A=t, Bmat=t, C=t, Bias=t, Ids=t, Table=t, LocalPad=t, M=M_ROWS, N=D_G, Kd=D_L, stride_am=D_L,
              stride_ak=1, stride_bk=D_G, stride_bn=1, T=0, KP=1, P=1, S=1, pad_id=0, V=0, stride_ib=0, stride_it=0,
              EPILOGUE=False, HAS_BIAS=False, CROSS_PATCH=False, HAS_LOCAL_PAD=False, UPCAST=False)
    precs = ("ieee", "tf32") if dtype == "fp32" else ("ieee",)
    out = []
    for i, cfg in enumerate(configs):
        kw = cfg.kwargs
        tile = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"
        for what, args in (("fwd", fwd), ("dx", dx)):
            for prec in precs if i == 0 else precs[:1]:
                tag = f"{dtype}{'-tf32' if prec == 'tf32' else ''}"
                out.append(_case(f"g2l_matmul_{what} {tag} #{i} {tile}", f"{G2L}:_g2l_matmul_kernel",
                                 {**args, **kw, "PRECISION": prec}, warps=cfg.num_warps, stages=cfg.num_stages,
                                 dtype=dtype, list_name=lname, index=i))
    bi, bj, bm, w, s = g2l.atb_config(_torch_dtype(dtype))
    for prec in precs:
        args = dict(A=t, Bmat=t, Partial="*fp32", M=M_ROWS, NA=D_L, NB=D_G, rows_per_split=bm * 1024, UPCAST=False,
                    PRECISION=prec, BLOCK_I=bi, BLOCK_J=bj, BLOCK_M=bm)
        tag = f"{dtype}{'-tf32' if prec == 'tf32' else ''}"
        out.append(_case(f"atb {tag} #0 {bi}x{bj}x{bm} w{w} s{s}", f"{G2L}:_atb_kernel", args, warps=w, stages=s,
                         dtype=dtype, list_name="atb_config()", index=0))
    return out


def _torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def table_cases(pinned_only: bool = False, dtypes=("bf16", "fp32"), arch: int = 90) -> list[dict]:
    """Every compile case of the table (or only the configs ``MEGABYTE_PIN_CONFIGS=1`` runs: index
    0 of each list), for each dtype ("bf16"/"fp16": the 16-bit lists, "fp32": the fp32 lists)."""
    cases = []
    for dtype in dtypes:
        for build in (_flash_cases, _local_cases, _patch_embed_cases, _g2l_cases):
            cases += build(dtype)
    if pinned_only:
        cases = [c for c in cases if c["index"] == 0]
    for c in cases:
        c["arch"] = arch
    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    return cases


def compile_all(cases: list[dict], workers: int = 2, progress: bool = True) -> list[dict]:
    """Compile ``cases`` in ``workers`` fresh subprocesses side by side (tests/aot.py), the slow
    fp32 ones first and dealt out in turn so the workers finish together; results in the order of
    ``cases``. ``progress`` prints "[n/total] seconds name" as each compile finishes."""
    from tests.aot import compile_cases

    order = sorted(range(len(cases)), key=lambda i: (cases[i]["dtype"] != "fp32", i))
    chunks = [order[w::workers] for w in range(workers)]
    lock, done = threading.Lock(), [0]

    def report(case, res):
        with lock:
            done[0] += 1
            what = f"{res['seconds']:6.1f} s" if res["ok"] else "FAILED  "
            print(f"  [{done[0]:>3}/{len(cases)}] {what}  {case['name']}", flush=True)

    with ThreadPoolExecutor(workers) as pool:
        out = list(pool.map(lambda ix: compile_cases([cases[i] for i in ix], on_result=report if progress else None),
                            chunks))
    results = [None] * len(cases)
    for ix, res in zip(chunks, out):
        for i, r in zip(ix, res):
            results[i] = r
    return results


# ------------------------------------------------------------------------------------ output
def table_row(case: dict, res: dict) -> dict:
    """One row of the committed table: where the config comes from, its constexprs and the
    compile's figures."""
    row = {k: case[k] for k in ("name", "kernel", "dtype", "list", "index", "arch", "num_warps", "num_stages")}
    # the compiled program's constexprs: the kernel's own and the ints the launch turned into 1
    row["constexprs"] = {k: v for k, v in case["args"].items() if k not in res.get("signature", {})}
    row["ints"] = {k: v for k, v in case["args"].items() if res.get("signature", {}).get(k, "").startswith("i")}
    row.update({k: res.get(k) for k in ("ok", "error", "regs", "spill_stores", "spill_loads", "stack", "shared",
                                        "wgmma", "mma_sync", "cp_async", "ptx_sha")})
    row["specialized"] = sorted(res.get("attrs", {}))
    return row


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _mma(row):
    """Which tensor-core instructions the compile uses: wgmma, mma.sync, both, or none (-)."""
    return "+".join(k for k, on in (("wgmma", row["wgmma"]), ("mma.sync", row["mma_sync"])) if on) or "-"


def markdown(meta: dict, rows: list[dict]) -> str:
    """The table for people: one line per compile."""
    lines = [f"# Ahead-of-time compile of every kernel and autotune config for sm_{meta['arch']}", "",
             f"Triton {meta['triton']}, git {meta['git_sha']}, {meta['date']}; `{meta['command']}` "
             f"({meta['compiles']} compiles, {meta['seconds']:.0f} s). Made by `make aot-table` "
             "(benchmarks/aot_table.py: the typical launch it specializes for is in its docstring); "
             "checked by tests/kernels/test_aot.py. Registers and spills per thread from `ptxas -v`, "
             "shared memory per block; `#0` is the config `MEGABYTE_PIN_CONFIGS=1` runs.", "",
             "| kernel / config | list | regs | spill st/ld B | shared B | mma | cp.async |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['name']} | `{r['list']}` | FAILED: {r['error'][:80]} | | | | |")
            continue
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"| {r['name']} | `{r['list']}` | {r['regs']} | {spill} | {r['shared']} | {_mma(r)} | "
                     f"{'yes' if r['cp_async'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=TABLE, help="the JSON table (the .md goes next to it)")
    ap.add_argument("--workers", type=int, default=2, help="compile subprocesses side by side")
    ap.add_argument("--only", default="", help="compile only cases whose name contains this (no table written)")
    a = ap.parse_args(argv)
    import triton

    cases = table_cases()
    if a.only:
        cases = [c for c in cases if a.only in c["name"]]
    print(f"compiling {len(cases)} kernels/configs for sm_90 in {a.workers} subprocesses", flush=True)
    start = time.perf_counter()
    results = compile_all(cases, a.workers)
    rows = [table_row(c, r) for c, r in zip(cases, results)]
    seconds = time.perf_counter() - start
    for r in rows:
        print(f"{r['name']:<58} " + (f"regs {r['regs']:>3} spill {r['spill_stores']:>5} shared {r['shared']:>6} "
                                     f"{_mma(r)}" if r["ok"] else "FAILED " + r["error"][:200]))
    if a.only:
        return 0 if all(r["ok"] for r in rows) else 1
    meta = {"arch": 90, "triton": triton.__version__, "git_sha": git_sha(), "date": datetime.date.today().isoformat(),
            "command": "python -m benchmarks.aot_table", "compiles": len(rows), "seconds": round(seconds, 1)}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
        f.write("\n")
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(markdown(meta, rows))
    failed = [r["name"] for r in rows if not r["ok"]]
    print(f"wrote {a.out} and .md: {len(rows)} compiles in {seconds:.0f} s, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
