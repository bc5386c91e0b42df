"""Fused op 1: patch embedding (shift by one patch, gather, position add, patch layout)."""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._validate import (check_float, check_ids, check_pad_id, check_patch_size, check_same_device,
                        check_same_dtype, check_shape, num_patches)
from . import _kernel_utils as ku
from ._triton_compat import tl, triton
from .backends import resolve_backend
from .native import patch_embed_native


def check_patch_embed_args(ids, token_table, pos_table, patch_size, pad_id, pad_patch) -> None:
    check_patch_size(patch_size)
    check_float("token_table", token_table, ndim=2)
    V, D = token_table.shape
    check_ids("ids", ids, V)
    check_pad_id(pad_id, V)
    check_same_device(ids=ids, token_table=token_table, pos_table=pos_table, pad_patch=pad_patch)
    check_same_dtype(token_table=token_table, pos_table=pos_table, pad_patch=pad_patch)
    KP = num_patches(ids.shape[1], patch_size) * patch_size
    if pos_table is not None:
        check_float("pos_table", pos_table, ndim=2)
        if pos_table.shape[1] != D:
            raise ValueError(f"pos_table must have {D} columns like token_table, got {tuple(pos_table.shape)}")
        if pos_table.shape[0] < KP:
            raise ValueError(
                f"pos_table has {pos_table.shape[0]} rows but T={ids.shape[1]} bytes pad to "
                f"K*P={KP} positions: use T <= {pos_table.shape[0] - pos_table.shape[0] % patch_size} "
                "or a larger T_MAX"
            )
    if pad_patch is not None:
        check_float("pad_patch", pad_patch)
        check_shape("pad_patch", pad_patch, (patch_size, D))


def patch_embed(
    ids: torch.Tensor,
    token_table: torch.Tensor,
    pos_table: torch.Tensor | None = None,
    *,
    patch_size: int,
    pad_id: int,
    pad_patch: torch.Tensor | None = None,
    backend: str | None = "auto",
) -> torch.Tensor:
    """Global patch embedding, (B, T) ids -> (B, K, P*D_G).

    ``h[b, t] = token_table[g_ids[b, t]] + pos_table[t]`` with ``g_ids`` the ids right-padded to
    K*P bytes and shifted right by one patch (``pad_id`` or the rows of ``pad_patch`` in front).
    See :func:`megabyte_kernels.reference.patch_embed` for the full definition and shapes.
    """
    check_patch_embed_args(ids, token_table, pos_table, patch_size, pad_id, pad_patch)
    impl = resolve_backend(backend, token_table.device, IMPLS, "patch_embed")
    return impl(ids, token_table, pos_table, patch_size=patch_size, pad_id=pad_id, pad_patch=pad_patch)


# ----------------------------------------------------------------------------------------------
# Triton backend
#
# Forward: one pass over the (B*K*P, D_G) output; each program computes the shifted global id
# of BLOCK_R rows, gathers their token rows (or pad-patch rows), adds the position rows and
# writes the patched layout directly (the (B, K, P*D_G) output *is* (B*K*P, D_G) row-major).
#
# Backward, deterministic, no atomics:
#   * token table (and pad patch): a one-hot matmul on tensor cores,
#     ``dE_ext = onehot(codes)^T @ dOut`` with ``codes`` the shifted global id of each row
#     (V + p for the rows of the first patch when a pad patch is used, so the pad patch's
#     gradient comes out as P extra rows of the same product). We chose the one-hot matmul
#     over a sorted segment sum because V is tiny (256-512): the one-hot tile is built in
#     registers from the ids (nothing to sort, no argsort/gather pass over dOut), its entries
#     are exactly 0/1 so fp16/bf16 tensor-core products are exact with fp32 accumulation, and
#     the work is perfectly balanced whatever the byte histogram (a segment sum would give one
#     program the huge pad/space segments). The row dimension is split over programs; each
#     split writes its own fp32 partial and a second kernel sums the partials in a fixed order.
#   * positions (and nothing else): ``dPos[t] = sum_b dOut[b, t]``, one program per tile of
#     (t, d) looping over the batch in order; rows of pos_table past K*P get zeros.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _shifted_global_id(Ids, b, t, T, stride_ib, stride_it, P, pad_id, mask):
    """g_ids[b, t] = ids[b, t - P] for P <= t < T + P, else pad_id (shift + right padding).

    The pad is selected after widening: ``tl.load(..., other=pad_id)`` would cast pad_id to the
    ids' dtype (uint8 ids with pad_id = 300 would read 44)."""
    src = t - P
    valid = mask & (src >= 0) & (src < T)
    g = tl.load(Ids + b * stride_ib + src * stride_it, mask=valid, other=0).to(tl.int64)
    return tl.where(valid, g, pad_id)


# GPU configs of the forward (memory-bound: rows x columns per program); compiled by the aot tests
FWD_CONFIGS = [triton.Config({"BLOCK_R": r, "BLOCK_D": d}, num_warps=w)
               for r, d, w in ((16, 128, 4), (8, 256, 4), (4, 512, 4), (8, 512, 8), (2, 1024, 8))]


@triton.autotune(
    configs=ku.autotune_configs(FWD_CONFIGS, triton.Config({"BLOCK_R": 16, "BLOCK_D": 32}, num_warps=4)),
    key=["D", "HAS_POS", "HAS_PAD_PATCH"],
    prune_configs_by={"early_config_prune": ku.prune_pinned},
)
@triton.jit
def _patch_embed_fwd_kernel(
    Ids, Table, Pos, PadPatch, Out,
    N, T, KP, D, P, pad_id, stride_ib, stride_it,
    HAS_POS: tl.constexpr, HAS_PAD_PATCH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Out[(b*KP + t), :] = Table[g_ids[b, t]] (or PadPatch[t] for t < P) + Pos[t]."""
    tl.static_assert(BLOCK_D % 16 == 0, "BLOCK_D must be a multiple of 16 for vector stores")
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (b, t), int64 offsets
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    b = rows // KP
    t = rows % KP
    g = _shifted_global_id(Ids, b, t, T, stride_ib, stride_it, P, pad_id, rmask)
    m2 = rmask[:, None] & cmask[None, :]
    if HAS_PAD_PATCH:
        first = t < P
        acc = tl.load(Table + g[:, None] * D + cols[None, :], mask=m2 & ~first[:, None], other=0.0)
        acc = acc.to(tl.float32)
        pad = tl.load(PadPatch + t[:, None] * D + cols[None, :], mask=m2 & first[:, None], other=0.0)
        acc = tl.where(first[:, None], pad.to(tl.float32), acc)
    else:
        acc = tl.load(Table + g[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_POS:
        acc += tl.load(Pos + t[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(Out + rows[:, None] * D + cols[None, :], acc.to(Out.dtype.element_ty), mask=m2)


def _global_codes(ids: torch.Tensor, V: int, P: int, pad_id: int, has_pad_patch: bool) -> torch.Tensor:
    """(B*K*P,) int32: the shifted global id of each output row, V + p for pad-patch rows."""
    ids = reference._pad_to_patches(ids.to(torch.int32), P, pad_id)
    B, KP = ids.shape
    codes = torch.full((B, KP), pad_id, dtype=torch.int32, device=ids.device)
    codes[:, P:] = ids[:, : KP - P]
    if has_pad_patch:
        codes[:, :P] = V + torch.arange(P, dtype=torch.int32, device=ids.device)
    return codes.reshape(-1)


@torch.library.custom_op("megabyte::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(ids: torch.Tensor, token_table: torch.Tensor, pos_table: Optional[torch.Tensor],
                     pad_patch: Optional[torch.Tensor], patch_size: int, pad_id: int) -> torch.Tensor:
    P = patch_size
    B, T = ids.shape
    V, D = token_table.shape
    KP = num_patches(T, P) * P
    table = token_table.contiguous()
    pos = pos_table.contiguous() if pos_table is not None else table  # dummy pointer when absent
    pad = pad_patch.contiguous() if pad_patch is not None else table
    out = ku.alloc((B, KP // P, P * D), token_table.dtype, token_table.device)
    N = B * KP
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
    _patch_embed_fwd_kernel[grid](
        ids, table, pos, pad, out, N, T, KP, D, P, pad_id, ids.stride(0), ids.stride(1),
        HAS_POS=pos_table is not None, HAS_PAD_PATCH=pad_patch is not None,
    )
    return out


@_patch_embed_fwd.register_fake
def _(ids, token_table, pos_table, pad_patch, patch_size, pad_id):
    B, T = ids.shape
    K = (T + patch_size - 1) // patch_size
    return token_table.new_empty((B, K, patch_size * token_table.shape[1]))


@torch.library.custom_op("megabyte::patch_embed_bwd", mutates_args=())
def _patch_embed_bwd(grad: torch.Tensor, ids: torch.Tensor, vocab_size: int, pos_rows: int, patch_size: int,
                     pad_id: int, has_pos: bool, has_pad_patch: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d token_table (V, D), d pos_table (pos_rows, D) or empty, d pad_patch (P, D) or empty)."""
    P, V = patch_size, vocab_size
    B, K, PD = grad.shape
    D = PD // P
    g = grad.contiguous().view(B * K * P, D)
    codes = _global_codes(ids, V, P, pad_id, has_pad_patch)
    ve = V + (P if has_pad_patch else 0)
    ext = ku.onehot_grad(codes, g, ve)  # (ve, D) fp32
    d_table = ext[:V].to(grad.dtype, copy=True)  # copies: custom_op outputs may not alias
    d_pad = ext[V:].to(grad.dtype, copy=True) if has_pad_patch else grad.new_empty((0, D))
    if has_pos:
        d_pos = ku.sum_leading(g.view(B, K * P, D), pos_rows, grad.dtype)
    else:
        d_pos = grad.new_empty((0, D))
    return d_table, d_pos, d_pad


@_patch_embed_bwd.register_fake
def _(grad, ids, vocab_size, pos_rows, patch_size, pad_id, has_pos, has_pad_patch):
    D = grad.shape[2] // patch_size
    return (grad.new_empty((vocab_size, D)), grad.new_empty((pos_rows if has_pos else 0, D)),
            grad.new_empty((patch_size if has_pad_patch else 0, D)))


def _patch_embed_setup_context(ctx, inputs, output):
    ids, token_table, pos_table, pad_patch, patch_size, pad_id = inputs
    ctx.save_for_backward(ids)
    ctx.meta = (token_table.shape[0], pos_table.shape[0] if pos_table is not None else 0, patch_size, pad_id,
                pos_table is not None, pad_patch is not None)


def _patch_embed_backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    V, pos_rows, P, pad_id, has_pos, has_pad = ctx.meta
    d_table, d_pos, d_pad = _patch_embed_bwd(grad, ids, V, pos_rows, P, pad_id, has_pos, has_pad)
    return None, d_table, d_pos if has_pos else None, d_pad if has_pad else None, None, None


_patch_embed_fwd.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup_context)


def patch_embed_triton(
    ids: torch.Tensor,
    token_table: torch.Tensor,
    pos_table: torch.Tensor | None = None,
    *,
    patch_size: int,
    pad_id: int,
    pad_patch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton patch embedding, same signature and math as :func:`reference.patch_embed`.

    Inputs are validated by the public :func:`patch_embed`. ids (B, T) any integer dtype, read
    in place through its strides; tables made contiguous. Returns (B, K, P*D_G) in
    token_table's dtype, written in one pass (no (B, T, D_G) intermediate).

    Backward (deterministic, bitwise equal across runs, no atomics):

    * d token_table (V, D_G) and d pad_patch (P, D_G): one **one-hot matmul** on tensor cores,
      ``onehot(codes)^T (V+P, B*K*P) @ dOut (B*K*P, D_G)``, where ``codes`` is each output
      row's shifted global id (``V + p`` for the rows of the pad patch). Chosen over a sorted
      segment sum because V is tiny (256-512): the one-hot tile is built in registers from the
      ids (no sort, no permuted gather of dOut), 0/1 products are exact in fp16/bf16 with fp32
      accumulation, and the work per program does not depend on the byte histogram (a
      segment sum would hand the huge pad and space segments to single programs). The rows
      are split over programs at fixed boundaries; the fp32 partials are summed in order.
    * d pos_table (T_MAX, D_G): ``sum_b dOut[b, t]`` looping over the batch in order; rows
      past K*P are zero.
    """
    return _patch_embed_fwd(ids, token_table, pos_table, pad_patch, patch_size, pad_id)


# every implementation of the op, declared in one place (backends.resolve_backend picks one)
IMPLS = {"reference": reference.patch_embed, "triton": patch_embed_triton, "native": patch_embed_native}
