"""``torchrun --nproc-per-node 2 -m megabyte train`` on CPU (gloo): two ranks with batch b end with
the parameters of one process with batch 2b, under DDP and under FSDP2 (``--fsdp``); an FSDP2 run
resumes from its training state into the sharded model."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megabyte.cli import main

ROOT = Path(__file__).resolve().parents[2]
B = 2
ARGS = ["--steps", "6", "--seq-len", "32", "--d-global", "16", "--d-local", "32", "--g-layers", "2",
        "--l-layers", "1", "--g-heads", "2", "--l-heads", "2", "--warmup", "2", "--eval-every", "3",
        "--log-every", "1", "--sample-bytes", "0", "--threads", "1", "--backend", "reference",
        "--time-budget", "0", "--device", "cpu", "--lr", "1e-2", "--save-every", "3"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "megabyte", "train", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("dist") / "corpus.txt"
    f.write_bytes((ROOT / "megabyte" / "data.py").read_bytes())
    return f


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "o"
    assert main(["train", "--data", str(corpus), "--out", str(out), *ARGS, "--batch-size", str(2 * B)]) == 0
    return out


def _assert_close(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("engine, per_rank", [
    ("ddp", ["--batch-size", str(B)]),
    ("ddp", ["--batch-size", str(B // 2), "--grad-accum", "2"]),  # DDP no_sync accumulation
    ("fsdp", ["--batch-size", str(B)]),
], ids=["ddp", "ddp-accum", "fsdp"])
def test_two_ranks_match_one_process_with_twice_the_batch(engine, per_rank, corpus, single, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "o"
    r = _torchrun("--data", str(corpus), "--out", str(out), *ARGS, *per_rank,
                  *(["--fsdp"] if engine == "fsdp" else []))
    assert f"2 ranks ({'FSDP2' if engine == 'fsdp' else 'DDP'})" in r.stdout
    assert r.stdout.count("MEGABYTE (this run)") == 1  # only rank 0 prints
    _assert_close(single, out)
    # the log's loss is the mean over the ranks: the single process's loss on the same bytes
    one = [json.loads(x) for x in (single / "train_log.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    l1 = [x["loss"] for x in one if x["kind"] == "train"]
    l2 = [x["loss"] for x in two if x["kind"] == "train"]
    assert len(l1) == len(l2) == 6 and l2 == pytest.approx(l1, rel=1e-4)
    assert two[-1]["train_bytes_seen"] == one[-1]["train_bytes_seen"]
    if engine == "fsdp":  # resume the sharded model from the state written at step 3
        out2 = tmp_path / "resumed"
        _torchrun("--data", str(corpus), "--out", str(out2), *ARGS, "--batch-size", str(B), "--fsdp",
                  "--resume-from", str(out / "train_state.prev.pt"))
        _assert_close(single, out2)
