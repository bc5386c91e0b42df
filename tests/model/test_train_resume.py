"""Checkpoints that resume exactly: a run killed (SIGKILL) or stopped (SIGTERM) mid-run and resumed
ends with bitwise the parameters of an uninterrupted run (CPU, one thread); damaged state files give
a clear error and leave the previous state usable."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megabyte import checkpoint as ckpt
from megabyte.cli import main

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
ARGS = ["--steps", str(STEPS), "--seq-len", "64", "--batch-size", "8", "--d-global", "16", "--d-local", "32",
        "--g-layers", "1", "--l-layers", "1", "--g-heads", "2", "--l-heads", "2", "--warmup", "5",
        "--eval-every", "15", "--log-every", "5", "--sample-bytes", "0", "--threads", "1",
        "--backend", "reference", "--time-budget", "0", "--lr", "3e-3",
        "--device", "cpu"]  # CPU tier: bitwise resume of the pipeline, not of a GPU's kernels


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("resume") / "corpus.txt"
    f.write_bytes((ROOT / "megabyte" / "train.py").read_bytes() * 2)
    return f


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must match."""
    out = tmp_path_factory.mktemp("ref") / "o"
    assert main(["train", "--data", str(corpus), "--out", str(out), *ARGS]) == 0
    return out


def _weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resuming"


def _start(corpus: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "megabyte", "train", "--data", str(corpus), "--out", str(out),
                             *ARGS, "--save-every", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_state(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not (out / ckpt.STATE).exists():
        assert proc.poll() is None, f"training ended before its first checkpoint: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout, "no checkpoint written in time"
        time.sleep(0.005)


def test_sigkill_mid_run_then_resume_is_bitwise_exact(corpus, reference_run, tmp_path, capsys):
    out = tmp_path / "o"
    proc = _start(corpus, out)
    _wait_for_state(proc, out)
    time.sleep(0.05)  # a few more steps, then kill it hard wherever it is (maybe mid-write)
    proc.kill()
    proc.communicate(timeout=60)
    state, _ = ckpt.load_latest(out)
    assert 1 <= state["step"] < STEPS, "the kill did not land mid-run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *ARGS, "--resume"]) == 0
    cap = capsys.readouterr()
    assert f"at step {state['step']}" in cap.out
    _assert_bitwise_equal(reference_run, out)
    # the log continues the first one: every step logged once, one final record
    recs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert [r["kind"] for r in recs].count("final") == 1 and recs[-1]["steps"] == STEPS


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_stops_then_resume_is_bitwise_exact(sig, corpus, reference_run, tmp_path, capsys):
    out = tmp_path / "o"
    proc = _start(corpus, out)
    _wait_for_state(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"{sig.name} received: training state saved at step" in err and "--resume" in err
    assert "Traceback" not in err
    state = ckpt.load_state(out / ckpt.STATE)
    assert 1 <= state["step"] < STEPS
    recs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert recs[-1]["kind"] == "interrupted" and recs[-1]["step"] == state["step"]
    # the weights of the interrupted run are a loadable checkpoint at that step
    w = _weights(out)
    assert torch.equal(w["to_logits.weight"], state["model"]["to_logits.weight"])
    assert main(["train", "--data", str(corpus), "--out", str(out), *ARGS, "--resume"]) == 0
    capsys.readouterr()
    _assert_bitwise_equal(reference_run, out)


def test_damaged_state_gives_a_clear_error_and_the_previous_one_is_used(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    # a 20-step run saving every 10 steps leaves two states (steps 10 and 20); then damage the newest
    args = [*ARGS, "--save-every", "10"]
    args[args.index("--steps") + 1] = "20"
    assert main(["train", "--data", str(corpus), "--out", str(out), *args]) == 0
    newest, prev = out / ckpt.STATE, out / ckpt.PREV
    assert ckpt.load_state(newest)["step"] == 20 and ckpt.load_state(prev)["step"] == 10
    good = newest.read_bytes()

    newest.write_bytes(good[: len(good) // 2])  # truncated
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "x"), *args,
                 "--resume-from", str(newest)]) == 2
    err = capsys.readouterr().err
    assert "corrupted or truncated" in err and "Traceback" not in err
    state, used = ckpt.load_latest(out, warn=lambda m: print(m, file=sys.stderr))
    assert used == prev and state["step"] == 10
    assert "resuming from the previous state" in capsys.readouterr().err

    flipped = bytearray(good)
    flipped[len(flipped) - 100] ^= 0xFF  # one bit pattern changed inside a tensor
    newest.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.load_state(newest)
    newest.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="not a megabyte training-state file"):
        ckpt.load_state(newest)

    # --resume takes the previous state, with a warning, and continues to the end
    assert main(["train", "--data", str(corpus), "--out", str(out), *args, "--resume"]) == 0
    cap = capsys.readouterr()
    assert "resuming from the previous state" in cap.err and "at step 10" in cap.out
    assert ckpt.load_state(newest)["step"] == 20  # a fresh, intact newest state

    # both damaged: a clear error, nothing overwritten
    newest.write_bytes(b"garbage")
    prev.write_bytes(b"garbage")
    assert main(["train", "--data", str(corpus), "--out", str(out), *args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no usable training state" in err and "Traceback" not in err
    assert newest.read_bytes() == b"garbage"


def test_resume_with_another_model_is_refused(corpus, reference_run, tmp_path, capsys):
    args = [*ARGS]
    args[args.index("--d-local") + 1] = "64"
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "o"), *args,
                 "--resume-from", str(reference_run / ckpt.STATE)]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and "D_L" in err


def test_corrupted_weights_give_a_clear_eval_error(reference_run, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((reference_run / "config.json").read_bytes())
    (bad / "model.safetensors").write_bytes((reference_run / "model.safetensors").read_bytes()[:1000])
    assert main(["eval", "--checkpoint", str(bad), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot load weights" in err and "Traceback" not in err


def test_save_state_is_atomic_and_keeps_the_previous(tmp_path):
    ckpt.save_state({"step": 1, "x": torch.arange(3)}, tmp_path)
    ckpt.save_state({"step": 2, "x": torch.arange(4)}, tmp_path)
    assert ckpt.load_state(tmp_path / ckpt.STATE)["step"] == 2
    assert ckpt.load_state(tmp_path / ckpt.PREV)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.PREV, ckpt.STATE]  # no temp file left
    raw = (tmp_path / ckpt.STATE).read_bytes()
    for n in (0, 5, len(ckpt.MAGIC) + 10, len(raw) - 1):
        (tmp_path / "cut.pt").write_bytes(raw[:n])
        with pytest.raises(ckpt.CheckpointError):
            ckpt.load_state(tmp_path / "cut.pt")


def test_grad_accum_equals_the_larger_batch(corpus, tmp_path, capsys):
    """2 micro-batches of 4 per step: the parameters of batch 8 (the same windows, drawn in order)."""
    args = [*ARGS]
    args[args.index("--steps") + 1] = "4"
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--data", str(corpus), "--out", str(a), *args, "--batch-size", "8"]) == 0
    assert main(["train", "--data", str(corpus), "--out", str(b), *args, "--batch-size", "4", "--grad-accum", "2"]) == 0
    assert "grad accumulation 2" in capsys.readouterr().out
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_cpu_shards_give_bitwise_the_same_run_however_many_run_at_once(corpus, tmp_path, capsys):
    """Batch 8 as 2 shards: one after another (``--threads 1``) or side by side (``--threads 2``),
    bitwise the same parameters, so the run does not depend on the cores free; against the
    unsharded batch, the same up to float rounding."""
    args = [*ARGS]
    args[args.index("--steps") + 1] = "6"
    i = args.index("--threads")
    del args[i:i + 2]
    outs = {}
    for name, extra in {"seq": ["--cpu-shards", "2", "--threads", "1"], "par": ["--cpu-shards", "2", "--threads", "2"],
                        "whole": ["--cpu-shards", "1", "--threads", "1"]}.items():
        outs[name] = tmp_path / name
        assert main(["train", "--data", str(corpus), "--out", str(outs[name]), *args, *extra]) == 0
        log = capsys.readouterr().out
        assert ("2 batch shards" in log) == (name != "whole"), log
    _assert_bitwise_equal(outs["seq"], outs["par"])
    wa, wb = _weights(outs["seq"]), _weights(outs["whole"])
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_tensorboard_is_optional(corpus, tmp_path, capsys):
    args = [*ARGS]
    args[args.index("--steps") + 1] = "2"
    rc = main(["train", "--data", str(corpus), "--out", str(tmp_path / "o"), *args, "--tensorboard"])
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert rc == 2 and "needs the tensorboard package" in capsys.readouterr().err
        return
    assert rc == 0 and any((tmp_path / "o" / "tensorboard").iterdir())
