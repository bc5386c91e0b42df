"""Where a run executes: CPU threads, the device and, under ``torchrun``, the ranks.

A ``torchrun`` launch (WORLD_SIZE > 1) starts one process per rank. :class:`Dist` joins the
process group (NCCL on CUDA, gloo on CPU), picks each rank's device and gives the training loop
the two reductions it needs (the mean loss over the ranks; "did any rank see a signal or run out
of time?", so that every rank stops at the same step). :func:`wrap` puts the model under DDP, or
shards it with FSDP2; :func:`full_state` and :func:`load_full_state` move whole (unsharded) state
dicts out of and into it, which is what the checkpoint files hold. A single process gets the same
interface with every collective a no-op, so the training loop has no ``if distributed`` branches.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])


def busy_cores(window_s: float = 0.3) -> float:
    """How many cores other processes keep busy now: measured from /proc/stat over ``window_s``
    (this process sleeps meanwhile), else the 1-minute load average. The load average lags by
    minutes (a pip install or a run that just ended still counts), so it is only the fallback."""
    a = _cpu_times()
    if a is not None:
        time.sleep(window_s)
        b = _cpu_times()
        if b is not None and b[1] > a[1]:
            return (1.0 - (b[0] - a[0]) / (b[1] - a[1])) * (os.cpu_count() or 1)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads() -> int:
    """The cores this process may use, less those other processes keep busy now.

    Oversubscribing the cores is far worse than using fewer threads: OpenMP threads spin at
    every barrier, and a 2-thread step measured 3x slower than a 1-thread one on a 2-core
    machine with other work running.
    """
    cores = machine_cores()
    return max(1, min(cores, int(cores - busy_cores() + 0.5)))


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of returning them
    to the kernel; True where that was done (glibc), False elsewhere (a no-op).

    A CPU training step allocates and frees the same activations every step. Past glibc's mmap
    threshold each such block is a fresh ``mmap`` whose every 4 KiB page faults when it is first
    written, and ``munmap`` on free: in the demo model's step the four ops that first write a
    (2048, 512) logits-sized block (``log_softmax`` and its backward, a ``fill_``, a ``copy_``)
    took ~8 ms each, 0.5 GB/s, against ~1-2 ms on reused memory. With the threshold at glibc's
    maximum and trimming off, the heap keeps the blocks and the step measured ~15% faster. The
    cost is that the process keeps its peak heap. ``MEGABYTE_KEEP_FREED_MEMORY=0`` turns it off.
    """
    if os.environ.get("MEGABYTE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def setup_threads(threads: int | None) -> None:
    """``--threads``, or :func:`default_threads` when it is not given; also
    :func:`keep_freed_memory`."""
    torch.set_num_threads(max(1, threads if threads else default_threads()))
    keep_freed_memory()


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity), busy or not."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def auto_cpu_shards(batch_size: int, cores: int, min_rows: int = 4) -> int:
    """The shards :class:`CpuShards` splits a CPU batch into by default: the largest divisor d of
    ``batch_size`` with d <= ``cores`` and at least ``min_rows`` rows a shard (1 when there is none).
    It depends on the machine's cores, not on how busy they are."""
    return max([d for d in range(1, min(batch_size, cores) + 1)
                if batch_size % d == 0 and batch_size // d >= min_rows] or [1])


@contextlib.contextmanager
def op_threads(n: int):
    """torch's intra-op CPU threads set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CpuShards:
    """Forward and backward of a batch as ``n`` equal shards of rows, up to ``workers`` at a time in
    threads of their own; the gradients summed in shard order.

    Why: the demo's ops are small (a (512, 128) x (128, 512) GEMM, elementwise ops on ~1M floats),
    and 2 intra-op threads split each one in two and meet at a barrier after every op, while two
    shards, each a whole forward and backward with one intra-op thread, run side by side and only
    meet once a step (torch releases the GIL inside its ops and its backward). On the loaded
    2-core machine a demo step (batch 8) measured 477 ms at 1 thread, 2,557 ms at 2 intra-op
    threads, 287 ms as 2 shards in 2 threads.

    Loss and gradients are those of the whole batch (each shard's mean loss weighs 1/n, the rows of
    every shard equal in number, as training windows have no padding), up to float rounding. They
    do not depend on ``workers``: each shard's gradients come from ``torch.autograd.grad`` of its own
    graph, and the sums run in shard order after all of them are done.
    """

    def __init__(self, n: int, workers: int):
        if n < 1 or workers < 1:
            raise ValueError(f"shards and workers must be >= 1, got {n} and {workers}")
        self.n, self.workers = n, min(workers, n)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="shard") if self.workers > 1 else None

    def backward(self, params: list[torch.Tensor], ids: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                 scale: float = 1.0) -> torch.Tensor:
        """ids (B, T) with n | B; ``loss_fn(ids_shard)`` -> scalar mean loss of the shard. Adds
        ``scale * d(mean over the shards)/dp`` to each ``p.grad`` of ``params`` (sets it when it is
        None) and returns the batch's loss (detached, unscaled)."""
        if ids.shape[0] % self.n:
            raise ValueError(f"the batch of {ids.shape[0]} rows does not split into {self.n} equal shards")
        w = scale / self.n

        def one(shard):
            loss = loss_fn(shard)
            return loss.detach(), torch.autograd.grad(loss * w, params, allow_unused=True)

        shards = ids.chunk(self.n)
        results = list(self.pool.map(one, shards)) if self.pool else [one(x) for x in shards]
        for i, p in enumerate(params):
            g = None
            for _, grads in results:
                if grads[i] is not None:
                    g = grads[i] if g is None else g + grads[i]
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        return sum(loss for loss, _ in results) / self.n

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def pick_device(name: str | None) -> torch.device:
    """``--device``, else CUDA when there is a GPU, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Dist:
    """Rank and world of a ``torchrun`` launch (WORLD_SIZE > 1), else a single process.

    Under ``torchrun`` each rank takes ``cuda:LOCAL_RANK`` (or the CPU without a GPU) and the
    process group is initialised here, once.
    """

    def __init__(self, device_arg: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if not self.enabled:
            self.device = pick_device(device_arg)
            return
        import torch.distributed as dist

        if device_arg:
            self.device = torch.device(device_arg)
        else:
            self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            if self.device.index is None:  # --device cuda: each rank its own GPU
                self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
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
        """True on every rank when ``flag`` is true on at least one."""
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


def wrap(model, dist_: Dist, fsdp: bool):
    """DDP, or FSDP2 (``fully_shard`` per transformer block, then the root) with ``fsdp``.

    ``fully_shard`` shards ``model`` in place and returns it, so under FSDP2 the returned module
    is ``model`` itself; DDP returns a wrapper whose ``no_sync()`` the training step uses.
    """
    if fsdp:
        import warnings

        from torch.distributed.fsdp import fully_shard

        # the model's output holds views (lm_logits[:, :T]); training never writes into them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        middle = [m.transformer for m in getattr(model, "m_stages", None) or ()]  # N stages
        for tr in (model.g_transformer, *middle, model.l_transformer):
            for block in tr.layers:
                fully_shard(block)
        fully_shard(model)
        return model
    if not dist_.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[dist_.device.index] if dist_.device.type == "cuda" else None)


def full_state(model, opt, fsdp: bool) -> tuple[dict, dict]:
    """Model and optimizer state dicts as plain full tensors (gathered on every rank under FSDP2)."""
    if not fsdp:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)


def load_full_state(model, opt, model_sd: dict, opt_sd: dict, fsdp: bool) -> None:
    """The inverse of :func:`full_state`: full state dicts into the (possibly sharded) model and optimizer."""
    if not fsdp:
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=o)
    set_optimizer_state_dict(model, opt, opt_sd, options=o)
