"""Parity tests of the Triton global-to-local projection (DESIGN.md §4, tiers 2-4).

Tier 2 (interpreter, CPU): forward and the gradients of global_out, weight, bias, local_table
and local_pad against the reference in float64, every Triton-path buffer prefilled with NaN,
backward run twice and compared bitwise. Tier 3 (``-m aot``): every kernel compiled for
sm_80/sm_90 in fp16/bf16/fp32. Tier 4 (``gpu``): bf16 and large shapes on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from megabyte_kernels import global_to_local
from tests.kernels._parity import DEVICE, g2l_mod, needs_triton_path, pe_mod
from tests.kernels._parity import nan_buffers  # noqa: F401  (autouse fixture: NaN-prefilled buffers)

# dtype and its (atol, rtol) against the float64 reference (GEMM over D_G <= 40 terms of unit
# scale); bf16 in the interpreter checks the indexing only (tiles upcast after loading).
DTYPES = [
    pytest.param(torch.float32, 1e-4, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-2, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 8e-2, 2e-2, id="bf16"),
]


def make_inputs(B, T, P, D_G, D_L, V, *, bias, local_pad, dtype, noncontig=False, seed=0):
    """ids, global_out, weight, bias, local table, local pad on DEVICE; the float tensors are
    leaves (or views of leaves) that require grad. Non-contiguous cases slice and transpose
    *after* the device and dtype conversion: ``.to()`` of a sliced tensor returns a contiguous copy."""
    gen = torch.Generator().manual_seed(seed)
    K = -(-T // P)
    to = lambda t: None if t is None else t.to(DEVICE, dtype).requires_grad_()  # noqa: E731
    if noncontig:  # sliced ids, strided global output, transposed weight and table
        ids = torch.randint(0, V, (B, 2 * T), generator=gen).to(DEVICE)[:, 1::2]
        x = to(torch.randn(B, K, 2 * P * D_G, generator=gen))[:, :, ::2]
        w = to(torch.randn(D_G, D_L, generator=gen) * D_G ** -0.5).t()
        table = to(torch.randn(D_L, V, generator=gen)).t()
        assert not any(t.is_contiguous() for t in (ids, x, w, table))
    else:
        ids = torch.randint(0, V, (B, T), generator=gen).to(DEVICE)
        x = to(torch.randn(B, K, P * D_G, generator=gen))
        w = to(torch.randn(D_L, D_G, generator=gen) * D_G ** -0.5)
        table = to(torch.randn(V, D_L, generator=gen))
    b = torch.randn(D_L, generator=gen) if bias else None
    lp = torch.randn(D_L, generator=gen) if local_pad else None
    return ids, x, w, to(b), table, to(lp)


# (B, T, P, D_G, D_L, bias, local_pad, cross_patch, non-contiguous)
CASES = [
    (2, 10, 4, 24, 40, True, False, False, False),   # T not a multiple of P, odd widths
    (1, 7, 3, 40, 24, False, True, True, False),     # B=1, P=3, local pad, cross-patch shift
    (3, 5, 1, 24, 24, True, True, False, False),     # P=1: every slot is shifted in
    (2, 20, 8, 24, 40, True, False, True, True),     # P=8, cross-patch, non-contiguous inputs
    (2, 12, 4, 40, 24, False, False, False, True),   # T multiple of P, no bias, non-contiguous
    (1, 70, 64, 24, 24, True, True, False, False),   # P=64
]


def _run(x, ids, w, b, table, lp, P, pad_id, cross, backend, shift=1):
    return global_to_local(x, ids, w, b, table, patch_size=P, pad_id=pad_id, local_pad=lp, cross_patch=cross,
                           shift=shift, backend=backend)


def _check(B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, dtype, atol, rtol, V=19, pad_id=3, shift=1):
    ids, *tensors = make_inputs(B, T, P, D_G, D_L, V, bias=bias, local_pad=local_pad, dtype=dtype,
                                noncontig=noncontig)
    x, w, b, table, lp = tensors
    params = [t for t in tensors if t is not None]
    ref_tensors = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    ref_params = [t for t in ref_tensors if t is not None]

    out = _run(x, ids, w, b, table, lp, P, pad_id, cross, "triton", shift)
    ref = _run(ref_tensors[0], ids, *ref_tensors[1:], P, pad_id, cross, "reference", shift)
    assert out.dtype == dtype and out.shape == ref.shape == (B * (-(-T // P)), P, D_L)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, params, grad, retain_graph=True)
    grads2 = torch.autograd.grad(out, params, grad)
    ref_grads = torch.autograd.grad(ref, ref_params, grad.double())
    for g, g2, rg, p in zip(grads, grads2, ref_grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert torch.equal(g, g2), "backward is not deterministic"
        # dW, db and the table sum over up to B*K*P rows: scale atol by the gradient's magnitude
        torch.testing.assert_close(g.double(), rg, atol=atol * max(1.0, rg.abs().max().item()), rtol=rtol)


@needs_triton_path
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, T, P, D_G, D_L, bias, local_pad, cross, noncontig", CASES)
def test_parity(B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, dtype, atol, rtol):
    _check(B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, dtype, atol, rtol)


# the N-stage boundary: ids shifted by a whole child unit of `shift` bytes inside each patch
# (B, T, P, D_G, D_L, bias, local_pad, cross_patch, non-contiguous, shift)
SHIFT_CASES = [
    (2, 10, 4, 24, 40, True, True, False, False, 2),   # T not a multiple of P, local pad on 2 slots
    (1, 13, 8, 24, 24, False, False, False, True, 4),  # two child units of 4, non-contiguous
    (2, 7, 3, 40, 24, True, True, False, False, 3),    # shift = P: every slot shifted in
    (1, 9, 6, 24, 24, True, True, True, False, 2),     # cross-patch shift by 2
]


@needs_triton_path
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
@pytest.mark.parametrize("B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, shift", SHIFT_CASES)
def test_parity_shift(B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, shift, dtype, atol, rtol):
    _check(B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, dtype, atol, rtol, shift=shift)


def test_reference_shift_definition():
    """shift = s: l_ids[k, p] = ids[k*P + p - s] for p >= s, pad (or local_pad) for the first s slots."""
    B, T, P, s, V, pad_id, D = 2, 11, 4, 2, 19, 3, 5
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    table = torch.eye(V, dtype=torch.float64)[:, :V]  # one-hot rows: the output *is* l_ids
    x = torch.zeros(B, 3, P * D, dtype=torch.float64)
    w = torch.zeros(V, D, dtype=torch.float64)
    out = global_to_local(x, ids, w, None, table, patch_size=P, pad_id=pad_id, shift=s, backend="reference")
    got = out.argmax(-1).reshape(B, 3 * P)
    padded = torch.nn.functional.pad(ids, (0, 3 * P - T), value=pad_id)
    for t in range(3 * P):
        want = padded[:, t - s] if t % P >= s else torch.full((B,), pad_id)
        assert torch.equal(got[:, t], want), t
    lp = torch.full((V,), 7.0, dtype=torch.float64)
    out = global_to_local(x, ids, w, None, table, patch_size=P, pad_id=pad_id, shift=s, local_pad=lp,
                          backend="reference").reshape(B, 3, P, V)
    assert (out[:, :, :s] == 7.0).all() and (out[:, :, s:] != 7.0).any()


@pytest.mark.parametrize("shift", [0, 5, 2.0, True, None])
def test_bad_shift_raises(shift):
    ids, x, w, b, table, _ = make_inputs(2, 8, 4, 8, 8, 19, bias=True, local_pad=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="shift must be an int in \\[1, patch_size=4\\]"):
        _run(x, ids, w, b, table, None, 4, 3, False, "reference", shift)


@needs_triton_path
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.uint8])
def test_narrow_id_dtypes(ids_dtype):
    """ids are read through their own dtype and strides (no int64 copy needed)."""
    ids, x, w, b, table, lp = make_inputs(2, 11, 4, 24, 16, 19, bias=True, local_pad=True, dtype=torch.float32)
    params = (x, w, b, table, lp)
    out = _run(x, ids.to(ids_dtype), w, b, table, lp, 4, 3, True, "triton")
    ref = _run(x, ids, w, b, table, lp, 4, 3, True, "reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(torch.autograd.grad(out, params, torch.ones_like(out)),
                     torch.autograd.grad(ref, params, torch.ones_like(ref))):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-5)


@needs_triton_path
@pytest.mark.parametrize("ids_dtype", [torch.uint8])
@pytest.mark.parametrize("cross", [False, True], ids=["in_patch", "cross_patch"])
@pytest.mark.parametrize("shift", [1, 2])
def test_pad_id_outside_the_ids_dtype(ids_dtype, cross, shift):
    """V=512, pad_id=300 with 8-bit ids: the shifted-in and right-padding slots take row 300.

    ``tl.load(..., other=pad_id)`` casts pad_id to the ids' dtype (300 -> 44), so the kernel
    selects the pad after widening; forward and backward must both use row 300."""
    V, pad_id = 512, 300
    ids, x, w, b, table, _ = make_inputs(2, 11, 4, 24, 16, V, bias=True, local_pad=False, dtype=torch.float32)
    ids = ids % 256
    params = (x, w, b, table)
    out = _run(x, ids.to(ids_dtype), w, b, table, None, 4, pad_id, cross, "triton", shift)
    ref = _run(x, ids, w, b, table, None, 4, pad_id, cross, "reference", shift)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for g, rg in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-5)


@needs_triton_path
def test_ids_out_of_range_raise_before_kernels(monkeypatch):
    ids, x, w, b, table, _ = make_inputs(2, 9, 4, 24, 24, 19, bias=True, local_pad=False, dtype=torch.float32)
    monkeypatch.setitem(g2l_mod.IMPLS, "triton", lambda *a, **k: pytest.fail("kernel reached"))
    for bad in (19, -1):
        bad_ids = ids.clone()
        bad_ids[0, 8] = bad
        with pytest.raises(ValueError, match="ids must lie in"):
            _run(x, bad_ids, w, b, table, None, 4, 3, False, "triton")


@needs_triton_path
def test_opcheck():
    ids, x, w, b, table, lp = make_inputs(2, 7, 3, 24, 16, 11, bias=True, local_pad=True, dtype=torch.float32)
    torch.library.opcheck(torch.ops.megabyte.global_to_local_fwd.default, (x, ids, w, b, table, lp, 3, 2, True))
    grad = torch.randn(2 * 3, 3, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.megabyte.global_to_local_bwd.default,
                          (grad, x.detach(), ids, w.detach(), 11, 3, 2, True, True, True))
    # the N-stage shift (a whole child unit)
    ids, x, w, b, table, lp = make_inputs(2, 9, 4, 24, 16, 11, bias=True, local_pad=True, dtype=torch.float32)
    torch.library.opcheck(torch.ops.megabyte.global_to_local_fwd.default, (x, ids, w, b, table, lp, 4, 2, False, 2))
    grad = torch.randn(2 * 3, 4, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.megabyte.global_to_local_bwd.default,
                          (grad, x.detach(), ids, w.detach(), 11, 4, 2, False, True, True, 2))


@needs_triton_path
def test_torch_compile_fullgraph():
    """The custom ops are opaque to torch.compile: one graph, same values and gradients."""
    ids, x, w, b, table, lp = make_inputs(2, 7, 3, 24, 16, 11, bias=True, local_pad=True, dtype=torch.float32)
    fn = lambda *t: _run(t[0], ids, *t[1:], 3, 2, False, "triton")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    params = (x, w, b, table, lp)
    out, ref = compiled(*params), fn(*params)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        assert torch.equal(g, rg)


# ---------------------------------------------------------------------------- tier 4: GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", [pytest.param(torch.bfloat16, 6e-2, 2e-2, id="bf16"),
                                               pytest.param(torch.float16, 1e-2, 2e-3, id="fp16")])
@pytest.mark.parametrize("cross, local_pad", [(False, False), (True, True)])
def test_gpu_large(cross, local_pad, dtype, atol, rtol):
    _check(4, 4093, 8, 1024, 512, True, local_pad, cross, False, dtype, atol, rtol, V=512, pad_id=0)


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """B*K*P*D_G > 2^31 input elements: the int64 offsets reach the last rows correctly."""
    P, D_G, D_L, V = 8, 1024, 256, 512
    T = (1 << 31) // D_G + 5 * P + 3
    K = -(-T // P)
    ids = torch.randint(0, V, (1, T), device="cuda")
    x = torch.randn(1, K, P * D_G, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(D_L, D_G, device="cuda", dtype=torch.bfloat16) * D_G ** -0.5
    table = torch.randn(V, D_L, device="cuda", dtype=torch.bfloat16)
    out = global_to_local(x, ids, w, None, table, patch_size=P, pad_id=0, backend="triton")
    last = slice(K - 3, K)  # the last three patches, recomputed by the reference alone
    ids_tail = ids[:, (K - 3) * P:]
    ref = global_to_local(x[:, last], ids_tail, w, None, table, patch_size=P, pad_id=0, backend="reference")
    torch.testing.assert_close(out[last].float(), ref.float(), atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("tiles,min_programs,slots,splits", [
    (32, 264, 264, 16),  # dW (512 x 1024, 128x128 tiles), bf16 at 2 blocks per SM: 9 splits would be 0.55
    (20, 528, 132, 32),  # the local table's one-hot gradient (514 x 512, 128x128 tiles), bf16
    (40, 528, 132, 16),  # patch_embed's one-hot gradient (520 x 1024), bf16
])
def test_split_rows_lands_on_whole_waves(tiles, min_programs, slots, splits):
    """The split count of the deterministic split-K launches (dW, the one-hot table gradients) at
    1 M rows in 64-row blocks: the smallest with at least ``min_programs`` programs whose count
    fills whole waves of ``slots`` to >= 95%, by the hand formula programs / (ceil(programs /
    slots) * slots); every block row is in exactly one split."""
    from megabyte_kernels import _kernel_utils as ku

    n, block = 1 << 20, 64
    got, rows_per_split = ku.split_rows(n, block, tiles, min_programs, slots)
    programs = tiles * got
    assert got == splits and programs >= min_programs
    assert programs / (-(-programs // slots) * slots) >= 0.95
    assert rows_per_split % block == 0 and (got - 1) * rows_per_split < n <= got * rows_per_split
