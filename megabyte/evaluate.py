"""Held-out bits per byte: the plain score, sliding-window and strided inference, and ``megabyte eval``.

Bits per byte of the model = mean cross entropy in nats over every held-out byte / ln 2, with the
held-out bytes cut into consecutive non-overlapping windows of ``seq_len`` (each window starts
without context), the same bytes the baselines are computed on (:func:`evaluate`; the training
loop calls it every ``--eval-every`` steps and at the end).

Strided evaluation (MEGABYTE paper, §4.3 / Table 11): two passes offset by P/2. Within a patch
MEGABYTE predicts the first bytes better than the last ones. Strided inference scores the
held-out bytes twice, with windows starting at byte 0 (pass A, the windows of :func:`evaluate`)
and with windows starting at byte ``P // 2`` (pass B), and takes each byte's loss from the pass
in which it sits earlier in its patch: for even P and windows that are a multiple of P, the
first half of every patch comes from pass A and the second half from pass B. The first
``P // 2`` bytes, which pass B does not cover, come from pass A.

Each pass is ordinary causal scoring of windows, so every byte's loss still depends only on the
bytes before it (and itself, the target); choosing per byte between two such passes keeps that
(``tests/model/test_generation_cli.py`` checks it by perturbing later bytes).

The four methods of the paper's Table 11 (``megabyte eval --method basic|sliding|strided|both|all``)
all score a *plan*: a list of :class:`Window` s, each one model input ``data[start:end]`` of which
only ``data[score_from:end]`` is scored (the bytes before are context). :func:`window_plan` builds
it and every method scores each byte exactly once (``tests/model/test_evaluate.py``):

- **basic**: disjoint windows of ``seq_len`` from byte 0 (``stride = seq_len``), each scoring all
  its bytes; the last window is the remainder.
- **sliding**: windows of ``seq_len`` starting every ``stride`` bytes; the first scores all of its
  bytes, every later one only its last ``stride`` bytes (the last window, cut at the end of the
  data, the bytes the previous one did not reach). Each byte is so scored in the earliest window
  that contains it, i.e. with the longest context a window gives it; ``stride = seq_len`` is basic.
- **strided**: basic at offset 0 (pass A) and at offset ``P // 2`` (pass B), each byte from the
  pass where it sits earlier in its patch (above).
- **both**: strided with sliding passes: sliding at offset 0 and at offset ``P // 2``, each byte
  from the pass where it sits earlier in its patch, ties and the first ``P // 2`` bytes from A.

Cost: one *window* is one sequence through the model (the paper's unit: sliding with
``stride = seq_len / 2`` and strided cost about twice basic, both about four times); windows of
the same length are batched ``batch_size`` to a model call.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import baselines
from .checkpoint import CheckpointError
from .data import eval_windows, load_corpus
from .distributed import pick_device, setup_threads
from .model import Megabyte
from .reporting import baseline_rows, print_table

LN2 = math.log(2.0)


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


METHODS = ("basic", "sliding", "strided", "both")


class EvalArgumentError(ValueError):
    """An evaluation argument that cannot work (``megabyte eval`` prints it and exits with 2)."""


@dataclass(frozen=True)
class Window:
    """One model input ``data[start:end]`` that scores ``data[score_from:end]`` (the bytes from
    ``start`` to ``score_from`` are context only)."""
    start: int
    end: int
    score_from: int


@dataclass
class Scores:
    """Per-byte result of scoring a plan over ``n`` bytes.

    ``nll``: (n,) float64 nats, NaN where not scored; ``slot``: (n,) int64, the byte's position in
    its patch in the window that scored it (-1 where not scored); ``count``: (n,) int64, how many
    windows scored the byte (1 everywhere for a valid plan); ``windows``/``calls``: sequences
    through the model and model calls (batches) it took."""
    nll: torch.Tensor
    slot: torch.Tensor
    count: torch.Tensor
    windows: int
    calls: int

    def bpb(self) -> float:
        """Bits per byte over the scored bytes."""
        return float(self.nll.mean()) / LN2


def check_stride(stride: int, seq_len: int) -> None:
    """``0 < stride <= seq_len`` or an :class:`EvalArgumentError` naming ``--stride``."""
    if not 0 < stride <= seq_len:
        raise EvalArgumentError(f"--stride must be between 1 and the window (--seq-len {seq_len}) bytes, got {stride}")


def default_stride(seq_len: int, P: int) -> int:
    """Half the window, rounded down to a multiple of the patch size ``P`` (at least ``P``, at most
    ``seq_len``).

    The model accepts a window starting anywhere; a multiple of ``P`` makes every window start on
    a patch boundary of the data, so each byte keeps the slot in its patch it has in basic and
    sliding changes only how much context a byte gets. Where a byte sits in its patch is what
    strided changes, so the two effects stay apart and "both" combines them."""
    return min(seq_len, max(P, (seq_len // 2) // P * P))


def window_plan(n: int, seq_len: int, stride: int, offset: int = 0) -> list[Window]:
    """The windows that score ``data[offset:n]``, each byte exactly once.

    Windows of ``seq_len`` bytes start at ``offset, offset + stride, ...`` (the last one cut at
    ``n``); the first scores all its bytes, each later one the bytes past the end of the previous
    one (its last ``stride`` bytes). ``stride = seq_len``: consecutive disjoint windows, exactly
    :func:`megabyte.data.eval_windows`. Empty when ``offset >= n``."""
    check_stride(stride, seq_len)
    plan, start, scored_to = [], offset, offset
    while scored_to < n:
        end = min(start + seq_len, n)
        plan.append(Window(start, end, scored_to))
        start, scored_to = start + stride, end
    return plan


def _batches(plan: list[Window], batch_size: int):
    """Runs of consecutive windows of the same length, at most ``batch_size`` each (for a basic
    plan the same batches as :func:`megabyte.data.eval_windows`, hence bit-identical losses)."""
    batch: list[Window] = []
    for w in plan:
        if batch and (len(batch) == batch_size or w.end - w.start != batch[0].end - batch[0].start):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


@torch.no_grad()
def score_plan(model, data: torch.Tensor, plan: list[Window], batch_size: int, device="cpu") -> Scores:
    """Per-byte loss of ``data`` (1-D bytes) scored by the windows of ``plan`` (see :class:`Scores`).

    Each window is an independent causal sequence (``model(ids)`` on ``(B, L)`` ids, logits
    ``(B, L, V)``; position j predicts byte j from bytes < j of the same window)."""
    n, P = len(data), model.config.P
    nll = torch.full((n,), float("nan"), dtype=torch.float64)
    slot = torch.full((n,), -1, dtype=torch.int64)
    count = torch.zeros(n, dtype=torch.int64)
    calls = 0
    was = model.training
    model.eval()
    try:
        for batch in _batches(plan, batch_size):
            ids = torch.stack([data[w.start:w.end] for w in batch]).long().to(device)
            logits = model(ids).lm_logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
            loss = loss.view(ids.shape).double().cpu()
            calls += 1
            for row, w in zip(loss, batch):
                lo = w.score_from - w.start
                nll[w.score_from:w.end] = row[lo:]
                slot[w.score_from:w.end] = torch.arange(lo, w.end - w.start) % P
                count[w.score_from:w.end] += 1
    finally:
        model.train(was)
    return Scores(nll, slot, count, len(plan), calls)


def _earlier_in_patch(a: Scores, b: Scores) -> Scores:
    """Each byte from pass ``b`` where ``b`` scored it at a smaller slot of its patch than ``a``,
    else from ``a`` (ties, and bytes ``b`` did not score)."""
    use_b = (b.count > 0) & (b.slot < a.slot)
    return Scores(torch.where(use_b, b.nll, a.nll), torch.where(use_b, b.slot, a.slot),
                  torch.where(use_b, b.count, a.count), a.windows + b.windows, a.calls + b.calls)


def score_method(model, data: torch.Tensor, method: str, seq_len: int, batch_size: int, device="cpu",
                 stride: int | None = None) -> Scores:
    """Per-byte scores of ``data`` by one of :data:`METHODS` (module docstring) with windows of
    ``seq_len``; ``stride`` (sliding and both; default :func:`default_stride`) is ignored by basic
    and strided, which use ``stride = seq_len``."""
    if method not in METHODS:
        raise EvalArgumentError(f"--method must be one of {', '.join(METHODS)} or all, got {method!r}")
    P = model.config.P
    if method in ("basic", "strided"):
        stride = seq_len
    elif stride is None:
        stride = default_stride(seq_len, P)
    n, off = len(data), P // 2
    a = score_plan(model, data, window_plan(n, seq_len, stride, 0), batch_size, device)
    if method in ("basic", "sliding") or off == 0 or n <= off:
        return a
    b = score_plan(model, data, window_plan(n, seq_len, stride, off), batch_size, device)
    return _earlier_in_patch(a, b)


def per_byte_nll(model, data: torch.Tensor, seq_len: int, batch_size: int, device="cpu",
                 offset: int = 0) -> torch.Tensor:
    """Loss (nats, float64) of every byte of ``data`` scored in consecutive windows of ``seq_len``
    starting at ``offset`` (``megabyte.data.eval_windows`` of ``data[offset:]``); NaN before ``offset``."""
    return score_plan(model, data, window_plan(len(data), seq_len, seq_len, offset), batch_size, device).nll


def strided_nll(model, data: torch.Tensor, seq_len: int, batch_size: int, device="cpu") -> torch.Tensor:
    """Per-byte loss (nats, float64) by strided inference: each byte from the pass (offset 0 or
    P // 2) in which its slot inside the patch is smaller; ties and bytes before P // 2 from pass A."""
    return score_method(model, data, "strided", seq_len, batch_size, device).nll


def evaluate_strided(model, data: torch.Tensor, seq_len: int, batch_size: int, device="cpu") -> float:
    """Held-out bits per byte with strided inference (same arguments as :func:`evaluate`)."""
    nll = strided_nll(model, data, seq_len, batch_size, device)
    return float(nll.mean()) / LN2


# ----------------------------------------------------------------------------------------------
# `megabyte eval`


def _load_checkpoint(args, device: torch.device) -> Megabyte:
    """``--checkpoint``'s model on ``device``; a clear error for a folder that is not one."""
    ckpt_dir = Path(args.checkpoint)
    if not (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {str(ckpt_dir)!r}: no config.json there (not a checkpoint folder)")
    try:
        return Megabyte.from_pretrained(str(ckpt_dir), backend=args.backend).to(device)
    except ValueError as e:  # truncated / corrupted weights or config: a clear message, no traceback
        raise CheckpointError(str(e)) from None


def _heldout_of(args, spec: dict):
    """The held-out bytes to score: ``--data`` and its options, else those the checkpoint was
    trained on (``config.extra["train"]``, written by ``megabyte train``)."""
    data = args.data if args.data is not None else spec.get("data")
    if data is not None and args.data is None and not Path(data).exists():
        raise FileNotFoundError(f"the checkpoint was trained on {data!r}, which no longer exists; pass --data")
    eval_bytes = args.eval_bytes or spec.get("eval_bytes") or 64 * 1024
    return load_corpus(data, max_bytes=args.max_bytes or spec.get("max_bytes") or 4 * 1024 * 1024,
                       eval_bytes=eval_bytes, heldout_frac=args.heldout_frac or spec.get("heldout_frac") or 0.05,
                       min_len=1)


def eval_methods(args) -> tuple[str, ...]:
    """The methods ``megabyte eval`` runs: ``--method`` (``all``: the four of :data:`METHODS`),
    ``--strided`` an alias of ``--method strided``, default basic. Checks ``--stride`` where it
    can before the checkpoint is read (``> 0``, and only with a method that slides)."""
    method = getattr(args, "method", None)
    if getattr(args, "strided", False):
        if method not in (None, "strided"):
            raise EvalArgumentError(f"--strided is --method strided; it contradicts --method {method}")
        method = "strided"
    method = method or "basic"
    if method != "all" and method not in METHODS:
        raise EvalArgumentError(f"--method must be one of {', '.join(METHODS)} or all, got {method!r}")
    stride = getattr(args, "stride", None)
    if stride is not None:
        if stride <= 0:
            raise EvalArgumentError(f"--stride must be >= 1 (bytes), got {stride}")
        if method in ("basic", "strided"):
            raise EvalArgumentError(f"--stride applies to --method sliding, both or all, not {method}")
    return METHODS if method == "all" else (method,)


def _how(method: str, seq_len: int, stride: int, P: int) -> str:
    """One phrase saying how ``method`` cut the bytes into windows (for the report)."""
    slide = f"sliding windows of {seq_len} every {stride} bytes"
    strided = f"strided (two passes offset by P/2={P // 2})"
    return {"basic": f"disjoint windows of {seq_len}", "sliding": slide, "strided": strided,
            "both": f"{slide}, {strided}"}[method]


def _print_methods(results: dict, seq_len: int, stride: int, P: int) -> None:
    """The Table 11 comparison: one row per method, bits per byte and forward passes."""
    rows = [("method", "bpb", "windows", "model calls", "seconds", "how")]
    for m, r in results.items():
        rows.append((m, f"{r['bpb']:.4f}", str(r["windows"]), str(r["calls"]), f"{r['seconds']:.1f}",
                     _how(m, seq_len, stride, P)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:5], widths[1:])] + [row[5]]
        print("  " + "  ".join(cells))


def run_eval(args) -> dict:
    """``megabyte eval``: held-out bits per byte of a checkpoint by one method or all four of the
    paper's Table 11, on the same bytes, with the forward passes each cost (and the baselines)."""
    t_start = time.perf_counter()
    methods = eval_methods(args)
    setup_threads(args.threads)
    device = pick_device(args.device)
    model = _load_checkpoint(args, device)
    spec = dict((model.config.extra or {}).get("train", {}))
    seq_len = min(args.seq_len or spec.get("seq_len") or model.config.T_MAX, model.config.T_MAX)
    P = model.config.P
    stride = getattr(args, "stride", None) or default_stride(seq_len, P)
    check_stride(stride, seq_len)
    corpus = _heldout_of(args, spec)
    print(f"data: {corpus.describe()}")
    results = {}
    for m in methods:
        t0 = time.perf_counter()
        sc = score_method(model, corpus.heldout, m, seq_len, args.eval_batch_size, device, stride=stride)
        results[m] = {"bpb": sc.bpb(), "windows": sc.windows, "calls": sc.calls,
                      "seconds": time.perf_counter() - t0}
    base = baselines.all_baselines(corpus.train, corpus.heldout)
    n = len(corpus.heldout)
    if len(methods) == 1:
        (m, r), = results.items()
        how = "" if m == "basic" else ", " + _how(m, seq_len, stride, P)
        print(f"held-out bits per byte (log2) on the same {n:,} bytes, windows of {seq_len}{how}:")
        print_table([
            ("MEGABYTE", f"{r['bpb']:.3f} bpb  ({Path(args.checkpoint)})"),
            ("forward passes", f"{r['windows']} windows of <= {seq_len} bytes in {r['calls']} model calls"),
            *baseline_rows(base),
            ("wall time", f"{time.perf_counter() - t_start:.1f} s"),
        ])
    else:
        print(f"held-out bits per byte (log2) of {Path(args.checkpoint)} on the same {n:,} bytes, "
              f"windows of {seq_len}, P={P} (MEGABYTE paper, Table 11):")
        _print_methods(results, seq_len, stride, P)
        print("baselines on the same bytes:")
        print_table([*baseline_rows(base), ("wall time", f"{time.perf_counter() - t_start:.1f} s")])
    return {"heldout_bpb": results[methods[0]]["bpb"], "methods": results, **base}
