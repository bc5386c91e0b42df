"""Backend selection shared by every op.

Each op module declares all of its implementations in one table at its end,
``IMPLS = {"reference": ..., "triton": ..., "native": ...}``; no module writes another module's
table. This module alone decides which one runs:

=============  ==============================================  ================================
backend        devices                                          available when
=============  ==============================================  ================================
``reference``  any                                              always
``triton``     CUDA (CPU tensors under ``TRITON_INTERPRET=1``)  the triton package imports
``native``     CPU                                              the csrc/ ops build (lazily, once)
=============  ==============================================  ================================

``backend`` is one of ``"auto"``, ``"reference"``, ``"triton"``, ``"native"``; ``None`` reads
the ``MEGABYTE_BACKEND`` environment variable (default ``"auto"``). ``auto`` picks Triton for
CUDA tensors, the native C++ ops for CPU tensors when they are built, else the reference, and
falls back silently; an explicit request that cannot be served raises a ``ValueError`` saying why.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

BACKENDS = ("auto", "reference", "triton", "native")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def native_available() -> bool:
    """True when the native C++ CPU ops (``csrc/``) are built: the first call builds them (once
    per process, cached on disk), a failed build warns once and is remembered."""
    try:
        from . import native
    except ImportError:
        return False
    return native.available()


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, device: torch.device, impls: dict[str, Callable], op: str) -> Callable:
    """Return the implementation of ``op`` for ``backend`` on ``device``."""
    if backend is None:
        backend = os.environ.get("MEGABYTE_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and "triton" in impls and triton_available():
            return impls["triton"]
        if device.type == "cpu" and "native" in impls and native_available():
            return impls["native"]
        return impls["reference"]
    if backend not in impls:
        raise ValueError(f"{op}: backend {backend!r} is not implemented; available: {sorted(impls)}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{op}: backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (got {device}); "
                "set TRITON_INTERPRET=1 to run the kernels on CPU tensors in the interpreter"
            )
    if backend == "native" and device.type != "cpu":
        raise ValueError(f"{op}: backend='native' runs on CPU tensors only (got {device})")
    return impls[backend]
