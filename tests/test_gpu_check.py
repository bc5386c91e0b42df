"""Plumbing of ``python -m benchmarks.gpu_check`` through its ``--dry-run-cpu`` mode: the same
stages on CPU, in Triton's interpreter, at tiny sizes (no figure is checked: on CPU they mean
nothing). Skipped where CUDA is present: there gpu-check itself runs, not its dry run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu_plan import BENCH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "| stage | what | figure | goal | verdict | measured / floor | measured / predicted |"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs gpu-check itself")]


def _start(out, *extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("TRITON_INTERPRET", "MEGABYTE_PIN_CONFIGS", "MEGABYTE_GPU_CHECK_INJECT_FAULT"):
        env.pop(var, None)  # gpu_check decides these for its workers
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run-cpu", "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Both dry runs at once (the clean one leaves a core idle in its one-process stages):
    {"clean"|"fault": (returncode, stdout, stderr, out dir)}."""
    runs = {"clean": (tmp_path_factory.mktemp("clean"), ()),
            "fault": (tmp_path_factory.mktemp("fault"),
                      ("--stages", "smoke", "--smoke-kernels", "patch_embed", "--inject-fault", "patch_embed"))}
    procs = {name: _start(out, *extra) for name, (out, extra) in runs.items()}
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=400)
            done[name] = (proc.returncode, out, err, runs[name][0])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return done


def _table_after_header(text: str) -> list[list[str]]:
    """The rows of the final table, which must be the last thing printed."""
    lines = text.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line == HEADER)
    body = lines[start + 2:]
    assert body and all(line.startswith("| ") and line.endswith(" |") for line in body), body[-3:]
    return [[c.strip() for c in line[2:-2].split(" | ")] for line in body]


def test_dry_run_runs_every_stage(dry_runs):
    rc, stdout, stderr, tmp_path = dry_runs["clean"]
    assert rc == 0, stdout[-4000:] + stderr[-2000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert {"gpu_check.log", "results.jsonl", "pytest.log", "summary.md", "summary.json", "goals.png"} <= files
    assert len(files) <= 8 and all(p.is_file() for p in tmp_path.iterdir())

    table = _table_after_header(stdout)
    assert {r[0] for r in table} == {"preflight", "smoke", "tests", "bench"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_status"] == 0 and len(summary["table"]) == len(table)
    for row in summary["table"]:
        if row["check"]:  # smoke, tests and autotune-winner parity: each ran and passed
            assert row["verdict"] == "PASS", row
        else:  # every benchmark row type was measured (on CPU no goal is met, but none is "not run")
            assert row["verdict"] in ("met", "not met", "—"), row
    assert sum(r["stage"] == "smoke" and r["check"] for r in summary["table"]) == 6
    assert sum("parity of the autotune winner" in r["what"] for r in summary["table"]) == 4
    # the perf model's columns are there for every row; the committed model is for the GPU sizes,
    # so at the dry run's sizes they stay empty (tests/test_perf_model.py checks their figures)
    assert all(len(r) == 7 for r in table)
    goal_rows = [r for r in summary["table"] if r["goal_key"] and not r["goal_key"].startswith("generation_")]
    assert len(goal_rows) == 3 * len(BENCH["dry"]["flash"]) + 5  # flash x3, local x2, patch_embed x2, g2l
    assert all(r["vs_floor"] == "—" and r["vs_model"] == "—" for r in summary["table"])
    # the table is also the end of the log and the body of summary.md
    assert _table_after_header((tmp_path / "gpu_check.log").read_text()) == table
    assert HEADER in (tmp_path / "summary.md").read_text()

    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert {"meta", "preflight", "smoke", "tests", "event", "bench", "compare", "tuned", "parity", "warm"} <= kinds
    smoke = [r for r in rows if r["kind"] == "smoke"]
    assert len(smoke) == 6 * 2 * 2 and all(r["verdict"] == "PASS" for r in smoke)
    assert {r["dtype"] for r in smoke} == {"bf16", "fp16"} and {r["pass"] for r in smoke} == {"fwd", "bwd"}
    tests = [r for r in rows if r["kind"] == "tests"][0]
    assert tests["rc"] == 0 and tests["passed"] > 0 and tests["skipped"] > 0  # a GPU-tier test skipped here
    items = {r["item"] for r in rows if r["kind"] == "event" and r["event"] == "done"}
    assert {"flash/0", "flash_parity/1", "local", "patch_embed", "global_to_local_parity", "generation",
            "train_step", "long_context", "local_variants"} <= items
    variants = [r for r in rows if r["kind"] == "bench" and r["item"] == "local_variants"]
    assert len(variants) == 6 and all("ms" in r for r in variants), variants  # 3 variants x 2 passes
    assert {r["tile_rows"] for r in variants} == {16, 32, 64}
    assert "Triton interpreter" in (tmp_path / "gpu_check.log").read_text()


def test_dry_run_parity_failure_exits_nonzero(dry_runs):
    """The test hook makes the patch_embed smoke check see a wrong result: FAIL, exit status 1."""
    rc, stdout, stderr, tmp_path = dry_runs["fault"]
    assert rc == 1, stdout[-4000:] + stderr[-2000:]
    table = _table_after_header(stdout)
    pe = [r for r in table if r[0] == "smoke" and r[1].startswith("patch_embed")]
    assert len(pe) == 1 and pe[0][4] == "**FAIL**", pe
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    smoke = [r for r in rows if r["kind"] == "smoke"]
    assert len(smoke) == 4 and all(r["verdict"] == "FAIL" and r["kernel"] == "patch_embed" for r in smoke)
    assert "exit status 1" in stdout
