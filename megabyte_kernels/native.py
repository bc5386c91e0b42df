"""Loader of the native C++ CPU ops (``csrc/megabyte_native.cpp``): ``backend="native"``.

The extension defines four operators in the ``megabyte_native`` namespace with
``TORCH_LIBRARY`` (``patch_embed``, ``global_to_local`` and their ``*_backward``), their CPU
kernels and their autograd (C++). This module

* builds it once per process, thread-safely, on first use: a library built ahead of time by
  ``MEGABYTE_BUILD_NATIVE=1 pip install -e .`` is loaded when it matches the running torch;
  otherwise ``torch.utils.cpp_extension.load`` compiles ``csrc/`` into the torch extensions
  cache (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), where later processes
  find it already built;
* registers the fake (meta) implementations, so that ``torch.compile`` and
  ``torch.library.opcheck`` see proper operators;
* defines the ``backend="native"`` entries, which :mod:`.patch_embed` and
  :mod:`.global_to_local` declare in their tables (``backend="auto"`` uses them on CPU tensors
  only when :func:`available` says the build works; without a compiler ``auto`` falls back to
  the reference with one warning, and ``backend="native"`` raises a clear error). This module
  imports no op module: the ops import it.

Set ``MEGABYTE_NATIVE=0`` to never build or use it (``auto`` then means the reference on CPU),
``MEGABYTE_NATIVE_PREBUILT=0`` to ignore a library built ahead of time.
"""
from __future__ import annotations

import glob
import os
import threading
import time
import warnings

import torch

NAME = "megabyte_native"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(_ROOT, "csrc", "megabyte_native.cpp")]

_lock = threading.Lock()
_state: dict = {"tried": False, "error": None, "how": None}


def extra_cflags(portable: bool = False) -> list[str]:
    """-O3 and OpenMP (``at::parallel_for`` is serial without it); AVX2 for ``at::vec`` when this
    CPU has it (the JIT build runs on the machine that uses it; ``portable`` leaves it out)."""
    flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    if not portable:
        try:
            cap = torch.backends.cpu.get_cpu_capability()
        except Exception:  # older torch
            cap = "DEFAULT"
        if cap in ("AVX2", "AVX512"):
            flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return flags


def _load_prebuilt() -> bool:
    """The library ``setup.py`` built next to this file (MEGABYTE_BUILD_NATIVE=1), if it loads
    (``MEGABYTE_NATIVE_PREBUILT=0`` ignores it: the JIT build only)."""
    if os.environ.get("MEGABYTE_NATIVE_PREBUILT", "1") == "0":
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "_megabyte_native*.so"))):
        try:
            torch.ops.load_library(path)
            return True
        except OSError:  # built against another torch: fall back to the JIT build
            continue
    return False


def _build() -> None:
    if _load_prebuilt():
        _state["how"] = "prebuilt"
        return
    for src in SOURCES:
        if not os.path.isfile(src):
            raise RuntimeError(f"the C++ sources are not there ({src}); install from a source checkout")
    from torch.utils import cpp_extension

    _remove_stale_lock(cpp_extension)
    cpp_extension.load(
        name=NAME,
        sources=SOURCES,
        extra_cflags=extra_cflags(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,  # TORCH_LIBRARY ops only, no pybind11: loaded into torch.ops
        verbose=False,
    )
    _state["how"] = "jit"


# A build killed midway (Ctrl-C, a CI timeout) leaves its lock file behind, and every later
# build waits on it forever, silently. A genuine build here takes a minute or two.
STALE_LOCK_S = 15 * 60


def _remove_stale_lock(cpp_extension) -> None:
    """Remove the build directory's ``lock`` when it is older than :data:`STALE_LOCK_S` (warning)."""
    try:
        build_dir = cpp_extension._get_build_directory(NAME, verbose=False)
    except Exception:  # a torch without this private helper: leave the lock to torch
        return
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:  # no lock: the usual case
        return
    if age > STALE_LOCK_S:
        warnings.warn(f"megabyte_kernels: removing the stale build lock {lock} ({age / 60:.0f} min old, left by "
                      "a build that was killed)", stacklevel=2)
        try:
            os.remove(lock)
        except OSError:
            pass


def load() -> None:
    """Build (once) and load the ops; raises ``RuntimeError`` with the reason when that fails."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    if os.environ.get("MEGABYTE_NATIVE", "1") == "0":
                        raise RuntimeError("disabled by MEGABYTE_NATIVE=0")
                    _build()
                    _register_fakes()
                except Exception as e:  # no compiler, no ninja, compile error, ...
                    lines = str(e).strip().splitlines() or [""]
                    first_err = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
                    _state["error"] = f"{type(e).__name__}: {first_err.strip()}"
                _state["tried"] = True
    if _state["error"] is not None:
        raise RuntimeError(f"the native CPU ops (csrc/) could not be built: {_state['error']}")


def available() -> bool:
    """True when the native ops are built and loaded (tries the build once; warns once if not)."""
    try:
        load()
        return True
    except RuntimeError as e:
        if not _state.get("warned"):
            _state["warned"] = True
            warnings.warn(f"megabyte_kernels: {e}; backend='auto' uses the reference ops on CPU", stacklevel=3)
        return False


# ----------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes only, symbolic sizes welcome

def _register_fakes() -> None:
    lib = f"{NAME}::"

    @torch.library.register_fake(lib + "patch_embed")
    def _(ids, token_table, pos_table, pad_patch, patch_size, pad_id):
        B, T = ids.shape
        K = (T + patch_size - 1) // patch_size
        return token_table.new_empty((B, K, patch_size * token_table.shape[1]))

    @torch.library.register_fake(lib + "patch_embed_backward")
    def _(grad, ids, vocab_size, pos_rows, patch_size, pad_id, has_pos, has_pad_patch):
        D = grad.shape[2] // patch_size
        return (grad.new_empty((vocab_size, D)), grad.new_empty((pos_rows if has_pos else 0, D)),
                grad.new_empty((patch_size if has_pad_patch else 0, D)))

    @torch.library.register_fake(lib + "global_to_local")
    def _(global_out, ids, weight, bias, local_table, local_pad, patch_size, pad_id, cross_patch, shift=1):
        B, K, _ = global_out.shape
        return global_out.new_empty((B * K, patch_size, weight.shape[0]))

    @torch.library.register_fake(lib + "global_to_local_backward")
    def _(grad, global_out, ids, weight, vocab_size, patch_size, pad_id, cross_patch, has_bias, has_local_pad,
          shift=1):
        D_L = weight.shape[0]
        return (torch.empty_like(global_out), torch.empty_like(weight), grad.new_empty((D_L if has_bias else 0,)),
                grad.new_empty((vocab_size, D_L)), grad.new_empty((D_L if has_local_pad else 0,)))


# ----------------------------------------------------------------------------------------------
# the backend entries: same signatures as the reference functions

def patch_embed_native(
    ids: torch.Tensor,
    token_table: torch.Tensor,
    pos_table: torch.Tensor | None = None,
    *,
    patch_size: int,
    pad_id: int,
    pad_patch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Native CPU patch embedding, same signature and math as :func:`reference.patch_embed`."""
    load()
    return torch.ops.megabyte_native.patch_embed(ids, token_table, pos_table, pad_patch, patch_size, pad_id)


def global_to_local_native(
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
    """Native CPU global-to-local, same signature and math as :func:`reference.global_to_local`."""
    load()
    return torch.ops.megabyte_native.global_to_local(global_out, ids, weight, bias, local_table, local_pad,
                                                     patch_size, pad_id, cross_patch, shift)
