"""End-to-end training step: this model on each backend against its peers.

    python -m benchmarks.bench_model [--quick] [--device cuda|cpu] [--original PATH]
    (normally run through ``python -m benchmarks.run``, which writes the result files)

One training step = forward, loss, backward, ``AdamW.step()``, ``zero_grad``. Reported per
row: bytes/s (B*T / step time), the step time (GPU: ``triton.testing.do_bench`` median; CPU:
median of wall-clock repeats), peak memory (GPU: ``torch.cuda.max_memory_allocated`` over one
step, parameters, gradients and optimizer state included; not measured on CPU), model FLOPs per
step and, on a GPU whose peak is known, model FLOPs utilisation.

Rows (``impl``):

* ``megabyte[reference|triton|native|auto]`` this project's ``Megabyte(config, backend=...)``;
  ``compile(megabyte[...])`` the same under ``torch.compile``;
* ``megabyte-pytorch`` ``MEGABYTE_pytorch.MEGABYTE`` 0.3.6 from PyPI at the matched size
  (``dim=(P*D_G, D_L)``, ``depth=(g_nlayers, l_nlayers)``, ``max_seq_len=(K, P)``, our global
  head dim, the number of heads that brings its parameter count closest to ours: 8 of 64 at
  full size; ``flash_attn=True`` = SDPA); skipped with a note when not importable
  (``pip install megabyte-pytorch==0.3.6 --no-deps beartype tqdm``);
* ``gpt2-sdpa`` a GPT-2-style byte-level transformer defined below (pre-LN, learned positions,
  tied head, ``F.scaled_dot_product_attention``) of width ``P*D_G`` with as many layers as make
  its non-embedding parameter count closest to the MEGABYTE model's;
* ``original`` the original implementation (github shjwudp/megabyte, ``model/megabyte.py``),
  imported at run time from ``--original PATH`` (a local checkout; never vendored).

Configs: ``bench`` is the original's benchmark config (V=512, P=8, D_G=128, D_L=256, 12 global
layers of 16 heads, 6 local layers of 4 heads, T=2048, batch 32), ``long`` the same model at
T=65536 (batch 1), ``stages3`` a three-stage model (``patch_sizes``, ``dims``, ``nlayers``,
``nheads``; issue 14) against megabyte-pytorch's three-stage ``MEGABYTE`` at matched widths
(``dim=(u_0 D_0, u_1 D_1, D_2)`` with ``u_i`` the bytes per unit of stage i,
``depth=nlayers``, ``max_seq_len=(K, P_0, P_1)``; no ``original`` row: it has two stages).
``--quick`` (CPU) scales the widths, depths and lengths down (same family, sizes recorded in
every row); ``--smoke`` is a seconds-long plumbing check.

Model FLOPs per step = 3 x forward FLOPs (backward = 2 x forward; no recomputation counted):
2·in·out per row of every ``nn.Linear`` (counted with forward hooks on the real model, plus the
global-to-local projection our fused op does outside an ``nn.Linear``) and the causal attention
matmuls 2·B·H·N²·d per layer (4·B·H·N²·d halved for causality).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megabyte import Megabyte, MegabyteConfig

# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
BASE = dict(V=512, initializer_range=0.02, pad_id=257, eos_id=258)
CONFIGS = {
    "full": {
        "bench": dict(P=8, D_G=128, D_L=256, g_nlayers=12, g_nheads=16, l_nlayers=6, l_nheads=4, T=2048, B=32),
        "long": dict(P=8, D_G=128, D_L=256, g_nlayers=12, g_nheads=16, l_nlayers=6, l_nheads=4, T=65536, B=1),
        # units (32, 8, 1): global 32*32 = 1024 wide, middle 8*64 = 512, local 256
        "stages3": dict(patch_sizes=(4, 8), dims=(32, 64, 256), nlayers=(12, 4, 4), nheads=(16, 8, 4), T=2048, B=32),
    },
    "quick": {  # CPU: same family, scaled down
        "bench": dict(P=8, D_G=32, D_L=64, g_nlayers=4, g_nheads=4, l_nlayers=2, l_nheads=2, T=1024, B=4),
        "long": dict(P=8, D_G=32, D_L=64, g_nlayers=4, g_nheads=4, l_nlayers=2, l_nheads=2, T=4096, B=1),
        # units (16, 4, 1): global 16*16 = 256 wide, middle 4*32 = 128, local 64
        "stages3": dict(patch_sizes=(4, 4), dims=(16, 32, 64), nlayers=(4, 2, 2), nheads=(4, 2, 2), T=1024, B=4),
    },
    "smoke": {
        "bench": dict(P=4, D_G=8, D_L=16, g_nlayers=1, g_nheads=2, l_nlayers=1, l_nheads=1, T=64, B=2),
        "stages3": dict(patch_sizes=(2, 2), dims=(8, 8, 16), nlayers=(1, 1, 1), nheads=(2, 1, 1), T=64, B=2),
    },
}
# dense bf16/fp16 tensor-core peak (FLOP/s) by device-name substring, for MFU
PEAK_FLOPS_16BIT = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                    "A10G": 125e12, "L4": 121e12, "4090": 165e12}


def stages(c: dict) -> dict:
    """Any config in the N-stage form: patch_sizes, dims, nlayers, nheads (two stages: the classic keys)."""
    if "patch_sizes" in c:
        return {k: tuple(c[k]) for k in ("patch_sizes", "dims", "nlayers", "nheads")}
    return dict(patch_sizes=(c["P"],), dims=(c["D_G"], c["D_L"]), nlayers=(c["g_nlayers"], c["l_nlayers"]),
                nheads=(c["g_nheads"], c["l_nheads"]))


def units(c: dict) -> tuple[int, ...]:
    """Bytes per unit of each stage: (u_0, ..., 1)."""
    ps = stages(c)["patch_sizes"]
    return tuple(math.prod(ps[i:]) for i in range(len(ps) + 1))


def model_config(c: dict) -> MegabyteConfig:
    if "patch_sizes" in c:
        return MegabyteConfig(**BASE, T_MAX=c["T"], **stages(c))
    return MegabyteConfig(**BASE, P=c["P"], D_G=c["D_G"], D_L=c["D_L"], T_MAX=c["T"], g_nlayers=c["g_nlayers"],
                          g_nheads=c["g_nheads"], l_nlayers=c["l_nlayers"], l_nheads=c["l_nheads"])


def describe(c: dict) -> str:
    if "patch_sizes" in c:
        j = lambda k: ",".join(map(str, c[k]))  # noqa: E731
        return (f"patch_sizes={j('patch_sizes')} dims={j('dims')} layers={j('nlayers')} heads={j('nheads')} "
                f"T={c['T']} B={c['B']}")
    return (f"P={c['P']} D_G={c['D_G']} D_L={c['D_L']} g{c['g_nlayers']}x{c['g_nheads']}h "
            f"l{c['l_nlayers']}x{c['l_nheads']}h T={c['T']} B={c['B']}")


# --------------------------------------------------------------------------------------------
# the GPT-2-style baseline
# --------------------------------------------------------------------------------------------
class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2-style byte-level LM: learned positions, pre-LN blocks, final LN, tied head, SDPA."""

    def __init__(self, V: int, T: int, d: int, layers: int, heads: int):
        super().__init__()
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(T, d)
        self.blocks = nn.ModuleList([GPTBlock(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def gpt_layers_for(target_nonemb: int, d: int) -> int:
    per_layer = 12 * d * d + 13 * d
    return max(1, round((target_nonemb - 2 * d) / per_layer))


def megabyte_nonembedding_params(model: Megabyte) -> int:
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def attention_flops(batch: int, heads: int, n: int, d: int, layers: int) -> float:
    """Forward FLOPs of causal attention: 4·B·H·N²·d halved (QK^T and PV over the lower triangle)."""
    return layers * 2.0 * batch * heads * n * n * d


def linear_flops(model: nn.Module, run_forward: Callable[[], object]) -> float:
    """Forward FLOPs of every nn.Linear the forward calls: 2·in·out per row (forward hooks)."""
    total = [0.0]

    def hook(mod, inp, out):
        total[0] += 2.0 * mod.in_features * mod.out_features * (inp[0].numel() // mod.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def megabyte_attention_flops(c: dict) -> float:
    """Stage 0: B sequences of K units; stage i >= 1: B*K_{i-1} sequences of P_{i-1} units, each
    u_i * dims[i] wide."""
    s, u = stages(c), units(c)
    KP = -(-c["T"] // u[0]) * u[0]
    total = 0.0
    for i, (d, layers, heads) in enumerate(zip(s["dims"], s["nlayers"], s["nheads"])):
        seqs, n = (c["B"], KP // u[0]) if i == 0 else (c["B"] * KP // u[i - 1], s["patch_sizes"][i - 1])
        total += attention_flops(seqs, heads, n, u[i] * d // heads, layers)
    return total


# --------------------------------------------------------------------------------------------
# the implementations: each builder returns a Built (or raises Skip)
# --------------------------------------------------------------------------------------------
class Skip(Exception):
    """A row that cannot run here; the message says why."""


@dataclass
class Built:
    model: nn.Module
    loss: Callable[[torch.Tensor], torch.Tensor]  # ids -> scalar loss
    fwd_flops: Callable[[torch.Tensor], float]  # ids -> forward FLOPs (called once, no grad)
    info: dict = field(default_factory=dict)


def build_megabyte(c, device, dtype, backend: str, compile_: bool = False) -> Built:
    cfg = model_config(c)
    torch.manual_seed(0)
    model = Megabyte(cfg, backend=backend).to(device=device, dtype=dtype).train()
    if backend not in ("auto", "reference"):
        # fail fast (a Skip) when an op has no implementation of this backend
        from megabyte_kernels.attention import IMPLS as att
        from megabyte_kernels.global_to_local import IMPLS as g2l
        from megabyte_kernels.patch_embed import IMPLS as pe

        missing = [op for op, t in (("patch_embed", pe), ("global_to_local", g2l), ("causal_attention", att))
                   if backend not in t]
        if missing:
            raise Skip(f"backend {backend!r} has no {', '.join(missing)}")
        if backend == "triton" and torch.device(device).type != "cuda":
            raise Skip("Triton runs on CPU tensors only in the interpreter: not timed")
    fwd = torch.compile(model) if compile_ else model

    def loss(ids):
        return fwd(ids, return_loss=True).loss

    def flops(ids):
        # the global-to-local projections at every stage boundary are fused, not nn.Linear calls
        rows = ids.shape[0] * (-(-ids.shape[1] // cfg.P)) * cfg.P
        g2l = sum(2.0 * a * b * rows for a, b in zip(cfg.dims[:-1], cfg.dims[1:]))
        return linear_flops(model, lambda: model(ids)) + g2l + megabyte_attention_flops(c)

    return Built(model, loss, flops, {"params": model.num_parameters(),
                                      "nonemb_params": megabyte_nonembedding_params(model)})


def build_gpt(c, device, dtype) -> Built:
    torch.manual_seed(0)
    ref = Megabyte(model_config(c), backend="reference")
    d = units(c)[0] * stages(c)["dims"][0]
    heads = max(1, d // 64)
    layers = gpt_layers_for(megabyte_nonembedding_params(ref), d)
    del ref
    model = GPT(BASE["V"], c["T"], d, layers, heads).to(device=device, dtype=dtype).train()

    def flops(ids):
        B, T = ids.shape
        return linear_flops(model, lambda: model(ids)) + attention_flops(B, heads, T, d // heads, layers)

    nonemb = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("wte", "wpe")))
    return Built(model, model, flops, {"params": sum(p.numel() for p in model.parameters()),
                                       "nonemb_params": nonemb, "arch": f"d={d} L={layers} H={heads}"})


def build_megabyte_pytorch(c, device, dtype) -> Built:
    try:
        import MEGABYTE_pytorch
        from MEGABYTE_pytorch import MEGABYTE
    except Exception as e:  # noqa: BLE001
        raise Skip(f"megabyte-pytorch not importable ({type(e).__name__}: {e}); "
                   "pip install megabyte-pytorch==0.3.6 --no-deps beartype tqdm") from None
    s, u = stages(c), units(c)
    K = -(-c["T"] // u[0])

    def make(heads, dim_head):  # matched widths: stage i is u_i * dims[i] wide in both
        return MEGABYTE(num_tokens=BASE["V"], dim=tuple(ui * d for ui, d in zip(u, s["dims"])),
                        depth=s["nlayers"], max_seq_len=(K, *s["patch_sizes"]), heads=heads,
                        dim_head=dim_head, flash_attn=True, pad_id=BASE["pad_id"])

    # matched size: its head dim is our global head dim; its number of heads (one setting for all
    # stages) the one that brings its parameter count closest to this project's model at the same
    # widths and depths, position table aside (full size: 8 heads of 64, its defaults)
    dim_head = u[0] * s["dims"][0] // s["nheads"][0]
    with torch.device("meta"):
        m = Megabyte(model_config(c), backend="reference")
        ours = m.num_parameters() - m.g_pos_embedder.weight.numel()  # it has no position table
        best = min((abs(sum(p.numel() for p in make(h, dim_head).parameters()) - ours), -h, h, dim_head)
                   for h in (1, 2, 4, 8, 16))
    heads, dim_head = best[2], best[3]
    torch.manual_seed(0)
    model = make(heads, dim_head).to(device=device, dtype=dtype).train()

    def loss(ids):
        return model(ids, return_loss=True)

    def flops(ids):  # every stage's sequences carry one start token
        B = ids.shape[0]
        att = attention_flops(B, heads, K + 1, dim_head, s["nlayers"][0])
        for i in range(1, len(u)):
            att += attention_flops(B * K * u[0] // u[i - 1], heads, s["patch_sizes"][i - 1] + 1, dim_head,
                                   s["nlayers"][i])
        return linear_flops(model, lambda: model(ids)) + att

    version = getattr(MEGABYTE_pytorch, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as _v
            version = _v("megabyte-pytorch")
        except Exception:  # noqa: BLE001
            version = "?"
    return Built(model, loss, flops, {"params": sum(p.numel() for p in model.parameters()),
                                      "arch": f"megabyte-pytorch {version}, heads={heads}x{dim_head}, SDPA"})


def build_original(c, device, dtype, path: str | None) -> Built:
    if not path:
        raise Skip("no --original PATH given (a local checkout of github.com/shjwudp/megabyte)")
    if "patch_sizes" in c:
        raise Skip("the original implementation has two stages")
    import importlib
    import os

    if not os.path.isfile(os.path.join(path, "model", "megabyte.py")):
        raise Skip(f"{path!r} has no model/megabyte.py: not a checkout of shjwudp/megabyte")
    sys.path.insert(0, os.path.abspath(path))
    try:
        mod = importlib.import_module("model.megabyte")
    except Exception as e:  # noqa: BLE001
        raise Skip(f"cannot import model.megabyte from {path!r}: {type(e).__name__}: {e}") from None
    finally:
        sys.path.pop(0)
    cfg = mod.MegabyteConfig(V=BASE["V"], P=c["P"], D_G=c["D_G"], D_L=c["D_L"], T_MAX=c["T"],
                             g_nheads=c["g_nheads"], g_nlayers=c["g_nlayers"], l_nheads=c["l_nheads"],
                             l_nlayers=c["l_nlayers"], initializer_range=BASE["initializer_range"],
                             pad_id=BASE["pad_id"], eos_id=BASE["eos_id"])
    torch.manual_seed(0)
    model = mod.Megabyte(cfg).to(device=device, dtype=dtype).train()
    dev = torch.device(device)

    def loss(ids):
        # the original makes its position ids with torch.arange on the default device (its
        # benchmark.py sets torch.set_default_device("cuda")): do the same, scoped
        with dev:
            return model(ids, return_loss=True).loss

    def flops(ids):
        return linear_flops(model, lambda: loss(ids)) + megabyte_attention_flops(c)

    return Built(model, loss, flops, {"params": sum(p.numel() for p in model.parameters())})


# --------------------------------------------------------------------------------------------
# timing one row
# --------------------------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _free(device):
    """Release the last row's memory (compiled graphs included) before the next row's peak is measured."""
    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def time_step(step: Callable[[], None], device, budget_s: float) -> tuple[float, int]:
    """Median ms of ``step`` and the number of timed repeats (after warm-up, done by the caller)."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        # do_bench: 5 estimation calls, then as many as fit in `rep` ms (at least one)
        ms = float(do_bench(step, warmup=max(1, int(budget_s * 250)), rep=max(1, int(budget_s * 750)),
                            return_mode="median"))
        return ms, -1
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2], len(times)


class Trainer:
    """One model's training step on fixed ids: forward, loss, backward, AdamW step, zero_grad."""

    def __init__(self, built: Built, c: dict, device):
        self.built, self.c, self.device = built, c, torch.device(device)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 256, (c["B"], c["T"]), generator=g).to(self.device)
        params = [p for p in built.model.parameters() if p.requires_grad]
        extra = {"foreach": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **extra)
        self.row: dict = {}

    def step(self):
        loss = self.built.loss(self.ids)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def warm_up(self) -> None:
        """Two steps (compilation, autotuning, optimizer state); the second one's peak memory."""
        t0 = time.perf_counter()
        loss0 = float(self.step().detach())
        if not math.isfinite(loss0):
            raise RuntimeError(f"non-finite loss {loss0}")
        _sync(self.device)
        self.row.update(first_step_s=time.perf_counter() - t0, loss_first_step=loss0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        _sync(self.device)
        if self.device.type == "cuda":
            self.row["peak_mem_GiB"] = torch.cuda.max_memory_allocated(self.device) / 2**30

    def finish(self, ms: float, reps: int | None) -> dict:
        c = self.c
        fwd = self.built.fwd_flops(self.ids)
        self.row.update(step_ms=ms, bytes_per_s=c["B"] * c["T"] / (ms * 1e-3), model_TFLOP_per_step=3 * fwd / 1e12,
                        achieved_TFLOP_s=3 * fwd / (ms * 1e-3) / 1e12)
        if reps:
            self.row["timed_steps"] = reps
        return self.row


def measure(built: Built, c: dict, device, budget_s: float) -> dict:
    """GPU: warm up, then ``do_bench`` median of the step."""
    tr = Trainer(built, c, device)
    tr.warm_up()
    ms, reps = time_step(tr.step, device, budget_s)
    return tr.finish(ms, reps if reps > 0 else None)


def measure_interleaved(trainers: dict, budget_s: float, log=print) -> None:
    """CPU: time the trainers round-robin (one step each per round) until the budget is spent
    (at least 3 rounds), so that load from other processes hits every row alike; the median."""
    times = {k: [] for k in trainers}
    deadline = time.perf_counter() + budget_s * len(trainers)
    rounds = 0
    while rounds < 3 or (time.perf_counter() < deadline and rounds < 50):
        for k, tr in trainers.items():
            t0 = time.perf_counter()
            tr.step()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    for k, tr in trainers.items():
        ts = sorted(times[k])
        tr.finish(1e3 * ts[len(ts) // 2], len(ts))


def peak_flops(device, dtype) -> float | None:
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_FLOPS_16BIT.items():
        if key in name:
            return val
    return None


# --------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------
def rows_for(device) -> list[tuple[str, Callable]]:
    """(impl name, builder(c, device, dtype, original)) in the order they are measured."""
    is_cuda = torch.device(device).type == "cuda"
    rows = [("megabyte[reference]", lambda c, d, t, o: build_megabyte(c, d, t, "reference"))]
    if is_cuda:
        rows.append(("megabyte[triton]", lambda c, d, t, o: build_megabyte(c, d, t, "triton")))
    else:
        rows.append(("megabyte[auto]", lambda c, d, t, o: build_megabyte(c, d, t, "auto")))
        rows.append(("megabyte[native]", lambda c, d, t, o: build_megabyte(c, d, t, "native")))
    rows.append(("compile(megabyte[reference])", lambda c, d, t, o: build_megabyte(c, d, t, "reference", True)))
    if is_cuda:
        rows.append(("compile(megabyte[triton])", lambda c, d, t, o: build_megabyte(c, d, t, "triton", True)))
    rows += [
        ("megabyte-pytorch", lambda c, d, t, o: build_megabyte_pytorch(c, d, t)),
        ("gpt2-sdpa", lambda c, d, t, o: build_gpt(c, d, t)),
        ("original", lambda c, d, t, o: build_original(c, d, t, o)),
    ]
    return rows


def run(device: str = "cuda", quick: bool = False, *, smoke: bool = False, original: str | None = None,
        configs: list[str] | None = None, impls: list[str] | None = None, compile_configs: list[str] | None = None,
        dtype: str | None = None, budget_s: float | None = None, deadline: float | None = None,
        log=print) -> list[dict]:
    """One row per (config, impl): bytes/s, step ms, peak memory, FLOPs, MFU, ratios; or a skip note.

    ``impls`` filters rows by name (substring match) and orders them by the order of the filters;
    ``compile_configs`` limits the ``compile(...)`` rows to those configs (compilation dominates a
    CPU run); past ``deadline`` (a ``time.perf_counter()`` value) no new row is started.
    """
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    scale = "smoke" if smoke else ("quick" if quick or not is_cuda else "full")
    table = CONFIGS[scale]
    configs = configs or list(table)
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype or ("bf16" if is_cuda else "fp32")]
    budget_s = budget_s if budget_s is not None else (0.3 if smoke else (4.0 if not is_cuda else 2.0))
    if smoke and compile_configs is None:
        compile_configs = []  # compilation alone takes a minute on a small CPU
    pk = peak_flops(device, tdt)
    out = []
    for cname in configs:
        c = table[cname]
        done: dict[str, dict] = {}
        trainers: dict[str, Trainer] = {}  # CPU: built and warmed up now, timed together below
        candidates = rows_for(device)
        if impls:
            chosen = {}
            for f in impls:  # an exact name, else every name containing it; in the filters' order
                hits = [(n, b) for n, b in candidates if n == f] or [(n, b) for n, b in candidates if f in n]
                chosen.update((n, b) for n, b in hits if n not in chosen)
            candidates = list(chosen.items())
        for name, builder in candidates:
            row = {"suite": "model", "config": cname, "impl": name, "sizes": describe(c),
                   "dtype": str(tdt).removeprefix("torch."), "B": c["B"], "T": c["T"]}
            out.append(row)
            if name.startswith("compile(") and compile_configs is not None and cname not in compile_configs:
                row["skipped"] = f"compile rows limited to configs {compile_configs}"
                log(f"  {cname:5s} {name:30s} skipped: {row['skipped']}")
                continue
            if deadline is not None and time.perf_counter() > deadline:
                row["skipped"] = "time limit reached before this row"
                log(f"  {cname:5s} {name:30s} skipped: {row['skipped']}")
                continue
            built = None
            try:
                built = builder(c, device, tdt, original)
                row.update(built.info)
                if is_cuda:
                    row.update(measure(built, c, device, budget_s))
                    done[name] = row
                    mem = f"{row['peak_mem_GiB']:.2f} GiB"
                    log(f"  {cname:5s} {name:30s} {row['bytes_per_s']:>12,.0f} bytes/s  {row['step_ms']:9.2f} ms  {mem}")
                else:
                    tr = Trainer(built, c, device)
                    tr.row = row
                    tr.warm_up()
                    trainers[name] = tr
                    log(f"  {cname:5s} {name:30s} built, warmed up")
            except Skip as e:
                row["skipped"] = str(e)
                log(f"  {cname:5s} {name:30s} skipped: {e}")
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                oom = is_cuda and isinstance(e, torch.cuda.OutOfMemoryError)
                row["error"] = "out of memory" if oom else f"{type(e).__name__}: {str(e).strip()[:300]}"
                log(f"  {cname:5s} {name:30s} ERROR {row['error']}")
            finally:
                if is_cuda:
                    del built
                    _free(device)
        if trainers:
            log(f"  {cname:5s} timing {len(trainers)} rows round-robin ...")
            try:
                measure_interleaved(trainers, budget_s)
                for name, tr in trainers.items():
                    done[name] = r = tr.row
                    log(f"  {cname:5s} {name:30s} {r['bytes_per_s']:>12,.0f} bytes/s  {r['step_ms']:9.2f} ms "
                        f"({r['timed_steps']} steps)")
            except Exception as e:  # noqa: BLE001
                for tr in trainers.values():
                    tr.row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
            trainers.clear()
            _free(device)
        # ratios within the config (> 1: this row is faster / uses less memory)
        base = {k: done.get(k) for k in ("megabyte[reference]", "compile(megabyte[reference])", "megabyte-pytorch",
                                          "original")}
        for r in out:
            if r["config"] != cname or "bytes_per_s" not in r:
                continue
            for key, b in base.items():
                if b is not None and b is not r:
                    r[f"speed_vs_{key}"] = r["bytes_per_s"] / b["bytes_per_s"]
            ref = base["megabyte[reference]"]
            if ref is not None and r.get("peak_mem_GiB") and ref.get("peak_mem_GiB"):
                r["mem_vs_megabyte[reference]"] = r["peak_mem_GiB"] / ref["peak_mem_GiB"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="end-to-end training-step benchmark (prints rows; "
                                             "python -m benchmarks.run writes the result files)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--original", default=None)
    a = ap.parse_args(argv)
    run(a.device, a.quick, smoke=a.smoke, original=a.original)
    return 0


if __name__ == "__main__":
    sys.exit(main())
