"""Plumbing of ``python -m benchmarks.run`` (no benchmark figures are checked: those are not tests)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_benchmarks_run_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "benchmarks.run", "--smoke", "--device", "cpu", "--threads", "1",
           "--impls", "megabyte[reference],gpt2-sdpa,original", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (js,) = tmp_path.glob("*-cpu.json")
    assert js.with_suffix(".md").is_file()
    result = json.loads(js.read_text())
    meta = result["meta"]
    assert meta["label"] == "CPU" and meta["device_type"] == "cpu"
    for key in ("device", "torch", "triton", "git_sha", "command"):
        assert meta[key], key
    assert "--smoke" in meta["command"]
    rows = {r["impl"]: r for r in result["suites"]["model"]["rows"]}
    assert list(rows) == ["megabyte[reference]", "gpt2-sdpa", "original"]  # in the order asked for
    for name in ("megabyte[reference]", "gpt2-sdpa"):
        r = rows[name]
        assert r["bytes_per_s"] > 0 and r["step_ms"] > 0 and r["model_TFLOP_per_step"] > 0, r
        assert r["params"] > 0
    assert "speed_vs_megabyte[reference]" in rows["gpt2-sdpa"]
    assert "--original" in rows["original"]["skipped"]
    assert "| megabyte[reference] |" in js.with_suffix(".md").read_text()


@pytest.mark.native
def test_native_suite_rows_and_cuda_skip():
    """The native suite's run() gives a reference and a native row per case (native's ratio
    finite and positive), and on a CUDA device a skip note, not an error."""
    sys.path.insert(0, ROOT)
    from benchmarks.run import run_module_suite

    res = run_module_suite("native", "benchmarks.bench_native", "cpu", True)
    assert "error" not in res, res.get("error")
    cases = {}
    for r in res["rows"]:
        cases.setdefault(r["case"], {})[r["impl"]] = r
    assert len(cases) == 5
    for op, impls in cases.items():
        assert {"reference", "native"} <= set(impls), op
        ratio = impls["native"]["ratio_vs_reference"]
        assert ratio > 0 and impls["native"]["ms"] > 0 and impls["reference"]["ms"] > 0, (op, impls)
    skipped = run_module_suite("native", "benchmarks.bench_native", "cuda", True)
    assert skipped["rows"] == [] and "CPU ops" in skipped["note"] and "error" not in skipped
