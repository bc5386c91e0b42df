"""What the Triton kernels share, in one room (as Liger-Kernel keeps ``ops/utils.py``).

* **Allocation**: :func:`alloc` / :func:`empty_like` / :func:`empty_in_layout_of` make every
  buffer the Triton path writes (the tests swap in a NaN fill here, once for every op);
  :func:`rows` and :func:`seq_strides` let the attention kernels read strided views in place.
* **Autotune configs**: :func:`autotune_configs` (the interpreter's single config or the GPU list) and
  the one pinning switch, ``MEGABYTE_PIN_CONFIGS=1`` (:func:`configs_pinned`,
  :func:`prune_pinned`).
* **Numerics**: :func:`upcast` (the interpreter's bf16), :func:`dot_precision` (TF32 like
  torch.matmul), :func:`head_dim_block`; the attention kernels' mode flags and ALiBi slopes
  (:func:`attention_flags`, :func:`slopes_arg`).
* **Tile helpers** ``@triton.jit`` :func:`load_tile`, :func:`distance`.
* **The deterministic table gradient** both byte-level ops use (patch_embed's token table and
  pad patch, global_to_local's local table, local pad and bias): :func:`onehot_grad`, a one-hot
  matmul on tensor cores split over rows with fixed boundaries, and :func:`sum_leading`, the
  fixed-order sum of its partials (also patch_embed's position gradient and the dW partials).

Op modules import from here, :mod:`.backends`, :mod:`.reference`, :mod:`._validate` and
:mod:`._triton_compat` only.
"""
from __future__ import annotations

import os

import torch

from ._triton_compat import tl, triton
from .backends import interpreting


# One switch pins every autotuned Triton kernel to the first config of its list: no tuning time,
# the same program on every run. The root conftest sets it for the test suite, gpu-check for its
# smoke stage; read at each launch (an autotuner's early_config_prune), not at import.
PIN_CONFIGS_ENV = "MEGABYTE_PIN_CONFIGS"


def configs_pinned() -> bool:
    """True when ``MEGABYTE_PIN_CONFIGS`` is set (and not ``0``): autotuning is off."""
    return os.environ.get(PIN_CONFIGS_ENV, "0") not in ("", "0")


def prune_pinned(configs: list, named_args: dict | None = None, **kwargs) -> list:
    """``early_config_prune`` of every autotuned kernel: the first config alone when
    :func:`configs_pinned`, else all of them."""
    return configs[:1] if configs_pinned() else configs


def alloc(shape, dtype, device) -> torch.Tensor:
    """Every buffer the Triton path writes comes from here: the tests swap in a NaN fill to
    prove that each element is written (one place for all the ops)."""
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """:func:`alloc` of x's shape, dtype and device (contiguous)."""
    return alloc(x.shape, x.dtype, x.device)


def rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is unit-stride (the kernels read it through its other strides:
    the model's ``rearrange``d projections go in without a copy), else a contiguous copy (a
    ``.sum()`` gradient has stride 0 everywhere)."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def empty_in_layout_of(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`alloc` of x's shape with the strides ``torch.empty_like(x)`` gives it: x's own when x
    is dense, else dense with its dims in x's stride order. An attention output laid out like a
    ``rearrange``d q is ``rearrange``d back by a view, without a copy (PyTorch's flash attention
    also returns (B, N, H, d) storage), and so is the gradient of a ``rearrange``d half of a k/v
    projection. The fake (meta) implementations return ``torch.empty_like`` of the same input."""
    strides = torch.empty_like(x, device="meta").stride()
    return alloc((x.numel(),), x.dtype if dtype is None else dtype, x.device).as_strided(x.shape, strides)


def seq_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, N, d) tensor whose last dim is unit-stride, as
    the attention kernels take them."""
    assert x.stride(-1) == 1 or x.shape[-1] == 1, "rows must be unit-stride (see rows())"
    return x.stride(0), x.stride(1), x.stride(2)


def autotune_configs(full: list, interpreter: "triton.Config") -> list:
    """Autotune configs: one small config in the interpreter (multi-config autotune fails there,
    and each executed tl op costs the same whatever the tile), else the full GPU list, which
    :func:`prune_pinned` cuts to its first config when configs are
    pinned (``MEGABYTE_PIN_CONFIGS=1``: the test suite, gpu-check's smoke stage)."""
    return [interpreter] if interpreting() else full


def upcast(dtype: torch.dtype) -> bool:
    """bf16 arithmetic is wrong in the interpreter: there, tiles are cast to fp32 after loading."""
    return dtype == torch.bfloat16 and interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs honour torch's TF32 switch (off by default) like torch.matmul does."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def attention_flags(dtype: torch.dtype, alibi_slopes) -> dict:
    """The mode constexprs both attention families take: HAS_ALIBI, UPCAST (:func:`upcast`) and
    DOT_PREC, exact IEEE products for fp32 inputs (TF32 would break the fp32 tolerance)."""
    return dict(HAS_ALIBI=alibi_slopes is not None, UPCAST=upcast(dtype),
                DOT_PREC="ieee" if dtype == torch.float32 else "tf32")


def slopes_arg(alibi_slopes, device) -> torch.Tensor:
    """ALiBi slopes as the kernels read them, (H,) fp32 contiguous; a 1-element dummy without."""
    if alibi_slopes is None:
        return torch.empty(1, dtype=torch.float32, device=device)
    return alibi_slopes.detach().to(torch.float32).contiguous()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the H200's 132 elsewhere (meta tensors, CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def head_dim_block(d: int) -> int:
    """BLOCK_D: d padded to a power of two, at least 16 (tl.dot's minimum contraction)."""
    return max(16, triton.next_power_of_2(d))


@triton.jit
def load_tile(X, off, mask, UPCAST: tl.constexpr):
    """Masked load of a tile (zeros outside the mask); fp32 when UPCAST (the interpreter's bf16)."""
    x = tl.load(X + off, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def distance(rows, cols):
    """(rows[:, None] - cols[None, :]) in fp32 for int index vectors (the ALiBi distance): the
    two 1-D vectors are converted, not each element of the tile (cvt.rn.f32.s32 issues at a
    fraction of the FMA rate). Exact below 2^24, like the converted integer difference."""
    return rows.to(tl.float32)[:, None] - cols.to(tl.float32)[None, :]


@triton.jit
def _onehot_grad_kernel(
    Codes, G, Partial,
    N, D, VE, rows_per_split, ones_row,
    BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial[s, v, :] = sum over rows n of split s with codes[n] == v (or v == ones_row) of G[n, :].

    One (BLOCK_V, BLOCK_N) one-hot tile times one (BLOCK_N, BLOCK_D) tile of G per step, on
    tensor cores; the one-hot entries are exactly 0 or 1 so every product is exact and the sum
    is fp32. ``ones_row`` (or -1) is a row of all ones: the column sum of G (a bias gradient).
    """
    tl.static_assert(BLOCK_V >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_v = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    vs = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = pid_s.to(tl.int64) * rows_per_split
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for i in range(0, tl.cdiv(rows_per_split, BLOCK_N)):
        ns = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = (ns < N) & (ns < start + rows_per_split)
        codes = tl.load(Codes + ns, mask=nmask, other=-1)
        hit = (codes[None, :] == vs[:, None]) | ((vs[:, None] == ones_row) & nmask[None, :])
        g = tl.load(G + ns[:, None] * D + cols[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
        acc = tl.dot(hit.to(g.dtype), g, acc, input_precision=PRECISION)
    out = Partial + pid_s.to(tl.int64) * VE * D + vs[:, None].to(tl.int64) * D + cols[None, :]
    tl.store(out, acc, mask=(vs[:, None] < VE) & cmask[None, :])


@triton.jit
def _sum_leading_kernel(
    X, Out, S, R_in, R_out, D, stride_xs,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Out[r, :] = sum_{s < S} X[s, r, :] for r < R_in, 0 for R_in <= r < R_out (fixed order).

    X is (S, R_in, D) with rows of stride D and a leading stride ``stride_xs``.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    lmask = (rows < R_in)[:, None] & cmask[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    x_ptrs = X + rows[:, None] * D + cols[None, :]
    for _ in range(0, S):
        acc += tl.load(x_ptrs, mask=lmask, other=0.0).to(tl.float32)
        x_ptrs += stride_xs  # pointer increments: 64-bit, no int32 product s * stride
    smask = (rows < R_out)[:, None] & cmask[None, :]
    tl.store(Out + rows[:, None] * D + cols[None, :], acc.to(Out.dtype.element_ty), mask=smask)


def sum_leading(x: torch.Tensor, r_out: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, R, D) contiguous -> (r_out, D) in ``dtype``: the sum over S, zero rows past R."""
    S, R, D = x.shape
    out = alloc((r_out, D), dtype, x.device)
    BLOCK_R, BLOCK_D = (16, 32) if interpreting() else (8, 256)
    grid = (triton.cdiv(r_out, BLOCK_R), triton.cdiv(D, BLOCK_D))
    _sum_leading_kernel[grid](x, out, S, R, r_out, D, R * D, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return out


def onehot_config(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """GPU (BLOCK_V, BLOCK_N, BLOCK_D, num_warps, num_stages) of the one-hot kernel.

    fp32 (IEEE dot on CUDA cores) takes 64x64 tiles: 128x128 reaches the 255-register cap.
    """
    return (64, 32, 64, 4, 3) if dtype == torch.float32 else (128, 64, 128, 8, 3)


# Blocks per SM of the one-hot kernel's GPU config (benchmarks/results/aot-sm90.md: bf16 170
# registers x 8 warps -> 1; fp32 128 registers x 4 warps -> 4, by registers).
ONEHOT_BLOCKS_PER_SM = {torch.float32: 4, torch.bfloat16: 1, torch.float16: 1}


def split_rows(n: int, block: int, tiles: int, min_programs: int, slots: int) -> tuple[int, int]:
    """(splits, rows_per_split) of n rows for a launch of tiles * splits programs of equal work
    (a split-K GEMM): splits boundaries on whole blocks of ``block`` rows, at least
    ``min_programs`` programs, and the program count on whole waves of ``slots`` (SMs x blocks
    per SM): the first split count from the smallest up to twice it whose wave utilisation
    ``programs / (ceil(programs / slots) * slots)`` reaches 0.95, else the best of them.
    """
    n_blocks = triton.cdiv(n, block)
    lo = max(1, min(n_blocks, triton.cdiv(min_programs, tiles)))
    best = None
    for s in range(lo, min(n_blocks, 2 * lo) + 1):
        rows_per_split = triton.cdiv(n_blocks, s) * block
        splits = triton.cdiv(n, rows_per_split)
        programs = tiles * splits
        util = programs / (triton.cdiv(programs, slots) * slots)
        if best is None or util > best[0]:
            best = (util, splits, rows_per_split)
        if util >= 0.95:
            break
    return best[1], best[2]


def onehot_grad(codes: torch.Tensor, g: torch.Tensor, ve: int, ones_row: int = -1) -> torch.Tensor:
    """(VE, D) fp32 ``onehot(codes)^T @ g`` for codes (N,) int32 and g (N, D) contiguous.

    Deterministic: the N rows are split over programs with fixed boundaries, each split writes
    its own fp32 partial, and the partials are summed in a fixed order.
    """
    N, D = g.shape
    if interpreting():
        BLOCK_V, BLOCK_N, BLOCK_D, warps, stages = 16, 16, 32, 4, 1
        min_programs, slots = 2, 1  # two programs: a single tile splits in two (the partial sum)
    else:
        BLOCK_V, BLOCK_N, BLOCK_D, warps, stages = onehot_config(g.dtype)
        sms = sm_count(g.device)
        min_programs, slots = 4 * sms, sms * ONEHOT_BLOCKS_PER_SM[g.dtype]
    tiles = triton.cdiv(ve, BLOCK_V) * triton.cdiv(D, BLOCK_D)
    splits, rows_per_split = split_rows(N, BLOCK_N, tiles, min_programs, slots)
    partial = alloc((splits, ve, D), torch.float32, g.device)
    grid = (triton.cdiv(ve, BLOCK_V), triton.cdiv(D, BLOCK_D), splits)
    _onehot_grad_kernel[grid](
        codes, g, partial, N, D, ve, rows_per_split, ones_row,
        BLOCK_V=BLOCK_V, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        # always IEEE: the reference's embedding backward sums in full fp32, TF32 would round dOut
        UPCAST=upcast(g.dtype), PRECISION="ieee", num_warps=warps, num_stages=stages,
    )
    if splits == 1:
        return partial[0]
    return sum_leading(partial, ve, torch.float32)
