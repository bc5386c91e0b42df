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


# Sequences up to this length take the batched-matmul path of backend="native" on CPU; longer
# ones ATen's fused attention. Measured fwd+bwd, fp32, 1 thread of the 2-core CPU machine, best of
# 15 (ATen fused / batched matmul), multi-query: (B, H, N, d) = (512, 2, 8, 32): 6.2 / 3.1 ms;
# (512, 4, 16, 16) GQA 2: 18.4 / 7.2; (256, 8, 32, 32): 57 / 37; (64, 4, 64, 64): 33 / 26;
# (4, 4, 128, 64): 6.7 / 5.6; (16, 4, 256, 64): 74 / 72; (1, 4, 512, 64): 18 / 24.
# `python -m benchmarks.bench_causal_attention --quick` times the `native` rows against SDPA.
CPU_MATMUL_MAX_N = 128


def _native_causal_attention(q, k, v, *, alibi_slopes=None, scale=None) -> torch.Tensor:
    """backend="native" (CPU): the same math as the reference, laid out for short sequences.

    ATen's fused CPU attention works in blocks of rows and pays a fixed cost per (batch, head);
    the local model runs B*K sequences of P <= 64 bytes, where that cost dominates. For
    N <= ``CPU_MATMUL_MAX_N`` the G = Hq / Hkv query heads of a key/value head are stacked into
    one (G*N, d) matrix, so that with k, v never expanded:

        s = baddbmm(bias, q_g, k^T, alpha=scale)   (B*Hkv, G*N, N), bias = causal -inf (+ ALiBi)
        o = softmax(s) @ v                          (B*Hkv, G*N, d) -> (B, Hq, N, d)

    16-bit inputs are computed in fp32. Longer sequences go to the reference (fused, O(N) memory).
    """
    B, Hq, N, d = q.shape
    if N > CPU_MATMUL_MAX_N:  # (resolve_backend admits CPU tensors only to "native")
        return reference.causal_attention(q, k, v, alibi_slopes=alibi_slopes, scale=scale)
    Hkv = k.shape[1]
    G = Hq // Hkv
    dt = q.dtype
    work = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    if alibi_slopes is None:  # (1, G*N, N): the causal mask, once per stacked head
        i = torch.arange(N, device=q.device)
        bias = torch.zeros(N, N, dtype=work, device=q.device).masked_fill_(i[None, :] > i[:, None], float("-inf"))
        bias = bias.repeat(G, 1)[None]
    else:  # (Hkv, G*N, N), or (B*Hkv, G*N, N) when it cannot broadcast over the batch
        bias = reference.alibi_bias(alibi_slopes, N, work).reshape(Hkv, G * N, N)
        bias = bias.repeat(B, 1, 1) if Hkv > 1 else bias
    qg = q.to(work).reshape(B * Hkv, G * N, d)
    s = torch.baddbmm(bias, qg, k.to(work).reshape(B * Hkv, N, d).transpose(1, 2),
                      alpha=d ** -0.5 if scale is None else scale)
    o = torch.bmm(torch.softmax(s, dim=-1), v.to(work).reshape(B * Hkv, N, d))
    return o.view(B, Hq, N, d).to(dt)


# backend="native" (the csrc/ CPU ops) has no attention kernel in csrc/: it composes ATen ops,
# laid out for the local model's short sequences (above); long ones run the reference (ATen's
# fused CPU attention).
IMPLS = {"reference": reference.causal_attention, "triton": _triton_causal_attention,
         "native": _native_causal_attention}
