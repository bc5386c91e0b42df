"""What a resumable training run saves, and how a resumed run gets it back.

A save writes two things into ``--out``: the model as ``save_pretrained`` files (``config.json``,
``model.safetensors``: what ``megabyte eval`` / ``generate`` read) and ``train_state.pt``, which
holds everything else a run needs to continue bit for bit: optimizer state, step, training
seconds so far (the time-following cosine), the smoothed loss, every RNG (torch CPU and CUDA,
the batch sampler's generator = the data position), the model config and the arguments. The
file format (magic, SHA-256, atomic replace, the previous file kept) is
:mod:`megabyte.checkpoint`'s. Under FSDP2 every rank takes part in gathering the full state;
rank 0 writes it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .distributed import full_state, load_full_state
from .model import Megabyte


def find(args, out_dir: Path, say) -> tuple[dict | None, Path | None]:
    """The state that ``--resume-from FILE`` or ``--resume`` continue from, or ``(None, None)``.

    Read before anything is written to ``--out``, so a damaged state is reported before it could
    be overwritten. ``--resume`` takes ``train_state.pt``, else (with a warning) the previous one,
    and starts from step 0 when ``--out`` holds neither yet.
    """
    resume_from = getattr(args, "resume_from", None)
    if resume_from:
        return ckpt.load_state(resume_from), Path(resume_from)
    if getattr(args, "resume", False):
        if (out_dir / ckpt.STATE).exists() or (out_dir / ckpt.PREV).exists():
            return ckpt.load_latest(out_dir, warn=lambda m: say(m, file=sys.stderr))
        say(f"resume: no training state in {out_dir} yet: starting from step 0")
    return None, None


def check_same_model(state: dict, state_path: Path, config: dict) -> None:
    """Refuse a state written for another model than the one these arguments build.

    ``extra`` (the data description) and ``backend`` may differ: neither changes the weights.
    """
    old = state.get("config", {})
    diff = [f"{k}: checkpoint {old.get(k)!r}, now {config.get(k)!r}" for k in sorted(set(old) | set(config))
            if k not in ("extra", "backend") and old.get(k) != config.get(k)]
    if diff:
        raise ckpt.CheckpointError(f"--resume: {state_path} holds another model than these arguments build "
                                   f"({'; '.join(diff)})")


def restore(state: dict, model, opt, sampler, device: torch.device, fsdp: bool) -> tuple[int, float, float | None]:
    """Put a saved state back into the model (the unwrapped module, sharded in place under FSDP2),
    the optimizer, the batch sampler and the RNGs; returns ``(step, train_s, ema)``."""
    load_full_state(model, opt, state["model"], state["optimizer"], fsdp)
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda" and state.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    return int(state["step"]), float(state["train_s"]), state.get("ema")


def save(out_dir: Path, *, step: int, train_s: float, ema: float | None, model, opt, sampler, dist, fsdp: bool,
         args) -> None:
    """``save_pretrained`` files + ``train_state.pt`` at ``step``; rank 0 writes, every rank gathers.

    ``model`` is the unwrapped module (its state dict keys are the checkpoint's, not DDP's
    ``module.``-prefixed ones).
    """
    model_sd, opt_sd = full_state(model, opt, fsdp)
    if dist.main:
        if fsdp:  # the sharded module holds DTensors: write the weights through a plain copy
            plain = Megabyte(model.config)
            plain.load_state_dict(model_sd)
            plain.save_pretrained(str(out_dir))
        else:
            model.save_pretrained(str(out_dir))
        device = dist.device
        ckpt.save_state({
            "step": step, "train_s": train_s, "ema": ema, "model": model_sd, "optimizer": opt_sd,
            "sampler": sampler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "config": model.config.to_dict(), "world": dist.world,
            "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
        }, out_dir)
    dist.barrier()
