"""Fused op 2: global-to-local projection with the shifted local byte embedding added."""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._validate import (check_float, check_ids, check_pad_id, check_patch_size, check_same_device,
                        check_same_dtype, check_shape, check_shift, num_patches)
from . import _kernel_utils as ku
from ._triton_compat import tl, triton
from .backends import interpreting, resolve_backend
from .native import global_to_local_native


def check_global_to_local_args(global_out, ids, weight, bias, local_table, patch_size, pad_id, local_pad,
                               shift=1) -> None:
    check_patch_size(patch_size)
    check_shift(shift, patch_size)
    check_float("global_out", global_out, ndim=3)
    check_float("weight", weight, ndim=2)
    check_float("local_table", local_table, ndim=2)
    V, D_L = local_table.shape
    check_ids("ids", ids, V)
    check_pad_id(pad_id, V)
    check_same_device(global_out=global_out, ids=ids, weight=weight, bias=bias, local_table=local_table,
                      local_pad=local_pad)
    check_same_dtype(global_out=global_out, weight=weight, bias=bias, local_table=local_table, local_pad=local_pad)
    B, T = ids.shape
    K = num_patches(T, patch_size)
    if global_out.shape[0] != B or global_out.shape[1] != K or global_out.shape[2] % patch_size:
        raise ValueError(
            f"global_out must have shape (B={B}, K={K}, P*D_G) with P={patch_size} for ids of shape "
            f"{tuple(ids.shape)}, got {tuple(global_out.shape)}"
        )
    D_G = global_out.shape[2] // patch_size
    check_shape("weight", weight, (D_L, D_G))
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (D_L,))
    if local_pad is not None:
        check_float("local_pad", local_pad)
        check_shape("local_pad", local_pad, (D_L,))


def global_to_local(
    global_out: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    local_table: torch.Tensor,
    *,
    patch_size: int,
    pad_id: int,
    local_pad: torch.Tensor | None = None,
    cross_patch: bool = False,
    shift: int = 1,
    backend: str | None = "auto",
) -> torch.Tensor:
    """(B, K, P*D_G) global output -> (B*K, P, D_L) local transformer input.

    ``out[b*K+k, p] = global_out[b, k, p] @ weight.T + bias + local_table[l_ids[b, k, p]]`` with
    ``l_ids`` the ids shifted right by ``shift`` bytes (default one; 1 <= shift <= P) inside each
    patch (or across patches with ``cross_patch=True``); an N-stage model shifts by a whole child
    unit between inner stages. See :func:`megabyte_kernels.reference.global_to_local`.
    """
    check_global_to_local_args(global_out, ids, weight, bias, local_table, patch_size, pad_id, local_pad, shift)
    impl = resolve_backend(backend, global_out.device, IMPLS, "global_to_local")
    return impl(global_out, ids, weight, bias, local_table, patch_size=patch_size, pad_id=pad_id,
                local_pad=local_pad, cross_patch=cross_patch, shift=shift)


# ----------------------------------------------------------------------------------------------
# Triton backend
#
# Forward: one tiled GEMM ``out (M, D_L) = X (M, D_G) @ W^T`` with M = B*K*P, X the global
# output read in place (a contiguous (B, K, P*D_G) tensor *is* (M, D_G) row-major; W^T is read
# through W's strides). The epilogue adds the bias and gathers the shifted local byte embedding
# of each row (the shift is index arithmetic on ids, computed in the kernel), then writes once.
#
# Backward, deterministic, no atomics:
#   * dX (M, D_G) = dOut (M, D_L) @ W (D_L, D_G): the same tiled GEMM kernel, no epilogue.
#   * dW (D_L, D_G) = dOut^T @ X: a tiled A^T·B GEMM whose long M reduction is split over
#     programs with fixed boundaries; each split writes an fp32 partial, summed in fixed order.
#   * d local_table, d local_pad and db in one one-hot matmul on tensor cores (the kernel of
#     patch_embed): ``onehot(codes)^T @ dOut`` over an extended vocabulary where row V collects
#     the shifted-in slots when a local pad vector is used and a final all-ones row gives the
#     bias gradient (the column sum of dOut). Chosen over a sorted segment sum for the reasons
#     given in patch_embed: tiny V, exact 0/1 products, no sort, balanced work.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _shifted_local_id(Ids, m, T, KP, P, S, pad_id, V, stride_ib, stride_it, mask,
                      CROSS_PATCH: tl.constexpr, HAS_LOCAL_PAD: tl.constexpr):
    """l_ids of flat rows m = (b*K + k)*P + p, shifted by S bytes; V marks a shifted-in slot that
    takes local_pad."""
    b = m // KP
    t = m % KP  # = k*P + p
    if CROSS_PATCH:
        shifted_in = t < S
    else:
        shifted_in = (t % P) < S
    src = t - S
    valid = mask & ~shifted_in & (src < T)  # bytes past T are right padding: pad_id
    # widen, then select the pad: other=pad_id would be cast to the ids' dtype (uint8: 300 -> 44)
    lid = tl.load(Ids + b * stride_ib + src * stride_it, mask=valid, other=0).to(tl.int64)
    lid = tl.where(valid, lid, pad_id)
    if HAS_LOCAL_PAD:
        lid = tl.where(shifted_in, V, lid)
    return lid


def _gemm_configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


# GPU configs of the GEMM (forward and dX), per operand width; compiled by the aot tests
# (tests/kernels/test_aot.py, benchmarks/results/aot-sm90.md). Every 16-bit one runs on wgmma
# without spills on sm_90 with and without the epilogue (128x256 and 256x128 spill in the
# forward's epilogue: 64x256 and 256x64 take their place).
# fp32 (IEEE dot) tiles take twice the shared memory per element: smaller tiles, fewer stages.
MATMUL_CONFIGS_16 = _gemm_configs(((128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4),
                                   (64, 128, 64, 4, 4), (256, 64, 64, 8, 3)))
MATMUL_CONFIGS_32 = _gemm_configs(((64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)))


def _prune_by_dtype(configs, named_args, **kwargs):
    """Keep the configs made for the operands' width (the interpreter's single one stays), then
    the first alone when configs are pinned (``MEGABYTE_PIN_CONFIGS=1``)."""
    want = MATMUL_CONFIGS_32 if named_args["A"].dtype == torch.float32 else MATMUL_CONFIGS_16
    kept = [c for c in configs if any(c is w for w in want)] or configs
    return ku.prune_pinned(kept, named_args, **kwargs)


@triton.autotune(
    configs=ku.autotune_configs(MATMUL_CONFIGS_16 + MATMUL_CONFIGS_32,
                     triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
                                   num_warps=4, num_stages=1)),
    key=["N", "Kd", "EPILOGUE"],
    prune_configs_by={"early_config_prune": _prune_by_dtype},
)
@triton.jit
def _g2l_matmul_kernel(
    A, Bmat, C, Bias, Ids, Table, LocalPad,
    M, N, Kd, stride_am, stride_ak, stride_bk, stride_bn,
    T, KP, P, S, pad_id, V, stride_ib, stride_it,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, CROSS_PATCH: tl.constexpr, HAS_LOCAL_PAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = A (M, Kd) @ B (Kd, N) [+ Bias + Table[l_ids] when EPILOGUE], fp32 accumulation."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot needs tiles of at least 16")
    # grouped launch order: GROUP_M row-tiles share their B column tiles while they sit in L2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    a_ptrs = A + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = Bmat + rk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(Kd, BLOCK_K)):
        kmask = rk < Kd - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    m2 = mmask[:, None] & nmask[None, :]
    if EPILOGUE:
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        lid = _shifted_local_id(Ids, rm, T, KP, P, S, pad_id, V, stride_ib, stride_it, mmask,
                                CROSS_PATCH, HAS_LOCAL_PAD)
        in_table = lid < V
        emb = tl.load(Table + lid[:, None] * N + rn[None, :], mask=m2 & in_table[:, None], other=0.0)
        emb = emb.to(tl.float32)
        if HAS_LOCAL_PAD:
            pad = tl.load(LocalPad + rn, mask=nmask, other=0.0).to(tl.float32)
            emb = tl.where(in_table[:, None], emb, pad[None, :])
        acc += emb
    tl.store(C + rm[:, None] * N + rn[None, :], acc.to(C.dtype.element_ty), mask=m2)


@triton.jit
def _atb_kernel(
    A, Bmat, Partial, M, NA, NB, rows_per_split,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Partial[s] (NA, NB) = A[rows of s]^T @ B[rows of s] for row-major A (M, NA), B (M, NB)."""
    tl.static_assert(BLOCK_I >= 16 and BLOCK_J >= 16 and BLOCK_M >= 16, "tl.dot needs tiles of at least 16")
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    imask = ri < NA
    jmask = rj < NB
    start = pid_s.to(tl.int64) * rows_per_split
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for it in range(0, tl.cdiv(rows_per_split, BLOCK_M)):
        rm = start + it * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = (rm < M) & (rm < start + rows_per_split)
        at = tl.load(A + rm[None, :] * NA + ri[:, None], mask=imask[:, None] & mmask[None, :], other=0.0)
        b = tl.load(Bmat + rm[:, None] * NB + rj[None, :], mask=mmask[:, None] & jmask[None, :], other=0.0)
        if UPCAST:
            at = at.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(at, b, acc, input_precision=PRECISION)
    out = Partial + pid_s.to(tl.int64) * NA * NB + ri[:, None].to(tl.int64) * NB + rj[None, :]
    tl.store(out, acc, mask=imask[:, None] & jmask[None, :])


def _matmul(a: torch.Tensor, b_ptr: torch.Tensor, stride_bk: int, stride_bn: int, N: int, out_shape, *,
            epilogue=None) -> torch.Tensor:
    """(M, Kd) row-major ``a`` times B (Kd, N) given by pointer and strides -> ``out_shape``."""
    M, Kd = a.shape
    c = ku.alloc(out_shape, a.dtype, a.device)
    ep = epilogue or {}
    ids = ep.get("ids")
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _g2l_matmul_kernel[grid](
        a, b_ptr, c, ep.get("bias", a), ids if ids is not None else a, ep.get("table", a), ep.get("local_pad", a),
        M, N, Kd, a.stride(0), a.stride(1), stride_bk, stride_bn,
        ep.get("T", 0), ep.get("KP", 1), ep.get("P", 1), ep.get("shift", 1), ep.get("pad_id", 0), ep.get("V", 0),
        ids.stride(0) if ids is not None else 0, ids.stride(1) if ids is not None else 0,
        EPILOGUE=epilogue is not None, HAS_BIAS="bias" in ep, CROSS_PATCH=ep.get("cross_patch", False),
        HAS_LOCAL_PAD="local_pad" in ep, UPCAST=ku.upcast(a.dtype), PRECISION=ku.dot_precision(a.dtype),
    )
    return c


# Blocks per SM of the dW kernel's GPU config (benchmarks/results/aot-sm90.md: bf16 116
# registers x 8 warps and 96 KB shared -> 2; fp32 72 registers x 4 warps: 6 with IEEE dots (32 KB
# shared), 4 with TF32 (48 KB); the smaller taken).
ATB_BLOCKS_PER_SM = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def atb_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """GPU (BLOCK_I, BLOCK_J, BLOCK_M, num_warps, num_stages) of the dW kernel (64x64 for IEEE fp32)."""
    return (64, 64, 32, 4, 3) if dtype == torch.float32 else (128, 128, 64, 8, 3)


def _atb(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(NA, NB) ``a^T @ b`` in ``dtype`` for row-major a (M, NA), b (M, NB); deterministic split-M."""
    M, NA = a.shape
    NB = b.shape[1]
    if interpreting():
        BLOCK_I, BLOCK_J, BLOCK_M, warps, stages = 16, 32, 32, 4, 1
        min_programs, slots = 2, 1
    else:
        BLOCK_I, BLOCK_J, BLOCK_M, warps, stages = atb_config(a.dtype)
        sms = ku.sm_count(a.device)
        min_programs, slots = 2 * sms, sms * ATB_BLOCKS_PER_SM[a.dtype]
    tiles = triton.cdiv(NA, BLOCK_I) * triton.cdiv(NB, BLOCK_J)
    splits, rows_per_split = ku.split_rows(M, BLOCK_M, tiles, min_programs, slots)
    partial = ku.alloc((splits, NA, NB), torch.float32, a.device)
    grid = (triton.cdiv(NA, BLOCK_I), triton.cdiv(NB, BLOCK_J), splits)
    _atb_kernel[grid](a, b, partial, M, NA, NB, rows_per_split, UPCAST=ku.upcast(a.dtype),
                      PRECISION=ku.dot_precision(a.dtype), BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J, BLOCK_M=BLOCK_M,
                      num_warps=warps, num_stages=stages)
    if splits == 1:
        return partial[0].to(dtype, copy=True)
    return ku.sum_leading(partial, NA, dtype)


def _local_codes(ids: torch.Tensor, V: int, P: int, pad_id: int, cross_patch: bool,
                 has_local_pad: bool, shift: int = 1) -> torch.Tensor:
    """(B*K*P,) int32 local ids shifted by ``shift``; shifted-in slots are V with a local pad vector."""
    s = shift
    ids = reference._pad_to_patches(ids.to(torch.int32), P, pad_id)
    B, KP = ids.shape
    codes = torch.full((B, KP), pad_id, dtype=torch.int32, device=ids.device)
    codes[:, s:] = ids[:, :KP - s]
    shifted_in_code = V if has_local_pad else pad_id
    if cross_patch:
        codes[:, :s] = shifted_in_code
    else:
        codes.view(B, KP // P, P)[:, :, :s] = shifted_in_code
    return codes.reshape(-1)


@torch.library.custom_op("megabyte::global_to_local_fwd", mutates_args=())
def _global_to_local_fwd(global_out: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], local_table: torch.Tensor, local_pad: Optional[torch.Tensor],
                         patch_size: int, pad_id: int, cross_patch: bool, shift: int = 1) -> torch.Tensor:
    P = patch_size
    B, K, PD = global_out.shape
    D_G = PD // P
    V, D_L = local_table.shape
    x = global_out.contiguous().view(B * K * P, D_G)  # a view when contiguous: read in place
    w = weight.contiguous()
    ep = {"ids": ids, "table": local_table.contiguous(), "T": ids.shape[1], "KP": K * P, "P": P,
          "pad_id": pad_id, "V": V, "cross_patch": cross_patch, "shift": shift}
    if bias is not None:
        ep["bias"] = bias.contiguous()
    if local_pad is not None:
        ep["local_pad"] = local_pad.contiguous()
    # W^T (D_G, D_L) read through W's strides: element (k, n) is w[n, k]
    return _matmul(x, w, 1, D_G, D_L, (B * K, P, D_L), epilogue=ep)


@_global_to_local_fwd.register_fake
def _(global_out, ids, weight, bias, local_table, local_pad, patch_size, pad_id, cross_patch, shift=1):
    B, K, _ = global_out.shape
    return global_out.new_empty((B * K, patch_size, local_table.shape[1]))


@torch.library.custom_op("megabyte::global_to_local_bwd", mutates_args=())
def _global_to_local_bwd(grad: torch.Tensor, global_out: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                         vocab_size: int, patch_size: int, pad_id: int, cross_patch: bool, has_bias: bool,
                         has_local_pad: bool, shift: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX like global_out, dW (D_L, D_G), db (D_L,) or empty, d local_table (V, D_L), d local_pad or empty)."""
    P, V = patch_size, vocab_size
    B, K, PD = global_out.shape
    D_G = PD // P
    D_L = weight.shape[0]
    M = B * K * P
    g = grad.contiguous().view(M, D_L)
    x = global_out.contiguous().view(M, D_G)
    w = weight.contiguous()
    dx = _matmul(g, w, D_G, 1, D_G, (B, K, PD))  # dOut @ W
    dw = _atb(g, x, weight.dtype)  # dOut^T @ X
    codes = _local_codes(ids, V, P, pad_id, cross_patch, has_local_pad, shift)
    ve = V + int(has_local_pad) + int(has_bias)
    ext = ku.onehot_grad(codes, g, ve, ones_row=ve - 1 if has_bias else -1)  # (ve, D_L) fp32
    d_table = ext[:V].to(grad.dtype, copy=True)  # copies: custom_op outputs may not alias
    d_pad = ext[V].to(grad.dtype, copy=True) if has_local_pad else grad.new_empty((0,))
    db = ext[ve - 1].to(grad.dtype, copy=True) if has_bias else grad.new_empty((0,))
    return dx, dw, db, d_table, d_pad


@_global_to_local_bwd.register_fake
def _(grad, global_out, ids, weight, vocab_size, patch_size, pad_id, cross_patch, has_bias, has_local_pad, shift=1):
    D_L = weight.shape[0]
    return (global_out.new_empty(global_out.shape), weight.new_empty(weight.shape),
            grad.new_empty((D_L if has_bias else 0,)), grad.new_empty((vocab_size, D_L)),
            grad.new_empty((D_L if has_local_pad else 0,)))


def _global_to_local_setup_context(ctx, inputs, output):
    global_out, ids, weight, bias, local_table, local_pad, patch_size, pad_id, cross_patch, shift = inputs
    ctx.save_for_backward(global_out, ids, weight)
    ctx.meta = (local_table.shape[0], patch_size, pad_id, cross_patch, bias is not None, local_pad is not None,
                shift)


def _global_to_local_backward(ctx, grad):
    global_out, ids, weight = ctx.saved_tensors
    V, P, pad_id, cross_patch, has_bias, has_pad, shift = ctx.meta
    dx, dw, db, d_table, d_pad = _global_to_local_bwd(grad, global_out, ids, weight, V, P, pad_id, cross_patch,
                                                      has_bias, has_pad, shift)
    return dx, None, dw, db if has_bias else None, d_table, d_pad if has_pad else None, None, None, None, None


_global_to_local_fwd.register_autograd(_global_to_local_backward, setup_context=_global_to_local_setup_context)


def global_to_local_triton(
    global_out: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    local_table: torch.Tensor,
    *,
    patch_size: int,
    pad_id: int,
    local_pad: torch.Tensor | None = None,
    cross_patch: bool = False,
    shift: int = 1,
) -> torch.Tensor:
    """Triton global-to-local, same signature and math as :func:`reference.global_to_local`.

    Inputs are validated by the public :func:`global_to_local`. Returns (B*K, P, D_L) in
    global_out's dtype: one GEMM ``(B*K*P, D_G) @ W^T`` reading global_out in place, with the
    bias and the shifted local embedding gathered in its epilogue.

    Backward (deterministic, no atomics): dX = dOut @ W and dW = dOut^T @ X as tiled GEMMs
    (dW split over rows into fp32 partials summed in a fixed order); d local_table, d local_pad
    and db together as one one-hot matmul ``onehot(codes)^T @ dOut`` over the vocabulary
    extended by a local-pad row and an all-ones (bias) row — see :func:`patch_embed_triton` for
    why a one-hot matmul rather than a sorted segment sum.
    """
    return _global_to_local_fwd(global_out, ids, weight, bias, local_table, local_pad, patch_size, pad_id,
                                bool(cross_patch), int(shift))


# every implementation of the op, declared in one place (backends.resolve_backend picks one)
IMPLS = {"reference": reference.global_to_local, "triton": global_to_local_triton,
         "native": global_to_local_native}
