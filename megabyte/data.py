"""Byte corpora for training and evaluation: discovery, a stable held-out split, batches.

Three kinds of source, all read as raw bytes (no decoding, no tokenizer):

- **default** (``path=None``): the ``.py`` files of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``, ``site-packages``/``dist-packages`` excluded), sorted by
  relative path. Needs no download.
- **a folder**: its regular files, recursively, sorted by relative path (hidden files and folders,
  whose names start with ``.``, are skipped).
- **a file**: one document (enwik8 style). The last ``heldout_frac`` of it is held out, so the
  split of a file is a fixed byte position that does not depend on ``max_bytes``.

Folders (and the default corpus) are split **by file**: a file is held out when a stable hash
(SHA-256) of its relative path falls below ``heldout_frac``, so adding or capping files never
moves another file across the split. Files are concatenated in sorted order, nothing between them.

``max_bytes`` caps the training bytes (read in order, the file that crosses the cap is cut) and
``eval_bytes`` the held-out bytes, so a large source is never read in full.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_EVAL_BYTES = 64 * 1024
DEFAULT_HELDOUT_FRAC = 0.05


class CorpusError(ValueError):
    """The corpus cannot be used: missing, empty, or shorter than one training sequence."""


@dataclass
class Corpus:
    """Training and held-out bytes as flat ``uint8`` tensors, plus where they came from."""

    train: torch.Tensor  # (N_train,) uint8
    heldout: torch.Tensor  # (N_heldout,) uint8
    source: str  # human-readable description
    n_train_files: int = 0
    n_heldout_files: int = 0
    skipped: list[str] = field(default_factory=list)  # unreadable files

    def describe(self) -> str:
        files = ""
        if self.n_train_files or self.n_heldout_files:
            files = f" ({self.n_train_files} train / {self.n_heldout_files} held-out files)"
        return (f"{self.source}: {len(self.train):,} train bytes, "
                f"{len(self.heldout):,} held-out bytes{files}")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str, frac: float) -> bool:
    """Stable split by file: SHA-256 of the relative path (posix form) as a number in [0, 1)."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < frac


def list_files(root: Path, pattern: str = "*", exclude_dirs: tuple[str, ...] = ()) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of the regular files under ``root``, sorted by relative path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in exclude_dirs]
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if not p.match(pattern) or not p.is_file():
                continue
            out.append((p.relative_to(root).as_posix(), p))
    out.sort(key=lambda x: x[0])
    return out


def _read_files(files: list[tuple[str, Path]], cap: int, skipped: list[str]) -> tuple[bytes, int]:
    chunks, total, n = [], 0, 0
    for rel, p in files:
        if total >= cap:
            break
        try:
            data = p.read_bytes()
        except OSError as e:  # unreadable (permissions, broken link, vanished): skip, say so
            warnings.warn(f"skipping unreadable file {p}: {e}", stacklevel=3)
            skipped.append(str(p))
            continue
        if not data:
            continue
        data = data[: cap - total]
        chunks.append(data)
        total += len(data)
        n += 1
    return b"".join(chunks), n


def _to_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8) if b else torch.empty(0, dtype=torch.uint8)


def load_corpus(path: str | os.PathLike | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                eval_bytes: int = DEFAULT_EVAL_BYTES, heldout_frac: float = DEFAULT_HELDOUT_FRAC,
                min_len: int = 2) -> Corpus:
    """Load a byte corpus and split it; see the module docstring.

    Raises ``CorpusError`` when ``path`` does not exist, holds no bytes, or when the training part
    or the held-out part is shorter than ``min_len`` bytes (one training sequence plus one).
    """
    if not 0.0 < heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must lie in (0, 1), got {heldout_frac}")
    if max_bytes < 1 or eval_bytes < 1:
        raise ValueError(f"max_bytes and eval_bytes must be >= 1, got {max_bytes}, {eval_bytes}")
    skipped: list[str] = []

    if path is None:
        root = stdlib_root()
        files = list_files(root, "*.py", exclude_dirs=("site-packages", "dist-packages", "__pycache__"))
        corpus = _split_files(files, f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} "
                                     f"standard library .py files ({root})",
                              max_bytes, eval_bytes, heldout_frac, skipped)
    else:
        p = Path(path)
        if not p.exists():
            raise CorpusError(f"--data {str(path)!r}: no such file or folder")
        if p.is_dir():
            files = list_files(p)
            if not files:
                raise CorpusError(f"--data {str(path)!r}: the folder holds no files")
            if len(files) == 1:  # one file: split it by position like a single document
                corpus = _split_document(files[0][1], max_bytes, eval_bytes, heldout_frac)
            else:
                corpus = _split_files(files, f"folder {p}", max_bytes, eval_bytes, heldout_frac, skipped)
        else:
            corpus = _split_document(p, max_bytes, eval_bytes, heldout_frac)
    corpus.skipped = skipped

    where = corpus.source
    if len(corpus.train) == 0 and len(corpus.heldout) == 0:
        raise CorpusError(f"{where}: the corpus is empty (no readable bytes)")
    if len(corpus.train) < min_len:
        raise CorpusError(f"{where}: only {len(corpus.train)} training bytes, shorter than one training "
                          f"sequence ({min_len} bytes needed); use a larger corpus or a smaller --seq-len")
    if len(corpus.heldout) < 2:
        raise CorpusError(f"{where}: only {len(corpus.heldout)} held-out bytes; the corpus is too small "
                          f"to hold out {heldout_frac:.0%} of it")
    return corpus


def _split_document(p: Path, max_bytes: int, eval_bytes: int, frac: float) -> Corpus:
    try:
        n = p.stat().st_size
        with open(p, "rb") as f:
            split = n - max(1, int(round(n * frac))) if n > 1 else n
            train = f.read(min(split, max_bytes))
            f.seek(split)
            heldout = f.read(min(n - split, eval_bytes))
    except OSError as e:
        raise CorpusError(f"--data {str(p)!r}: cannot read: {e}") from e
    return Corpus(_to_tensor(train), _to_tensor(heldout),
                  f"file {p} (last {frac:.0%} held out)")


def _split_files(files, source: str, max_bytes: int, eval_bytes: int, frac: float,
                 skipped: list[str]) -> Corpus:
    train_files = [f for f in files if not is_heldout(f[0], frac)]
    heldout_files = [f for f in files if is_heldout(f[0], frac)]
    if not heldout_files and len(files) > 1:
        # Too few files for the hash to pick one: hold out the file with the smallest hash.
        key = lambda f: hashlib.sha256(f[0].encode("utf-8")).digest()  # noqa: E731
        pick = min(files, key=key)
        heldout_files = [pick]
        train_files = [f for f in files if f is not pick]
    train, n_tr = _read_files(train_files, max_bytes, skipped)
    heldout, n_ho = _read_files(heldout_files, eval_bytes, skipped)
    return Corpus(_to_tensor(train), _to_tensor(heldout),
                  f"{source}, files held out by SHA-256 of their path (~{frac:.0%})", n_tr, n_ho)


class BatchSampler:
    """Random training windows of ``seq_len`` bytes, reproducible from ``seed``.

    Each call returns ``(batch_size, seq_len)`` int64 ids drawn uniformly from all window starts
    of the training bytes with a private ``torch.Generator``, so a run is reproducible whatever
    else uses the global RNG. The generator's state (:meth:`state_dict`) is the data position a
    resumed run continues from.

    Data parallel: with ``world`` ranks every rank draws the same global batch of
    ``world * batch_size`` starts and keeps rows ``[rank * batch_size, (rank + 1) * batch_size)``,
    so the ranks' batches never overlap and together are exactly the batch one process with
    ``world * batch_size`` would draw.
    """

    def __init__(self, data: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world={world}), got {rank}")
        if len(data) < seq_len:
            raise CorpusError(f"{len(data)} training bytes are fewer than one sequence of {seq_len}")
        self.data, self.seq_len, self.batch_size = data, seq_len, batch_size
        self.rank, self.world = rank, world
        self.gen = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len)

    def __call__(self) -> torch.Tensor:
        n_starts = len(self.data) - self.seq_len + 1
        starts = torch.randint(0, n_starts, (self.batch_size * self.world, 1), generator=self.gen)
        if self.world > 1:
            starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return self.data[starts + self._offsets].long()

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])


def eval_windows(data: torch.Tensor, seq_len: int, batch_size: int):
    """Deterministic evaluation batches: consecutive non-overlapping windows covering every byte.

    Yields ``(B, seq_len)`` int64 batches of full windows, then the remainder (if any) as one
    ``(1, r)`` window, so each held-out byte is scored exactly once (each window starts without
    context). Same data, same windows, every time.
    """
    n_full = len(data) // seq_len
    full = data[: n_full * seq_len].view(n_full, seq_len)
    for i in range(0, n_full, batch_size):
        yield full[i:i + batch_size].long()
    rest = data[n_full * seq_len:]
    if len(rest) > 0:
        yield rest.view(1, -1).long()
