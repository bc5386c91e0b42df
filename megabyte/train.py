"""``megabyte train`` and ``megabyte eval``: train a small MEGABYTE on bytes, score it in bits/byte.

The run: load a byte corpus (``megabyte.data``), compute the baselines on the held-out bytes
(``megabyte.baselines``), train with AdamW (betas 0.9/0.98), linear warm-up then cosine decay,
gradient clipping at 1.0, on random windows; evaluate held-out bits per byte (log2) every
``--eval-every`` steps and at the end; save the checkpoint (``save_pretrained``) to ``--out`` with
``train_log.jsonl`` and ``loss.png`` next to it; sample a few hundred bytes from a prompt.

Bits per byte of the model = mean cross entropy in nats over every held-out byte / ln 2, with the
held-out bytes cut into consecutive non-overlapping windows of ``seq_len`` (each window starts
without context), the same bytes the baselines are computed on.

For long runs: every ``--save-every`` steps, at the end, and on SIGTERM / SIGINT the checkpoint
and the resumable ``train_state.pt`` (``megabyte.checkpoint``) are written; ``--resume``
continues a run so that on CPU its parameters are bitwise those of an uninterrupted run (same
arguments, ``--time-budget 0``: with a budget the schedule follows the clock). Under ``torchrun``
(WORLD_SIZE > 1) the model is wrapped in DDP, or sharded with FSDP2 (``--fsdp``); each rank takes
its rows of the global batch (``BatchSampler(rank, world)``), the logged loss is the mean over the
ranks and only rank 0 prints and writes. ``--grad-accum``, ``--precision bf16`` (autocast; the
default on a CUDA GPU), ``--loss-chunk`` and ``--checkpointing`` (long contexts) and
``--tensorboard`` complete the recipe.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from . import baselines
from . import checkpoint as ckpt
from .data import BatchSampler, Corpus, eval_windows, load_corpus

LN2 = math.log(2.0)

# The default demo, chosen by measurement on a 2-core CPU: at a fixed wall-clock budget a small
# model with many small steps beats a larger one with fewer (batch 8 beat 16, 0.9M params beat
# 1.5M and 3.3M). ~3000 steps take about 2-3 minutes on 2 idle cores; `time_budget_cpu` stops a
# slower or busier CPU in time (the cosine schedule follows the clock there).
DEMO = dict(
    seq_len=256, batch_size=8, steps=3000, lr=3e-3, min_lr_ratio=0.1, warmup=100, weight_decay=0.1,
    patch_size=4, d_global=32, d_local=64, g_layers=4, l_layers=2, g_heads=4, l_heads=4,
    time_budget_cpu=200, eval_every=500,
)


# ----------------------------------------------------------------------------------------------
# model helpers

def _model_classes():
    from .config import MegabyteConfig
    from .model import Megabyte
    return MegabyteConfig, Megabyte


def build_model(args, extra: dict):
    MegabyteConfig, Megabyte = _model_classes()
    cfg = MegabyteConfig(
        V=512, P=args.patch_size, D_G=args.d_global, D_L=args.d_local, T_MAX=args.seq_len,
        g_nheads=args.g_heads, g_nlayers=args.g_layers, l_nheads=args.l_heads, l_nlayers=args.l_layers,
        initializer_range=0.02, pad_id=257, eos_id=258, extra=extra,
        **({"backend": args.backend} if getattr(args, "backend", None) else {}),
    )
    return Megabyte(cfg)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq_len: int, batch_size: int, device, *, autocast=None,
             loss_chunk: int | None = None) -> float:
    """Held-out bits per byte: every byte of ``data`` scored once (see the module docstring).

    ``autocast``: a context manager to run the forward in (bf16 training); ``loss_chunk``: score
    through the chunked head (no (B, T, V) logits; long sequences)."""
    was_training = model.training
    model.eval()
    total_nats, total_bytes = 0.0, 0
    kw = {"loss_chunk": loss_chunk} if loss_chunk else {}
    for ids in eval_windows(data, seq_len, batch_size):
        ids = ids.to(device)
        with (autocast if autocast is not None else contextlib.nullcontext()):
            out = model(ids, return_loss=True, **kw)
        total_nats += float(out.loss) * ids.numel()  # all targets are real bytes (no pad)
        total_bytes += ids.numel()
    model.train(was_training)
    return total_nats / total_bytes / LN2


@torch.no_grad()
def sample(model, prompt: bytes, n_bytes: int, temperature: float = 0.8, context: int | None = None,
           seed: int = 0, device="cpu") -> bytes:
    """Sample ``n_bytes`` after ``prompt`` with a plain loop over the full forward (slow but simple).

    Only the 256 byte values are sampled (special ids are masked out); the context is the last
    ``context`` bytes (default the model's ``T_MAX``).
    """
    was_training = model.training
    model.eval()
    context = context or model.config.T_MAX
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt) if prompt else []
    out = []
    for _ in range(n_bytes):
        ctx = ids[-(context - 1):] if ids else []
        # The model predicts byte t from bytes < t; feed the context plus a dummy last byte and
        # read the logits at the dummy's position (they do not depend on it: causality).
        x = torch.tensor([ctx + [0]], dtype=torch.long, device=device)
        logits = model(x).lm_logits[0, -1, :256].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        ids.append(nxt)
        out.append(nxt)
    model.train(was_training)
    return bytes(out)


# ----------------------------------------------------------------------------------------------
# progress, logging, plotting

def _fmt_time(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fmt_rate(r: float) -> str:
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.1f}k" if r >= 1e3 else f"{r:.0f}"


class Progress:
    """One progress line on stderr: in place (``\\r``) on a TTY, else a new line every N steps."""

    def __init__(self, total: int, every: int, stream=None):
        self.total, self.every = total, max(1, every)
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_len = 0

    def update(self, step: int, loss: float, rate: float, eta: float, extra: str = "") -> None:
        if not self.tty and step % self.every and step != self.total:
            return
        bar_w = 20
        filled = int(bar_w * step / self.total)
        bar = "#" * filled + "." * (bar_w - filled)
        line = (f"[{bar}] step {step}/{self.total} | loss {loss:.4f} | bpb {loss / LN2:.3f} | "
                f"{_fmt_rate(rate)} B/s | ETA {_fmt_time(eta)}{extra}")
        if self.tty:
            pad = " " * max(0, self._last_len - len(line))
            self.stream.write("\r" + line + pad)
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, not overwritten by the progress line."""
        if self.tty and self._last_len:
            self.stream.write("\n")
            self._last_len = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0


def plot_loss(records: list[dict], base: dict, path: Path) -> None:
    """Training loss (bits/byte) per step, held-out evaluations and the baselines as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["bpb"]) for r in records if r.get("kind") == "train"]
    ev = [(r["step"], r["heldout_bpb"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if tr:
        ax.plot(*zip(*tr), lw=1, alpha=0.8, label="train bpb (mean since last point)")
    if ev:
        ax.plot(*zip(*ev), "o-", ms=4, label="held-out bpb")
    styles = {"order0_bpb": ("order-0 (train freqs)", ":"), "gzip_bpb": ("gzip -9", "--"),
              "lzma_bpb": ("lzma -9e", "-.")}
    for k, (name, ls) in styles.items():
        if k in base:
            ax.axhline(base[k], color="gray", ls=ls, lw=1, label=f"{name} {base[k]:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("MEGABYTE training")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _print_table(rows: list[tuple[str, str]], stream=None) -> None:
    stream = stream or sys.stdout
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}", file=stream)


# ----------------------------------------------------------------------------------------------
# the commands

def default_threads() -> int:
    """The cores this process may use, less those other processes keep busy (1-minute load).

    Oversubscribing the cores is far worse than using fewer threads: OpenMP threads spin at
    every barrier, and a 2-thread step measured 3x slower than a 1-thread one on a 2-core
    machine with other work running.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def _setup_threads(threads: int | None) -> None:
    torch.set_num_threads(max(1, threads if threads else default_threads()))


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last checkpoint written is left as it was."""


class UsageError(ValueError):
    """Arguments that only turn out unusable at run time (no CUDA, no tensorboard, a mismatched resume)."""


class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT arrived: the state was saved at ``step``; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, step: int, out_dir):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: training state saved at step {step} in {out_dir}; "
                         f"continue with the same command plus --resume")


class _StopSignals:
    """SIGTERM and SIGINT set a flag the training loop reads after each step (then it saves and
    stops); a second SIGINT stops at once. Installed only in the main thread."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


class _Dist:
    """Rank and world of a ``torchrun`` launch (WORLD_SIZE > 1), else a single process."""

    def __init__(self, device_arg: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if not self.enabled:
            self.device = _device(device_arg)
            return
        import torch.distributed as dist

        if device_arg:
            self.device = torch.device(device_arg)
        else:
            self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, x: float) -> float:
        """The mean of ``x`` over the ranks (every rank gets it)."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _wrap_parallel(model, dist_: _Dist, fsdp: bool):
    """DDP, or FSDP2 (``fully_shard`` per transformer block, then the root) with ``fsdp``."""
    if fsdp:
        import warnings

        from torch.distributed.fsdp import fully_shard

        # the model's output holds views (lm_logits[:, :T]); training never writes into them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        for tr in (model.g_transformer, model.l_transformer):
            for block in tr.layers:
                fully_shard(block)
        fully_shard(model)
        return model
    if not dist_.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[dist_.device.index] if dist_.device.type == "cuda" else None)


def _full_state(model, opt, fsdp: bool) -> tuple[dict, dict]:
    """Model and optimizer state dicts as plain full tensors (gathered on every rank under FSDP2)."""
    if not fsdp:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)


def _load_full_state(model, opt, model_sd: dict, opt_sd: dict, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=o)
    set_optimizer_state_dict(model, opt, opt_sd, options=o)


def _config_diff(a: dict, b: dict) -> list[str]:
    skip = ("extra", "backend")
    return [f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in skip and a.get(k) != b.get(k)]


def _read_log(path: Path, upto_step: int) -> list[dict]:
    """The records of an earlier run's log up to ``upto_step`` (a torn last line is dropped)."""
    recs = []
    if not path.is_file():
        return recs
    for line in path.read_text(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("kind") == "final" or (r.get("kind") in ("train", "eval") and r.get("step", 0) > upto_step):
            continue
        recs.append(r)
    return recs


def run_train(args) -> dict:
    """Everything ``megabyte train`` does; returns the final figures.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank runs all of it on its own shard of each batch
    (DDP, or FSDP2 with ``--fsdp``); only rank 0 prints and writes files.
    """
    t_start = time.perf_counter()
    _setup_threads(args.threads)
    dist_ = _Dist(args.device)
    device = dist_.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    fsdp = bool(getattr(args, "fsdp", False))
    if fsdp and not dist_.enabled:
        raise UsageError("--fsdp shards the model over the ranks of a torchrun launch "
                         "(torchrun --nproc-per-node N -m megabyte train --fsdp ...)")
    say = print if dist_.main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    accum = getattr(args, "grad_accum", 1) or 1
    save_every = getattr(args, "save_every", 0) or 0
    loss_chunk = getattr(args, "loss_chunk", 0) or None
    precision = getattr(args, "precision", "auto") or "auto"
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    out_dir = Path(args.out)

    tb = None
    if getattr(args, "tensorboard", False) and dist_.main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UsageError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None
        tb = SummaryWriter(str(out_dir / "tensorboard"))

    # the state to resume from, read before anything is written to --out
    state, state_path = None, None
    resume_from = getattr(args, "resume_from", None)
    if resume_from:
        state, state_path = ckpt.load_state(resume_from), Path(resume_from)
    elif getattr(args, "resume", False):
        if (out_dir / ckpt.STATE).exists() or (out_dir / ckpt.PREV).exists():
            state, state_path = ckpt.load_latest(out_dir, warn=lambda m: say(m, file=sys.stderr))
        else:
            say(f"resume: no training state in {out_dir} yet: starting from step 0")

    corpus: Corpus = load_corpus(args.data, max_bytes=args.max_bytes, eval_bytes=args.eval_bytes,
                                 heldout_frac=args.heldout_frac, min_len=args.seq_len)
    say(f"data: {corpus.describe()}")
    if corpus.skipped:
        say(f"data: skipped {len(corpus.skipped)} unreadable file(s)")

    base = baselines.all_baselines(corpus.train, corpus.heldout)
    say(f"baselines on the {len(corpus.heldout):,} held-out bytes: order-0 {base['order0_bpb']:.3f} bpb "
        f"(cross entropy under the training bytes' frequencies, add-one smoothed), "
        f"gzip -9 {base['gzip_bpb']:.3f}, lzma -9e {base['lzma_bpb']:.3f}")

    data_spec = {
        "data": None if args.data is None else str(Path(args.data).resolve()),
        "max_bytes": args.max_bytes, "eval_bytes": args.eval_bytes, "heldout_frac": args.heldout_frac,
        "seq_len": args.seq_len,
    }
    raw = build_model(args, extra={"train": data_spec}).to(device)
    if getattr(args, "checkpointing", False):
        raw.set_checkpointing(True, True)
    raw.train()
    if state is not None:
        diff = _config_diff(state.get("config", {}), raw.config.to_dict())
        if diff:
            raise ckpt.CheckpointError(f"--resume: {state_path} holds another model than these arguments build "
                                       f"({'; '.join(diff)})")
    say(f"model: {n_params(raw) / 1e6:.2f}M parameters, P={args.patch_size} D_G={args.d_global} "
        f"D_L={args.d_local} global {args.g_layers}x{args.g_heads}h local {args.l_layers}x{args.l_heads}h, "
        f"T={args.seq_len}, batch {args.batch_size}, {args.steps} steps, lr {args.lr:g}, "
        f"device {device}, backend {getattr(raw, 'backend', raw.config.backend)}, "
        f"{torch.get_num_threads()} threads"
        + (f", {dist_.world} ranks ({'FSDP2' if fsdp else 'DDP'})" if dist_.enabled else "")
        + (f", grad accumulation {accum}" if accum > 1 else "") + (", bf16 autocast" if precision == "bf16" else ""))

    if state is not None and fsdp:  # FSDP2 loads full state dicts into the sharded model below
        pass
    elif state is not None:
        raw.load_state_dict(state["model"])
    model = _wrap_parallel(raw, dist_, fsdp)
    core = model if fsdp else raw  # what forward/eval/sampling run on (FSDP2 must run the sharded one)

    # AdamW; weight decay on the weights of Linear layers only (not on biases, norms, tables).
    linear_w = {id(m.weight) for m in core.modules() if isinstance(m, torch.nn.Linear)}
    decay, no_decay = [], []
    for p in core.parameters():
        if p.requires_grad:
            (decay if id(p) in linear_w else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    if args.time_budget is None:  # the demo's safety net on slow CPUs; a GPU run is never cut
        args.time_budget = DEMO["time_budget_cpu"] if device.type == "cpu" else 0
    budget = args.time_budget if args.time_budget > 0 else math.inf

    def lr_at(step: int, train_s: float) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine to ``min_lr_ratio * lr``.

        The cosine runs over the fraction of the run done: steps done / ``steps``, or training
        time / ``time_budget`` when that is larger (a slow machine anneals and stops in time).
        """
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = max((step - args.warmup) / max(1, args.steps - args.warmup), train_s / budget)
        lo = args.lr * args.min_lr_ratio
        return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * min(1.0, t)))

    sampler = BatchSampler(corpus.train, args.seq_len, args.batch_size, seed=args.seed,
                           rank=dist_.rank, world=dist_.world)
    start_step, train_s_before, ema = 0, 0.0, None
    if state is not None:
        if fsdp:
            _load_full_state(model, opt, state["model"], state["optimizer"], True)
        else:
            opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_step, train_s_before, ema = int(state["step"]), float(state["train_s"]), state.get("ema")
        say(f"resume: {state_path} at step {start_step}")

    log_path = out_dir / "train_log.jsonl"
    records: list[dict] = []
    log_f = None
    if dist_.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        old = _read_log(log_path, start_step) if state is not None else []
        log_f = open(log_path, "w")
        for r in old:
            records.append(r)
            log_f.write(json.dumps(r) + "\n")
        log_f.flush()

    def log(rec: dict) -> None:
        if log_f is None:
            return
        records.append(rec)
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        if tb is not None and "step" in rec:
            for k, v in rec.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    tb.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])

    log({"kind": "run" if state is None else "resume", "step": start_step, "argv": getattr(args, "argv", None),
         "args": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
         "data": corpus.describe(), "baselines": base, "n_params": n_params(raw),
         "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
         "world": dist_.world, "precision": precision})

    def save(step: int, train_s: float) -> None:
        """model.safetensors for eval/generate + the resumable state; rank 0 writes, all ranks gather."""
        model_sd, opt_sd = _full_state(model if fsdp else raw, opt, fsdp)
        if dist_.main:
            if fsdp:
                raw_cpu = build_model(args, extra={"train": data_spec})
                raw_cpu.load_state_dict(model_sd)
                raw_cpu.save_pretrained(str(out_dir))
            else:
                raw.save_pretrained(str(out_dir))
            ckpt.save_state({
                "step": step, "train_s": train_s, "ema": ema, "model": model_sd, "optimizer": opt_sd,
                "sampler": sampler.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "config": raw.config.to_dict(), "world": dist_.world,
                "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
            }, out_dir)
        dist_.barrier()

    bytes_per_step = args.batch_size * args.seq_len * accum * dist_.world
    progress = Progress(args.steps, args.log_every, stream=sys.stderr if dist_.main else open(os.devnull, "w"))
    t_train = time.perf_counter()
    eval_time = 0.0
    interval_sum, interval_n = 0.0, 0
    last_eval = None
    steps_done = start_step
    fwd_kw = {"loss_chunk": loss_chunk} if loss_chunk else {}

    def train_seconds() -> float:
        return train_s_before + time.perf_counter() - t_train - eval_time

    with _StopSignals() as stop:
        for step in range(start_step, args.steps):
            lr = lr_at(step, train_seconds())
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss_sum = None
            for micro in range(accum):
                ids = sampler().to(device)
                sync = contextlib.nullcontext()
                if dist_.enabled and not fsdp and micro < accum - 1:
                    sync = model.no_sync()  # DDP: all-reduce the gradients once, on the last micro-batch
                with sync:
                    with autocast:
                        loss = model(ids, return_loss=True, **fwd_kw).loss
                    (loss / accum if accum > 1 else loss).backward()
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            lv = dist_.mean(float(loss_sum) / accum)
            if not math.isfinite(lv):
                progress.close()
                raise TrainingError(f"loss became {lv} at step {step + 1}; try a lower --lr (the parameters were not "
                                    f"updated; the last checkpoint in {out_dir}, if any, is intact)")
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
            opt.step()

            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            interval_sum += lv
            interval_n += 1
            done = step + 1
            steps_done = done
            elapsed = time.perf_counter() - t_train - eval_time
            rate = (done - start_step) * bytes_per_step / max(elapsed, 1e-9)
            eta = min((args.steps - done) * bytes_per_step / max(rate, 1e-9),
                      max(0.0, budget - train_seconds()))
            out_of_time = train_seconds() >= budget and done < args.steps
            if dist_.enabled:
                out_of_time = dist_.any(out_of_time)
            if done % args.log_every == 0 or done == args.steps or done == start_step + 1 or out_of_time:
                mean = interval_sum / interval_n  # mean training loss since the last record
                log({"kind": "train", "step": done, "loss": mean, "bpb": mean / LN2, "lr": lr, "grad_norm": gnorm,
                     "bytes_per_s": rate, "elapsed_s": time.perf_counter() - t_start})
                interval_sum, interval_n = 0.0, 0
            extra = f" | held-out {last_eval:.3f}" if last_eval is not None else ""
            progress.update(done, ema, rate, eta, extra)
            if args.eval_every and done % args.eval_every == 0 and done != args.steps:
                t0 = time.perf_counter()
                last_eval = evaluate(core, corpus.heldout, args.seq_len, args.eval_batch_size, device,
                                     autocast=autocast, loss_chunk=loss_chunk)
                eval_time += time.perf_counter() - t0
                log({"kind": "eval", "step": done, "heldout_bpb": last_eval})
            stopping = dist_.any(stop.signum is not None) if dist_.enabled else stop.signum is not None
            if stopping or (save_every and done % save_every == 0 and done != args.steps):
                save(done, train_seconds())
            if stopping:
                progress.close()
                log({"kind": "interrupted", "step": done, "signal": stop.signum})
                if log_f is not None:
                    log_f.close()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, done, out_dir)
            if out_of_time:
                progress.message(f"time budget of {args.time_budget:g} s reached: stopping at step {done} of "
                                 f"{args.steps} (the cosine schedule followed the time; --time-budget 0 turns it off)")
                break
        progress.close()
        train_time = train_seconds()
        seen = steps_done * bytes_per_step
        train_rate = (steps_done - start_step) * bytes_per_step / max(train_time - train_s_before, 1e-9)

        heldout_bpb = evaluate(core, corpus.heldout, args.seq_len, args.eval_batch_size, device,
                               autocast=autocast, loss_chunk=loss_chunk)
        log({"kind": "eval", "step": steps_done, "heldout_bpb": heldout_bpb})
        save(steps_done, train_time)
    if dist_.main:
        plot_loss(records, base, out_dir / "loss.png")

    text = b""
    if args.sample_bytes > 0 and dist_.main and not fsdp:
        prompt = args.prompt.encode("utf-8")
        text = sample(raw, prompt, args.sample_bytes, args.temperature, context=args.seq_len,
                      seed=args.seed, device=device)
        print(f"\n--- sample ({args.sample_bytes} bytes, temperature {args.temperature}, "
              f"prompt {args.prompt!r}) ---")
        print((prompt + text).decode("utf-8", errors="replace"))
        print("--- end of sample ---\n")

    wall = time.perf_counter() - t_start
    final = {"kind": "final", "heldout_bpb": heldout_bpb, **base, "wall_s": wall, "train_s": train_time,
             "train_bytes_per_s": train_rate, "heldout_bytes": len(corpus.heldout), "steps": steps_done,
             "train_bytes_seen": seen, "sample": text.decode("utf-8", "replace")}
    log(final)
    if log_f is not None:
        log_f.close()
    if tb is not None:
        tb.close()

    n_ho = len(corpus.heldout)
    say(f"held-out bits per byte (log2) on the same {n_ho:,} bytes:")
    if dist_.main:
        _print_table([
            ("MEGABYTE (this run)", f"{heldout_bpb:.3f} bpb"),
            ("order-0, train byte freqs", f"{base['order0_bpb']:.3f} bpb  (cross entropy on held-out, add-one smoothed)"),
            ("gzip -9", f"{base['gzip_bpb']:.3f} bpb  (held-out bytes compressed alone)"),
            ("lzma -9e", f"{base['lzma_bpb']:.3f} bpb  (held-out bytes compressed alone)"),
            ("wall time", f"{wall:.1f} s  (training {train_time:.1f} s)"),
            ("training throughput", f"{_fmt_rate(train_rate)} bytes/s  ({steps_done} steps, {seen:,} bytes seen)"),
            ("checkpoint", f"{out_dir}  (+ train_log.jsonl, loss.png, train_state.pt)"),
        ])
    return final


def run_eval(args) -> dict:
    """``megabyte eval``: held-out bits per byte of a checkpoint (and the baselines)."""
    t_start = time.perf_counter()
    _setup_threads(args.threads)
    device = _device(args.device)
    _, Megabyte = _model_classes()
    ckpt_dir = Path(args.checkpoint)
    if not (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {str(ckpt_dir)!r}: no config.json there (not a checkpoint folder)")
    try:
        model = Megabyte.from_pretrained(str(ckpt_dir), backend=args.backend).to(device)
    except ValueError as e:  # truncated / corrupted weights or config: a clear message, no traceback
        raise ckpt.CheckpointError(str(e)) from None
    spec = dict((model.config.extra or {}).get("train", {}))

    data = args.data if args.data is not None else spec.get("data")
    if data is not None and args.data is None and not Path(data).exists():
        raise FileNotFoundError(f"the checkpoint was trained on {data!r}, which no longer exists; pass --data")
    seq_len = min(args.seq_len or spec.get("seq_len") or model.config.T_MAX, model.config.T_MAX)
    eval_bytes = args.eval_bytes or spec.get("eval_bytes") or 64 * 1024
    corpus = load_corpus(data, max_bytes=args.max_bytes or spec.get("max_bytes") or 4 * 1024 * 1024,
                         eval_bytes=eval_bytes, heldout_frac=args.heldout_frac or spec.get("heldout_frac") or 0.05,
                         min_len=1)
    print(f"data: {corpus.describe()}")
    score, how = evaluate, ""
    if getattr(args, "strided", False):  # megabyte eval --strided (megabyte/evaluate.py)
        from .evaluate import evaluate_strided as score
        how = f", strided (two passes offset by P/2={model.config.P // 2})"
    bpb = score(model, corpus.heldout, seq_len, args.eval_batch_size, device)
    base = baselines.all_baselines(corpus.train, corpus.heldout)
    print(f"held-out bits per byte (log2) on the same {len(corpus.heldout):,} bytes, windows of {seq_len}{how}:")
    _print_table([
        ("MEGABYTE", f"{bpb:.3f} bpb  ({ckpt_dir})"),
        ("order-0, train byte freqs", f"{base['order0_bpb']:.3f} bpb  (cross entropy on held-out, add-one smoothed)"),
        ("gzip -9", f"{base['gzip_bpb']:.3f} bpb  (held-out bytes compressed alone)"),
        ("lzma -9e", f"{base['lzma_bpb']:.3f} bpb  (held-out bytes compressed alone)"),
        ("wall time", f"{time.perf_counter() - t_start:.1f} s"),
    ])
    return {"heldout_bpb": bpb, **base}
