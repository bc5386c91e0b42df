"""Held-out bits per byte: the plain score, strided inference, and ``megabyte eval``.

Bits per byte of the model = mean cross entropy in nats over every held-out byte / ln 2, with the
held-out bytes cut into consecutive non-overlapping windows of ``seq_len`` (each window starts
without context), the same bytes the baselines are computed on (:func:`evaluate`; the training
loop calls it every ``--eval-every`` steps and at the end).

Strided evaluation (MEGABYTE paper, §4.3 / Table 11): two passes offset by P/2. Within a patch
MEGABYTE predicts the first bytes better than the last ones. Strided inference scores the
held-out bytes twice, with windows starting at byte 0 (pass A, the windows of :func:`evaluate`)
and with windows starting at byte ``P // 2`` (pass B), and takes each byte's loss from the pass
in which it sits earlier in its patch: for even P and windows that are a multiple of P, the
first half of every patch comes from pass A and the second half from pass B. The first
``P // 2`` bytes, which pass B does not cover, come from pass A.

Each pass is ordinary causal scoring of windows, so every byte's loss still depends only on the
bytes before it (and itself, the target); choosing per byte between two such passes keeps that
(``tests/model/test_generation_cli.py`` checks it by perturbing later bytes).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import baselines
from .checkpoint import CheckpointError
from .data import eval_windows, load_corpus
from .distributed import pick_device, setup_threads
from .model import Megabyte
from .reporting import baseline_rows, print_table

LN2 = math.log(2.0)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch_size: int, device, *, autocast=None,
             loss_chunk: int | None = None) -> float:
    """Held-out bits per byte: every byte of ``data`` scored once (see the module docstring).

    ``autocast``: a context manager to run the forward in (bf16 training); ``loss_chunk``: score
    through the chunked head (no (B, T, V) logits; long sequences)."""
    was_training = model.training
    model.eval()
    total_nats, total_bytes = 0.0, 0
    kw = {"loss_chunk": loss_chunk} if loss_chunk else {}
    for ids in eval_windows(data, seq_len, batch_size):
        ids = ids.to(device)
        with (autocast if autocast is not None else contextlib.nullcontext()):
            out = model(ids, return_loss=True, **kw)
        total_nats += float(out.loss) * ids.numel()  # all targets are real bytes (no pad)
        total_bytes += ids.numel()
    model.train(was_training)
    return total_nats / total_bytes / LN2


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
    """Held-out bits per byte with strided inference (same arguments as :func:`evaluate`)."""
    nll = strided_nll(model, data, seq_len, batch_size, device)
    return float(nll.mean()) / LN2


# ----------------------------------------------------------------------------------------------
# `megabyte eval`


def _load_checkpoint(args, device: torch.device) -> Megabyte:
    """``--checkpoint``'s model on ``device``; a clear error for a folder that is not one."""
    ckpt_dir = Path(args.checkpoint)
    if not (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {str(ckpt_dir)!r}: no config.json there (not a checkpoint folder)")
    try:
        return Megabyte.from_pretrained(str(ckpt_dir), backend=args.backend).to(device)
    except ValueError as e:  # truncated / corrupted weights or config: a clear message, no traceback
        raise CheckpointError(str(e)) from None


def _heldout_of(args, spec: dict):
    """The held-out bytes to score: ``--data`` and its options, else those the checkpoint was
    trained on (``config.extra["train"]``, written by ``megabyte train``)."""
    data = args.data if args.data is not None else spec.get("data")
    if data is not None and args.data is None and not Path(data).exists():
        raise FileNotFoundError(f"the checkpoint was trained on {data!r}, which no longer exists; pass --data")
    eval_bytes = args.eval_bytes or spec.get("eval_bytes") or 64 * 1024
    return load_corpus(data, max_bytes=args.max_bytes or spec.get("max_bytes") or 4 * 1024 * 1024,
                       eval_bytes=eval_bytes, heldout_frac=args.heldout_frac or spec.get("heldout_frac") or 0.05,
                       min_len=1)


def run_eval(args) -> dict:
    """``megabyte eval``: held-out bits per byte of a checkpoint (and the baselines)."""
    t_start = time.perf_counter()
    setup_threads(args.threads)
    device = pick_device(args.device)
    model = _load_checkpoint(args, device)
    spec = dict((model.config.extra or {}).get("train", {}))
    corpus = _heldout_of(args, spec)
    print(f"data: {corpus.describe()}")
    seq_len = min(args.seq_len or spec.get("seq_len") or model.config.T_MAX, model.config.T_MAX)
    score, how = evaluate, ""
    if getattr(args, "strided", False):  # megabyte eval --strided
        score = evaluate_strided
        how = f", strided (two passes offset by P/2={model.config.P // 2})"
    bpb = score(model, corpus.heldout, seq_len, args.eval_batch_size, device)
    base = baselines.all_baselines(corpus.train, corpus.heldout)
    print(f"held-out bits per byte (log2) on the same {len(corpus.heldout):,} bytes, windows of {seq_len}{how}:")
    print_table([
        ("MEGABYTE", f"{bpb:.3f} bpb  ({Path(args.checkpoint)})"),
        *baseline_rows(base),
        ("wall time", f"{time.perf_counter() - t_start:.1f} s"),
    ])
    return {"heldout_bpb": bpb, **base}
