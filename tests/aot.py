"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, without a GPU (DESIGN.md §4, tier 3).

A case compiles what a real launch compiles. Triton's launcher does not compile the signature
alone: it *specializes* each argument of the call (``JITFunction.run``): a pointer whose address
is 16-byte aligned gets ``tt.divisibility = 16``, an int divisible by 16 too, an int equal to 1
becomes the constexpr 1. Without those attributes the compiler builds another program (scalar
loads, no ``cp.async`` pipelining, a fraction of the shared memory). So a case gives the
*argument values of a typical launch*, and :func:`_specialize` runs them through Triton's own
binder (``create_function_from_signature`` + ``JITFunction._pack_args``, the code a launch
runs) with stand-in tensors at address 0, which gives exactly the signature, constexprs and
attrs of that launch.

A case is a dict::

    {"name": "fwd bf16 d=128 128x64 w8 s3",                     # unique, free text
     "kernel": "megabyte_kernels.flash_attention:_flash_fwd_kernel",
     "args": {"Q": "*bf16", ..., "scale": 0.088, "N": 8192, ..., "BLOCK_M": 128},
     "arch": 90, "num_warps": 8, "num_stages": 3}

``args`` holds every parameter of the kernel: a pointer as its Triton type (``"*bf16"``), an
int or float as the value of a typical launch, a constexpr as its value. Its result::

    {"ok": bool, "error": str, "seconds": compile time,
     "regs": registers per thread, "spill_stores"/"spill_loads"/"stack": bytes per thread
     (ptxas -v), "shared": bytes of shared memory per block, "wgmma"/"mma_sync"/"cp_async"/
     "tma": whether the PTX has those instructions, "ptx_sha": a hash of the PTX without line
     info (changes when the program does), "signature" and "attrs" as specialized}

``triton.compile`` fails in a process that has interpreted kernels, and the test process runs
with ``TRITON_INTERPRET=1``: :func:`compile_cases` compiles in a fresh subprocess without that
variable, with ``TRITON_CACHE_DIR`` pointing at an empty directory so every case is really
compiled (and ptxas really runs: its log is where the spill figures come from).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_cases(cases: list[dict], timeout: float = 1800, on_result=None) -> list[dict]:
    """Compile ``cases`` in one fresh subprocess (no interpreter, empty Triton cache); one result
    per case, in order. ``on_result(case, result)`` is called as each case finishes (progress)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    results = []
    with tempfile.TemporaryDirectory(prefix="megabyte-aot-") as cache, tempfile.TemporaryFile("w+") as err:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.Popen([sys.executable, "-m", "tests.aot"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env, cwd=ROOT)
        proc.stdin.write(json.dumps(cases))
        proc.stdin.close()
        deadline = time.monotonic() + timeout
        for line in proc.stdout:  # one JSON result per line, per case, as it finishes
            results.append(json.loads(line))
            if on_result is not None:
                on_result(cases[len(results) - 1], results[-1])
            if time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait()
        err.seek(0)
        if proc.returncode != 0 or len(results) != len(cases):
            raise RuntimeError(f"AOT compile subprocess failed (exit {proc.returncode}, {len(results)} of "
                               f"{len(cases)} cases done):\n{err.read()[-4000:]}")
    return results


# ------------------------------------------------------------------------------ in the subprocess
class _StandInTensor:
    """What Triton's binder needs of a tensor argument: a dtype and a 16-byte-aligned address."""

    def __init__(self, dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr() -> int:
        return 0


def _torch_dtype(triton_type: str):
    import torch

    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
             "i8": torch.int8, "u8": torch.uint8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64}
    return names[triton_type.lstrip("*")]


def _jit_function(path: str):
    """The JITFunction behind ``module:name`` (unwrapping @triton.autotune / @triton.heuristics)."""
    from triton.runtime.jit import JITFunction

    module, name = path.split(":")
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _specialize(fn, backend, args: dict, options: dict):
    """(signature, constexprs, attrs, options) of a launch of ``fn`` with ``args``, computed by
    Triton's own launch-time binder, as ``JITFunction.run`` does before it compiles."""
    from triton.runtime.jit import create_function_from_signature

    missing = [p.name for p in fn.params if p.name not in args]
    if missing:
        raise ValueError(f"case lacks arguments {missing}")
    call = {}
    for p in fn.params:
        v = args[p.name]
        call[p.name] = _StandInTensor(_torch_dtype(v)) if (
            not p.is_constexpr and isinstance(v, str) and v.startswith("*")) else v
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**call, **options}
    bound, specialization, opts = binder(**kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    return signature, constexprs, attrs, opts


def _ptxas_figures(log: str) -> dict:
    """Registers, spill and stack bytes per thread from a ``ptxas -v`` log."""
    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None
    return {"regs": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


def _run_ptxas(ptx: str, arch: int) -> str:
    """``ptxas -v`` on the PTX with Triton's bundled ptxas: the log when the compile did not run
    ptxas itself (a cache hit)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                               src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    return proc.stderr + proc.stdout


def ptx_fingerprint(ptx: str) -> str:
    """sha256 of the PTX without its line information (``.loc``/``.file`` directives and the
    debug sections): moving a kernel down its file leaves it, changing the program changes it."""
    body = ptx.split("\t.section\t.debug", 1)[0]
    lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith((".loc", ".file", "//"))]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _ptx_features(ptx: str) -> dict:
    """Which tensor-core and async-copy instructions the PTX uses."""
    return {"wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx, "cp_async": "cp.async" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx}


def _compile_one(case: dict) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    fn = _jit_function(case["kernel"])
    arch = case.get("arch", 90)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": case.get("num_warps", 4), "num_stages": case.get("num_stages", 3)}
    signature, constexprs, attrs, opts = _specialize(fn, make_backend(target), case["args"], options)
    if not case.get("specialize", True):  # what a compile without the launch's attributes builds
        attrs = {}
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    start = time.perf_counter()
    with knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the ptxas -v log: capture it
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=target, options=opts.__dict__)
    seconds = time.perf_counter() - start
    ptx = k.asm["ptx"]
    ptxas_log = log.getvalue() if "Used" in log.getvalue() else _run_ptxas(ptx, arch)
    return {"ok": True, "error": "", "seconds": round(seconds, 2), **_ptxas_figures(ptxas_log),
            "shared": int(k.metadata.shared), **_ptx_features(ptx), "ptx_sha": ptx_fingerprint(ptx),
            "signature": {n: t for n, t in signature.items() if t != "constexpr"},
            "attrs": {fn.arg_names[path[0]]: a for path, a in attrs.items() if a}}


def main() -> None:
    """Read the cases (JSON) from stdin, print one JSON result line per case as it is compiled."""
    assert "TRITON_INTERPRET" not in os.environ, "AOT compilation must not run under the interpreter"
    for case in json.loads(sys.stdin.read()):
        try:
            result = _compile_one(case)
        except Exception as e:  # reported per case; the caller asserts on it
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:]}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
