"""Generation: cached incremental decoding, sampling, and the full-recompute reference loop.

MEGABYTE decodes in two clocks. The global transformer runs once per patch: the input of patch
``k`` is the embedding of the P bytes of patch ``k - 1`` (DESIGN.md §2 step 1), so as soon as a
patch is complete the next patch's global output can be computed, and with it the global-to-local
projection of all P slots of that patch. The local transformer runs once per byte, causal inside
the patch, so its cache is emptied at every patch border. With N stages (``config.patch_sizes``)
there is one clock per stage: stage i (unit ``u_i`` bytes) steps once per completed unit of its
own, after its parent when a parent unit completes too, and its cache is emptied at every border
of its parent's units (:class:`CachedDecoder`).

Cache layout (:class:`KVCache`, one per transformer): for each layer, keys and values in
preallocated buffers ``(B, C, Hkv, d)`` (C positions: patches for the global model, P for the
local one, the units of one parent unit for a middle stage) and per-row lengths ``(B,)`` kept on
the host. A step runs on a subset of rows; the ``n`` new positions of row ``b`` are ``lengths[b] .. lengths[b] + n - 1`` and attend to all
positions ``<=`` themselves, with the ALiBi bias ``-slope_h * (i - j)`` at absolute positions —
the math of :func:`megabyte_kernels.reference.causal_attention`, done here with
``F.scaled_dot_product_attention`` and an explicit mask (1 query against many keys is not the
square causal attention the kernels implement).

Patch bookkeeping, per row, with ``t`` the number of known bytes (the next byte to predict is
byte ``t``, in patch ``t // P`` at slot ``t % P``):

* prefill: the global model runs over patches ``0 .. t // P`` in one pass (patch ``t // P``'s
  input is the last *complete* patch, so a prompt whose length is not a multiple of P is fine),
  then the local model over slots ``0 .. t % P`` of the current patch in one pass;
* each decode step appends the sampled byte; when that completes a patch (``t % P == 0``) the
  row takes one global step and its local cache is reset; then every active row takes one local
  step. Rows are *ragged*: each prompt keeps its own length and patch phase, so there is no
  left-padding and no pad byte ever enters the model (see :func:`generate`).

Vocabulary: by default (``vocab="bytes"``) only the 256 byte values and ``eos_id`` can be
sampled: :func:`restrict_logits` sets the other logits to ``-inf`` before any sampling rule, in
the cached and the recompute loop alike; ``vocab="all"`` samples all V ids.

Positions: with ``positions="learned"`` byte ``t`` needs row ``(t // P + 1) * P - 1`` of the
table, exactly as the full forward over ``t + 1`` bytes does; :func:`generate` raises a clear
``ValueError`` before decoding when that passes ``T_MAX``. ALiBi and ``none`` generate past it.

Two decoders behind :func:`generate`: ``decoder="static"`` (the default) prefills with
:class:`CachedDecoder` and then decodes with :class:`megabyte.static_decode.StaticStepper`:
every row takes every step, state and EOS flags on the device, no host read inside a block of
``check_every`` bytes, CUDA graphs on a GPU (:func:`_static_iter`). ``decoder="cached"`` is the
host-driven loop above (:func:`_decode_iter`), which drops stopped rows. Greedy output is the
same; so is seeded sampling while no row of a batch has stopped.

Dependencies: this module imports nothing from :mod:`megabyte.model`. It reads the modules it
needs (``g_transformer``, ``gl_linear``, the embedding tables, ...) from the model it is handed,
so ``Megabyte.generate`` is a thin method over :func:`generate` without an import cycle.
Loading a checkpoint and printing text (``megabyte generate``) is :mod:`megabyte.sample`'s.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .static_decode import StaticStepper

__all__ = ["KVCache", "CachedDecoder", "DECODERS", "generate", "generate_stream", "generate_uncached", "sample_next",
           "as_prompts", "VOCABS", "allowed_ids", "restrict_logits"]


# ----------------------------------------------------------------------------------------------
# key/value cache


class LayerCache:
    """One attention layer's keys and values; the bookkeeping lives in the parent :class:`KVCache`.

    ``Attention.forward(x, slopes, backend, cache=layer_cache)`` calls :meth:`attend`.
    """

    def __init__(self, parent: "KVCache", kv_heads: int, dim_head: int, device, dtype):
        self.parent = parent
        self.k = torch.zeros(parent.B, parent.C, kv_heads, dim_head, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None) -> torch.Tensor:
        """Append the new keys/values and attend: q (R, Hq, n, d), k/v (R, Hkv, n, d) -> (R, Hq, n, d).

        ``o[r, h, i] = sum_{j <= pos_r + i} softmax_j(q·k_j / sqrt(d) - slope_h (pos_r + i - j)) v_j``.
        """
        p = self.parent
        R, Hq, n, d = q.shape
        Hkv = k.shape[1]
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (R, n, Hkv, d)
        if p.uniform:  # every row at the same position: plain slices
            s = p.start
            if p.rows is None:
                self.k[:, s:s + n] = kt
                self.v[:, s:s + n] = vt
                keys, vals = self.k[:, :s + n], self.v[:, :s + n]
            else:
                self.k[p.rows, s:s + n] = kt
                self.v[p.rows, s:s + n] = vt
                keys, vals = self.k[p.rows, :s + n], self.v[p.rows, :s + n]
        else:
            r = p.rows_or_all()
            idx = p.pos[:, None] + torch.arange(n, device=p.pos.device)  # (R, n)
            self.k[r[:, None], idx] = kt
            self.v[r[:, None], idx] = vt
            keys, vals = self.k[r, :p.span], self.v[r, :p.span]
        keys, vals = keys.transpose(1, 2), vals.transpose(1, 2)  # (R, Hkv, L, d)
        if Hkv != Hq:  # grouped-query: query head h reads key/value head h // (Hq / Hkv)
            G, L = Hq // Hkv, keys.shape[2]
            keys = keys[:, :, None].expand(R, Hkv, G, L, d).reshape(R, Hq, L, d)
            vals = vals[:, :, None].expand(R, Hkv, G, L, d).reshape(R, Hq, L, d)
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=p.mask(slopes, q.dtype))


class KVCache:
    """Key/value cache of one transformer for ``batch`` rows of ``capacity`` positions each.

    Per layer (``cache[i]``, a :class:`LayerCache`): keys and values ``(B, C, Hkv, d)``.
    ``lengths`` (B,) int64 on the host: row b holds positions ``[0, lengths[b])``. A step is
    ``begin(rows, n)``, the transformer's forward with ``cache=self``, then ``end()``.
    """

    def __init__(self, transformer, batch: int, capacity: int, device, dtype):
        self.B, self.C, self.device = batch, capacity, device
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.layers = [LayerCache(self, blk.attn.kv_heads, blk.attn.dim_head, device, dtype)
                       for blk in transformer.layers]
        self.rows = None

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def rows_or_all(self) -> torch.Tensor:
        return self.rows if self.rows is not None else torch.arange(self.B, device=self.device)

    def begin(self, rows: torch.Tensor | None, n: int) -> None:
        """Start a step of ``n`` new positions for ``rows`` (host int64 tensor; None: all rows)."""
        self._rows_host = rows
        pos = self.lengths if rows is None else self.lengths[rows]
        self.start = int(pos[0])
        self.uniform = bool((pos == self.start).all())
        self.span = int(pos.max()) + n
        if self.span > self.C:
            raise RuntimeError(f"KVCache overflow: {self.span} positions needed, capacity {self.C}")
        self.n = n
        self.rows = None if rows is None else rows.to(self.device)
        self.pos = pos.to(self.device)
        self._mask_key, self._mask = None, None

    def end(self) -> None:
        if self._rows_host is None:
            self.lengths += self.n
        else:
            self.lengths[self._rows_host] += self.n

    def reset(self, rows: torch.Tensor | None) -> None:
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[rows] = 0

    def mask(self, slopes: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask (R, 1 or H, n, L) of the current step, or None when every key is visible.

        Same formula as ``megabyte_kernels.reference.alibi_bias`` (fp32 ``-slope * (i - j)``,
        ``-inf`` for keys after the query), at the queries' absolute positions.
        """
        if slopes is None and self.uniform and self.n == 1:
            return None
        key = (id(slopes), dtype)
        if self._mask_key == key:
            return self._mask
        qpos = self.pos[:, None] + torch.arange(self.n, device=self.device)  # (R, n)
        j = torch.arange(self.span, device=self.device)
        rel = (qpos[:, :, None] - j).to(torch.float32 if dtype != torch.float64 else dtype)[:, None]  # (R,1,n,L)
        if slopes is None:
            m = torch.zeros_like(rel)
        else:
            m = -slopes.to(rel.dtype)[None, :, None, None] * rel
        m = m.masked_fill(rel < 0, float("-inf")).to(dtype)
        self._mask_key, self._mask = key, m
        return m


# ----------------------------------------------------------------------------------------------
# the cached decoder


def as_prompts(prompt_ids, V: int | None = None) -> list[torch.Tensor]:
    """Normalise prompts to a list of 1-D int64 CPU tensors (one per row, any lengths).

    Accepts a (B, T) integer tensor (B prompts of length T), a 1-D tensor, ``bytes`` or ``str``
    (UTF-8) for one prompt, or a list of 1-D tensors / lists of ints / ``bytes`` / ``str`` for a
    ragged batch. An empty prompt is allowed.
    """
    def one(p) -> torch.Tensor:
        if isinstance(p, str):
            p = p.encode("utf-8")
        if isinstance(p, (bytes, bytearray)):
            return torch.tensor(list(p), dtype=torch.long)
        if isinstance(p, torch.Tensor):
            if p.dim() != 1:
                raise ValueError(f"each prompt must be 1-D, got shape {tuple(p.shape)}")
            if p.dtype.is_floating_point or p.dtype == torch.bool:
                raise ValueError(f"prompt ids must be integers, got {p.dtype}")
            return p.detach().to("cpu", torch.long)
        return torch.tensor(list(p), dtype=torch.long).reshape(-1)

    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2:
            prompts = [one(row) for row in prompt_ids]
        elif prompt_ids.dim() == 1:
            prompts = [one(prompt_ids)]
        else:
            raise ValueError(f"prompt_ids must be (B, T) or (T,), got shape {tuple(prompt_ids.shape)}")
    elif isinstance(prompt_ids, (str, bytes, bytearray)):
        prompts = [one(prompt_ids)]
    elif isinstance(prompt_ids, Sequence) and len(prompt_ids) > 0 and not isinstance(prompt_ids[0], int):
        prompts = [one(p) for p in prompt_ids]
    elif isinstance(prompt_ids, Sequence):  # a flat list of ints (or []) is one prompt
        prompts = [one(prompt_ids)]
    else:
        raise ValueError(f"unsupported prompt type {type(prompt_ids).__name__}")
    if V is not None:
        for i, p in enumerate(prompts):
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= V):
                raise ValueError(f"prompt {i}: ids must lie in [0, {V}), got range "
                                 f"[{int(p.min())}, {int(p.max())}]")
    return prompts


def check_positions(cfg, prompt_lens: Sequence[int], max_new_bytes: int) -> None:
    """Learned positions: the last byte predicted, ``t = L + max_new_bytes - 1``, needs
    ``(t // P + 1) * P <= T_MAX`` (the full forward over ``t + 1`` bytes needs the same)."""
    if cfg.stage_positions[0] != "learned" or max_new_bytes < 1 or not prompt_lens:
        return
    L = max(prompt_lens)
    t = L + max_new_bytes - 1
    need = (t // cfg.P + 1) * cfg.P
    if need > cfg.T_MAX:
        raise ValueError(
            f"a prompt of {L} bytes plus max_new_bytes={max_new_bytes} needs learned positions up to "
            f"{need} (whole patches of P={cfg.P}), past T_MAX={cfg.T_MAX} of the position table: generate at most "
            f"{max(0, (cfg.T_MAX // cfg.P) * cfg.P - L)} bytes after this prompt, or use a model with "
            "positions='alibi'/'none', which generate past T_MAX"
        )


class CachedDecoder:
    """Incremental MEGABYTE decoding for a ragged batch of prompts (see the module docstring).

    ``logits = dec.prefill()`` returns the next-byte logits ``(B, V)`` of every row; then
    ``logits = dec.step(rows, next_ids)`` appends one byte to each of ``rows`` (host int64) and
    returns their next-byte logits ``(R, V)``.

    Stages: stage 0 (global) keeps a cache of ``ceil(total / u_0)`` units, stage i >= 1 one of the
    ``P_{i-1}`` units of its current parent unit (reset whenever its parent steps) and the parent's
    projected output ``proj[i]`` (B, u_{i-1}, dims[i]) of that parent unit. Byte t lies in unit
    ``t // u_i`` of stage i; when t is a multiple of u_i, stage i steps once (after its parent,
    when t is a multiple of u_{i-1} too): the two-stage clocks, one per stage.
    """

    def __init__(self, model, prompts: list[torch.Tensor], max_new_bytes: int, spare: int = 0):
        """``spare``: extra positions in every cache (the static decoder's scratch slot)."""
        cfg = self.cfg = model.config
        self.model, self.spare = model, spare
        self.units = cfg.units  # (u_0, ..., u_{n-1} = 1)
        self.parts = [None] + model.stage_parts()  # stage i >= 1: StageParts(linear, table, pad, transformer)
        w = model.g_embedder.weight
        self.device, self.dtype = w.device, w.dtype
        B = self.B = len(prompts)
        self.t = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # bytes known, per row (host)
        total = int(self.t.max()) + max_new_bytes if B else 0
        self.seqs = torch.full((B, max(total, 1)), cfg.pad_id, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            self.seqs[i, :len(p)] = p.to(self.device)
        n_patches = (max(total, 1) - 1) // cfg.P + 1  # patches of the last byte predicted
        self.caches = [KVCache(model.g_transformer, B, n_patches + spare, self.device, self.dtype)]
        self.caches += [KVCache(part.transformer, B, ps + spare, self.device, self.dtype)
                        for part, ps in zip(self.parts[1:], cfg.patch_sizes)]
        self.g_cache, self.l_cache = self.caches[0], self.caches[-1]
        self.proj = [None] + [torch.zeros(B, self.units[i - 1], cfg.dims[i], device=self.device, dtype=self.dtype)
                              for i in range(1, cfg.n_stages)]
        self._arange = [torch.arange(u, device=self.device) for u in self.units]

    # --- the math of forward, for a few units ------------------------------------------------
    def _global_inputs(self, rows: torch.Tensor, k0: torch.Tensor, n: int) -> torch.Tensor:
        """Patch embedding of patches ``k0[r] .. k0[r]+n-1`` of each row -> (R, n, P*D_G).

        Patch k embeds the bytes of patch k-1 (``pad_id`` / the trainable pad patch for k = 0)
        plus the positions ``k*P .. k*P+P-1``: ``megabyte_kernels.reference.patch_embed``.
        """
        m, cfg = self.model, self.cfg
        P = cfg.P
        k = k0.to(self.device)[:, None] + torch.arange(n, device=self.device)  # (R, n)
        t = k[..., None] * P + self._arange[0]  # (R, n, P) byte positions of the patch
        src = t - P  # the bytes it embeds
        ids = self.seqs[rows.to(self.device)[:, None, None], src.clamp(min=0)]
        ids = torch.where(src < 0, cfg.pad_id, ids)
        h = F.embedding(ids, m.g_embedder.weight)  # (R, n, P, D_G)
        if m.g_pad_patch is not None:
            h = torch.where((k == 0)[..., None, None], m.g_pad_patch, h)
        if m.g_pos_embedder is not None:
            h = h + m.g_pos_embedder.weight[t]
        return h.reshape(h.shape[0], n, P * cfg.D_G)

    def _stage_inputs(self, i: int, rows: torch.Tensor, t0: torch.Tensor, n: int) -> torch.Tensor:
        """Input of stage i >= 1 for its n units starting at byte ``t0[r]`` -> (R, n, u_i*dims[i]).

        The unit at bytes ``t .. t+u_i-1`` of the current parent unit is the parent's projected
        output at those slots plus the embedding of the bytes one unit earlier (``t - u_i``),
        ``pad_id`` / the trainable pad for the parent unit's first unit (in_action: only before
        byte 0): ``megabyte_kernels.reference.global_to_local`` with ``shift = u_i``.
        """
        cfg, part = self.cfg, self.parts[i]
        parent, u = self.units[i - 1], self.units[i]
        rd = rows.to(self.device)
        tt = (t0.to(self.device)[:, None] + torch.arange(n, device=self.device) * u)[..., None] + self._arange[i]
        slot = tt % parent  # (R, n, u) byte slots inside the parent unit
        shifted_in = (tt < u) if cfg.cross_patch_shift else (slot < u)
        l_ids = self.seqs[rd[:, None, None], (tt - u).clamp(min=0)]
        l_ids = torch.where(shifted_in, cfg.pad_id, l_ids)
        proj = self.proj[i]
        dt = proj.dtype
        emb = F.embedding(l_ids, part.table.to(dt))
        if part.pad is not None:
            emb = torch.where(shifted_in[..., None], part.pad.to(dt), emb)
        x = proj[rd[:, None, None], slot] + emb  # (R, n, u, dims[i])
        return x.reshape(x.shape[0], n, -1)

    def _run(self, i: int, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Stage i's transformer over the new units x (R, n, width), cached -> output of the last (R, width)."""
        transformer = self.model.g_transformer if i == 0 else self.parts[i].transformer
        cache = self.caches[i]
        cache.begin(rows, x.shape[1])
        y = transformer(x, self.model.backend, cache=cache)[:, -1]
        cache.end()
        return y

    def _hand_down(self, i: int, rows: torch.Tensor, y: torch.Tensor) -> None:
        """Stage i's unit output y (R, u_i*dims[i]) becomes stage i+1's projection; its cache restarts."""
        part = self.parts[i + 1]
        dt = y.dtype
        proj = F.linear(y.reshape(y.shape[0], self.units[i], -1), part.linear.weight.to(dt), part.linear.bias.to(dt))
        self.proj[i + 1][rows.to(self.device)] = proj
        self.caches[i + 1].reset(rows)

    def _advance(self, rows: torch.Tensor, t: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
        """Run the stages for the byte ``t[r]`` each row predicts next -> its logits (R, V).

        ``first=None`` (prefill: fresh rows of one length t): every stage runs over all the units
        of its current parent unit up to the one holding byte t, in one pass. Otherwise (a decode
        step) stage i runs one unit for the rows with ``first[r] <= i``, ``first[r]`` the outermost
        stage whose unit starts at byte t: a completed patch is a global step, then each inner stage
        steps, down to the last stage, which steps for every row."""
        last = self.cfg.n_stages - 1
        for i in range(last + 1):
            u = self.units[i]
            if first is None:
                r, tr = rows, t
            else:
                sel = first <= i
                if not bool(sel.any()):
                    continue
                r, tr = (rows, t) if bool(sel.all()) else (rows[sel], t[sel])
            if i == 0:
                k = tr // u
                x = self._global_inputs(r, torch.zeros_like(k), int(k[0]) + 1) if first is None else \
                    self._global_inputs(r, k, 1)
            elif first is None:
                parent_start = tr - tr % self.units[i - 1]
                x = self._stage_inputs(i, r, parent_start, int(tr[0] - parent_start[0]) // u + 1)
            else:
                x = self._stage_inputs(i, r, tr - tr % u, 1)
            y = self._run(i, r, x)
            if i < last:
                self._hand_down(i, r, y)
        return self.model.to_logits(y)

    # --- public steps ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        """Process every prompt; returns the logits (B, V) of byte ``len(prompt)`` of each row.

        Rows of equal length are processed together (their caches stay aligned)."""
        out = torch.empty(self.B, self.cfg.V, device=self.device, dtype=self.dtype)
        for L in sorted(set(self.t.tolist())):
            rows = (self.t == L).nonzero().flatten()
            t = torch.full((len(rows),), L, dtype=torch.long)
            out[rows.to(self.device)] = self._advance(rows, t, None).to(out.dtype)
        return out

    @torch.no_grad()
    def step(self, rows: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Append ``next_ids`` (R,) to ``rows`` (host int64) and return their next-byte logits (R, V)."""
        t = self.t[rows]
        self.seqs[rows.to(self.device), t.to(self.device)] = next_ids.to(self.device)
        t = t + 1
        self.t[rows] = t
        n = self.cfg.n_stages
        first = torch.full_like(t, n - 1)
        for i in range(n - 2, -1, -1):  # the outermost stage whose unit starts at byte t
            first = torch.where(t % self.units[i] == 0, i, first)
        return self._advance(rows, t, first)


# ----------------------------------------------------------------------------------------------
# sampling


VOCABS = ("bytes", "all")
DECODERS = ("static", "cached")
N_BYTES = 256  # ids 0..255 are the byte values


def check_vocab(vocab) -> None:
    """``vocab`` must be one of :data:`VOCABS` (a clear ``ValueError`` otherwise)."""
    if not (isinstance(vocab, str) and vocab in VOCABS):
        raise ValueError(f"vocab must be 'bytes' (the 256 byte values, plus eos_id when given) or 'all' "
                         f"(every id of the vocabulary, specials included), got {vocab!r}")


def allowed_ids(V: int, vocab: str = "bytes", eos_id=None, device=None) -> torch.Tensor | None:
    """The ids generation may sample, as a (V,) bool mask, or None when every id is allowed.

    ``vocab="bytes"``: ``allowed[i] = i < 256 or i in eos_id`` (``eos_id``: None, an int, or
    several ints); ``vocab="all"``: None (all V ids, specials included).
    """
    check_vocab(vocab)
    if vocab == "all":
        return None
    allowed = torch.arange(V, device=device) < N_BYTES
    if isinstance(eos_id, torch.Tensor):
        eos_id = eos_id.flatten().tolist()
    eos = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else [int(e) for e in eos_id]
    for e in eos:
        if 0 <= e < V:
            allowed[e] = True
    return allowed


def restrict_logits(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``logits`` (..., V) with the ids outside ``allowed`` (V,) bool set to ``-inf`` (None: unchanged).

    Applied before :func:`sample_next`, so greedy, temperature, top-k and top-p all see only the
    allowed ids (``softmax`` gives the others probability exactly 0).
    """
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def check_sampling_args(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids (R,) from logits (R, V): greedy for ``temperature == 0``, else softmax(logits / T)
    restricted to the ``top_k`` most likely ids and to the smallest set whose probability reaches
    ``top_p`` (nucleus; the most likely id is always kept), sampled with ``generator``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely ids
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    # torch.multinomial(probs, 1)'s own algorithm (argmax of probs / Exp(1) noise: the same ids
    # from the same generator) without its validity check, which reads a value back to the host
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def _generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


# ----------------------------------------------------------------------------------------------
# the public entry points


def _decode_iter(model, prompts: list[torch.Tensor], max_new_bytes: int, temperature, top_k, top_p, eos_id,
                 seed, vocab) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The cached decoder's loop. Yields ``(rows, ids, logits)`` per step: the still active rows,
    their new ids, the logits (restricted to ``vocab``: disallowed ids at ``-inf``)."""
    dec = CachedDecoder(model, prompts, max_new_bytes)
    gen = _generator(seed, dec.device)
    allowed = allowed_ids(model.config.V, vocab, eos_id, dec.device)
    logits = dec.prefill()
    rows = torch.arange(dec.B)
    for i in range(max_new_bytes):
        logits = restrict_logits(logits, allowed)
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        yield rows, nxt, logits
        if eos_id is not None:
            keep = (nxt != eos_id).cpu()
            rows, nxt = rows[keep], nxt[keep.to(nxt.device)]
        if len(rows) == 0 or i == max_new_bytes - 1:
            return
        logits = dec.step(rows, nxt)


def _static_iter(model, prompts: list[torch.Tensor], max_new_bytes: int, out: torch.Tensor,
                 all_logits: torch.Tensor | None, temperature, top_k, top_p, eos_id, seed, vocab,
                 check_every: int, cuda_graphs, info: dict | None) -> Iterator[int]:
    """The static decoder's loop (:mod:`megabyte.static_decode`): fills ``out`` (B, max_new_bytes)
    int64 and, when given, ``all_logits`` (B, max_new_bytes, V) on the device, and yields the
    number of columns filled after every ``check_every`` steps (and at the end).

    Per step, all on the device: sample every row (a row that stopped samples too, its id is
    replaced by ``pad_id``), ``done |= ids == eos_id``, append, the due upper-stage steps, the
    byte step. Nothing is read back inside a block; after a block, when ``eos_id`` is given,
    one ``.item()`` tells whether every row has stopped, which ends the loop. The ids written
    do not depend on ``check_every``: a block past the last EOS only adds ``pad_id`` columns.
    """
    dec = CachedDecoder(model, prompts, max_new_bytes, spare=1)
    gen = _generator(seed, dec.device)
    allowed = allowed_ids(model.config.V, vocab, eos_id, dec.device)
    graphs = dec.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
    t0 = time.perf_counter()
    logits = restrict_logits(dec.prefill(), allowed)
    stepper = StaticStepper(dec, allowed, graphs=graphs)
    done = torch.zeros(dec.B, dtype=torch.bool, device=dec.device)
    pad = model.config.pad_id
    for s in range(max_new_bytes):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        out[:, s] = torch.where(done, pad, nxt)
        if all_logits is not None:
            all_logits[:, s] = logits.masked_fill(done[:, None], 0).to(all_logits.dtype)
        if eos_id is not None:
            done |= nxt == eos_id
        last = s == max_new_bytes - 1
        if last or (s + 1) % check_every == 0:
            yield s + 1
            if last or (eos_id is not None and done.all().item()):
                break
        stepper.append(nxt)
        for i in stepper.due(s + 1):
            stepper.unit_step(i)
        logits = stepper.byte_step()
    if info is not None:
        info.update(decoder="static", steps=s + 1, graphs=graphs, graph_notes=list(stepper.graph_notes),
                    capture_s=sum(stepper.timings.values()), loop_s=time.perf_counter() - t0)


def _check_decoder_args(decoder, check_every, cuda_graphs) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS} ('static': fixed-shape steps without host syncs, "
                         f"CUDA graphs on a GPU; 'cached': the host-driven cached decoder), got {decoder!r}")
    if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1 (bytes between two host checks for EOS), "
                         f"got {check_every!r}")
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be None (on when the model is on CUDA), True or False, got {cuda_graphs!r}")


def _validate(model, prompt_ids, max_new_bytes, temperature, top_k, top_p, eos_id, vocab):
    cfg = model.config
    if not isinstance(max_new_bytes, int) or isinstance(max_new_bytes, bool) or max_new_bytes < 0:
        raise ValueError(f"max_new_bytes must be an int >= 0, got {max_new_bytes!r}")
    check_sampling_args(temperature, top_k, top_p)
    check_vocab(vocab)
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < cfg.V):
        raise ValueError(f"eos_id must be None or an id in [0, {cfg.V}), got {eos_id!r}")
    prompts = as_prompts(prompt_ids, cfg.V)
    check_positions(cfg, [len(p) for p in prompts], max_new_bytes)
    return prompts


class _EvalMode:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def _width(out: torch.Tensor, eos_id: int | None) -> int:
    """Columns up to the last row's EOS (all of them when some row never stopped): out (B, N)."""
    N = out.shape[1]
    if eos_id is None or N == 0:
        return N
    hit = out == eos_id
    stop = torch.where(hit.any(1), hit.int().argmax(1) + 1, N)  # first EOS of each row, + 1
    return int(stop.max())


def generate(model, prompt_ids, max_new_bytes: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, seed: int | None = None,
             vocab: str = "bytes", return_logits: bool = False, decoder: str = "static", check_every: int = 16,
             cuda_graphs: bool | None = None, info: dict | None = None):
    """Generate up to ``max_new_bytes`` ids after each prompt with cached incremental decoding.

    Prompts are *ragged*: a (B, T) tensor, or a list of 1-D tensors / lists of ints / ``bytes`` /
    ``str`` of any lengths (empty included); each row keeps its own length and patch phase, so
    no padding enters the model and each row's output equals what it would be alone.

    Returns a (B, N) int64 tensor on the model's device with the new ids only (not the prompt);
    N = max_new_bytes, or fewer when every row stopped at ``eos_id`` (kept in the output). After
    its ``eos_id`` a row is filled with ``config.pad_id``. ``eos_id=None`` never stops early.
    Sampling: ``temperature=0`` is greedy (argmax); otherwise softmax(logits / temperature) with
    optional ``top_k`` / ``top_p`` (nucleus) filtering, drawn from a ``torch.Generator`` seeded
    with ``seed`` (None: the global RNG).
    Vocabulary: ``vocab="bytes"`` (default) samples only the 256 byte values, plus ``eos_id`` when
    one is given, so the output holds ids < 256, ``eos_id``, and ``pad_id`` after EOS; the other
    logits are set to ``-inf`` before greedy / temperature / top-k / top-p. ``vocab="all"``
    samples all V ids, specials included. Any other value raises ``ValueError``.
    With ``return_logits=True`` also returns the next-byte logits (B, N, V) of every step, as
    sampled from (``-inf`` outside ``vocab``; zero for rows that had stopped). The model runs in
    eval mode (dropout off), restored afterwards.
    Decoder: ``"static"`` (default; :mod:`megabyte.static_decode`) runs fixed-shape steps with the
    state on the device and no host sync inside a block of ``check_every`` bytes (the host learns
    of EOS once per block; the output is the same for any ``check_every``), replayed from CUDA
    graphs when ``cuda_graphs`` (None: on when the model is on CUDA; eager where capture fails).
    Every row keeps sampling until the last stops, so with ``eos_id`` and several rows the random
    stream, and hence a seeded sample, differs from ``"cached"``'s (the host-driven decoder that
    drops stopped rows); greedy output is the same. ``info``: a dict filled with the decoder's
    details (steps, graphs, capture seconds).
    """
    prompts = _validate(model, prompt_ids, max_new_bytes, temperature, top_k, top_p, eos_id, vocab)
    _check_decoder_args(decoder, check_every, cuda_graphs)
    cfg = model.config
    device = model.g_embedder.weight.device
    B = len(prompts)
    out = torch.full((B, max_new_bytes), cfg.pad_id, dtype=torch.long, device=device)
    all_logits = (torch.zeros(B, max_new_bytes, cfg.V, device=device, dtype=model.g_embedder.weight.dtype)
                  if return_logits else None)
    n = 0
    if max_new_bytes > 0 and B > 0:
        with _EvalMode(model):
            if decoder == "static":
                for n in _static_iter(model, prompts, max_new_bytes, out, all_logits, temperature, top_k, top_p,
                                      eos_id, seed, vocab, check_every, cuda_graphs, info):
                    pass
                n = _width(out[:, :n], eos_id)
            else:
                for i, (rows, nxt, logits) in enumerate(
                        _decode_iter(model, prompts, max_new_bytes, temperature, top_k, top_p, eos_id, seed, vocab)):
                    rd = rows.to(device)
                    out[rd, i] = nxt
                    if return_logits:
                        all_logits[rd, i] = logits.to(all_logits.dtype)
                    n = i + 1
                if info is not None:
                    info.update(decoder="cached", steps=n)
    out = out[:, :n]
    return (out, all_logits[:, :n]) if return_logits else out


def generate_stream(model, prompt, max_new_bytes: int, *, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None, seed: int | None = None,
                    vocab: str = "bytes", decoder: str = "static", check_every: int = 1,
                    cuda_graphs: bool | None = None) -> Iterator[int]:
    """Yield the ids generated after one prompt, as they are produced (cached).

    Stops after ``max_new_bytes`` ids or after yielding ``eos_id``. Same arguments as :func:`generate`
    (``vocab="bytes"``: only byte values and ``eos_id`` are yielded); with the static decoder the
    ids come in blocks of ``check_every`` (1: each as soon as it is sampled).
    """
    prompts = _validate(model, prompt, max_new_bytes, temperature, top_k, top_p, eos_id, vocab)
    _check_decoder_args(decoder, check_every, cuda_graphs)
    if len(prompts) != 1:
        raise ValueError(f"generate_stream takes one prompt, got {len(prompts)}")
    if max_new_bytes == 0:
        return
    was = model.training
    model.eval()
    try:
        # no grad-mode context held across the yields: the caller's code runs between them (the
        # decoders' steps are no_grad themselves)
        if decoder == "cached":
            for _, nxt, _ in _decode_iter(model, prompts, max_new_bytes, temperature, top_k, top_p, eos_id,
                                          seed, vocab):
                yield int(nxt[0])
            return
        out = torch.empty(1, max_new_bytes, dtype=torch.long, device=model.g_embedder.weight.device)
        sent = 0
        for n in _static_iter(model, prompts, max_new_bytes, out, None, temperature, top_k, top_p, eos_id,
                              seed, vocab, check_every, cuda_graphs, None):
            for x in out[0, sent:n].tolist():
                yield x
                if x == eos_id:
                    return
            sent = n
    finally:
        model.train(was)


@torch.no_grad()
def generate_uncached(model, prompt_ids, max_new_bytes: int, *, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, eos_id: int | None = None, seed: int | None = None,
                      vocab: str = "bytes", return_logits: bool = False):
    """Reference decoding by full recomputation: a plain loop over ``model.forward``.

    For each new byte t the whole sequence so far plus one dummy byte is run through the model
    and the logits at position t are read (they do not depend on the dummy: causality). Rows are
    decoded one at a time (ragged prompts). Same arguments and result as :func:`generate` (the
    same ``vocab`` restriction, applied by :func:`restrict_logits`); slow, for tests and benchmarks.
    """
    prompts = _validate(model, prompt_ids, max_new_bytes, temperature, top_k, top_p, eos_id, vocab)
    cfg = model.config
    device = model.g_embedder.weight.device
    B = len(prompts)
    out = torch.full((B, max_new_bytes), cfg.pad_id, dtype=torch.long, device=device)
    all_logits = torch.zeros(B, max_new_bytes, cfg.V, device=device, dtype=model.g_embedder.weight.dtype)
    allowed = allowed_ids(cfg.V, vocab, eos_id, device)
    n = 0
    with _EvalMode(model):
        for b, p in enumerate(prompts):
            gen = _generator(seed, device)
            ids = torch.cat([p.to(device), torch.zeros(1, dtype=torch.long, device=device)])[None]  # + dummy
            for i in range(max_new_bytes):
                logits = restrict_logits(model(ids).lm_logits[:, -1], allowed)
                nxt = sample_next(logits, temperature, top_k, top_p, gen)
                out[b, i] = nxt[0]
                all_logits[b, i] = logits[0].to(all_logits.dtype)
                n = max(n, i + 1)
                if eos_id is not None and int(nxt[0]) == eos_id:
                    break
                ids = torch.cat([ids[:, :-1], nxt[:, None], ids[:, -1:]], dim=1)
    out, all_logits = out[:, :n], all_logits[:, :n]
    return (out, all_logits) if return_logits else out
