"""Fused op 2: global-to-local projection with the shifted local byte embedding added."""
from __future__ import annotations

import torch

from . import reference
from ._validate import (check_float, check_ids, check_pad_id, check_patch_size, check_same_device,
                        check_same_dtype, check_shape, num_patches)
from .backends import resolve_backend

IMPLS = {"reference": reference.global_to_local}


def check_global_to_local_args(global_out, ids, weight, bias, local_table, patch_size, pad_id, local_pad) -> None:
    check_patch_size(patch_size)
    check_float("global_out", global_out, ndim=3)
    check_float("weight", weight, ndim=2)
    check_float("local_table", local_table, ndim=2)
    V, D_L = local_table.shape
    check_ids("ids", ids, V)
    check_pad_id(pad_id, V)
    check_same_device(global_out=global_out, ids=ids, weight=weight, bias=bias, local_table=local_table,
                      local_pad=local_pad)
    check_same_dtype(global_out=global_out, weight=weight, bias=bias, local_table=local_table, local_pad=local_pad)
    B, T = ids.shape
    K = num_patches(T, patch_size)
    if global_out.shape[0] != B or global_out.shape[1] != K or global_out.shape[2] % patch_size:
        raise ValueError(
            f"global_out must have shape (B={B}, K={K}, P*D_G) with P={patch_size} for ids of shape "
            f"{tuple(ids.shape)}, got {tuple(global_out.shape)}"
        )
    D_G = global_out.shape[2] // patch_size
    check_shape("weight", weight, (D_L, D_G))
    if bias is not None:
        check_float("bias", bias)
        check_shape("bias", bias, (D_L,))
    if local_pad is not None:
        check_float("local_pad", local_pad)
        check_shape("local_pad", local_pad, (D_L,))


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
    backend: str | None = "auto",
) -> torch.Tensor:
    """(B, K, P*D_G) global output -> (B*K, P, D_L) local transformer input.

    ``out[b*K+k, p] = global_out[b, k, p] @ weight.T + bias + local_table[l_ids[b, k, p]]`` with
    ``l_ids`` the ids shifted right by one byte inside each patch (or across patches with
    ``cross_patch=True``). See :func:`megabyte_kernels.reference.global_to_local`.
    """
    check_global_to_local_args(global_out, ids, weight, bias, local_table, patch_size, pad_id, local_pad)
    impl = resolve_backend(backend, global_out.device, IMPLS, "global_to_local")
    return impl(global_out, ids, weight, bias, local_table, patch_size=patch_size, pad_id=pad_id,
                local_pad=local_pad, cross_patch=cross_patch)
