"""Hostile input: random bytes and file layouts through the data loader (hypothesis), absurd model
configurations, and the ``megabyte train`` command line — each a clear error or handled, never a
traceback from deep inside, never a damaged checkpoint."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from megabyte import checkpoint as ckpt  # noqa: E402
from megabyte.cli import main  # noqa: E402
from megabyte.config import MegabyteConfig  # noqa: E402
from megabyte.data import BatchSampler, CorpusError, eval_windows, load_corpus  # noqa: E402
from megabyte.model import Megabyte  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = ["--steps", "3", "--seq-len", "16", "--batch-size", "2", "--d-global", "8", "--d-local", "16",
        "--g-layers", "1", "--l-layers", "1", "--g-heads", "2", "--l-heads", "2", "--warmup", "1",
        "--eval-every", "0", "--log-every", "1", "--sample-bytes", "8", "--threads", "1",
        "--backend", "reference", "--time-budget", "0", "--device", "cpu"]


# ----------------------------------------------------------------------------------------------
# the data loader

@SETTINGS
@given(files=st.lists(st.binary(max_size=300), min_size=1, max_size=6), seq_len=st.integers(1, 64),
       frac=st.floats(0.01, 0.99), max_bytes=st.integers(1, 2000), eval_bytes=st.integers(1, 500))
def test_load_corpus_on_random_bytes(files, seq_len, frac, max_bytes, eval_bytes):
    """Any bytes, any layout: a corpus whose bytes all come from the files, or a CorpusError."""
    tmp = Path(tempfile.mkdtemp())
    try:
        for i, b in enumerate(files):
            (tmp / f"f{i}.bin").write_bytes(b)
        src = tmp if len(files) > 1 else tmp / "f0.bin"
        try:
            c = load_corpus(src, max_bytes=max_bytes, eval_bytes=eval_bytes, heldout_frac=frac, min_len=seq_len)
        except CorpusError as e:
            assert str(e)
            return
        everything = b"".join(files)
        assert c.train.dtype == torch.uint8 and c.heldout.dtype == torch.uint8
        assert seq_len <= len(c.train) <= max_bytes and 2 <= len(c.heldout) <= eval_bytes
        assert len(c.train) + len(c.heldout) <= len(everything)
        # no byte invented: the corpus's byte counts fit within the files'
        have = torch.bincount(torch.cat([c.train, c.heldout]).long(), minlength=256)
        assert bool((have <= torch.bincount(torch.tensor(list(everything)).long(), minlength=256)).all())
        if len(files) == 1:  # one document: train is a prefix, held-out a later slice
            assert everything.startswith(bytes(c.train.tolist())) and bytes(c.heldout.tolist()) in everything
        # every batch is windows of the training bytes; evaluation covers the held-out bytes once
        s = BatchSampler(c.train, seq_len, 3, seed=1)
        batch = s()
        assert batch.shape == (3, seq_len) and int(batch.min()) >= 0 and int(batch.max()) <= 255
        train = bytes(c.train.tolist())
        assert all(bytes(row.tolist()) in train for row in batch)
        flat = torch.cat([w.reshape(-1) for w in eval_windows(c.heldout, seq_len, 4)])
        assert torch.equal(flat, c.heldout.long())
    finally:
        shutil.rmtree(tmp)


@SETTINGS
@given(n=st.integers(1, 200), seq_len=st.integers(1, 50), batch=st.integers(1, 5), world=st.integers(1, 3),
       seed=st.integers(0, 2**31))
def test_batch_sampler_shards_are_the_single_process_batch(n, seq_len, batch, world, seed):
    data = torch.randint(0, 256, (n,), dtype=torch.uint8)
    if n < seq_len:
        with pytest.raises(CorpusError):
            BatchSampler(data, seq_len, batch)
        return
    whole = BatchSampler(data, seq_len, batch * world, seed=seed)()
    shards = [BatchSampler(data, seq_len, batch, seed=seed, rank=r, world=world)() for r in range(world)]
    assert torch.equal(torch.cat(shards), whole)


# ----------------------------------------------------------------------------------------------
# absurd configurations

@SETTINGS
@given(P=st.integers(-1, 5), D_G=st.integers(-1, 6), D_L=st.integers(-1, 8), T_MAX=st.integers(-1, 12),
       g_heads=st.integers(0, 4), l_heads=st.integers(0, 4), g_layers=st.integers(-1, 2),
       kv=st.integers(0, 3), positions=st.sampled_from(["learned", "alibi", "none", "rope"]))
def test_config_is_rejected_clearly_or_builds_a_working_model(P, D_G, D_L, T_MAX, g_heads, l_heads, g_layers,
                                                               kv, positions):
    try:
        cfg = MegabyteConfig(V=300, P=P, D_G=D_G, D_L=D_L, T_MAX=T_MAX, g_nheads=g_heads, l_nheads=l_heads,
                             g_nlayers=g_layers, l_nlayers=1, g_kv_heads=kv, positions=positions,
                             backend="reference")
    except ValueError as e:
        assert str(e)
        return
    m = Megabyte(cfg)
    ids = torch.randint(0, 256, (2, T_MAX))
    out = m(ids, return_loss=True)
    assert out.lm_logits.shape == (2, T_MAX, 300) and torch.isfinite(out.loss)


# ----------------------------------------------------------------------------------------------
# the command line

@pytest.mark.parametrize("extra, message", [
    (["--patch-size", "0"], "P must be an int >= 1"),
    (["--d-global", "3", "--patch-size", "1"], "divisible by g_nheads"),
    (["--d-local", "10", "--l-heads", "4"], "divisible by l_nheads"),
    (["--seq-len", "2", "--patch-size", "4"], "T_MAX=2 must be at least the patch size"),
    (["--heldout-frac", "1.5"], "--heldout-frac"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--save-every", "-1"], "--save-every"),
    (["--device", "bogus"], "--device"),
    (["--lr", "nan"], "--lr"),
])
def test_absurd_train_arguments_are_usage_errors(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "o"), *TINY, *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_binary_and_non_utf8_corpus_trains(tmp_path, capsys):
    f = tmp_path / "noise.bin"
    f.write_bytes(bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0)).tolist())
                  + b"\xff\xfe\x00\xc3\x28" * 20)
    assert main(["train", "--data", str(f), "--out", str(tmp_path / "o"), *TINY]) == 0
    assert "--- sample" in capsys.readouterr().out


def test_unreadable_files_in_a_folder_are_skipped_through_the_cli(tmp_path, capsys, monkeypatch):
    d = tmp_path / "c"
    d.mkdir()
    for i in range(5):
        (d / f"f{i}.txt").write_bytes(b"hello world, bytes are bytes\n" * 30)
    (d / "locked.txt").write_bytes(b"secret" * 100)
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.warns(UserWarning, match="unreadable"):
        assert main(["train", "--data", str(d), "--out", str(tmp_path / "o"), *TINY]) == 0
    assert "skipped 1 unreadable file" in capsys.readouterr().out


def test_diverging_loss_stops_cleanly_and_keeps_the_last_checkpoint(tmp_path, capsys):
    f = tmp_path / "c.txt"
    f.write_bytes(b"abcdefgh" * 400)
    out = tmp_path / "o"
    assert main(["train", "--data", str(f), "--out", str(out), *TINY]) == 0
    before = (out / ckpt.STATE).read_bytes()
    weights = (out / "model.safetensors").read_bytes()
    args = [*TINY, "--lr", "1e30", "--resume"]
    args[args.index("--steps") + 1] = "50"
    assert main(["train", "--data", str(f), "--out", str(out), *args, "--save-every", "0"]) == 1
    err = capsys.readouterr().err
    assert "loss became" in err and "Traceback" not in err
    assert (out / ckpt.STATE).read_bytes() == before and (out / "model.safetensors").read_bytes() == weights
    assert ckpt.load_state(out / ckpt.STATE)["step"] == 3
