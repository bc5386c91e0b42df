"""Model configuration: the original implementation's fields, in its order, plus options.

The first twelve fields are exactly the original ``MegabyteConfig`` namedtuple's (github
shjwudp/megabyte), in the same order, so its README example runs unchanged. Every extra field
has a default that reproduces the original model; ``variant="in_action"`` switches the
defaults to the original repository's ``megabyte_in_action.py`` (one byte table shared by the
global and the local model, ALiBi in both transformers, local shift across patch borders).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

VARIANTS = ("megabyte", "in_action")
POSITIONS = ("learned", "alibi", "none")
PADS = ("pad_id", "trainable")
ACTIVATIONS = ("gelu", "relu")


@dataclass
class MegabyteConfig:
    V: int = 512  # vocabulary: 256 byte values + specials
    P: int = 4  # patch size
    D_G: int = 512  # global width per byte slot (the global transformer is P*D_G wide)
    D_L: int = 128  # local width
    T_MAX: int = 1024  # longest sequence (rows of the learned position table)
    g_nheads: int = 32
    g_nlayers: int = 4
    l_nheads: int = 2
    l_nlayers: int = 2
    initializer_range: float = 0.02
    pad_id: int = 257
    eos_id: int = 258
    # --- options; defaults reproduce the original model -------------------------------------
    variant: str = "megabyte"  # "megabyte" | "in_action"
    g_kv_heads: int = 1  # key/value heads of the global transformer (1 = multi-query)
    l_kv_heads: int = 1
    positions: str | None = None  # "learned" | "alibi" | "none"; None: from the variant
    pad: str = "pad_id"  # "pad_id": pad rows of the byte tables; "trainable": the paper's pad patch
    tie_head: bool = False  # head weight tied to the local byte table E_L
    activation: str = "gelu"  # "gelu" | "relu"
    dropout: float = 0.0
    final_norm: bool = False  # LayerNorm after each transformer
    ff_mult: int = 4
    backend: str = "auto"  # "auto" | "reference" | "triton" | "native" (megabyte_kernels)
    extra: dict = field(default_factory=dict, repr=False)  # free-form metadata kept in config.json

    def __post_init__(self):
        if self.positions is None:
            self.positions = "alibi" if self.variant == "in_action" else "learned"
        self.validate()

    @property
    def shared_embedding(self) -> bool:
        """in_action: the local model reads the global byte table through a Linear(D_G, D_L)."""
        return self.variant == "in_action"

    @property
    def cross_patch_shift(self) -> bool:
        """in_action: the local input at byte t is byte t-1 even across a patch border."""
        return self.variant == "in_action"

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        for name in ("V", "P", "D_G", "D_L", "T_MAX", "g_nheads", "g_nlayers", "l_nheads", "l_nlayers",
                     "g_kv_heads", "l_kv_heads", "ff_mult"):
            v = getattr(self, name)
            lo = 0 if name.endswith("nlayers") else 1
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                 f"{name} must be an int >= {lo}, got {v!r}")
        need(self.V >= 2, f"V must be at least 2, got {self.V}")
        need(self.T_MAX >= self.P, f"T_MAX={self.T_MAX} must be at least the patch size P={self.P}")
        need(self.positions != "learned" or self.T_MAX % self.P == 0,
             f"T_MAX={self.T_MAX} must be a multiple of the patch size P={self.P} with learned positions: "
             "a sequence is padded to whole patches and every padded slot needs a position row")
        need(0 <= self.pad_id < self.V, f"pad_id must lie in [0, V={self.V}), got {self.pad_id}")
        need(0 <= self.eos_id < self.V, f"eos_id must lie in [0, V={self.V}), got {self.eos_id}")
        need(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        need(self.positions in POSITIONS, f"positions must be one of {POSITIONS}, got {self.positions!r}")
        need(self.pad in PADS, f"pad must be one of {PADS}, got {self.pad!r}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout must lie in [0, 1), got {self.dropout}")
        need(self.initializer_range > 0, f"initializer_range must be > 0, got {self.initializer_range}")
        D_glob = self.P * self.D_G
        need(D_glob % self.g_nheads == 0,
             f"the global width P*D_G={D_glob} must be divisible by g_nheads={self.g_nheads}")
        need(self.D_L % self.l_nheads == 0, f"D_L={self.D_L} must be divisible by l_nheads={self.l_nheads}")
        need(self.g_nheads % self.g_kv_heads == 0,
             f"g_nheads={self.g_nheads} must be a multiple of g_kv_heads={self.g_kv_heads}")
        need(self.l_nheads % self.l_kv_heads == 0,
             f"l_nheads={self.l_nheads} must be a multiple of l_kv_heads={self.l_kv_heads}")
        need(not (self.tie_head and self.shared_embedding),
             "tie_head needs a local byte table E_L, which variant='in_action' does not have")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MegabyteConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MegabyteConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)
