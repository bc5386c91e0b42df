"""Causal attention, local family: many tiny sequences packed block-diagonally into one tile.

The local model attends causally inside each patch: N = P <= 64 positions, batch B·K in the
millions. One flash-attention program per (sequence, head) would run P-row tiles far below
``tl.dot``'s minimum of 16 and launch millions of programs, so this kernel packs several
sequences into one tile and masks the tile block-diagonally::

    q, o, dO: (B, Hq, P, d) contiguous = a (B*Hq*P, d) matrix; sequence s = b*Hq + h owns rows
              [s*P, (s+1)*P)
    k, v:     (B, Hkv, P, d) = a (B*Hkv*P, d) matrix; query sequence s reads key sequence s // G
              (G = Hq / Hkv: the G query heads of a group are consecutive sequences)

A program owns SPT_KV consecutive key sequences (BLOCK_KV >= SPT_KV*P rows, one coalesced load
of k and v) and the SPT_KV*G query sequences that read them, in chunks of SPQ sequences
(BLOCK_Q >= SPQ*P rows). Per chunk, with r a tile row (query sequence r // P, position r % P)
and c a tile column (key sequence c // P, position c % P)::

    s[r, c] = scale * q[r]·k[c] - slope_h(r) * (pos(r) - pos(c))
              if seq(r) // G == seq(c) and pos(c) <= pos(r), else -inf
    p       = exact row softmax of s (the whole row is in the tile: no online rescaling)
    o       = (e @ v) / l,  e = exp2(s2 - rowmax), l = rowsum(e)   (normalised after P·V)

Backward recomputes p in registers from q and k (nothing is saved but the inputs; no
log-sum-exp), and uses ``delta[r] = rowsum(p * dp)`` which equals ``rowsum(dO * o)`` without
reading o::

    dv += p^T @ dO,   dp = dO @ v^T,   ds = p * (dp - delta),
    dq  = scale * ds @ k,   dk += scale * ds^T @ q

The G query heads that share a key sequence sit in the same program, so the GQA sum for dk/dv is
a sum over tile rows inside the dots: no atomics, deterministic. Every ``tl.dot`` contracts over
BLOCK_D, BLOCK_Q or BLOCK_KV, all at least 16.

Custom ops: ``megabyte::local_attn_fwd`` and ``megabyte::local_attn_bwd``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _kernel_utils as ku
from ._kernel_utils import head_dim_block, load_tile
from .backends import interpreting

MAX_N = 128  # the packed kernel holds whole sequences in one tile


@triton.jit
def _local_kv_cols(kv_seq0, offs_d, d_mask, P, NKV_SEQ, D, SPT_KV, BLOCK_KV: tl.constexpr):
    """The program's key tile: per column c its key sequence and position, whether it is a real
    row, and the offsets and mask of the k/v rows (SPT_KV sequences from kv_seq0)."""
    offs_c = tl.arange(0, BLOCK_KV)
    c_seq = offs_c // P
    c_pos = offs_c % P
    c_ok = (c_seq < SPT_KV) & (kv_seq0 + c_seq < NKV_SEQ)
    kv_off = (kv_seq0.to(tl.int64) * P + offs_c)[:, None] * D + offs_d[None, :]
    kv_mask = c_ok[:, None] & d_mask[None, :]
    return c_seq, c_pos, c_ok, kv_off, kv_mask


@triton.jit
def _local_q_rows(chunk, q_seq0, offs_r, r_seq, offs_d, d_mask, P, G, NQ_SEQ, D, SPT_KV, SPQ):
    """Query chunk `chunk` of the program: per row r its query sequence within the program, whether
    it is a real row, and the offsets and mask of the q (and dO/o/dq) rows."""
    qs_local = chunk * SPQ + r_seq
    r_ok = (r_seq < SPQ) & (qs_local < SPT_KV * G) & (q_seq0 + qs_local < NQ_SEQ)
    q_off = ((q_seq0 + chunk * SPQ).to(tl.int64) * P + offs_r)[:, None] * D + offs_d[None, :]
    q_mask = r_ok[:, None] & d_mask[None, :]
    return qs_local, r_ok, q_off, q_mask


@triton.jit
def _local_probs(q, k, Slopes, q_seq0, qs_local, r_pos, r_ok, c_seq, c_pos, c_ok, qk_scale, P, G, H,
                 HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    """The exact block-diagonal causal softmax p = e * inv_l[:, None] (BLOCK_Q, BLOCK_KV) as its
    unnormalised e = exp2(s2 - rowmax) and the reciprocal inv_l (BLOCK_Q,) of its row sums, fp32:
    one reciprocal per row, and the forward normalises after P·V (a (BLOCK_Q, BLOCK_D) scale)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_ALIBI:
        head = (q_seq0 + qs_local) % H
        slope2 = tl.load(Slopes + head, mask=r_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        # -slope2 * (pos(r) - pos(c)): the row's term -slope2 * pos(r) is a constant of the row and
        # cancels in this exact softmax, so only the key term is added (one FMA per element;
        # LLVM folds the converted difference of distance() back into a per-element cvt here)
        s += slope2[:, None] * c_pos.to(tl.float32)[None, :]
    allowed = ((qs_local // G)[:, None] == c_seq[None, :]) & (c_pos[None, :] <= r_pos[:, None]) & c_ok[None, :]
    s = tl.where(allowed, s, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows with nothing allowed (tile padding) give p = 0
    p = tl.math.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    l = tl.where(l == 0.0, 1.0, l)
    return p, 1.0 / l


@triton.jit
def _local_fwd_kernel(Q, K, V, O, Slopes, scale, P, G, H, NQ_SEQ, NKV_SEQ, D, SPT_KV, SPQ, N_CHUNKS,
                      HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(NKV_SEQ, SPT_KV),). Writes o (NQ_SEQ*P, d)."""
    tl.static_assert(BLOCK_Q >= 16 and BLOCK_KV >= 16 and BLOCK_D >= 16, "tl.dot needs dims of at least 16")
    pid = tl.program_id(0)
    kv_seq0 = pid * SPT_KV
    q_seq0 = kv_seq0 * G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    c_seq, c_pos, c_ok, kv_off, kv_mask = _local_kv_cols(kv_seq0, offs_d, d_mask, P, NKV_SEQ, D, SPT_KV, BLOCK_KV)
    k = load_tile(K, kv_off, kv_mask, UPCAST)
    v = load_tile(V, kv_off, kv_mask, UPCAST)
    qk_scale = scale * 1.4426950408889634
    offs_r = tl.arange(0, BLOCK_Q)
    r_seq = offs_r // P
    r_pos = offs_r % P
    for chunk in range(0, N_CHUNKS):
        qs_local, r_ok, q_off, q_mask = _local_q_rows(chunk, q_seq0, offs_r, r_seq, offs_d, d_mask, P, G, NQ_SEQ, D,
                                                      SPT_KV, SPQ)
        q = load_tile(Q, q_off, q_mask, UPCAST)
        e, inv_l = _local_probs(q, k, Slopes, q_seq0, qs_local, r_pos, r_ok, c_seq, c_pos, c_ok, qk_scale, P, G,
                                H, HAS_ALIBI, DOT_PREC)
        o = tl.dot(e.to(v.dtype), v, input_precision=DOT_PREC) * inv_l[:, None]
        tl.store(O + q_off, o.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def _local_bwd_kernel(Q, K, V, DO, DQ, DK, DV, Slopes, scale, P, G, H, NQ_SEQ, NKV_SEQ, D, SPT_KV, SPQ, N_CHUNKS,
                      HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(NKV_SEQ, SPT_KV),). Writes dq (NQ_SEQ*P, d), dk and dv (NKV_SEQ*P, d).

    Padding rows of a chunk load q = dO = 0, so they add nothing to dk (ds^T @ 0) or dv (p^T @ 0).
    """
    tl.static_assert(BLOCK_Q >= 16 and BLOCK_KV >= 16 and BLOCK_D >= 16, "tl.dot needs dims of at least 16")
    pid = tl.program_id(0)
    kv_seq0 = pid * SPT_KV
    q_seq0 = kv_seq0 * G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    c_seq, c_pos, c_ok, kv_off, kv_mask = _local_kv_cols(kv_seq0, offs_d, d_mask, P, NKV_SEQ, D, SPT_KV, BLOCK_KV)
    k = load_tile(K, kv_off, kv_mask, UPCAST)
    v = load_tile(V, kv_off, kv_mask, UPCAST)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
    offs_r = tl.arange(0, BLOCK_Q)
    r_seq = offs_r // P
    r_pos = offs_r % P
    for chunk in range(0, N_CHUNKS):
        qs_local, r_ok, q_off, q_mask = _local_q_rows(chunk, q_seq0, offs_r, r_seq, offs_d, d_mask, P, G, NQ_SEQ, D,
                                                      SPT_KV, SPQ)
        q = load_tile(Q, q_off, q_mask, UPCAST)
        do = load_tile(DO, q_off, q_mask, UPCAST)
        e, inv_l = _local_probs(q, k, Slopes, q_seq0, qs_local, r_pos, r_ok, c_seq, c_pos, c_ok, qk_scale, P, G,
                                H, HAS_ALIBI, DOT_PREC)
        p = e * inv_l[:, None]
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        delta = tl.sum(p * dp, 1)  # = rowsum(dO * o)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * scale
        tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=q_mask)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PREC)
    dk = dk * scale
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------------------------
# tiling and launchers
# --------------------------------------------------------------------------------------------
def tile_rows_target(block_d: int, elt_bytes: int) -> int:
    """Query rows per tile aimed at: 64 in the interpreter (fewer wasted ops per tile), on the GPU
    128 for small 16-bit head dims (more bytes in flight per program), 64 for larger ones
    (registers), 32 for fp32 (IEEE dots run on CUDA cores with their operands in registers: at
    d = 64, P = 8 the 64-row tiles spill 22 KB (forward) and 35 KB (backward) per thread on sm_90,
    32-row tiles at 8 warps none; benchmarks/results/aot-sm90.md)."""
    if interpreting():
        return 64
    if elt_bytes >= 4:
        return 32
    return 128 if block_d * elt_bytes <= 128 else 64


def num_warps_for(block_q: int, block_kv: int, block_d: int, elt_bytes: int) -> int:
    """8 warps once the score tile or a key tile would take more than ~64 registers a thread at 4,
    and always for fp32 (its dots hold their operands in registers: the 32x32 backward at d = 64
    spills 124 B per thread at 4 warps, none at 8)."""
    big = block_q * block_kv > 128 * 64 or max(block_q, block_kv) * block_d * elt_bytes > 64 * 128 * 2
    return 8 if big or elt_bytes >= 4 else 4


def tiling(P: int, G: int, target: int) -> dict:
    """Sequences per program and tile sizes for sequences of length P and group size G."""
    spt_kv = max(1, target // (P * G))
    q_seqs = spt_kv * G
    spq = min(q_seqs, max(1, target // P))
    return dict(
        SPT_KV=spt_kv, SPQ=spq, N_CHUNKS=triton.cdiv(q_seqs, spq),
        BLOCK_KV=max(16, triton.next_power_of_2(spt_kv * P)),
        BLOCK_Q=max(16, triton.next_power_of_2(spq * P)),
    )


def _prepare(q, k, alibi_slopes):
    B, H, P, D = q.shape
    G = H // k.shape[1]
    BLOCK_D = head_dim_block(D)
    elt = q.element_size()
    t = tiling(P, G, tile_rows_target(BLOCK_D, elt))
    slopes = ku.slopes_arg(alibi_slopes, q.device)
    meta = dict(**ku.attention_flags(q.dtype, alibi_slopes),
                BLOCK_Q=t["BLOCK_Q"], BLOCK_KV=t["BLOCK_KV"], BLOCK_D=BLOCK_D)
    nkv = B * k.shape[1]
    tail = (P, G, H, B * H, nkv, D, t["SPT_KV"], t["SPQ"], t["N_CHUNKS"])
    grid = (triton.cdiv(nkv, t["SPT_KV"]),)
    num_warps = num_warps_for(t["BLOCK_Q"], t["BLOCK_KV"], BLOCK_D, elt)
    return slopes, tail, meta, grid, num_warps


def _launch_fwd(q, k, v, alibi_slopes, scale):
    o = ku.empty_like(q)
    if q.numel() == 0:
        return o
    slopes, tail, meta, grid, nw = _prepare(q, k, alibi_slopes)
    _local_fwd_kernel[grid](q, k, v, o, slopes, float(scale), *tail, **meta, num_warps=nw)
    return o


def _launch_bwd(do, q, k, v, alibi_slopes, scale):
    dq, dk, dv = ku.empty_like(q), ku.empty_like(k), ku.empty_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    slopes, tail, meta, grid, nw = _prepare(q, k, alibi_slopes)
    _local_bwd_kernel[grid](q, k, v, do, dq, dk, dv, slopes, float(scale), *tail, **meta, num_warps=nw)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# custom ops + autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("megabyte::local_attn_fwd", mutates_args=())
def local_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
                   scale: float) -> torch.Tensor:
    """Returns o (B, Hq, P, d) like q."""
    return _launch_fwd(q.contiguous(), k.contiguous(), v.contiguous(), alibi_slopes, scale)


@local_attn_fwd.register_fake
def _(q, k, v, alibi_slopes, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("megabyte::local_attn_bwd", mutates_args=())
def local_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   alibi_slopes: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) shaped like q, k, v; recomputes the softmax (nothing saved but inputs)."""
    return _launch_bwd(do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), alibi_slopes, scale)


@local_attn_bwd.register_fake
def _(do, q, k, v, alibi_slopes, scale):
    cf = torch.contiguous_format
    return (torch.empty_like(q, memory_format=cf), torch.empty_like(k, memory_format=cf),
            torch.empty_like(v, memory_format=cf))


def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, scale = inputs
    ctx.save_for_backward(q, k, v, alibi_slopes)
    ctx.scale = scale


def _backward(ctx, do):
    q, k, v, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = local_attn_bwd(do, q, k, v, alibi_slopes, ctx.scale)
    return dq, dk, dv, None, None


local_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def local_attention(q, k, v, alibi_slopes=None, scale=None):
    """Packed local attention (unvalidated; use :func:`megabyte_kernels.attention.local_attention`)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return local_attn_fwd(q, k, v, alibi_slopes, float(scale))
