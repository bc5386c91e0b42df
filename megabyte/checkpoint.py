"""Resumable training state: written atomically, checked on load, the previous one kept.

``megabyte train --out DIR`` keeps, beside the ``save_pretrained`` files (``config.json``,
``model.safetensors``, read by ``megabyte eval`` and ``megabyte generate``), the whole state a
run needs to continue bit for bit:

- ``train_state.pt``: model weights, optimizer state, step, schedule figures (training seconds
  so far, for the time-following cosine), every RNG (torch CPU and CUDA, the batch sampler's
  generator = the data position), the running log figures, the model config and the arguments;
- ``train_state.prev.pt``: the state written before it.

A file is ``MAGIC`` + the SHA-256 of the payload + the payload (``torch.save`` bytes), so a
truncated or corrupted file is detected before anything is unpickled. Writing goes to a
temporary file in the same folder (flushed and ``fsync``'d), then the current file becomes
``.prev`` and the temporary file becomes current by ``os.replace`` (atomic on POSIX): a kill at
any moment leaves at least one complete state on disk.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

MAGIC = b"MEGABYTE-TRAIN-STATE-1\n"
STATE = "train_state.pt"
PREV = "train_state.prev.pt"


class CheckpointError(ValueError):
    """A training-state file is missing, truncated, corrupted or does not fit this run."""


def save_state(state: dict, directory: str | os.PathLike) -> Path:
    """Write ``state`` as ``DIR/train_state.pt`` atomically; the old one becomes ``.prev``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    path, prev, tmp = d / STATE, d / PREV, d / (STATE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(hashlib.sha256(payload).digest())
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, prev)
    os.replace(tmp, path)
    try:  # make the renames durable too (best effort: not every file system allows it)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a file written by :func:`save_state`; ``CheckpointError`` if it is not intact."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{p}: no such training-state file") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e}") from None
    head = len(MAGIC) + 32
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{p}: not a megabyte training-state file (bad header; "
                              f"{len(raw)} bytes, truncated or overwritten?)")
    if len(raw) < head:
        raise CheckpointError(f"{p}: truncated ({len(raw)} bytes, shorter than the header)")
    digest, payload = raw[len(MAGIC):head], raw[head:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{p}: corrupted or truncated (SHA-256 of the {len(payload)}-byte payload "
                              "does not match the one written with it)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # intact bytes that torch cannot read: another torch, another format
        raise CheckpointError(f"{p}: cannot be read by torch.load: {e}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{p}: not a training state (no step)")
    return state


def load_latest(directory: str | os.PathLike, map_location="cpu", warn=None) -> tuple[dict, Path]:
    """The newest intact state in ``directory``: ``train_state.pt``, else ``train_state.prev.pt``.

    ``warn(message)`` is told when the newest file is unusable and the previous one is taken.
    Raises ``CheckpointError`` naming both files when neither is usable.
    """
    d = Path(directory)
    errors = []
    for name in (STATE, PREV):
        p = d / name
        if not p.exists():
            errors.append(f"{p}: missing")
            continue
        try:
            state = load_state(p, map_location)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors and warn is not None:
            warn(f"warning: {errors[0]}; resuming from the previous state {p} (step {state['step']})")
        return state, p
    raise CheckpointError(f"--resume: no usable training state in {d}: " + "; ".join(errors))
