"""fastnin.fuse on the plain-torch twins and on a mixed model of fusable and unfusable parts:
the fused model computes the same function (output and every gradient, fp32 relative error
<= 1e-5), keeps the state_dict keys, reports what it replaced, and honours `inplace`."""

from __future__ import annotations

import copy

import pytest
import torch
import twins
from test_models import RTOL, assert_rel, compare_with_twin, randomize_bn
from torch import nn

import fastnin
from fastnin.nn import FusedSequential


# ----------------------------------------------------------------------------------------------
# The twins
# ----------------------------------------------------------------------------------------------

# name -> (factory, input shape, lines the report must hold)
TWIN_CASES = {
    "nin": (twins.nin, (2, 1, 67, 67), [
        "0.0-0.5 Conv2d(1->96, 11x11/4) -> ReLU -> Conv2d(96->96, 1x1) -> ReLU -> Conv2d(96->96, 1x1) -> ReLU"
        " => fastnin mlpconv (3 stages)",
        "7.0-7.5 Conv2d(384->10, 3x3) -> ReLU -> Conv2d(10->10, 1x1) -> ReLU -> Conv2d(10->10, 1x1) -> ReLU"
        " => fastnin mlpconv (3 stages)",
        "8-9 AdaptiveAvgPool2d -> Flatten => fastnin gap",
    ]),
    "nin_cifar10": (twins.nin_cifar10, (2, 3, 8, 8), ["7-8 AdaptiveAvgPool2d -> Flatten => fastnin gap"]),
    "lenet": (twins.lenet, (2, 1, 28, 28), []),
    "vgg_small": (lambda: twins.vgg(((1, 8), (2, 16)), input_size=16, hidden=32), (2, 1, 16, 16), [
        "0.0-0.1 Conv2d(1->8, 3x3) -> ReLU => fastnin mlpconv (1 stage)",
        "1.2-1.3 Conv2d(16->16, 3x3) -> ReLU => fastnin mlpconv (1 stage)",
    ]),
    "googlenet": (twins.googlenet, (2, 1, 32, 32), [
        "1.2-1.3 Conv2d(64->192, 3x3) -> ReLU => fastnin mlpconv (1 stage)",
        "4.2-4.3 AdaptiveAvgPool2d -> Flatten => fastnin gap",
    ]),
    "resnet18": (twins.resnet18, (2, 1, 16, 16), [
        "0.0-0.2 Conv2d(1->64, 7x7/2) -> BatchNorm2d -> ReLU"
        " => fastnin mlpconv (1 stage, BatchNorm folded (eval mode))",
        "5-6 AdaptiveAvgPool2d -> Flatten => fastnin gap",
    ]),
}  # fmt: skip


# Training mode for the small twins only: GoogLeNet's and ResNet's fused parts in training mode
# (plain conv+ReLU runs, BatchNorm as itself) are those of the other twins and of the mixed model.
TWIN_PARAMS = [(n, False) for n in TWIN_CASES] + [(n, True) for n in ("nin", "nin_cifar10", "lenet", "vgg_small")]


@pytest.mark.parametrize("name,train", TWIN_PARAMS, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in TWIN_PARAMS])
def test_fuse_twin(name, train):
    factory, shape, lines = TWIN_CASES[name]
    torch.manual_seed(0)
    plain = factory()
    randomize_bn(plain)
    plain.train(train)
    keys = list(plain.state_dict())
    fused = fastnin.fuse(plain)
    assert list(fused.state_dict()) == keys
    report = fused.fastnin_report
    if not train:  # the BatchNorm is folded only in eval mode
        for ln in lines:
            assert ln in report.lines, f"{ln!r} not in\n{report}"
    if name == "lenet":
        assert report.replaced == [], str(report)  # sigmoids and 2x2 average pools: nothing to fuse
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    compare_with_twin(fused, plain, x, train=train)


def test_fuse_alexnet_lrn():
    torch.manual_seed(0)
    plain = twins.alexnet(lrn=True).eval()
    fused = fastnin.fuse(plain)
    assert sum(type(m) is fastnin.nn.LocalResponseNorm for m in fused.modules()) == 2
    assert sum(type(m) is nn.LocalResponseNorm for m in plain.modules()) == 2  # the original is untouched
    assert "2: LocalResponseNorm => fastnin lrn" in fused.fastnin_report.lines
    assert "0-1 Conv2d(1->96, 11x11/4) -> ReLU => fastnin mlpconv (1 stage)" in fused.fastnin_report.lines
    x = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        assert_rel(fused(x), plain(x), "output")


# ----------------------------------------------------------------------------------------------
# A model of our own: fusable and unfusable parts mixed, Sequentials nested in a custom module
# ----------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),  # 0-1 fused, in-place ReLU included
            nn.Conv2d(8, 8, 1), nn.ReLU(),  # 2-3 second stage of the same mlpconv
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),  # 4 kept: groups
            nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),  # 6 kept: dilation
            nn.Conv2d(8, 6, 3, padding=1), nn.LeakyReLU(0.1),  # 8 kept: not a ReLU
            nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),  # 10-12 folded in eval only
            nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(),  # 13 kept: padding mode
            nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6),  # 15-16: conv + BN folded in eval (no ReLU)
            nn.LocalResponseNorm(3, alpha=1e-2, k=2.0),  # 17 fastnin lrn
            nn.AvgPool2d(2),  # 18 not global: kept
            nn.Conv2d(6, 5, 2, padding="same"), nn.ReLU(),  # 19 kept: asymmetric 'same'
            nn.Conv2d(5, 5, 3, padding="same"), nn.ReLU(),  # 21-22 fused ('same' of an odd kernel)
            nn.Conv2d(5, 4, 1), nn.ReLU(),  # 23-24 second stage
            nn.AvgPool2d(3), nn.Flatten(),  # 25-26 GAP fused into the mlpconv when the map is 3x3
        )  # fmt: skip
        self.side = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d((1, 1))  # called from forward: becomes GlobalAvgPool2d
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        a = self.features(x)
        b = torch.flatten(self.pool(self.side(x)), 1)
        return self.head(torch.cat([a, b], 1))


def make_mixed(train: bool) -> Mixed:
    torch.manual_seed(0)
    m = Mixed()
    randomize_bn(m)
    return m.train(train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fuse_mixed_matches(train):
    plain = make_mixed(train)
    fused = fastnin.fuse(plain)
    x = torch.randn(2, 3, 6, 6)
    compare_with_twin(fused, plain, x, train=train)
    compare_with_twin(fused, plain, x, train=not train)  # the mode can change after fusing


def test_fuse_mixed_report():
    fused = fastnin.fuse(make_mixed(train=False))
    lines = fused.fastnin_report.lines
    expected = [
        "features.0-features.3 Conv2d(3->8, 3x3) -> ReLU -> Conv2d(8->8, 1x1) -> ReLU => fastnin mlpconv (2 stages)",
        "features.4 Conv2d(8->8, 3x3): kept (groups=2)",
        "features.6 Conv2d(8->8, 3x3): kept (dilation=(2, 2))",
        "features.8 Conv2d(8->6, 3x3): kept (followed by LeakyReLU, not by ReLU or an eval-mode BatchNorm2d)",
        "features.10-features.12 Conv2d(6->6, 3x3) -> BatchNorm2d -> ReLU"
        " => fastnin mlpconv (1 stage, BatchNorm folded (eval mode))",
        "features.13 Conv2d(6->6, 3x3): kept (padding_mode='reflect')",
        "features.15-features.16 Conv2d(6->6, 1x1) -> BatchNorm2d => Conv2d with BatchNorm folded (eval mode)",
        "features.17: LocalResponseNorm => fastnin lrn",
        "features.18 AvgPool2d: fastnin gap only when its 2x2 kernel covers the whole map",
        "features.19 Conv2d(6->5, 2x2): kept ('same' padding of an even kernel is asymmetric)",
        "features.21-features.26 Conv2d(5->5, 3x3) -> ReLU -> Conv2d(5->4, 1x1) -> ReLU -> AvgPool2d -> Flatten"
        " => fastnin mlpconv (2 stages, global average pool fused when the AvgPool2d covers the whole map)",
        "side.0-side.1 Conv2d(3->4, 3x3) -> ReLU => fastnin mlpconv (1 stage)",
        "side.2-side.3 Conv2d(4->4, 3x3) -> ReLU => fastnin mlpconv (1 stage)",
        "pool: AdaptiveAvgPool2d(1) => fastnin GlobalAvgPool2d(flatten=False)",
    ]
    assert sorted(lines) == sorted(expected), str(fused.fastnin_report)
    assert isinstance(fused.pool, fastnin.nn.GlobalAvgPool2d)
    assert type(fused.features) is FusedSequential and type(fused.features[17]) is fastnin.nn.LocalResponseNorm
    # in training mode the BatchNorms are not folded, and the report says so
    train_lines = fastnin.fuse(make_mixed(train=True)).fastnin_report.lines
    kept = "features.10 Conv2d(6->6, 3x3): kept (the BatchNorm2d after it is in training mode; folded in eval mode)"
    assert kept in train_lines
    assert not any("features.10-" in ln or "features.15-" in ln for ln in train_lines)


def test_fuse_avgpool_not_covering_runs_as_itself():
    """An AvgPool2d after an mlpconv is fused only when it covers the map: at 8x8 the 3x3 pool of
    the mixed model is not global (the result is then [N, 4 * 2 * 2]... fed to the head only at 6x6),
    so check the Sequential alone."""
    plain = make_mixed(train=False).features
    fused = fastnin.fuse(plain)
    x = torch.randn(2, 3, 12, 12)  # the last map is 6x6: AvgPool2d(3) leaves 2x2
    with torch.no_grad():
        y, ref = fused(x), plain(x)
    assert y.shape == ref.shape == (2, 16)
    assert_rel(y, ref, "output")


def test_fuse_inplace_shares_and_copy_does_not():
    plain = make_mixed(train=False)
    w = plain.features[0].weight
    copied = fastnin.fuse(plain)
    assert copied is not plain and copied.features[0].weight is not w
    assert type(plain.features) is nn.Sequential and isinstance(plain.pool, nn.AdaptiveAvgPool2d)
    assert type(plain.features[17]) is nn.LocalResponseNorm  # untouched
    same = fastnin.fuse(plain, inplace=True)
    assert same is plain and type(plain.features) is FusedSequential
    assert plain.features[0].weight is w  # shared, not copied
    assert hasattr(plain, "fastnin_report")


def test_fuse_keeps_state_dict_compatible():
    plain = make_mixed(train=False)
    fused = fastnin.fuse(plain)
    assert list(fused.state_dict()) == list(plain.state_dict())
    other = make_mixed(train=False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    fused.load_state_dict(other.state_dict())  # strict
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_rel(fused(x), other(x), "after loading another checkpoint")


def test_fuse_keeps_modules_with_hooks():
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.ReLU())
    seen = []
    plain[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused = fastnin.fuse(plain, inplace=True)
    assert fused.fastnin_report.replaced == ["0-1 Conv2d(2->3, 3x3) -> ReLU => fastnin mlpconv (1 stage)"]
    assert "2 Conv2d(3->3, 3x3): kept (it has hooks)" in fused.fastnin_report.lines
    fused(torch.randn(1, 2, 7, 7))
    assert seen == [torch.Size([1, 3, 3, 3])]


def test_fuse_unbatched_input_runs_plain():
    """Conv2d takes an unbatched [C, H, W] input, mlpconv does not: the Sequential then runs its
    children as they are."""
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.ReLU())
    fused = fastnin.fuse(plain)
    x = torch.randn(2, 5, 5)
    assert_rel(fused(x), plain(x), "unbatched output")


def test_fuse_verbose_and_bad_input(capsys):
    fastnin.fuse(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), verbose=True)
    assert "0-1 Conv2d(1->2, 3x3) -> ReLU => fastnin mlpconv (1 stage)" in capsys.readouterr().out
    assert str(fastnin.fuse(nn.Linear(2, 2)).fastnin_report) == "fastnin.fuse: nothing to fuse"
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        fastnin.fuse(lambda x: x)


def test_fuse_compile_fullgraph():
    fused = fastnin.fuse(make_mixed(train=False))
    x = torch.randn(2, 3, 6, 6)
    ref = fused(x)
    torch._dynamo.reset()
    out = torch.compile(fused, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=1e-6)


def test_fuse_deepcopy_of_fused():
    fused = fastnin.fuse(make_mixed(train=False))
    clone = copy.deepcopy(fused)
    assert type(clone.features) is FusedSequential
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), fused(x), rtol=0, atol=0)
