"""fastnin.train under torchrun: 2 CPU processes with gloo and DistributedDataParallel.

Checks that both ranks end with identical parameters, that the result equals single-process
training with the same global batch (dist.py's convention: --batch-size is the global batch), and
that only rank 0 prints the summary. Plain SGD (no momentum) and a model without dropout (LeNet),
so that the two runs differ only in how the gradient sum over the global batch is split.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

import fastnin
import torch

from fastnin.train import load_checkpoint
from fastnin.train import loop as L

pytest.importorskip("sklearn")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# The directory of the fastnin this run imports (checkout or site-packages): the torchrun workers
# must import the same one.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastnin.__file__)))

# Each rank trains through fastnin.train.loop.train and also saves its own final parameters, which
# the command itself does only on rank 0.
WORKER = textwrap.dedent(
    """
    import os, sys, torch
    from fastnin.train import loop
    model, summary = loop.train(loop.parse_args(sys.argv[2:]))
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
               os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_match_single_process(tmp_path):
    # 96 images, global batch 32 (16 per rank): 3 steps per epoch, 2 epochs.
    common = ["--model", "lenet", "--epochs", "2", "--limit", "96", "--batch-size", "32", "--optimizer", "sgd",
              "--momentum", "0", "--lr", "0.5", "--device", "cpu", "--no-progress", "--seed", "3"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path)] + common + ["--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Only rank 0 prints: exactly one JSON summary on stdout.
    assert proc.stdout.count('"final_test_acc"') == 1, proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params_in_sync"] is True
    assert summary["train_images"] == 96 and summary["test_images"] == 96

    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between the ranks"
    ck = load_checkpoint(str(out / "checkpoint-epoch0002.pt"))
    for k in r0:
        assert torch.equal(ck["model_state"][k], r0[k]), k

    # Single process, same global batch: the same parameters up to float rounding (the gradient
    # mean is summed in another order).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, s1 = L.train(L.parse_args(common))
    finally:
        torch.set_num_threads(threads)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # ... and training did move the parameters (else the comparison proves nothing).
    torch.manual_seed(3)
    from fastnin import models

    init = models.get("lenet", num_classes=10, in_channels=1)
    L._init_convs(init, "xavier")
    moved = max((init.state_dict()[k] - v).abs().max().item() for k, v in single.state_dict().items())
    assert moved > 1e-2
    # The evaluated accuracies agree too (the test set is sharded without padding in DDP).
    assert summary["history"][-1]["test_acc"] == pytest.approx(s1["history"][-1]["test_acc"], abs=1 / 96 + 1e-9)


def test_batch_must_divide_over_ranks(monkeypatch):
    # The check happens right after the process group is up; fake a world of 3 without one.
    from fastnin.train import dist

    monkeypatch.setattr(dist, "init", lambda device: (dist.DistInfo(rank=0, world_size=3, backend="gloo"),
                                                      torch.device("cpu")))
    monkeypatch.setattr(dist, "shutdown", lambda info: None)
    with pytest.raises(ValueError, match=r"--batch-size 32 \(the global batch\) must be a multiple of the 3 processes"):
        L.train(L.parse_args(["--model", "lenet", "--batch-size", "32", "--device", "cpu", "--limit", "8"]))
