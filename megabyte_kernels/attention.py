"""Causal attention: flash attention for the global model, packed attention for the local model.

``backend="triton"`` picks the kernel family by sequence length: N <= ``LOCAL_MAX_N`` runs the
packed block-diagonal kernel (:mod:`megabyte_kernels.local_attention`, the local model's
patches), longer sequences run flash attention (:mod:`megabyte_kernels.flash_attention`).
Both families are also public here as :func:`flash_attention` and :func:`local_attention`, for
tests and benchmarks. Triton is imported only when a Triton kernel is first used.
"""
from __future__ import annotations

import torch

from . import reference
from ._validate import check_float, check_same_device, check_same_dtype
from .backends import resolve_backend

# Sequences up to this length use the packed local kernel; it holds whole sequences in one tile
# (at most 128 rows), and at N = 64 one flash tile covers the sequence anyway.
LOCAL_MAX_N = 64


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


def _check_triton_args(q, alibi_slopes, op: str) -> None:
    resolve_backend("triton", q.device, {"triton": None}, op)
    if q.dtype == torch.float64:
        raise ValueError(f"{op}: the Triton kernels take float16, bfloat16 or float32, got float64 "
                         "(use backend='reference')")


def flash_attention(q, k, v, *, alibi_slopes=None, scale=None) -> torch.Tensor:
    """Causal attention with the Triton flash-attention kernels (any N), same contract as
    :func:`causal_attention`: q (B, Hq, N, d), k/v (B, Hkv, N, d), 16 <= d <= 256."""
    check_causal_attention_args(q, k, v, alibi_slopes, scale)
    _check_triton_args(q, alibi_slopes, "flash_attention")
    _check_head_dim(q, "flash_attention")
    from .flash_attention import flash_attention as impl

    return impl(q, k, v, alibi_slopes, scale)


def local_attention(q, k, v, *, alibi_slopes=None, scale=None) -> torch.Tensor:
    """Causal attention with the packed block-diagonal Triton kernel, for short sequences
    (N <= 128; the local model's patches), same contract as :func:`causal_attention`."""
    check_causal_attention_args(q, k, v, alibi_slopes, scale)
    _check_triton_args(q, alibi_slopes, "local_attention")
    _check_head_dim(q, "local_attention")
    from .local_attention import MAX_N, local_attention as impl

    if q.shape[2] > MAX_N:
        raise ValueError(f"local_attention packs whole sequences into one tile: N must be <= {MAX_N}, "
                         f"got N={q.shape[2]} (use flash_attention)")
    return impl(q, k, v, alibi_slopes, scale)


def _check_head_dim(q, op: str) -> None:
    d = q.shape[-1]
    if not 1 <= d <= 256:
        raise ValueError(f"{op}: the Triton kernels support head dims up to 256, got d={d}")


def _triton_causal_attention(q, k, v, *, alibi_slopes=None, scale=None) -> torch.Tensor:
    """backend="triton": the packed local kernel for N <= LOCAL_MAX_N, flash attention beyond."""
    _check_triton_args(q, alibi_slopes, "causal_attention")
    _check_head_dim(q, "causal_attention")
    if q.shape[2] <= LOCAL_MAX_N:
        from .local_attention import local_attention as impl
    else:
        from .flash_attention import flash_attention as impl
    return impl(q, k, v, alibi_slopes, scale)


# backend="native" (the csrc/ CPU ops) has no attention kernel of its own: on CPU the reference
# already runs ATen's fused CPU attention (scaled_dot_product_attention), so a native model
# uses it for attention and the csrc/ ops for the byte-level ops.
IMPLS = {"reference": reference.causal_attention, "triton": _triton_causal_attention,
         "native": reference.causal_attention}
