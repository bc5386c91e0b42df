"""The result table of gpu-check (``benchmarks/gpu_check.py``), built from ``results.jsonl``:
one row per planned check or figure (``benchmarks/gpu_plan.py``), so that a stage cut short
shows its rows as **not run** with the reason; columns stage, what, figure, goal, verdict
(met / not met / not run / PASS / FAIL; "—" for a figure without a goal), and for the target
rows of issue 15 the Triton row's measured time over the performance model's floor and over its
prediction (the committed ``results/perf-model.json`` of ``benchmarks/perf_model.py``)::

    floor     = max(bytes / copy GB/s, FLOPs / GEMM TFLOP/s)   with this run's preflight ceilings
    predicted = floor / utilisation                            (the model's utilisation)

(the model's own ceilings when preflight measured none; "—" where the run's sizes are not the
model's, as in the dry run). Stdlib only (matplotlib, when importable, for the plot).
"""
from __future__ import annotations

import json
import math
import os

from benchmarks import gpu_plan as plan

PERF_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "perf-model.json")


def load_perf_model(path: str = PERF_MODEL) -> dict | None:
    """The committed prediction table, or None when absent or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _g(x) -> str:
    """A figure for the table: thousands separated from 100 up, three significant digits below."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "?"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.2g}%"


def _num(x, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "?"
    return format(x, fmt)


def goal_text(key: str) -> str:
    op, thr, unit = plan.GOALS[key]
    sym = "≥" if op == ">=" else "≤"
    if unit == "x":
        return f"{sym} {thr:g}×"
    if unit == "of copy":
        return f"{sym} {thr:.0%} of copy"
    return f"{sym} {thr:,.0f} {unit}"


def goal_met(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "not run"
    op, thr, _ = plan.GOALS[key]
    return "met" if (value >= thr if op == ">=" else value <= thr) else "not met"


class Table:
    """Rows of the final table; ``check`` marks parity rows (they decide the exit status),
    ``goal_key``/``value`` the rows that are plotted against their goals."""

    def __init__(self, rows: list[dict], stages: list[str], model: dict | None = None):
        self.out: list[dict] = []
        self.rows = rows
        self.stages = stages
        self.model = model
        self.events = {}
        for x in rows:
            if x.get("kind") == "event":
                if x["event"] != "start" or x["item"] not in self.events:
                    self.events[x["item"]] = x

    def add(self, stage, what, figure, goal="—", verdict="—", *, check=False, goal_key=None, value=None,
            vs_floor="—", vs_model="—"):
        self.out.append(dict(stage=stage, what=what, figure=figure, goal=goal, verdict=verdict, check=check,
                             goal_key=goal_key, value=value, vs_floor=vs_floor, vs_model=vs_model))

    def vs_model(self, item: str, what_pass: str) -> dict:
        """``vs_floor`` / ``vs_model`` texts of a target row: the Triton row's ms over the model's
        floor and prediction at this run's ceilings (module docstring); "—" without a model row
        for these sizes or without a measured time."""
        out = {"vs_floor": "—", "vs_model": "—"}
        mine = [x for x in self.of("bench", item=item, impl="triton") if x.get("pass") == what_pass and x.get("ms")]
        pred = [r for r in (self.model or {}).get("rows", []) if r["item"] == item and r["what"] == what_pass]
        if not mine or not pred:
            return out
        x, m = mine[-1], pred[-1]
        if any(x.get(k) != v for k, v in m.get("sizes", {}).items()):
            return out  # another scale (the dry run): the model is for gpu-check's GPU sizes
        ceil = dict(self.model["meta"]["ceilings"])
        pf = self.of("preflight")
        if pf and pf[-1].get("copy_GB_s") and pf[-1].get("gemm_TFLOP_s"):
            ceil.update(copy_gb_s=pf[-1]["copy_GB_s"], tflop_s=pf[-1]["gemm_TFLOP_s"])
        floor = max(m["bytes"] / (ceil["copy_gb_s"] * 1e9), m["flops"] / (ceil["tflop_s"] * 1e12)) * 1e3
        out["vs_floor"] = f"{x['ms'] / floor:.2f}×"
        if m.get("utilisation"):
            out["vs_model"] = f"{x['ms'] * m['utilisation'] / floor:.2f}×"
        return out

    def of(self, kind: str, **match) -> list[dict]:
        return [x for x in self.rows if x.get("kind") == kind and all(x.get(k) == v for k, v in match.items())]

    def why_not(self, item: str, stage: str = "bench") -> str:
        """Why an item has no figure: its event, or the stage not selected / not reached."""
        if stage not in self.stages:
            return "stage not selected (--stages)"
        ev = self.events.get(item)
        if ev is None:
            return "not reached (time limit)"
        if ev["event"] == "start":
            return "started, no result (killed at the time limit)"
        return f"{ev['event']}: {ev.get('reason', '')}".strip(": ")


def table_preflight(t: Table, pf: dict | None) -> None:
    if pf is None:
        for what in ("GPU, driver, versions, tools", "device copy bandwidth (read + write)", "bf16 GEMM"):
            t.add("preflight", what, "preflight did not report", verdict="not run")
        return
    env = (f"{pf.get('gpu') or 'no CUDA device'}"
           + (f" ({pf.get('gpu_memory_GiB')} GiB, {pf.get('sm_count')} SMs), driver {pf.get('driver')}"
              if pf.get("gpu") else "")
           + f"; python {pf.get('python')}, torch {pf.get('torch')}, triton {pf.get('triton')}, "
             f"numpy {pf.get('numpy')}; ninja {'yes' if pf.get('ninja') else 'no'}, "
             f"C++ compiler {'yes' if pf.get('cxx') else 'no'}")
    t.add("preflight", "GPU, driver, versions, tools", env)
    if pf.get("copy_GB_s"):
        t.add("preflight", f"device copy bandwidth (read + write, {pf['copy_bytes'] >> 20} MiB)",
              f"{_g(pf['copy_GB_s'])} GB/s")
    else:
        t.add("preflight", "device copy bandwidth (read + write)", pf.get("copy_error", "?"), verdict="not run")
    if pf.get("gemm_TFLOP_s"):
        t.add("preflight", f"bf16 GEMM {pf['gemm_n']}³, random data", f"{_g(pf['gemm_TFLOP_s'])} TFLOP/s")
    else:
        t.add("preflight", "bf16 GEMM", pf.get("gemm_error", "?"), verdict="not run")


def table_smoke(t: Table, scale: str, kernels: list[str] | None) -> None:
    for kernel, case, _ in plan.SMOKE[scale]:
        got = [x for x in t.of("smoke", kernel=kernel, case=case)]
        by_key = {x["key"]: x for x in got}
        want = [plan.smoke_key(kernel, case, d, p) for d in plan.DTYPES for p in plan.PASSES]
        have = [by_key[k] for k in want if k in by_key]
        fails = [x for x in have if x["verdict"] != "PASS"]
        what = f"{kernel} {case}"
        if "smoke" not in t.stages or (kernels and kernel not in kernels):
            t.add("smoke", what, "stage not selected", verdict="not run", check=True)
            continue
        finite = [x for x in have if x.get("ratio") is not None and math.isfinite(x["ratio"])]
        worst = max(finite, key=lambda x: x["ratio"]) if finite else None
        fig = f"{len(have) - len(fails)}/{len(want)} PASS"
        if worst:
            fig += f"; worst err/bound {worst['ratio']:.2f} ({worst['dtype']} {worst['pass']} {worst['worst']})"
        for x in fails[:2]:
            fig += f"; FAIL {x['dtype']} {x['pass']}: " + (x.get("error") or
                                                         f"{x['worst']} err {_num(x['err'])} > {_num(x['bound'])}")
        if len(have) < len(want):
            fig += f"; {len(want) - len(have)} not run (time limit or crash)"
        verdict = "FAIL" if fails else "not run" if len(have) < len(want) else "PASS"
        t.add("smoke", what, fig, verdict=verdict, check=True)


def table_warm(t: Table, scale: str) -> None:
    """One informative row: how many compile-ahead jobs of stage 1 finished (not a check)."""
    if "bench" not in t.stages:
        return
    p = plan.BENCH[scale]
    planned = p["warm_configs"] * sum(len(g.split("+")) for g in p["warm_groups"])  # one row per group
    rows = t.of("warm")
    errors = [f"{x['group']}/{x['index']}: {x['error'][:60]}" for x in rows if x.get("error")]
    fig = f"{len(rows) - len(errors)} of {planned} done"
    if errors:
        fig += "; errors: " + "; ".join(errors[:3])
    t.add("smoke", "compile-ahead of the benchmarks' autotune configs (a time saver, not a check)", fig)


def table_tests(t: Table) -> None:
    rows = t.of("tests")
    if not rows:
        t.add("tests", 'pytest -m "not aot and not native"',
              "stage not selected" if "tests" not in t.stages else "did not run", verdict="not run", check=True)
        return
    x = rows[-1]
    counts = ", ".join(f"{x[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if x.get(k))
    fig = f"{counts or 'no summary line'} in {x['wall_s']:.0f} s"
    if x.get("timed_out"):
        fig += f"; {'in its teardown' if x.get('complete') else 'interrupted'} at the {x['limit_s']:.0f} s limit"
    if x.get("failed") or x.get("errors"):
        verdict = "FAIL"
        fig += "; " + "; ".join(f[:100] for f in x.get("failures", [])[:3])
    elif not x.get("complete"):  # killed before its summary, or it never started the tests
        verdict = "not run" if x.get("timed_out") else "FAIL"
        fig += "" if x.get("timed_out") else f"; pytest rc={x.get('rc')}"
    elif x.get("rc") == 5:
        verdict = "not run"  # no test collected
    elif x.get("rc") == 0 or x.get("timed_out"):
        verdict = "PASS"
    else:
        verdict, fig = "FAIL", fig + f"; pytest rc={x.get('rc')}"
    targets = " ".join(a if " " not in a else repr(a) for a in x.get("targets", ["tests"]))
    t.add("tests", f'pytest {targets} -m "not aot and not native"', fig, verdict=verdict, check=True)


def _ratio_row(t: Table, item: str, what_pass: str, label: str, goal_key: str, unit_key: str | None) -> None:
    comp = t.of("compare", item=item)
    comp = [c for c in comp if c["pass"] == what_pass]
    if not comp or comp[-1].get("ratio") is None:
        reason = t.why_not(item)
        if comp:
            c = comp[-1]
            reason = ("Triton row errored" if c.get("triton_ms") is None else "no baseline ran") + \
                "; errors: " + "; ".join(f"{k}: {v[:80]}" for k, v in list(c.get("errored", {}).items())[:3])
        t.add("bench", label, reason, goal_text(goal_key), "not run", goal_key=goal_key)
        return
    c = comp[-1]
    fig = f"{c['ratio']:.3g}× vs {c['best']}"
    if unit_key and c.get(f"triton_{unit_key}") is not None and c.get(f"best_{unit_key}") is not None:
        fig += f" ({_g(c[f'triton_{unit_key}'])} vs {_g(c[f'best_{unit_key}'])} {unit_key})"
    if c.get("errored"):
        fig += f"; errored: {', '.join(c['errored'])}"
    t.add("bench", label, fig, goal_text(goal_key), goal_met(goal_key, c["ratio"]), goal_key=goal_key,
          value=c["ratio"], **t.vs_model(item, what_pass))


def _triton_row(t: Table, item: str, what_pass: str):
    rows = [x for x in t.of("bench", item=item, impl="triton") if x.get("pass") == what_pass]
    return rows[-1] if rows else None


def _parity_row(t: Table, item: str, label: str) -> None:
    rows = t.of("parity", item=item)
    if not rows:
        t.add("bench", label, t.why_not(item), "PASS", "not run", check=True)
        return
    x = rows[-1]
    if x.get("error"):
        fig = f"error: {x['error']}"
    else:
        fig = f"worst err/bound {x['ratio']:.2f} ({x['worst']})"
        fails = [f"{p}: {v['worst']} err {_num(v['err'])} > {_num(v['bound'])}" for p, v in x["passes"].items()
                 if v["verdict"] != "PASS"]
        if fails:
            fig += "; FAIL " + "; ".join(fails)
    fig += f"; {x.get('winner', '')}"
    t.add("bench", label, fig, "PASS", x["verdict"], check=True)


def _frac_row(t: Table, item: str, label: str, goal_key: str) -> None:
    r = _triton_row(t, item, "fwd")
    if r is None or r.get("frac_copy") is None:
        t.add("bench", label, (r or {}).get("error") or t.why_not(item), goal_text(goal_key), "not run",
              goal_key=goal_key)
        return
    t.add("bench", label, f"{_pct(r['frac_copy'])} ({_g(r['GB/s'])} of {_g(r['copy_GB_s'])} GB/s)",
          goal_text(goal_key), goal_met(goal_key, r["frac_copy"]), goal_key=goal_key, value=r["frac_copy"],
          **t.vs_model(item, "fwd"))


def _variants_row(t: Table, lab: str) -> None:
    """The local_variants item's forward rows beside the default tiles' (no goal: information)."""
    rows = [x for x in t.of("bench", item="local") if x.get("impl") == "triton" and x.get("pass") == "fwd"]
    rows += [x for x in t.of("bench", item="local_variants") if x.get("pass") == "fwd"]
    if not any(x["item"] == "local_variants" for x in rows):
        t.add("bench", f"local fwd {lab}: tile sizes, the model's views", t.why_not("local_variants"),
              verdict="not run")
        return
    fig = "; ".join(f"{x['impl']}: " + (f"{_pct(x['frac_copy'])} of copy" if x.get("frac_copy") is not None
                                        else x.get("error", "?")[:60]) for x in rows)
    t.add("bench", f"local fwd {lab}: tile sizes, the model's views", fig)


def table_bench(t: Table, scale: str) -> None:
    p = plan.BENCH[scale]
    for i, s in enumerate(p["flash"]):
        item, lab = f"flash/{i}", plan.flash_label(s)
        r = _triton_row(t, item, "fwd")
        if r and r.get("TFLOP/s") is not None:
            t.add("bench", f"flash fwd {lab}", f"{_g(r['TFLOP/s'])} TFLOP/s ({r['ms']:.3g} ms)",
                  goal_text("flash_fwd_tflops"), goal_met("flash_fwd_tflops", r["TFLOP/s"]),
                  goal_key="flash_fwd_tflops", value=r["TFLOP/s"], **t.vs_model(item, "fwd"))
        else:
            t.add("bench", f"flash fwd {lab}", (r or {}).get("error") or t.why_not(item),
                  goal_text("flash_fwd_tflops"), "not run", goal_key="flash_fwd_tflops")
        _ratio_row(t, item, "fwd", f"flash fwd {lab} vs fastest SDPA", "flash_fwd_vs_sdpa", "TFLOP/s")
        _ratio_row(t, item, "fwd+bwd", f"flash fwd+bwd {lab} vs fastest SDPA", "flash_fwdbwd_vs_sdpa", "TFLOP/s")
        ps = dict(s, B=p["flash_parity_B"])
        _parity_row(t, f"flash_parity/{i}", f"parity of the autotune winner, flash {plan.flash_label(ps)}")
    lo = p["local"]
    lab = f"B*K={lo['B']:,} H={lo['H']} P={lo['N']} d={lo['d']}"
    _frac_row(t, "local", f"local fwd {lab}: of copy bandwidth", "local_frac_copy")
    _ratio_row(t, "local", "fwd", f"local fwd {lab} vs fastest SDPA", "local_vs_sdpa", "GB/s")
    _variants_row(t, lab)
    pe = p["patch_embed"]
    lab = f"B={pe['B']} T={pe['T']} P={pe['P']} D_G={pe['D']}"
    _frac_row(t, "patch_embed", f"patch_embed fwd {lab}: of copy bandwidth", "pe_frac_copy")
    _ratio_row(t, "patch_embed", "fwd", f"patch_embed fwd {lab} vs eager", "pe_vs_eager", "GB/s")
    _parity_row(t, "patch_embed_parity", f"parity of the autotune winner, patch_embed B={p['ops_parity_B']}")
    g = p["global_to_local"]
    lab = f"B={g['B']} T={g['T']} P={g['P']} D_G={g['D_G']} D_L={g['D_L']}"
    _ratio_row(t, "global_to_local", "fwd", f"global_to_local fwd {lab} vs eager", "g2l_vs_eager", "GB/s")
    _parity_row(t, "global_to_local_parity",
                f"parity of the autotune winner, global_to_local B={p['ops_parity_B']}")
    table_model_rows(t, p)


def table_model_rows(t: Table, p: dict) -> None:
    gen = t.of("bench", item="generation")
    gp = p["generation"]
    for batch, key in ((gp["batches"][0], "generation_bytes_s"), (gp["batches"][-1], "generation_batch_bytes_s")):
        label = (f"static generation, batch {batch}, {gp['prompt']}-byte prompt + {gp['new']} bytes, "
                 f"config {gp['config']}")
        rows = [x for x in gen if x.get("batch") == batch and x.get("static_bytes_per_s")]
        if rows:
            x = max(rows, key=lambda r: r["static_bytes_per_s"])  # graphs or eager, whichever is faster
            dyn = next((r for r in rows if r.get("dynamic_bytes_per_s")), {})
            others = "; ".join(f"graphs {r['graphs']}: {_g(r['static_bytes_per_s'])}" for r in rows if r is not x)
            t.add("bench", label,
                  f"{_g(x['static_bytes_per_s'])} bytes/s (graphs {x['graphs']}, {x['graphs_used']} captured in "
                  f"{x['capture_s']:.2f} s; dynamic {_g(dyn.get('dynamic_bytes_per_s'))}; syncs/byte "
                  f"{x.get('static_syncs_per_byte')} vs {dyn.get('dynamic_syncs_per_byte')}; same bytes "
                  f"{x['same_bytes']}" + (f"; {others}" if others else "") + ")",
                  goal_text(key), goal_met(key, x["static_bytes_per_s"]), goal_key=key, value=x["static_bytes_per_s"])
        else:
            t.add("bench", label, t.why_not("generation"), goal_text(key), "not run", goal_key=key)
    train = {x["impl"]: x for x in t.of("bench", item="train_step")}
    mine = next((x for n, x in train.items() if n in ("megabyte[triton]", "megabyte[auto]")), None)
    label = f"training step, config {p['train']['config']} ({p['train']['scale']} sizes)"
    if mine and mine.get("bytes_per_s"):
        ratio = mine.get("speed_vs_megabyte[reference]")
        t.add("bench", label, f"{mine['impl']} {_g(mine['bytes_per_s'])} bytes/s"
              + (f", {ratio:.2f}× megabyte[reference]" if ratio else "")
              + (f", peak {mine['peak_mem_GiB']:.1f} GiB" if mine.get("peak_mem_GiB") else ""))
    else:
        reason = (mine or {}).get("error") or (mine or {}).get("skipped") or t.why_not("train_step")
        t.add("bench", label, reason, verdict="not run")
    lc = t.of("bench", item="long_context")
    label = f"training step T={p['long_context']['T']:,} (checkpointing + chunked loss)"
    if lc and lc[-1].get("step_ms") is not None:
        x = lc[-1]
        fig = f"{_g(x['step_ms'])} ms/step, {_g(x['bytes_per_s'])} bytes/s"
        if x.get("peak_GiB") is not None:
            fig = f"peak {x['peak_GiB']} GiB of {x['device_GiB']} GiB; " + fig
        t.add("bench", label, fig)
    else:
        t.add("bench", label, (lc[-1].get("error") if lc else None) or t.why_not("long_context"),
              verdict="not run")


def build_table(rows: list[dict], scale: str, stages: list[str], kernels: list[str] | None,
                model: dict | None | bool = True) -> list[dict]:
    """The table; ``model``: the perf-model table (True: the committed one, None: none)."""
    t = Table(rows, stages, load_perf_model() if model is True else model)
    pf = [x for x in rows if x.get("kind") == "preflight"]
    table_preflight(t, pf[-1] if pf else None)
    table_smoke(t, scale, kernels)
    table_warm(t, scale)
    table_tests(t)
    if "bench" in stages:
        table_bench(t, scale)
    else:
        t.add("bench", "benchmarks", "stage not selected (--stages)", verdict="not run")
    return t.out


def render_md(table: list[dict]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| stage | what | figure | goal | verdict | measured / floor | measured / predicted |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        v = f"**{r['verdict']}**" if r["verdict"] in ("not run", "FAIL") else r["verdict"]
        lines.append(f"| {esc(r['stage'])} | {esc(r['what'])} | {esc(r['figure'])} | {esc(r['goal'])} | {v} | "
                     f"{esc(r.get('vs_floor', '—'))} | {esc(r.get('vs_model', '—'))} |")
    return "\n".join(lines)


def exit_status(table: list[dict]) -> tuple[int, str]:
    checks = [r for r in table if r["check"]]
    failed = [r["what"] for r in checks if r["verdict"] == "FAIL"]
    missing = [r["what"] for r in checks if r["verdict"] == "not run"]
    if failed:
        return 1, f"{len(failed)} parity check(s) FAILED: {'; '.join(failed[:4])}"
    if missing:
        return 3, f"{len(missing)} parity check(s) did not run: {'; '.join(missing[:4])}"
    return 0, f"all {len(checks)} parity checks ran and passed"


def plot(table: list[dict], path: str, title: str) -> str | None:
    """Each goal row's figure over its goal (1 = the goal), bars coloured met / not met."""
    rows = [r for r in table if r["goal_key"] and r["value"] is not None]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - no matplotlib: no plot
        return None
    vals = [r["value"] / plan.GOALS[r["goal_key"]][1] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.38 * len(rows)))
    ax.barh([r["what"][:70] for r in rows], vals, color=["tab:green" if r["verdict"] == "met" else "tab:red"
                                                          for r in rows])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("figure / goal (log scale; ≥ 1 is met)")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    for y, (v, r) in enumerate(zip(vals, rows)):
        ax.text(v, y, f" {r['figure'].split(' (')[0][:32]}", va="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


