"""What a training run tells the user while it runs and after: progress line, log, plot, tables.

- :class:`Progress`: the progress line on stderr, drawn by ``tqdm`` in place on a terminal; when
  stderr is a file or a pipe (a batch job's log), a new line every ``--log-every`` steps instead,
  in the same format, so logs stay readable.
- :class:`TrainLog`: ``train_log.jsonl``, one JSON record a line, flushed as written; optionally
  the same figures as TensorBoard scalars.
- :func:`plot_loss`: ``loss.png``, training and held-out bits per byte against the baselines.
- :func:`print_table`: the aligned two-column results tables of ``megabyte train`` and ``eval``.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

LN2 = math.log(2.0)

# Today's fields, in today's order: step, loss (nats) and bpb of the smoothed training loss,
# training bytes per second, the ETA and, once there is one, the last held-out bpb.
BAR_FORMAT = ("[{bar:20}] step {n_fmt}/{total_fmt} | loss {loss:.4f} | bpb {bpb:.3f} | "
              "{bytes_rate} B/s | ETA {eta}{heldout}")
BAR_CHARS = ".#"  # tqdm's ascii charset: empty, full


def fmt_time(s: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt_rate(r: float) -> str:
    """``1.23M``, ``45.6k`` or ``789``: a rate with three significant figures at most."""
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.1f}k" if r >= 1e3 else f"{r:.0f}"


class _Bar(tqdm):
    """tqdm whose ``bar_format`` can name the training figures in ``fields`` (tqdm's documented
    way to add format fields is to extend ``format_dict``)."""

    def __init__(self, *args, fields: dict, **kwargs):
        self.fields = fields  # before tqdm's __init__, which draws the bar once
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self):
        return {**super().format_dict, **self.fields}


class Progress:
    """The training progress line on ``stream`` (stderr).

    On a terminal tqdm redraws it in place (sized to the terminal, :meth:`message` lines printed
    above it); elsewhere it is written as a new line every ``every`` steps and at the last step.
    The ETA is the caller's (steps left at the measured rate, capped by the time budget left),
    not tqdm's own, which knows nothing of the budget. ``enabled=False`` (ranks other than 0)
    prints nothing.
    """

    def __init__(self, total: int, every: int, stream=None, enabled: bool = True):
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.stream = stream or sys.stderr
        self.bar: _Bar | None = None  # made at the first update: nothing is drawn before a step is done

    def update(self, step: int, loss: float, rate: float, eta: float, heldout: float | None = None) -> None:
        """Show ``step`` of ``total`` with the smoothed loss (nats), bytes/s, ETA (s), last held-out bpb."""
        if not self.enabled:
            return
        fields = dict(loss=loss, bpb=loss / LN2, bytes_rate=fmt_rate(rate), eta=fmt_time(eta),
                      heldout=f" | held-out {heldout:.3f}" if heldout is not None else "")
        if self.bar is None:  # disable=None: tqdm's own test for "not a terminal"
            self.bar = _Bar(total=self.total, initial=step, file=self.stream, bar_format=BAR_FORMAT,
                            ascii=BAR_CHARS, disable=None, leave=True, dynamic_ncols=True, fields=fields)
        if not self.bar.disable:
            self.bar.fields = fields
            self.bar.update(step - self.bar.n)  # redraws at most every mininterval (0.1 s)
        elif step % self.every == 0 or step == self.total:
            line = tqdm.format_meter(step, self.total, 0.0, ascii=BAR_CHARS, bar_format=BAR_FORMAT, **fields)
            self.stream.write(line + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, printed above the progress line (which is not overwritten)."""
        if not self.enabled:
            return
        tqdm.write(text, file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        """Leave the last state of the line on screen and end it (idempotent)."""
        if self.bar is not None:
            self.bar.close()


def read_log(path: Path, upto_step: int) -> list[dict]:
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


class TrainLog:
    """``train_log.jsonl``, written as the run goes (a killed run keeps every complete line).

    ``resumed_at``: the step a resumed run starts from; the earlier run's records up to it are
    copied first, so the log reads as one run. ``records`` keeps every record for the loss plot.
    ``tensorboard``: a ``SummaryWriter`` that gets every number of every new record as the scalar
    ``kind/name`` at the record's step. ``enabled=False`` (ranks other than 0) writes nothing.
    """

    def __init__(self, path: Path, *, enabled: bool = True, resumed_at: int | None = None, tensorboard=None):
        self.records: list[dict] = []
        self.tb, self._f = tensorboard, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        old = read_log(path, resumed_at) if resumed_at is not None else []  # read before "w" truncates it
        self._f = open(path, "w")
        for r in old:
            self.records.append(r)
            self._f.write(json.dumps(r) + "\n")
        self._f.flush()

    def write(self, rec: dict) -> None:
        if self._f is None:
            return
        self.records.append(rec)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self.tb is not None and "step" in rec:
            for k, v in rec.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])

    def close(self) -> None:
        """Close the file and the TensorBoard writer (idempotent)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


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


def baseline_rows(base: dict) -> list[tuple[str, str]]:
    """The three baselines' rows of a results table (:func:`megabyte.baselines.all_baselines`)."""
    return [
        ("order-0, train byte freqs", f"{base['order0_bpb']:.3f} bpb  (cross entropy on held-out, add-one smoothed)"),
        ("gzip -9", f"{base['gzip_bpb']:.3f} bpb  (held-out bytes compressed alone)"),
        ("lzma -9e", f"{base['lzma_bpb']:.3f} bpb  (held-out bytes compressed alone)"),
    ]


def print_table(rows: list[tuple[str, str]], stream=None) -> None:
    """Two aligned columns, indented by two spaces (tests parse the first column)."""
    stream = stream or sys.stdout
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}", file=stream)
