"""Input validation shared by every backend of every op.

Each public op calls these once, before dispatching, so that bad input raises a clear
``ValueError`` naming the argument and the expected value — and never reaches a kernel that
could read out of bounds.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t: torch.Tensor, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(f"{k} is on {d} but {first_name} is on {first}: all inputs must share one device")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for k, v in present.items():
        if v.dtype != first.dtype:
            raise ValueError(f"{k} has dtype {v.dtype} but {first_name} has {first.dtype}: they must match")


def check_ids(name: str, ids: torch.Tensor, vocab_size: int, *, ndim: int = 2) -> None:
    """ids must be an integer tensor with every value in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of int64 byte ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor (int64), got {ids.dtype}")
    if ids.dim() != ndim:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(ids.shape)}")
    if torch.compiler.is_compiling():
        # inside a compiled graph a data-dependent Python branch would break the graph: the
        # check becomes an assertion the graph itself runs (an error, never an OOB read)
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(),
                            f"{name} must lie in [0, {vocab_size})")
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (the table has {vocab_size} rows), found {bad}")


def check_patch_size(patch_size: int) -> None:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")


def check_shift(shift: int, patch_size: int) -> None:
    """global_to_local's ``shift``: an int in [1, patch_size] (the bytes a local id lags behind)."""
    if not isinstance(shift, int) or isinstance(shift, bool) or not 1 <= shift <= patch_size:
        raise ValueError(f"shift must be an int in [1, patch_size={patch_size}], got {shift!r}")


def check_pad_id(pad_id: int, vocab_size: int) -> None:
    if not isinstance(pad_id, int) or isinstance(pad_id, bool) or not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id must be an int in [0, {vocab_size}), got {pad_id!r}")


def num_patches(T: int, P: int) -> int:
    """K = ceil(T / P)."""
    return (T + P - 1) // P
