"""Causal attention, global family: flash attention in Triton (forward and deterministic backward).

Math (natural units, per batch b, query head h, key/value head g = h // G, G = Hq / Hkv)::

    s[i, j] = scale * q[i]·k[j] - slope_h * (i - j)        (j <= i, else -inf)
    o[i]    = sum_j softmax_j(s[i, :]) v[j]

The kernels work in base 2: ``s2 = s * log2(e)``, so ``exp`` becomes ``exp2`` and the saved
log-sum-exp is ``lse2[i] = log2(sum_j 2^{s2[i, j]})``. Backward, with ``p = 2^{s2 - lse2}`` and
``delta[i] = rowsum(dO[i] * o[i])``::

    dv[j] = sum_i p[i, j] dO[i]
    ds    = p * (dO·v^T - delta)
    dq[i] = scale * sum_j ds[i, j] k[j]
    dk[j] = scale * sum_i ds[i, j] q[i]

Shapes: q, o, dO, dq (B, Hq, N, d); k, v, dk, dv (B, Hkv, N, d), any strides with a unit-stride
last dim (each kernel takes every such tensor's batch, head and row strides: the model's
``rearrange``d projections, (B, N, H*d) storage seen as (B, H, N, d), are read in place); lse2,
delta (B, Hq, N) fp32 contiguous. o and dq are allocated in q's memory layout, dk in k's, dv in v's
(``_kernel_utils.empty_in_layout_of``), so the model's ``rearrange`` back of o is a view.

Tiling: the forward and dQ kernels own a block of BLOCK_M query rows of one (b, h) and walk the
key blocks left of the diagonal unmasked, then the BLOCK_M / BLOCK_N diagonal blocks with the
causal mask; blocks right of the diagonal are never visited. The dK/dV kernel owns BLOCK_N key
rows of one (b, g) and one slice of the group's query heads (:func:`dkdv_head_splits`: S slices
of G / S heads) and walks, for each head of its slice in turn, the diagonal query blocks (masked)
and then the query blocks below them (unmasked): the GQA sum over a slice's heads happens in
its registers, the S fp32 partials are summed in a fixed order afterwards, so there are no
atomics and the result is bitwise reproducible. The head dim is padded to BLOCK_D (a power of two >= 16) with
masked loads (no head-dim mask when BLOCK_D == d: the EVEN_D constexpr); row tails are masked
loads filled with zeros (see the comments in the kernels for why the zero rows contribute
nothing).

Each forward/backward pair is a ``torch.library.custom_op`` (``megabyte::flash_attn_fwd`` /
``megabyte::flash_attn_bwd``) with a fake (meta) implementation and registered autograd, so
``torch.compile`` treats them as opaque ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _kernel_utils as ku
from ._kernel_utils import distance, head_dim_block, load_tile
from .backends import interpreting

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _split_pid(N, BLOCK: tl.constexpr):
    """(row block, sequence) of a 1-D launch of cdiv(N, BLOCK) * sequences programs, row blocks
    fastest (the programs of one sequence run side by side and share its k/v in L2).

    1-D because CUDA caps grid axes y and z at 65,535: B*H sequences on axis 1 fail at launch
    once B*H > 65,535 (a local model with P > 64 runs this kernel with B*K*H sequences); axis x
    takes 2^31 - 1."""
    return _split_pid_of(tl.program_id(0), N, BLOCK)


@triton.jit
def _split_pid_longest_first(N, BLOCK: tl.constexpr):
    """:func:`_split_pid` with the row blocks of a sequence in reverse: under the causal mask the
    last query block (it visits every key block) is launched first and the shortest last, so the
    final wave holds the short programs instead of the longest."""
    pid_m, bh = _split_pid(N, BLOCK)
    return tl.cdiv(N, BLOCK) - 1 - pid_m, bh


@triton.jit
def _split_pid_of(pid, N, BLOCK: tl.constexpr):
    """(row block, sequence) of the program index pid of :func:`_split_pid`."""
    n_blocks = tl.cdiv(N, BLOCK)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _head_dim_mask(offs_d, D, EVEN_D: tl.constexpr):
    """offs_d < D; a constant all-true mask when EVEN_D (BLOCK_D == D), which the compiler folds
    away: the loads and stores of whole rows then carry no per-column predicate."""
    if EVEN_D:
        mask = tl.full(offs_d.shape, True, tl.int1)
    else:
        mask = offs_d < D
    return mask


@triton.jit
def _seq_base(b, h, stride_b, stride_h):
    """int64 offset of sequence (b, h) of a (B, H, N, d) tensor with batch and head strides
    stride_b, stride_h."""
    return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _rows_off_mask(base, offs_rows, offs_d, d_mask, N, stride_n, ROW_MASK: tl.constexpr):
    """Offsets and mask of the (rows, BLOCK_D) tile of the sequence at base (its int64 offset: see
    :func:`_seq_base`), rows stride_n apart, columns unit-stride: the head dim padded to BLOCK_D is
    masked, and rows >= N too when ROW_MASK. Row offsets inside a sequence are int32 (64-bit ones
    cost the pinned bf16 d = 128 compiles 12-65 more registers on sm_90): the custom ops hand over
    sequences of N * stride_n < 2^31 elements (:func:`_readable`)."""
    if ROW_MASK:
        mask = (offs_rows[:, None] < N) & d_mask[None, :]
    else:
        mask = d_mask[None, :]
    off = base + offs_rows[:, None] * stride_n + offs_d[None, :]
    return off, mask


@triton.jit
def _alibi_slope2(Slopes, h, HAS_ALIBI: tl.constexpr):
    """ALiBi slope of head h in base-2 units (0 without ALiBi)."""
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + h).to(tl.float32) * 1.4426950408889634
    else:
        slope2 = 0.0
    return slope2


@triton.jit
def _scores(q, k, offs_m, offs_n, qk_scale, slope2, HAS_ALIBI: tl.constexpr, DOT_PREC: tl.constexpr):
    """Base-2 scores s2 (BLOCK_M, BLOCK_N) of query rows offs_m against key rows offs_n, with ALiBi."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_ALIBI:
        s -= slope2 * distance(offs_m, offs_n)
    return s


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, k_base, v_base, offs_m, offs_d, d_mask, lo, hi, N, stride_kn, stride_vn,
               qk_scale, slope2, MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax sweep over key blocks [lo, hi) for one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # diagonal blocks may run past N; left of the diagonal every key index is < start_m <= N - 1
        k_off, kv_mask = _rows_off_mask(k_base, offs_n, offs_d, d_mask, N, stride_kn, MASKED)
        v_off, _ = _rows_off_mask(v_base, offs_n, offs_d, d_mask, N, stride_vn, MASKED)
        k = load_tile(K, k_off, kv_mask, UPCAST)
        v = load_tile(V, v_off, kv_mask, UPCAST)
        if HAS_ALIBI:  # s2 = s_raw * 1
            s_raw, s_scale = _scores(q, k, offs_m, offs_n, qk_scale, slope2, HAS_ALIBI, DOT_PREC), 1.0
        else:  # s2 = s_raw * qk_scale, scaled inside the FMA with the max subtraction below
            s_raw, s_scale = tl.dot(q, tl.trans(k), input_precision=DOT_PREC), qk_scale
        if MASKED:
            s_raw = tl.where(offs_m[:, None] >= offs_n[None, :], s_raw, float("-inf"))
        # Every row (live or tail) sees key start_m in the first diagonal block, so m_new is
        # finite from then on and exp2(-inf - m_new) = 0 for masked entries. s_scale > 0 (the
        # scale is validated positive), so max(s_raw) * s_scale is the row max of s2.
        m_new = tl.maximum(m_i, tl.max(s_raw, 1) * s_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s_raw * s_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _flash_fwd_kernel(Q, K, V, O, LSE, Slopes, scale, N, D, H, G, N_BUCKET,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                      HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M) * B*Hq,). Writes o (B, Hq, N, d) and lse2 (B, Hq, N)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the diagonal must cover whole key blocks")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs a contraction of at least 16")
    pid_m, bh = _split_pid_longest_first(N, BLOCK_M)  # bh = b * Hq + h
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = _head_dim_mask(offs_d, D, EVEN_D)
    q_off, q_mask = _rows_off_mask(_seq_base(b, h, stride_qb, stride_qh), offs_m, offs_d, d_mask, N, stride_qn, True)
    q = load_tile(Q, q_off, q_mask, UPCAST)
    k_base = _seq_base(b, h // G, stride_kb, stride_kh)
    v_base = _seq_base(b, h // G, stride_vb, stride_vh)
    qk_scale = scale * 1.4426950408889634
    slope2 = _alibi_slope2(Slopes, h, HAS_ALIBI)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, k_base, v_base, offs_m, offs_d, d_mask, 0, start_m, N,
                               stride_kn, stride_vn, qk_scale, slope2, False, HAS_ALIBI, UPCAST, DOT_PREC, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, k_base, v_base, offs_m, offs_d, d_mask, start_m,
                               tl.minimum(start_m + BLOCK_M, N), N, stride_kn, stride_vn, qk_scale, slope2, True,
                               HAS_ALIBI, UPCAST, DOT_PREC, BLOCK_N)
    acc = acc / l_i[:, None]
    o_off, o_mask = _rows_off_mask(_seq_base(b, h, stride_ob, stride_oh), offs_m, offs_d, d_mask, N, stride_on, True)
    tl.store(O + o_off, acc.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < N)


@triton.jit
def _flash_bwd_preprocess_kernel(O, DO, DELTA, N, D, H, stride_ob, stride_oh, stride_on,
                                 stride_dob, stride_doh, stride_don, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M) * B*Hq,). delta[i] = rowsum(dO[i] * o[i]) in fp32."""
    pid_m, bh = _split_pid(N, BLOCK_M)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    o_off, mask = _rows_off_mask(_seq_base(b, h, stride_ob, stride_oh), offs_m, offs_d, d_mask, N, stride_on, True)
    do_off, _ = _rows_off_mask(_seq_base(b, h, stride_dob, stride_doh), offs_m, offs_d, d_mask, N, stride_don, True)
    o = tl.load(O + o_off, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + do_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, row_base, offs_n, offs_d, d_mask, lo, hi, N,
                    stride_qn, stride_don, qk_scale, slope2, MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dk, dv (BLOCK_N, BLOCK_D) over query blocks [lo, hi) of one query head.

    Works on transposed scores sT (BLOCK_N, BLOCK_M) so dk and dv stay row-major in keys.
    Query rows >= N are loaded as q = dO = lse2 = delta = 0: their pT is finite and they add
    pT·0 to dv and (pT·(0 - 0))·0 to dk, i.e. nothing.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_mask = offs_m < N
        q_off, mask = _rows_off_mask(q_base, offs_m, offs_d, d_mask, N, stride_qn, True)
        do_off, _ = _rows_off_mask(do_base, offs_m, offs_d, d_mask, N, stride_don, True)
        q = load_tile(Q, q_off, mask, UPCAST)
        do = load_tile(DO, do_off, mask, UPCAST)
        lse2 = tl.load(LSE + row_base + offs_m, mask=row_mask, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=row_mask, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        if HAS_ALIBI:
            sT += slope2 * distance(offs_n, offs_m)  # -slope2 * (i - j), transposed
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:  # above the diagonal pT may be inf: where() drops it before any product
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _flash_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, Slopes, scale, N, D, H, G, N_BUCKET, HPS, stride_split,
                           stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                           stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                           HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (B*Hkv * cdiv(N, BLOCK_N) * S,), S = G / HPS slices of HPS query heads each.

    Program (bkv, key block, slice s) sums the dk, dv (BLOCK_N, d) of the HPS query heads
    s*HPS .. s*HPS + HPS - 1 of group g into DK, DV + s * stride_split: the (B, Hkv, N, d) result
    when S = 1, else slice s of S fp32 partials, each in the result's layout, that the launcher
    sums in a fixed order. Launch order: sequences outer, then key blocks from the first (the
    longest: it sees every query row) to the last, slices innermost (they share the block's k, v
    in L2).
    """
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "the diagonal must cover whole query blocks")
    S = G // HPS
    pid = tl.program_id(0)
    s = pid % S
    pid_n, bkv = _split_pid_of(pid // S, N, BLOCK_N)  # bkv = b * Hkv + g
    HKV = H // G
    b = bkv // HKV
    g = bkv % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = _head_dim_mask(offs_d, D, EVEN_D)
    k_off, kv_mask = _rows_off_mask(_seq_base(b, g, stride_kb, stride_kh), offs_n, offs_d, d_mask, N, stride_kn, True)
    v_off, _ = _rows_off_mask(_seq_base(b, g, stride_vb, stride_vh), offs_n, offs_d, d_mask, N, stride_vn, True)
    k = load_tile(K, k_off, kv_mask, UPCAST)
    v = load_tile(V, v_off, kv_mask, UPCAST)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N, N)
    # The GQA reduction: one program visits the query heads of its slice in a fixed order.
    for j in range(s * HPS, s * HPS + HPS):
        h = g * G + j
        q_base = _seq_base(b, h, stride_qb, stride_qh)
        do_base = _seq_base(b, h, stride_dob, stride_doh)
        row_base = (b * H + h).to(tl.int64) * N
        slope2 = _alibi_slope2(Slopes, h, HAS_ALIBI)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, row_base, offs_n, offs_d, d_mask,
                                 start_n, diag_end, N, stride_qn, stride_don, qk_scale, slope2, True, HAS_ALIBI,
                                 UPCAST, DOT_PREC, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, q_base, do_base, row_base, offs_n, offs_d, d_mask,
                                 start_n + BLOCK_N, N, N, stride_qn, stride_don, qk_scale, slope2, False, HAS_ALIBI,
                                 UPCAST, DOT_PREC, BLOCK_M)
    dk = dk * scale
    split = s.to(tl.int64) * stride_split
    dk_off, _ = _rows_off_mask(split + _seq_base(b, g, stride_dkb, stride_dkh), offs_n, offs_d, d_mask, N,
                               stride_dkn, True)
    dv_off, _ = _rows_off_mask(split + _seq_base(b, g, stride_dvb, stride_dvh), offs_n, offs_d, d_mask, N,
                               stride_dvn, True)
    tl.store(DK + dk_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K, V, k_base, v_base, offs_m, offs_d, d_mask, lo, hi, N, stride_kn,
                  stride_vn, qk_scale, slope2, MASKED: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dq (BLOCK_M, BLOCK_D) over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_off, kv_mask = _rows_off_mask(k_base, offs_n, offs_d, d_mask, N, stride_kn, MASKED)
        v_off, _ = _rows_off_mask(v_base, offs_n, offs_d, d_mask, N, stride_vn, MASKED)
        k = load_tile(K, k_off, kv_mask, UPCAST)
        v = load_tile(V, v_off, kv_mask, UPCAST)
        s = _scores(q, k, offs_m, offs_n, qk_scale, slope2, HAS_ALIBI, DOT_PREC)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _flash_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, Slopes, scale, N, D, H, G, N_BUCKET,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                         stride_dqb, stride_dqh, stride_dqn,
                         HAS_ALIBI: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M) * B*Hq,). Writes dq (B, Hq, N, d)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the diagonal must cover whole key blocks")
    pid_m, bh = _split_pid_longest_first(N, BLOCK_M)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = _head_dim_mask(offs_d, D, EVEN_D)
    row_mask = offs_m < N
    q_off, mask = _rows_off_mask(_seq_base(b, h, stride_qb, stride_qh), offs_m, offs_d, d_mask, N, stride_qn, True)
    do_off, _ = _rows_off_mask(_seq_base(b, h, stride_dob, stride_doh), offs_m, offs_d, d_mask, N, stride_don, True)
    q = load_tile(Q, q_off, mask, UPCAST)
    do = load_tile(DO, do_off, mask, UPCAST)
    lse2 = tl.load(LSE + bh.to(tl.int64) * N + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * N + offs_m, mask=row_mask, other=0.0)
    k_base = _seq_base(b, h // G, stride_kb, stride_kh)
    v_base = _seq_base(b, h // G, stride_vb, stride_vh)
    qk_scale = scale * 1.4426950408889634
    slope2 = _alibi_slope2(Slopes, h, HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, k_base, v_base, offs_m, offs_d, d_mask, 0, start_m, N,
                       stride_kn, stride_vn, qk_scale, slope2, False, HAS_ALIBI, UPCAST, DOT_PREC, BLOCK_N)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, k_base, v_base, offs_m, offs_d, d_mask, start_m,
                       tl.minimum(start_m + BLOCK_M, N), N, stride_kn, stride_vn, qk_scale, slope2, True, HAS_ALIBI,
                       UPCAST, DOT_PREC, BLOCK_N)
    dq = dq * scale
    dq_off, _ = _rows_off_mask(_seq_base(b, h, stride_dqb, stride_dqh), offs_m, offs_d, d_mask, N, stride_dqn, True)
    tl.store(DQ + dq_off, dq.to(DQ.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# configs: one pinned config in the interpreter, a small autotune list on the GPU
# --------------------------------------------------------------------------------------------
# Interpreter configs keep BLOCK_M != BLOCK_N so the multi-block diagonal paths are exercised.
INTERP = {"fwd": dict(BLOCK_M=32, BLOCK_N=16), "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
          "dq": dict(BLOCK_M=32, BLOCK_N=16)}


def pre_block_m(block_d: int) -> int:
    """Rows per preprocessing program: 4096 elements of o and dO (no register spills at d = 256)."""
    return max(16, 4096 // block_d)


def _cfgs(rows):
    out = []
    for bm, bn, w, s in rows:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class; the autotuner drops configs that
# run out of shared memory. fwd/dq need BLOCK_M % BLOCK_N == 0, dkdv BLOCK_N % BLOCK_M == 0.
# Compiled for sm_90 as a launch compiles them (benchmarks/results/aot-sm90.md, `make
# aot-table`): the first row of each 16-bit list (the pinned config, MEGABYTE_PIN_CONFIGS=1) is
# spill-free, with and without ALiBi, and at d <= 128 runs on wgmma (tests/kernels/test_aot.py).
# wgmma needs 64 rows per dot: BLOCK_M >= 64 (fwd/dq), BLOCK_N >= 64 (dkdv). No other row spills
# more than 32 B per thread. At d = 256 the wgmma dK/dV tiles spilled (64-row fp32 dk and dv
# accumulators of 256 columns): that list is mma.sync tiles plus the least-spilling wgmma one
# (16x64, spill-free at 255 registers since the head-split change).
GPU_FWD = {
    "small": [(128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    "mid": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 32, 8, 4)],
    "large": [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 3)],
}
GPU_DKDV = {
    "small": [(32, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 8, 3)],
    "mid": [(32, 64, 8, 2), (32, 64, 8, 3), (16, 128, 8, 2), (16, 128, 8, 3), (16, 64, 8, 2)],
    "large": [(16, 16, 4, 2), (16, 32, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2)],
}
GPU_DQ = {
    "small": [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    "mid": [(64, 16, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    "large": [(64, 32, 8, 2), (64, 16, 8, 2), (64, 64, 8, 2), (128, 16, 8, 2), (64, 32, 8, 3)],
}
# fp32 tiles take twice the shared memory and registers: smaller blocks, fewer stages, 8 warps
# (IEEE dots run on CUDA cores with their operands in registers: at 4 warps the first rows spilled
# 0.3-67 KB per thread on sm_90). The first row of each is spill-free at d = 64, 128 and 256, but
# dK/dV's at d = 128 (32 B per thread since the head-split and ALiBi changes: ptxas's choice).
GPU_FP32 = {
    "fwd": [(32, 16, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2), (64, 32, 8, 2)],
    "dkdv": [(16, 32, 8, 2), (16, 64, 8, 2), (32, 32, 8, 2)],
    "dq": [(32, 32, 8, 2), (32, 16, 8, 2), (64, 32, 8, 2)],
}
_KEY = ["N_BUCKET", "BLOCK_D", "HAS_ALIBI", "G"]
_TUNED: dict = {}


def gpu_configs(kind: str, block_d: int, dtype: torch.dtype) -> list:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) rows autotuned for a kernel kind and head dim."""
    if dtype == torch.float32:  # at d = 256 only the smallest tiles fit sm_80's shared memory
        return [c for c in GPU_FP32[kind] if block_d <= 128 or c[0] * c[1] <= 32 * 32]
    return {"fwd": GPU_FWD, "dkdv": GPU_DKDV, "dq": GPU_DQ}[kind][_d_class(block_d)]


def launch_configs(kind: str, block_d: int, dtype: torch.dtype) -> list:
    """The triton.Config list a launch of ``kind`` tunes over: the interpreter's single config
    (multi-config autotune fails there), else :func:`gpu_configs`; pinned to its first entry by
    ``MEGABYTE_PIN_CONFIGS=1`` (:func:`~megabyte_kernels._kernel_utils.prune_pinned`)."""
    return ku.autotune_configs(_cfgs(gpu_configs(kind, block_d, dtype)),
                               triton.Config(INTERP[kind], num_warps=4, num_stages=1))


def _tuned(kernel, kind, block_d, dtype):
    """The autotuned ``kernel`` for a kind, head-dim class and dtype class (built once)."""
    name = (kernel.__name__, kind, _d_class(block_d), dtype == torch.float32, interpreting())
    if name not in _TUNED:
        _TUNED[name] = triton.autotune(configs=launch_configs(kind, block_d, dtype), key=_KEY,
                                       prune_configs_by={"early_config_prune": ku.prune_pinned})(kernel)
    return _TUNED[name]


def _d_class(block_d: int) -> str:
    return "small" if block_d <= 64 else "mid" if block_d <= 128 else "large"


def _n_bucket(N: int) -> int:
    return min(triton.next_power_of_2(N), 32768)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _launch_fwd(q, k, v, alibi_slopes, scale):
    """q, k, v as :func:`_readable` hands them over, read in place; o in q's layout."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    o = ku.empty_in_layout_of(q)
    lse = ku.alloc((B, H, N), torch.float32, q.device)
    if N == 0 or B * H == 0:
        return o, lse
    BLOCK_D = head_dim_block(D)
    strides = ku.seq_strides(q) + ku.seq_strides(k) + ku.seq_strides(v) + ku.seq_strides(o)
    args = (q, k, v, o, lse, ku.slopes_arg(alibi_slopes, q.device), float(scale), N, D, H, G, _n_bucket(N)) + strides
    meta = dict(BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D, **ku.attention_flags(q.dtype, alibi_slopes))
    kern = _tuned(_flash_fwd_kernel, "fwd", BLOCK_D, q.dtype)
    kern[lambda m: (triton.cdiv(N, m["BLOCK_M"]) * B * H,)](*args, **meta)
    return o, lse


def dkdv_head_splits(programs: int, G: int, sms: int) -> int:
    """S, the slices the G query heads of a group are spread over in the dK/dV kernel.

    With S = 1 the dK/dV grid has cdiv(N, BLOCK_N) * B * Hkv programs: at multi-query (Hkv = 1),
    B = 1, N = 8K and BLOCK_N = 128 that is 64 programs for 132 SMs. ``programs`` is that count at
    the largest BLOCK_N of the autotune list; S is the smallest divisor of G that gives at least four
    programs per SM. Splitting costs only the k/v loads of the extra slices and the fp32 partials
    (the q and dO rows each program reads are its own heads'). At two programs per SM (the first
    rule) ``benchmarks.perf_model`` modelled the BLOCK_N = 128 configs at 0.81 wave efficiency
    (512 programs, 1 block per SM, causal work per program) at multi-query, B = 1, H = 16, N = 8K;
    at four, 0.89 (BLOCK_N = 128: 1,024 programs) to 0.99 (BLOCK_N = 64: 2,048) for every config at
    d = 128, B = 1 (S = 16) and B = 4 (S = 4), against 0.25 (B = 1) and 0.66 (B = 4) unsplit.
    """
    return next((s for s in range(1, G + 1) if G % s == 0 and programs * s >= 4 * sms), G)


def _in_layout_of(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """flat, x.numel() contiguous elements, seen with x's shape and the dense strides
    :func:`~megabyte_kernels._kernel_utils.empty_in_layout_of` gives a buffer for x (``torch.empty_like``'s)."""
    return flat.as_strided(x.shape, torch.empty_like(x, device="meta").stride())


def _launch_bwd(do, q, k, v, o, lse, alibi_slopes, scale):
    """do, q, k, v, o as :func:`_readable` hands them over, read in place; lse contiguous; dq in q's
    layout, dk in k's, dv in v's."""
    B, H, N, D = q.shape
    HKV = k.shape[1]
    G = H // HKV
    dq = ku.empty_in_layout_of(q)
    if N == 0 or B * H == 0:
        return dq, ku.empty_in_layout_of(k), ku.empty_in_layout_of(v)
    BLOCK_D = head_dim_block(D)
    delta = ku.alloc((B, H, N), torch.float32, q.device)
    pre_m = pre_block_m(BLOCK_D)
    _flash_bwd_preprocess_kernel[(triton.cdiv(N, pre_m) * B * H,)](
        o, do, delta, N, D, H, *ku.seq_strides(o), *ku.seq_strides(do), BLOCK_M=pre_m, BLOCK_D=BLOCK_D)
    slopes = ku.slopes_arg(alibi_slopes, q.device)
    meta = dict(BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D, **ku.attention_flags(q.dtype, alibi_slopes))
    tail = (float(scale), N, D, H, G, _n_bucket(N))
    if interpreting() and q.device.type == "cpu":  # exercise the partial sums
        S = next((s for s in range(2, G + 1) if G % s == 0), 1)
    else:
        max_block_n = max(c[1] for c in gpu_configs("dkdv", BLOCK_D, q.dtype))
        S = dkdv_head_splits(triton.cdiv(N, max_block_n) * B * HKV, G, ku.sm_count(q.device))
    if S == 1:
        dk, dv = ku.empty_in_layout_of(k), ku.empty_in_layout_of(v)
        dk_out, dv_out, stride_split = dk, dv, 0
    else:  # fp32 partials (2, S, B*Hkv*N*d): slice s of dk, then of dv, each in dk's / dv's layout
        partial = ku.alloc((2, S, k.numel()), torch.float32, q.device)
        dk_out, dv_out, stride_split = _in_layout_of(partial[0, 0], k), _in_layout_of(partial[1, 0], v), k.numel()
    qkv_do = ku.seq_strides(q) + ku.seq_strides(k) + ku.seq_strides(v) + ku.seq_strides(do)
    dkdv_args = ((q, k, v, do, lse, delta, dk_out, dv_out, slopes) + tail + (G // S, stride_split) + qkv_do
                 + ku.seq_strides(dk_out) + ku.seq_strides(dv_out))
    dq_args = (q, k, v, do, lse, delta, dq, slopes) + tail + qkv_do + ku.seq_strides(dq)
    dkdv = _tuned(_flash_bwd_dkdv_kernel, "dkdv", BLOCK_D, q.dtype)
    dkdv[lambda m: (triton.cdiv(N, m["BLOCK_N"]) * B * HKV * S,)](*dkdv_args, **meta)
    if S > 1:  # the fixed-order sum of the slices over their storage order: deterministic, no atomics
        R = k.numel() // D
        dk = _in_layout_of(ku.sum_leading(partial[0].view(S, R, D), R, k.dtype), k)
        dv = _in_layout_of(ku.sum_leading(partial[1].view(S, R, D), R, v.dtype), v)
    dq_kernel = _tuned(_flash_bwd_dq_kernel, "dq", BLOCK_D, q.dtype)
    dq_kernel[lambda m: (triton.cdiv(N, m["BLOCK_M"]) * B * H,)](*dq_args, **meta)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# custom ops + autograd
# --------------------------------------------------------------------------------------------
def _readable(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, d) input as the kernels read it: x itself when its rows are unit-stride and one
    sequence spans fewer than 2^31 elements (N * row stride: the kernels' offsets inside a sequence
    are int32), else a contiguous copy (:func:`~megabyte_kernels._kernel_utils.rows`: a ``.sum()``
    gradient has stride 0)."""
    x = ku.rows(x)
    return x if x.shape[2] * x.stride(2) < 2 ** 31 else x.contiguous()


@torch.library.custom_op("megabyte::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o (B, Hq, N, d) in q's layout, lse2 (B, Hq, N) fp32, base-2 log-sum-exp). q, k, v
    are read through their strides (:func:`_readable`)."""
    return _launch_fwd(_readable(q), _readable(k), _readable(v), alibi_slopes, scale)


@flash_attn_fwd.register_fake
def _(q, k, v, alibi_slopes, scale):
    B, H, N, _ = q.shape
    return torch.empty_like(_readable(q)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("megabyte::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) shaped and laid out like q, k, v (:func:`~megabyte_kernels._kernel_utils.
    empty_in_layout_of`). dO (a ``.sum()`` gradient has stride 0), q, k, v, o are read through their
    strides (:func:`_readable`)."""
    return _launch_bwd(_readable(do), _readable(q), _readable(k), _readable(v), _readable(o), lse.contiguous(),
                       alibi_slopes, scale)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, alibi_slopes, scale):
    return tuple(torch.empty_like(_readable(x)) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, alibi_slopes)
    ctx.scale = scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, alibi_slopes, ctx.scale)
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, alibi_slopes=None, scale=None):
    """Flash attention (unvalidated; use :func:`megabyte_kernels.attention.flash_attention`)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return flash_attn_fwd(q, k, v, alibi_slopes, float(scale))[0]
