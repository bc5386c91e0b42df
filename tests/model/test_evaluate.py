"""The four inference methods of the MEGABYTE paper's Table 11 (`megabyte eval --method ...`):
every byte scored exactly once, sliding with stride = window is basic, context helps a trained
model, and the command's table and usage errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megabyte import Megabyte
from megabyte.cli import main
from megabyte.data import eval_windows
from megabyte.evaluate import (METHODS, EvalArgumentError, default_stride, score_method, window_plan)
from megabyte.train import evaluate

from .test_model import make

LENGTHS = (1, 7, 31, 33, 50, 97, 131)  # none a multiple of the windows (32, 14) or of P (4, 3)
SHAPES = ((32, 4), (14, 3))  # (seq_len, P)


def _n_windows(n: int, seq_len: int, stride: int, offset: int = 0) -> int:
    """Windows a plan needs over data[offset:n]: one, then one per ``stride`` bytes left over."""
    m = n - offset
    return 0 if m <= 0 else 1 + max(0, math.ceil((m - seq_len) / stride))


def _strides(seq_len: int, P: int) -> list[int]:
    return sorted({P, default_stride(seq_len, P), 5, seq_len})  # 1 patch, the default, not a multiple of P, the window


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# the plan


@pytest.mark.parametrize("seq_len, P", SHAPES)
@pytest.mark.parametrize("n", LENGTHS)
def test_plan_scores_every_byte_once_with_the_longest_context(n, seq_len, P):
    for stride in _strides(seq_len, P):
        for offset in (0, P // 2):
            plan = window_plan(n, seq_len, stride, offset)
            count = torch.zeros(n, dtype=torch.int64)
            for w in plan:
                assert offset <= w.start <= w.score_from < w.end <= n and w.end - w.start <= seq_len
                count[w.score_from:w.end] += 1
            assert count[offset:].eq(1).all() and count[:offset].eq(0).all(), (n, seq_len, stride, offset)
            assert len(plan) == _n_windows(n, seq_len, stride, offset)
            assert [w.start for w in plan] == list(range(offset, offset + stride * len(plan), stride))
            for w in plan:  # no window of the plan gives a byte more context than the one scoring it
                for t in range(w.score_from, w.end):
                    best = max(t - v.start for v in plan if v.start <= t < v.end)
                    assert t - w.start == best, (n, seq_len, stride, offset, t)


@pytest.mark.parametrize("n", LENGTHS)
def test_plan_with_stride_equal_to_the_window_is_eval_windows(n):
    plan = window_plan(n, 14, 14)
    assert all(w.score_from == w.start for w in plan)  # disjoint windows, each scoring all its bytes
    spans = [(w.start, w.end) for w in plan]
    data = torch.arange(n, dtype=torch.int64)
    expected = [(int(r[0]), int(r[-1]) + 1) for ids in eval_windows(data, 14, 3) for r in ids]
    assert spans == expected


def test_default_stride_is_half_the_window_in_whole_patches():
    assert default_stride(32, 4) == 16
    assert default_stride(14, 3) == 6  # 7 rounded down to a multiple of 3
    assert default_stride(6, 4) == 4  # at least one patch
    assert default_stride(3, 4) == 3  # at most the window


# ----------------------------------------------------------------------------------------------
# the methods on a model


@pytest.mark.parametrize("n", (7, 33, 97))
@pytest.mark.parametrize("seq_len, P", SHAPES)
def test_every_method_scores_every_byte_once(n, seq_len, P):
    model = make(P=P, g_nheads=3, T_MAX=33) if P == 3 else make()
    data = _random_bytes(n, n)
    off = P // 2
    for method in METHODS:
        for stride in _strides(seq_len, P):
            sc = score_method(model, data, method, seq_len, 4, stride=stride)
            assert sc.count.eq(1).all(), (method, stride)
            assert torch.isfinite(sc.nll).all() and sc.slot.ge(0).all() and sc.slot.lt(P).all()
            s = seq_len if method in ("basic", "strided") else stride
            passes = _n_windows(n, seq_len, s)
            if method in ("strided", "both"):  # the second pass, from byte P // 2
                passes += _n_windows(n, seq_len, s, off)
            assert sc.windows == passes, (method, stride)
            assert 1 <= sc.calls <= sc.windows


def _reference_basic_nll(model, data, seq_len, batch_size) -> torch.Tensor:
    """Basic scoring written out on its own: eval_windows, per-byte cross entropy, concatenated."""
    parts = []
    for ids in eval_windows(data, seq_len, batch_size):
        logits = model(ids).lm_logits.float()
        parts.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none").double())
    return torch.cat(parts)


@pytest.mark.parametrize("n, batch_size", [(33, 4), (97, 2), (131, 32)])
def test_stride_equal_to_the_window_is_basic_exactly(n, batch_size):
    model = make()
    data = _random_bytes(n, 7)
    with torch.no_grad():
        ref = _reference_basic_nll(model, data, 32, batch_size)
    ref_bpb = float(ref.mean()) / math.log(2)
    basic = score_method(model, data, "basic", 32, batch_size)
    sliding = score_method(model, data, "sliding", 32, batch_size, stride=32)
    assert abs(basic.bpb() - ref_bpb) <= 1e-12 and abs(sliding.bpb() - ref_bpb) <= 1e-12
    assert torch.equal(sliding.nll, ref) and sliding.windows == basic.windows == math.ceil(n / 32)
    assert math.isclose(basic.bpb(), evaluate(model, data, 32, batch_size, "cpu"), rel_tol=1e-6)
    # and both with stride = window is strided
    both = score_method(model, data, "both", 32, batch_size, stride=32)
    strided = score_method(model, data, "strided", 32, batch_size)
    assert abs(both.bpb() - strided.bpb()) <= 1e-12 and both.windows == strided.windows
    # a smaller stride really is another method (the test above could not pass by accident)
    assert abs(score_method(model, data, "sliding", 32, batch_size, stride=8).bpb() - ref_bpb) > 1e-6


def test_bad_arguments_raise_naming_them():
    with pytest.raises(EvalArgumentError, match="--stride must be between 1 and the window"):
        window_plan(10, 8, 0)
    with pytest.raises(EvalArgumentError, match=r"--stride .*\(--seq-len 8\).* got 9"):
        window_plan(10, 8, 9)
    with pytest.raises(EvalArgumentError, match="--method must be one of basic, sliding, strided, both or all"):
        score_method(make(), _random_bytes(10, 0), "bogus", 8, 1)


# ----------------------------------------------------------------------------------------------
# a trained model and `megabyte eval`

# 200 steps (about 5 s): by then the model uses its context (basic ~0.3 bpb, sliding ~0.05); after a
# few dozen it only knows byte frequencies (~3.8 bpb, order-0) and no method can differ
TRAIN = ["--steps", "200", "--seq-len", "32", "--batch-size", "8", "--patch-size", "4", "--d-global", "16",
         "--d-local", "32", "--g-layers", "1", "--l-layers", "1", "--g-heads", "2", "--l-heads", "2",
         "--warmup", "10", "--lr", "1e-2", "--eval-every", "0", "--log-every", "10", "--sample-bytes", "0",
         "--eval-bytes", "1001", "--threads", "1", "--device", "cpu", "--backend", "reference",
         "--time-budget", "0"]


def _repetitive_text() -> bytes:
    """A regular text whose next byte is predictable from the previous few words."""
    words = [b"def", b"return", b"self", b"import", b"class", b"if", b"else", b"for", b"x", b"=", b"(", b")", b":"]
    return b" ".join(words[(i * 7) % len(words)] for i in range(6000)) + b"\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The checkpoint folder of a tiny model `megabyte train` fitted for 200 steps."""
    tmp = tmp_path_factory.mktemp("evaltrain")
    data = tmp / "words.txt"
    data.write_bytes(_repetitive_text())
    out = tmp / "ckpt"
    assert main(["train", "--data", str(data), "--out", str(out), *TRAIN]) == 0
    return out


def _heldout(trained) -> torch.Tensor:
    from megabyte.data import load_corpus
    spec = Megabyte.from_pretrained(str(trained)).config.extra["train"]
    return load_corpus(spec["data"], max_bytes=spec["max_bytes"], eval_bytes=spec["eval_bytes"],
                       heldout_frac=spec["heldout_frac"], min_len=1).heldout


def test_sliding_and_both_are_no_worse_than_basic_on_a_trained_model(trained):
    """More context helps a model that learned the text. (Strided alone does not help this tiny
    model: unlike the paper's, it predicts the first byte of a patch worst, so "both" gains by
    sliding only; the claim tested is the brief's, no worse than basic.)"""
    model = Megabyte.from_pretrained(str(trained), backend="reference").eval()
    data = _heldout(trained)
    assert len(data) == 1001
    bpb = {m: score_method(model, data, m, 32, 8).bpb() for m in METHODS}
    assert bpb["basic"] < 1.0, bpb  # it did learn the text (order-0: ~3.8 bits, untrained: ~9)
    assert bpb["sliding"] <= bpb["basic"] + 1e-6, bpb
    assert bpb["both"] <= bpb["basic"] + 1e-6, bpb


def _table(out: str) -> dict:
    """``{method: (bpb, windows, model calls)}`` from the rows of `megabyte eval --method all`."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in METHODS:
            rows[cells[0]] = (float(cells[1]), int(cells[2]), int(cells[3]))
    return rows


def test_eval_method_all_prints_the_four_on_the_same_bytes(trained, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(trained), "--method", "all", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "on the same 1,001 bytes, windows of 32, P=4" in out and "model calls" in out
    rows = _table(out)
    assert list(rows) == list(METHODS), out
    n, off = 1001, 2
    expected = {"basic": _n_windows(n, 32, 32), "sliding": _n_windows(n, 32, 16),
                "strided": _n_windows(n, 32, 32) + _n_windows(n, 32, 32, off),
                "both": _n_windows(n, 32, 16) + _n_windows(n, 32, 16, off)}
    assert {m: r[1] for m, r in rows.items()} == expected  # 32, 62, 64, 124
    assert all(0 < r[0] < 20 and 1 <= r[2] <= r[1] for r in rows.values())
    # the same figures as each method alone (basic = the default, --strided = --method strided)
    for argv, method in ((), "basic"), (("--strided",), "strided"), (("--method", "both", "--stride", "16"), "both"):
        assert main(["eval", "--checkpoint", str(trained), *argv, "--threads", "1"]) == 0
        single = capsys.readouterr().out
        line = next(ln for ln in single.splitlines() if ln.strip().startswith("MEGABYTE"))
        assert math.isclose(float(line.split()[1]), rows[method][0], abs_tol=6e-4), (method, single)
        assert f"{expected[method]} windows" in single


@pytest.mark.parametrize("argv, message", [
    (["--method", "sliding", "--stride", "0"], "--stride must be >= 1 (bytes), got 0"),
    (["--method", "all", "--stride", "-3"], "--stride must be >= 1 (bytes), got -3"),
    (["--method", "sliding", "--stride", "33"],
     "--stride must be between 1 and the window (--seq-len 32) bytes, got 33"),
    (["--method", "both", "--seq-len", "16", "--stride", "20"],
     "--stride must be between 1 and the window (--seq-len 16) bytes, got 20"),
    (["--method", "basic", "--stride", "8"], "--stride applies to --method sliding, both or all, not basic"),
    (["--strided", "--method", "sliding"], "--strided is --method strided; it contradicts --method sliding"),
])
def test_eval_bad_arguments_are_usage_errors(trained, argv, message, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(trained), *argv, "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert f"megabyte eval: error: {message}" in err and "Traceback" not in err


def test_eval_unknown_method_is_a_usage_error(trained, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--checkpoint", str(trained), "--method", "fast"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --method: invalid choice: 'fast'" in err  # argparse names the argument and the choices
    assert all(m in err.split("choose from")[1] for m in (*METHODS, "all"))
