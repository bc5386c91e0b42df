"""Strided evaluation (MEGABYTE paper, §4.3 / Table 11): two passes offset by P/2.

Within a patch MEGABYTE predicts the first bytes better than the last ones. Strided inference
scores the held-out bytes twice, with windows starting at byte 0 (pass A, the windows of
``megabyte.train.evaluate``) and with windows starting at byte ``P // 2`` (pass B), and takes each
byte's loss from the pass in which it sits earlier in its patch: for even P and windows that are
a multiple of P, the first half of every patch comes from pass A and the second half from pass B.
The first ``P // 2`` bytes, which pass B does not cover, come from pass A.

Each pass is ordinary causal scoring of windows, so every byte's loss still depends only on the
bytes before it (and itself, the target); choosing per byte between two such passes keeps that
(``tests/model/test_generation_cli.py`` checks it by perturbing later bytes).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import eval_windows

LN2 = math.log(2.0)


@torch.no_grad()
def per_byte_nll(model, data: torch.Tensor, seq_len: int, batch_size: int, device="cpu",
                 offset: int = 0) -> torch.Tensor:
    """Loss (nats, float64) of every byte of ``data`` scored in consecutive windows of ``seq_len``
    starting at ``offset`` (``megabyte.data.eval_windows`` of ``data[offset:]``); NaN before ``offset``."""
    out = torch.full((len(data),), float("nan"), dtype=torch.float64)
    pos = offset
    for ids in eval_windows(data[offset:], seq_len, batch_size):
        ids = ids.to(device)
        logits = model(ids).lm_logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
        out[pos:pos + ids.numel()] = nll.double().cpu()
        pos += ids.numel()
    return out


def _slot(n: int, offset: int, seq_len: int, P: int) -> torch.Tensor:
    """Slot inside its patch of each byte of a pass whose windows start at ``offset``."""
    t = torch.arange(n) - offset
    return (t % seq_len) % P


@torch.no_grad()
def strided_nll(model, data: torch.Tensor, seq_len: int, batch_size: int, device="cpu") -> torch.Tensor:
    """Per-byte loss (nats, float64) by strided inference: each byte from the pass (offset 0 or
    P // 2) in which its slot inside the patch is smaller; ties and bytes before P // 2 from pass A."""
    was = model.training
    model.eval()
    try:
        P = model.config.P
        off = P // 2
        a = per_byte_nll(model, data, seq_len, batch_size, device, 0)
        if off == 0 or len(data) <= off:
            return a
        b = per_byte_nll(model, data, seq_len, batch_size, device, off)
    finally:
        model.train(was)
    n = len(data)
    use_b = (_slot(n, off, seq_len, P) < _slot(n, 0, seq_len, P)) & (torch.arange(n) >= off)
    return torch.where(use_b, b, a)


def evaluate_strided(model, data: torch.Tensor, seq_len: int, batch_size: int, device="cpu") -> float:
    """Held-out bits per byte with strided inference (same arguments as ``megabyte.train.evaluate``)."""
    nll = strided_nll(model, data, seq_len, batch_size, device)
    return float(nll.mean()) / LN2
