"""Parity tests for the Triton causal attention: flash (global) and packed (local) families.

Tier 2 (interpreter, CPU tensors under TRITON_INTERPRET=1), tier 3 (``aot``: compiled for
sm_80/sm_90 without a GPU) and tier 4 (``gpu``: skipped without CUDA). Tolerance is
FlashAttention's rule (DESIGN.md §4): the kernel's max error against a float64 reference is at
most 2x the error of the reference computed at the same precision, plus a per-dtype floor.
"""
from __future__ import annotations

import math

import pytest
import torch

from megabyte_kernels import attention, reference
from megabyte_kernels.attention import causal_attention, flash_attention, local_attention
from tests._device import DEVICE, needs_triton_path

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

FAMILIES = {"flash": flash_attention, "local": local_attention}

# dtype together with its tolerance floor. bf16 runs in the interpreter through the upcast
# constexpr (checks the indexing, not the GPU's bf16 numerics: that is the gpu tier).
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
]
BF16 = pytest.param(torch.bfloat16, 1e-2, id="bf16")

# (B, Hq, Hkv, N, d, contiguous)
FLASH_SHAPES = [
    (1, 1, 1, 1, 16, True),  # N = 1
    (2, 2, 2, 37, 32, False),  # N not a multiple of any block, batch 2
    (1, 4, 1, 70, 48, False),  # MQA, d = 48 padded to 64
    (1, 4, 2, 65, 80, True),  # GQA, d = 80 padded to 128
    (1, 4, 4, 96, 64, False),  # N a multiple of the blocks
]
# (B*K, Hq, Hkv, P, d, contiguous)
LOCAL_SHAPES = [
    (3, 1, 1, 1, 16, True),  # P = 1
    (5, 2, 2, 8, 64, False),  # the local model's P = 8, d = 64
    (7, 4, 1, 8, 48, False),  # MQA
    (3, 4, 2, 6, 80, True),  # GQA, P not a power of two, d = 80
    (2, 4, 4, 64, 32, False),  # one sequence per tile
    (4, 4, 2, 33, 16, True),  # odd P
]


def _make(B, Hq, Hkv, N, d, contiguous, dtype, seed=0):
    """q, k, v (leaves that require grad), dO and ALiBi slopes on DEVICE. Non-contiguous cases
    transpose after the device and dtype conversion (``.to()`` may copy to contiguous)."""
    g = torch.Generator().manual_seed(seed)

    def t(H):
        if contiguous:
            return torch.randn(B, H, N, d, generator=g).to(DEVICE, dtype).requires_grad_()
        # (B, N, H, d) storage seen as (B, H, N, d): non-contiguous
        x = torch.randn(B, N, H, d, generator=g).to(DEVICE, dtype).transpose(1, 2).requires_grad_()
        assert not x.is_contiguous() or H == 1 or N == 1
        return x

    q, k, v = t(Hq), t(Hkv), t(Hkv)
    do = torch.randn(B, Hq, N, d, generator=g).to(DEVICE, dtype)
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / Hq) for h in range(Hq)], device=DEVICE)
    return q, k, v, do, slopes


def _grads(fn, q, k, v, do, **kw):
    for x in (q, k, v):
        x.grad = None
    o = fn(q, k, v, **kw)
    o.backward(do)
    return o.detach(), [x.grad.detach().clone() for x in (q, k, v)]


def _assert_close(name, got, ref_low, ref64, floor):
    err = (got.double() - ref64).abs().max().item()
    base = (ref_low.double() - ref64).abs().max().item()
    assert math.isfinite(err), f"{name}: non-finite output"
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 * {base:.3g} + {floor}"


def _check_parity(fn, shape, alibi, dtype, floor, monkeypatch):
    from megabyte_kernels import _kernel_utils as ku

    # Every buffer the kernels write (outputs, lse, delta) prefilled with NaN: each element must be written.
    nan_alloc = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)  # noqa: E731
    monkeypatch.setattr(ku, "alloc", nan_alloc)
    q, k, v, do, slopes = _make(*shape, dtype)
    kw = dict(alibi_slopes=slopes if alibi else None)
    o, g = _grads(fn, q, k, v, do, **kw)
    o2, g2 = _grads(fn, q, k, v, do, **kw)
    assert o.shape == q.shape and o.dtype == dtype
    for a, b in zip([o] + g, [o2] + g2):  # forward and backward are deterministic
        assert torch.equal(a, b)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64, g64 = _grads(reference.causal_attention, q64, k64, v64, do.double(), **kw)
    ol, gl = _grads(reference.causal_attention, q, k, v, do, **kw)
    _assert_close("o", o, ol, o64, floor)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), g, gl, g64):
        assert a.shape == hi.shape
        _assert_close(name, a, lo, hi, floor)


# --------------------------------------------------------------------------------------------
# tier 2: interpreter parity
# --------------------------------------------------------------------------------------------
@needs_triton_path
@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("shape", FLASH_SHAPES, ids=lambda s: "B{}_Hq{}_Hkv{}_N{}_d{}_{}".format(
    *s[:5], "c" if s[5] else "nc"))
def test_flash_parity(shape, alibi, dtype, floor, monkeypatch):
    _check_parity(flash_attention, shape, alibi, dtype, floor, monkeypatch)


@needs_triton_path
@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("shape", LOCAL_SHAPES, ids=lambda s: "BK{}_Hq{}_Hkv{}_P{}_d{}_{}".format(
    *s[:5], "c" if s[5] else "nc"))
def test_local_parity(shape, alibi, dtype, floor, monkeypatch):
    _check_parity(local_attention, shape, alibi, dtype, floor, monkeypatch)


@needs_triton_path
@pytest.mark.parametrize("dtype,floor", [BF16])
@pytest.mark.parametrize("family,shape", [("flash", (1, 4, 2, 40, 48, False)), ("local", (5, 4, 1, 8, 64, False))])
def test_bf16_indexing(family, shape, dtype, floor, monkeypatch):
    _check_parity(FAMILIES[family], shape, True, dtype, floor, monkeypatch)


@needs_triton_path
@pytest.mark.parametrize("N,family", [(8, "local"), (64, "local"), (65, "flash")])
def test_backend_triton_picks_family_by_length(N, family, monkeypatch):
    import megabyte_kernels.flash_attention as fa_mod
    import megabyte_kernels.local_attention as la_mod

    called = []
    for mod, name in ((fa_mod, "flash"), (la_mod, "local")):
        fn = getattr(mod, f"{name}_attention")
        monkeypatch.setattr(mod, f"{name}_attention", lambda *a, _fn=fn, _n=name: called.append(_n) or _fn(*a))
    assert N > attention.LOCAL_MAX_N or family == "local"
    q, k, v, do, slopes = _make(1, 2, 1, N, 16, True, torch.float32)
    o = causal_attention(q, k, v, alibi_slopes=slopes, scale=0.3, backend="triton")
    assert called == [family]
    ref = reference.causal_attention(q.double(), k.double(), v.double(), alibi_slopes=slopes, scale=0.3)
    assert (o.double() - ref).abs().max().item() < 1e-5


@needs_triton_path
def test_triton_rejects_bad_input():
    randn = lambda *shape, dtype=torch.float32: torch.randn(*shape, dtype=dtype, device=DEVICE)  # noqa: E731
    q = randn(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        causal_attention(q, q, q, backend="triton")
    q = randn(1, 2, 200, 16)
    with pytest.raises(ValueError, match="N must be <= 128"):
        local_attention(q, q, q)
    with pytest.raises(ValueError, match="head dims up to 256"):
        flash_attention(*(randn(1, 1, 4, 320),) * 3)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(randn(1, 3, 8, 16), randn(1, 2, 8, 16), randn(1, 2, 8, 16))


def test_triton_rejects_cpu_tensors_without_the_interpreter(monkeypatch):
    """Without CUDA tensors and without TRITON_INTERPRET the Triton path says so (no launch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        causal_attention(q, q, q, backend="triton")


# --------------------------------------------------------------------------------------------
# custom ops: opcheck and torch.compile
# --------------------------------------------------------------------------------------------
@needs_triton_path
@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
def test_opcheck(alibi):
    # the custom ops register when their modules are imported (causal_attention imports them lazily)
    import megabyte_kernels.flash_attention  # noqa: F401
    import megabyte_kernels.local_attention  # noqa: F401

    q, k, v, do, slopes = _make(1, 2, 1, 20, 16, True, torch.float32)
    s = slopes if alibi else None
    ops = torch.ops.megabyte
    torch.library.opcheck(ops.flash_attn_fwd.default, (q, k, v, s, 0.25))
    o, lse = ops.flash_attn_fwd(q, k, v, s, 0.25)
    torch.library.opcheck(ops.flash_attn_bwd.default, (do, q.detach(), k.detach(), v.detach(), o.detach(),
                                                       lse, s, 0.25))
    # (B, N, H, d) storage seen as (B, H, N, d), GQA: o and dq come back in q's layout, dk and dv in
    # k's (the head-split partials' sum too: the interpreter splits G = 2 heads in S = 2); the fake
    # implementations must give the same strides
    q, k, v, do, slopes = _make(1, 4, 2, 20, 16, False, torch.float32)
    s = slopes if alibi else None
    torch.library.opcheck(ops.flash_attn_fwd.default, (q, k, v, s, 0.25))
    o, lse = ops.flash_attn_fwd(q, k, v, s, 0.25)
    assert o.stride() == q.stride()
    do = do.transpose(1, 2).contiguous().transpose(1, 2)  # dO in o's layout, as the model's gradient
    torch.library.opcheck(ops.flash_attn_bwd.default, (do, q.detach(), k.detach(), v.detach(), o.detach(),
                                                       lse, s, 0.25))
    dq, dk, dv = ops.flash_attn_bwd(do, q.detach(), k.detach(), v.detach(), o.detach(), lse, s, 0.25)
    assert (dq.stride(), dk.stride(), dv.stride()) == (q.stride(), k.stride(), v.stride())
    ql, kl, vl, dol, sl = _make(3, 2, 1, 8, 16, True, torch.float32)
    sl = sl if alibi else None
    torch.library.opcheck(ops.local_attn_fwd.default, (ql, kl, vl, sl, 0.25))
    torch.library.opcheck(ops.local_attn_bwd.default, (dol, ql.detach(), kl.detach(), vl.detach(), sl, 0.25))


@needs_triton_path
def test_torch_compile():
    q, k, v, do, slopes = _make(1, 2, 1, 70, 16, True, torch.float32)

    def f(q, k, v):
        return causal_attention(q, k, v, alibi_slopes=slopes, backend="triton") + local_attention(
            q[:, :, :8], k[:, :, :8], v[:, :, :8]).sum()

    ref_o, ref_g = _grads(f, q, k, v, do)
    got_o, got_g = _grads(torch.compile(f, fullgraph=True), q, k, v, do)
    for a, b in zip([ref_o] + ref_g, [got_o] + got_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# local attention reads the model's views in place
# --------------------------------------------------------------------------------------------
class _PtrSpy:
    """Wraps a kernel: ``kernel[grid](*args, **meta)`` records the data_ptr of every tensor
    argument, then launches the real kernel."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.seen.append([a.data_ptr() for a in args if isinstance(a, torch.Tensor)])
            return self.kernel[grid](*args, **meta)
        return launch


def _model_layout(BK, H, Hkv, P, d, dtype, seed=0):
    """q, k, v as the local model makes them: q rearranged from a (B*K, P, H*d) projection, k and
    v the two halves of a (B*K, P, 2*Hkv*d) one (DEVICE leaves of the projections)."""
    g = torch.Generator().manual_seed(seed)
    xq = torch.randn(BK, P, H * d, generator=g).to(DEVICE, dtype).requires_grad_()
    xkv = torch.randn(BK, P, 2 * Hkv * d, generator=g).to(DEVICE, dtype).requires_grad_()
    q = xq.view(BK, P, H, d).transpose(1, 2)
    k, v = (t.reshape(BK, P, Hkv, d).transpose(1, 2) for t in xkv.chunk(2, dim=-1))
    return xq, xkv, q, k, v


@needs_triton_path
def test_local_attention_reads_strided_views_without_copies(monkeypatch):
    """The kernels get the projections' own storage (no .contiguous() copy of q, k, v or dO),
    o comes back in q's layout (its rearrange back to (B*K, P, H*d) is a view), and the result
    still matches the reference."""
    from megabyte_kernels import local_attention as la

    seen = []
    for name in ("_local_fwd_kernel", "_local_bwd_kernel"):
        monkeypatch.setattr(la, name, _PtrSpy(getattr(la, name), seen))
    xq, xkv, q, k, v = _model_layout(5, 4, 2, 8, 16, torch.float32)
    o = local_attention(q, k, v)
    assert seen[0][:3] == [xq.data_ptr(), xkv.data_ptr(), xkv.data_ptr() + 2 * 16 * xkv.element_size()]
    assert seen[0][3] == o.data_ptr() and o.stride() == q.stride()
    assert o.transpose(1, 2).reshape(5, 8, 4 * 16).data_ptr() == o.data_ptr()
    do = torch.randn(5, 8, 4 * 16, device=DEVICE).view(5, 8, 4, 16).transpose(1, 2)
    o.backward(do)
    assert seen[1][:4] == seen[0][:3] + [do.data_ptr()]
    ref = reference.causal_attention(*(x.detach().requires_grad_() for x in (q, k, v)))
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


@needs_triton_path
def test_local_attention_opcheck_on_the_models_views():
    """The fake implementations promise the real outputs' strides for strided inputs too."""
    import megabyte_kernels.local_attention  # noqa: F401 (registers the custom ops)

    _, _, q, k, v = _model_layout(3, 2, 1, 8, 16, torch.float32, seed=2)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    ops = torch.ops.megabyte
    torch.library.opcheck(ops.local_attn_fwd.default, (q, k, v, None, 0.25))
    do = torch.randn(3, 8, 2, 16, device=DEVICE).transpose(1, 2)
    torch.library.opcheck(ops.local_attn_bwd.default, (do, q.detach(), k.detach(), v.detach(), None, 0.25))


@needs_triton_path
def test_local_attention_gradient_of_a_sum():
    """dO of ``.sum()`` has stride 0 everywhere: copied to rows, the gradients are right."""
    _, _, q, k, v = _model_layout(3, 2, 1, 8, 16, torch.float32, seed=1)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))  # strided leaves
    local_attention(q, k, v).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    reference.causal_attention(q64, k64, v64).sum().backward()
    for a, b in zip((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# flash attention reads the model's views in place
# --------------------------------------------------------------------------------------------
class _NamedPtrSpy:
    """:class:`_PtrSpy` by argument name (the four flash kernels take their tensors in different
    orders): records {name: data_ptr} of each tensor argument, then launches the real kernel."""

    def __init__(self, jit, kernel, launches):
        self.jit, self.kernel, self.launches = jit, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **meta):
            ptrs = {n: a.data_ptr() for n, a in zip(self.jit.arg_names, args) if isinstance(a, torch.Tensor)}
            self.launches.append((self.jit.__name__, ptrs))
            return self.kernel[grid](*args, **meta)
        return launch


def _spy_flash_launches(monkeypatch) -> list:
    """(kernel name, {argument: data_ptr}) of every flash kernel launch, in order."""
    from megabyte_kernels import flash_attention as fa

    launches, tuned = [], fa._tuned
    monkeypatch.setattr(fa, "_tuned", lambda kernel, *a: _NamedPtrSpy(kernel, tuned(kernel, *a), launches))
    pre = fa._flash_bwd_preprocess_kernel
    monkeypatch.setattr(fa, "_flash_bwd_preprocess_kernel", _NamedPtrSpy(pre, pre, launches))
    return launches


@needs_triton_path
@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (4, 2)], ids=["MQA", "GQA"])
def test_flash_reads_the_model_layout_in_place(Hq, Hkv, monkeypatch):
    """megabyte/model.py's layout goes into the kernels as it is, no copy of q, k, v, o or dO
    (:func:`_model_layout`: q rearranged from (B, N, Hq*d), k and v the halves of (B, N, 2*Hkv*d)):
    every launch gets those views' own data pointers. o comes back in q's layout, so its rearrange
    back is a view (as PyTorch's flash SDPA returns); the backward's dO is the view of the incoming
    (B, N, Hq*d) gradient; dq, in q's layout too, becomes x_q.grad without a copy, and dk, dv
    (torch.empty_like's layout of a half: (B, N, Hkv*d) storage) rearrange back by views. The
    gradients match the float64 reference (the head-split partials: the interpreter splits G)."""
    launches = _spy_flash_launches(monkeypatch)
    B, N, d = 2, 37, 16
    xq, xkv, q, k, v = _model_layout(B, Hq, Hkv, N, d, torch.float32)
    o = flash_attention(q, k, v)
    assert o.stride() == q.stride()
    out = o.transpose(1, 2).reshape(B, N, Hq * d)
    assert out.data_ptr() == o.data_ptr() and out._base is not None, "the rearrange back copied o"
    (fwd, ptrs), = launches
    assert fwd == "_flash_fwd_kernel"
    assert (ptrs["Q"], ptrs["K"], ptrs["V"], ptrs["O"]) == (xq.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr())
    assert ptrs["K"] == xkv.data_ptr() and ptrs["V"] == xkv.data_ptr() + Hkv * d * xkv.element_size()
    dout = torch.randn(B, N, Hq * d, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out.backward(dout)
    names = [name for name, _ in launches[1:]]
    assert names == ["_flash_bwd_preprocess_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel"], names
    for name, ptrs in launches[1:]:
        assert ptrs["DO"] == dout.data_ptr(), f"{name}: dO was copied"
        assert ptrs.get("Q", q.data_ptr()) == q.data_ptr() and ptrs.get("O", o.data_ptr()) == o.data_ptr(), name
        assert ptrs.get("K", k.data_ptr()) == k.data_ptr() and ptrs.get("V", v.data_ptr()) == v.data_ptr(), name
    assert launches[-1][1]["DQ"] == xq.grad.data_ptr(), "dq was copied on its way to x_q.grad"
    grads = {}
    for dtype in (torch.float64, torch.float32):  # the same values, as the reference sees them
        rq, rkv, *qkv = _model_layout(B, Hq, Hkv, N, d, dtype)
        ro = reference.causal_attention(*qkv)
        ro.transpose(1, 2).reshape(B, N, Hq * d).backward(dout.to(dtype))
        grads[dtype] = (ro.detach(), rq.grad, rkv.grad)
    for name, a, lo, hi in zip(("o", "dx_q", "dx_kv"), (o.detach(), xq.grad, xkv.grad), grads[torch.float32],
                               grads[torch.float64]):
        _assert_close(name, a, lo, hi, 1e-5)


@needs_triton_path
@pytest.mark.parametrize("contiguous", [True, False], ids=["c", "nc"])
def test_flash_gradient_of_a_sum(contiguous, monkeypatch):
    """``o.sum().backward()`` hands the backward a dO of stride 0 everywhere (an expanded scalar):
    the custom op copies it to unit-stride rows (``_kernel_utils.rows``) and the gradients are
    right; q still goes in as it is, and dq comes back in q's layout."""
    launches = _spy_flash_launches(monkeypatch)
    q, k, v, _, slopes = _make(1, 4, 2, 37, 16, contiguous, torch.float32)
    o = flash_attention(q, k, v, alibi_slopes=slopes)
    o.sum().backward()
    assert all(ptrs["Q"] == q.data_ptr() for name, ptrs in launches if "Q" in ptrs)
    assert q.grad.stride() == q.stride()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    reference.causal_attention(q64, k64, v64, alibi_slopes=slopes).sum().backward()
    ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
    reference.causal_attention(ql, kl, vl, alibi_slopes=slopes).sum().backward()
    for name, a, lo, hi in zip(("dq", "dk", "dv"), (q, k, v), (ql, kl, vl), (q64, k64, v64)):
        _assert_close(name, a.grad, lo.grad, hi.grad, 1e-5)


def test_flash_copies_sequences_past_int32_offsets():
    """The flash kernels' offsets inside one (b, h) sequence are int32: an input whose N rows span
    2^31 elements or more (N * row stride) is handed over contiguous, others as they are (meta
    tensors: nothing is allocated)."""
    from megabyte_kernels import flash_attention as fa

    N, d = 1 << 20, 16
    wide = torch.empty_strided((1, 2, N, d), (2 * N * 2048, 2048, 2048, 1), device="meta")  # N * 2048 = 2^31
    assert fa._readable(wide).is_contiguous()
    narrow = torch.empty_strided((1, 2, N, d), (N * 2 * d, d, 2 * d, 1), device="meta")
    assert fa._readable(narrow) is narrow
    zero = torch.empty_strided((1, 2, N, d), (0, 0, 0, 0), device="meta")  # a .sum() gradient
    assert fa._readable(zero).is_contiguous()


# --------------------------------------------------------------------------------------------
# backend="native" on CPU: batched matmuls for short sequences, the reference beyond
# --------------------------------------------------------------------------------------------
# (B, Hq, Hkv, N, d, contiguous): both sides of CPU_MATMUL_MAX_N = 128, MQA / GQA / MHA
NATIVE_SHAPES = [
    (5, 4, 1, 4, 16, True),  # the demo's local model: P = 4, multi-query
    (3, 4, 2, 8, 32, False),  # GQA, strided
    (2, 2, 2, 33, 16, True),  # MHA, odd N
    (2, 4, 1, 128, 16, False),  # the longest sequence of the matmul path
    (1, 4, 2, 129, 16, True),  # the first of the fused path
    (4, 3, 3, 1, 8, True),  # N = 1
]


@pytest.mark.parametrize("dtype,floor", DTYPES + [BF16])
@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
@pytest.mark.parametrize("shape", NATIVE_SHAPES, ids=lambda s: "B{}_Hq{}_Hkv{}_N{}_d{}_{}".format(
    *s[:5], "contig" if s[5] else "strided"))
def test_causal_attention_native_cpu(shape, alibi, dtype, floor):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, N, d, contiguous = shape

    def t(H):
        x = torch.randn(B, H, N, d, generator=g) if contiguous else torch.randn(B, N, H, d, generator=g).transpose(1, 2)
        return x.to(dtype).requires_grad_()

    q, k, v = t(Hq), t(Hkv), t(Hkv)
    do = torch.randn(B, Hq, N, d, generator=g).to(dtype)
    kw = dict(alibi_slopes=torch.tensor([2.0 ** (-8 * (h + 1) / Hq) for h in range(Hq)]) if alibi else None)
    o, grads = _grads(lambda *a, **k_: causal_attention(*a, backend="native", **k_), q, k, v, do, **kw)
    assert o.shape == q.shape and o.dtype == dtype
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64, g64 = _grads(reference.causal_attention, q64, k64, v64, do.double(), **kw)
    ol, gl = _grads(reference.causal_attention, q, k, v, do, **kw)
    _assert_close("o", o, ol, o64, floor)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), grads, gl, g64):
        _assert_close(name, a, lo, hi, floor)


def test_causal_attention_native_takes_the_matmul_path_up_to_its_limit(monkeypatch):
    """N <= CPU_MATMUL_MAX_N never calls ATen's fused attention; longer sequences do."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape[2]) or real(*a, **k))
    for N in (attention.CPU_MATMUL_MAX_N, attention.CPU_MATMUL_MAX_N + 1):
        q = torch.randn(1, 2, N, 8)
        causal_attention(q, q[:, :1], q[:, :1], backend="native")
    assert calls == [attention.CPU_MATMUL_MAX_N + 1]


# --------------------------------------------------------------------------------------------
# launch grids against CUDA's limits (the interpreter enforces none)
# --------------------------------------------------------------------------------------------
# CUDA: grid x up to 2^31 - 1 blocks, y and z up to 65,535
CUDA_GRID_MAX = (2 ** 31 - 1, 65535, 65535)


class _Recorder:
    """Stands in for a (possibly autotuned) kernel: ``kernel[grid](*args, **meta)`` records the
    launch and runs nothing. ``configs`` is the GPU autotune list the grid is evaluated over."""

    def __init__(self, name, launches, configs=None):
        self.name, self.launches, self.configs = name, launches, configs

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.name, grid, self.configs, meta))


def _grids(grid, configs, meta):
    """Every grid a launch can take: one per config of its autotune list (a grid callable gets
    the launch's meta-parameters plus the config's), or the fixed grid."""
    if not callable(grid):
        return [(dict(meta), tuple(grid))]
    return [({**meta, **c.kwargs}, tuple(grid({**meta, **c.kwargs}))) for c in configs]


def _assert_within_cuda_limits(launches):
    assert launches
    for name, grid, configs, meta in launches:
        for m, g in _grids(grid, configs, meta):
            assert 1 <= len(g) <= 3 and all(n >= 1 for n in g), (name, m, g)
            over = [(axis, n) for axis, (n, cap) in enumerate(zip(g, CUDA_GRID_MAX)) if n > cap]
            assert not over, f"{name} with {m}: grid {g} exceeds CUDA's limits {CUDA_GRID_MAX} on axes {over}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,Hq,Hkv,N,d", [(70_000, 1, 1, 100, 64), (35_000, 2, 1, 1000, 128),
                                          (7_000, 10, 5, 65, 256)])
def test_flash_launch_grids_fit_cuda_limits(B, Hq, Hkv, N, d, dtype, monkeypatch):
    """B*H >= 70,000 sequences (a local model with P > 64 runs flash attention over B*K*H of
    them): the real launches of the forward, preprocess, dK/dV and dQ kernels are intercepted
    and each grid is evaluated for every config of the kernel's GPU autotune list. Meta tensors:
    nothing is allocated or run."""
    from megabyte_kernels import flash_attention as fa

    launches = []
    monkeypatch.setattr(fa, "_tuned", lambda kernel, kind, block_d, dt: _Recorder(
        kernel.__name__, launches, fa._cfgs(fa.gpu_configs(kind, block_d, dt))))
    monkeypatch.setattr(fa, "_flash_bwd_preprocess_kernel", _Recorder("_flash_bwd_preprocess_kernel", launches))
    q = torch.empty(B, Hq, N, d, device="meta", dtype=dtype)
    k = torch.empty(B, Hkv, N, d, device="meta", dtype=dtype)
    o, lse = fa._launch_fwd(q, k, k, None, 0.125)
    fa._launch_bwd(q, q, k, k, o, lse, None, 0.125)
    assert [name for name, *_ in launches] == ["_flash_fwd_kernel", "_flash_bwd_preprocess_kernel",
                                               "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel"]
    _assert_within_cuda_limits(launches)
    # and the programs cover every (row block, sequence): cdiv(N, BLOCK) * sequences of them
    for name, grid, configs, meta in launches:
        seqs = B * Hkv if "dkdv" in name else B * Hq
        for m, g in _grids(grid, configs, meta):
            block = m["BLOCK_N"] if "dkdv" in name else m["BLOCK_M"]
            assert g[0] * (g[1] if len(g) > 1 else 1) == -(-N // block) * seqs, (name, m, g)


def test_local_launch_grids_fit_cuda_limits(monkeypatch):
    """The packed local kernels at 2^22 sequences of P = 8: a 1-D grid within CUDA's limits."""
    from megabyte_kernels import local_attention as la

    launches = []
    for name in ("_local_fwd_kernel", "_local_bwd_kernel"):
        monkeypatch.setattr(la, name, _Recorder(name, launches))
    q = torch.empty(1 << 20, 4, 8, 64, device="meta", dtype=torch.bfloat16)
    k = torch.empty(1 << 20, 1, 8, 64, device="meta", dtype=torch.bfloat16)
    la._launch_fwd(q, k, k, None, 0.125)
    la._launch_bwd(q, q, k, k, None, 0.125)
    assert len(launches) == 2
    _assert_within_cuda_limits(launches)


# --------------------------------------------------------------------------------------------
# tier 4: GPU
# --------------------------------------------------------------------------------------------
GPU_DTYPES = [
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
    pytest.param(torch.float32, 1e-5, id="fp32"),
]


def _check_gpu(fn, shape, alibi, dtype, floor):
    B, Hq, Hkv, N, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda H: torch.randn(B, H, N, d, device="cuda", generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(Hq), mk(Hkv), mk(Hkv)
    do = torch.randn(B, Hq, N, d, device="cuda", generator=g).to(dtype)
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / Hq) for h in range(Hq)], device="cuda") if alibi else None
    o, grads = _grads(fn, q, k, v, do, alibi_slopes=slopes)
    _, grads2 = _grads(fn, q, k, v, do, alibi_slopes=slopes)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64, g64 = _grads(reference.causal_attention, q64, k64, v64, do.double(), alibi_slopes=slopes)
    ol, gl = _grads(reference.causal_attention, q, k, v, do, alibi_slopes=slopes)
    _assert_close("o", o, ol, o64, floor)
    for name, a, lo, hi in zip(("dq", "dk", "dv"), grads, gl, g64):
        _assert_close(name, a, lo, hi, floor)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", GPU_DTYPES)
@pytest.mark.parametrize("shape,alibi", [
    ((2, 4, 4, 1000, 64), False), ((1, 8, 1, 4097, 128), True), ((1, 4, 2, 2048, 80), False),
    ((1, 2, 2, 777, 256), True), ((1, 1, 1, 32768, 128), False),
])
def test_flash_gpu(shape, alibi, dtype, floor):
    if shape[3] > 8192 and dtype != torch.bfloat16:
        pytest.skip("N = 32K runs in bf16 only (the float64 reference needs N^2 memory)")
    _check_gpu(flash_attention, shape, alibi, dtype, floor)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", GPU_DTYPES)
@pytest.mark.parametrize("shape,alibi", [
    ((4096, 8, 1, 8, 64), False), ((1000, 8, 8, 8, 64), True), ((333, 4, 2, 33, 48), True), ((64, 4, 4, 64, 128), False),
])
def test_local_gpu(shape, alibi, dtype, floor):
    _check_gpu(local_attention, shape, alibi, dtype, floor)


@pytest.mark.parametrize("B,splits", [(1, 16), (4, 4)])
def test_dkdv_head_splits_fill_the_sms(B, splits):
    """Multi-query (Hkv = 1, G = 16) at N = 8K with BLOCK_N = 128: the dK/dV grid has 64 * B
    programs without splitting the heads (B = 1: 64 for 132 SMs); S slices of G / S heads give
    at least four programs per SM, with S the smallest divisor of G that does."""
    from megabyte_kernels import flash_attention as fa

    programs = 8192 // 128 * B
    S = fa.dkdv_head_splits(programs, 16, 132)
    assert S == splits and 16 % S == 0
    assert programs * S >= 4 * 132 > programs * (S // 2)
    assert fa.dkdv_head_splits(programs, 1, 132) == 1  # MHA: nothing to split
