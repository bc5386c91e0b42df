"""Baselines in bits per byte, computed on the same held-out bytes the model is scored on.

- ``order0_bpb(train, heldout)``: cross entropy of the held-out bytes under the byte frequencies
  of the *training* bytes (an order-0, i.e. context-free, model fitted on train), add-``alpha``
  smoothed over the 256 byte values so an unseen byte costs finite bits. This is the number a
  byte model must beat to show it learned more than byte frequencies.
- ``entropy_bpb(data)``: the empirical order-0 entropy of ``data`` itself (no smoothing).
- ``gzip_bpb`` / ``lzma_bpb``: compressed size of the held-out bytes *alone*, in bits per input
  byte (``gzip -9``: ``compresslevel=9``; ``lzma``: ``preset=9 | PRESET_EXTREME``, xz container),
  headers included. The compressors see no training bytes, unlike the two models above.
"""
from __future__ import annotations

import gzip
import lzma
import math

import torch


def _as_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).to(torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)


def _as_bytes(data) -> bytes:
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).to(torch.uint8).numpy().tobytes()
    return bytes(data)


def byte_counts(data) -> torch.Tensor:
    """(256,) float64 counts of each byte value."""
    return torch.bincount(_as_tensor(data).long(), minlength=256).double()


def entropy_bpb(data) -> float:
    """Empirical order-0 entropy of ``data`` in bits per byte: -sum p log2 p."""
    c = byte_counts(data)
    n = c.sum()
    if n == 0:
        raise ValueError("entropy of an empty byte string")
    p = c[c > 0] / n
    return float(-(p * torch.log2(p)).sum())


def order0_bpb(train, heldout, alpha: float = 1.0) -> float:
    """Cross entropy (bits/byte) of ``heldout`` under train's byte frequencies, add-alpha smoothed."""
    c_tr = byte_counts(train)
    c_ho = byte_counts(heldout)
    if c_ho.sum() == 0:
        raise ValueError("order-0 cross entropy of an empty held-out set")
    p = (c_tr + alpha) / (c_tr.sum() + 256 * alpha)
    if alpha == 0 and bool(((c_ho > 0) & (p == 0)).any()):
        return math.inf
    mask = c_ho > 0
    return float(-(c_ho[mask] * torch.log2(p[mask])).sum() / c_ho.sum())


def gzip_bpb(data) -> float:
    """``gzip -9`` size of ``data`` in bits per byte (gzip header and trailer included)."""
    b = _as_bytes(data)
    if not b:
        raise ValueError("gzip bits per byte of an empty byte string")
    return 8.0 * len(gzip.compress(b, compresslevel=9, mtime=0)) / len(b)


def lzma_bpb(data) -> float:
    """``xz -9e`` (lzma preset 9 extreme) size of ``data`` in bits per byte (container included)."""
    b = _as_bytes(data)
    if not b:
        raise ValueError("lzma bits per byte of an empty byte string")
    return 8.0 * len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)) / len(b)


def all_baselines(train, heldout) -> dict[str, float]:
    return {
        "order0_bpb": order0_bpb(train, heldout),
        "heldout_entropy_bpb": entropy_bpb(heldout),
        "gzip_bpb": gzip_bpb(heldout),
        "lzma_bpb": lzma_bpb(heldout),
    }
