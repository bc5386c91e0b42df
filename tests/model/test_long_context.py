"""Long context: the chunked head + loss (``Megabyte.forward(..., loss_chunk=N)``) matches the plain
one, never keeps (T, V) logits, and a training step at T = 65,536 runs on CPU with a tiny model."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megabyte.cli import main
from megabyte.config import MegabyteConfig
from megabyte.model import Megabyte, chunked_linear_cross_entropy


def _tiny(T_MAX: int, P: int = 4, **kw) -> Megabyte:
    torch.manual_seed(0)
    cfg = MegabyteConfig(V=512, P=P, D_G=8, D_L=16, T_MAX=T_MAX, g_nheads=2, l_nheads=2, g_nlayers=1,
                         l_nlayers=1, backend="reference", **kw)
    return Megabyte(cfg)


@pytest.mark.parametrize("tie_head", [False, True])
def test_chunked_loss_matches_the_plain_loss_and_its_gradients(tie_head):
    m = _tiny(64, tie_head=tie_head).double()
    ids = torch.randint(0, 256, (3, 37))
    ids[0, -5:] = m.config.pad_id  # ignored targets
    ref = m(ids, return_loss=True)
    ref.loss.backward()
    g_ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    out = m(ids, return_loss=True, loss_chunk=10)  # chunks that do not divide B*T = 111
    assert out.lm_logits is None and out.loss.dtype == torch.float32
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-5, atol=1e-7, msg=n)
    # without return_loss the argument changes nothing
    assert torch.equal(m(ids, loss_chunk=10).lm_logits, ref.lm_logits)
    with pytest.raises(ValueError, match="loss_chunk"):
        m(ids, return_loss=True, loss_chunk=0)


def test_chunked_cross_entropy_function():
    torch.manual_seed(1)
    x = torch.randn(50, 12, requires_grad=True)
    w = torch.randn(7, 12, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    t = torch.randint(0, 7, (50,))
    t[::5] = 3
    loss = chunked_linear_cross_entropy(x, w, b, t, ignore_index=3, chunk=8)
    (loss * 2).backward()  # the output's gradient scales the saved ones
    got = [x.grad.clone(), w.grad.clone(), b.grad.clone()]
    for p in (x, w, b):
        p.grad = None
    ref = F.cross_entropy(F.linear(x, w, b), t, ignore_index=3)
    (ref * 2).backward()
    torch.testing.assert_close(loss, ref)
    for g, p in zip(got, (x, w, b)):
        torch.testing.assert_close(g, p.grad)
    with torch.no_grad():  # no gradient work without grad mode
        torch.testing.assert_close(chunked_linear_cross_entropy(x, w, None, t, chunk=64),
                                   F.cross_entropy(F.linear(x, w), t))


@pytest.mark.parametrize("checkpointing", [True, False])
def test_step_at_t_65536_saves_nothing_quadratic_or_of_size_t_times_v(checkpointing):
    T = 65_536
    m = _tiny(T, P=16)
    m.set_checkpointing(checkpointing, checkpointing)
    m.train()
    ids = torch.randint(0, 256, (1, T))
    largest = [0]

    def pack(t):
        largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(ids, return_loss=True, loss_chunk=4096).loss
    loss.backward()
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(512)) < 0.5
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    # linear in T: the largest tensor kept for backward is a few values per byte, far from T*V =
    # 512*T (the logits) or K*K (global attention scores): with checkpointing the gradient of the
    # head's input (D_L = 16 per byte), without it the local feed-forward's hidden (4*D_L per byte)
    assert largest[0] <= (16 if checkpointing else 64) * T, largest[0]


def test_train_cli_at_t_65536(tmp_path, capsys):
    data = tmp_path / "long.bin"
    data.write_bytes(bytes(range(256)) * 300)  # 76,800 bytes: one window of 65,536 + held-out
    out = tmp_path / "o"
    assert main(["train", "--data", str(data), "--out", str(out), "--seq-len", "65536", "--batch-size", "1",
                 "--steps", "2", "--patch-size", "16", "--d-global", "8", "--d-local", "16", "--g-layers", "1",
                 "--l-layers", "1", "--g-heads", "2", "--l-heads", "2", "--warmup", "1", "--eval-every", "0",
                 "--log-every", "1", "--sample-bytes", "0", "--threads", "1", "--backend", "reference",
                 "--time-budget", "0", "--loss-chunk", "4096", "--checkpointing", "--heldout-frac", "0.1",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    final = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    assert final["steps"] == 2 and final["train_bytes_seen"] == 2 * 65_536
    assert math.isfinite(final["heldout_bpb"])


def test_bf16_autocast_with_the_chunked_loss_trains(tmp_path, capsys):
    """--precision bf16 (the GPU default) through the whole loop, here with CPU autocast."""
    data = tmp_path / "c.txt"
    data.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 100)
    out = tmp_path / "o"
    assert main(["train", "--data", str(data), "--out", str(out), "--seq-len", "64", "--batch-size", "2",
                 "--steps", "4", "--d-global", "16", "--d-local", "32", "--g-layers", "1", "--l-layers", "1",
                 "--g-heads", "2", "--l-heads", "2", "--warmup", "1", "--eval-every", "2", "--log-every", "1",
                 "--sample-bytes", "4", "--threads", "1", "--backend", "reference", "--time-budget", "0",
                 "--precision", "bf16", "--loss-chunk", "50", "--device", "cpu"]) == 0
    assert "bf16 autocast" in capsys.readouterr().out
    recs = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert recs[0]["precision"] == "bf16"
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    # it starts at the order-0 model (the head bias at the byte log frequencies) and goes down
    order0_nats = recs[-1]["order0_bpb"] * math.log(2)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    assert abs(losses[0] - order0_nats) < 0.5 and losses[-1] < losses[0], (losses, order0_nats)
    assert math.isfinite(recs[-1]["heldout_bpb"])
