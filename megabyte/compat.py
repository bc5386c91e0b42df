"""Load checkpoints of the original implementation (github shjwudp/megabyte).

``from_original(state_dict, config, variant)`` builds a :class:`Megabyte` with the same
weights as the original ``model/megabyte.py`` (``variant="megabyte"``) or
``model/megabyte_in_action.py`` (``variant="in_action"``) model; it computes the same logits
and loss. ``config`` may be the original ``MegabyteConfig`` namedtuple, a dict, or ours.

Key mapping (original -> this project); every other key is the same in both:

=========================================  ==========================================
original                                   megabyte (this project)
=========================================  ==========================================
``{g,l}_transformer.layers.i.0.<name>``    ``{g,l}_transformer.layers.i.attn.<name>``
``{g,l}_transformer.layers.i.1.0.*``       ``{g,l}_transformer.layers.i.ff.norm.*``
``{g,l}_transformer.layers.i.1.1.*``       ``{g,l}_transformer.layers.i.ff.fc1.*``
``{g,l}_transformer.layers.i.1.4.*``       ``{g,l}_transformer.layers.i.ff.fc2.*``
``gl_linear.1.*``                          ``gl_linear.*``
``to_embed.weight`` (in_action)            ``g_embedder.weight``
=========================================  ==========================================

The original attention is multi-query (one key/value head) with head dim D / H, which is this
project's default (``g_kv_heads = l_kv_heads = 1``). The in_action variant's ALiBi bias
``slope_h * j`` equals the relative form ``-slope_h * (i - j)`` used here up to a per-row
constant, which softmax cancels.
"""
from __future__ import annotations

import re

import torch

from .config import MegabyteConfig
from .model import Megabyte

ORIGINAL_FIELDS = ("V", "P", "D_G", "D_L", "T_MAX", "g_nheads", "g_nlayers", "l_nheads", "l_nlayers",
                   "initializer_range", "pad_id", "eos_id")

_RULES = [
    (re.compile(r"^(g|l)_transformer\.layers\.(\d+)\.0\."), r"\1_transformer.layers.\2.attn."),
    (re.compile(r"^(g|l)_transformer\.layers\.(\d+)\.1\.0\."), r"\1_transformer.layers.\2.ff.norm."),
    (re.compile(r"^(g|l)_transformer\.layers\.(\d+)\.1\.1\."), r"\1_transformer.layers.\2.ff.fc1."),
    (re.compile(r"^(g|l)_transformer\.layers\.(\d+)\.1\.4\."), r"\1_transformer.layers.\2.ff.fc2."),
    (re.compile(r"^gl_linear\.1\."), "gl_linear."),
    (re.compile(r"^to_embed\."), "g_embedder."),
]


def map_original_key(key: str) -> str:
    """The name in this project of an original state_dict key."""
    for pattern, repl in _RULES:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return key


def config_from_original(config, variant: str = "megabyte") -> MegabyteConfig:
    """A :class:`MegabyteConfig` from the original namedtuple (or a dict with its fields)."""
    if isinstance(config, MegabyteConfig):
        if config.variant != variant:
            raise ValueError(f"config.variant is {config.variant!r} but variant={variant!r} was asked for")
        return config
    d = config._asdict() if hasattr(config, "_asdict") else dict(config)
    missing = [f for f in ORIGINAL_FIELDS if f not in d]
    if missing:
        raise ValueError(f"config lacks the original MegabyteConfig fields {missing}")
    return MegabyteConfig(**{f: d[f] for f in ORIGINAL_FIELDS}, variant=variant)


def from_original(state_dict: dict, config, variant: str = "megabyte", backend: str | None = None) -> Megabyte:
    """Build a :class:`Megabyte` from a state_dict saved by the original implementation."""
    if variant not in ("megabyte", "in_action"):
        raise ValueError(f"variant must be 'megabyte' or 'in_action', got {variant!r}")
    cfg = config_from_original(config, variant)
    model = Megabyte(cfg, backend=backend)
    mapped = {map_original_key(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match variant={variant!r} with this config: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} in the state_dict, {tuple(own[k].shape)} in the model")
    with torch.no_grad():
        model.load_state_dict(mapped, strict=True)
    return model
