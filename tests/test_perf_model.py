"""The performance model (``benchmarks/perf_model.py``): its figures recomputed by hand, the
committed table against what the module prints now, and gpu-check's measured / floor and
measured / predicted columns (``benchmarks/gpu_summary.py``)."""
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_summary
from benchmarks import perf_model as pm
from benchmarks.gpu_plan import BENCH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "perf-model.json")


@pytest.fixture(scope="module")
def committed():
    with open(COMMITTED) as f:
        return json.load(f)


def _row(model, item, what):
    (row,) = [r for r in model["rows"] if r["item"] == item and r["what"] == what]
    return row


def test_floor_of_the_flash_forward_by_hand(committed):
    """flash/0 forward: causal FLOPs 4·B·H·N²·d/2 over 790 TFLOP/s (compute-bound: its bytes,
    q, k, v, o once, take 0.06 ms at 4.3 TB/s)."""
    s = BENCH["gpu"]["flash"][0]
    B, H, Hkv, N, d = s["B"], s["H"], s["Hkv"], s["N"], s["d"]
    flops = 4 * B * H * N * N * d / 2
    nbytes = (2 * B * H * N * d + 2 * B * Hkv * N * d) * 2
    by_hand = max(flops / 790e12, nbytes / 4300e9) * 1e3
    row = _row(committed, "flash/0", "fwd")
    assert row["flops"] == flops and row["bytes"] == nbytes
    assert row["floor_ms"] == pytest.approx(by_hand, rel=1e-12)
    assert pm.floor_ms(nbytes, flops) == pytest.approx(by_hand, rel=1e-12)
    assert _row(committed, "flash/0", "fwd+bwd")["flops"] == 3.5 * flops


def test_mqa_dkdv_wave_by_hand(committed):
    """Issue 15's figure: MQA (Hkv = 1), B = 1, N = 8K, BLOCK_N = 128 without splitting the heads:
    64 programs, key block j walks N - 128·j query rows (all 16 heads), one block per SM (246
    registers × 8 warps), so E = Σ_j (64 - j) / (132 · 64) = 2080 / 8448 ≈ 0.25. With the heads
    spread over S = 16 slices (``dkdv_head_splits``) the committed table has 1,024 programs and
    E >= 0.85 for every config."""
    by_hand = sum(64 - j for j in range(64)) / (132 * 64)
    assert pm.wave_efficiency([64 - j for j in range(64)], 64, 132) == pytest.approx(by_hand, rel=1e-12)
    rows = [r for r in committed["dkdv"] if r["shape"].startswith("B=1 N=8192") and r["config"].startswith("16x128")]
    assert rows, "the dK/dV list has a BLOCK_N = 128 config"
    for r in rows:
        assert r["programs"] == 64 * 16 and r["blocks_per_sm"] == 1
        assert r["wave_eff"] >= 0.85
    assert all(r["wave_eff"] >= 0.85 for r in committed["dkdv"])
    # blocks per SM from the formula: 246 regs -> 7936 per warp -> 8 warps -> 1 block of 8 warps
    assert pm.blocks_per_sm(246, 82048, 8) == {"blocks": 1, "limit": "registers"}
    assert pm.blocks_per_sm(32, 128, 4)["blocks"] == 16  # 32 regs: 1024 per warp, 64 warps / 4
    assert pm.blocks_per_sm(100, 150000, 4) == {"blocks": 1, "limit": "shared"}


def test_wave_efficiency_small_cases():
    assert pm.wave_efficiency([3, 1, 1, 1], 4, 2) == 1.0  # 3 | 1+1+1
    assert pm.wave_efficiency([1, 1, 1], 3, 2) == 0.75
    assert pm.wave_efficiency(None, 133, 132) == pytest.approx(133 / 264)
    assert pm.wave_efficiency([2, 1], 2, 132) == pytest.approx(3 / (132 * 2))


def test_flash_work_is_the_causal_triangle():
    """Forward: row block i of 128 rows walks 64-key blocks up to its diagonal: 128·128·(i+1)."""
    work = pm.flash_work("_flash_fwd_kernel", {"BLOCK_M": 128, "BLOCK_N": 64}, 2 * 4, 512, 2)
    assert work == [128 * 128 * (i % 4 + 1) for i in range(8)]
    # dK/dV, MQA: one program per key block visits all 2 heads
    work = pm.flash_work("_flash_bwd_dkdv_kernel", {"BLOCK_M": 32, "BLOCK_N": 128}, 4, 512, 2)
    assert work == [128 * (512 - 128 * j) * 2 for j in range(4)]


def test_autotune_winner_is_read_from_a_gpu_run(committed):
    lch = _row(committed, "flash/0", "fwd")["launches"][0]
    assert lch["kernel"] == "_flash_fwd_kernel"
    keys = tuple(lch["keys"].values()) + ("torch.bfloat16",)
    cfg = lch["configs"][1]["cfg"]
    winner = (f"BLOCK_M: {cfg['BLOCK_M']}, BLOCK_N: {cfg['BLOCK_N']}, num_warps: {cfg['num_warps']}, "
              f"num_ctas: 1, num_stages: {cfg['num_stages']}, maxnreg: None")
    tuned = {"_flash_fwd_kernel[fwd mid False]": {str(keys): winner}}
    assert pm._picked(lch, tuned) == 1
    other = {"_flash_fwd_kernel[fwd mid False]": {str((1,) + keys[1:]): winner}}
    assert pm._picked(lch, other) is None


def test_committed_table_is_what_the_module_prints(tmp_path, committed):
    """A stale table fails: regenerate with ``python -m benchmarks.perf_model`` and commit it."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("TRITON_INTERPRET", "MEGABYTE_PIN_CONFIGS"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-m", "benchmarks.perf_model", "--out", str(tmp_path), "--no-plot"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    now = json.loads((tmp_path / "perf-model.json").read_text())
    assert "| item | pass |" in out.stdout
    drop = lambda m: {k: v for k, v in m.items() if k not in ("git_sha", "command")}  # noqa: E731
    assert drop(now["meta"]) == drop(committed["meta"]), "the AOT table or the ceilings changed: regenerate"
    assert _close(now["rows"], committed["rows"]) and _close(now["dkdv"], committed["dkdv"]), \
        "benchmarks/results/perf-model.json is stale: run python -m benchmarks.perf_model and commit it"
    assert (tmp_path / "perf-model.md").read_text().split("\n", 3)[3] == \
        open(os.path.join(ROOT, "benchmarks", "results", "perf-model.md")).read().split("\n", 3)[3]


def _close(a, b) -> bool:
    """Equal, floats to 1e-9 relative."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def test_gpu_summary_prints_measured_over_floor_and_prediction(committed):
    """A GPU run's rows: measured / floor with the run's own ceilings, and / the prediction."""
    s = BENCH["gpu"]["flash"][0]
    rows = [{"kind": "preflight", "gpu": "H200", "copy_GB_s": 4000.0, "copy_bytes": 1 << 30, "gemm_TFLOP_s": 700.0,
             "gemm_n": 8192},
            {"kind": "bench", "item": "flash/0", "impl": "triton", "pass": "fwd", "ms": 2.0, "TFLOP/s": 275.0, **s}]
    table = gpu_summary.build_table(rows, "gpu", ["bench"], None, model=committed)
    m = _row(committed, "flash/0", "fwd")
    floor = m["flops"] / 700e12 * 1e3  # compute-bound at the run's GEMM ceiling
    (fwd,) = [r for r in table if r["what"].startswith("flash fwd N=8192 B=2 H=16 MHA") and "SDPA" not in r["what"]]
    assert fwd["vs_floor"] == f"{2.0 / floor:.2f}×"
    assert fwd["vs_model"] == f"{2.0 / (floor / m['utilisation']):.2f}×"
    others = [r for r in table if r["goal_key"] and r is not fwd]
    assert others and all(r["vs_floor"] == "—" for r in others)  # no measured row, nothing to compare
    md = gpu_summary.render_md(table)
    assert "| measured / floor | measured / predicted |" in md.splitlines()[0]
    # another size than the model's (the dry run's): no figure
    rows[1] = dict(rows[1], B=1)
    table = gpu_summary.build_table(rows, "gpu", ["bench"], None, model=committed)
    assert all(r["vs_floor"] == "—" for r in table)


def test_measured_ceilings_are_read_from_a_result_folder(tmp_path):
    lines = [{"kind": "meta"}, {"kind": "preflight", "copy_GB_s": 4100.5, "gemm_TFLOP_s": 701.0},
             {"kind": "tuned", "item": "flash/0", "configs": {"k": {"(1,)": "BLOCK_M: 64"}}}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ceil, tuned = pm.measured_inputs(str(tmp_path))
    assert (ceil["copy_gb_s"], ceil["tflop_s"]) == (4100.5, 701.0) and "measured" in ceil["source"]
    assert tuned == {"k": {"(1,)": "BLOCK_M: 64"}}
