"""The model end to end on every backend: same logits, loss and parameter gradients.

Tiers (DESIGN.md §4): on CPU the Triton kernels run in the interpreter (fp32, fp16; bf16
numerics are wrong there, so bf16 parity is a GPU test); on a GPU the same comparison in bf16
at a larger size, and ``torch.compile(fullgraph=True)`` with the Triton backend.

Parity rule, as FlashAttention states it: a backend's error against the float64 reference
(same weights) is at most twice the error of the reference backend computed at the same
precision, plus a floor relative to the tensor's magnitude; the floor is written next to the
dtype in the parametrization.
"""
from __future__ import annotations

import math

import pytest
import torch

import megabyte_kernels as mk
from megabyte import Megabyte, MegabyteConfig
from megabyte_kernels import attention as _attn

# the op modules' backend tables (the package's function names shadow two of the submodules)
from megabyte_kernels.global_to_local import IMPLS as _G2L_IMPLS
from megabyte_kernels.patch_embed import IMPLS as _PE_IMPLS
from tests._device import DEVICE, TRITON_RUNS

HAS_CUDA = torch.cuda.is_available()
OP_TABLES = {"patch_embed": _PE_IMPLS, "global_to_local": _G2L_IMPLS, "causal_attention": _attn.IMPLS}

TINY = dict(V=264, P=4, D_G=8, D_L=16, T_MAX=512, g_nheads=2, g_nlayers=1, l_nheads=1, l_nlayers=1,
            initializer_range=0.3, pad_id=257, eos_id=258)
# (config overrides, T): T not a multiple of P; "long" has K = 65 > LOCAL_MAX_N patches, so the
# global transformer runs the flash kernels, with ALiBi, GQA, a trainable pad and the in_action
# shift; the short ones run the packed local kernel in both transformers.
SHAPES = {
    "original": ({}, 18),
    "long_in_action_gqa": (dict(variant="in_action", pad="trainable", P=2, D_G=16, g_nheads=4, g_kv_heads=2,
                                l_nheads=2, l_kv_heads=1), 129),
}


def _backends() -> list:
    """auto + every backend some op's table declares. ``native`` is marked: it needs a C++
    compiler, and the GPU step leaves it out."""
    names = set()
    for table in OP_TABLES.values():
        names |= set(table)
    return ["auto"] + [pytest.param(n, marks=pytest.mark.native) if n == "native" else n
                       for n in sorted(names - {"reference"})]


def _device(backend: str) -> str:
    """Where a CPU-tier parity test runs ``backend``: the Triton kernels on DEVICE (CUDA
    tensors on a GPU machine, the interpreter elsewhere), every other backend on the CPU."""
    return DEVICE if backend == "triton" else "cpu"


def _skip_reason(backend: str) -> str | None:
    """Why the model cannot run on ``backend`` here yet (None when it can)."""
    if backend == "auto":
        return None
    if backend == "triton" and not TRITON_RUNS:
        return "the Triton path needs CUDA or TRITON_INTERPRET=1 (and the triton package)"
    missing = [op for op, table in OP_TABLES.items() if backend not in table]
    if missing:
        return f"backend {backend!r} has no implementation of {missing} yet"
    if backend == "native":
        from megabyte_kernels import native

        if not native.available():
            return "the native CPU ops could not be built here"
    return None


def _make(overrides: dict, backend: str, dtype: torch.dtype, device="cpu", seed=0) -> Megabyte:
    torch.manual_seed(seed)
    model = Megabyte(MegabyteConfig(**{**TINY, **overrides}), backend=backend)
    return model.to(device=device, dtype=dtype).eval()


def _ids(T: int, B=2, device="cpu", seed=1) -> torch.Tensor:
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[-1, T // 3] = TINY["pad_id"]  # a pad target: ignore_index is exercised
    return ids.to(device)


def _run(model: Megabyte, ids: torch.Tensor, **autocast):
    """(logits, loss, {name: grad}) of one forward + backward, all in float64 for comparison."""
    model.zero_grad(set_to_none=True)
    if autocast:
        with torch.autocast(**autocast):
            out = model(ids, return_loss=True)
    else:
        out = model(ids, return_loss=True)
    out.loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return out.lm_logits.detach().double(), out.loss.detach().double(), grads


def _assert_parity(name: str, got: torch.Tensor, same_prec: torch.Tensor, exact: torch.Tensor, floor: float):
    """|got - exact| <= 2 |same_prec - exact| + floor * max(1, max|exact|) (max over elements)."""
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - exact).abs().max().item()
    ref_err = (same_prec - exact).abs().max().item()
    bound = 2 * ref_err + floor * max(1.0, exact.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (reference's own error {ref_err:.3g})"


def _check_backend_parity(overrides, T, backend, dtype, floor, device="cpu", autocast=None):
    """backend at ``dtype`` vs reference at ``dtype`` vs reference in float64, same weights."""
    ids = _ids(T, device=device)
    ac = dict(device_type=device, dtype=autocast) if autocast else {}
    exact = _run(_make(overrides, "reference", torch.float64, device), ids)
    same = _run(_make(overrides, "reference", dtype, device), ids, **ac)
    got = _run(_make(overrides, backend, dtype, device), ids, **ac)
    _assert_parity("logits", got[0], same[0], exact[0], floor)
    _assert_parity("loss", got[1], same[1], exact[1], floor)
    assert set(got[2]) == set(exact[2]), "different parameters received gradients"
    for n in exact[2]:
        _assert_parity(f"grad of {n}", got[2][n], same[2][n], exact[2][n], floor)


# ---------------------------------------------------------------------------------------------
# CPU: interpreter parity (fp32, fp16) on every backend present in the op tables
# ---------------------------------------------------------------------------------------------
CPU_CASES = [  # (shape, dtype, floor)
    ("original", torch.float32, 1e-5),
    ("original", torch.float16, 1e-3),
    ("long_in_action_gqa", torch.float32, 1e-5),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape,dtype,floor", CPU_CASES, ids=[f"{s}-{str(d)[6:]}" for s, d, _ in CPU_CASES])
def test_backend_parity_cpu(backend, shape, dtype, floor):
    reason = _skip_reason(backend)
    if reason:
        pytest.skip(reason)
    overrides, T = SHAPES[shape]
    _check_backend_parity(overrides, T, backend, dtype, floor, device=_device(backend))


def test_triton_parity_under_autocast_fp16_interpreter():
    """fp32 parameters, fp16 autocast: the Triton ops take the autocast activations."""
    if _skip_reason("triton"):
        pytest.skip(_skip_reason("triton"))
    _check_backend_parity({}, 18, "triton", torch.float32, 2e-3, device=DEVICE, autocast=torch.float16)


@pytest.mark.parametrize("which", [(True, False), (False, True)], ids=["global", "local"])
def test_activation_checkpointing_with_triton_interpreter(which):
    """Recomputing a transformer's blocks in backward (the custom ops run twice) gives the same
    gradients as keeping the activations."""
    if _skip_reason("triton"):
        pytest.skip(_skip_reason("triton"))
    ids = _ids(18, device=DEVICE)
    want = _run(_make({}, "triton", torch.float32, DEVICE).train(), ids)
    model = _make({}, "triton", torch.float32, DEVICE).train()
    model.set_checkpointing(*which)
    got = _run(model, ids)
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], atol=1e-6, rtol=1e-6, msg=n)


def test_every_op_dispatches_to_the_chosen_backend(monkeypatch):
    """Megabyte(backend=X) routes all three ops (both attention families) through X's table."""
    seen = []
    for op, table in OP_TABLES.items():
        for name, fn in list(table.items()):
            def spy(*a, _fn=fn, _key=(op, name), **kw):
                seen.append(_key)
                return _fn(*a, **kw)
            monkeypatch.setitem(table, name, spy)
    model = _make({}, "reference", torch.float32)
    with torch.no_grad():
        model(_ids(18))
    # patch embed once; attention once per global layer and once per local layer; g2l once
    assert seen.count(("patch_embed", "reference")) == 1
    assert seen.count(("global_to_local", "reference")) == 1
    assert seen.count(("causal_attention", "reference")) == TINY["g_nlayers"] + TINY["l_nlayers"]
    assert {b for _, b in seen} == {"reference"}


def test_backend_precedence(monkeypatch):
    """argument > MEGABYTE_BACKEND > config.backend."""
    cfg = MegabyteConfig(**{**TINY, "backend": "reference"})
    monkeypatch.delenv("MEGABYTE_BACKEND", raising=False)
    assert Megabyte(cfg).backend == "reference"
    monkeypatch.setenv("MEGABYTE_BACKEND", "triton")
    assert Megabyte(cfg).backend == "triton"
    assert Megabyte(cfg, backend="auto").backend == "auto"
    monkeypatch.setenv("MEGABYTE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        Megabyte(cfg)


# ---------------------------------------------------------------------------------------------
# mixed precision on CPU (reference backend)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_autocast_reference_cpu(dtype, tol):
    ids = _ids(18)
    model = _make({}, "reference", torch.float32)
    logits32, loss32, grads32 = _run(model, ids)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        out = model(ids, return_loss=True)
    assert out.lm_logits.dtype == dtype
    assert out.loss.dtype == torch.float32, "the loss is computed in fp32"
    out.loss.backward()
    assert abs(out.loss.item() - loss32.item()) <= tol * abs(loss32.item())
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, n
        assert torch.isfinite(p.grad).all(), n
    # gradients point the same way as in fp32
    g = torch.cat([p.grad.flatten().double() for p in model.parameters()])
    g32 = torch.cat([grads32[n].flatten() for n, _ in model.named_parameters()])
    assert torch.nn.functional.cosine_similarity(g, g32, dim=0) > 0.99


def test_bf16_parameters_reference_cpu():
    ids = _ids(18)
    _, loss32, _ = _run(_make({}, "reference", torch.float32), ids)
    model = _make({}, "reference", torch.bfloat16)
    out = model(ids, return_loss=True)
    assert out.lm_logits.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32, "the loss is computed in fp32"
    out.loss.backward()
    assert abs(out.loss.item() - loss32.item()) <= 0.05 * abs(loss32.item())
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), n


# ---------------------------------------------------------------------------------------------
# torch.compile on CPU (reference backend): one small fullgraph compile, forward and backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_compile_fullgraph_reference_cpu():
    torch._dynamo.reset()
    ids = _ids(18)
    eager = _make({}, "reference", torch.float32)
    compiled_model = _make({}, "reference", torch.float32)
    compiled = torch.compile(compiled_model, fullgraph=True)
    want = _run(eager, ids)
    compiled_model.zero_grad(set_to_none=True)
    out = compiled(ids, return_loss=True)
    out.loss.backward()
    # inductor fuses and reorders fp32 arithmetic: logits of magnitude ~10 move by ~1e-5
    torch.testing.assert_close(out.lm_logits.double(), want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss.double(), want[1], atol=1e-5, rtol=1e-5)
    for n, p in compiled_model.named_parameters():
        torch.testing.assert_close(p.grad.double(), want[2][n], atol=1e-4, rtol=1e-3, msg=n)


# ---------------------------------------------------------------------------------------------
# GPU tier: bf16 parity at a larger size, autocast, torch.compile with the Triton backend
# ---------------------------------------------------------------------------------------------
GPU_SHAPE = dict(V=512, P=8, D_G=32, D_L=64, T_MAX=4096, g_nheads=4, g_nlayers=2, l_nheads=2, l_nlayers=2,
                 initializer_range=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("T", [1000, 2048])  # K = 125 (flash, ragged) and 256 patches
@pytest.mark.parametrize("dtype,floor", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3), (torch.float32, 1e-5)],
                         ids=["bf16", "fp16", "fp32"])
def test_backend_parity_gpu(backend, T, dtype, floor):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _check_backend_parity(GPU_SHAPE, T, backend, dtype, floor, device="cuda")


@pytest.mark.gpu
def test_triton_parity_under_autocast_bf16_gpu():
    _check_backend_parity(GPU_SHAPE, 1024, "triton", torch.float32, 1e-2, device="cuda", autocast=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,floor", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
def test_torch_compile_fullgraph_triton_gpu(dtype, floor):
    """The Triton ops are opaque custom ops: fullgraph=True means no graph break at them. The
    compiled model is held to the same rule as a backend: against float64, at most twice the
    error of the eager model at the same precision plus the floor."""
    torch._dynamo.reset()
    ids = _ids(1024, device="cuda")
    exact = _run(_make(GPU_SHAPE, "reference", torch.float64, "cuda"), ids)
    eager = _run(_make(GPU_SHAPE, "triton", dtype, "cuda"), ids)
    compiled_model = _make(GPU_SHAPE, "triton", dtype, "cuda")
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):  # the second call reuses the compiled graph
        compiled_model.zero_grad(set_to_none=True)
        out = compiled(ids, return_loss=True)
        out.loss.backward()
    got = (out.lm_logits.detach().double(), out.loss.detach().double(),
           {n: p.grad.double() for n, p in compiled_model.named_parameters() if p.grad is not None})
    _assert_parity("logits", got[0], eager[0], exact[0], floor)
    _assert_parity("loss", got[1], eager[1], exact[1], floor)
    assert set(got[2]) == set(exact[2])
    for n in exact[2]:
        _assert_parity(f"grad of {n}", got[2][n], eager[2][n], exact[2][n], floor)


@pytest.mark.gpu
def test_auto_is_triton_on_cuda():
    x = torch.zeros(1, 1, 4, 16, device="cuda")
    assert mk.backends.resolve_backend("auto", x.device, _attn.IMPLS, "causal_attention") is _attn.IMPLS["triton"]
    assert mk.backends.resolve_backend("auto", x.device, _PE_IMPLS, "patch_embed") is _PE_IMPLS["triton"]
    assert mk.backends.resolve_backend("auto", x.device, _G2L_IMPLS, "global_to_local") is _G2L_IMPLS["triton"]


@pytest.mark.gpu
def test_loss_is_fp32_with_bf16_parameters_gpu():
    model = _make(GPU_SHAPE, "triton", torch.bfloat16, "cuda")
    out = model(_ids(1024, device="cuda"), return_loss=True)
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
