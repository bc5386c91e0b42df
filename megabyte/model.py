"""The MEGABYTE model (Yu et al. 2023, arXiv 2305.07185), one file, top to bottom.

Two stages (the default, the original implementation): ids (B, T); K = ceil(T / P) patches; the
global transformer runs over (B, K, P*D_G), the local transformer over (B*K, P, D_L); logits
(B, T, V).

N stages (``patch_sizes = (P_0, ..., P_{n-2})``, ``dims = (D_0, ..., D_{n-1})``; DESIGN.md §2).
Stage i's unit is ``u_i = P_i * ... * P_{n-2}`` bytes (``u_{n-1} = 1``); ids are right-padded
with pad_id to ``K_0 * u_0`` bytes, ``K_0 = ceil(T / u_0)``, and ``K_i = K_0 u_0 / u_i`` units::

    x_0 = patch_embed(ids; u_0)                                   (B, K_0, u_0 D_0)
        x_0[b, k, s] = E_0[ids[b, k u_0 + s - u_0]] + E_pos[k u_0 + s]   (pad for k = 0)
    y_0 = Transformer_0(x_0), causal over the K_0 units             (B, K_0, u_0 D_0)
    for i = 1 .. n-1, with the parent unit r = u_{i-1} and c = u_i:
    x_i = global_to_local(y_{i-1} as (B, K_{i-1}, r D_{i-1}); patch r, shift c)   (B K_{i-1}, r, D_i)
        x_i[b K_{i-1} + k, s] = y_{i-1}[b, k, s] W_i^T + b_i + E_i[ids[b, k r + s - c]]  (pad for s < c)
        read as (B K_{i-1}, P_{i-1}, c D_i): P_{i-1} units of c bytes
    y_i = Transformer_i(x_i), causal over the P_{i-1} units of each parent unit
    logits = y_{n-1} W_head^T + b_head                              (B, T, V) after dropping the padding

so every stage sees only bytes of earlier units: causal end to end. Two stages are this with
``u_0 = P``, shift 1. Parameter names: stage 0 is ``g_*`` (``g_embedder``, ``g_pos_embedder``,
``g_pad_patch``, ``g_transformer``), the last stage ``l_*`` with its input projection
``gl_linear`` (``l_embedder``, ``l_pad``, ``l_transformer``, ``to_logits``), exactly the
two-stage names; a middle stage i (1 <= i <= n-2) is ``m_stages[i-1]`` (``linear``, ``embedder``,
``pad``, ``transformer``).

The three hot spots go through ``megabyte_kernels`` with the model's backend: the patch
embedding, the global-to-local projection (at every stage boundary), and causal attention
(flash for long unit sequences, packed local for short ones, picked per call by length). Every
parameter name follows the original implementation (github shjwudp/megabyte) where it has
one; ``megabyte.compat`` maps the few that differ.
"""
from __future__ import annotations

import json
import os
from collections import namedtuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import megabyte_kernels as mk

from . import generation
from .config import MegabyteConfig

MegabyteOutput = namedtuple("MegabyteOutput", ["lm_logits", "loss", "metrics"])


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi slopes of the original ``megabyte_in_action``: ``2 ** (-8 i / n)``, i = 1..n."""
    return torch.tensor([2.0 ** (-8.0 * i / n_heads) for i in range(1, n_heads + 1)])


class Attention(nn.Module):
    """Pre-LayerNorm causal attention; ``kv_heads`` key/value heads (1 = multi-query)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, dropout: float):
        super().__init__()
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * self.dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * self.dim_head, bias=False)
        self.to_out = nn.Linear(heads * self.dim_head, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, slopes: torch.Tensor | None, backend: str, cache=None) -> torch.Tensor:
        """``cache``: None, or one layer's key/value cache (``megabyte.generation.LayerCache``):
        the new positions of ``x`` attend to the cached ones and are appended to them."""
        x = self.norm(x)
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.kv_heads) for t in self.to_kv(x).chunk(2, dim=-1))
        if cache is None:
            out = mk.causal_attention(q, k, v, alibi_slopes=slopes, backend=backend)
        else:
            out = cache.attend(q, k, v, slopes)
        return self.dropout(self.to_out(rearrange(out, "b h n d -> b n (h d)")))


class FeedForward(nn.Module):
    """LayerNorm -> Linear(D, mult*D) -> GELU/ReLU -> Linear(mult*D, D)."""

    def __init__(self, dim: int, mult: int, activation: str, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mult)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.fc2 = nn.Linear(dim * mult, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(self.norm(x))))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, cfg: MegabyteConfig):
        super().__init__()
        self.attn = Attention(dim, heads, kv_heads, cfg.dropout)
        self.ff = FeedForward(dim, cfg.ff_mult, cfg.activation, cfg.dropout)

    def forward(self, x, slopes, backend, cache=None):
        x = x + self.attn(x, slopes, backend, cache)
        return x + self.ff(x)


class Transformer(nn.Module):
    """A stack of pre-LN blocks, causal over dim 1 of (batch, n, dim); optional final norm and ALiBi."""

    def __init__(self, dim: int, layers: int, heads: int, kv_heads: int, cfg: MegabyteConfig, alibi: bool):
        super().__init__()
        self.layers = nn.ModuleList([Block(dim, heads, kv_heads, cfg) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim) if cfg.final_norm else nn.Identity()
        self.register_buffer("slopes", alibi_slopes(heads) if alibi else None, persistent=False)
        self.checkpointing = False

    def forward(self, x: torch.Tensor, backend: str, cache=None) -> torch.Tensor:
        """``cache``: None, or a sequence of per-layer key/value caches (incremental decoding)."""
        slopes = self.slopes
        for i, block in enumerate(self.layers):
            if cache is not None:
                x = block(x, slopes, backend, cache[i])
            elif self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, slopes, backend, use_reentrant=False)
            else:
                x = block(x, slopes, backend)
        return self.norm(x)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Fused head + cross entropy, chunk by chunk; the gradients are computed in the forward.

    For each chunk of rows: ``logits = x_c W^T + b`` (fp32), the loss ``lse - logits[target]``,
    and right away ``g = (softmax(logits) - onehot(target)) * valid / n``, ``dx_c = g W``,
    ``dW += g^T x_c``, ``db += sum g``. Only a (chunk, V) block of logits exists at a time and
    nothing is recomputed in backward (which scales the saved gradients by the output's grad).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index: int, chunk: int, want_grad: bool):
        N, V = x.shape[0], weight.shape[0]
        valid = targets != ignore_index
        n = valid.sum().to(torch.float32)  # 0 valid targets: nan, like F.cross_entropy
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            w32 = weight.float()
            b32 = bias.float() if bias is not None else None
            if want_grad:
                gx = torch.empty_like(x)
                gw = torch.zeros_like(w32)
                gb = torch.zeros_like(b32) if b32 is not None else None
            for s in range(0, N, chunk):
                xc = x[s:s + chunk].float()
                logits = xc @ w32.t()
                if b32 is not None:
                    logits = logits + b32
                tc, vc = safe_t[s:s + chunk], valid[s:s + chunk]
                lse = torch.logsumexp(logits, dim=-1)
                tgt = logits.gather(1, tc[:, None]).squeeze(1)
                total = total + ((lse - tgt) * vc).sum()
                if want_grad:
                    g = torch.exp(logits - lse[:, None])
                    g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
                    g = g * (vc.to(g.dtype) / n)[:, None]
                    gx[s:s + chunk] = (g @ w32).to(x.dtype)
                    gw += g.t() @ xc
                    if gb is not None:
                        gb += g.sum(0)
        if want_grad:
            ctx.save_for_backward(gx, gw.to(weight.dtype), gb.to(bias.dtype) if gb is not None else None)
        ctx.has_bias = bias is not None
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        gx, gw, gb = ctx.saved_tensors
        return (gx * grad_out.to(gx.dtype), gw * grad_out.to(gw.dtype),
                gb * grad_out.to(gb.dtype) if ctx.has_bias else None, None, None, None, None)


def chunked_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, *, ignore_index: int = -100,
                                 chunk: int = 4096) -> torch.Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias).float(), targets, ignore_index=...)`` without the
    (N, V) logits: x (N, D), weight (V, D), bias (V,) or None, targets (N,) -> scalar mean loss
    (fp32, over targets != ignore_index). Peak extra memory is one (chunk, V) fp32 block plus the
    gradients of x, weight and bias."""
    want_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    return _ChunkedLinearCrossEntropy.apply(x, weight, bias, targets, ignore_index, int(chunk), want_grad)


class MiddleStage(nn.Module):
    """Stage i of an N-stage model, 0 < i < n-1: input projection ``Linear(dims[i-1], dims[i])``,
    byte table ``(V, dims[i])``, optional trainable pad ``(dims[i],)``, transformer over its units."""

    def __init__(self, cfg: MegabyteConfig, i: int):
        super().__init__()
        d = cfg.dims[i]
        self.linear = nn.Linear(cfg.dims[i - 1], d)
        self.embedder = nn.Embedding(cfg.V, d)
        self.pad = nn.Parameter(torch.empty(d)) if cfg.stage_pads[i] == "trainable" else None
        self.transformer = Transformer(cfg.units[i] * d, cfg.nlayers[i], cfg.nheads[i], cfg.kv_heads[i], cfg,
                                       alibi=cfg.stage_positions[i] == "alibi")


# what makes stage i's input (i >= 1) and runs it; ``table`` is the byte table E_i (V, dims[i])
StageParts = namedtuple("StageParts", ["linear", "table", "pad", "transformer"])


class Megabyte(nn.Module):
    """MEGABYTE: a global transformer over patches of P bytes, a local one inside each patch
    (and, with ``config.patch_sizes`` of more entries, middle stages between them).

    ``Megabyte(config)(ids, return_loss=True)`` returns ``MegabyteOutput(lm_logits, loss,
    metrics)``: logits (B, T, V) where position t predicts byte t from bytes < t; loss the
    mean cross entropy (nats, computed in fp32) over targets that are not ``pad_id``.
    ``backend`` overrides ``config.backend`` and the ``MEGABYTE_BACKEND`` environment variable.
    """

    def __init__(self, config: MegabyteConfig, backend: str | None = None):
        super().__init__()
        self.config = cfg = config
        self.backend = backend or os.environ.get("MEGABYTE_BACKEND") or cfg.backend
        if self.backend not in mk.BACKENDS:
            raise ValueError(f"backend must be one of {mk.BACKENDS}, got {self.backend!r}")
        V, P, D_G, D_L = cfg.V, cfg.P, cfg.D_G, cfg.D_L  # P = u_0: the bytes of a global patch
        positions, pads = cfg.stage_positions, cfg.stage_pads

        # global model: byte table, positions, optional trainable pad patch
        self.g_embedder = nn.Embedding(V, D_G)
        self.g_pos_embedder = nn.Embedding(cfg.T_MAX, D_G) if positions[0] == "learned" else None
        self.g_pad_patch = nn.Parameter(torch.empty(P, D_G)) if pads[0] == "trainable" else None
        self.g_transformer = Transformer(P * D_G, cfg.g_nlayers, cfg.g_nheads, cfg.g_kv_heads, cfg,
                                         alibi=positions[0] == "alibi")

        # middle stages (none for two stages)
        if cfg.n_stages > 2:
            self.m_stages = nn.ModuleList([MiddleStage(cfg, i) for i in range(1, cfg.n_stages - 1)])
        else:
            self.m_stages = None

        # (global-)to-local: shared Linear(dims[-2], D_L) + the local byte embedding
        self.gl_linear = nn.Linear(cfg.dims[-2], D_L)
        if cfg.shared_embedding:  # in_action: E_L = to_l_embed(E_G)
            self.l_embedder, self.to_l_embed = None, nn.Linear(D_G, D_L)
        else:
            self.l_embedder, self.to_l_embed = nn.Embedding(V, D_L), None
        self.l_pad = nn.Parameter(torch.empty(D_L)) if pads[-1] == "trainable" else None
        self.l_transformer = Transformer(D_L, cfg.l_nlayers, cfg.l_nheads, cfg.l_kv_heads, cfg,
                                         alibi=positions[-1] == "alibi")

        self.to_logits = nn.Linear(D_L, V)
        self._init_weights()
        if cfg.tie_head:
            self.to_logits.weight = self.l_embedder.weight

    def stage_parts(self) -> list[StageParts]:
        """Stages 1 .. n-1, each as ``StageParts(linear, table, pad, transformer)`` (the last is
        ``gl_linear``, E_L, ``l_pad``, ``l_transformer``); the forward and the cached decoder both
        read the stages through this."""
        parts = [StageParts(m.linear, m.embedder.weight, m.pad, m.transformer) for m in self.m_stages or ()]
        if self.l_embedder is not None:
            local_table = self.l_embedder.weight
        else:
            local_table = self.to_l_embed(self.g_embedder.weight)
        return parts + [StageParts(self.gl_linear, local_table, self.l_pad, self.l_transformer)]

    def _init_weights(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.g_pad_patch, self.l_pad, *(m.pad for m in self.m_stages or ())):
            if p is not None:
                nn.init.normal_(p, 0.0, std)

    def set_checkpointing(self, global_model: bool = True, local_model: bool = True,
                          middle_models: bool | None = None) -> None:
        """Activation checkpointing per transformer (recompute blocks in backward); the middle
        stages follow ``local_model`` unless ``middle_models`` is given."""
        self.g_transformer.checkpointing = global_model
        self.l_transformer.checkpointing = local_model
        for m in self.m_stages or ():
            m.transformer.checkpointing = local_model if middle_models is None else middle_models

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor, return_loss: bool = False, return_metrics: bool = False, *,
                loss_chunk: int | None = None) -> MegabyteOutput:
        """``loss_chunk=N`` (with ``return_loss``): compute the head and the loss N positions at a
        time (:func:`chunked_linear_cross_entropy`) so the (B, T, V) logits never exist; the
        output's ``lm_logits`` is then None. For long sequences, where the logits would dominate
        the memory of a training step."""
        cfg = self.config
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"ids must be a (B, T) integer tensor, got {getattr(ids, 'shape', type(ids))}")
        B, T = ids.shape
        P = cfg.P  # u_0
        K = -(-T // P)
        if cfg.stage_positions[0] == "learned" and K * P > cfg.T_MAX:
            raise ValueError(
                f"sequence length T={T} (padded to {K * P} = K*P) exceeds T_MAX={cfg.T_MAX} of the learned "
                "position table; use a shorter input, a larger T_MAX, or positions='alibi'/'none'"
            )
        metrics = {} if return_metrics else None

        # 1. patch embedding: (B, T) -> (B, K, P*D_G)
        pos = self.g_pos_embedder.weight if self.g_pos_embedder is not None else None
        global_in = mk.patch_embed(ids, self.g_embedder.weight, pos, patch_size=P, pad_id=cfg.pad_id,
                                   pad_patch=self.g_pad_patch, backend=self.backend)
        # 2. global transformer, causal over the K patches
        global_out = self.g_transformer(global_in, self.backend)
        # 3.-4. each later stage: (parent) global-to-local, then its transformer, causal over its
        #    units inside each parent unit. Params cast to the activations' dtype so that
        #    autocast's bf16 activations meet fp32 parameters. Past the first boundary the ids
        #    are padded to whole global patches, so that every stage sees K*P bytes.
        units = cfg.units
        ids_padded = ids if K * P == T or cfg.n_stages == 2 else F.pad(ids, (0, K * P - T), value=cfg.pad_id)
        y = global_out
        for i, part in enumerate(self.stage_parts(), start=1):
            parent, child = units[i - 1], units[i]
            dt = y.dtype
            x = mk.global_to_local(
                y.reshape(B, K * P // parent, -1), ids if i == 1 else ids_padded, part.linear.weight.to(dt),
                part.linear.bias.to(dt), part.table.to(dt), patch_size=parent, pad_id=cfg.pad_id,
                cross_patch=cfg.cross_patch_shift, shift=child,
                local_pad=part.pad.to(dt) if part.pad is not None else None, backend=self.backend,
            )  # (B*K_{i-1}, parent, dims[i])
            x = x.reshape(x.shape[0], parent // child, child * x.shape[-1])
            y = part.transformer(x, self.backend)
        local_in, local_out = x, y  # (B*K_{n-2}, P_{n-2}, D_L)
        # 5. head
        loss = None
        if loss_chunk is not None and return_loss:
            if not isinstance(loss_chunk, int) or isinstance(loss_chunk, bool) or loss_chunk < 1:
                raise ValueError(f"loss_chunk must be a positive int or None, got {loss_chunk!r}")
            lm_logits = None
            x = local_out.reshape(B, K * P, -1)[:, :T].reshape(B * T, -1)
            loss = chunked_linear_cross_entropy(x, self.to_logits.weight, self.to_logits.bias, ids.reshape(-1),
                                                ignore_index=cfg.pad_id, chunk=loss_chunk)
        else:
            lm_logits = self.to_logits(local_out).reshape(B, K * P, cfg.V)[:, :T]
        if return_loss and loss is None:
            loss = F.cross_entropy(lm_logits.float().reshape(-1, cfg.V), ids.reshape(-1), ignore_index=cfg.pad_id)
        if return_metrics:
            metrics.update(global_in_norm=global_in.norm(), global_out_norm=global_out.norm(),
                           local_in_norm=local_in.norm(), local_out_norm=local_out.norm())
            if loss is not None:
                metrics["bits_per_byte"] = loss.detach() / torch.log(torch.tensor(2.0))
        return MegabyteOutput(lm_logits=lm_logits, loss=loss, metrics=metrics)

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_bytes: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, seed: int | None = None,
                 vocab: str = "bytes", decoder: str = "static", check_every: int = 16,
                 cuda_graphs: bool | None = None):
        """Cached incremental decoding; see :func:`megabyte.generation.generate`.

        Returns (B, N) new ids: byte values (< 256), ``eos_id`` and ``pad_id`` after it with the
        default ``vocab="bytes"``; ``vocab="all"`` lets every id of the V-id vocabulary be sampled.
        ``decoder="static"`` (default: fixed-shape steps, no host sync per byte, CUDA graphs on a
        GPU) or ``"cached"`` (the host-driven decoder).
        """
        return generation.generate(self, prompt_ids, max_new_bytes, temperature=temperature, top_k=top_k,
                                   top_p=top_p, eos_id=eos_id, seed=seed, vocab=vocab, decoder=decoder,
                                   check_every=check_every, cuda_graphs=cuda_graphs)

    # --- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically per file)."""
        from safetensors.torch import save_model

        os.makedirs(directory, exist_ok=True)
        cfg_path = os.path.join(directory, "config.json")
        with open(cfg_path + ".tmp", "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        os.replace(cfg_path + ".tmp", cfg_path)
        w_path = os.path.join(directory, "model.safetensors")
        save_model(self, w_path + ".tmp")
        os.replace(w_path + ".tmp", w_path)

    @classmethod
    def from_pretrained(cls, directory: str, backend: str | None = None, map_location: str = "cpu") -> "Megabyte":
        """Load a model written by :meth:`save_pretrained`."""
        from safetensors.torch import load_model

        cfg_path = os.path.join(directory, "config.json")
        w_path = os.path.join(directory, "model.safetensors")
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise ValueError(f"{directory!r} is not a Megabyte checkpoint: {os.path.basename(p)} is missing")
        try:
            with open(cfg_path) as f:
                cfg = MegabyteConfig.from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
        model = cls(cfg, backend=backend)
        try:
            load_model(model, w_path, strict=True, device=map_location)
        except Exception as e:  # truncated / corrupted file, or weights of another config
            raise ValueError(f"cannot load weights from {w_path}: {e}") from None
        return model
