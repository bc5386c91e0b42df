"""Run the benchmark suite in one go and write the result files.

    python -m benchmarks.run                 # on a GPU: kernels, generation, end to end (bf16)
    python -m benchmarks.run --quick         # on CPU: the same suites scaled down (minutes)
    python -m benchmarks.run --original PATH # add the original implementation (a local checkout)
    python -m benchmarks.run --smoke --out-dir /tmp/x   # seconds: plumbing check only

Writes ``benchmarks/results/<date>-<device>.json`` (every row plus where and how it was measured:
device name, torch and triton versions, git sha, the exact command), the same as a Markdown
table (``.md``) and PNG plots, and refreshes the latest tables in ``benchmarks/README.md``
(CPU and GPU results in separate sections, never mixed). Each microbenchmark module
``benchmarks/bench_<op>.py`` contributes through its ``run(device, quick) -> list[dict]``; a
module that is missing, has no ``run`` or fails is recorded as a note and the rest goes on.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback

import torch

from megabyte.distributed import keep_freed_memory

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# (suite name, module); the model suite is driven directly (it takes more options)
KERNEL_SUITES = [
    ("patch_embed", "benchmarks.bench_patch_embed"),
    ("global_to_local", "benchmarks.bench_global_to_local"),
    ("causal_attention", "benchmarks.bench_causal_attention"),
    ("native", "benchmarks.bench_native"),
    ("generation", "benchmarks.bench_generation"),
    ("long_context", "benchmarks.bench_long_context"),
]
ALL_SUITES = [s for s, _ in KERNEL_SUITES] + ["model"]
# keys that describe where a row was measured: shown once in the header, not in the tables
META_KEYS = {"device", "device_type", "device_name", "torch", "triton", "git_sha", "git", "command", "threads",
             "suite", "bench"}


# ------------------------------------------------------------------------------------------
# where and how
# ------------------------------------------------------------------------------------------
def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def meta_record(device: torch.device, argv: list[str], quick: bool, smoke: bool, kept_freed: bool) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    is_cuda = device.type == "cuda"
    if is_cuda:
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "label": "GPU" if is_cuda else "CPU",
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if is_cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "keep_freed_memory": kept_freed,
        "git_sha": (_git("rev-parse", "HEAD") or "unknown") + ("+dirty" if dirty else ""),
        "command": "python -m benchmarks.run" + "".join(" " + shlex.quote(a) for a in argv),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "quick": quick,
        "smoke": smoke,
    }


def device_slug(meta: dict, quick: bool) -> str:
    if meta["device_type"] != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    return slug + ("-quick" if quick else "")


# ------------------------------------------------------------------------------------------
# running the suites
# ------------------------------------------------------------------------------------------
def run_module_suite(name: str, module: str, device: str, quick: bool) -> dict:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return {"rows": [], "note": f"{module} is not there yet: skipped"}
        return {"rows": [], "error": f"importing {module}: {type(e).__name__}: {e}"}
    except Exception as e:  # noqa: BLE001
        return {"rows": [], "error": f"importing {module}: {type(e).__name__}: {e}"}
    fn = getattr(mod, "run", None)
    if fn is None:
        return {"rows": [], "note": f"{module} has no run(device, quick) (a pytest-benchmark file): skipped"}
    from benchmarks.common import SkipSuite

    try:
        rows = fn(device, quick)
        return {"rows": [dict(r) for r in rows]}
    except SkipSuite as e:
        return {"rows": [], "note": f"skipped: {e}"}
    except Exception as e:  # noqa: BLE001
        return {"rows": [], "error": f"{type(e).__name__}: {str(e).strip()[:500]}",
                "traceback": traceback.format_exc()[-2000:]}


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        a = abs(v)
        if a >= 1e5:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(rows: list[dict], cols: list[str], headers: dict | None = None) -> str:
    headers = headers or {}
    out = ["| " + " | ".join(headers.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


MODEL_COLS = ["impl", "params", "bytes_per_s", "step_ms", "peak_mem_GiB", "model_TFLOP_per_step",
              "achieved_TFLOP_s", "MFU", "speed_vs_megabyte[reference]", "speed_vs_compile(megabyte[reference])",
              "speed_vs_megabyte-pytorch", "speed_vs_original", "mem_vs_megabyte[reference]", "note"]
MODEL_HEADERS = {"bytes_per_s": "bytes/s", "step_ms": "step ms", "peak_mem_GiB": "peak GiB",
                 "model_TFLOP_per_step": "TFLOP/step", "achieved_TFLOP_s": "TFLOP/s",
                 "speed_vs_megabyte[reference]": "× eager ref", "speed_vs_compile(megabyte[reference])": "× compile(ref)",
                 "speed_vs_megabyte-pytorch": "× megabyte-pytorch", "speed_vs_original": "× original",
                 "mem_vs_megabyte[reference]": "mem / eager ref"}


def model_targets(rows: list[dict], label: str) -> list[str]:
    """The issue's targets checked against the measured rows (nothing is assumed)."""
    lines = []
    by = {(r["config"], r["impl"]): r for r in rows if "bytes_per_s" in r}

    def ratio(cfg, a, b, key="bytes_per_s"):
        ra, rb = by.get((cfg, a)), by.get((cfg, b))
        if ra and rb and ra.get(key) and rb.get(key):
            return ra[key] / rb[key]
        return None

    def check(text, val, op, target):
        if val is None:
            lines.append(f"- {text}: not measured")
        else:
            ok = val >= target if op == ">=" else val <= target
            lines.append(f"- {text}: **{val:.2f}** (target {op} {target}) — {'met' if ok else 'NOT met'}")

    if label == "GPU":
        for cfg in sorted({r["config"] for r in rows}):
            lines.append(f"Config `{cfg}`:")
            check("triton / megabyte-pytorch, bytes/s", ratio(cfg, "megabyte[triton]", "megabyte-pytorch"), ">=", 1.5)
            check("triton / compile(reference), bytes/s",
                  ratio(cfg, "megabyte[triton]", "compile(megabyte[reference])"), ">=", 1.2)
            check("triton peak memory / eager reference",
                  ratio(cfg, "megabyte[triton]", "megabyte[reference]", "peak_mem_GiB"), "<=", 0.7)
            if cfg == "bench":
                r = by.get((cfg, "megabyte[triton]"))
                check("triton MFU", r.get("MFU") if r else None, ">=", 0.4)
    else:
        for cfg in sorted({r["config"] for r in rows}):
            check(f"CPU `{cfg}`: reference / megabyte-pytorch, bytes/s (at least as fast)",
                  ratio(cfg, "megabyte[reference]", "megabyte-pytorch"), ">=", 1.0)
    return lines


def render_markdown(result: dict, png_names: list[str]) -> str:
    meta = result["meta"]
    label = meta["label"]
    out = [f"# Benchmark results: {meta['date_utc'][:10]}, {meta['device']} ({label})", ""]
    out += [f"- **{label} results**" + (" — timings on a shared CPU are noisy; compare ratios within this file, "
                                        "not across files" if label == "CPU" else ""),
            f"- device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; python {meta['python']}"
            + (f"; CUDA {meta['cuda']}" if meta.get("cuda") else ""),
            f"- git: `{meta['git_sha']}`",
            f"- command: `{meta['command']}`",
            f"- total wall time: {result.get('wall_s', 0):.0f} s", ""]
    suites = result["suites"]
    model = suites.get("model")
    if model is not None:
        out += ["## End-to-end training step (forward + backward + AdamW)", ""]
        rows = model.get("rows", [])
        for cfg in dict.fromkeys(r["config"] for r in rows):
            crow = [r for r in rows if r["config"] == cfg]
            sizes = crow[0]["sizes"] if crow else ""
            out += [f"### `{cfg}`: {sizes}, {crow[0]['dtype'] if crow else ''}", ""]
            shown = []
            for r in crow:
                r = dict(r)
                r["note"] = r.get("skipped") or r.get("error") or r.get("arch") or ""
                shown.append(r)
            cols = [c for c in MODEL_COLS if any(r.get(c) not in (None, "") for r in shown) or c == "impl"]
            out += [md_table(shown, cols, MODEL_HEADERS), ""]
        out += ["Targets:", ""] + model_targets(rows, label) + [""]
        if model.get("error"):
            out += [f"Model suite error: {model['error']}", ""]
    for name, suite in suites.items():
        if name == "model":
            continue
        out += [f"## {name}", ""]
        rows = suite.get("rows", [])
        if suite.get("note"):
            out += [f"_{suite['note']}_", ""]
        if suite.get("error"):
            out += [f"**error**: {suite['error']}", ""]
        if rows:
            cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in META_KEYS]
            out += [md_table(rows, cols), ""]
    for png in png_names:
        out += [f"![{png}]({png})", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------
def _label(r: dict, skip=("op", "error", "config")) -> str:
    """The row's string fields but the op (the plot's title), e.g. 'triton B=4 T=1024 bf16 fwd'."""
    parts = [str(v) for k, v in r.items() if isinstance(v, str) and k not in META_KEYS and k not in skip]
    text = " ".join(parts)
    return text if len(text) <= 90 else text[:44] + "…" + text[-45:]


def make_plots(result: dict, prefix: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    label = result["meta"]["label"]
    written = []
    model = result["suites"].get("model", {}).get("rows", [])
    cfgs = list(dict.fromkeys(r["config"] for r in model if "bytes_per_s" in r))
    if cfgs:
        has_mem = any(r.get("peak_mem_GiB") for r in model)
        ncol = 2 if has_mem else 1
        fig, axes = plt.subplots(len(cfgs), ncol, figsize=(7 * ncol, 0.5 + 0.45 * 8 * len(cfgs)), squeeze=False)
        for i, cfg in enumerate(cfgs):
            rows = [r for r in model if r["config"] == cfg and "bytes_per_s" in r]
            names = [r["impl"] for r in rows]
            ax = axes[i][0]
            ax.barh(names, [r["bytes_per_s"] for r in rows], color="tab:blue")
            ax.invert_yaxis()
            ax.set_xlabel("training bytes/s (higher is better)")
            ax.set_title(f"{label}: {cfg} ({rows[0]['sizes']}, {rows[0]['dtype']})", fontsize=9)
            if has_mem:
                ax = axes[i][1]
                ax.barh(names, [r.get("peak_mem_GiB") or 0 for r in rows], color="tab:orange")
                ax.invert_yaxis()
                ax.set_xlabel("peak memory GiB (lower is better)")
        fig.tight_layout()
        path = f"{prefix}-model.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    kern = [(n, s["rows"]) for n, s in result["suites"].items() if n != "model" and s.get("rows")]
    kern = [(n, [r for r in rows if isinstance(r.get("ms"), (int, float)) and math.isfinite(r["ms"])])
            for n, rows in kern]
    kern = [(n, rows) for n, rows in kern if rows]
    if kern:
        fig, axes = plt.subplots(len(kern), 1, figsize=(11, sum(1.0 + 0.3 * len(r) for _, r in kern)), squeeze=False)
        for ax, (n, rows) in zip(axes[:, 0], kern):
            ax.barh([_label(r) for r in rows], [r["ms"] for r in rows], color="tab:green")
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_xlabel("ms (log scale, lower is better)")
            ax.set_title(f"{label}: {n}", fontsize=9)
            ax.tick_params(axis="y", labelsize=6)
        fig.tight_layout()
        path = f"{prefix}-kernels.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------
# benchmarks/README.md: the latest tables, CPU and GPU in their own sections
# ------------------------------------------------------------------------------------------
def update_readme(md_text: str, label: str, md_name: str) -> None:
    path = os.path.join(HERE, "README.md")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        text = f.read()
    start, end = f"<!-- latest-{label.lower()}:start -->", f"<!-- latest-{label.lower()}:end -->"
    if start not in text or end not in text:
        return
    body = md_text.split("\n", 1)[1]  # drop the title line
    body = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", r"![\1](results/\2)", body)
    body = body.replace("\n## ", "\n#### ").replace("\n### ", "\n##### ")
    new = f"{start}\n_From [`results/{md_name}`](results/{md_name})._\n\n{body.strip()}\n{end}"
    text = text[: text.index(start)] + new + text[text.index(end) + len(end):]
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes (CPU: minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny model suite only, seconds (plumbing check)")
    ap.add_argument("--original", default=None, metavar="PATH",
                    help="local checkout of github.com/shjwudp/megabyte to benchmark too")
    ap.add_argument("--suites", default=None, help=f"comma-separated subset of {','.join(ALL_SUITES)}")
    ap.add_argument("--configs", default=None, help="model configs: bench,long")
    ap.add_argument("--impls", default=None, help="model rows to run (comma-separated substrings)")
    ap.add_argument("--compile-configs", default=None,
                    help="configs that get the torch.compile rows (default: all; --quick: bench)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="model dtype (GPU: bf16)")
    ap.add_argument("--budget-s", type=float, default=None, help="timing budget per model row (s)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (a loaded shared CPU: 1; oversubscribed OpenMP threads spin)")
    ap.add_argument("--out-dir", default=None, help=f"where the files go (default {os.path.relpath(RESULTS, ROOT)})")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="start no new suite or model row after S seconds (the files are written either way)")
    ap.add_argument("--attach", action="append", default=[], metavar="FILE",
                    help="store this text file (e.g. a test log) in the JSON's meta")
    ap.add_argument("--no-readme", action="store_true", help="do not refresh benchmarks/README.md")
    a = ap.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    quick = a.quick or a.smoke
    if a.threads:
        torch.set_num_threads(a.threads)
    kept_freed = keep_freed_memory()  # every implementation in this process: the allocator `megabyte train` sets
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        load, ncpu = os.getloadavg()[0], os.cpu_count() or 1
        if load > ncpu and torch.get_num_threads() > 1:
            print(f"warning: load average {load:.1f} > {ncpu} CPUs: with {torch.get_num_threads()} torch threads the "
                  "timings measure contention; consider --threads 1")
    if device.type == "cpu" and not quick:
        print("note: CPU run without --quick uses the --quick sizes (the GPU sizes take hours on a CPU)")
        quick = True
    suites = a.suites.split(",") if a.suites else (["model"] if a.smoke else ALL_SUITES)
    unknown = set(suites) - set(ALL_SUITES)
    if unknown:
        ap.error(f"unknown suites {sorted(unknown)}; known: {ALL_SUITES}")
    out_dir = a.out_dir or RESULTS
    if a.smoke and a.out_dir is None:
        ap.error("--smoke needs --out-dir (smoke results are not results)")
    os.makedirs(out_dir, exist_ok=True)

    meta = meta_record(device, argv, quick, a.smoke, kept_freed)
    if a.attach:
        for path in a.attach:
            try:
                with open(path) as f:
                    meta.setdefault("attached", {})[os.path.basename(path)] = f.read()[-20000:]
            except OSError as e:
                meta.setdefault("attached", {})[os.path.basename(path)] = f"(unreadable: {e})"
    print(f"benchmarks on {meta['device']} ({meta['label']}), torch {meta['torch']}, triton {meta['triton']}, "
          f"git {meta['git_sha'][:12]}" + (" — CPU timings are noisy on a shared machine" if meta["label"] == "CPU" else ""))
    t_start = time.perf_counter()
    deadline = t_start + a.time_limit if a.time_limit else None
    result = {"meta": meta, "suites": {}}
    stem = f"{meta['date_utc'][:10]}-{device_slug(meta, quick and device.type == 'cuda')}"
    prefix = os.path.join(out_dir, stem)

    def write(final: bool) -> list[str]:
        """Written after every suite, so that a run cut short still leaves its results."""
        result["wall_s"] = time.perf_counter() - t_start
        result["complete"] = final
        pngs = make_plots(result, prefix) if final else []
        md_text = render_markdown(result, [os.path.basename(p) for p in pngs])
        for ext, text in ((".json", json.dumps(_json_safe(result), indent=1)), (".md", md_text + "\n")):
            with open(prefix + ext + ".tmp", "w") as f:
                f.write(text)
            os.replace(prefix + ext + ".tmp", prefix + ext)
        if final and not a.no_readme and not a.smoke and os.path.abspath(out_dir) == os.path.abspath(RESULTS):
            update_readme(md_text, meta["label"], stem + ".md")
        return pngs

    def out_of_time() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    modules = dict(KERNEL_SUITES)
    for name in suites:
        t0 = time.perf_counter()
        if out_of_time():
            result["suites"][name] = {"rows": [], "note": "time limit reached before this suite"}
            print(f"[{name}] skipped: time limit")
            continue
        if name != "model":
            print(f"[{name}] ...", flush=True)
            res = run_module_suite(name, modules[name], str(device), quick)
            res["wall_s"] = time.perf_counter() - t0
            print(f"[{name}] {len(res['rows'])} rows in {res['wall_s']:.0f} s"
                  + (f" — {res.get('note') or res.get('error')}" if res.get("note") or res.get("error") else ""))
            result["suites"][name] = res
            write(False)
            continue
        from benchmarks import bench_model

        print("[model] end-to-end training step", flush=True)
        compile_configs = (a.compile_configs.split(",") if a.compile_configs
                           else (["bench"] if quick and not a.smoke else None))
        res = result["suites"]["model"] = {"rows": []}
        scale = "smoke" if a.smoke else ("quick" if quick else "full")
        for cfg in (a.configs.split(",") if a.configs else list(bench_model.CONFIGS[scale])):
            try:
                res["rows"] += bench_model.run(device, quick, smoke=a.smoke, original=a.original, configs=[cfg],
                                               impls=a.impls.split(",") if a.impls else None,
                                               compile_configs=compile_configs, dtype=a.dtype, budget_s=a.budget_s,
                                               deadline=deadline)
            except Exception as e:  # noqa: BLE001
                res["error"] = f"{cfg}: {type(e).__name__}: {e}"
                res["traceback"] = traceback.format_exc()[-2000:]
            res["wall_s"] = time.perf_counter() - t0
            write(False)
    pngs = write(True)

    model_rows = result["suites"].get("model", {}).get("rows", [])
    for line in model_targets(model_rows, meta["label"]) if model_rows else []:
        print(line.replace("**", ""))
    print(f"wrote {prefix}.json, .md" + "".join(f", {os.path.basename(p)}" for p in pngs)
          + f" ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
