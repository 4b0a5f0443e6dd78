"""fastnin.train: the command on small subsets of the embedded digits, its errors, checkpoints and resume.

Runs are kept tiny (--limit, a few batches) so that the file takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from _utils import train_args

from fastnin.train import load_checkpoint, main, run
from fastnin.train import loop as L

pytest.importorskip("sklearn")  # the embedded digits


def _args(out=None, model="lenet", epochs=1, limit=64, batch=16, *extra):
    return train_args(out, model, epochs, limit, batch, *extra)


def _digest(d) -> dict:
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in sorted(os.listdir(d))}


def test_one_epoch_lenet_summary_and_checkpoint(tmp_path, capsys):
    s = run(_args(tmp_path, limit=96, batch=32))
    got = (s["model"], s["dataset"], s["epochs"], s["train_images"], s["test_images"])
    assert got == ("lenet", "digits", 1, 96, 96)
    assert s["input_size"] == 28 and s["world_size"] == 1 and s["params_in_sync"] is True
    assert 0.0 <= s["final_test_acc"] <= 1.0 and 0.0 <= s["final_train_acc"] <= 1.0
    assert s["images_per_s"] > 0 and s["wall_time_s"] > 0 and s["peak_memory_bytes"] > 0
    # The summary is printed (JSON on stdout) and written to --out.
    printed = json.loads(capsys.readouterr().out)
    assert printed["final_test_acc"] == s["final_test_acc"]
    assert json.loads((tmp_path / "summary.json").read_text())["history"] == s["history"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-epoch0001.pt", "summary.json"]
    ck = load_checkpoint(str(tmp_path / "checkpoint-epoch0001.pt"))
    assert (ck["model"], ck["epoch"], ck["num_classes"], ck["in_channels"]) == ("lenet", 1, 10, 1)


def test_one_epoch_nin_cifar10(tmp_path):
    # The paper's CIFAR-10 NiN through fastnin's fused mlpconv on 1x32x32 digits: 2 Adam steps run,
    # give a finite loss, and move every parameter tensor away from its initialization.
    from fastnin import models

    s = run(_args(tmp_path, "nin_cifar10", 1, 32, 16))
    assert s["input_size"] == 32 and s["train_images"] == 32
    assert torch.isfinite(torch.tensor(s["final_train_loss"])) and 0.0 <= s["final_test_acc"] <= 1.0
    torch.manual_seed(0)  # --seed 0: the initialization the run started from
    init = models.get("nin_cifar10", num_classes=10, in_channels=1)
    L._init_convs(init, "kaiming-head", 10)  # --init auto's choice for NiN
    trained = load_checkpoint(str(tmp_path / "checkpoint-epoch0001.pt"))["model_state"]
    for k, v in init.state_dict().items():
        assert not torch.equal(v, trained[k]), f"{k} did not change"


@pytest.mark.parametrize("extra", [["--amp", "bf16", "--channels-last", "--workers", "1"], ["--amp", "fp16"]],
                         ids=["bf16-channels_last-workers", "fp16-gradscaler"])
def test_amp_channels_last_workers(extra):
    s = run(_args(None, "lenet", 1, 48, 16, "--optimizer", "sgd", *extra))
    assert s["amp"] == extra[1] and s["channels_last"] == ("--channels-last" in extra) and s["epochs"] == 1
    assert torch.isfinite(torch.tensor([h["train_loss"] for h in s["history"]])).all()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet1000"], r"unknown model 'resnet1000' \(--model\); expected one of .*nin_cifar10"),
        (["--dataset", "imagenet"], r"unknown dataset 'imagenet' \(--dataset\)"),
        (["--backend", "fastest"], r"unknown backend 'fastest'"),
        (["--dataset", "mnist"], r"--dataset mnist needs --data DIR"),
        (["--dataset", "mnist", "--data", "/nonexistent/dir"], r"--data /nonexistent/dir: no such directory"),
        (["--resume"], r"--resume needs --out"),
        (["--epochs", "0"], r"--epochs must be >= 1"),
    ],
)
def test_bad_input_clear_error(argv, message, capsys):
    base = ["--epochs", "1", "--limit", "8", "--device", "cpu", "--no-progress", "--model", "lenet"]
    with pytest.raises((ValueError, OSError), match=message):
        run(base + argv)
    # The console script reports the same without a traceback, exit code 2.
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnin-train: error: ") and "Traceback" not in err


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    # 64 images / batch 16 = 4 steps per epoch; Adam's state and the data order must survive the restart.
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(_args(full, "lenet", 2))

    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # mid-way through epoch 2
            raise _Interrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(_Interrupt):
        run(_args(cut, "lenet", 2))
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert sorted(os.listdir(cut)) == ["checkpoint-epoch0001.pt"]  # no partial epoch-2 file, no temp file

    s = run(_args(cut, "lenet", 2, 64, 16, "--resume"))
    assert s["resumed_from_epoch"] == 1 and s["epochs"] == 2 and s["epochs_this_run"] == 1
    a = load_checkpoint(str(full / "checkpoint-epoch0002.pt"))
    b = load_checkpoint(str(cut / "checkpoint-epoch0002.pt"))
    for k, v in a["model_state"].items():
        assert torch.equal(v, b["model_state"][k]), k
    assert a["history"][1]["test_acc"] == b["history"][1]["test_acc"]


def test_resume_refuses_other_model_and_leaves_checkpoint_untouched(tmp_path):
    run(_args(tmp_path, "lenet", 1, 32, 16))
    before = _digest(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-epoch0001\.pt is of model 'lenet', but --model is "
                                         r"'nin_cifar10'"):
        run(_args(tmp_path, "nin_cifar10", 2, 32, 16, "--resume"))
    # Without --resume, a directory holding checkpoints is refused too (nothing is overwritten).
    with pytest.raises(ValueError, match=r"already holds 1 checkpoint.*pass --resume"):
        run(_args(tmp_path, "lenet", 1, 32, 16))
    assert _digest(tmp_path) == before


def test_resume_skips_a_corrupt_checkpoint(tmp_path, capsys):
    run(_args(tmp_path, "lenet", 2, 32, 16))
    # A checkpoint broken behind our back (say, copied half-way) and a stray temp file of a killed save.
    p2 = tmp_path / "checkpoint-epoch0002.pt"
    p2.write_bytes(p2.read_bytes()[:1000])
    (tmp_path / ".checkpoint-epoch0003.pt.x1.tmp").write_bytes(b"partial")
    capsys.readouterr()
    s = run(_args(tmp_path, "lenet", 2, 32, 16, "--resume"))
    assert "skipping" in capsys.readouterr().err and s["resumed_from_epoch"] == 1
    assert load_checkpoint(str(p2))["epoch"] == 2  # epoch 2 trained again and saved whole


def test_resume_when_already_done_trains_nothing(tmp_path):
    run(_args(tmp_path, "lenet", 1, 32, 16))
    s = run(_args(tmp_path, "lenet", 1, 32, 16, "--resume"))
    assert s["epochs_this_run"] == 0 and s["epochs"] == 1 and s["final_test_acc"] is not None


def test_atomic_write_never_leaves_a_broken_file(tmp_path):
    p = tmp_path / "checkpoint-epoch0001.pt"
    p.write_bytes(b"old and complete")

    def broken(f):
        f.write(b"half of a new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        L._atomic_write(str(p), broken)
    assert p.read_bytes() == b"old and complete" and os.listdir(tmp_path) == [p.name]
    L._atomic_write(str(p), lambda f: f.write(b"new"))
    assert p.read_bytes() == b"new" and os.listdir(tmp_path) == [p.name]
