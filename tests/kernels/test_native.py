"""The native C++ CPU ops (``csrc/``, ``backend="native"``): parity with the reference, opcheck,
deterministic backward, validation, and the fallback when the extension cannot be built.

The first test that needs the ops compiles them (tens of seconds on 2 cores, once: later runs
find them in the torch extensions cache).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

import megabyte_kernels as mk
from megabyte_kernels import native, reference
from megabyte_kernels.backends import resolve_backend
from megabyte_kernels.global_to_local import IMPLS as G2L_IMPLS
from megabyte_kernels.patch_embed import IMPLS as PE_IMPLS

# CPU only, and it needs ninja and a C++ compiler: gpu-check deselects it (-m "not native")
pytestmark = pytest.mark.native


@pytest.fixture(scope="module", autouse=True)
def built():
    try:
        native.load()
    except RuntimeError as e:  # pragma: no cover - CI has a compiler; say why if not
        pytest.fail(f"the native ops must build where the tests run: {e}")


# dtype and its (atol, rtol) against the float64 reference
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 3e-3, 3e-3, id="fp16"),
    pytest.param(torch.bfloat16, 3e-2, 3e-2, id="bf16"),
]


def _leaf(t, dtype):
    return None if t is None else t.to(dtype).requires_grad_()


def _grads(out, inputs, grad):
    present = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(out, present, grad))


def _assert_close(got, want, atol, rtol, what):
    # reduced-precision tolerance scales with the size of the values compared
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------
# patch embedding

# (B, T, P, D, pos_table, pad_patch, non-contiguous)
PE_CASES = [
    (2, 10, 4, 13, True, False, False),   # T not a multiple of P, odd D (vector tail)
    (1, 7, 3, 37, True, True, False),     # B=1, P=3, both tables, D past one vector + tail
    (3, 5, 1, 24, False, True, False),    # P=1
    (2, 20, 8, 40, False, False, True),   # no positions, non-contiguous ids and table
    (2, 12, 4, 70, True, True, True),     # T a multiple of P, non-contiguous everything
    (1, 70, 64, 16, True, False, False),  # P=64: one full patch and one partial
]


def _pe_inputs(B, T, P, D, V, pos, pad_patch, noncontig, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if noncontig:
        ids = torch.randint(0, V, (B, 2 * T), generator=gen)[:, ::2].to(torch.int32)
        table = torch.randn(D, V, generator=gen, dtype=torch.float64).t()
    else:
        ids = torch.randint(0, V, (B, T), generator=gen)
        table = torch.randn(V, D, generator=gen, dtype=torch.float64)
    K = -(-T // P)
    pos_t = torch.randn(K * P + 5, D, generator=gen, dtype=torch.float64) if pos else None
    if pos and noncontig:
        pos_t = torch.randn(D, K * P + 5, generator=gen, dtype=torch.float64).t()
    pad_t = torch.randn(P, D, generator=gen, dtype=torch.float64) if pad_patch else None
    return ids, table, pos_t, pad_t


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, T, P, D, pos, pad_patch, noncontig", PE_CASES)
def test_patch_embed_parity(B, T, P, D, pos, pad_patch, noncontig, dtype, atol, rtol):
    V, pad_id = 19, 3
    ids, table, pos_t, pad_t = _pe_inputs(B, T, P, D, V, pos, pad_patch, noncontig)
    ref_in = [_leaf(t, torch.float64) for t in (table, pos_t, pad_t)]
    ref = reference.patch_embed(ids, ref_in[0], ref_in[1], patch_size=P, pad_id=pad_id, pad_patch=ref_in[2])
    grad = torch.randn_like(ref)
    ref_grads = _grads(ref, ref_in, grad)

    nat_in = [_leaf(t, dtype) for t in (table, pos_t, pad_t)]
    if noncontig:  # keep the leaves non-contiguous views
        nat_in = [None if t is None else t.detach().t().contiguous().t().requires_grad_() for t in nat_in]
    out = mk.patch_embed(ids, nat_in[0], nat_in[1], patch_size=P, pad_id=pad_id, pad_patch=nat_in[2],
                         backend="native")
    assert out.dtype == dtype and out.shape == ref.shape
    nat_grads = _grads(out, nat_in, grad.to(dtype))
    # the reference at the same precision: native must match it as tightly as fp32 allows
    _assert_close(out, ref.detach(), atol, rtol, "out")
    for name, g, r in zip(("d_table", "d_pos", "d_pad_patch"), nat_grads, ref_grads):
        assert g.dtype == dtype
        _assert_close(g, r, atol, rtol, name)


def test_patch_embed_stride0_grad_and_int_ids():
    """A ``.sum()`` gradient has stride 0; ids may be any integer dtype."""
    ids, table, pos_t, _ = _pe_inputs(2, 9, 4, 8, 11, True, False, False)
    t1, p1 = table.clone().requires_grad_(), pos_t.clone().requires_grad_()
    t2, p2 = table.clone().requires_grad_(), pos_t.clone().requires_grad_()
    reference.patch_embed(ids, t1, p1, patch_size=4, pad_id=0).sum().backward()
    native.patch_embed_native(ids.to(torch.uint8), t2, p2, patch_size=4, pad_id=0).sum().backward()
    torch.testing.assert_close(t2.grad, t1.grad)
    torch.testing.assert_close(p2.grad, p1.grad)


# ----------------------------------------------------------------------------------------------
# global-to-local

# (B, T, P, D_G, D_L, bias, local_pad, cross_patch, non-contiguous)
G2L_CASES = [
    (2, 10, 4, 5, 13, True, False, False, False),
    (1, 7, 3, 8, 37, True, True, False, False),
    (3, 5, 1, 6, 16, False, True, True, False),
    (2, 20, 8, 7, 9, True, False, True, True),
    (2, 12, 4, 16, 33, False, False, False, True),
    (1, 70, 64, 4, 8, True, True, True, False),
]


def _g2l_inputs(B, T, P, D_G, D_L, V, bias, local_pad, noncontig, seed=0):
    gen = torch.Generator().manual_seed(seed)
    K = -(-T // P)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    if noncontig:
        ids = torch.randint(0, V, (B, 2 * T), generator=gen)[:, ::2]
        x = r(B, K, 2 * P * D_G)[:, :, ::2]
        w = r(D_G, D_L).t()
        table = r(D_L, V).t()
    else:
        ids = torch.randint(0, V, (B, T), generator=gen)
        x, w, table = r(B, K, P * D_G), r(D_L, D_G), r(V, D_L)
    return ids, x, w, r(D_L) if bias else None, table, r(D_L) if local_pad else None


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, T, P, D_G, D_L, bias, local_pad, cross, noncontig", G2L_CASES)
def test_global_to_local_parity(B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, dtype, atol, rtol):
    V, pad_id = 19, 3
    ids, x, w, b, table, lp = _g2l_inputs(B, T, P, D_G, D_L, V, bias, local_pad, noncontig)
    ref_in = [_leaf(t, torch.float64) for t in (x, w, b, table, lp)]
    ref = reference.global_to_local(ref_in[0], ids, ref_in[1], ref_in[2], ref_in[3], patch_size=P, pad_id=pad_id,
                                    local_pad=ref_in[4], cross_patch=cross)
    grad = torch.randn_like(ref)
    ref_grads = _grads(ref, ref_in, grad)

    nat_in = [_leaf(t, dtype) for t in (x, w, b, table, lp)]
    out = mk.global_to_local(nat_in[0], ids, nat_in[1], nat_in[2], nat_in[3], patch_size=P, pad_id=pad_id,
                             local_pad=nat_in[4], cross_patch=cross, backend="native")
    assert out.dtype == dtype and out.shape == ref.shape
    nat_grads = _grads(out, nat_in, grad.to(dtype))
    # GEMMs over D_G / B*K*P terms: tolerance grows with the length of the sums
    f = 1.0 if dtype == torch.float32 else 2.0
    _assert_close(out, ref.detach(), f * atol, rtol, "out")
    names = [n for n, t in zip(("d_x", "d_weight", "d_bias", "d_table", "d_local_pad"), (x, w, b, table, lp))
             if t is not None]
    for name, g, r in zip(names, nat_grads, ref_grads):
        assert g.dtype == dtype
        _assert_close(g, r, f * atol, rtol, name)


# the N-stage boundary: shifted by a whole child unit of `shift` bytes
# (B, T, P, D_G, D_L, bias, local_pad, cross_patch, non-contiguous, shift)
G2L_SHIFT_CASES = [
    (2, 10, 4, 5, 13, True, True, False, False, 2),
    (1, 13, 8, 8, 9, False, False, False, True, 4),
    (2, 7, 3, 6, 16, True, True, False, False, 3),
    (1, 9, 6, 7, 8, True, True, True, False, 2),
]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES[:2])
@pytest.mark.parametrize("B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, shift", G2L_SHIFT_CASES)
def test_global_to_local_parity_shift(B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, shift, dtype, atol,
                                      rtol):
    V, pad_id = 19, 3
    ids, x, w, b, table, lp = _g2l_inputs(B, T, P, D_G, D_L, V, bias, local_pad, noncontig)
    ref_in = [_leaf(t, torch.float64) for t in (x, w, b, table, lp)]
    ref = reference.global_to_local(ref_in[0], ids, ref_in[1], ref_in[2], ref_in[3], patch_size=P, pad_id=pad_id,
                                    local_pad=ref_in[4], cross_patch=cross, shift=shift)
    grad = torch.randn_like(ref)
    ref_grads = _grads(ref, ref_in, grad)
    nat_in = [_leaf(t, dtype) for t in (x, w, b, table, lp)]
    out = mk.global_to_local(nat_in[0], ids, nat_in[1], nat_in[2], nat_in[3], patch_size=P, pad_id=pad_id,
                             local_pad=nat_in[4], cross_patch=cross, shift=shift, backend="native")
    nat_grads = _grads(out, nat_in, grad.to(dtype))
    f = 1.0 if dtype == torch.float32 else 2.0
    _assert_close(out, ref.detach(), f * atol, rtol, "out")
    for g, r in zip(nat_grads, ref_grads):
        _assert_close(g, r, f * atol, rtol, "grad")


def test_global_to_local_shift_checked_by_the_op():
    ids, x, w, b, table, lp = _g2l_inputs(2, 8, 4, 5, 7, 11, True, False, False)
    with pytest.raises(ValueError, match="shift must lie in"):
        torch.ops.megabyte_native.global_to_local(x, ids, w, b, table, None, 4, 3, False, 5)


# (B, T, P, D_G, D_L, bias, local_pad, cross_patch, non-contiguous): fp32 GEMMs of >= 2^21
# multiply-adds, where the op uses oneDNN when this torch has it
G2L_LARGE_CASES = [
    (4, 256, 4, 64, 128, True, False, False, False),
    (3, 301, 8, 40, 72, False, True, True, True),
    (2, 517, 5, 33, 129, True, True, False, True),
]


@pytest.mark.parametrize("engine", ["onednn", "aten"])
@pytest.mark.parametrize("B, T, P, D_G, D_L, bias, local_pad, cross, noncontig", G2L_LARGE_CASES)
def test_global_to_local_parity_gemm_engines(B, T, P, D_G, D_L, bias, local_pad, cross, noncontig, engine,
                                             monkeypatch):
    """Both GEMM engines (oneDNN, and at::mm with MEGABYTE_NATIVE_GEMM=aten) against the fp64
    reference, forward and every gradient, at sizes that take the oneDNN path."""
    K = -(-T // P)
    macs = B * K * P * D_G * D_L
    if engine == "aten":
        monkeypatch.setenv("MEGABYTE_NATIVE_GEMM", "aten")
    else:
        monkeypatch.delenv("MEGABYTE_NATIVE_GEMM", raising=False)
    if engine == "onednn" and torch.ops.megabyte_native.gemm_engine(torch.float32, macs) != "onednn":
        pytest.skip("this torch has no mkldnn::_linear_pointwise (the op uses at::mm only)")
    assert torch.ops.megabyte_native.gemm_engine(torch.float32, macs) == engine
    assert torch.ops.megabyte_native.gemm_engine(torch.float32, 1000) == "aten"  # tiny GEMMs: at::mm
    V, pad_id = 300, 257
    ids, x, w, b, table, lp = _g2l_inputs(B, T, P, D_G, D_L, V, bias, local_pad, noncontig)
    ref_in = [_leaf(t, torch.float64) for t in (x, w, b, table, lp)]
    ref = reference.global_to_local(ref_in[0], ids, ref_in[1], ref_in[2], ref_in[3], patch_size=P, pad_id=pad_id,
                                    local_pad=ref_in[4], cross_patch=cross)
    grad = torch.randn_like(ref)
    ref_grads = _grads(ref, ref_in, grad)
    nat_in = [_leaf(t, torch.float32) for t in (x, w, b, table, lp)]
    out = mk.global_to_local(nat_in[0], ids, nat_in[1], nat_in[2], nat_in[3], patch_size=P, pad_id=pad_id,
                             local_pad=nat_in[4], cross_patch=cross, backend="native")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    nat_grads = _grads(out, nat_in, grad.float())
    _assert_close(out, ref.detach(), 1e-5, 1e-5, "out")
    names = [n for n, t in zip(("d_x", "d_weight", "d_bias", "d_table", "d_local_pad"), (x, w, b, table, lp))
             if t is not None]
    for name, g, r in zip(names, nat_grads, ref_grads):
        _assert_close(g, r, 1e-5, 1e-5, name)


def test_global_to_local_matches_reference_fp32_in_model_sizes():
    """At the demo's sizes native and reference agree to fp32 rounding (what the model sees)."""
    ids, x, w, b, table, _ = _g2l_inputs(4, 256, 4, 64, 128, 512, True, False, False)
    args = [t.float().requires_grad_() for t in (x, w, b, table)]
    outs, grads = [], []
    for backend in ("reference", "native"):
        o = mk.global_to_local(args[0], ids, args[1], args[2], args[3], patch_size=4, pad_id=257, backend=backend)
        outs.append(o)
        grads.append(torch.autograd.grad(o, args, torch.ones_like(o)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for g1, g0 in zip(grads[1], grads[0]):
        torch.testing.assert_close(g1, g0, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# operator registration: opcheck, torch.compile

def _opcheck_pe_args():
    out = []
    for pos, pad in ((True, False), (False, True), (True, True)):
        ids, table, pos_t, pad_t = _pe_inputs(2, 9, 4, 12, 11, pos, pad, False)
        f = lambda t: None if t is None else t.float().requires_grad_()  # noqa: E731
        out.append((ids, f(table), f(pos_t), f(pad_t), 4, 3))
    return out


def _opcheck_g2l_args():
    out = []
    for bias, lp, cross in ((True, False, False), (False, True, True), (True, True, False)):
        ids, x, w, b, table, pad = _g2l_inputs(2, 9, 4, 5, 7, 11, bias, lp, False)
        f = lambda t: None if t is None else t.float().requires_grad_()  # noqa: E731
        out.append((f(x), ids, f(w), f(b), f(table), f(pad), 4, 3, cross))
    out.append(out[-1] + (2,))  # the N-stage shift
    return out


@pytest.mark.parametrize("args", _opcheck_pe_args())
def test_opcheck_patch_embed(args):
    torch.library.opcheck(torch.ops.megabyte_native.patch_embed.default, args)


@pytest.mark.parametrize("args", _opcheck_g2l_args())
def test_opcheck_global_to_local(args):
    torch.library.opcheck(torch.ops.megabyte_native.global_to_local.default, args)


def test_opcheck_backward_ops():
    g = torch.randn(2, 3, 8)
    ids = torch.randint(0, 11, (2, 9))
    torch.library.opcheck(torch.ops.megabyte_native.patch_embed_backward.default, (g, ids, 11, 15, 4, 3, True, True))
    x, w = torch.randn(2, 3, 12), torch.randn(5, 3)
    torch.library.opcheck(torch.ops.megabyte_native.global_to_local_backward.default,
                          (torch.randn(6, 4, 5), x, ids, w, 11, 4, 3, False, True, True))
    torch.library.opcheck(torch.ops.megabyte_native.global_to_local_backward.default,
                          (torch.randn(6, 4, 5), x, ids, w, 11, 4, 3, False, True, True, 2))


def test_torch_compile_fullgraph():
    """The ops trace as single nodes, forward and backward (aot_eager: no C++ codegen here)."""
    ids, x, w, b, table, _ = _g2l_inputs(2, 9, 4, 5, 7, 11, True, False, False)
    x, w, b, table = (t.float().requires_grad_() for t in (x, w, b, table))
    pos = torch.randn(12, 5, requires_grad=True)
    emb = torch.randn(11, 5, requires_grad=True)

    def f(ids, x, w, b, table, emb, pos):
        h = native.patch_embed_native(ids, emb, pos, patch_size=4, pad_id=3)
        return native.global_to_local_native(x + h, ids, w, b, table, patch_size=4, pad_id=3)

    eager = f(ids, x, w, b, table, emb, pos)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(ids, x, w, b, table, emb, pos)
    torch.testing.assert_close(compiled, eager)
    ge = torch.autograd.grad(eager.square().sum(), (x, w, b, table, emb, pos))
    gc = torch.autograd.grad(compiled.square().sum(), (x, w, b, table, emb, pos))
    for a, c in zip(ge, gc):
        torch.testing.assert_close(c, a)


# ----------------------------------------------------------------------------------------------
# determinism, validation, dispatch

def test_backward_deterministic_and_thread_count_independent():
    """Table gradients are ordered sums: bitwise equal run to run and for 1 or N threads."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (8, 256), generator=gen)
    ids[:, ::3] = 32  # a heavy segment, as spaces are in text
    table = torch.randn(512, 64, generator=gen, requires_grad=True)
    pos = torch.randn(256, 64, generator=gen, requires_grad=True)
    x = torch.randn(8, 64, 4 * 48, generator=gen, requires_grad=True)
    w = torch.randn(128, 48, generator=gen, requires_grad=True)
    b = torch.randn(128, generator=gen, requires_grad=True)
    ltab = torch.randn(512, 128, generator=gen, requires_grad=True)

    def run():
        h = mk.patch_embed(ids, table, pos, patch_size=4, pad_id=257, backend="native")
        y = mk.global_to_local(x, ids, w, b, ltab, patch_size=4, pad_id=257, backend="native")
        gh = torch.randn(h.shape, generator=torch.Generator().manual_seed(2))
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        return torch.autograd.grad((h, y), (table, pos, w, b, ltab), (gh, gy))

    first, second = run(), run()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(n)
    for a, c, s in zip(first, second, single):
        assert torch.equal(a, c)
    for a, s in zip(first[:2] + first[4:], single[:2] + single[4:]):  # the ordered sums (not BLAS's dW)
        assert torch.equal(a, s)


@pytest.mark.parametrize("bad", [-1, 11])
def test_ids_out_of_range(bad):
    ids = torch.randint(0, 11, (2, 9))
    ids[1, 4] = bad
    table, w = torch.randn(11, 5), torch.randn(5, 5)
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        mk.patch_embed(ids, table, None, patch_size=4, pad_id=3, backend="native")
    with pytest.raises(ValueError, match=r"\[0, 11\)"):
        mk.global_to_local(torch.randn(2, 3, 20), ids, w, None, table, patch_size=4, pad_id=3, backend="native")
    # the C++ ops check too, before reading a table row (called directly, past the Python checks)
    with pytest.raises(ValueError, match="ids must lie in"):
        torch.ops.megabyte_native.patch_embed(ids, table, None, None, 4, 3)
    with pytest.raises(ValueError, match="ids must lie in"):
        torch.ops.megabyte_native.global_to_local(torch.randn(2, 3, 20), ids, w, None, table, None, 4, 3, False)


def test_auto_picks_native_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, PE_IMPLS, "patch_embed") is PE_IMPLS["native"]
    assert resolve_backend("auto", cpu, G2L_IMPLS, "global_to_local") is G2L_IMPLS["native"]
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_backend("native", torch.device("meta"), PE_IMPLS, "patch_embed")


def test_unbuildable_falls_back_with_one_warning(monkeypatch):
    """No compiler: ``auto`` warns once and uses the reference, ``native`` raises a clear error."""
    monkeypatch.setattr(native, "_state", {"tried": True, "error": "RuntimeError: no C++ compiler"})
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="uses the reference ops"):
        assert resolve_backend("auto", cpu, PE_IMPLS, "patch_embed") is PE_IMPLS["reference"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert resolve_backend("auto", cpu, G2L_IMPLS, "global_to_local") is G2L_IMPLS["reference"]
    with pytest.raises(RuntimeError, match="could not be built: RuntimeError: no C\\+\\+ compiler"):
        mk.patch_embed(torch.zeros(1, 4, dtype=torch.long), torch.randn(5, 3), patch_size=4, pad_id=0,
                       backend="native")


def test_stale_build_lock_is_removed(tmp_path):
    """A lock left by a killed build would make every later build wait forever: one older than
    STALE_LOCK_S is removed (with a warning); a fresh one, a build in progress, is left alone."""
    class FakeCppExtension:
        @staticmethod
        def _get_build_directory(name, verbose):
            return str(tmp_path)

    lock = tmp_path / "lock"
    lock.write_text("")
    native._remove_stale_lock(FakeCppExtension)
    assert lock.exists()
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale build lock"):
        native._remove_stale_lock(FakeCppExtension)
    assert not lock.exists()
    native._remove_stale_lock(FakeCppExtension)  # no lock: nothing to do


def test_no_compiler_subprocess(tmp_path):
    """A real failed build (CXX points nowhere, empty extensions cache) degrades to the reference."""
    code = (
        "import warnings, torch, megabyte_kernels as mk\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = mk.patch_embed(torch.zeros(1, 8, dtype=torch.long), torch.ones(5, 3), patch_size=4, pad_id=0)\n"
        "    out = mk.patch_embed(torch.zeros(1, 8, dtype=torch.long), torch.ones(5, 3), patch_size=4, pad_id=0)\n"
        "assert out.shape == (1, 2, 12)\n"
        "msgs = [str(x.message) for x in w if 'native CPU ops' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "try:\n"
        "    mk.patch_embed(torch.zeros(1, 8, dtype=torch.long), torch.ones(5, 3), patch_size=4, pad_id=0,\n"
        "                   backend='native')\n"
        "except RuntimeError as e:\n"
        "    assert 'could not be built' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('native must raise')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               MEGABYTE_NATIVE_PREBUILT="0")  # a library built by setup.py would need no compiler
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.slow
def test_setup_py_ahead_of_time_build_loads_without_a_compiler(tmp_path):
    """``MEGABYTE_BUILD_NATIVE=1`` builds the library with setup.py; a copy of the package with
    that library next to it (and no csrc/) loads it with no compiler and an empty extensions
    cache, and its ops run."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lib = tmp_path / "lib"
    env = dict(os.environ, MEGABYTE_BUILD_NATIVE="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp",
                        str(tmp_path / "build")], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (so,) = (lib / "megabyte_kernels").glob("_megabyte_native*.so")
    shutil.copytree(os.path.join(root, "megabyte_kernels"), tmp_path / "pkg" / "megabyte_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(so, tmp_path / "pkg" / "megabyte_kernels")
    code = ("import torch, megabyte_kernels as mk, megabyte_kernels.native as n\n"
            "n.load()\n"
            "assert n._state['how'] == 'prebuilt', n._state\n"
            "assert mk.__file__.startswith(%r), mk.__file__\n"
            "out = mk.patch_embed(torch.zeros(1, 8, dtype=torch.long), torch.ones(5, 3), patch_size=4, pad_id=0,\n"
            "                     backend='native')\n"
            "assert out.shape == (1, 2, 12)\n"
            "print('ok')\n") % str(tmp_path / "pkg")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=str(tmp_path / "pkg"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
