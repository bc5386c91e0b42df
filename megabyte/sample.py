"""Text from a trained model, for a person to read: ``megabyte generate`` and the training sample.

- :func:`run_generate` is ``megabyte generate``: load a checkpoint, echo the prompt, stream the
  sampled bytes to stdout as they come (cached decoding, :func:`megabyte.generation.generate_stream`,
  restricted to byte values and the end-of-text id unless ``--all-ids``).
- :func:`sample` is the few hundred bytes ``megabyte train`` prints at the end: a plain loop over
  the full forward, bytes only, seeded on the CPU, so a run's sample is reproducible.

The decoding itself is :mod:`megabyte.generation`'s; this module adds checkpoint loading, UTF-8
output that never crashes on odd bytes, and the context window of learned positions.
"""
from __future__ import annotations

import codecs
import os
import sys

import torch

from .generation import check_sampling_args, generate_stream
from .model import Megabyte


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


def _load(args) -> Megabyte:
    """The checkpoint of ``--checkpoint`` on ``--device``, in eval mode (``ValueError`` if unusable)."""
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Megabyte.from_pretrained(args.checkpoint, backend=getattr(args, "backend", None)).to(device).eval()


def _stream_ids(model, args):
    """The ids sampled after ``--prompt``, up to ``--max-bytes`` of them or the end-of-text id.

    With learned positions, generation past the position table continues from the last
    half-window of bytes (the cache is rebuilt), so ``--max-bytes`` is not bounded by T_MAX. Each
    such chunk is seeded ``--seed + chunk`` so that a seeded run is reproducible. Only byte
    values and the end-of-text id are sampled, unless ``--all-ids`` (every id, specials included).
    """
    cfg = model.config
    vocab = "all" if getattr(args, "all_ids", False) else "bytes"
    ctx = list(args.prompt.encode("utf-8"))
    remaining, chunk = args.max_bytes, 0
    window = (cfg.T_MAX // cfg.P) * cfg.P if cfg.stage_positions[0] == "learned" else None
    while remaining > 0:
        if window is not None:
            if len(ctx) >= window:
                ctx = ctx[-(window // 2):]
            n = min(remaining, window - len(ctx))
        else:
            n = remaining
        seed = None if args.seed is None else args.seed + chunk
        for i in generate_stream(model, [ctx], n, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, eos_id=cfg.eos_id, seed=seed, vocab=vocab):
            remaining -= 1
            if i == cfg.eos_id:
                return
            ctx.append(i)
            yield i
        chunk += 1


def run_generate(args, stream=None) -> int:
    """``megabyte generate``: echo the prompt, then stream sampled bytes to ``stream`` (stdout).

    Bytes are decoded incrementally as UTF-8; invalid sequences come out as U+FFFD (and anything
    the stream's encoding cannot show is replaced too), so odd bytes never crash the command.
    Only bytes and ``eos_id`` (which ends the text) are sampled; with ``--all-ids`` other special
    ids (>= 256) can be sampled too, and are not printed.
    Returns the exit code (2 for an unusable argument or checkpoint, with a one-line message).
    """
    stream = stream if stream is not None else sys.stdout
    if args.max_bytes < 0:
        print(f"megabyte generate: error: --max-bytes must be >= 0, got {args.max_bytes}", file=sys.stderr)
        return 2
    try:
        model = _load(args)
    except (ValueError, RuntimeError) as e:
        print(f"megabyte generate: error: {e}", file=sys.stderr)
        return 2
    enc = getattr(stream, "encoding", None) or "utf-8"
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def emit(text: str) -> None:
        if text:
            stream.write(text.encode(enc, errors="replace").decode(enc, errors="replace"))
            stream.flush()

    try:
        emit(args.prompt)
        for i in _stream_ids(model, args):
            if i < 256:
                emit(decoder.decode(bytes([i])))
        emit(decoder.decode(b"", final=True) + "\n")
    except BrokenPipeError:  # `megabyte generate ... | head`: stop quietly
        if stream is sys.stdout:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
    return 0
