"""`megabyte generate` (streaming from a checkpoint) and strided evaluation (`megabyte eval --strided`)."""
from __future__ import annotations

import io
import math

import pytest
import torch

from megabyte import Megabyte, MegabyteConfig
from megabyte.cli import build_parser, main
from megabyte.evaluate import evaluate_strided, per_byte_nll, strided_nll
from megabyte.generation import generate_stream
from megabyte.sample import run_generate
from megabyte.train import evaluate

from .test_model import TINY, make

TRAIN_ARGS = ["--steps", "4", "--seq-len", "32", "--batch-size", "4", "--d-global", "16", "--d-local", "32",
              "--g-layers", "1", "--l-layers", "1", "--g-heads", "2", "--l-heads", "2", "--warmup", "1",
              "--eval-every", "0", "--log-every", "2", "--sample-bytes", "0", "--threads", "1", "--device", "cpu"]


class Recorder(io.StringIO):
    """A text stream that remembers each write (to see that output is streamed)."""

    def __init__(self, encoding="utf-8"):
        super().__init__()
        self.writes = []
        self._enc = encoding

    @property
    def encoding(self):
        return self._enc

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def _write_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    words = ["def", "return", "self", "import", "class", "if", "else", "for", "x", "=", "(", ")", ":"]
    for i in range(8):
        (folder / f"m{i}.py").write_text(" ".join(words[(i * 7 + j) % len(words)] for j in range(150)) + "\n")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint written by `megabyte train` (T_MAX = seq_len = 32, learned positions)."""
    tmp = tmp_path_factory.mktemp("gen")
    data = _write_corpus(tmp / "corpus")
    out = tmp / "ckpt"
    assert main(["train", "--data", str(data), "--out", str(out), *TRAIN_ARGS]) == 0
    return out


def _args(*argv):
    return build_parser().parse_args(["generate", *argv])


def test_generate_streams_from_a_train_checkpoint(checkpoint, capsys):
    capsys.readouterr()
    rec = Recorder()
    a = _args("--checkpoint", str(checkpoint), "--prompt", "def ", "--max-bytes", "20", "--seed", "3",
              "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--threads", "1")
    assert run_generate(a, stream=rec) == 0
    model = Megabyte.from_pretrained(str(checkpoint)).eval()
    ids = list(generate_stream(model, b"def ", 20, temperature=0.9, top_k=40, top_p=0.95, seed=3,
                               eos_id=model.config.eos_id))
    cut = ids.index(model.config.eos_id) if model.config.eos_id in ids else len(ids)
    expected = "def " + bytes(i for i in ids[:cut] if i < 256).decode("utf-8", errors="replace") + "\n"
    assert rec.getvalue() == expected
    assert len(rec.writes) > 3  # written piece by piece, not at the end
    # through main(): stdout, same text
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "def ", "--max-bytes", "20",
                 "--seed", "3", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--threads", "1"]) == 0
    assert capsys.readouterr().out == expected


def test_generate_past_t_max_of_a_learned_checkpoint(checkpoint):
    rec = Recorder()
    a = _args("--checkpoint", str(checkpoint), "--prompt", "x" * 40, "--max-bytes", "70", "--temperature", "0",
              "--threads", "1")
    assert run_generate(a, stream=rec) == 0  # T_MAX = 32: continues from the last half-window
    assert rec.getvalue().startswith("x" * 40)


def test_invalid_utf8_is_replaced_never_crashes(tmp_path):
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig(**TINY))
    with torch.no_grad():  # greedy always picks 0xFF, then 0xC3 (a lead byte with no continuation)
        model.to_logits.bias.zero_()
        model.to_logits.bias[0xFF] = 100.0
    model.save_pretrained(tmp_path)
    rec = Recorder()
    assert run_generate(_args("--checkpoint", str(tmp_path), "--prompt", "é", "--max-bytes", "5",
                              "--temperature", "0"), stream=rec) == 0
    assert rec.getvalue() == "é" + "\ufffd" * 5 + "\n"
    ascii_out = Recorder(encoding="ascii")  # a terminal that cannot show U+FFFD
    assert run_generate(_args("--checkpoint", str(tmp_path), "--prompt", "é", "--max-bytes", "3",
                              "--temperature", "0"), stream=ascii_out) == 0
    assert ascii_out.getvalue() == "????\n"
    with torch.no_grad():  # a truncated multi-byte sequence at the very end
        model.to_logits.bias[0xFF] = 0.0
        model.to_logits.bias[0xC3] = 100.0
    model.save_pretrained(tmp_path)
    rec = Recorder()
    assert run_generate(_args("--checkpoint", str(tmp_path), "--max-bytes", "1", "--temperature", "0"),
                        stream=rec) == 0
    assert rec.getvalue() == "\ufffd\n"


def test_generate_prints_only_bytes_unless_all_ids(tmp_path):
    """A checkpoint whose greedy choice is the special id 260: by default the command samples the
    best *byte* every step and prints max-bytes of them; with --all-ids it samples 260 and prints none."""
    torch.manual_seed(0)
    model = Megabyte(MegabyteConfig(**TINY))  # V = 264
    with torch.no_grad():
        model.to_logits.bias[260] = 100.0
        model.to_logits.bias[ord("a")] = 50.0
    model.save_pretrained(tmp_path)
    rec = Recorder()
    assert run_generate(_args("--checkpoint", str(tmp_path), "--prompt", "é", "--max-bytes", "6",
                              "--temperature", "0"), stream=rec) == 0
    assert rec.getvalue() == "é" + "a" * 6 + "\n"
    rec = Recorder()
    assert run_generate(_args("--checkpoint", str(tmp_path), "--prompt", "é", "--max-bytes", "6",
                              "--temperature", "0", "--all-ids"), stream=rec) == 0
    assert rec.getvalue() == "é\n"


def test_generate_from_an_untrained_model_samples_bytes(tmp_path):
    """The untrained V=512 model (initializer_range 0.3) of the issue: every sampled id is a byte or EOS."""
    model = make(V=512)
    model.save_pretrained(tmp_path)
    argv = ("--checkpoint", str(tmp_path), "--prompt", "hi", "--max-bytes", "24", "--seed", "0", "--threads", "1")
    ids = list(generate_stream(model, b"hi", 24, seed=0, eos_id=model.config.eos_id))
    assert all(i < 256 for i in ids[:-1]) and (ids[-1] < 256 or ids[-1] == model.config.eos_id)
    rec = Recorder()
    assert run_generate(_args(*argv), stream=rec) == 0
    assert rec.getvalue() == "hi" + bytes(i for i in ids if i < 256).decode("utf-8", errors="replace") + "\n"
    all_ids = list(generate_stream(model, b"hi", 24, seed=0, eos_id=model.config.eos_id, vocab="all"))
    assert any(i >= 256 and i != model.config.eos_id for i in all_ids)  # what --all-ids can sample
    rec_all = Recorder()
    assert run_generate(_args(*argv, "--all-ids"), stream=rec_all) == 0
    cut = all_ids.index(model.config.eos_id) if model.config.eos_id in all_ids else len(all_ids)
    assert rec_all.getvalue() == "hi" + bytes(i for i in all_ids[:cut] if i < 256).decode(
        "utf-8", errors="replace") + "\n"
    assert rec_all.getvalue() != rec.getvalue()


def test_generate_clear_errors(tmp_path, checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert main(["generate", "--checkpoint", str(checkpoint), "--top-p", "2"]) == 2
    assert main(["generate", "--checkpoint", str(checkpoint), "--max-bytes", "-1"]) == 2
    assert "error" in capsys.readouterr().err


def test_eval_strided_command(checkpoint, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--strided", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "strided (two passes offset by P/2=2)" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("MEGABYTE"))
    assert 0 < float(line.split()[1]) < 20


# ----------------------------------------------------------------------------------------------
# strided evaluation


@pytest.mark.parametrize("kw, seq_len", [({}, 16), (dict(P=3, g_nheads=3, T_MAX=33), 14), (dict(variant="in_action"), 16)])
def test_strided_is_causal(kw, seq_len):
    """The strided loss of byte t depends only on bytes <= t: changing later bytes changes nothing."""
    model = make(**kw)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (53,), generator=g, dtype=torch.uint8)
    base = strided_nll(model, data, seq_len, 4)
    assert torch.isfinite(base).all()
    for t in (0, 1, 5, 17, 30, 52):
        other = data.clone()
        other[t + 1:] = torch.randint(0, 256, (len(data) - t - 1,), generator=g, dtype=torch.uint8)
        out = strided_nll(model, other, seq_len, 4)
        assert torch.equal(out[:t + 1], base[:t + 1]), f"byte <= {t} saw a later byte"
        if t + 1 < len(data):
            assert not torch.equal(out[t + 1:], base[t + 1:])


def test_strided_takes_the_first_half_of_each_patch_from_each_pass():
    model = make()  # P = 4
    data = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    a = per_byte_nll(model, data, 16, 4, offset=0)
    b = per_byte_nll(model, data, 16, 4, offset=2)
    s = strided_nll(model, data, 16, 4)
    t = torch.arange(64)
    first_half = t % 4 < 2
    assert torch.equal(s[first_half], a[first_half])
    assert torch.equal(s[~first_half], b[~first_half])
    assert torch.isnan(b[:2]).all() and not torch.equal(a, b.nan_to_num(0))
    # the plain pass A is exactly `megabyte.train.evaluate`
    assert math.isclose(float(a.mean()) / math.log(2), evaluate(model, data, 16, 4, "cpu"), rel_tol=1e-6)


def test_strided_with_patch_size_one_is_plain_evaluation():
    model = make(P=1, D_G=16)
    data = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    assert math.isclose(evaluate_strided(model, data, 16, 4), evaluate(model, data, 16, 4, "cpu"), rel_tol=1e-6)
