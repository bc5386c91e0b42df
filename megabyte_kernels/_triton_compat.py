"""``triton`` and ``triton.language`` when installed, else stand-ins so the op modules import.

The Triton kernels are module-level functions decorated at import time. Without the triton
package (it is an optional dependency) the stand-in decorators return the function unchanged
and the configs are plain records; nothing can launch a kernel, because
``resolve_backend`` refuses ``backend="triton"`` without triton before any kernel is reached.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the reference (and native) backends work without triton
    HAS_TRITON = False

    class _Config:
        def __init__(self, kwargs, num_warps=4, num_stages=3, **options):
            self.kwargs, self.num_warps, self.num_stages = dict(kwargs), num_warps, num_stages

    class _NoTriton:
        Config = _Config

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*args, **kwargs):
            return lambda fn: fn

        @staticmethod
        def cdiv(a, b):
            return (a + b - 1) // b

    triton = _NoTriton()
    tl = None

__all__ = ["HAS_TRITON", "triton", "tl"]
