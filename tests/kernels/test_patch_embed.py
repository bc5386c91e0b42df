"""Parity tests of the Triton patch embedding (DESIGN.md §4, tiers 2-4).

Tier 2 (interpreter, CPU): forward and every gradient against the reference in float64, every
Triton-path buffer prefilled with NaN (a row or column the kernels forget shows up), backward
run twice and compared bitwise. Tier 3 (``-m aot``): every kernel compiled for sm_80/sm_90 in
fp16/bf16/fp32. Tier 4 (``gpu``): bf16 and large shapes on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from megabyte_kernels import patch_embed
from tests.kernels._parity import DEVICE, g2l_mod, needs_triton_path, pe_mod
from tests.kernels._parity import nan_buffers  # noqa: F401  (autouse fixture: NaN-prefilled buffers)

# dtype and its (atol, rtol) against the float64 reference; bf16 in the interpreter checks the
# indexing only (tiles upcast after loading), its numerics are the GPU tier's.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
]


def make_inputs(B, T, P, D, V, *, pos, pad_patch, dtype, noncontig=False, seed=0):
    """ids, token table, position table, pad patch on DEVICE; the tables are leaves (or views of
    leaves) that require grad. Non-contiguous cases slice and transpose *after* the device and
    dtype conversion: ``.to()`` of a sliced tensor returns a contiguous copy."""
    gen = torch.Generator().manual_seed(seed)
    to = lambda t: None if t is None else t.to(DEVICE, dtype).requires_grad_()  # noqa: E731
    if noncontig:  # sliced ids, transposed table
        ids = torch.randint(0, V, (B, 2 * T), generator=gen).to(DEVICE)[:, ::2]
        table = to(torch.randn(D, V, generator=gen)).t()
        assert not ids.is_contiguous() and not table.is_contiguous()
    else:
        ids = torch.randint(0, V, (B, T), generator=gen).to(DEVICE)
        table = to(torch.randn(V, D, generator=gen))
    K = -(-T // P)
    pos_t = torch.randn(K * P + 5, D, generator=gen) if pos else None
    pad_t = torch.randn(P, D, generator=gen) if pad_patch else None
    return ids, table, to(pos_t), to(pad_t)


# (B, T, P, D, pos_table, pad_patch, non-contiguous)
CASES = [
    (2, 10, 4, 24, True, False, False),   # T not a multiple of P, odd D
    (1, 7, 3, 40, True, True, False),     # B=1, P=3, both tables
    (3, 5, 1, 24, False, True, False),    # P=1
    (2, 20, 8, 40, False, False, True),   # P=8, no position table, non-contiguous ids and table
    (2, 12, 4, 24, True, True, True),     # T multiple of P, non-contiguous
    (1, 70, 64, 24, True, False, False),  # P=64, one full patch and one partial
]


def _run(ids, table, pos, pad, P, pad_id, backend):
    return patch_embed(ids, table, pos, patch_size=P, pad_id=pad_id, pad_patch=pad, backend=backend)


@needs_triton_path
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, T, P, D, pos, pad_patch, noncontig", CASES)
def test_parity(B, T, P, D, pos, pad_patch, noncontig, dtype, atol, rtol):
    V, pad_id = 19, 3
    ids, table, pos_t, pad_t = make_inputs(B, T, P, D, V, pos=pos, pad_patch=pad_patch, dtype=dtype,
                                           noncontig=noncontig)
    params = [t for t in (table, pos_t, pad_t) if t is not None]
    ref_params = [t.detach().double().requires_grad_() for t in params]
    it = iter(ref_params)
    r_table, r_pos, r_pad = (None if t is None else next(it) for t in (table, pos_t, pad_t))

    out = _run(ids, table, pos_t, pad_t, P, pad_id, "triton")
    ref = _run(ids, r_table, r_pos, r_pad, P, pad_id, "reference")
    assert out.dtype == dtype and out.shape == ref.shape == (B, -(-T // P), P * D)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, params, grad, retain_graph=True)
    grads2 = torch.autograd.grad(out, params, grad)
    ref_grads = torch.autograd.grad(ref, ref_params, grad.double())
    for g, g2, rg, p in zip(grads, grads2, ref_grads, params):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert torch.equal(g, g2), "backward is not deterministic"
        torch.testing.assert_close(g.double(), rg, atol=atol * 4, rtol=rtol)


@needs_triton_path
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.uint8])
def test_narrow_id_dtypes(ids_dtype):
    """ids are read through their own dtype and strides (no int64 copy needed)."""
    ids, table, pos_t, pad_t = make_inputs(2, 11, 4, 24, 19, pos=True, pad_patch=True, dtype=torch.float32)
    narrow = ids.to(ids_dtype)
    out = _run(narrow, table, pos_t, pad_t, 4, 3, "triton")
    torch.testing.assert_close(out, _run(ids, table, pos_t, pad_t, 4, 3, "reference"), atol=1e-6, rtol=1e-6)
    grads = torch.autograd.grad(out, (table, pos_t, pad_t), torch.ones_like(out))
    ref = _run(ids, table, pos_t, pad_t, 4, 3, "reference")
    for g, rg in zip(grads, torch.autograd.grad(ref, (table, pos_t, pad_t), torch.ones_like(ref))):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-6)


@needs_triton_path
@pytest.mark.parametrize("ids_dtype", [torch.uint8])
def test_pad_id_outside_the_ids_dtype(ids_dtype):
    """V=512, pad_id=300 with 8-bit ids: the shifted-in and right-padding slots take row 300.

    ``tl.load(..., other=pad_id)`` casts pad_id to the ids' dtype (300 -> 44), so the kernel
    selects the pad after widening; forward and backward must both use row 300."""
    V, pad_id = 512, 300
    ids, table, pos_t, _ = make_inputs(2, 11, 4, 24, V, pos=True, pad_patch=False, dtype=torch.float32)
    ids = ids % 256
    out = _run(ids.to(ids_dtype), table, pos_t, None, 4, pad_id, "triton")
    ref = _run(ids, table, pos_t, None, 4, pad_id, "reference")
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for g, rg in zip(torch.autograd.grad(out, (table, pos_t), grad), torch.autograd.grad(ref, (table, pos_t), grad)):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-6)


@needs_triton_path
def test_ids_out_of_range_raise_before_kernels(monkeypatch):
    ids, table, pos_t, _ = make_inputs(2, 9, 4, 24, 19, pos=True, pad_patch=False, dtype=torch.float32)
    monkeypatch.setitem(pe_mod.IMPLS, "triton", lambda *a, **k: pytest.fail("kernel reached"))
    for bad in (19, -1):
        bad_ids = ids.clone()
        bad_ids[1, 5] = bad
        with pytest.raises(ValueError, match="ids must lie in"):
            _run(bad_ids, table, pos_t, None, 4, 3, "triton")


@needs_triton_path
def test_opcheck():
    ids, table, pos_t, pad_t = make_inputs(2, 7, 3, 24, 11, pos=True, pad_patch=True, dtype=torch.float32)
    torch.library.opcheck(torch.ops.megabyte.patch_embed_fwd.default, (ids, table, pos_t, pad_t, 3, 2))
    grad = torch.randn(2, 3, 3 * 24, device=DEVICE)
    torch.library.opcheck(torch.ops.megabyte.patch_embed_bwd.default, (grad, ids, 11, pos_t.shape[0], 3, 2, True, True))


@needs_triton_path
def test_torch_compile_fullgraph():
    """The custom ops are opaque to torch.compile: one graph, same values and gradients."""
    ids, table, pos_t, pad_t = make_inputs(2, 7, 3, 24, 11, pos=True, pad_patch=True, dtype=torch.float32)
    fn = lambda t, p, q: _run(ids, t, p, q, 3, 2, "triton")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, ref = compiled(table, pos_t, pad_t), fn(table, pos_t, pad_t)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, (table, pos_t, pad_t), grad),
                     torch.autograd.grad(ref, (table, pos_t, pad_t), grad)):
        assert torch.equal(g, rg)


# ---------------------------------------------------------------------------- tier 4: GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", [pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
                                               pytest.param(torch.float16, 2e-3, 2e-3, id="fp16")])
@pytest.mark.parametrize("P, pad_patch", [(8, False), (4, True)])
def test_gpu_large(P, pad_patch, dtype, atol, rtol):
    B, T, D, V, pad_id = 4, 8190, 1024, 512, 0
    ids, table, pos_t, pad_t = make_inputs(B, T, P, D, V, pos=True, pad_patch=pad_patch, dtype=dtype)
    params = [t for t in (table, pos_t, pad_t) if t is not None]
    ref_params = [t.detach().double().requires_grad_() for t in params]
    it = iter(ref_params)
    r_table, r_pos, r_pad = (None if t is None else next(it) for t in (table, pos_t, pad_t))
    out = _run(ids, table, pos_t, pad_t, P, pad_id, "triton")
    ref = _run(ids, r_table, r_pos, r_pad, P, pad_id, "reference")
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, grad, retain_graph=True)
    grads2 = torch.autograd.grad(out, params, grad)
    ref_grads = torch.autograd.grad(ref, ref_params, grad.double())
    for g, g2, rg in zip(grads, grads2, ref_grads):
        assert torch.equal(g, g2)
        # the table rows sum up to B*T fp32 terms: scale the tolerance by the row magnitudes
        torch.testing.assert_close(g.double(), rg, atol=atol * max(1.0, rg.abs().max().item()) / 4, rtol=rtol)


@pytest.mark.gpu
def test_gpu_offsets_past_int32():
    """B*K*P*D_G > 2^31 output elements: the int64 offsets reach the last rows correctly."""
    P, D, V = 8, 1024, 512
    T = (1 << 31) // D + 5 * P + 3  # 2^31 elements and then some, T not a multiple of P
    ids = torch.randint(0, V, (1, T), device="cuda")
    table = torch.randn(V, D, device="cuda", dtype=torch.bfloat16)
    out = patch_embed(ids, table, None, patch_size=P, pad_id=0, backend="triton")
    flat = out.view(-1, D)
    K = -(-T // P)
    rows = torch.arange(K * P - 3 * P, K * P, device="cuda")  # the last three patches
    g_ids = torch.where(rows - P < T, ids[0, (rows - P).clamp(max=T - 1)], 0)
    assert torch.equal(flat[rows], table[g_ids])
