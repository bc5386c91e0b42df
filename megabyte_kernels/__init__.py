"""Fused ops for MEGABYTE: one public function per op, each with a ``backend=`` argument.

``backend`` is ``"auto"`` (Triton on CUDA, native on CPU when built, else reference),
``"reference"`` (pure PyTorch, the oracle), ``"triton"`` or ``"native"``; ``None`` reads the
``MEGABYTE_BACKEND`` environment variable.
"""
from .attention import causal_attention
from .backends import BACKENDS
from .global_to_local import global_to_local
from .patch_embed import patch_embed

__all__ = ["BACKENDS", "causal_attention", "global_to_local", "patch_embed"]
