"""Causal attention: flash attention for the global model, packed attention for the local model."""
from __future__ import annotations

import torch

from . import reference
from ._validate import check_float, check_same_device, check_same_dtype
from .backends import resolve_backend

IMPLS = {"reference": reference.causal_attention}


def check_causal_attention_args(q, k, v, alibi_slopes, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, ndim=4)
    check_same_device(q=q, k=k, v=v, alibi_slopes=alibi_slopes)
    check_same_dtype(q=q, k=k, v=v)
    B, Hq, N, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Nk, dk = k.shape
    if (Bk, Nk, dk) != (B, N, d):
        raise ValueError(f"k must have shape (B={B}, Hkv, N={N}, d={d}) like q, got {tuple(k.shape)}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"the number of query heads Hq={Hq} must be a multiple of the key/value heads Hkv={Hkv}")
    if alibi_slopes is not None:
        check_float("alibi_slopes", alibi_slopes, ndim=1)
        if alibi_slopes.shape[0] != Hq:
            raise ValueError(f"alibi_slopes must have shape (Hq={Hq},), got {tuple(alibi_slopes.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = "auto",
) -> torch.Tensor:
    """Causal attention, q (B, Hq, N, d), k/v (B, Hkv, N, d) -> (B, Hq, N, d).

    ``o_i = sum_{j<=i} softmax_j(scale * q_i·k_j - slope_h * (i - j)) v_j``; Hkv divides Hq
    (grouped-query; Hkv = 1 is multi-query). See :func:`megabyte_kernels.reference.causal_attention`.
    """
    check_causal_attention_args(q, k, v, alibi_slopes, scale)
    impl = resolve_backend(backend, q.device, IMPLS, "causal_attention")
    return impl(q, k, v, alibi_slopes=alibi_slopes, scale=scale)
