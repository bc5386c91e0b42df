"""Static-shape decoding: each model step of generation as one fixed sequence of kernels.

The cached decoder (:class:`megabyte.generation.CachedDecoder`) keeps per-row lengths on the
host and picks rows, slices and masks in Python at every byte: exact, but each byte costs
host synchronisations and a kernel sequence that depends on the position. Here the state lives
on the device, in buffers allocated once:

* ``t`` (B,) int64: bytes known per row (the next byte to predict is byte ``t[b]``);
* per stage i a :class:`StaticKV`: keys/values ``(B, C_i + 1, Hkv, d)`` per layer (the cached
  decoder's buffers, one scratch slot more) and ``pos`` (B,) int64, the positions filled;
* ``proj[i]`` (B, u_{i-1}, dims[i]): stage i-1's projected output for the current parent unit;
* ``seqs`` (B, total) int64: prompt and generated ids.

One step of stage i (:meth:`StaticStepper.unit_step`) runs **for every row**, whatever its
phase: it embeds the unit of stage i holding byte ``t[b]`` (at ``t - t % u_i``), runs the
transformer with one query per row against all ``C_i + 1`` cached positions under a mask
``j <= pos[b]`` (plus the ALiBi bias ``-slope_h (pos[b] - j)``), and keeps the result only for
the rows whose unit starts at byte t (``do = t % u_i == 0``, a device tensor): ``pos += do``; the
child's projection ``proj[i+1] = where(do, linear(y), proj[i+1])`` and its cache restart
``pos[i+1] = where(do, 0, pos[i+1])``. A row that is not due writes its key/value into slot
``pos[b]``, which its next real step overwrites before anyone reads it (hence the scratch slot
past the last real position). The last stage is due for every row at every byte, and its step
ends with the head and the vocabulary restriction: logits (B, V).

Which stages step at a given byte is known on the host without looking at the device: every
row gains one byte per step, so stage i steps at generation step s when some row has
``(len(prompt_b) + s) % u_i == 0`` (:meth:`StaticStepper.due`). There is no ``.item()``,
``bool(tensor)``, ``nonzero`` or data-dependent Python branch in a step, so a step compiles to
one graph for every position (tested with ``torch.compile(fullgraph=True)``) and, on CUDA, is
captured once in a ``torch.cuda.CUDAGraph`` and replayed (:class:`GraphedStep`); each capture is
checked against the eager step on the same state, and any failure falls back to eager.

The prefill is the cached decoder's (its host syncs happen once, before the loop). This
module imports nothing from :mod:`megabyte.generation`: it is handed a prefilled decoder.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

__all__ = ["StaticKV", "StaticStepper", "GraphedStep"]


class StaticLayerCache:
    """One layer's keys and values ``(B, C, Hkv, d)``; the position and mask live in the parent."""

    def __init__(self, parent: "StaticKV", k: torch.Tensor, v: torch.Tensor):
        self.parent, self.k, self.v = parent, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None) -> torch.Tensor:
        """Write the new key/value at slot ``pos[b]`` and attend: q (B, Hq, 1, d), k/v (B, Hkv, 1, d)
        -> (B, Hq, 1, d); ``o[b, h] = sum_{j <= pos[b]} softmax_j(q·k_j / sqrt(d) - slope_h (pos[b] - j)) v_j``."""
        p = self.parent
        B, Hq, _, d = q.shape
        Hkv = k.shape[1]
        idx = p.pos.view(B, 1, 1, 1).expand(B, 1, Hkv, d)
        self.k.scatter_(1, idx, k.transpose(1, 2))
        self.v.scatter_(1, idx, v.transpose(1, 2))
        keys, vals = self.k.transpose(1, 2), self.v.transpose(1, 2)  # (B, Hkv, C, d)
        # grouped-query: query head h = g_kv * G + g reads key/value head g_kv, so the G query
        # heads of a key/value head are G queries of one head: (B, Hkv, G, d), no copy of the cache
        G = Hq // Hkv
        mask = p.mask if p.mask.shape[1] == 1 else p.mask.view(B, Hkv, G, -1)  # (B, 1 or Hkv, 1 or G, C)
        o = F.scaled_dot_product_attention(q.reshape(B, Hkv, G, d), keys, vals, attn_mask=mask)
        return o.reshape(B, Hq, 1, d)


class StaticKV:
    """Device-side view of one transformer's :class:`~megabyte.generation.KVCache` after prefill.

    ``layers[l].k/v`` (B, C, Hkv, d) are the cache's own buffers (shared, not copied); ``pos``
    (B,) int64 on the device starts at the cache's host ``lengths``. :meth:`begin` builds the
    step's additive mask (B, 1 or H, 1, C) from ``pos`` and the transformer's ALiBi slopes.
    """

    def __init__(self, cache, transformer):
        self.transformer = transformer
        self.layers = [StaticLayerCache(self, lc.k, lc.v) for lc in cache.layers]
        self.C = cache.C
        self.pos = cache.lengths.to(cache.device).clone()
        self.cols = torch.arange(self.C, device=cache.device)
        self.mask = None

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> StaticLayerCache:
        return self.layers[i]

    def begin(self, dtype: torch.dtype) -> None:
        """The mask of a one-query step at positions ``pos``: ``-slope_h (pos[b] - j)`` for keys
        ``j <= pos[b]``, ``-inf`` after; the formula of the cached decoder's ``KVCache.mask``."""
        slopes = self.transformer.slopes
        rel = (self.pos[:, None] - self.cols).to(torch.float32 if dtype != torch.float64 else dtype)
        rel = rel[:, None, None, :]  # (B, 1, 1, C)
        m = torch.zeros_like(rel) if slopes is None else -slopes.to(rel.dtype)[None, :, None, None] * rel
        self.mask = m.masked_fill(rel < 0, float("-inf")).to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        """The buffers a step of this stage writes (for snapshots)."""
        return [self.pos] + [x for lc in self.layers for x in (lc.k, lc.v)]


class StaticStepper:
    """The fixed-shape steps of a decode, over the state of a prefilled cached decoder.

    ``dec``: a :class:`~megabyte.generation.CachedDecoder` built with ``spare=1`` and prefilled;
    ``allowed``: (V,) bool on the device, or None (every id). Per generated byte the caller does
    ``append(ids)``, then ``unit_step(i)`` for each ``i in due(s)`` (outer to inner), then
    ``logits = byte_step()`` (B, V). Each may be a graph replay (``graphs=True``, CUDA only).
    """

    def __init__(self, dec, allowed: torch.Tensor | None, graphs: bool = False):
        self.dec, self.cfg, self.model = dec, dec.cfg, dec.model
        if getattr(dec, "spare", 0) < 1:
            raise ValueError("dec: StaticStepper needs a CachedDecoder built with spare=1 (a scratch slot per cache)")
        self.B, self.device, self.units = dec.B, dec.device, dec.units
        self.last = self.cfg.n_stages - 1
        self.t = dec.t.to(self.device).clone()  # (B,) bytes known per row
        # host schedule: stage i steps at generation step s when s % u_i is one of these phases
        self.phases = [{(-L) % u for L in dec.t.tolist()} for u in self.units]
        self.transformers = [self.model.g_transformer] + [part.transformer for part in dec.parts[1:]]
        self.kv = [StaticKV(c, tr) for c, tr in zip(dec.caches, self.transformers)]
        self.neg_allowed = None if allowed is None else ~allowed.to(self.device)
        self._arange = [torch.arange(u, device=self.device) for u in self.units]
        self.timings: dict[str, float] = {}
        self.graph_notes: list[str] = []
        steps = [lambda i=i: self._unit_step(i) for i in range(self.last)] + [self._byte_step]
        use = graphs and self.device.type == "cuda" and torch.cuda.is_available()
        self._steps = [GraphedStep(f, self, i) if use else f for i, f in enumerate(steps)]

    # --- host schedule ------------------------------------------------------------------------
    def due(self, s: int) -> list[int]:
        """Upper stages (outer first) that some row steps when it predicts its ``s``-th new byte
        (0 = the prefill's): stage i when ``(len(prompt_b) + s) % u_i == 0`` for some b."""
        return [i for i in range(self.last) if s % self.units[i] in self.phases[i]]

    # --- public steps -------------------------------------------------------------------------
    @torch.no_grad()
    def append(self, ids: torch.Tensor) -> None:
        """Write ``ids`` (B,) at byte ``t[b]`` of each row, then ``t += 1``."""
        self.dec.seqs.scatter_(1, self.t[:, None], ids[:, None].to(self.dec.seqs.dtype))
        self.t.add_(1)

    @torch.no_grad()
    def unit_step(self, i: int) -> None:
        """One step of upper stage ``i`` (0 <= i < n-1) for the rows whose unit starts at ``t``."""
        self._steps[i]()

    @torch.no_grad()
    def byte_step(self) -> torch.Tensor:
        """One step of the last (byte) stage and the head -> logits (B, V), ``-inf`` outside ``allowed``."""
        return self._steps[self.last]()

    # --- the math, one unit per row (the cached decoder's, in fixed shapes) -------------------
    def _global_input(self, k: torch.Tensor) -> torch.Tensor:
        """Patch embedding of patch ``k[b]`` of each row -> (B, 1, P*D_G) (``CachedDecoder._global_inputs``)."""
        m, cfg = self.model, self.cfg
        P = cfg.P
        t = k[:, None] * P + self._arange[0]  # (B, P) byte positions of the patch
        src = t - P  # the bytes it embeds
        ids = self.dec.seqs.gather(1, src.clamp(min=0))
        ids = torch.where(src < 0, cfg.pad_id, ids)
        h = F.embedding(ids, m.g_embedder.weight)  # (B, P, D_G)
        if m.g_pad_patch is not None:
            h = torch.where((k == 0)[:, None, None], m.g_pad_patch, h)
        if m.g_pos_embedder is not None:  # clamped: a row that is not due may point past T_MAX
            h = h + F.embedding(t.clamp(max=cfg.T_MAX - 1), m.g_pos_embedder.weight)
        return h.reshape(self.B, 1, P * cfg.D_G)

    def _stage_input(self, i: int, t0: torch.Tensor) -> torch.Tensor:
        """Input of stage i >= 1 for the unit at bytes ``t0[b] ..`` -> (B, 1, u_i*dims[i])
        (``CachedDecoder._stage_inputs`` with n = 1)."""
        cfg, part = self.cfg, self.dec.parts[i]
        parent, u = self.units[i - 1], self.units[i]
        tt = t0[:, None] + self._arange[i]  # (B, u)
        slot = tt % parent
        shifted_in = (tt < u) if cfg.cross_patch_shift else (slot < u)
        l_ids = self.dec.seqs.gather(1, (tt - u).clamp(min=0))
        l_ids = torch.where(shifted_in, cfg.pad_id, l_ids)
        proj = self.dec.proj[i]  # (B, parent, dims[i])
        dt = proj.dtype
        emb = F.embedding(l_ids, part.table.to(dt))
        if part.pad is not None:
            emb = torch.where(shifted_in[..., None], part.pad.to(dt), emb)
        x = proj.gather(1, slot[..., None].expand(self.B, u, proj.shape[-1])) + emb  # (B, u, dims[i])
        return x.reshape(self.B, 1, -1)

    def _run(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stage i's transformer over the unit holding byte t -> (output (B, width), due (B,) bool;
        None for the byte stage, due everywhere)."""
        t, u = self.t, self.units[i]
        if i == self.last:  # the byte stage (u = 1): every row is due at every byte
            do, x = None, self._stage_input(i, t)
        else:
            do = t % u == 0
            x = self._global_input(t // u) if i == 0 else self._stage_input(i, t - t % u)
        kv = self.kv[i]
        kv.begin(x.dtype)
        y = self.transformers[i](x, self.model.backend, cache=kv)[:, -1]
        kv.pos.add_(1 if do is None else do.to(kv.pos.dtype))
        return y, do

    def _unit_step(self, i: int) -> None:
        y, do = self._run(i)
        part = self.dec.parts[i + 1]
        dt = y.dtype
        proj = F.linear(y.reshape(self.B, self.units[i], -1), part.linear.weight.to(dt), part.linear.bias.to(dt))
        target = self.dec.proj[i + 1]
        target.copy_(torch.where(do[:, None, None], proj, target))
        self.kv[i + 1].pos.masked_fill_(do, 0)

    def _byte_step(self) -> torch.Tensor:
        y, _ = self._run(self.last)
        logits = self.model.to_logits(y)
        if self.neg_allowed is not None:
            logits = logits.masked_fill(self.neg_allowed, float("-inf"))
        return logits

    def written(self, i: int) -> list[torch.Tensor]:
        """Every buffer step i writes (stage i's cache; for an upper stage, the child's projection
        and position too)."""
        out = self.kv[i].tensors()
        if i < self.last:
            out += [self.dec.proj[i + 1], self.kv[i + 1].pos]
        return out


class GraphedStep:
    """A zero-argument step ``fn`` replayed from a ``torch.cuda.CUDAGraph``, with eager fallback.

    First call: eager on a side stream (warm-up: lazy initialisation, allocator). Second call:
    snapshot the buffers the step writes, run it eagerly, keep its output and buffers, restore
    the snapshot, capture the graph, replay it and compare the two results; on any exception or
    a mismatch the step stays eager for good (the eager result is kept, so the step happens
    exactly once). Later calls replay. The capture's wall time goes to ``stepper.timings``.
    """

    def __init__(self, fn, stepper: StaticStepper, index: int):
        self.fn, self.stepper, self.index = fn, stepper, index
        self.calls, self.graph, self.out, self.eager = 0, None, None, False

    def __call__(self):
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.eager or self.calls > 2:
            return self.fn()
        if self.calls == 1:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                out = self.fn()
            torch.cuda.current_stream().wait_stream(s)
            return out
        return self._capture()

    def _capture(self):
        t0 = time.perf_counter()
        bufs = self.stepper.written(self.index)
        before = [b.clone() for b in bufs]
        ref = self.fn()
        ref_out = None if ref is None else ref.clone()
        after = [b.clone() for b in bufs]
        try:
            for b, x in zip(bufs, before):
                b.copy_(x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn()
            graph.replay()
            torch.cuda.synchronize()
            same = all(_close(b, x) for b, x in zip(bufs, after)) and (ref is None or _close(out, ref_out))
            if not same:
                raise RuntimeError("the graph's result differs from the eager step's")
        except Exception as e:  # uncapturable op, capture error, mismatch: stay eager
            self.eager = True
            for b, x in zip(bufs, after):
                b.copy_(x)
            self.stepper.graph_notes.append(f"step {self.index}: eager ({type(e).__name__}: {str(e)[:200]})")
            self._time(t0)
            return ref_out
        self.graph, self.out = graph, out
        self.stepper.graph_notes.append(f"step {self.index}: CUDA graph")
        self._time(t0)
        return out

    def _time(self, t0: float) -> None:
        key = f"capture_s/{self.index}"
        self.stepper.timings[key] = time.perf_counter() - t0


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal ints; floats within what another GEMM algorithm could change (``-inf`` matching)."""
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    tol = 1e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-4
    return torch.allclose(a, b, atol=tol, rtol=tol, equal_nan=True)
