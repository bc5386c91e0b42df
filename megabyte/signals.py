"""Stopping a training run on SIGTERM / SIGINT without losing it.

A scheduler's SIGTERM or a user's Ctrl-C must not cut a step in half: :class:`StopSignals` only
sets a flag, the training loop reads it after each step, saves the resumable state and raises
:class:`TrainingInterrupted`, which the CLI turns into exit code 128 + signal (the shell's
convention for "killed by a signal") and a message saying how to continue. A second Ctrl-C is
an impatient user: it stops at once.
"""
from __future__ import annotations

import signal
import threading


class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT arrived: the state was saved at ``step``; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, step: int, out_dir):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: training state saved at step {step} in {out_dir}; "
                         f"continue with the same command plus --resume")


class StopSignals:
    """While active, SIGTERM and SIGINT set ``signum`` instead of stopping the process.

    Installed only in the main thread (Python allows signal handlers nowhere else; a run started
    from another thread keeps the default behaviour). The previous handlers come back on exit.
    """

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
