"""Pure-PyTorch reference implementations of the fused ops.

These define the math. Every other backend (Triton, native C++) is tested against them, in
float64, on small odd shapes. They run on any device and in any float dtype, and autograd
gives their gradients. Inputs are assumed validated (the public functions in
``megabyte_kernels`` validate once, then dispatch here or to a kernel).

Notation (DESIGN.md §2): B batch, T bytes, P patch size, K = ceil(T / P) patches, V vocabulary,
D_G global width per byte slot, D_L local width, H heads, d head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import num_patches


def _pad_to_patches(ids: torch.Tensor, P: int, pad_id: int) -> torch.Tensor:
    """(B, T) -> (B, K*P) int64: right-pad with ``pad_id`` to a whole number of patches.

    Widened to int64 first: the validated id dtypes include uint8/int16/int32, which
    ``F.embedding`` rejects (uint8, int16) and where a ``pad_id`` above 255 would wrap."""
    ids = ids.long()
    T = ids.shape[1]
    extra = num_patches(T, P) * P - T
    return F.pad(ids, (0, extra), value=pad_id) if extra else ids


def patch_embed(
    ids: torch.Tensor,
    token_table: torch.Tensor,
    pos_table: torch.Tensor | None = None,
    *,
    patch_size: int,
    pad_id: int,
    pad_patch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Global patch embedding: shift right by one patch, gather, add positions, patch layout.

    With ids right-padded to ``K*P`` bytes and ``g_ids = [pad_id]*P ++ ids[:, :-P]``::

        h[b, t] = token_table[g_ids[b, t]] + pos_table[t]          (t in [0, K*P))
        out[b, k, p*D_G:(p+1)*D_G] = h[b, k*P + p]

    With ``pad_patch`` (the paper's trainable pad patch) the first patch's token rows are
    ``pad_patch[p]`` instead of ``token_table[pad_id]``; positions are still added.

    Args:
        ids: (B, T) integer byte ids in [0, V).
        token_table: (V, D_G) byte embedding E_G.
        pos_table: (T_MAX, D_G) learned positions with T_MAX >= K*P, or None (ALiBi / none).
        pad_patch: (P, D_G) or None.
    Returns:
        (B, K, P*D_G) in token_table's dtype.
    """
    P = patch_size
    B = ids.shape[0]
    D = token_table.shape[1]
    ids = _pad_to_patches(ids, P, pad_id)
    KP = ids.shape[1]
    g_ids = F.pad(ids[:, : KP - P], (P, 0), value=pad_id)  # shift right by one patch
    h = F.embedding(g_ids, token_table)  # (B, K*P, D_G)
    if pad_patch is not None:
        h = torch.cat([pad_patch.unsqueeze(0).expand(B, P, D), h[:, P:]], dim=1)
    if pos_table is not None:
        h = h + pos_table[:KP]
    return h.reshape(B, KP // P, P * D)


def global_to_local(
    global_out: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    local_table: torch.Tensor,
    *,
    patch_size: int,
    pad_id: int,
    local_pad: torch.Tensor | None = None,
    cross_patch: bool = False,
    shift: int = 1,
) -> torch.Tensor:
    """Global-to-local projection plus the shifted local byte embedding.

    ``global_out`` (B, K, P*D_G) is read as (B*K, P, D_G) and projected by one shared linear
    map; the embedding of the previous byte is added::

        out[b*K + k, p] = global_out[b, k, p*D_G:(p+1)*D_G] @ weight.T + bias
                          + local_table[l_ids[b, k, p]]

    Default shift (the original MEGABYTE): within each patch, ``l_ids[k, 0] = pad_id`` and
    ``l_ids[k, p] = ids[k*P + p - 1]``. With ``cross_patch=True`` (``megabyte_in_action``):
    ``l_ids[t] = ids[t - 1]`` across patch borders and ``l_ids[0] = pad_id``.
    With ``local_pad`` the shifted-in pad slots (not pad bytes of the input) use ``local_pad``
    instead of ``local_table[pad_id]``.

    ``shift = s`` (1 <= s <= P, a divisor of P) shifts by s bytes instead of one: the boundary
    between two inner stages of an N-stage model, where a patch (the parent's unit) holds P / s
    child units of s bytes and each child unit embeds the bytes of the previous one::

        l_ids[k, p] = pad_id for p < s,   l_ids[k, p] = ids[k*P + p - s] otherwise

    (with ``cross_patch``: ``l_ids[t] = ids[t - s]``, pad for t < s); ``local_pad`` fills all
    s shifted-in slots of a patch.

    Args:
        global_out: (B, K, P*D_G), K = ceil(T / P).
        ids: (B, T) integer byte ids in [0, V).
        weight: (D_L, D_G); bias: (D_L,) or None.
        local_table: (V, D_L) local byte embedding E_L.
        local_pad: (D_L,) or None.
    Returns:
        (B*K, P, D_L) in global_out's dtype.
    """
    P = patch_size
    B, K, PD = global_out.shape
    D_G = PD // P
    s = shift
    ids = _pad_to_patches(ids, P, pad_id)  # (B, K*P)
    if cross_patch:
        l_ids = F.pad(ids[:, :-s], (s, 0), value=pad_id).reshape(B * K, P)
    else:
        l_ids = F.pad(ids.reshape(B * K, P)[:, :P - s], (s, 0), value=pad_id)
    emb = F.embedding(l_ids, local_table)  # (B*K, P, D_L)
    if local_pad is not None:
        shifted_in = torch.zeros(B, K, P, 1, dtype=torch.bool, device=ids.device)
        if cross_patch:
            shifted_in.view(B, K * P, 1)[:, :s] = True
        else:
            shifted_in[:, :, :s] = True
        emb = torch.where(shifted_in.reshape(B * K, P, 1), local_pad.to(emb.dtype), emb)
    proj = F.linear(global_out.reshape(B * K, P, D_G), weight, bias)
    return proj + emb


def alibi_bias(alibi_slopes: torch.Tensor, N: int, dtype: torch.dtype) -> torch.Tensor:
    """(H, N, N) additive bias ``-slope_h * (i - j)`` for j <= i, ``-inf`` above the diagonal."""
    i = torch.arange(N, device=alibi_slopes.device)
    rel = (i[:, None] - i[None, :]).to(torch.float32 if dtype != torch.float64 else dtype)
    bias = -alibi_slopes.to(rel.dtype)[:, None, None] * rel
    bias = bias.masked_fill(rel < 0, float("-inf"))
    return bias.to(dtype)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal softmax attention with grouped key/value heads and optional ALiBi.

    ``o[b, h, i] = sum_{j <= i} softmax_j(scale * q[b,h,i]·k[b,g,j] - slope_h*(i-j)) v[b,g,j]``
    with ``g = h // (Hq / Hkv)`` (Hkv = 1 is multi-query attention).

    Args:
        q: (B, Hq, N, d); k, v: (B, Hkv, N, d) with Hq a multiple of Hkv.
        alibi_slopes: (Hq,) or None.
        scale: softmax scale, default ``d ** -0.5``.
    Returns:
        (B, Hq, N, d) like q.
    """
    B, Hq, N, d = q.shape
    Hkv = k.shape[1]
    if Hkv != Hq:
        G = Hq // Hkv
        k = k[:, :, None].expand(B, Hkv, G, N, d).reshape(B, Hq, N, d)
        v = v[:, :, None].expand(B, Hkv, G, N, d).reshape(B, Hq, N, d)
    if alibi_slopes is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = alibi_bias(alibi_slopes, N, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
