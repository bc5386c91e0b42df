"""The ``megabyte`` command line: ``megabyte train``, ``megabyte eval`` and ``megabyte generate``.

``megabyte train`` with no arguments trains the small default demo model on the running
interpreter's standard library (no download) and prints held-out bits per byte next to the
order-0, ``gzip -9`` and ``lzma`` baselines. ``megabyte eval --checkpoint DIR`` scores a
checkpoint (``--strided``: the paper's two passes offset by P/2, :mod:`megabyte.evaluate`).
``megabyte generate --checkpoint DIR --prompt TEXT`` streams sampled bytes to stdout
(:func:`megabyte.sample.run_generate`). Each subcommand is a function ``add_<name>_parser(subparsers)`` plus a handler, so a
later one (``generate``) slots in the same way.
"""
from __future__ import annotations

import argparse
import sys

from . import data as _data


def _add_data_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="a file (one document, the last --heldout-frac held out; enwik8 as-is) or a folder "
                        "(its files, held out by a hash of the path); default: the Python standard "
                        "library's .py files" + ("" if defaults else " (default for eval: the checkpoint's data)"))
    g.add_argument("--max-bytes", type=int, default=_data.DEFAULT_MAX_BYTES if defaults else None,
                   help="cap on the training bytes read (default %(default)s)")
    g.add_argument("--eval-bytes", type=int, default=_data.DEFAULT_EVAL_BYTES if defaults else None,
                   help="cap on the held-out bytes scored (default %(default)s)")
    g.add_argument("--heldout-frac", type=float, default=_data.DEFAULT_HELDOUT_FRAC if defaults else None,
                   help="fraction held out (default %(default)s)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores this process may use, less those busy with other work)")
    g.add_argument("--eval-batch-size", type=int, default=32, help="windows per evaluation batch")
    g.add_argument("--backend", default=None, choices=("auto", "reference", "triton", "native"),
                   help="megabyte_kernels backend (default: the config's, normally auto)")


def _int_list(text: str) -> tuple[int, ...]:
    """``"16,4"`` -> ``(16, 4)``."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_train_parser(sub) -> argparse.ArgumentParser:
    from .train import DEMO
    p = sub.add_parser("train", help="train a small MEGABYTE on a byte corpus and report held-out bits/byte",
                       description="Train a small MEGABYTE on bytes; report held-out bits per byte next to "
                                   "order-0 / gzip -9 / lzma baselines on the same bytes; save a checkpoint, "
                                   "train_log.jsonl and loss.png; print a sample.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(p, defaults=True)
    m = p.add_argument_group("model", "two stages with the classic flags (their defaults: the demo model), or N "
                                      "stages with the comma lists --patch-sizes/--dims/--layers/--heads "
                                      "(e.g. --patch-sizes 16,4 --dims 8,32,64 --layers 4,2,2 --heads 8,2,1); "
                                      "a classic flag given with them must agree")
    m.add_argument("--patch-size", type=int, default=None, help=f"P (default {DEMO['patch_size']})")
    m.add_argument("--d-global", type=int, default=None,
                   help=f"D_G, the global width is P*D_G (default {DEMO['d_global']})")
    m.add_argument("--d-local", type=int, default=None, help=f"D_L (default {DEMO['d_local']})")
    m.add_argument("--g-layers", type=int, default=None, help=f"default {DEMO['g_layers']}")
    m.add_argument("--l-layers", type=int, default=None, help=f"default {DEMO['l_layers']}")
    m.add_argument("--g-heads", type=int, default=None, help=f"default {DEMO['g_heads']}")
    m.add_argument("--l-heads", type=int, default=None, help=f"default {DEMO['l_heads']}")
    m.add_argument("--patch-sizes", type=_int_list, default=None, metavar="P0,P1,...",
                   help="N stages: n-1 patch sizes; stage i's unit is the product of patch_sizes[i:] bytes")
    m.add_argument("--dims", type=_int_list, default=None, metavar="D0,...", help="width per byte slot, per stage")
    m.add_argument("--layers", type=_int_list, default=None, metavar="L0,...", help="layers per stage")
    m.add_argument("--heads", type=_int_list, default=None, metavar="H0,...", help="attention heads per stage")
    o = p.add_argument_group("optimisation")
    o.add_argument("--seq-len", type=int, default=DEMO["seq_len"], help="bytes per training window (= T_MAX)")
    o.add_argument("--batch-size", type=int, default=DEMO["batch_size"])
    o.add_argument("--steps", type=int, default=DEMO["steps"])
    o.add_argument("--lr", type=float, default=DEMO["lr"], help="peak learning rate")
    o.add_argument("--min-lr-ratio", type=float, default=DEMO["min_lr_ratio"], help="final lr / peak lr (cosine)")
    o.add_argument("--warmup", type=int, default=DEMO["warmup"], help="linear warm-up steps")
    o.add_argument("--weight-decay", type=float, default=DEMO["weight_decay"])
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--no-unigram-bias", dest="unigram_bias", action="store_false",
                   help="start the head bias at zero, not at the training bytes' log frequencies")
    o.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="a safety net in training seconds (evaluation excluded): the run is budgeted in "
                        "--steps, and only when its pace would overrun this does the lr anneal by the clock "
                        "and training stop here; default %d on CPU, none on GPU; 0: none" % DEMO["time_budget_cpu"])
    o.add_argument("--cpu-shards", type=int, default=None, metavar="N",
                   help="on the CPU, split each batch into N equal shards whose forward and backward run in "
                        "threads of their own, the gradients summed in a fixed order (default: the largest "
                        "divisor of --batch-size up to the machine's cores with >= 4 rows a shard; 1 turns it off)")
    o.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="gradient accumulation: N micro-batches of --batch-size per optimizer step")
    o.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="bf16: autocast the forward to bfloat16; auto: bf16 on a CUDA GPU that has it, else fp32")
    l = p.add_argument_group("long context and scale")
    l.add_argument("--loss-chunk", type=int, default=0, metavar="N",
                   help="compute the head + cross entropy N positions at a time, never the full (B, T, V) "
                        "logits (0: off; for long --seq-len)")
    l.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing: recompute each transformer block in backward")
    l.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 (fully_shard) instead of DDP")
    r = p.add_argument_group("output")
    r.add_argument("--out", default="runs/demo", help="checkpoint folder (config.json, model.safetensors, "
                                                      "train_log.jsonl, loss.png)")
    r.add_argument("--eval-every", type=int, default=DEMO["eval_every"], help="held-out evaluation every N steps (0: only at the end)")
    r.add_argument("--log-every", type=int, default=50,
                   help="log to train_log.jsonl, and print the progress line when not a TTY, every N steps")
    r.add_argument("--save-every", type=int, default=1000, metavar="N",
                   help="write the checkpoint and the resumable train_state.pt every N steps (0: only at the end); "
                        "SIGTERM / SIGINT also save before stopping")
    r.add_argument("--resume", action="store_true",
                   help="continue from --out's train_state.pt (its previous one if the newest is damaged); "
                        "starts from step 0 when there is none yet")
    r.add_argument("--resume-from", default=None, metavar="FILE", help="continue from this train_state file")
    r.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to OUT/tensorboard (needs the tensorboard package)")
    r.add_argument("--sample-bytes", type=int, default=300, help="bytes to sample at the end (0: none)")
    r.add_argument("--prompt", default="def ", help="sampling prompt")
    r.add_argument("--temperature", type=float, default=0.8)
    _add_runtime_args(p)
    p.set_defaults(func=_cmd_train)
    return p


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="held-out bits/byte of a checkpoint",
                       description="Print held-out bits per byte of a checkpoint, with the baselines on the "
                                   "same bytes. Without --data, the data the checkpoint was trained on.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="folder written by save_pretrained")
    _add_data_args(p, defaults=False)
    p.add_argument("--seq-len", type=int, default=None, help="evaluation window (default: the training one)")
    p.add_argument("--method", default=None, choices=("basic", "sliding", "strided", "both", "all"),
                   help="how to cut the held-out bytes into windows (MEGABYTE paper, Table 11): basic = disjoint "
                        "windows; sliding = windows every --stride bytes, each scoring only the bytes the previous "
                        "one did not; strided = a second pass offset by P/2 bytes, each byte from the pass where it "
                        "sits earlier in its patch; both = sliding + strided; all = a table of the four on the "
                        "same bytes with their forward passes (default: basic)")
    p.add_argument("--strided", action="store_true", help="the same as --method strided")
    p.add_argument("--stride", type=int, default=None, metavar="BYTES",
                   help="sliding / both: bytes between window starts, 1..--seq-len (--seq-len = basic; default: "
                        "half the window rounded down to a multiple of P, so each byte keeps its slot in its patch)")
    _add_runtime_args(p)
    p.set_defaults(func=_cmd_eval)
    return p


def add_generate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="stream bytes sampled from a checkpoint",
                       description="Echo the prompt, then stream bytes sampled from a checkpoint to stdout as they "
                                   "are produced (cached incremental decoding; invalid UTF-8 is shown as U+FFFD).")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="folder written by save_pretrained / train")
    p.add_argument("--prompt", default="", help="prompt text (UTF-8; default: empty)")
    p.add_argument("--max-bytes", type=int, default=256, help="bytes to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely bytes")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set of mass >= P")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--all-ids", action="store_true",
                   help="sample every id of the vocabulary, special ids included (default: only the 256 byte "
                        "values and the end-of-text id; specials are never printed)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_cmd_generate)
    return p


def _check_train_args(p, a) -> None:
    """Every argument checked before anything runs: a clear usage error, never a deep traceback."""
    for name in ("steps", "batch_size", "seq_len", "max_bytes", "eval_bytes", "log_every", "grad_accum",
                 "eval_batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("eval_every", "save_every", "loss_chunk", "sample_bytes"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if a.warmup < 0 or not a.lr > 0:
        p.error("--warmup must be >= 0 and --lr > 0")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.cpu_shards is not None and (a.cpu_shards < 1 or a.batch_size % a.cpu_shards):
        p.error(f"--cpu-shards must be >= 1 and divide --batch-size {a.batch_size}, got {a.cpu_shards}")
    if not 0.0 < a.heldout_frac < 1.0:
        p.error(f"--heldout-frac must lie in (0, 1), got {a.heldout_frac}")
    if not 0.0 <= a.min_lr_ratio <= 1.0:
        p.error(f"--min-lr-ratio must lie in [0, 1], got {a.min_lr_ratio}")
    if not a.grad_clip > 0 or not a.weight_decay >= 0:
        p.error("--grad-clip must be > 0 and --weight-decay >= 0")
    if a.temperature < 0:
        p.error(f"--temperature must be >= 0, got {a.temperature}")
    if a.time_budget is not None and a.time_budget < 0:
        p.error(f"--time-budget must be >= 0, got {a.time_budget}")
    if a.device is not None:
        import torch
        try:
            dev = torch.device(a.device)
        except (RuntimeError, ValueError) as e:
            p.error(f"--device {a.device!r}: {e}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {a.device}: CUDA is not available on this machine")
    # the model these arguments build (P=0, D_G not divisible by the heads, T_MAX < P, ...)
    from .train import model_config
    try:
        model_config(a)
    except ValueError as e:
        p.error(f"invalid model: {e} (from --patch-size, --d-global, --d-local, --seq-len, --g-/--l-heads, "
                "--g-/--l-layers, or --patch-sizes, --dims, --layers, --heads)")


def _cmd_train(a) -> int:
    from .train import run_train
    run_train(a)
    return 0


def _cmd_eval(a) -> int:
    from .evaluate import EvalArgumentError, run_eval
    try:
        run_eval(a)
    except EvalArgumentError as e:  # --method / --stride that cannot work: a usage error
        print(f"megabyte eval: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_generate(a) -> int:
    from .sample import run_generate
    return run_generate(a)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megabyte", description="MEGABYTE byte-level language model")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    add_eval_parser(sub)
    add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command == "train":
        _check_train_args(parser, args)
    try:
        return args.func(args)
    except (_data.CorpusError, FileNotFoundError) as e:
        print(f"megabyte {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # errors of ours that carry a message for the user, not a traceback
        from .checkpoint import CheckpointError
        from .signals import TrainingInterrupted
        from .train import TrainingError, UsageError
        if isinstance(e, TrainingInterrupted):
            print(f"\nmegabyte {args.command}: {e}", file=sys.stderr)
            return e.exit_code
        if isinstance(e, (CheckpointError, UsageError)):
            print(f"megabyte {args.command}: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, TrainingError):
            print(f"megabyte {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"\nmegabyte {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
