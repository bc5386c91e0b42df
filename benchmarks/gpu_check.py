"""``make gpu-check``: the whole GPU check in one call of at most 5 minutes on one H200.

    PYTHONPATH=$PWD python3 -m benchmarks.gpu_check --out $OUT/gpu     # the one call on a GPU machine
    make gpu-check GPU_CHECK_OUT=DIR                                    # the same through make
    python -m benchmarks.gpu_check --dry-run-cpu --out /tmp/dry        # the same stages on CPU, tiny

It runs under the machine's own ``python3`` with the checkout on ``PYTHONPATH``: it installs
nothing, needs no network and never sets ``TRITON_INTERPRET`` on a CUDA machine. Within
``--budget`` seconds (default 300), each stage in worker processes with its own time limit:

0. **preflight** (seconds): GPU, driver, torch/triton/numpy/python versions, ninja and a C++
   compiler, and the two ceilings measured: device copy GB/s (read + write) and bf16 GEMM
   TFLOP/s on random data (``benchmarks/gpu_bench.py preflight``);
1. **smoke** (at most 90 s, cold compiles included, configs pinned by ``MEGABYTE_PIN_CONFIGS=1``):
   every Triton kernel once, forward and backward, bf16 and fp16, at one mid-sized shape,
   NaN-poisoned outputs, against float64 with DESIGN.md §4's tolerances, one verdict line each
   (``benchmarks/gpu_smoke.py``, one process per case and dtype in parallel). If everything
   after it dies, this stage alone says whether the kernels are right on a GPU. The cores it
   leaves free compile the benchmark stage's autotune configs ahead (``gpu_bench.py warm``);
2. **GPU-tier tests**: ``pytest tests -m "not aot and not native" -rfE --tb=short`` (``-n 8``
   when pytest-xdist is there); at its time limit SIGINT (pytest prints its report), SIGKILL
   15 s later; the counts are parsed into the result;
3. **benchmarks in order of value** (``gpu_bench.py run``, autotuned): flash attention bf16
   causal d=128 (H=16, B=16384/N; N=8192 and 16384, MHA and MQA, forward and forward+backward)
   against the flash, efficient and cudnn SDPA backends (math would hold N x N scores per head),
   each shape's autotune winner parity-checked once at batch 1 (same autotune key); local attention
   (P=8, d=64, H=4, 1M patches); patch_embed and global_to_local at 1M bytes (+ the parity of
   their winners); cached generation, one training step against the reference, the T=2^20 memory
   row. Every row is appended to ``results.jsonl`` (fsynced) the moment it is measured; what does
   not fit the time left is recorded as not run; a worker whose CUDA context dies is replaced
   by a fresh one for the items left.

It ends with one table (stage, what, figure, goal, verdict: met / not met / not run / PASS /
FAIL; for the target rows measured / floor and measured / predicted of the committed
performance model, ``benchmarks/perf_model.py``), printed last and saved as ``summary.md`` and ``summary.json``, and ``goals.png``. The
output folder (``--out``; default ``benchmarks/results/gpu-check-<date>``) holds six files:
``gpu_check.log`` (everything printed), ``results.jsonl``, ``pytest.log``, ``summary.md``,
``summary.json``, ``goals.png``.

Exit status: 0 every parity check (smoke, tests, autotune winners) ran and passed; 1 one
failed; 3 none failed but some did not run (time limit, crash, ``--stages``); 2 no CUDA device
(without ``--dry-run-cpu``), or a CUDA device with it.

``--dry-run-cpu`` runs the same stages on a machine without CUDA, in Triton's interpreter
(``TRITON_INTERPRET=1`` for the workers), at tiny sizes: the plumbing test of
``tests/test_gpu_check.py``. ``--inject-fault KERNEL`` is a test hook (see gpu_smoke.py).

This process imports no torch (a broken install still gets its table); the sizes and goals are
in ``gpu_plan.py``, the workers in ``gpu_smoke.py`` and ``gpu_bench.py``, the table in
``gpu_summary.py``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import selectors
import shlex
import signal
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file: make the checkout importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import gpu_plan as plan  # noqa: E402  (stdlib only: no torch in this process)
from benchmarks.gpu_summary import build_table, exit_status, plot, render_md  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUDGET = 300.0
SMOKE_LIMIT = 90.0
STAGES = ("smoke", "tests", "bench")
PIN = "MEGABYTE_PIN_CONFIGS"


# ------------------------------------------------------------------------------------------
# printing: everything goes to the terminal and to DIR/gpu_check.log
# ------------------------------------------------------------------------------------------
class Log:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1, errors="replace")

    def say(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


# ------------------------------------------------------------------------------------------
# worker processes, several at once, output multiplexed line by line
# ------------------------------------------------------------------------------------------
class Job:
    """One worker command with its own time limit (seconds from its start). At the limit:
    SIGINT first when ``interrupt_first`` (pytest prints its report), SIGKILL 15 s later;
    otherwise SIGKILL to its process group at once."""

    GRACE = 15.0

    def __init__(self, name, cmd, env, limit, *, interrupt_first=False, tee=None, essential=True):
        self.name, self.cmd, self.env, self.limit = name, cmd, env, limit
        self.interrupt_first, self.tee, self.essential = interrupt_first, tee, essential
        self.started = False
        self.proc = None
        self.rc = None
        self.timed_out = False
        self.eof = False
        self.exit_seen = None
        self.buf = b""
        self.text = []  # decoded lines (kept for parsing)
        self.t0 = self.interrupted = None
        self.killed = False
        self.lines_before_interrupt = None
        self.wall = 0.0

    def start(self, log: Log) -> None:
        self.started = True
        log.say(f"[{self.name}] $ {shlex.join(self.cmd)}   (time limit {self.limit:.0f} s)")
        self.t0 = time.monotonic()
        self.tee_f = open(self.tee, "ab") if self.tee else None
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def feed(self, chunk: bytes, log: Log) -> None:
        if self.tee_f:
            self.tee_f.write(chunk)
            self.tee_f.flush()
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self._line(line, log)

    def _line(self, raw: bytes, log: Log) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        self.text.append(text)
        log.say(f"[{self.name}] {text}")

    def kill_group(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def check_time(self, now: float, log: Log) -> None:
        if self.proc.poll() is not None or now - self.t0 < self.limit:
            return
        self.timed_out = True
        if self.interrupt_first and self.interrupted is None:
            self.interrupted = now
            self.lines_before_interrupt = len(self.text)
            log.say(f"[{self.name}] *** time limit {self.limit:.0f} s: SIGINT (SIGKILL in {self.GRACE:.0f} s)")
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            return
        if self.interrupt_first and now - self.interrupted < self.GRACE:
            return
        if not self.killed:
            log.say(f"[{self.name}] *** time limit {self.limit:.0f} s: SIGKILL")
            self.killed = True
        self.kill_group()

    def finish(self, log: Log) -> None:
        if self.buf:
            self._line(self.buf, log)
            self.buf = b""
        self.rc = self.proc.wait()
        self.kill_group()  # leftovers (xdist or compile workers) holding the pipe
        self.wall = time.monotonic() - self.t0
        if self.tee_f:
            self.tee_f.close()
        status = "time limit" if self.timed_out else f"rc={self.rc}"
        log.say(f"[{self.name}] finished: {status} after {self.wall:.1f} s")


def run_jobs(jobs: list[Job], log: Log, parallel: int = 1, *, deadline: float | None = None,
             linger: float = 15.0) -> list[Job]:
    """Run ``jobs`` (at most ``parallel`` at once, in list order), their output line by line to
    the log, each under its own time limit, none past ``deadline`` (a ``time.monotonic()``).
    Non-essential jobs (compile-ahead) only fill free slots: once every essential job has ended
    they get ``linger`` seconds more, and those not started by then never start."""
    pending, running = list(jobs), []
    sel = selectors.DefaultSelector()
    cutoff = deadline
    while pending or running:
        now = time.monotonic()
        if cutoff == deadline and not any(j.essential for j in pending + running) and \
                any(j.essential for j in jobs):
            cutoff = now + linger if deadline is None else min(deadline, now + linger)
        while pending and len(running) < parallel:
            j = pending.pop(0)
            if cutoff is not None:
                if cutoff - now < 2.0:
                    log.say(f"[{j.name}] not started: its stage's time is up")
                    continue
                j.limit = min(j.limit, cutoff - now)
            j.start(log)
            sel.register(j.proc.stdout, selectors.EVENT_READ, j)
            running.append(j)
        for key, _ in sel.select(timeout=0.5):
            j = key.data
            chunk = os.read(key.fileobj.fileno(), 65536)
            if chunk:
                j.feed(chunk, log)
            else:
                j.eof = True
                sel.unregister(key.fileobj)
        now = time.monotonic()
        for j in list(running):
            if cutoff is not None and not j.essential and now > cutoff:
                j.limit = min(j.limit, now - j.t0)  # past the cutoff: ends now
            j.check_time(now, log)
            if j.proc.poll() is not None:
                j.exit_seen = j.exit_seen or now
                if j.eof or now - j.exit_seen > 2.0:  # exited; a grandchild may still hold the pipe
                    if not j.eof:
                        sel.unregister(j.proc.stdout)
                    j.finish(log)
                    j.proc.stdout.close()
                    running.remove(j)
    return jobs


# ------------------------------------------------------------------------------------------
# the stages
# ------------------------------------------------------------------------------------------
class Run:
    """One gpu-check: options, budget clock, output folder, environment of the workers."""

    def __init__(self, a):
        self.a = a
        self.dry = a.dry_run_cpu
        self.scale = "dry" if self.dry else "gpu"
        self.t0 = time.monotonic()
        self.epoch0 = time.time()
        self.budget = a.budget
        self.out = os.path.abspath(a.out)
        os.makedirs(self.out, exist_ok=True)
        for name in (plan.RESULTS, plan.LOG, plan.PYTEST_LOG, plan.SUMMARY_MD, plan.SUMMARY_JSON, plan.PLOT):
            if os.path.exists(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))  # a folder reused: this run's files only
        self.jsonl = os.path.join(self.out, plan.RESULTS)
        self.log = Log(os.path.join(self.out, plan.LOG))
        self.py = sys.executable or "python3"
        self.interpret = False  # set after preflight, only when there is no CUDA device
        self.stages = [s for s in (a.stages.split(",") if a.stages else STAGES) if s != "preflight"]
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise SystemExit(f"gpu_check: unknown stages {sorted(unknown)}; known: preflight,{','.join(STAGES)}")
        self.parallel = max(1, min(os.cpu_count() or 1, 16)) if not self.dry else 2

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def env(self, pinned: bool = False, inject: bool = False) -> dict:
        """The workers' environment: the checkout on PYTHONPATH; TRITON_INTERPRET only in a dry
        run without CUDA; configs pinned only where asked (the smoke stage)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        for var in ("TRITON_INTERPRET", PIN, plan.INJECT_ENV):
            env.pop(var, None)
        if self.interpret:
            env["TRITON_INTERPRET"] = "1"
            env.setdefault("OMP_NUM_THREADS", "1")
        if pinned:
            env[PIN] = "1"
        if inject and self.a.inject_fault:
            env[plan.INJECT_ENV] = self.a.inject_fault
        return env

    def worker(self, module: str, *args) -> list[str]:
        return [self.py, "-m", module, *args, "--scale", self.scale, "--jsonl", self.jsonl]

    def emit(self, row: dict) -> None:
        plan.append_row(self.jsonl, row)

    def rows(self) -> list[dict]:
        return plan.read_rows(self.jsonl)


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stage_preflight(r: Run) -> dict | None:
    limit = min(60.0, max(20.0, 0.15 * r.budget))
    r.log.say(f"\n== preflight (limit {limit:.0f} s)")
    run_jobs([Job("preflight", r.worker("benchmarks.gpu_bench", "preflight"), r.env(), limit)], r.log)
    pf = [x for x in r.rows() if x.get("kind") == "preflight"]
    return pf[-1] if pf else None


def stage_smoke_and_warm(r: Run) -> None:
    """Smoke workers (configs pinned) first; compile-ahead workers fill the free cores."""
    limit = min(SMOKE_LIMIT, max(20.0, 0.3 * r.budget))
    jobs = []
    if "smoke" in r.stages:
        kernels = r.a.smoke_kernels.split(",") if r.a.smoke_kernels else None
        deadline = time.time() + limit - 3
        for n, group in enumerate(plan.smoke_jobs(r.scale, kernels)):
            args = [x for sel in group for x in ("--only", sel)] + ["--deadline", f"{deadline:.0f}"]
            jobs.append(Job(f"smoke{n}", r.worker("benchmarks.gpu_smoke", *args), r.env(pinned=True, inject=True),
                            limit))
    if "bench" in r.stages and not r.a.no_warm:
        p = plan.BENCH[r.scale]
        for i in range(p["warm_configs"]):
            for g in p["warm_groups"]:
                jobs.append(Job(f"warm-{g}-{i}", r.worker("benchmarks.gpu_bench", "warm", "--group", g,
                                                          "--index", str(i)), r.env(), limit, essential=False))
    if not jobs:
        return
    r.log.say(f"\n== stage 1: smoke ({sum(j.name.startswith('smoke') for j in jobs)} workers, configs pinned) and "
              f"compile-ahead ({sum(j.name.startswith('warm') for j in jobs)} workers); limit {limit:.0f} s, "
              f"{r.parallel} at a time")
    run_jobs(jobs, r.log, parallel=r.parallel, deadline=time.monotonic() + limit, linger=r.a.warm_linger)


def parse_pytest(lines: list[str]) -> dict:
    """Counts from pytest's last summary line ("3 failed, 120 passed, 4 skipped in 80.1s") and
    the first failures of its ``-rfE`` short summary ("FAILED tests/...::test_x - reason")."""
    import re

    counts = {}
    for line in reversed(lines):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)", line)
        if found and re.search(r"\bin [\d.]+s", line):
            for n, what in found:
                what = {"error": "errors", "warning": "warnings"}.get(what, what)
                counts[what] = int(n)
            counts["summary_line"] = line.strip("= ").strip()
            break
    bad = [ln.strip() for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    if bad:
        counts["failures"] = bad[:20]
    return counts


def stage_tests(r: Run) -> None:
    if "tests" not in r.stages:
        return
    reserve = 5.0 if r.dry else 10.0
    left = r.left() - reserve
    share = r.a.tests_share * left if "bench" in r.stages else left
    limit = max(20.0, min(r.a.tests_limit, share))
    # dry: a few fast tests and one GPU-tier test (skipped here): the plumbing, not the suite
    targets = ["tests/kernels/test_patch_embed.py", "-k", "narrow_id or out_of_range or gpu_large"] if r.dry \
        else ["tests"]
    cmd = [r.py, "-m", "pytest", *targets, "-m", "not aot and not native", "-rfE", "--tb=short",
           "-p", "no:cacheprovider", "-q"]
    if not r.dry:
        if importlib.util.find_spec("xdist") is not None and r.a.pytest_workers > 1:
            cmd += ["-n", str(r.a.pytest_workers)]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd += ["--timeout", "150"]
    r.log.say(f"\n== stage 2: GPU-tier tests (limit {limit:.0f} s)")
    job = run_jobs([Job("pytest", cmd, r.env(), limit, interrupt_first=True,
                        tee=os.path.join(r.out, plan.PYTEST_LOG))], r.log)[0]
    counts = parse_pytest(job.text)
    # pytest may reach its summary and still be inside its teardown at the limit: then it completed
    before = job.text if job.lines_before_interrupt is None else job.text[:job.lines_before_interrupt]
    complete = "summary_line" in parse_pytest(before)
    row = {"kind": "tests", "command": shlex.join(cmd[1:]), "targets": targets, "rc": job.rc,
           "timed_out": job.timed_out, "complete": complete, "wall_s": job.wall, "limit_s": limit, **counts}
    r.emit(row)


def stage_bench(r: Run) -> None:
    """The benchmark worker over the items left; a crashed worker is replaced (at most twice)."""
    if "bench" not in r.stages:
        return
    reserve = 5.0 if r.dry else 10.0
    items = [n for n, _ in plan.bench_items(r.scale)]
    r.log.say(f"\n== stage 3: benchmarks, {len(items)} items in order of value ({r.left() - reserve:.0f} s left)")
    for attempt in range(3):
        finished = {x["item"] for x in r.rows() if x.get("kind") == "event"
                    and x.get("event") in ("done", "skipped", "failed", "crashed")}
        todo = [n for n in items if n not in finished]
        limit = r.left() - reserve
        if not todo or limit < 5:
            break
        deadline = time.time() + limit - 2
        job = run_jobs([Job("bench" if attempt == 0 else f"bench{attempt + 1}",
                            r.worker("benchmarks.gpu_bench", "run", "--deadline", f"{deadline:.0f}",
                                     "--items", ",".join(todo)), r.env(), limit)], r.log)[0]
        if job.rc == 0 or job.timed_out:
            break
        events = [x for x in r.rows() if x.get("kind") == "event"]
        ended = {x["item"] for x in events if x["event"] != "start"}
        lost = [x["item"] for x in events if x["event"] == "start" and x["item"] not in ended]
        for item in lost:  # the item the worker died in: not retried
            r.emit({"kind": "event", "item": item, "event": "crashed", "reason": f"worker exited with rc={job.rc}"})
        r.log.say(f"[bench] worker exited with rc={job.rc}" + (f" during {lost}" if lost else "")
                  + "; a fresh worker takes the items left")


def finish(r: Run, pf: dict | None, setup_error: str | None = None) -> int:
    """Build, save and print the table (printed last); the exit status (2 with ``setup_error``)."""
    kernels = r.a.smoke_kernels.split(",") if r.a.smoke_kernels else None
    table = build_table(r.rows(), r.scale, r.stages, kernels)
    code, why = (2, setup_error) if setup_error else exit_status(table)
    device = "CPU (dry run, Triton interpreter)" if r.dry else (pf or {}).get("gpu") or "no CUDA device"
    title = (f"gpu-check {_dt.datetime.fromtimestamp(r.epoch0, _dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {device}; "
             f"git {git_sha()[:12]}; {r.elapsed():.0f} s of a {r.budget:.0f} s budget")
    png = plot(table, os.path.join(r.out, plan.PLOT), title)
    md = render_md(table)
    with open(os.path.join(r.out, plan.SUMMARY_MD), "w") as f:
        f.write(f"# gpu-check ({'dry run on CPU' if r.dry else 'GPU'})\n\n{title}\n\n"
                f"Command: `{' '.join(['python3', '-m', 'benchmarks.gpu_check', *sys.argv[1:]])}`\n\n"
                f"Exit status {code}: {why}.\n\n{md}\n" + (f"\n![goals]({plan.PLOT})\n" if png else ""))
    with open(os.path.join(r.out, plan.SUMMARY_JSON), "w") as f:
        json.dump(plan.json_safe({"title": title, "exit_status": code, "why": why, "scale": r.scale,
                                  "stages": r.stages, "wall_s": r.elapsed(), "budget_s": r.budget,
                                  "table": table}), f, indent=1)
    files = sorted(os.listdir(r.out))
    r.log.say(f"\n== gpu-check finished in {r.elapsed():.0f} s (budget {r.budget:.0f} s); exit status {code}: {why}")
    r.log.say(f"files in {r.out}: {', '.join(files)}\n")
    r.log.say(md)
    return code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                    help=f"seconds for everything (default {DEFAULT_BUDGET:.0f})")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="folder for every file (default benchmarks/results/gpu-check-<date>; dry run: a temp dir)")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="the same stages on a machine without CUDA, in Triton's interpreter, at tiny sizes")
    ap.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)} "
                                                   "(preflight always runs; default all)")
    ap.add_argument("--smoke-kernels", default=None, help="smoke only these kernels (comma-separated)")
    ap.add_argument("--tests-share", type=float, default=0.4,
                    help="share of the time left after stage 1 for the tests (default 0.4)")
    ap.add_argument("--tests-limit", type=float, default=120.0, help="at most this many seconds of tests")
    ap.add_argument("--pytest-workers", type=int, default=8, help="pytest-xdist workers when importable (default 8)")
    ap.add_argument("--no-warm", action="store_true", help="no compile-ahead workers in stage 1")
    ap.add_argument("--warm-linger", type=float, default=15.0,
                    help="seconds compile-ahead workers may run on after the smoke workers are done (default 15)")
    ap.add_argument("--inject-fault", default=None, metavar="KERNEL",
                    help="test hook: the smoke check of KERNEL (or 'all') sees a wrong result and must FAIL")
    a = ap.parse_args(argv)
    if a.out is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
        a.out = (tempfile.mkdtemp(prefix="gpu-check-dry-") if a.dry_run_cpu else
                 os.path.join(ROOT, "benchmarks", "results", f"gpu-check-{stamp}"))
    r = Run(a)
    r.log.say(f"gpu-check ({'dry run on CPU, Triton interpreter' if r.dry else 'GPU'}): budget {r.budget:.0f} s, "
              f"output in {r.out}; python {sys.version.split()[0]} ({r.py})")
    r.emit({"kind": "meta", "scale": r.scale, "budget_s": r.budget, "stages": r.stages, "git_sha": git_sha(),
            "argv": sys.argv[1:], "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "out": r.out, "python": sys.version.split()[0]})
    pf = stage_preflight(r)
    cuda = bool(pf and pf.get("cuda_available"))
    if r.dry and (pf is None or cuda):
        return finish(r, pf, "--dry-run-cpu is for machines without CUDA (it runs Triton's interpreter); "
                      + ("preflight did not report" if pf is None else "this one has a CUDA device: run without it"))
    if not r.dry and not cuda:
        return finish(r, pf, "gpu-check needs a CUDA device" + ("" if pf else " and a working torch (preflight "
                      "did not report)") + "; nothing else was run (--dry-run-cpu tests the plumbing on CPU)")
    r.interpret = r.dry  # the interpreter only in a dry run, and only without CUDA (checked above)
    for stage in (stage_smoke_and_warm, stage_tests, stage_bench):
        try:
            stage(r)
        except Exception as e:  # noqa: BLE001 - a broken stage must not lose the table
            r.log.say(f"*** {stage.__name__} failed in the orchestrator: {type(e).__name__}: {e}")
    return finish(r, pf)


if __name__ == "__main__":
    sys.exit(main())
