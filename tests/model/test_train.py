"""`megabyte train` / `megabyte eval` end to end on a tiny corpus, the data pipeline, the baselines."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megabyte import Megabyte, MegabyteConfig, baselines
from megabyte.cli import main
from megabyte.data import BatchSampler, CorpusError, eval_windows, is_heldout, load_corpus

ROOT = Path(__file__).resolve().parents[2]

TINY_MODEL = ["--steps", "20", "--seq-len", "32", "--batch-size", "4", "--d-global", "16", "--d-local", "32",
              "--g-layers", "1", "--l-layers", "1", "--g-heads", "2", "--l-heads", "2", "--warmup", "5",
              "--eval-every", "10", "--log-every", "5", "--sample-bytes", "40", "--threads", "1",
              "--backend", "reference", "--device", "cpu",  # the pipeline under test, not the kernels
              "--time-budget", "0"]  # a schedule by steps alone: the same run however loaded the machine is


def _write_corpus(folder: Path, n_files: int = 12, size: int = 600) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "class", "if", "else", "for", "in", "x", "y", "=", "(", ")", ":"]
    for i in range(n_files):
        text = " ".join(rng.choice(words) for _ in range(size // 4))
        (folder / f"mod_{i:02d}.py").write_text(text[:size] + "\n")
    (folder / "bin.dat").write_bytes(bytes(range(256)))  # non-UTF-8 bytes are fine
    return folder


# ----------------------------------------------------------------------------------------------
# the commands, end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = _write_corpus(tmp / "corpus")
    out = tmp / "ckpt"
    return data, out


def test_train_then_eval(trained, capsys):
    data, out = trained
    rc = main(["train", "--data", str(data), "--out", str(out), *TINY_MODEL])
    assert rc == 0
    cap = capsys.readouterr()
    for name in ("config.json", "model.safetensors", "train_log.jsonl", "loss.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final table: model, order-0, gzip, lzma, all as numbers
    figures = {}
    for line in cap.out.splitlines():
        for key in ("MEGABYTE (this run)", "order-0, train byte freqs", "gzip -9", "lzma -9e"):
            if line.strip().startswith(key) and "bpb" in line:
                figures[key] = float(line.strip()[len(key):].split()[0])
    assert set(figures) == {"MEGABYTE (this run)", "order-0, train byte freqs", "gzip -9", "lzma -9e"}, cap.out
    assert all(0 < v < 20 for v in figures.values()), figures
    assert "--- sample" in cap.out
    assert "step 20/20" in cap.err and "B/s" in cap.err and "ETA" in cap.err  # progress (not a TTY)

    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "run" and kinds[-1] == "final" and "train" in kinds and kinds.count("eval") == 2
    final = recs[-1]
    assert math.isclose(final["heldout_bpb"], figures["MEGABYTE (this run)"], abs_tol=1e-3)

    # eval reads the data from the checkpoint and reproduces the training run's figure
    rc = main(["eval", "--checkpoint", str(out), "--threads", "1", "--backend", "reference"])
    assert rc == 0
    ev = capsys.readouterr().out
    line = next(ln for ln in ev.splitlines() if ln.strip().startswith("MEGABYTE"))
    assert math.isclose(float(line.split()[1]), final["heldout_bpb"], abs_tol=1e-3), ev
    # and with an explicit --data
    assert main(["eval", "--checkpoint", str(out), "--data", str(data), "--threads", "1"]) == 0
    assert "bpb" in capsys.readouterr().out


@pytest.mark.parametrize("unigram_bias", [True, False], ids=["unigram-bias", "zero-bias"])
def test_training_lowers_the_loss(tmp_path, capsys, unigram_bias):
    """A tiny model on a very regular corpus gets well under the order-0 entropy; it starts at
    that entropy (the head bias at the byte log frequencies), or at ~log2(V) without it."""
    from megabyte.train import TRAIN_VOCAB

    f = tmp_path / "abc.txt"
    f.write_bytes(b"abcdefgh" * 800)
    args = ["train", "--data", str(f), "--out", str(tmp_path / "o"), *TINY_MODEL]
    args[args.index("--steps") + 1] = "80"
    args[args.index("--sample-bytes") + 1] = "0"
    assert main(args + ["--lr", "1e-2"] + ([] if unigram_bias else ["--no-unigram-bias"])) == 0
    recs = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    first_train, final = recs[1], recs[-1]
    assert first_train["kind"] == "train" and first_train["step"] == 1
    if unigram_bias:  # 8 equally frequent bytes: 3 bits, plus the add-one mass of the other V - 8 ids
        assert first_train["bpb"] == pytest.approx(3.0, abs=0.15)
    else:
        assert first_train["bpb"] > math.log2(TRAIN_VOCAB) - 0.5
    assert final["order0_bpb"] == pytest.approx(3.0, abs=0.1)  # 8 equally frequent bytes
    assert final["heldout_bpb"] < final["order0_bpb"]  # learned more than byte frequencies
    capsys.readouterr()


def test_init_head_bias_is_the_order0_model():
    """Softmax of the bias = the add-one smoothed byte frequencies of the training bytes."""
    from megabyte.train import init_head_bias

    model = Megabyte(MegabyteConfig(V=300, P=2, D_G=4, D_L=8, T_MAX=8, g_nheads=1, g_nlayers=1, l_nheads=1,
                                    l_nlayers=1, pad_id=257, eos_id=258))
    data = torch.tensor([0] * 60 + [1] * 30 + [255] * 10, dtype=torch.uint8)
    init_head_bias(model, data)
    p = torch.softmax(model.to_logits.bias.double(), 0)
    expect = torch.full((300,), 1.0 / 400, dtype=torch.float64)
    expect[0], expect[1], expect[255] = 61 / 400, 31 / 400, 11 / 400
    torch.testing.assert_close(p, expect, rtol=1e-5, atol=0)


def test_time_budget_stops_training_early(tmp_path, capsys):
    data = _write_corpus(tmp_path / "c", n_files=4)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "o"), *TINY_MODEL, "--time-budget", "1e-6"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "time budget" in cap.err and "stopping at step 1 of 20" in cap.err
    final = json.loads((tmp_path / "o" / "train_log.jsonl").read_text().splitlines()[-1])
    assert final["steps"] == 1 and math.isfinite(final["heldout_bpb"])


def test_lr_schedule_follows_the_clock_only_when_the_steps_would_not_fit():
    """The time budget is a safety net: a machine that keeps pace gets the schedule by steps
    (the same run however busy it is); one whose pace projects past the budget anneals in time."""
    from types import SimpleNamespace

    from megabyte.train import lr_at

    args = SimpleNamespace(lr=1e-3, min_lr_ratio=0.1, warmup=10, steps=1000)
    by_steps = [lr_at(s, 0.0, args, math.inf) for s in range(0, 1000, 50)]
    # 0.1 s a step: 100 s for the run, inside a 120 s budget
    assert [lr_at(s, 0.1 * s, args, 120.0) for s in range(0, 1000, 50)] == by_steps
    # 0.2 s a step: 200 s projected against 120 s: the cosine runs over time, further along
    slow = [lr_at(s, 0.2 * s, args, 120.0) for s in range(0, 1000, 50)]
    assert all(a <= b for a, b in zip(slow, by_steps)) and slow[-1] < by_steps[-1]
    assert lr_at(600, 120.0, args, 120.0) == pytest.approx(1e-4)  # budget spent: the floor


@pytest.mark.parametrize("idle_frac,threads", [(0.95, 2), (0.5, 1), (0.0, 1)])
def test_default_threads_count_the_cores_busy_now(monkeypatch, idle_frac, threads):
    """Threads = cores less the cores other processes keep busy, measured now (/proc/stat), not
    from the 1-minute load average (which a finished pip install still inflates)."""
    from megabyte import distributed

    samples = iter([(0, 0), (int(200 * idle_frac), 200)])
    monkeypatch.setattr(distributed, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (5.0, 5.0, 5.0))  # must not be used
    monkeypatch.setattr(distributed.time, "sleep", lambda s: None)
    assert distributed.default_threads() == threads


def test_default_threads_fall_back_to_the_load_average(monkeypatch):
    from megabyte import distributed

    monkeypatch.setattr(distributed, "_cpu_times", lambda: None)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert distributed.default_threads() == 1


_FAULTS_SCRIPT = """
import argparse, resource, torch
from megabyte.distributed import keep_freed_memory
from megabyte.train import DEMO, build_model, make_optimizer
kept = keep_freed_memory()
torch.set_num_threads(1)
args = argparse.Namespace(**DEMO, backend="reference")
model = build_model(args, {})
opt = make_optimizer(model, args)
ids = torch.randint(0, 256, (args.batch_size, args.seq_len))
def step():
    model(ids, return_loss=True).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and ru_minflt: Linux")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_keep_freed_memory_stops_the_page_faults_of_a_training_step(setting):
    """A demo training step frees and reallocates the same activations every step. With
    :func:`keep_freed_memory` the heap keeps them and a step measured 0-410 page faults; without it
    (``MEGABYTE_KEEP_FREED_MEMORY=0``) glibc hands the blocks back to the kernel and a step
    measured 3,300-6,600, each a fresh zeroed page."""
    env = {**os.environ, "MEGABYTE_KEEP_FREED_MEMORY": setting, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, env=env,
                       timeout=300, check=True)
    kept, per_step = r.stdout.split()
    if setting == "1":
        assert kept == "True" and float(per_step) < 1000, r.stdout
    else:
        assert kept == "False" and float(per_step) > 2000, r.stdout


@pytest.mark.parametrize("batch,cores,expect", [(8, 2, 2), (8, 1, 1), (8, 16, 2), (16, 16, 4), (6, 2, 1),
                                                 (12, 2, 2), (12, 3, 3), (4, 2, 1)])
def test_auto_cpu_shards(batch, cores, expect):
    from megabyte.distributed import auto_cpu_shards

    assert auto_cpu_shards(batch, cores) == expect


def _shard_model():
    torch.manual_seed(0)
    return Megabyte(MegabyteConfig(V=264, P=4, D_G=8, D_L=16, T_MAX=32, g_nheads=2, g_nlayers=1, l_nheads=2,
                                   l_nlayers=1, pad_id=257, eos_id=258, backend="reference"))


def _shard_grads(model, ids, n, workers, scale=1.0):
    from megabyte.distributed import CpuShards, op_threads

    params = [p for p in model.parameters()]
    for p in params:
        p.grad = None
    shards = CpuShards(n, workers)
    try:
        with op_threads(1):
            loss = shards.backward(params, ids, lambda x: model(x, return_loss=True).loss, scale=scale)
    finally:
        shards.close()
    return loss, [p.grad.clone() for p in params]


def test_cpu_shards_are_the_whole_batch():
    """The loss and gradients of 4 shards of 2 rows = those of the batch of 8 (up to rounding), and
    ``scale`` multiplies the gradients (a micro-batch of gradient accumulation)."""
    model = _shard_model()
    ids = torch.randint(0, 256, (8, 32))
    loss = model(ids, return_loss=True).loss
    whole = torch.autograd.grad(loss, list(model.parameters()))
    got_loss, got = _shard_grads(model, ids, 4, 2)
    torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(got, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    _, half = _shard_grads(model, ids, 4, 2, scale=0.5)
    for a, b in zip(half, whole):
        torch.testing.assert_close(a, 0.5 * b, rtol=1e-5, atol=1e-7)


def test_cpu_shards_do_not_depend_on_the_workers():
    """4 shards one at a time, 2 at a time or all 4 at once: bitwise the same gradients."""
    model = _shard_model()
    ids = torch.randint(0, 256, (8, 32))
    runs = [_shard_grads(model, ids, 4, w) for w in (1, 2, 4)]
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def test_cpu_shards_refuse_an_uneven_batch():
    from megabyte.distributed import CpuShards

    with pytest.raises(ValueError, match="does not split into 3 equal shards"):
        CpuShards(3, 1).backward([], torch.zeros(8, 4, dtype=torch.long), lambda x: x.sum())
    with pytest.raises(ValueError, match="shards and workers must be >= 1"):
        CpuShards(0, 1)


def test_cpu_shards_argument_errors(tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "c")
    with pytest.raises(SystemExit):
        main(["train", "--data", str(corpus), "--out", str(tmp_path / "o"), *TINY_MODEL, "--cpu-shards", "3"])
    assert "--cpu-shards must be >= 1 and divide --batch-size 4, got 3" in capsys.readouterr().err
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "o"), *TINY_MODEL, "--cpu-shards", "2",
                 "--precision", "bf16"]) == 2
    assert "shards are for a single-process CPU run in fp32" in capsys.readouterr().err


def test_python_m_megabyte_help():
    r = subprocess.run([sys.executable, "-m", "megabyte", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "eval" in r.stdout


def test_clear_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "empty" in capsys.readouterr().err

    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err

    short = tmp_path / "short.txt"
    short.write_bytes(b"x" * 100)
    assert main(["train", "--data", str(short), "--seq-len", "256", "--out", str(tmp_path / "o")]) == 2
    assert "shorter than one training sequence" in capsys.readouterr().err

    (tmp_path / "emptydir").mkdir()
    assert main(["train", "--data", str(tmp_path / "emptydir"), "--out", str(tmp_path / "o")]) == 2
    assert "no files" in capsys.readouterr().err

    assert main(["eval", "--checkpoint", str(tmp_path / "emptydir")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# data

def test_split_is_deterministic_and_by_file(tmp_path):
    data = _write_corpus(tmp_path / "c", n_files=40)
    a = load_corpus(data, heldout_frac=0.2)
    b = load_corpus(data, heldout_frac=0.2)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.n_heldout_files > 0 and a.n_train_files > 0
    assert a.n_train_files + a.n_heldout_files == 41
    # the split of a file depends on its path only: adding a file moves no other file
    (data / "zzz_new.py").write_text("print('new')\n")
    c = load_corpus(data, heldout_frac=0.2)
    held = sorted(p.relative_to(data).as_posix() for p in data.iterdir() if is_heldout(p.name, 0.2))
    assert c.n_heldout_files == len(held)
    assert is_heldout("mod_03.py", 0.2) == is_heldout("mod_03.py", 0.2)


def test_default_corpus_is_stdlib_and_capped():
    c = load_corpus(None, max_bytes=100_000, eval_bytes=10_000)
    assert len(c.train) == 100_000 and len(c.heldout) == 10_000
    assert "standard library" in c.source
    assert bytes(c.train[:4000].tolist()).count(b"def ") + bytes(c.train[:4000].tolist()).count(b"import") > 0
    d = load_corpus(None, max_bytes=100_000, eval_bytes=10_000)
    assert torch.equal(c.train, d.train) and torch.equal(c.heldout, d.heldout)


def test_single_file_split_by_position(tmp_path):
    f = tmp_path / "doc.bin"
    payload = bytes(i % 251 for i in range(10_000))
    f.write_bytes(payload)
    c = load_corpus(f, heldout_frac=0.05)
    assert bytes(c.train.tolist()) == payload[:9500] and bytes(c.heldout.tolist()) == payload[9500:]
    c = load_corpus(f, heldout_frac=0.05, max_bytes=1000, eval_bytes=100)  # caps do not move the split
    assert bytes(c.train.tolist()) == payload[:1000] and bytes(c.heldout.tolist()) == payload[9500:9600]


def test_unreadable_file_is_skipped_with_a_warning(tmp_path, monkeypatch):
    data = _write_corpus(tmp_path / "c", n_files=6)
    (data / "broken_link.py").symlink_to(tmp_path / "does_not_exist")  # not a regular file: ignored
    (data / "zz_unreadable.py").write_text("x = 1\n" * 50)
    full = load_corpus(data)
    # a file that cannot be read (permissions do not bind root, so fail the read itself)
    real_read = Path.read_bytes

    def read_bytes(self):
        if self.name == "zz_unreadable.py":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.warns(UserWarning, match="unreadable"):
        c = load_corpus(data)
    assert [Path(s).name for s in c.skipped] == ["zz_unreadable.py"]
    assert len(c.train) + len(c.heldout) < len(full.train) + len(full.heldout)


def test_batch_sampler_seeded_and_eval_windows_cover_everything():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    s1, s2 = BatchSampler(data, 16, 4, seed=3), BatchSampler(data, 16, 4, seed=3)
    torch.manual_seed(0)
    a = s1()
    torch.manual_seed(123)  # the global RNG does not matter
    b = s2()
    assert a.shape == (4, 16) and a.dtype == torch.int64 and torch.equal(a, b)
    assert not torch.equal(s1(), a)
    # windows are contiguous slices of the data
    assert bool(((a[:, 1:] - a[:, :-1]) % 256 == 1).all())

    wins = list(eval_windows(data, 64, 5))
    assert [w.shape for w in wins][-1] == (1, 1000 - 15 * 64)
    flat = torch.cat([w.reshape(-1) for w in wins])
    assert torch.equal(flat, data.long())
    assert all(torch.equal(x, y) for x, y in zip(wins, eval_windows(data, 64, 5)))


# ----------------------------------------------------------------------------------------------
# baselines

def test_baselines_on_known_inputs():
    assert baselines.entropy_bpb(b"ab" * 500) == pytest.approx(1.0)
    assert baselines.entropy_bpb(b"aaaa") == pytest.approx(0.0)
    assert baselines.entropy_bpb(bytes(range(256)) * 4) == pytest.approx(8.0)
    # order-0 of train frequencies as cross entropy on held-out bytes
    assert baselines.order0_bpb(b"ab" * 500, b"ab" * 10, alpha=0) == pytest.approx(1.0)
    assert baselines.order0_bpb(b"ab" * 500, b"aaaa", alpha=0) == pytest.approx(1.0)
    assert baselines.order0_bpb(b"aaab" * 100, b"ab", alpha=0) == pytest.approx(0.5 * (-math.log2(0.75) + 2))
    assert baselines.order0_bpb(b"ab", b"c", alpha=0) == math.inf
    assert baselines.order0_bpb(b"ab" * 100_000, b"ab" * 10) == pytest.approx(1.0, abs=1e-2)  # add-one
    assert math.isfinite(baselines.order0_bpb(b"ab", b"c"))
    # tensors and bytes give the same figures
    t = torch.tensor(list(b"hello world"), dtype=torch.uint8)
    assert baselines.entropy_bpb(t) == baselines.entropy_bpb(b"hello world")
    # compressors: a repetitive string compresses far below 8 bits/byte, random bytes do not
    assert baselines.gzip_bpb(b"abc" * 10_000) < 0.1 and baselines.lzma_bpb(b"abc" * 10_000) < 0.1
    rnd = random.Random(0).randbytes(20_000)
    assert baselines.gzip_bpb(rnd) > 7.9 and baselines.lzma_bpb(rnd) > 7.9
    assert baselines.gzip_bpb(t) == baselines.gzip_bpb(b"hello world")
