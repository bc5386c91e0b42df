"""Causal attention, local family: many tiny sequences packed block-diagonally into one tile.

The local model attends causally inside each patch: N = P <= 64 positions, batch B·K in the
millions. One flash-attention program per (sequence, head) would run P-row tiles far below
``tl.dot``'s minimum of 16 and launch millions of programs, so this kernel packs several
sequences into one tile and masks the tile block-diagonally::

    q, o, dO, dq: (B, Hq, P, d); sequence s = b*Hq + h, its rows (s, pos) read through the
                  tensor's (batch, head, row) strides (the last dim unit-stride: the model's
                  ``rearrange``d projections go in without a copy; o and dq take q's layout)
    k, v, dk, dv: (B, Hkv, P, d); query sequence s reads key sequence s // G (G = Hq / Hkv: the
                  G query heads of a group are consecutive sequences)

A *chunk* is KS consecutive key sequences (a BLOCK_KV >= KS*P row tile) and the KS*G*P query
rows that read them, in NQC sub-chunks of BLOCK_Q rows (a sequence may straddle two: each row's
softmax needs only its own keys, all in the key tile). A program walks CPP chunks in a
software-pipelined loop (the next step's loads in flight during this step's math); the tiles
are small (32 rows, :func:`tile_rows_target`) so that several programs fit on an SM and a score
tile wastes 3/4 of its elements on the mask, not 15/16. Per step, with r a tile row (query
sequence, position) and c a tile column (key sequence c // P, position c % P)::

    s[r, c] = scale * q[r]·k[c] - slope_h(r) * (pos(r) - pos(c))
              if seq(r) // G == seq(c) and pos(c) <= pos(r), else -inf
    p       = exact row softmax of s (the whole row is in the tile: no online rescaling)
    o       = (e @ v) / l,  e = exp2(s2 - rowmax), l = rowsum(e)   (normalised after P·V)

Backward recomputes p in registers from q and k (nothing is saved but the inputs; no
log-sum-exp), and uses ``delta[r] = rowsum(p * dp)`` which equals ``rowsum(dO * o)`` without
reading o::

    dv += p^T @ dO,   dp = dO @ v^T,   ds = p * (dp - delta),
    dq  = scale * ds @ k,   dk += scale * ds^T @ q

The G query heads that share a key sequence sit in the same chunk, so the GQA sum for dk/dv is
a sum over tile rows inside the dots (and over the chunk's sub-chunks in registers, in order):
no atomics, deterministic. Every ``tl.dot`` contracts over BLOCK_D, BLOCK_Q or BLOCK_KV, all at
least 16.

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
def _seq_rows(seq, pos, H, stride_b, stride_h, stride_n):
    """int64 offsets of the rows (seq, pos) of a (B, H, P, d) tensor, sequence seq = b * H + h,
    read through its (batch, head, row) strides (the last dim is unit-stride)."""
    b = (seq // H).to(tl.int64)
    h = (seq % H).to(tl.int64)
    return b * stride_b + h * stride_h + pos.to(tl.int64) * stride_n


@triton.jit
def _local_chunk(pid, it, c_seq, offs_r, P, G, NKV_SEQ, KS, NQC, CPP, BLOCK_Q: tl.constexpr):
    """Step `it` of program pid: its chunk's first key sequence t0, the query sub-chunk j (of NQC),
    and per query row r of the sub-chunk its sequence within the chunk, position and validity;
    per key column whether it is a real row (c_seq < KS and inside the batch)."""
    c = it // NQC
    j = it - c * NQC
    t0 = (pid * CPP + c) * KS
    qr = j * BLOCK_Q + offs_r  # query row within the chunk's KS * G * P rows
    qs = qr // P
    r_pos = qr - qs * P
    r_ok = (qr < KS * G * P) & (t0 + qs // G < NKV_SEQ)
    c_ok = (c_seq < KS) & (t0 + c_seq < NKV_SEQ)
    return t0, j, qs, r_pos, r_ok, c_ok


@triton.jit
def _local_probs(q, k, Slopes, t0, qs, r_pos, r_ok, c_seq, c_pos, c_ok, qk_scale, G, H,
                 HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    """The exact block-diagonal causal softmax p = e * inv_l[:, None] (BLOCK_Q, BLOCK_KV) as its
    unnormalised e = exp2(s2 - rowmax) and the reciprocal inv_l (BLOCK_Q,) of its row sums, fp32:
    one reciprocal per row, and the forward normalises after P·V (a (BLOCK_Q, BLOCK_D) scale)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_ALIBI:
        head = (t0 * G + qs) % H
        slope2 = tl.load(Slopes + head, mask=r_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        # -slope2 * (pos(r) - pos(c)): the row's term -slope2 * pos(r) is a constant of the row and
        # cancels in this exact softmax, so only the key term is added (one FMA per element)
        s += slope2[:, None] * c_pos.to(tl.float32)[None, :]
    allowed = ((qs // G)[:, None] == c_seq[None, :]) & (c_pos[None, :] <= r_pos[:, None]) & c_ok[None, :]
    s = tl.where(allowed, s, float("-inf"))
    m = tl.max(s, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows with nothing allowed (tile padding) give p = 0
    p = tl.math.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    l = tl.where(l == 0.0, 1.0, l)
    return p, 1.0 / l


@triton.jit
def _local_fwd_kernel(Q, K, V, O, Slopes, scale, P, G, H, NKV_SEQ, D, KS, NQC, CPP,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                      HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(NKV_SEQ, KS * CPP),): CPP chunks of KS key sequences per program, each chunk's
    KS * G * P query rows in NQC sub-chunks of BLOCK_Q rows. Writes o (B, Hq, P, d)."""
    tl.static_assert(BLOCK_Q >= 16 and BLOCK_KV >= 16 and BLOCK_D >= 16, "tl.dot needs dims of at least 16")
    pid = tl.program_id(0)
    HKV = H // G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_c = tl.arange(0, BLOCK_KV)
    c_seq = offs_c // P
    c_pos = offs_c - c_seq * P
    offs_r = tl.arange(0, BLOCK_Q)
    qk_scale = scale * 1.4426950408889634
    for it in range(0, CPP * NQC):  # software-pipelined: the next step's loads overlap this one's math
        t0, j, qs, r_pos, r_ok, c_ok = _local_chunk(pid, it, c_seq, offs_r, P, G, NKV_SEQ, KS, NQC, CPP, BLOCK_Q)
        kv_mask = c_ok[:, None] & d_mask[None, :]
        k_rows = _seq_rows(t0 + c_seq, c_pos, HKV, stride_kb, stride_kh, stride_kn)
        v_rows = _seq_rows(t0 + c_seq, c_pos, HKV, stride_vb, stride_vh, stride_vn)
        k = load_tile(K, k_rows[:, None] + offs_d[None, :], kv_mask, UPCAST)
        v = load_tile(V, v_rows[:, None] + offs_d[None, :], kv_mask, UPCAST)
        q_mask = r_ok[:, None] & d_mask[None, :]
        q_rows = _seq_rows(t0 * G + qs, r_pos, H, stride_qb, stride_qh, stride_qn)
        q = load_tile(Q, q_rows[:, None] + offs_d[None, :], q_mask, UPCAST)
        e, inv_l = _local_probs(q, k, Slopes, t0, qs, r_pos, r_ok, c_seq, c_pos, c_ok, qk_scale, G, H,
                                HAS_ALIBI, DOT_PREC)
        o = tl.dot(e.to(v.dtype), v, input_precision=DOT_PREC) * inv_l[:, None]
        o_rows = _seq_rows(t0 * G + qs, r_pos, H, stride_ob, stride_oh, stride_on)
        tl.store(O + o_rows[:, None] + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def _local_bwd_kernel(Q, K, V, DO, DQ, DK, DV, Slopes, scale, P, G, H, NKV_SEQ, D, KS, NQC, CPP,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                      stride_dqb, stride_dqh, stride_dqn, stride_dkb, stride_dkh, stride_dkn,
                      stride_dvb, stride_dvh, stride_dvn,
                      HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(NKV_SEQ, KS * CPP),), the forward's steps. Writes dq (B, Hq, P, d) at every step,
    dk and dv (B, Hkv, P, d) at the last sub-chunk of each chunk (the GQA sum over the chunk's
    query rows is in the dots' contraction: no atomics, deterministic).

    Padding rows of a sub-chunk load q = dO = 0, so they add nothing to dk (ds^T @ 0) or dv (p^T @ 0).
    """
    tl.static_assert(BLOCK_Q >= 16 and BLOCK_KV >= 16 and BLOCK_D >= 16, "tl.dot needs dims of at least 16")
    pid = tl.program_id(0)
    HKV = H // G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_c = tl.arange(0, BLOCK_KV)
    c_seq = offs_c // P
    c_pos = offs_c - c_seq * P
    offs_r = tl.arange(0, BLOCK_Q)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
    for it in range(0, CPP * NQC):
        t0, j, qs, r_pos, r_ok, c_ok = _local_chunk(pid, it, c_seq, offs_r, P, G, NKV_SEQ, KS, NQC, CPP, BLOCK_Q)
        kv_mask = c_ok[:, None] & d_mask[None, :]
        kv_seq = t0 + c_seq
        k = load_tile(K, _seq_rows(kv_seq, c_pos, HKV, stride_kb, stride_kh, stride_kn)[:, None] + offs_d[None, :],
                      kv_mask, UPCAST)
        v = load_tile(V, _seq_rows(kv_seq, c_pos, HKV, stride_vb, stride_vh, stride_vn)[:, None] + offs_d[None, :],
                      kv_mask, UPCAST)
        q_mask = r_ok[:, None] & d_mask[None, :]
        q_seq = t0 * G + qs
        q = load_tile(Q, _seq_rows(q_seq, r_pos, H, stride_qb, stride_qh, stride_qn)[:, None] + offs_d[None, :],
                      q_mask, UPCAST)
        do = load_tile(DO, _seq_rows(q_seq, r_pos, H, stride_dob, stride_doh, stride_don)[:, None] + offs_d[None, :],
                       q_mask, UPCAST)
        e, inv_l = _local_probs(q, k, Slopes, t0, qs, r_pos, r_ok, c_seq, c_pos, c_ok, qk_scale, G, H,
                                HAS_ALIBI, DOT_PREC)
        p = e * inv_l[:, None]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        delta = tl.sum(p * dp, 1)  # = rowsum(dO * o)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * scale
        dq_rows = _seq_rows(q_seq, r_pos, H, stride_dqb, stride_dqh, stride_dqn)
        tl.store(DQ + dq_rows[:, None] + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)
        if j == 0:  # a new chunk: its key rows start from zero
            dk = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_KV, BLOCK_D], tl.float32)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PREC)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PREC)
        last = kv_mask & (j == NQC - 1)  # the chunk's last sub-chunk: its dk, dv are complete
        dk_rows = _seq_rows(kv_seq, c_pos, HKV, stride_dkb, stride_dkh, stride_dkn)
        dv_rows = _seq_rows(kv_seq, c_pos, HKV, stride_dvb, stride_dvh, stride_dvn)
        tl.store(DK + dk_rows[:, None] + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=last)
        tl.store(DV + dv_rows[:, None] + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=last)


# --------------------------------------------------------------------------------------------
# tiling and launchers
# --------------------------------------------------------------------------------------------
def tile_rows_target(block_d: int, elt_bytes: int) -> int:
    """Rows of the key tile aimed at (a query sub-chunk takes as many), the interpreter's as the GPU's.

    32 for 16-bit inputs. Compiled for sm_90 at d = 64, P = 8, G = 1 (benchmarks/results/aot-sm90.md),
    16 / 32 / 64 rows give forward 64 (4 warps) / 80 (8 warps) / 185 (4 warps) registers and backward
    93 / 120 / 254 (the old 128-row tile: 172 and 228, one block per SM). 16 rows fit the most warps
    per SM but waste half of each score tile on the block-diagonal mask and run the most loop steps
    per byte; 64 rows fit 2 blocks. fp32 (IEEE dots hold their operands in registers): 32 rows up to
    d = 64, 16 beyond (the 32x64 backward at d = 128 spills 2 KB per thread, the 16x64 8 B)."""
    if elt_bytes >= 4:
        return 32 if block_d <= 64 else 16
    return TILE_ROWS_16BIT


# The 16-bit rows of tile_rows_target(); gpu-check's local_variants item times 16 and 64 against it.
TILE_ROWS_16BIT = 32


def num_warps_for(backward: bool, block_kv: int, elt_bytes: int) -> int:
    """Warps per program, the most resident warps per SM in the sm_90 compiles (tile_rows_target()):
    8 for the backward (d = 64, P = 8: 120 registers, 2 blocks = 16 warps, against 154 at 4 warps,
    3 blocks = 12), for fp32, and for forward key tiles of 32 rows or more (80 registers, 3 blocks = 24
    warps, against 113 at 4, 4 blocks = 16); 4 for the 16-row forward tiles of grouped heads (P = 8,
    G = 8: 80 registers, 6 blocks = 24 warps, against 95 at 8, 2 blocks = 16)."""
    return 8 if backward or elt_bytes >= 4 or block_kv >= 32 else 4


def num_stages_for(elt_bytes: int) -> int:
    """Software-pipelining depth of the program's loop: 2 for 16-bit inputs (the next step's loads
    are issued with cp.async before this step's math), 1 for fp32 (pipelined, the d = 64 backward
    takes 255 registers and spills 360 B per thread instead of 124 and none)."""
    return 1 if elt_bytes >= 4 else 2


def tiling(P: int, G: int, target: int) -> dict:
    """The chunk of one program step for sequences of length P and group size G.

    KS key sequences (BLOCK_KV >= KS*P rows: about ``target / G`` rows, at least one sequence and
    16 rows) and their KS*G*P query rows, in NQC sub-chunks of BLOCK_Q <= ``target`` rows. A query
    row needs every key of its sequence (the exact softmax), so the key tile is never split."""
    kv_rows = max(16, triton.next_power_of_2(P), target // G)
    ks = kv_rows // P
    q_rows = ks * G * P
    block_q = max(16, min(triton.next_power_of_2(q_rows), triton.next_power_of_2(target)))
    return dict(KS=ks, NQC=triton.cdiv(q_rows, block_q), BLOCK_KV=max(16, triton.next_power_of_2(ks * P)),
                BLOCK_Q=block_q)


def chunks_per_program(chunks: int, sms: int) -> int:
    """CPP, the chunks one program walks (its loop pipelines the loads of one step behind the math
    of the previous): up to 16, as long as the grid keeps at least 8 programs per SM; 2 in the
    interpreter (the loop and a partial last program are exercised)."""
    if interpreting():
        return 2
    return max(1, min(16, chunks // (8 * sms)))


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
    chunks = triton.cdiv(nkv, t["KS"])
    cpp = chunks_per_program(chunks, ku.sm_count(q.device))
    tail = (P, G, H, nkv, D, t["KS"], t["NQC"], cpp)
    grid = (triton.cdiv(chunks, cpp),)
    return slopes, tail, meta, grid, elt


def _launch_fwd(q, k, v, alibi_slopes, scale):
    o = ku.empty_in_layout_of(q)
    if q.numel() == 0:
        return o
    slopes, tail, meta, grid, elt = _prepare(q, k, alibi_slopes)
    strides = (*ku.seq_strides(q), *ku.seq_strides(k), *ku.seq_strides(v), *ku.seq_strides(o))
    _local_fwd_kernel[grid](q, k, v, o, slopes, float(scale), *tail, *strides, **meta,
                            num_warps=num_warps_for(False, meta["BLOCK_KV"], elt), num_stages=num_stages_for(elt))
    return o


def _launch_bwd(do, q, k, v, alibi_slopes, scale):
    dq, dk, dv = ku.empty_in_layout_of(q), ku.empty_in_layout_of(k), ku.empty_in_layout_of(v)
    if q.numel() == 0:
        return dq, dk, dv
    slopes, tail, meta, grid, elt = _prepare(q, k, alibi_slopes)
    strides = tuple(s for x in (q, k, v, do, dq, dk, dv) for s in ku.seq_strides(x))
    _local_bwd_kernel[grid](q, k, v, do, dq, dk, dv, slopes, float(scale), *tail, *strides, **meta,
                            num_warps=num_warps_for(True, meta["BLOCK_KV"], elt), num_stages=num_stages_for(elt))
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# custom ops + autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("megabyte::local_attn_fwd", mutates_args=())
def local_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
                   scale: float) -> torch.Tensor:
    """Returns o (B, Hq, P, d) like q."""
    return _launch_fwd(ku.rows(q), ku.rows(k), ku.rows(v), alibi_slopes, scale)


@local_attn_fwd.register_fake
def _(q, k, v, alibi_slopes, scale):
    return torch.empty_like(ku.rows(q))


@torch.library.custom_op("megabyte::local_attn_bwd", mutates_args=())
def local_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   alibi_slopes: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) shaped like q, k, v; recomputes the softmax (nothing saved but inputs)."""
    return _launch_bwd(ku.rows(do), ku.rows(q), ku.rows(k), ku.rows(v), alibi_slopes, scale)


@local_attn_bwd.register_fake
def _(do, q, k, v, alibi_slopes, scale):
    return tuple(torch.empty_like(ku.rows(x)) for x in (q, k, v))


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
