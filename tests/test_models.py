"""fastnin.models against their plain-torch twins (tests/twins.py, written from REFERENCE.md).

Every model loads its twin's state_dict (strict) and matches it in fp32 (relative error <= 1e-5,
max |ours - twin| / max |twin|): the output, the gradient of the input and of every parameter, and
the BatchNorm running statistics, in eval and in training mode (same dropout masks: the same seed
before each forward, and fastnin's kernels draw no random numbers). Inputs are the smallest each
model accepts, to keep the CPU time low.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import twins
from _utils import assert_close_rule
from conftest import HAS_TRITON, INTERPRET
from torch import nn

import fastnin
from fastnin.models.vgg import vgg

NAMES = ["nin", "nin_cifar10", "lenet", "alexnet", "vgg11", "googlenet", "resnet18"]
# The smallest input side each model accepts (the ones with a fixed classifier need their own).
SMALL = {"nin": 67, "nin_cifar10": 8, "lenet": 28, "alexnet": 224, "vgg11": 224, "googlenet": 32, "resnet18": 32}
RTOL = 1e-5


def in_channels(name: str) -> int:
    return 3 if name == "nin_cifar10" else 1


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_rel(a, b, what, rtol=RTOL):
    assert a is not None, f"{what}: no gradient"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)


def make_pair(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    twin = twins.TWINS[name](**kwargs)
    randomize_bn(twin, seed)
    ours = fastnin.models.get(name, **kwargs)
    ours.load_state_dict(twin.state_dict())  # strict: same keys, same shapes
    return ours, twin


def _forward_backward(model, x, train, seed):
    model.train(train)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout masks in both models
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype))
    return y, x.grad


def compare_with_twin(ours, twin, x, train: bool, seed: int = 1, rtol=RTOL, grad_rtol=1e-9):
    """ours and twin (same weights) agree on x: the output in x's dtype (relative error <= rtol);
    the output, the input gradient, every parameter's gradient and the buffers in float64
    (relative error <= grad_rtol).

    Why the gradients in float64: a network with max-pooling is not differentiable where two
    inputs of a pooling window tie, and fp32 rounding (any two convolution algorithms differ by
    ~1e-7) moves near-ties to the other side. Seen in the default-initialized NiN at 67x67: two
    values of one 3x3 window 1e-8 apart, so fp32 input gradients of the plain model on oneDNN and
    on fastnin's kernels differ by 5% (relative to the largest), while the float64 ones agree to
    1e-15. In float64 such a flip needs a tie to ~1e-16. The models are then put back in x's dtype.
    """
    dtype = x.dtype
    ours.train(train)
    twin.train(train)
    # The forward in x's dtype must not move the BatchNorm statistics: those of ours and the twin
    # would then differ by that dtype's rounding, and so would every later float64 result.
    saved = [{k: b.clone() for k, b in m.named_buffers()} for m in (ours, twin)]
    with torch.no_grad():
        torch.manual_seed(seed)
        yo = ours(x)
        torch.manual_seed(seed)
        yt = twin(x)
    for m, bufs in zip((ours, twin), saved):
        for k, b in m.named_buffers():
            b.copy_(bufs[k])
    assert_rel(yo, yt, f"{dtype} output", rtol)
    ours.double()
    twin.double()
    try:
        yo, gxo = _forward_backward(ours, x.double(), train, seed)
        yt, gxt = _forward_backward(twin, x.double(), train, seed)
        assert_rel(yo, yt, "float64 output", grad_rtol)
        assert_rel(gxo, gxt, "input gradient", grad_rtol)
        pt = dict(twin.named_parameters())
        po = dict(ours.named_parameters())
        assert po.keys() == pt.keys()
        # A gradient that is zero in exact arithmetic (a conv bias right before a training-mode
        # BatchNorm, which subtracts the batch mean) is rounding noise in both; a relative error
        # means nothing there: such a gradient must only be as negligible in ours as in the twin.
        top = max(p.grad.abs().max().item() for p in pt.values())
        for k, p in pt.items():
            assert po[k].grad is not None, f"gradient of {k}: none"
            if p.grad.abs().max().item() <= 1e-9 * top:
                assert po[k].grad.abs().max().item() <= 1e-9 * top, f"gradient of {k}: not ~0 like the twin's"
                continue
            assert_rel(po[k].grad, p.grad, f"gradient of {k}", grad_rtol)
        bt = dict(twin.named_buffers())
        for k, b in ours.named_buffers():
            if b.is_floating_point():
                assert_rel(b, bt[k], f"buffer {k}", grad_rtol)
            else:
                assert torch.equal(b, bt[k]), k
    finally:
        ours.to(dtype)
        twin.to(dtype)
        # Rounding back to x's dtype can put two float64 statistics 1e-15 apart one ulp apart:
        # start any later comparison from the same state (the buffers were compared above).
        with torch.no_grad():
            bt = dict(twin.named_buffers())
            for k, b in ours.named_buffers():
                b.copy_(bt[k])
        ours.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# The API
# ----------------------------------------------------------------------------------------------


def test_registry():
    assert fastnin.models.list_models() == sorted(NAMES)
    assert {n: fastnin.models.input_size(n) for n in NAMES} == {
        "nin": 224, "nin_cifar10": 32, "lenet": 28, "alexnet": 224, "vgg11": 224, "googlenet": 96, "resnet18": 96,
    }  # fmt: skip
    assert fastnin.NiN is fastnin.models.NiN
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        fastnin.models.get("nope")
    with pytest.raises(ValueError, match="unknown model"):
        fastnin.models.input_size("NiN")
    with pytest.raises(ValueError, match="num_classes"):
        fastnin.NiN(num_classes=0)


@pytest.mark.parametrize("name", ["nin", "nin_cifar10", "lenet", "googlenet", "resnet18"])
def test_num_classes_and_in_channels(name):
    model = fastnin.models.get(name, num_classes=7, in_channels=2).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 2, SMALL[name], SMALL[name]))
    assert y.shape == (2, 7)


# ----------------------------------------------------------------------------------------------
# Every model against its twin (default backend: the native CPU kernels)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("alexnet", "vgg11")])
def test_matches_twin(name, train):
    ours, twin = make_pair(name)
    s = SMALL[name]
    x = torch.randn(2, in_channels(name), s, s, generator=torch.Generator().manual_seed(2))
    compare_with_twin(ours, twin, x, train)


@pytest.mark.parametrize("lrn", [False, True], ids=["plain", "lrn"])
def test_alexnet_matches_twin(lrn):
    ours, twin = make_pair("alexnet", lrn=lrn)
    x = torch.randn(1, 1, 224, 224, generator=torch.Generator().manual_seed(2))
    compare_with_twin(ours, twin, x, train=True)
    if lrn:
        assert sum(isinstance(m, fastnin.nn.LocalResponseNorm) for m in ours) == 2


@pytest.mark.slow  # 7.6 GFLOP per image forward, 129M parameters: ~25 s here
def test_vgg11_matches_twin():
    ours, twin = make_pair("vgg11")
    x = torch.randn(1, 1, 224, 224, generator=torch.Generator().manual_seed(2))
    compare_with_twin(ours, twin, x, train=True)


def test_vgg_small_matches_twin():
    """The VGG code path at a size the Triton interpreter and compile tests can afford."""
    arch = ((1, 8), (1, 16), (2, 16))
    torch.manual_seed(0)
    twin = twins.vgg(arch, input_size=32, hidden=64)
    ours = vgg(arch, input_size=32, hidden=64)
    ours.load_state_dict(twin.state_dict())
    compare_with_twin(ours, twin, torch.randn(2, 1, 32, 32), train=True)


def test_nin_keys_are_the_textbook_ones():
    keys = list(fastnin.NiN().state_dict())
    assert keys[0] == "0.0.weight" and keys[-1] == "7.4.bias" and len(keys) == 24


@pytest.mark.parametrize("name", ["nin", "nin_cifar10"])
def test_nin_every_backend(name, backend_device):
    """The fused NiN head (last mlpconv + GAP + Flatten as one mlpconv(gap=True)) on each backend.
    Under the Triton interpreter the real widths (96..384 channels) take minutes: there
    test_nin_cifar10_triton_interp (slow) and test_blocks_triton_interp (small widths) run instead."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton interpreter: see test_nin_cifar10_triton_interp and test_blocks_triton_interp")
    ours, twin = make_pair(name)
    ours.to(device)
    twin.to(device)
    s = SMALL[name]
    compare_with_twin(ours, twin, torch.randn(1, in_channels(name), s, s, device=device), train=False)


@pytest.mark.slow  # ~25 s under the interpreter, most of it in the backward kernels
@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="Triton interpreter not enabled")
def test_nin_cifar10_triton_interp():
    ours, twin = make_pair("nin_cifar10")
    with fastnin.use_backend("triton"):
        compare_with_twin(ours, twin, torch.randn(1, 3, 4, 4), train=False)


def test_nin_torch_backend():
    ours, twin = make_pair("nin")
    with fastnin.use_backend("torch"):
        compare_with_twin(ours, twin, torch.randn(2, 1, 67, 67), train=True)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="Triton interpreter not enabled")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_blocks_triton_interp(train):
    """The models' building blocks at small widths through the Triton backend: conv+ReLU, LRN,
    MLPConv with the GAP fused, the horizontally fused Inception (fused GAP included) and the
    Residual block with BatchNorm folded (eval) or not (train)."""
    from fastnin.models.googlenet import Inception
    from fastnin.models.resnet import Residual

    torch.manual_seed(0)
    ours = fastnin.nn.FusedSequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), fastnin.nn.LocalResponseNorm(3, alpha=1e-2, k=2.0),
        Residual(4, 6, use_1x1conv=True, strides=2),
        Inception(6, 2, (3, 4), (2, 3), 2),
        fastnin.nn.MLPConv(11, [5, 4], kernel_size=3, padding=1),
        Inception(4, 2, (3, 2), (2, 3), 2),
        fastnin.nn.GlobalAvgPool2d(flatten=False), nn.Flatten(),
    )  # fmt: skip
    twin = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(3, alpha=1e-2, k=2.0),
        twins.Residual(4, 6, use_1x1conv=True, strides=2),
        twins.Inception(6, 2, (3, 4), (2, 3), 2),
        twins._mlpconv(11, [5, 4], 3, 1),
        twins.Inception(4, 2, (3, 2), (2, 3), 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    randomize_bn(twin)
    ours.load_state_dict(twin.state_dict())
    with fastnin.use_backend("triton"):
        compare_with_twin(ours, twin, torch.randn(2, 2, 6, 5), train=train)


def test_resnet_folds_batchnorm_only_in_eval():
    """After training-mode forwards have moved the running statistics (identically), eval mode
    folds the new ones, and train mode gets torch's BatchNorm back. (Gradients in both modes:
    test_matches_twin.)"""
    ours, twin = make_pair("resnet18")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for train in (True, True, False, True, False):
            ours.train(train)
            twin.train(train)
            assert_rel(ours(x), twin(x), f"{'training' if train else 'eval'}-mode output")
            for (k, b), bt in zip(ours.named_buffers(), twin.buffers()):
                assert torch.equal(b, bt) if not b.is_floating_point() else rel_err(b, bt) <= RTOL, k


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def small_model(name):
    """The model at its smallest input (VGG-11's code path at a small width: the full one is tested
    against its twin above), without dropout so that the loss is a function of the weights."""
    if name == "vgg11":
        return vgg(((1, 8), (1, 16), (2, 16)), input_size=32, hidden=64, dropout=0.0), 32
    kwargs = {"dropout": 0.0} if name in ("nin", "nin_cifar10", "alexnet") else {}
    side = {"googlenet": 16, "resnet18": 16}.get(name, SMALL[name])
    return fastnin.models.get(name, **kwargs), side


# Learning rates that make 3 steps of SGD with momentum move each model from its default init
# (the sigmoid LeNet needs a large one; AlexNet and ResNet diverge above ~0.01 on random data).
LR = {"lenet": 0.5, "alexnet": 0.01, "resnet18": 0.01}


@pytest.mark.parametrize("name", NAMES)
def test_sgd_steps_lower_the_loss(name):
    """A few SGD steps on one random batch lower its loss by a clear margin (in training mode:
    ResNet's BatchNorm uses the batch statistics, as during the steps)."""
    torch.manual_seed(0)
    model, s = small_model(name)
    model.train()
    g = torch.Generator().manual_seed(3)
    n = 2 if name in ("alexnet", "googlenet") else 4
    x = torch.randn(n, in_channels(name), s, s, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=LR.get(name, 0.05), momentum=0.9)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y).item()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert final < losses[0] - 0.01, f"loss {losses[0]:.4f} -> {losses} -> {final:.4f}"


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------


# Inductor's C++ code generation costs 15-45 s per model on this 2-core CPU, so NiN (the drop-in)
# goes through Inductor and the others through "aot_eager": the same capture (fullgraph: no graph
# break in FusedSequential's planning, the Inception or Residual forward), the same fake kernels
# and the same AOT-autograd trace of fastnin's backward, without the code generation.
@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph(name):
    torch.manual_seed(0)
    model, s = small_model(name)
    model.eval()
    x = torch.randn(2, in_channels(name), s, s, requires_grad=True)
    eager = model(x)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if name == "nin" else "aot_eager")
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_training_resnet():
    """Training mode compiles too (BatchNorm as itself, batch statistics)."""
    torch.manual_seed(0)
    model, s = small_model("resnet18")
    x = torch.randn(2, 1, s, s)
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# NiN as a drop-in: layouts, dtypes, autocast, copies, checkpoints
# ----------------------------------------------------------------------------------------------


def test_nin_channels_last():
    ours, twin = make_pair("nin")
    ours = ours.to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 67, 67).contiguous(memory_format=torch.channels_last)
    compare_with_twin(ours, twin, x, train=False)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_models_run_channels_last_inside(train):
    """fastnin's own flat models carry maps in channels_last on the CPU kernels whatever the
    input's layout (the pools between the fused blocks then see channels_last), except into a
    Dropout in training mode, whose masks follow memory order (the same seed must drop the same
    elements as the plain model: test_matches_twin), and not at all with channels_last weights
    and an active Dropout."""
    ours, _ = make_pair("nin_cifar10")
    ours.train(train)
    seen = []
    for i in (1, 2):  # MaxPool2d, Dropout
        ours[i].register_forward_pre_hook(lambda m, args: seen.append(_is_cl(args[0])))
    x = torch.randn(2, 3, 8, 8)
    ours(x)
    assert seen == [True, not train]
    seen.clear()
    with fastnin.use_backend("torch"):  # not on the CPU kernels: as the plain model
        ours(x)
    assert seen == [False, False]
    seen.clear()
    ours.to(memory_format=torch.channels_last)
    ours(x)  # channels_last weights make the first block's output channels_last anyway
    assert seen == [True, True]


def test_channels_last_inside_restores_a_map_output():
    """A 4-D result of a channels_last_inside FusedSequential fed NCHW comes back NCHW (the layout
    the plain Sequential gives, so that a caller's .view() works), one fed channels_last stays so,
    and the values are the plain Sequential's."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 1), nn.ReLU())
    fused = fastnin.nn.FusedSequential(*copy.deepcopy(list(plain)))
    fused.channels_last_inside = True
    x = torch.randn(2, 3, 9, 10)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        y, want = fused(xin), plain(xin)
        assert y.is_contiguous(memory_format=suggest(want))
        assert_rel(y, want, "output")
    assert fused(x).is_contiguous()


def test_channels_last_inside_nested_blocks():
    """channels_last_inside(model) (VGG, GoogLeNet): a nested block hands its channels_last map to
    the next one as it is, and only the model's own 4-D result goes back to NCHW."""
    torch.manual_seed(0)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    plain = nn.Sequential(nn.Sequential(*block(1, 4)), nn.Sequential(*block(4, 6)))
    fused = fastnin.nn.channels_last_inside(
        fastnin.nn.FusedSequential(*[fastnin.nn.FusedSequential(*copy.deepcopy(list(b))) for b in plain])
    )
    seen = []
    fused[1].register_forward_pre_hook(lambda m, args: seen.append(_is_cl(args[0])))
    x = torch.randn(2, 1, 12, 10)
    y = fused(x)
    assert seen == [True] and y.is_contiguous()
    assert_rel(y, plain(x), "output")
    assert not fused[0].channels_last_restore and fused.channels_last_restore


def _is_cl(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last)


def suggest(t: torch.Tensor) -> torch.memory_format:
    return torch._prims_common.suggest_memory_format(t)


@pytest.mark.parametrize("n", [0, 1])
def test_nin_batch_0_and_1(n):
    ours, twin = make_pair("nin")
    ours.eval()
    twin.eval()
    x = torch.randn(n, 1, 67, 67)
    yo, yt = ours(x), twin(x)
    assert yo.shape == yt.shape == (n, 10)
    if n:
        assert_rel(yo, yt, "output")


def test_nin_to_float64():
    ours, twin = make_pair("nin")
    ours.to(torch.float64)
    twin.to(torch.float64)
    x = torch.randn(2, 1, 67, 67, dtype=torch.float64)
    compare_with_twin(ours, twin, x, train=False, rtol=1e-10)


def test_nin_bfloat16_weights():
    ours, twin = make_pair("nin")
    ref64 = copy.deepcopy(twin).double().eval()
    ours.to(torch.bfloat16).eval()
    twin.to(torch.bfloat16).eval()
    x = torch.randn(2, 1, 67, 67).to(torch.bfloat16)
    with torch.no_grad():
        assert_close_rule(ours(x), ref64(x.double()), twin(x), "bf16 output")


def test_nin_autocast_bf16():
    """Under autocast the fused blocks run in bfloat16 like the twin's convolutions, and the
    float32 parameters get float32 gradients."""
    ours, twin = make_pair("nin")
    ours.eval()
    twin.eval()
    ref64 = copy.deepcopy(twin).double()
    x = torch.randn(2, 1, 67, 67)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yo = ours(x)
        yt = twin(x)
    assert yo.dtype == yt.dtype == torch.bfloat16
    assert_close_rule(yo, ref64(x.double()), yt, "autocast output")
    yo.float().sum().backward()
    w = ours[0][0].weight
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_nin_inference_mode_and_torch_export():
    """Deployment paths: under torch.inference_mode the output is the twin's, and torch.export
    captures the fused ops as fastnin ops (their fake kernels give the shapes) whose exported
    module, run again, gives the same output. Exported in train mode too (dropout, autograd)."""
    ours, twin = make_pair("nin")
    ours.eval()
    twin.eval()
    x = torch.randn(2, 1, 67, 67)
    with torch.inference_mode():
        yo, yt = ours(x), twin(x)
    assert_rel(yo, yt, "inference_mode output")
    ep = torch.export.export(ours, (x,))
    traced = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("fastnin.mlpconv") for t in traced) == 4, traced
    assert not any("convolution" in t for t in traced), traced
    torch.testing.assert_close(ep.module()(x), yo, rtol=0, atol=0)
    ours.train()
    torch.export.export(ours, (x.clone().requires_grad_(),))


def test_nin_export_dynamic_batch_save_load():
    """An exported NiN with a dynamic batch dimension (the fake kernels take symbolic sizes) runs at
    other batch sizes, and survives torch.export.save / load (fastnin imported: its ops exist)."""
    ours, _ = make_pair("nin")
    ours.eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    ep = torch.export.export(ours, (torch.randn(2, 1, 67, 67),), dynamic_shapes={"x": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for n in (1, 5):
        x = torch.randn(n, 1, 67, 67)
        ref = ours(x)
        torch.testing.assert_close(ep.module()(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(loaded.module()(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["nin", "alexnet"])
def test_jit_trace(name):
    """torch.jit.trace (deprecated by torch, still used for deployment) cannot record mlpconv's
    Tensor?[] argument: it failed with "unsupported input list type: Tensor?". Under the tracer
    mlpconv records its plain torch composition (with a warning that says so); LRN and GAP record
    themselves. The traced model matches the twin, at another batch size too."""
    ours, twin = make_pair(name, dropout=0.0, **({"lrn": True} if name == "alexnet" else {}))
    ours.eval()
    twin.eval()
    s = SMALL[name]
    with pytest.warns(UserWarning, match="torch.jit.trace records the plain torch composition"):
        traced = torch.jit.trace(ours, torch.randn(2, 1, s, s))
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert "aten::_convolution" in kinds, kinds
    if name == "alexnet":
        assert "fastnin::lrn" in kinds, kinds
    x = torch.randn(3, 1, s, s)
    assert_rel(traced(x), twin(x), "traced output")


def test_nin_compile_dynamic_shapes_training():
    """torch.compile(dynamic=True): one graph for several batch sizes and image sides, forward and
    backward (the fake kernels and the backward op's fake take symbolic sizes), equal to eager."""
    ours, _ = make_pair("nin", dropout=0.0)
    eager = copy.deepcopy(ours)  # the same kernels uncompiled (a twin's fp32 gradients can differ
    torch._dynamo.reset()  # at max-pool near-ties: see compare_with_twin)
    torch._dynamo.utils.counters.clear()  # reset() keeps the counts of the tests before
    compiled = torch.compile(ours, dynamic=True, fullgraph=True, backend="aot_eager")
    for n, side in [(2, 67), (3, 67), (4, 75)]:  # (batch 1 would be specialized: Dynamo's 0/1 rule)
        x = torch.randn(n, 1, side, side)
        ours.zero_grad()
        eager.zero_grad()
        yo, ye = compiled(x), eager(x)
        torch.testing.assert_close(yo, ye, rtol=1e-6, atol=1e-7, msg=f"output {n}x{side}")
        yo.square().sum().backward()
        ye.square().sum().backward()
        for po, pe in zip(ours.parameters(), eager.parameters()):
            torch.testing.assert_close(po.grad, pe.grad, rtol=1e-6, atol=1e-7, msg=f"grad {n}x{side}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_nin_on_meta_device():
    """Deferred initialisation: built on the meta device, the model infers its output shape
    without data (mlpconv there once failed in its autocast check: meta has no autocast), then
    to_empty + load_state_dict gives a working model."""
    ours, _ = make_pair("nin")
    ours.eval()
    with torch.device("meta"):
        lazy = fastnin.models.get("nin")
    y = lazy(torch.empty(2, 1, 67, 67, device="meta"))
    assert y.shape == (2, 10) and y.device.type == "meta"
    lazy.to_empty(device="cpu").load_state_dict(ours.state_dict())
    x = torch.randn(2, 1, 67, 67)
    torch.testing.assert_close(lazy.eval()(x), ours(x), rtol=0, atol=0)


def test_nin_deepcopy_and_save_load():
    ours, _ = make_pair("nin")
    ours.eval()
    x = torch.randn(2, 1, 67, 67)
    ref = ours(x)
    clone = copy.deepcopy(ours)
    assert type(clone) is fastnin.NiN
    assert clone[0][0].weight is not ours[0][0].weight
    torch.testing.assert_close(clone(x), ref, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    # a checkpoint (state_dict) of ours loads into the plain twin and back
    twin = twins.nin()
    twin.load_state_dict(ours.state_dict())
    twin.eval()
    assert_rel(twin(x), ref, "twin with ours' weights")
