"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, without a GPU (DESIGN.md §4, tier 3).

``triton.compile`` fails in a process that has already interpreted kernels, and the test
process runs with ``TRITON_INTERPRET=1``; so :func:`compile_cases` compiles a batch of cases in
one fresh subprocess without that variable (one subprocess per batch keeps the cost of
importing torch to once per test module).

A case is a dict::

    {"kernel": "megabyte_kernels.patch_embed:_patch_embed_fwd_kernel",
     "signature": {"X": "*bf16", "N": "i32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": 128},
     "arch": 90, "num_warps": 4, "num_stages": 2}

and its result ``{"ok": bool, "error": str, "shared": bytes of shared memory, "regs": registers
per thread or None, "stack": bytes of per-thread stack or None}``. Triton inlines the calls in a
kernel, so its stack is, in practice, local memory that ptxas spilled registers to: 0, no spills.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_cases(cases: list[dict], timeout: float = 900) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.aot"], input=json.dumps(cases), capture_output=True, text=True,
        env=env, cwd=ROOT, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes per thread), read from the cubin with cuobjdump
    (shipped in Triton's wheel); (None, None) without it."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)


def _compile_one(case: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module, name = case["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):  # unwrap @triton.autotune / @triton.heuristics
        fn = fn.fn
    src = ASTSource(fn, signature=case["signature"], constexprs=case.get("constexprs", {}))
    options = {"num_warps": case.get("num_warps", 4), "num_stages": case.get("num_stages", 2)}
    k = triton.compile(src, target=GPUTarget("cuda", case.get("arch", 90), 32), options=options)
    regs, stack = _resource_usage(k.asm["cubin"])
    return {"ok": True, "error": "", "shared": int(k.metadata.shared), "regs": regs, "stack": stack}


def main() -> None:
    assert "TRITON_INTERPRET" not in os.environ, "AOT compilation must not run under the interpreter"
    results = []
    for case in json.loads(sys.stdin.read()):
        try:
            results.append(_compile_one(case))
        except Exception as e:  # reported per case; the test asserts on it
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:], "shared": None, "regs": None,
                            "stack": None})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
