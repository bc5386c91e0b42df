"""``megabyte train``: train a small MEGABYTE on bytes, score it in bits/byte. Read top to bottom:
set-up, the loop, the final evaluation and save, the report.

The run: load a byte corpus (``megabyte.data``), compute the baselines on the held-out bytes
(``megabyte.baselines``), train with AdamW (betas 0.9/0.98), linear warm-up then cosine decay,
gradient clipping at 1.0, on random windows; evaluate held-out bits per byte (log2,
:func:`megabyte.evaluate.evaluate`) every ``--eval-every`` steps and at the end; save the
checkpoint (``save_pretrained``) to ``--out`` with ``train_log.jsonl`` and ``loss.png`` next to
it; sample a few hundred bytes from a prompt.

For long runs: every ``--save-every`` steps, at the end, and on SIGTERM / SIGINT
(``megabyte.signals``) the checkpoint and the resumable ``train_state.pt``
(``megabyte.train_state``) are written; ``--resume`` continues a run so that on CPU its
parameters are bitwise those of an uninterrupted run (same arguments, ``--time-budget 0``: with a
budget the schedule follows the clock). Under ``torchrun`` (WORLD_SIZE > 1,
``megabyte.distributed``) the model is wrapped in DDP, or sharded with FSDP2 (``--fsdp``); each
rank takes its rows of the global batch (``BatchSampler(rank, world)``), the logged loss is the
mean over the ranks and only rank 0 prints and writes. ``--grad-accum``, ``--precision bf16``
(autocast; the default on a CUDA GPU), ``--loss-chunk`` and ``--checkpointing`` (long contexts)
and ``--tensorboard`` complete the recipe. The progress line, the log, the plot and the tables
are ``megabyte.reporting``'s.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import baselines, train_state
from .config import MegabyteConfig
from .data import BatchSampler, Corpus, load_corpus
from .distributed import CpuShards, Dist, auto_cpu_shards, machine_cores, op_threads, setup_threads, wrap
from .evaluate import evaluate
from .model import Megabyte
from .reporting import LN2, Progress, TrainLog, baseline_rows, fmt_rate, plot_loss, print_table
from .sample import sample
from .signals import StopSignals, TrainingInterrupted

__all__ = ["DEMO", "run_train", "build_model", "evaluate", "TrainingError", "TrainingInterrupted", "UsageError"]

# The default demo, chosen by measurement (`python -m benchmarks.demo_sweep`; every run is in
# benchmarks/results/demo-sweep.md). It is budgeted in steps: 1,700 steps of 16 x 256 bytes = 7.0 MB,
# so the model it trains does not depend on the machine's speed or load. What mattered, at a fixed
# number of bytes: the peak lr (3.3 MB, batch 16: 2e-3 3.124 bpb, 3e-3 2.995, 5e-3 2.749, 8e-3 2.630,
# 1.2e-2 2.582); the head bias started at the byte log frequencies (4.5 MB: 2.357 -> 2.266); and most
# of all the bytes seen in the time: since a CPU batch runs as 2 shards in 2 threads
# (`distributed.CpuShards`) and glibc keeps freed blocks (`keep_freed_memory`), batch 16 ran at
# ~37k bytes/s on the idle 2-core machine (8 x 256: ~31k), and 8.0 MB of it reached 1.995 (lr
# 1.2e-2) and 2.002 (1.5e-2), against 2.069-2.077 for batch 8 at 6.6-7.4 MB. Longer windows (T=512,
# 1024 at the same bytes a step), P=8, narrower or shallower shapes did no better, 16 MB of distinct
# training bytes did worse than 4 MB (9 MB seen: 2.064 against 2.027), and fp32 stays: bf16 autocast
# ran ~9x slower on this AVX2 CPU. `time_budget_cpu` (training seconds, evaluation excluded) is only
# a safety net: at 37.4k bytes/s the 1,700 steps take ~186 s; a machine too slow to fit them anneals
# by the clock and stops there (see `lr_at`), so the whole command stays under 4 minutes.
DEMO = dict(
    seq_len=256, batch_size=16, steps=1700, lr=1.2e-2, min_lr_ratio=0.1, warmup=50, weight_decay=0.1,
    patch_size=4, d_global=32, d_local=64, g_layers=4, l_layers=2, g_heads=4, l_heads=4,
    time_budget_cpu=215, eval_every=850,
)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the last checkpoint written is left as it was."""


class UsageError(ValueError):
    """Arguments that only turn out unusable at run time (no CUDA, no tensorboard, a mismatched resume)."""


# ----------------------------------------------------------------------------------------------
# the pieces: model, optimizer, schedule, clock

# ids of the models `megabyte train` builds: the 256 byte values, 256 (unused), pad 257 and eos 258,
# rounded up to a multiple of 8. The original's 512 ids cost the head and its softmax twice the
# work for ids that never occur: the head + cross entropy of a demo step (2048 x 64 -> V, fwd+bwd,
# 1 thread) measured 55 ms at V=512 and 30 ms at V=264 on the loaded 2-core machine.
TRAIN_VOCAB = 264

# the classic model flags: (argument, config field)
CLASSIC_ARGS = (("patch_size", "P"), ("d_global", "D_G"), ("d_local", "D_L"), ("g_heads", "g_nheads"),
                ("g_layers", "g_nlayers"), ("l_heads", "l_nheads"), ("l_layers", "l_nlayers"))
STAGE_ARGS = (("patch_sizes", "patch_sizes"), ("dims", "dims"), ("layers", "nlayers"), ("heads", "nheads"))


def model_config(args, extra: dict | None = None) -> MegabyteConfig:
    """The config the model arguments describe: the classic flags (``--patch-size``, ``--d-*``,
    ``--*-layers``, ``--*-heads``; a missing one takes the demo value) or, N stages, the comma
    lists ``--patch-sizes``, ``--dims``, ``--layers``, ``--heads`` (the classic flags given with
    them must agree, as in :class:`MegabyteConfig`); ``--seq-len`` is T_MAX."""
    stages = {field: getattr(args, a, None) for a, field in STAGE_ARGS if getattr(args, a, None) is not None}
    classic = {field: getattr(args, a, None) for a, field in CLASSIC_ARGS}
    if stages:  # only the classic flags given explicitly
        classic = {k: v for k, v in classic.items() if v is not None}
    else:
        classic = {k: DEMO[a] if classic[k] is None else classic[k] for a, k in CLASSIC_ARGS}
    return MegabyteConfig(
        V=TRAIN_VOCAB, T_MAX=args.seq_len, initializer_range=0.02, pad_id=257, eos_id=258, extra=extra or {},
        **classic, **stages, **({"backend": args.backend} if getattr(args, "backend", None) else {}),
    )


def build_model(args, extra: dict) -> Megabyte:
    """The model the model arguments and ``--seq-len`` describe (:func:`model_config`); ``extra``
    is stored in its config (the data it was trained on)."""
    return Megabyte(model_config(args, extra))


def init_head_bias(model: Megabyte, train_bytes: torch.Tensor) -> None:
    """Start the head at the training bytes' order-0 model: ``b_v = log((n_v + 1) / (N + V))``
    (add-one smoothed counts n_v of the N training bytes; ids >= 256 count 0). A fresh model
    predicts ~uniformly over V ids (log2 264 = 8.04 bits/byte); from here it starts at the order-0
    entropy (~4.6 on the demo corpus) instead of spending its first ~100 steps learning it."""
    V = model.config.V
    counts = torch.zeros(V, dtype=torch.float64)
    counts[:256] = baselines.byte_counts(train_bytes)[:V]
    with torch.no_grad():
        model.to_logits.bias.copy_(torch.log((counts + 1) / (counts.sum() + V)).to(model.to_logits.bias))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model, args) -> torch.optim.AdamW:
    """AdamW; weight decay on the weights of Linear layers only (not on biases, norms, tables)."""
    linear_w = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in linear_w else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.98), eps=1e-8)


def lr_at(step: int, train_s: float, args, budget: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to ``min_lr_ratio * lr`` over the steps.

    The run is budgeted in steps; the time ``budget`` (seconds) is a safety net. Only on a machine
    so slow that the steps would not fit in it (the pace so far, ``train_s / step``, projects past
    ``budget``) does the cosine run over training time / ``budget`` instead, when that is further
    along: such a run anneals and stops in time. On a machine that keeps pace the schedule, and
    so the trained model, does not depend on its speed or load.
    """
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    if step > 0 and train_s / step * args.steps > budget:
        t = max(t, train_s / budget)
    lo = args.lr * args.min_lr_ratio
    return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * min(1.0, t)))


class Clock:
    """Training seconds: this session's wall time less evaluation, plus earlier sessions' (resume).

    The schedule and the time budget follow :meth:`total`, so evaluating never eats the budget.
    """

    def __init__(self, before: float = 0.0):
        self.before, self.t0, self.paused_s = before, time.perf_counter(), 0.0

    def session(self) -> float:
        return time.perf_counter() - self.t0 - self.paused_s

    def total(self) -> float:
        return self.before + self.session()

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t


@dataclass
class Run:
    """One training run on one rank: what the set-up builds, the loop uses and a save writes."""
    args: argparse.Namespace
    say: Callable  # print on rank 0, nothing elsewhere
    dist: Dist
    out_dir: Path
    corpus: Corpus
    base: dict  # the baselines on the held-out bytes
    raw: Megabyte  # the model itself (sharded in place under FSDP2): evaluation, sampling, saving
    model: torch.nn.Module  # what a training step calls: ``raw``, or its DDP wrapper
    opt: torch.optim.Optimizer
    sampler: BatchSampler
    autocast: contextlib.AbstractContextManager  # bf16 autocast, or a no-op
    fsdp: bool
    accum: int  # micro-batches per optimizer step
    shards: CpuShards | None  # a CPU batch split into shards that run in threads (None: not split)
    shard_threads: int  # intra-op threads of each shard
    loss_chunk: int | None
    save_every: int
    budget: float  # training seconds allowed (inf: no budget)
    log: TrainLog
    progress: Progress
    t_start: float  # perf_counter() when the command started
    clock: Clock
    step: int = 0  # optimizer steps done
    first_step: int = 0  # the step this session started from (> 0 when resumed)
    ema: float | None = None  # smoothed loss of the progress line (saved: a resumed line goes on from it)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def bytes_per_step(self) -> int:
        return self.args.batch_size * self.args.seq_len * self.accum * self.dist.world

    def save(self, train_s: float) -> None:
        """The checkpoint and ``train_state.pt`` at the current step (``megabyte.train_state``)."""
        train_state.save(self.out_dir, step=self.step, train_s=train_s, ema=self.ema, model=self.raw,
                         opt=self.opt, sampler=self.sampler, dist=self.dist, fsdp=self.fsdp, args=self.args)

    def evaluate(self) -> float:
        """Held-out bits per byte now (the clock paused), logged."""
        with self.clock.paused():
            bpb = evaluate(self.raw, self.corpus.heldout, self.args.seq_len, self.args.eval_batch_size,
                           self.device, autocast=self.autocast, loss_chunk=self.loss_chunk)
        self.log.write({"kind": "eval", "step": self.step, "heldout_bpb": bpb})
        return bpb


# ----------------------------------------------------------------------------------------------
# set-up

def _start_processes(args) -> tuple[Dist, Callable]:
    """Threads, device, ranks; the run-time checks of ``--device`` and ``--fsdp``."""
    setup_threads(args.threads)
    dist = Dist(args.device)
    if dist.device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    if getattr(args, "fsdp", False) and not dist.enabled:
        raise UsageError("--fsdp shards the model over the ranks of a torchrun launch "
                         "(torchrun --nproc-per-node N -m megabyte train --fsdp ...)")
    return dist, (print if dist.main else (lambda *a, **k: None))


def _precision(args, device: torch.device) -> tuple[str, contextlib.AbstractContextManager]:
    """``--precision``: bf16 autocast, or plain fp32; ``auto`` is bf16 on a CUDA GPU that has it."""
    precision = getattr(args, "precision", "auto") or "auto"
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    return precision, autocast


def _cpu_shards(args, dist: Dist, precision: str) -> tuple[CpuShards | None, int]:
    """``--cpu-shards`` (default: :func:`auto_cpu_shards` on a single-process fp32 CPU run, else 1)
    and the intra-op threads of each shard: the threads picked, shared among the shards.

    The shards run ``--threads`` at a time, by default one per core even when other work keeps
    cores busy: a shard is one thread that shares a busy core by turns, where the intra-op threads
    of one op spin at its barrier until the slowest arrives (why :func:`default_threads` counts the
    busy cores)."""
    n = getattr(args, "cpu_shards", None)
    eligible = dist.device.type == "cpu" and not dist.enabled and precision == "fp32"
    if n is None:
        n = auto_cpu_shards(args.batch_size, machine_cores()) if eligible else 1
    if n > 1 and not eligible:
        raise UsageError(f"--cpu-shards {n}: shards are for a single-process CPU run in fp32 "
                         f"(this run: device {dist.device}, {dist.world} rank(s), {precision})")
    if args.batch_size % n:
        raise UsageError(f"--cpu-shards {n} must divide --batch-size {args.batch_size}")
    if n == 1:
        return None, torch.get_num_threads()
    return CpuShards(n, workers=args.threads or machine_cores()), max(1, torch.get_num_threads() // n)


def _tensorboard(args, out_dir: Path, main: bool):
    """A TensorBoard ``SummaryWriter`` into OUT/tensorboard with ``--tensorboard`` (rank 0), else None."""
    if not (getattr(args, "tensorboard", False) and main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UsageError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}") from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _load_data(args, say) -> tuple[Corpus, dict]:
    """The corpus, split into training and held-out bytes, and the baselines on the held-out ones."""
    corpus = load_corpus(args.data, max_bytes=args.max_bytes, eval_bytes=args.eval_bytes,
                         heldout_frac=args.heldout_frac, min_len=args.seq_len)
    say(f"data: {corpus.describe()}")
    if corpus.skipped:
        say(f"data: skipped {len(corpus.skipped)} unreadable file(s)")
    base = baselines.all_baselines(corpus.train, corpus.heldout)
    say(f"baselines on the {len(corpus.heldout):,} held-out bytes: order-0 {base['order0_bpb']:.3f} bpb "
        f"(cross entropy under the training bytes' frequencies, add-one smoothed), "
        f"gzip -9 {base['gzip_bpb']:.3f}, lzma -9e {base['lzma_bpb']:.3f}")
    return corpus, base


def _describe(args, raw, dist: Dist, fsdp: bool, accum: int, precision: str, shards: CpuShards | None) -> str:
    """The one-line summary of the model and the run printed before training."""
    c = raw.config
    if c.n_stages == 2:
        shape = (f"P={c.P} D_G={c.D_G} D_L={c.D_L} global {c.g_nlayers}x{c.g_nheads}h "
                 f"local {c.l_nlayers}x{c.l_nheads}h")
    else:
        shape = (f"{c.n_stages} stages, patch sizes {','.join(map(str, c.patch_sizes))}, dims "
                 f"{','.join(map(str, c.dims))}, layers x heads "
                 f"{' '.join(f'{n}x{h}h' for n, h in zip(c.nlayers, c.nheads))}")
    return (f"model: {n_params(raw) / 1e6:.2f}M parameters, {shape}, "
            f"T={args.seq_len}, batch {args.batch_size}, {args.steps} steps, lr {args.lr:g}, "
            f"device {dist.device}, backend {getattr(raw, 'backend', raw.config.backend)}, "
            f"{torch.get_num_threads()} threads"
            + (f" ({shards.n} batch shards, {shards.workers} at a time)" if shards else "")
            + (f", {dist.world} ranks ({'FSDP2' if fsdp else 'DDP'})" if dist.enabled else "")
            + (f", grad accumulation {accum}" if accum > 1 else "") + (", bf16 autocast" if precision == "bf16" else ""))


def setup(args, t_start: float) -> Run:
    """Everything before the first step, in order: processes, the state to resume from, data and
    baselines, model, optimizer, schedule, batch sampler, the restored state, log and progress."""
    dist, say = _start_processes(args)
    torch.manual_seed(args.seed)  # the model's initial weights
    fsdp, accum = bool(getattr(args, "fsdp", False)), getattr(args, "grad_accum", 1) or 1
    precision, autocast = _precision(args, dist.device)
    shards, shard_threads = _cpu_shards(args, dist, precision)
    out_dir = Path(args.out)
    tb = _tensorboard(args, out_dir, dist.main)
    state, state_path = train_state.find(args, out_dir, say)  # before anything is written to --out
    corpus, base = _load_data(args, say)

    data_spec = {  # stored in the config: `megabyte eval` scores the same held-out bytes by default
        "data": None if args.data is None else str(Path(args.data).resolve()),
        "max_bytes": args.max_bytes, "eval_bytes": args.eval_bytes, "heldout_frac": args.heldout_frac,
        "seq_len": args.seq_len,
    }
    raw = build_model(args, extra={"train": data_spec}).to(dist.device)
    if state is None and getattr(args, "unigram_bias", True):
        init_head_bias(raw, corpus.train)
    if getattr(args, "checkpointing", False):
        raw.set_checkpointing(True, True)
    raw.train()
    if state is not None:
        train_state.check_same_model(state, state_path, raw.config.to_dict())
    say(_describe(args, raw, dist, fsdp, accum, precision, shards))
    model = wrap(raw, dist, fsdp)
    opt = make_optimizer(raw, args)

    if args.time_budget is None:  # the demo's safety net on slow CPUs; a GPU run is never cut
        args.time_budget = DEMO["time_budget_cpu"] if dist.device.type == "cpu" else 0
    sampler = BatchSampler(corpus.train, args.seq_len, args.batch_size, seed=args.seed,
                           rank=dist.rank, world=dist.world)
    step, train_s, ema = 0, 0.0, None
    if state is not None:
        step, train_s, ema = train_state.restore(state, raw, opt, sampler, dist.device, fsdp)
        say(f"resume: {state_path} at step {step}")

    log = TrainLog(out_dir / "train_log.jsonl", enabled=dist.main, tensorboard=tb,
                   resumed_at=step if state is not None else None)
    log.write({"kind": "run" if state is None else "resume", "step": step, "argv": getattr(args, "argv", None),
               "args": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
               "data": corpus.describe(), "baselines": base, "n_params": n_params(raw),
               "torch": torch.__version__, "device": str(dist.device), "threads": torch.get_num_threads(),
               "cpu_shards": shards.n if shards else 1, "world": dist.world, "precision": precision})
    return Run(args=args, say=say, dist=dist, out_dir=out_dir, corpus=corpus, base=base, raw=raw, model=model,
               opt=opt, sampler=sampler, autocast=autocast, fsdp=fsdp, accum=accum, shards=shards,
               shard_threads=shard_threads,
               loss_chunk=getattr(args, "loss_chunk", 0) or None, save_every=getattr(args, "save_every", 0) or 0,
               budget=args.time_budget if args.time_budget > 0 else math.inf, log=log,
               progress=Progress(args.steps, args.log_every, enabled=dist.main), t_start=t_start,
               clock=Clock(before=train_s), step=step, first_step=step, ema=ema)


# ----------------------------------------------------------------------------------------------
# the loop

def train_step(run: Run) -> tuple[float, float]:
    """One optimizer step over ``accum`` micro-batches: (loss, gradient norm before clipping).

    The loss is the mean over the micro-batches and the ranks. A non-finite one raises
    :class:`TrainingError` before the parameters change.
    """
    model, accum = run.model, run.accum
    fwd_kw = {"loss_chunk": run.loss_chunk} if run.loss_chunk else {}
    run.opt.zero_grad(set_to_none=True)
    loss_sum = None
    for micro in range(accum):
        ids = run.sampler().to(run.device)
        if run.shards is not None:  # a single CPU process in fp32 (_cpu_shards)
            with op_threads(run.shard_threads):
                loss = run.shards.backward([p for p in model.parameters() if p.requires_grad], ids,
                                           lambda x: model(x, return_loss=True, **fwd_kw).loss, scale=1.0 / accum)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            continue
        sync = contextlib.nullcontext()
        if run.dist.enabled and not run.fsdp and micro < accum - 1:
            sync = model.no_sync()  # DDP: all-reduce the gradients once, on the last micro-batch
        with sync:
            with run.autocast:
                loss = model(ids, return_loss=True, **fwd_kw).loss
            (loss / accum if accum > 1 else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    lv = run.dist.mean(float(loss_sum) / accum)
    if not math.isfinite(lv):
        raise TrainingError(f"loss became {lv} at step {run.step + 1}; try a lower --lr (the parameters were not "
                            f"updated; the last checkpoint in {run.out_dir}, if any, is intact)")
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), run.args.grad_clip))
    run.opt.step()
    return lv, gnorm


def train(run: Run, stop: StopSignals) -> None:
    """Steps from ``run.step`` to ``--steps``: log, evaluate and save on their schedules.

    Ends early when the time budget is spent, or on a signal (the state saved, then
    :class:`TrainingInterrupted`). Every rank takes every decision alike (``dist.any``).
    """
    args, clock, start = run.args, run.clock, run.first_step
    loss_sum, loss_n, heldout = 0.0, 0, None  # training losses since the last log record
    for step in range(start, args.steps):
        lr = lr_at(step, clock.total(), args, run.budget)
        for g in run.opt.param_groups:
            g["lr"] = lr
        loss, gnorm = train_step(run)
        done = run.step = step + 1
        run.ema = loss if run.ema is None else 0.9 * run.ema + 0.1 * loss
        loss_sum, loss_n = loss_sum + loss, loss_n + 1
        rate = (done - start) * run.bytes_per_step / max(clock.session(), 1e-9)
        eta = min((args.steps - done) * run.bytes_per_step / max(rate, 1e-9), max(0.0, run.budget - clock.total()))
        out_of_time = run.dist.any(clock.total() >= run.budget and done < args.steps)
        if done % args.log_every == 0 or done == args.steps or done == start + 1 or out_of_time:
            run.log.write({"kind": "train", "step": done, "loss": loss_sum / loss_n, "bpb": loss_sum / loss_n / LN2,
                           "lr": lr, "grad_norm": gnorm, "bytes_per_s": rate,
                           "elapsed_s": time.perf_counter() - run.t_start})
            loss_sum, loss_n = 0.0, 0
        run.progress.update(done, run.ema, rate, eta, heldout)
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            heldout = run.evaluate()
        stopping = run.dist.any(stop.signum is not None)
        if stopping or (run.save_every and done % run.save_every == 0 and done != args.steps):
            run.save(clock.total())
        if stopping:
            run.progress.close()
            run.log.write({"kind": "interrupted", "step": done, "signal": stop.signum})
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, done, run.out_dir)
        if out_of_time:
            run.progress.message(f"time budget of {args.time_budget:g} s reached: stopping at step {done} of "
                                 f"{args.steps} (the cosine schedule followed the time; --time-budget 0 turns it off)")
            break


# ----------------------------------------------------------------------------------------------
# after the loop: report

def report(run: Run, heldout_bpb: float, train_s: float) -> dict:
    """The loss plot, the sample, the final log record and the results table; returns the record."""
    args, dist, steps = run.args, run.dist, run.step
    seen = steps * run.bytes_per_step
    train_rate = (steps - run.first_step) * run.bytes_per_step / max(train_s - run.clock.before, 1e-9)  # this session
    if dist.main:
        plot_loss(run.log.records, run.base, run.out_dir / "loss.png")
    text = b""
    if args.sample_bytes > 0 and dist.main and not run.fsdp:
        prompt = args.prompt.encode("utf-8")
        text = sample(run.raw, prompt, args.sample_bytes, args.temperature, context=args.seq_len,
                      seed=args.seed, device=run.device)
        print(f"\n--- sample ({args.sample_bytes} bytes, temperature {args.temperature}, "
              f"prompt {args.prompt!r}) ---")
        print((prompt + text).decode("utf-8", errors="replace"))
        print("--- end of sample ---\n")
    wall = time.perf_counter() - run.t_start
    final = {"kind": "final", "heldout_bpb": heldout_bpb, **run.base, "wall_s": wall, "train_s": train_s,
             "train_bytes_per_s": train_rate, "heldout_bytes": len(run.corpus.heldout), "steps": steps,
             "train_bytes_seen": seen, "sample": text.decode("utf-8", "replace")}
    run.log.write(final)
    run.log.close()
    run.say(f"held-out bits per byte (log2) on the same {len(run.corpus.heldout):,} bytes:")
    if dist.main:
        print_table([
            ("MEGABYTE (this run)", f"{heldout_bpb:.3f} bpb"),
            *baseline_rows(run.base),
            ("wall time", f"{wall:.1f} s  (training {train_s:.1f} s)"),
            ("training throughput", f"{fmt_rate(train_rate)} bytes/s  ({steps} steps, {seen:,} bytes seen)"),
            ("checkpoint", f"{run.out_dir}  (+ train_log.jsonl, loss.png, train_state.pt)"),
        ])
    return final


def run_train(args) -> dict:
    """Everything ``megabyte train`` does; returns the final figures.

    Under ``torchrun`` (WORLD_SIZE > 1) every rank runs all of it on its own shard of each batch
    (DDP, or FSDP2 with ``--fsdp``); only rank 0 prints and writes files.
    """
    run = setup(args, t_start=time.perf_counter())
    try:
        with StopSignals() as stop:
            train(run, stop)
            run.progress.close()
            train_s = run.clock.total()
            heldout_bpb = run.evaluate()
            run.save(train_s)
        return report(run, heldout_bpb, train_s)
    finally:  # also on an error or a signal: end the progress line, keep what was logged
        run.progress.close()
        run.log.close()
        if run.shards is not None:
            run.shards.close()
