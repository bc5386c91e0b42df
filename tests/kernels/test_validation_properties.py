"""Property-based tests (hypothesis) of the ops' input validation, with backend="reference".

Each test draws shapes, dtypes and values that are valid or broken in one random way, and states
the op's contract independently of its code: valid input gives an output of the documented shape
and dtype, broken input raises ``ValueError`` — never another exception from deep inside.
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import megabyte_kernels as mk  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT_DTYPES = [torch.int64, torch.int32, torch.uint8]


def _call(fn, *a, **kw):
    """(output, None) or (None, the ValueError); any other exception fails the test."""
    try:
        return fn(*a, **kw), None
    except ValueError as e:
        assert str(e), "a ValueError without a message"
        return None, e


@st.composite
def patch_embed_inputs(draw):
    B, T = draw(st.integers(0, 3)), draw(st.integers(0, 13))
    V, D = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    P = draw(st.sampled_from([-1, 0, 1, 2, 3, 4, 5, True]))
    pad_id = draw(st.integers(-2, V + 1))
    ids_dtype = draw(st.sampled_from(INT_DTYPES + [torch.float32]))
    lo_v, hi_v = draw(st.sampled_from([(0, V - 1), (0, V - 1), (0, V - 1), (-2, V - 1), (0, V + 2)]))
    if ids_dtype == torch.uint8:
        lo_v = max(0, lo_v)
    ids = torch.randint(lo_v, hi_v + 1, (B, T)).to(ids_dtype)
    if draw(st.booleans()):
        ids = ids.reshape(-1)  # wrong rank
    table = torch.randn(V, D)
    if draw(st.integers(0, 9)) == 0:
        table = table.to(torch.int64)
    pos = None
    if draw(st.booleans()):
        pos = torch.randn(draw(st.integers(0, 20)), D + draw(st.sampled_from([0, 0, 0, 1])))
        if draw(st.integers(0, 9)) == 0:
            pos = pos.double()
    pad_patch = None
    if draw(st.booleans()):
        Pp = P if isinstance(P, int) and not isinstance(P, bool) and P > 0 else 1
        pad_patch = torch.randn(Pp + draw(st.sampled_from([0, 0, 0, 1])), D)
    return ids, table, pos, P, pad_id, pad_patch


def _patch_embed_valid(ids, table, pos, P, pad_id, pad_patch) -> bool:
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        return False
    if table.dtype not in (torch.float32, torch.float64) or ids.dim() != 2 or ids.numel() == 0:
        return False
    if ids.dtype not in INT_DTYPES:
        return False
    V, D = table.shape
    if int(ids.min()) < 0 or int(ids.max()) >= V or not 0 <= pad_id < V:
        return False
    KP = -(-ids.shape[1] // P) * P
    if pos is not None and (pos.dtype != table.dtype or pos.shape[1] != D or pos.shape[0] < KP):
        return False
    if pad_patch is not None and tuple(pad_patch.shape) != (P, D):
        return False
    return True


@SETTINGS
@given(patch_embed_inputs())
def test_patch_embed_validates_or_computes(args):
    ids, table, pos, P, pad_id, pad_patch = args
    out, err = _call(mk.patch_embed, ids, table, pos, patch_size=P, pad_id=pad_id, pad_patch=pad_patch,
                     backend="reference")
    valid = _patch_embed_valid(*args)
    assert (err is None) == valid, (err, [getattr(a, "shape", a) for a in args])
    if valid:
        B, T = ids.shape
        K = -(-T // P)
        assert out.shape == (B, K, P * table.shape[1]) and out.dtype == table.dtype
        first = pad_patch if pad_patch is not None else table[pad_id].expand(P, -1)
        if pos is not None:
            first = first + pos[:P]
        torch.testing.assert_close(out[:, 0].reshape(B, P, -1), first.expand(B, P, -1))


@st.composite
def global_to_local_inputs(draw):
    B, T = draw(st.integers(0, 3)), draw(st.integers(0, 11))
    P = draw(st.sampled_from([0, 1, 2, 3, 4]))
    V, D_G, D_L = draw(st.integers(1, 9)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    Pk = max(P, 1)
    K = -(-T // Pk)
    gshape = [B, K, Pk * D_G]
    broken = draw(st.sampled_from([None] * 6 + ["g_shape", "w_shape", "bias", "ids_range", "pad_id", "dtype",
                                                "local_pad", "rank"]))
    if broken == "g_shape":
        gshape[draw(st.integers(0, 2))] += 1
    g = torch.randn(*gshape)
    ids = torch.randint(0, V, (B, T))
    w = torch.randn(D_L + (broken == "w_shape"), D_G)
    bias = torch.randn(D_L + (broken == "bias")) if draw(st.booleans()) or broken == "bias" else None
    table = torch.randn(V, D_L)
    pad_id = V if broken == "pad_id" else draw(st.integers(0, V - 1))
    if broken == "ids_range" and ids.numel():
        ids[0, 0] = V
    if broken == "dtype":
        w = w.double()
    local_pad = torch.randn(D_L + 1) if broken == "local_pad" else None
    if broken == "rank":
        ids = ids[None]
    return g, ids, w, bias, table, P, pad_id, local_pad, broken


@SETTINGS
@given(global_to_local_inputs(), st.booleans())
def test_global_to_local_validates_or_computes(args, cross_patch):
    g, ids, w, bias, table, P, pad_id, local_pad, broken = args
    out, err = _call(mk.global_to_local, g, ids, w, bias, table, patch_size=P, pad_id=pad_id,
                     local_pad=local_pad, cross_patch=cross_patch, backend="reference")
    valid = broken is None and P >= 1 and ids.numel() > 0
    assert (err is None) == valid, (broken, P, tuple(ids.shape), err)
    if valid:
        B, T = ids.shape
        K = -(-T // P)
        assert out.shape == (B * K, P, table.shape[1]) and out.dtype == g.dtype
        # byte 0 of patch 0 sees the pad row: out = g W^T + b + E_L[pad]
        want = g[:, 0, : g.shape[2] // P] @ w.t() + (bias if bias is not None else 0) + table[pad_id]
        torch.testing.assert_close(out.view(B, K, P, -1)[:, 0, 0], want)


@st.composite
def attention_inputs(draw):
    B, N, d = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 8))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 3))
    broken = draw(st.sampled_from([None] * 6 + ["heads", "kv_shape", "k_v", "rank", "int", "dtype", "slopes",
                                                "scale"]))
    q = torch.randn(B, Hq + (broken == "heads" and Hkv > 1), N, d)
    k = torch.randn(B, Hkv, N + (broken == "kv_shape"), d)
    v = torch.randn(B, Hkv, N, d + (broken == "k_v"))
    if broken == "rank":
        q = q[0]
    if broken == "int":
        q = q.long()
    if broken == "dtype":
        k = k.double()
    slopes = torch.rand(Hq + (broken == "slopes")) if draw(st.booleans()) or broken == "slopes" else None
    scale = -1.0 if broken == "scale" else draw(st.sampled_from([None, 0.5]))
    if broken == "heads" and Hkv == 1:
        broken = None  # any Hq is a multiple of 1
    return q, k, v, slopes, scale, broken


@SETTINGS
@given(attention_inputs())
def test_causal_attention_validates_or_computes(args):
    q, k, v, slopes, scale, broken = args
    out, err = _call(mk.causal_attention, q, k, v, alibi_slopes=slopes, scale=scale, backend="reference")
    assert (err is None) == (broken is None), (broken, err)
    if broken is None:
        assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
        # the first query attends to the first key only
        G = q.shape[1] // k.shape[1]
        torch.testing.assert_close(out[:, :, 0], v[:, :, 0].repeat_interleave(G, dim=1))
