"""Model configuration: the original implementation's fields, in its order, plus options.

The first twelve fields are exactly the original ``MegabyteConfig`` namedtuple's (github
shjwudp/megabyte), in the same order, so its README example runs unchanged. Every extra field
has a default that reproduces the original model; ``variant="in_action"`` switches the
defaults to the original repository's ``megabyte_in_action.py`` (one byte table shared by the
global and the local model, ALiBi in both transformers, local shift across patch borders).

N stages (DESIGN.md §2, "N stages"): the keyword-only tuple fields ``patch_sizes`` (n-1 entries),
``dims``, ``nlayers``, ``nheads``, ``kv_heads`` (n entries each) describe an n-stage model; stage 0
is the global model, stage n-1 the byte-level local one. Two stages are the classic fields:
``patch_sizes=(P,), dims=(D_G, D_L), nlayers=(g_nlayers, l_nlayers), nheads=(g_nheads, l_nheads),
kv_heads=(g_kv_heads, l_kv_heads)``. After construction both forms are filled in and agree; for
more stages the classic fields are the first and last stage's (``P`` the product of the patch
sizes: the bytes of one global patch). Giving both forms with different values is a
``ValueError``. ``positions`` and ``pad`` take one value or one per stage.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import KW_ONLY, dataclass, field

VARIANTS = ("megabyte", "in_action")
POSITIONS = ("learned", "alibi", "none")
PADS = ("pad_id", "trainable")
ACTIVATIONS = ("gelu", "relu")


# the classic fields of the stage tuples for two stages (first, last); default values
CLASSIC_DEFAULTS = dict(P=4, D_G=512, D_L=128, g_nheads=32, g_nlayers=4, l_nheads=2, l_nlayers=2,
                        g_kv_heads=1, l_kv_heads=1)
STAGE_FIELDS = {"dims": ("D_G", "D_L"), "nlayers": ("g_nlayers", "l_nlayers"), "nheads": ("g_nheads", "l_nheads"),
                "kv_heads": ("g_kv_heads", "l_kv_heads")}
TUPLE_FIELDS = ("patch_sizes", "dims", "nlayers", "nheads", "kv_heads")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_tuple(name: str, v, n: int | None, lo: int) -> tuple[int, ...]:
    """``v`` as a tuple of ints >= lo (of length n when given), or a ValueError naming ``name``."""
    if not isinstance(v, (tuple, list)) or not all(_is_int(x) for x in v):
        raise ValueError(f"{name} must be a tuple of ints, got {v!r}")
    if n is not None and len(v) != n:
        raise ValueError(f"{name} must have {n} entries (one per stage), got {len(v)}: {tuple(v)!r}")
    if any(x < lo for x in v):
        raise ValueError(f"{name} entries must be >= {lo}, got {tuple(v)!r}")
    return tuple(v)


@dataclass
class MegabyteConfig:
    V: int = 512  # vocabulary: 256 byte values + specials
    P: int | None = None  # patch size (4); with patch_sizes: their product (bytes per global patch)
    D_G: int | None = None  # global width per byte slot (512; the global transformer is P*D_G wide)
    D_L: int | None = None  # local width (128)
    T_MAX: int = 1024  # longest sequence (rows of the learned position table)
    g_nheads: int | None = None  # 32
    g_nlayers: int | None = None  # 4
    l_nheads: int | None = None  # 2
    l_nlayers: int | None = None  # 2
    initializer_range: float = 0.02
    pad_id: int = 257
    eos_id: int = 258
    # --- options; defaults reproduce the original model -------------------------------------
    variant: str = "megabyte"  # "megabyte" | "in_action"
    g_kv_heads: int | None = None  # key/value heads of the global transformer (1 = multi-query)
    l_kv_heads: int | None = None  # (1)
    positions: str | tuple | None = None  # "learned" | "alibi" | "none", or one per stage; None: from the variant
    pad: str | tuple = "pad_id"  # "pad_id": pad rows of the byte tables; "trainable": the paper's pad patch
    tie_head: bool = False  # head weight tied to the local byte table E_L
    activation: str = "gelu"  # "gelu" | "relu"
    dropout: float = 0.0
    final_norm: bool = False  # LayerNorm after each transformer
    ff_mult: int = 4
    backend: str = "auto"  # "auto" | "reference" | "triton" | "native" (megabyte_kernels)
    extra: dict = field(default_factory=dict, repr=False)  # free-form metadata kept in config.json
    # --- N stages (keyword-only); None: from the classic fields (two stages) -------------------
    _: KW_ONLY
    patch_sizes: tuple | None = None  # (P_0, ..., P_{n-2}): stage i's unit is prod(patch_sizes[i:]) bytes
    dims: tuple | None = None  # width per byte slot of each stage (stage i's transformer: dims[i] * unit)
    nlayers: tuple | None = None
    nheads: tuple | None = None
    kv_heads: tuple | int | None = None  # one value or one per stage

    def __post_init__(self):
        self._resolve_stages()
        if self.positions is None:
            self.positions = "alibi" if self.variant == "in_action" else "learned"
        self.positions = self._per_stage_option("positions", self.positions, POSITIONS)
        self.pad = self._per_stage_option("pad", self.pad, PADS)
        self.validate()

    # --- the two forms -------------------------------------------------------------------------
    def _resolve_stages(self) -> None:
        """Fill the tuple fields from the classic ones or the other way round; both given must agree."""
        if self.patch_sizes is None:
            P = self.P if self.P is not None else CLASSIC_DEFAULTS["P"]
            if not _is_int(P) or P < 1:
                raise ValueError(f"P must be an int >= 1, got {P!r}")
            self.P, self.patch_sizes = P, (P,)
        else:
            self.patch_sizes = _int_tuple("patch_sizes", self.patch_sizes, None, 1)
            if not self.patch_sizes:
                raise ValueError("patch_sizes must have at least one entry (two stages)")
            prod = math.prod(self.patch_sizes)
            if self.P is not None and self.P != prod:
                raise ValueError(f"P={self.P!r} disagrees with patch_sizes={self.patch_sizes} (P is their product, "
                                 f"{prod}): give one form")
            self.P = prod
        n = self.n_stages
        for name, (first, last) in STAGE_FIELDS.items():
            lo = 0 if name == "nlayers" else 1
            given = getattr(self, name)
            if name == "kv_heads" and _is_int(given):
                given = (given,) * n
            classic = {f: getattr(self, f) for f in (first, last)}
            if given is None:
                if n > 2 and name != "kv_heads":
                    raise ValueError(f"{name} must be given (one entry per stage) with patch_sizes="
                                     f"{self.patch_sizes}: {n} stages")
                ends = [classic[f] if classic[f] is not None else CLASSIC_DEFAULTS[f] for f in (first, last)]
                given = (ends[0],) + (1,) * (n - 2) + (ends[1],)  # middle kv heads: multi-query
                for f, v in zip((first, last), ends):
                    if not _is_int(v) or v < lo:
                        raise ValueError(f"{f} must be an int >= {lo}, got {v!r}")
            tup = _int_tuple(name, given, n, lo)
            for f, v in zip((first, last), (tup[0], tup[-1])):
                if classic[f] is not None and classic[f] != v:
                    idx = 0 if f == first else -1
                    raise ValueError(f"{f}={classic[f]!r} disagrees with {name}[{idx}]={v!r}: give one form")
                setattr(self, f, v)
            setattr(self, name, tup)

    def _per_stage_option(self, name: str, v, choices):
        """One value, or a tuple of one per stage; stored as one value when the tuple is one's expansion."""
        n = self.n_stages
        if isinstance(v, (tuple, list)):
            if len(v) != n or not all(isinstance(x, str) for x in v):
                raise ValueError(f"{name} must be one of {choices} or a tuple of {n} of them (one per stage), "
                                 f"got {v!r}")
            v = tuple(v)
            for one in choices:
                if v == _expand(name, one, n):
                    return one
        return v

    @property
    def n_stages(self) -> int:
        return len(self.patch_sizes) + 1

    @property
    def units(self) -> tuple[int, ...]:
        """Bytes per unit of each stage: ``units[i] = prod(patch_sizes[i:])``, ``units[-1] = 1``."""
        ps = self.patch_sizes
        return tuple(math.prod(ps[i:]) for i in range(len(ps) + 1))

    @property
    def stage_positions(self) -> tuple[str, ...]:
        return _expand("positions", self.positions, self.n_stages)

    @property
    def stage_pads(self) -> tuple[str, ...]:
        return _expand("pad", self.pad, self.n_stages)

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
        n = self.n_stages
        P_name = "P" if n == 2 else f"product of patch_sizes={self.patch_sizes}"
        need(self.V >= 2, f"V must be at least 2, got {self.V}")
        need(self.T_MAX >= self.P, f"T_MAX={self.T_MAX} must be at least the patch size {P_name}={self.P}")
        need(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        need(self.variant != "in_action" or n == 2,
             f"variant='in_action' is defined for two stages only, got {n} (patch_sizes={self.patch_sizes})")
        for name, choices in (("positions", POSITIONS), ("pad", PADS)):
            v = getattr(self, name)
            if isinstance(v, str):
                need(v in choices, f"{name} must be one of {choices}, got {v!r}")
            else:
                bad = [x for x in v if x not in choices]
                need(not bad, f"{name} entries must be one of {choices}, got {v!r}")
        need("learned" not in self.stage_positions[1:],
             f"positions={self.positions!r}: 'learned' is defined for stage 0 only (the global position table); "
             "the later stages take 'alibi' or 'none'")
        need(self.stage_positions[0] != "learned" or self.T_MAX % self.P == 0,
             f"T_MAX={self.T_MAX} must be a multiple of the patch size {P_name}={self.P} with learned positions: "
             "a sequence is padded to whole patches and every padded slot needs a position row")
        need(0 <= self.pad_id < self.V, f"pad_id must lie in [0, V={self.V}), got {self.pad_id}")
        need(0 <= self.eos_id < self.V, f"eos_id must lie in [0, V={self.V}), got {self.eos_id}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout must lie in [0, 1), got {self.dropout}")
        need(self.initializer_range > 0, f"initializer_range must be > 0, got {self.initializer_range}")
        if n == 2:  # the classic messages
            D_glob = self.P * self.D_G
            need(D_glob % self.g_nheads == 0,
                 f"the global width P*D_G={D_glob} must be divisible by g_nheads={self.g_nheads}")
            need(self.D_L % self.l_nheads == 0, f"D_L={self.D_L} must be divisible by l_nheads={self.l_nheads}")
            need(self.g_nheads % self.g_kv_heads == 0,
                 f"g_nheads={self.g_nheads} must be a multiple of g_kv_heads={self.g_kv_heads}")
            need(self.l_nheads % self.l_kv_heads == 0,
                 f"l_nheads={self.l_nheads} must be a multiple of l_kv_heads={self.l_kv_heads}")
        else:
            for i, (u, d, h, kv) in enumerate(zip(self.units, self.dims, self.nheads, self.kv_heads)):
                need((u * d) % h == 0, f"stage {i}'s width dims[{i}]*units[{i}] = {d}*{u} = {u * d} must be "
                                       f"divisible by nheads[{i}]={h}")
                need(h % kv == 0, f"nheads[{i}]={h} must be a multiple of kv_heads[{i}]={kv}")
        need(not (self.tie_head and self.shared_embedding),
             "tie_head needs a local byte table E_L, which variant='in_action' does not have")

    def to_dict(self) -> dict:
        """The fields as JSON-able values: the classic fields for two stages (exactly the two-stage
        ``config.json`` of before), the tuple fields (as lists) for more."""
        d = dataclasses.asdict(self)
        drop = TUPLE_FIELDS if self.n_stages == 2 else tuple(CLASSIC_DEFAULTS)
        for k in drop:
            del d[k]
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MegabyteConfig":
        """Reads either form (lists for the tuple fields and per-stage options)."""
        names = {f.name for f in dataclasses.fields(cls) if f.name != "_"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MegabyteConfig fields {unknown}; known: {sorted(names)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


def _expand(name: str, v, n: int) -> tuple[str, ...]:
    """One per-stage option value as a tuple of n: ``positions="learned"`` is the global position
    table and nothing after it (the two-stage meaning); any other single value is every stage's."""
    if isinstance(v, tuple):
        return v
    if name == "positions" and v == "learned":
        return ("learned",) + ("none",) * (n - 1)
    return (v,) * n
