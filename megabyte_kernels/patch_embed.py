"""Fused op 1: patch embedding (shift by one patch, gather, position add, patch layout)."""
from __future__ import annotations

import torch

from . import reference
from ._validate import (check_float, check_ids, check_pad_id, check_patch_size, check_same_device,
                        check_same_dtype, check_shape, num_patches)
from .backends import resolve_backend

IMPLS = {"reference": reference.patch_embed}


def check_patch_embed_args(ids, token_table, pos_table, patch_size, pad_id, pad_patch) -> None:
    check_patch_size(patch_size)
    check_float("token_table", token_table, ndim=2)
    V, D = token_table.shape
    check_ids("ids", ids, V)
    check_pad_id(pad_id, V)
    check_same_device(ids=ids, token_table=token_table, pos_table=pos_table, pad_patch=pad_patch)
    check_same_dtype(token_table=token_table, pos_table=pos_table, pad_patch=pad_patch)
    KP = num_patches(ids.shape[1], patch_size) * patch_size
    if pos_table is not None:
        check_float("pos_table", pos_table, ndim=2)
        if pos_table.shape[1] != D:
            raise ValueError(f"pos_table must have {D} columns like token_table, got {tuple(pos_table.shape)}")
        if pos_table.shape[0] < KP:
            raise ValueError(
                f"pos_table has {pos_table.shape[0]} rows but T={ids.shape[1]} bytes pad to "
                f"K*P={KP} positions: use T <= {pos_table.shape[0] - pos_table.shape[0] % patch_size} "
                "or a larger T_MAX"
            )
    if pad_patch is not None:
        check_float("pad_patch", pad_patch)
        check_shape("pad_patch", pad_patch, (patch_size, D))


def patch_embed(
    ids: torch.Tensor,
    token_table: torch.Tensor,
    pos_table: torch.Tensor | None = None,
    *,
    patch_size: int,
    pad_id: int,
    pad_patch: torch.Tensor | None = None,
    backend: str | None = "auto",
) -> torch.Tensor:
    """Global patch embedding, (B, T) ids -> (B, K, P*D_G).

    ``h[b, t] = token_table[g_ids[b, t]] + pos_table[t]`` with ``g_ids`` the ids right-padded to
    K*P bytes and shifted right by one patch (``pad_id`` or the rows of ``pad_patch`` in front).
    See :func:`megabyte_kernels.reference.patch_embed` for the full definition and shapes.
    """
    check_patch_embed_args(ids, token_table, pos_table, patch_size, pad_id, pad_patch)
    impl = resolve_backend(backend, token_table.device, IMPLS, "patch_embed")
    return impl(ids, token_table, pos_table, patch_size=patch_size, pad_id=pad_id, pad_patch=pad_patch)
