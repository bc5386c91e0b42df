"""The reference ops: float64 gradcheck, validation errors, and the documented definitions."""
import pytest
import torch

import megabyte_kernels as mk
from megabyte_kernels import reference


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("pad_patch, pos", [(False, True), (True, False)])
def test_patch_embed_gradcheck(pad_patch, pos):
    P, D = 3, 5
    ids = torch.randint(0, 11, (2, 7))
    args = (rand(11, D), rand(12, D) if pos else None, rand(P, D) if pad_patch else None)

    def f(table, pos_table, pp):
        return mk.patch_embed(ids, table, pos_table, patch_size=P, pad_id=10, pad_patch=pp, backend="reference")

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("cross_patch, local_pad", [(False, False), (True, True), (False, True)])
def test_global_to_local_gradcheck(cross_patch, local_pad):
    P, D_G, D_L = 3, 4, 5
    ids = torch.randint(0, 11, (2, 7))

    def f(x, w, b, table, lp):
        return mk.global_to_local(x, ids, w, b, table, patch_size=P, pad_id=10, local_pad=lp,
                                  cross_patch=cross_patch, backend="reference")

    args = (rand(2, 3, P * D_G), rand(D_L, D_G), rand(D_L), rand(11, D_L), rand(D_L) if local_pad else None)
    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("hkv, alibi", [(1, False), (2, True), (4, False)])
def test_causal_attention_gradcheck(hkv, alibi):
    q, k, v = rand(1, 4, 5, 3), rand(1, hkv, 5, 3), rand(1, hkv, 5, 3)
    slopes = torch.rand(4, dtype=torch.float64) if alibi else None

    def f(q, k, v):
        return mk.causal_attention(q, k, v, alibi_slopes=slopes, backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


def test_causal_attention_matches_explicit_softmax():
    B, Hq, Hkv, N, d = 2, 4, 2, 6, 8
    q, k, v = (torch.randn(B, h, N, d, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    slopes = torch.rand(Hq, dtype=torch.float64)
    out = reference.causal_attention(q, k, v, alibi_slopes=slopes, scale=0.3)
    i = torch.arange(N)
    for h in range(Hq):
        g = h // (Hq // Hkv)
        s = 0.3 * q[:, h] @ k[:, g].transpose(-1, -2) - slopes[h] * (i[:, None] - i[None, :])
        s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
        torch.testing.assert_close(out[:, h], s.softmax(-1) @ v[:, g])


def test_patch_embed_matches_definition():
    P, D = 2, 3
    ids = torch.tensor([[5, 6, 7]])
    table = torch.arange(10 * D, dtype=torch.float64).reshape(10, D)
    pos = 100 * torch.arange(4 * D, dtype=torch.float64).reshape(4, D)
    out = mk.patch_embed(ids, table, pos, patch_size=P, pad_id=9, backend="reference")
    # g_ids = [9, 9, 5, 6] (ids padded to [5, 6, 7, 9] and shifted by one patch)
    expect = torch.stack([table[9] + pos[0], table[9] + pos[1], table[5] + pos[2], table[6] + pos[3]])
    assert torch.equal(out, expect.reshape(1, 2, P * D))


def test_global_to_local_matches_definition():
    P = 2
    ids = torch.tensor([[5, 6, 7]])
    table = torch.arange(10, dtype=torch.float64)[:, None]
    w = torch.zeros(1, 1, dtype=torch.float64)
    x = torch.zeros(1, 2, P, dtype=torch.float64)
    inside = mk.global_to_local(x, ids, w, None, table, patch_size=P, pad_id=9, backend="reference")
    across = mk.global_to_local(x, ids, w, None, table, patch_size=P, pad_id=9, cross_patch=True, backend="reference")
    assert inside.flatten().tolist() == [9, 5, 9, 7]  # l_ids[k, 0] = pad, l_ids[k, p] = ids[kP + p - 1]
    assert across.flatten().tolist() == [9, 5, 6, 7]  # l_ids[t] = ids[t - 1]


@pytest.mark.parametrize("call, match", [
    (lambda: mk.patch_embed(torch.tensor([[1, 11]]), torch.randn(11, 2), None, patch_size=2, pad_id=0),
     r"ids must lie in \[0, 11\)"),
    (lambda: mk.patch_embed(torch.tensor([[1, 2]]), torch.randn(11, 2), None, patch_size=0, pad_id=0),
     "patch_size must be"),
    (lambda: mk.patch_embed(torch.tensor([[1, 2]]), torch.randn(11, 2), None, patch_size=2, pad_id=11),
     "pad_id must be"),
    (lambda: mk.patch_embed(torch.tensor([[1, 2, 3]]), torch.randn(11, 2), torch.randn(3, 2), patch_size=2,
                            pad_id=0), "pos_table has 3 rows"),
    (lambda: mk.patch_embed(torch.tensor([[1, 2]]), torch.randn(11, 2), torch.randn(4, 2, dtype=torch.float64),
                            patch_size=2, pad_id=0), "pos_table has dtype"),
    (lambda: mk.patch_embed(torch.tensor([[1.0, 2.0]]), torch.randn(11, 2), None, patch_size=2, pad_id=0),
     "ids must be an integer"),
    (lambda: mk.global_to_local(torch.randn(1, 2, 4), torch.tensor([[1, 2, 3]]), torch.randn(3, 2), None,
                                torch.randn(11, 3), patch_size=2, pad_id=0, backend="reference"), None),
    (lambda: mk.global_to_local(torch.randn(1, 3, 4), torch.tensor([[1, 2, 3]]), torch.randn(3, 2), None,
                                torch.randn(11, 3), patch_size=2, pad_id=0), r"global_out must have shape"),
    (lambda: mk.global_to_local(torch.randn(1, 2, 4), torch.tensor([[1, 2, 3]]), torch.randn(3, 5), None,
                                torch.randn(11, 3), patch_size=2, pad_id=0), r"weight must have shape \(3, 2\)"),
    (lambda: mk.causal_attention(torch.randn(1, 3, 4, 2), torch.randn(1, 2, 4, 2), torch.randn(1, 2, 4, 2)),
     "multiple of the key/value heads"),
    (lambda: mk.causal_attention(torch.randn(1, 2, 4, 2), torch.randn(1, 1, 5, 2), torch.randn(1, 1, 5, 2)),
     "k must have shape"),
    (lambda: mk.causal_attention(torch.randn(1, 2, 4, 2), torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2),
                                 alibi_slopes=torch.rand(3)), "alibi_slopes must have shape"),
    (lambda: mk.causal_attention(torch.randn(1, 2, 4, 2), torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2),
                                 backend="magic"), "backend must be one of"),
])
def test_validation_errors(call, match):
    if match is None:  # a valid call: no error
        call()
        return
    with pytest.raises(ValueError, match=match):
        call()
