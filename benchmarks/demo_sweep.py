"""How the `make demo` defaults were chosen: train candidate configs on the built-in corpus, one
table of held-out bits per byte, bytes/s and wall time.

    python -m benchmarks.demo_sweep                      # every candidate below, one after another
    python -m benchmarks.demo_sweep --only base,lr5e-3   # some of them
    python -m benchmarks.demo_sweep --list               # the candidates and their arguments

Each candidate is a ``megabyte train`` command line (``--time-budget 0``: the run is budgeted in
steps, so its bpb does not depend on the machine's load; its bytes/s and wall time do, and are
recorded with the load average at the start). Rows are appended to
``benchmarks/results/demo-sweep.json`` (one object per run: the arguments, the figures, the
machine) and the whole file is rewritten as ``demo-sweep.md``, best first. CPU figures.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time

from benchmarks.common import git_sha

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

def _c(batch: int, lr: str, warmup: int, steps: int, *more: str) -> list[str]:
    return ["--batch-size", str(batch), "--lr", lr, "--warmup", str(warmup), "--steps", str(steps), *more]


# name -> `megabyte train` arguments on top of its defaults (megabyte.train.DEMO); the knobs the
# sweep turns are always explicit, so a row still means the same run after DEMO changes.
# Model: P=4, D_G=32, D_L=64, 4 global layers of 4 heads, 2 local of 4, T=256 unless given.
CANDIDATES: dict[str, list[str]] = {
    # the learning rate, at 800 steps of 16 x 256 bytes (3.3 MB)
    "b16-lr2e-3-s800": _c(16, "2e-3", 100, 800),
    "b16-lr3e-3-s800": _c(16, "3e-3", 100, 800),
    "b16-lr5e-3-s800": _c(16, "5e-3", 100, 800),
    "b16-lr8e-3-s800": _c(16, "8e-3", 100, 800),
    "b16-lr1.2e-2-s800": _c(16, "1.2e-2", 100, 800),
    "b8-T512-lr3e-3-s800": _c(8, "3e-3", 100, 800, "--seq-len", "512"),
    # longer: 2,200 steps (9.0 MB), and more distinct training bytes
    "b16-lr5e-3-s2200": _c(16, "5e-3", 100, 2200),
    "b16-lr1e-2-s2200": _c(16, "1e-2", 100, 2200),
    "b16-lr1e-2-s2200-16MB": _c(16, "1e-2", 100, 2200, "--max-bytes", "16777216"),
    # the demo's budget: 4.5 MB (1,100 steps of 16 x 256 bytes)
    "b16-lr1e-2-s1100-zero-bias": _c(16, "1e-2", 100, 1100, "--no-unigram-bias"),
    "b16-lr1e-2-s1100": _c(16, "1e-2", 100, 1100),
    "b8-lr7e-3-s2200": _c(8, "7e-3", 100, 2200),
    "b16-lr1.5e-2-w50-s1100": _c(16, "1.5e-2", 50, 1100),
    "b16-lr2.5e-2-w50-s1100": _c(16, "2.5e-2", 50, 1100),
    # faster shapes at the same wall time (~1.2x the bytes/s of the default shape: 1,350 steps)
    "b16-DG24-DL48-lr1.5e-2-w50-s1350": _c(16, "1.5e-2", 50, 1350, "--d-global", "24", "--d-local", "48"),
    "b16-g2-lr1.5e-2-w50-s1350": _c(16, "1.5e-2", 50, 1350, "--g-layers", "2"),
    # 5.7 MB: 1,400 steps of 16 x 256, or 2,800 of 8 x 256
    "b16-lr1.5e-2-w50-s1400": _c(16, "1.5e-2", 50, 1400),
    "b8-lr1.2e-2-w50-s2800": _c(8, "1.2e-2", 50, 2800),
    # 4.9 MB at batch 8: what fits the demo's ~200 s on 2 cores
    "b8-lr1.2e-2-w50-s2400": _c(8, "1.2e-2", 50, 2400),
    "b8-lr1.5e-2-w50-s2400": _c(8, "1.5e-2", 50, 2400),
    "b16-lr2e-2-w50-wd0-s1100": _c(16, "2e-2", 50, 1100, "--weight-decay", "0"),
    # longer context at the same 2,048 bytes per step (5.7 MB): code repeats its names
    "b4-T512-lr1.2e-2-w50-s2800": _c(4, "1.2e-2", 50, 2800, "--seq-len", "512"),
    "b2-T1024-lr1.2e-2-w50-s2800": _c(2, "1.2e-2", 50, 2800, "--seq-len", "1024"),
    # the demo's budget once the step ran as 2 CPU shards (~1.4x the bytes/s): 6.6 and 7.4 MB
    "b8-lr1.2e-2-w50-s3200": _c(8, "1.2e-2", 50, 3200),
    "b8-lr1.2e-2-w50-s3600": _c(8, "1.2e-2", 50, 3600),
    # batch 16 as 2 shards of 8: ~40k bytes/s on the idle machine, 8.0 MB in ~200 s
    "b16-lr1.2e-2-w50-s1950": _c(16, "1.2e-2", 50, 1950),
    "b16-lr1.5e-2-w50-s1950": _c(16, "1.5e-2", 50, 1950),
    # P=8 at the same global width (8 x 16): half the global positions, ~30% fewer FLOPs a byte
    "b8-P8-DG16-lr1.2e-2-w50-s3600": _c(8, "1.2e-2", 50, 3600, "--patch-size", "8", "--d-global", "16"),
}


def run_one(name: str, extra: list[str], steps: int | None, threads: int, out_root: str) -> dict:
    out = os.path.join(out_root, name)
    cmd = [sys.executable, "-m", "megabyte", "train", "--time-budget", "0", "--sample-bytes", "0",
           "--device", "cpu", "--threads", str(threads), "--out", out, *extra]
    if steps is not None and "--steps" not in extra:
        cmd += ["--steps", str(steps)]
    load, sha = os.getloadavg()[0], git_sha()  # the code that runs: taken before, not after, the run
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: `{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "train_log.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    final = next(r for r in reversed(recs) if r.get("kind") == "final")
    run = next(r for r in recs if r.get("kind") == "run")
    return {
        "name": name, "args": extra, "steps": final["steps"], "threads": threads,
        "n_params": run.get("n_params"), "bytes_seen": final["train_bytes_seen"],
        "bytes_per_s": final["train_bytes_per_s"], "heldout_bpb": final["heldout_bpb"],
        "lzma_bpb": final["lzma_bpb"], "train_s": final["train_s"], "wall_s": wall,
        "load_at_start": round(load, 2), "date": _dt.date.today().isoformat(),
        "unigram_bias": "--no-unigram-bias" not in extra, "git": sha,
        "machine": f"{platform.machine()} {os.cpu_count()} cores (CPU)",
    }


def write_md(rows: list[dict], path: str) -> None:
    lines = ["# `make demo` candidates (CPU)", "",
             "Written by `python -m benchmarks.demo_sweep`; held-out bpb on the same 65,536 held-out bytes "
             "(lzma -9e on them: %.3f). Runs are budgeted in steps (`--time-budget 0`), so bpb does not "
             "depend on load; bytes/s and wall time do (load average at the start given)." % rows[0]["lzma_bpb"],
             "Head bias: `log-freq` = started at the training bytes' log frequencies (the default since "
             "572e33a), `zero` = before that or `--no-unigram-bias`. Sorted by held-out bpb.",
             "", "| name | extra arguments | head bias | params | steps | bytes seen | threads | load | bytes/s | "
             "train s | wall s | held-out bpb |", "|" + "---|" * 12]
    for r in sorted(rows, key=lambda r: r["heldout_bpb"]):
        bias = "log-freq" if r.get("unigram_bias") else "zero"
        lines.append(f"| {r['name']} | `{' '.join(r['args']) or '(defaults)'}` | {bias} | "
                     f"{r['n_params'] / 1e6:.2f}M | {r['steps']} | {r['bytes_seen'] / 1e6:.1f}M | {r['threads']} | "
                     f"{r['load_at_start']} | {r['bytes_per_s'] / 1e3:.1f}k | {r['train_s']:.0f} | {r['wall_s']:.0f} | "
                     f"**{r['heldout_bpb']:.3f}** |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated candidate names")
    ap.add_argument("--steps", type=int, default=None, help="override the steps of every candidate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-root", default="/tmp/demo_sweep", help="where the runs' checkpoints go")
    ap.add_argument("--results", default=os.path.join(RESULTS, "demo-sweep.json"))
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        for k, v in CANDIDATES.items():
            print(f"{k:16s} {' '.join(v) or '(defaults)'}")
        return
    names = a.only.split(",") if a.only else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        ap.error(f"--only: unknown candidates {unknown}; known: {list(CANDIDATES)}")
    rows = []
    if os.path.isfile(a.results):
        with open(a.results) as f:
            rows = json.load(f)
    for i, n in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {n}: {' '.join(CANDIDATES[n]) or '(defaults)'}", flush=True)
        r = run_one(n, CANDIDATES[n], a.steps, a.threads, a.out_root)
        print(f"    held-out {r['heldout_bpb']:.3f} bpb (lzma {r['lzma_bpb']:.3f}), {r['bytes_per_s'] / 1e3:.1f}k "
              f"bytes/s, {r['wall_s']:.0f} s", flush=True)
        rows.append(r)
        with open(a.results, "w") as f:
            json.dump(rows, f, indent=1)
        write_md(rows, a.results[:-5] + ".md")


if __name__ == "__main__":
    main()
