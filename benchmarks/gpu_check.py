"""``make gpu-check``: the GPU tier in one go, under 8 minutes on one H200.

    python3 -m benchmarks.gpu_check            # from the repository root (make gpu-check)

Runs with the ``python3`` that is already there (no venv, no pip, no network): the checkout is
put on ``PYTHONPATH``. In order, each step with its own time limit so that the whole stays
under ``--budget`` seconds (default 470):

1. the GPU-tier tests: the kernel parity suite on CUDA (``pytest tests/kernels -m "not aot"``,
   bf16 and large shapes included) and every other ``gpu``-marked test (``pytest tests -m gpu
   --ignore=tests/kernels``: model parity in bf16, autocast, ``torch.compile(fullgraph=True)``
   with the Triton backend);
2. the GPU benchmarks (``python -m benchmarks.run``): the end-to-end training step at the
   benchmark config and at T=65536 (Triton, eager reference, ``torch.compile`` of the
   reference at the benchmark config, megabyte-pytorch when importable, the GPT-2/SDPA
   baseline), then the kernel microbenchmarks and generation, as far as the time allows.

It writes ``benchmarks/results/<date>-<gpu>.json`` (+ ``.md``, PNG plots) with the test logs
attached, refreshes the GPU section of ``benchmarks/README.md``, and prints the targets.
Exit status: 0 when the tests passed and the result file was written.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _run(cmd: list[str], env: dict, timeout: float, log_path: str) -> tuple[int | None, str]:
    """Run ``cmd`` (output to the terminal and ``log_path``); (returncode or None on timeout, tail)."""
    print(f"\n$ {' '.join(cmd)}   (time limit {timeout:.0f} s)", flush=True)
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        # own process group: a time limit ends the command and its workers (inductor, pytest)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        fd = proc.stdout.fileno()
        t0 = time.perf_counter()
        timed_out = False
        try:
            import selectors

            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = timeout - (time.perf_counter() - t0)
                if left <= 0:
                    timed_out = True
                    _kill_group(proc)
                    msg = f"\n*** killed after {timeout:.0f} s (time limit)\n"
                    log.write(msg.encode())
                    print(msg, flush=True)
                    break
                if sel.select(timeout=min(left, 5.0)):
                    chunk = os.read(fd, 65536)  # whatever is there: never waits for a newline
                    if not chunk:
                        break
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    log.write(chunk)
                elif proc.poll() is not None:  # exited; a leftover worker may still hold the pipe
                    break
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    if timed_out:
        rc = None
    with open(log_path, errors="replace") as f:
        tail = f.read()[-3000:]
    return rc, tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=470, help="seconds for everything (default 470)")
    ap.add_argument("--test-budget", type=float, default=200, help="seconds for the tests (default 200)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--original", default=None, metavar="PATH", help="also benchmark a checkout of the original")
    ap.add_argument("--dry-run-cpu", metavar="OUT_DIR", default=None,
                    help="check this script's plumbing on a CPU: a few tests, a smoke benchmark into OUT_DIR")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    py = sys.executable or "python3"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("PYTHONUNBUFFERED", "1")

    probe = subprocess.run([py, "-c", "import torch, sys; print(torch.__version__, torch.cuda.is_available()); "
                            "sys.exit(0 if torch.cuda.is_available() else 3)"], env=env, capture_output=True, text=True)
    print(f"python {sys.version.split()[0]} ({py}); torch/cuda: {probe.stdout.strip() or probe.stderr.strip()[-300:]}")
    dry = a.dry_run_cpu is not None
    if probe.returncode != 0 and not dry:
        print("gpu-check needs a CUDA device and an importable torch; nothing was run")
        return 2
    missing = [m for m in ("einops", "safetensors", "triton", "pytest", "matplotlib")
               if subprocess.run([py, "-c", f"import {m}"], env=env, capture_output=True).returncode != 0]
    if missing:
        print(f"note: not importable here: {missing} (nothing is installed; parts needing them are skipped)")

    logs = tempfile.mkdtemp(prefix="gpu_check_")
    tests_ok = True
    attach = []
    if not a.skip_tests and "pytest" not in missing:
        steps = [
            ("kernels", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "-m", "not aot"], 0.6),
            ("gpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-m", "gpu",
                     "--ignore=tests/kernels"], 0.4),
        ]
        if dry:
            steps = [(n, cmd + ["-k", "opcheck or precedence"], share) for n, cmd, share in steps]
        t_tests = time.perf_counter()
        for i, (name, cmd, share) in enumerate(steps):
            spent = time.perf_counter() - t_tests
            left = a.test_budget - spent
            limit = left if i == len(steps) - 1 else max(30.0, a.test_budget * share)
            path = os.path.join(logs, f"pytest-{name}.log")
            rc, tail = _run(cmd, env, max(10.0, limit), path)
            attach.append(path)
            ok = rc in (0, 5)  # 5: pytest collected no test for this selection
            tests_ok &= ok
            status = "passed" if rc == 0 else "no tests selected" if rc == 5 else \
                "TIME LIMIT" if rc is None else f"FAILED (rc={rc})"
            print(f"[tests {name}] {status}")
    elif "pytest" in missing:
        tests_ok = False
        print("[tests] pytest is not importable here: tests not run")

    left = a.budget - (time.perf_counter() - t_start)
    bench = [py, "-m", "benchmarks.run", "--device", "cuda",
             "--suites", "model,patch_embed,global_to_local,causal_attention,generation,long_context",
             "--impls", "megabyte[triton],megabyte[reference],compile(megabyte[reference]),megabyte-pytorch,"
                        "gpt2-sdpa,original",
             "--compile-configs", "bench", "--budget-s", "1.0",
             "--time-limit", f"{max(30.0, left - 90):.0f}"]
    if dry:
        bench[bench.index("cuda")] = "cpu"
        bench += ["--smoke", "--threads", "1", "--out-dir", a.dry_run_cpu]
    if a.original:
        bench += ["--original", a.original]
    for path in attach:
        bench += ["--attach", path]
    rc, _ = _run(bench, env, max(60.0, left - 5), os.path.join(logs, "benchmarks.log"))
    print(f"\n[gpu-check] tests {'passed' if tests_ok else 'NOT all passed'}; benchmarks "
          f"{'written' if rc == 0 else 'FAILED or cut short (partial results may be written)'}; "
          f"{time.perf_counter() - t_start:.0f} s; logs in {logs}")
    return 0 if (tests_ok and rc == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
