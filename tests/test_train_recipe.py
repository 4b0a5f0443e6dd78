"""fastnin.train's default recipe for ReLU-headed networks (NiN): the kaiming-head init, the lr of the
logit convolution (--head-lr-scale), the warmup + cosine schedule, their bad values, and resume with them.

Runs are tiny (--limit 32, batch 16: 2 steps per epoch), so the file takes seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _utils import train_args

from fastnin import models
from fastnin.train import load_checkpoint, main, run
from fastnin.train import loop as L

pytest.importorskip("sklearn")  # the embedded digits


def _args(out=None, model="nin_cifar10", epochs=2, limit=32, batch=16, *extra):
    return train_args(out, model, epochs, limit, batch, *extra)


def _record_lrs(monkeypatch, optimizer_cls):
    """A list that receives every param group's lr at each step of optimizer_cls."""
    seen = []
    real_step = optimizer_cls.step

    def recording_step(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(optimizer_cls, "step", recording_step)
    return seen


# ------------------------------------------------------------------------------------------------
# The schedule


def test_lr_factor_warmup_then_cosine():
    spe, epochs = 10, 5  # 50 steps, 10 of warmup
    f = [L.lr_factor(s, spe, epochs, 1.0, "cosine") for s in range(spe * epochs)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear, the first step already moves
    assert f[10] == 1.0
    assert all(b < a for a, b in zip(f[10:], f[11:]))  # strictly decreasing after the warmup
    assert f[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert 0 < f[-1] < 0.01  # the last step still moves, with ~0 lr


def test_lr_factor_constant_no_warmup_and_fractional_warmup():
    assert [L.lr_factor(s, 7, 3, 0.0, "constant") for s in range(21)] == [1.0] * 21
    assert L.lr_factor(0, 7, 3, 0.0, "cosine") == 1.0  # no warmup: cosine starts at --lr
    # 0.5 epoch of 8 steps = 4 warmup steps.
    assert [L.lr_factor(s, 8, 2, 0.5, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown --lr-schedule 'step'"):
        L.lr_factor(5, 8, 2, 0.0, "step")


def test_run_uses_the_schedule_and_the_head_lr(monkeypatch):
    # Record every param group's lr at each Adam step of a 2-epoch, 2-steps-per-epoch NiN run.
    seen = _record_lrs(monkeypatch, torch.optim.Adam)
    s = run(_args(None, "nin_cifar10", 2, 32, 16, "--lr", "0.002", "--warmup", "0.5", "--head-lr-scale", "0.1"))
    assert (s["lr_schedule"], s["warmup_epochs"], s["head_lr_scale"], s["init"]) == ("cosine", 0.5, 0.1,
                                                                                       "kaiming-head")
    want = [L.lr_factor(i, 2, 2, 0.5, "cosine") for i in range(4)]  # 1, 1, 0.75, 0.25
    assert want == pytest.approx([1.0, 1.0, 0.75, 0.25])
    assert len(seen) == 4
    for (body, head), f in zip(seen, want):
        assert body == pytest.approx(0.002 * f) and head == pytest.approx(0.0002 * f)


def test_model_with_a_linear_head_has_one_group_and_xavier(monkeypatch):
    # LeNet's logits come out of a Linear: --init auto stays xavier, no head group, head scale 1.
    seen = _record_lrs(monkeypatch, torch.optim.SGD)
    s = run(_args(None, "lenet", 1, 32, 16, "--optimizer", "sgd", "--lr-schedule", "constant", "--warmup", "0"))
    assert (s["init"], s["head_lr_scale"], s["lr_schedule"]) == ("xavier", 1.0, "constant")
    assert seen == [[L.DEFAULT_LR["sgd"]], [L.DEFAULT_LR["sgd"]]]


# ------------------------------------------------------------------------------------------------
# The init


def test_relu_head_found_only_in_nin():
    for name in ("nin_cifar10", "nin"):
        m = models.get(name, num_classes=7, in_channels=1)
        head = L._relu_head(m, 7)
        assert isinstance(head, nn.Conv2d) and head.out_channels == 7
        assert head is [c for c in m.modules() if isinstance(c, nn.Conv2d)][-1]
    for name in ("lenet", "alexnet", "resnet18"):
        assert L._relu_head(models.get(name, num_classes=10, in_channels=1), 10) is None, name


def test_kaiming_head_init():
    torch.manual_seed(0)
    m = models.get("nin_cifar10", num_classes=10, in_channels=1)
    L._init_convs(m, "kaiming-head", 10)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    head, body = convs[-1], convs[:-1]
    assert torch.equal(head.bias, torch.full((10,), L.HEAD_BIAS)) and L.HEAD_BIAS > 0
    assert head.weight.std().item() == pytest.approx(L.HEAD_WEIGHT_STD, rel=0.1)
    for c in body:
        assert torch.equal(c.bias, torch.zeros_like(c.bias))
        fan_in = c.weight[0].numel()
        assert c.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)
    # Every class starts alive: the head's pre-activation is positive on most pixels of real-sized input.
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        logits = m(x)
    assert (logits > 0).all()


# ------------------------------------------------------------------------------------------------
# Bad values


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--warmup", "-1"], r"--warmup must be a number of epochs >= 0, got -1"),
        (["--warmup", "nan"], r"--warmup must be a number of epochs >= 0, got nan"),
        (["--head-lr-scale", "0"], r"--head-lr-scale must be a positive number, got 0"),
        (["--head-lr-scale", "inf"], r"--head-lr-scale must be a positive number, got inf"),
        (["--init", "kaiming-head", "--model", "lenet"], r"--init kaiming-head: the model's logits do not come "
                                                         r"out of a ReLU"),
    ],
)
def test_bad_recipe_values_clear_error(argv, message, capsys):
    base = ["--epochs", "1", "--limit", "8", "--device", "cpu", "--no-progress", "--model", "nin_cifar10"]
    with pytest.raises(ValueError, match=message):
        run(base + argv)
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastnin-train: error: ") and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--lr-schedule", "step"], ["--init", "orthogonal"]])
def test_bad_choices_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run(["--epochs", "1", "--limit", "8"] + argv)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Resume


class _Interrupt(Exception):
    pass


def test_interrupted_nin_run_resumes_identically_with_schedule_and_head_group(tmp_path, monkeypatch):
    # 2 epochs of 2 steps: warmup over epoch 1, cosine over epoch 2, two param groups; killed at step 4.
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(_args(full))
    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Interrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(_Interrupt):
        run(_args(cut))
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    s = run(_args(cut, "nin_cifar10", 2, 32, 16, "--resume"))
    assert s["resumed_from_epoch"] == 1
    a = load_checkpoint(str(full / "checkpoint-epoch0002.pt"))
    b = load_checkpoint(str(cut / "checkpoint-epoch0002.pt"))
    for k, v in a["model_state"].items():
        assert torch.equal(v, b["model_state"][k]), k
    assert [g["lr"] for g in a["optimizer_state"]["param_groups"]] == \
        [g["lr"] for g in b["optimizer_state"]["param_groups"]]


def test_resume_with_other_head_group_layout_is_refused(tmp_path):
    run(_args(tmp_path, "nin_cifar10", 1))
    with pytest.raises(ValueError, match=r"optimizer state does not fit .*--head-lr-scale"):
        run(_args(tmp_path, "nin_cifar10", 2, 32, 16, "--resume", "--head-lr-scale", "1"))
