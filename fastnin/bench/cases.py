"""The benchmark cases: one setup per case, shared by the speed, memory and error measurements.

Op cases (the shapes of ../shared/REFERENCE.md), each forward ("fwd") and forward+backward
("fwdbwd", the gradients of x, every weight and every bias):
  mlpconv  the textbook NiN blocks at 224x224 input, the paper's CIFAR-10 NiN blocks at 32x32,
           the ImageNet NiN's widest stage (1024 channels) with the fused GAP (--full)
  lrn      AlexNet's LRN (size 5, alpha 1e-4, beta 0.75, k 2) on 96x55x55 and 256x27x27
  gap      64x384x13x13 (the issue's target shape) and the ImageNet NiN's 1000x6x6
Model cases (fastnin.models, when it is installed): inference ("infer", eval mode, no_grad) and
one training step ("train": forward, cross-entropy, backward, SGD step).

`prepare(case, provider, device, dtype)` builds everything a measurement needs once: the input
sets (rotated on the GPU, see timing.rotation_count), the function to time and the one that
measures the error against the float64 reference.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from . import timing
from .providers import Provider

_ELEMENT = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}

# Targets of the issues, evaluated on the shapes they name only (the default batch, not --quick):
# (device type, dtypes, metric, threshold). Metrics: "vs_eager" (over torch eager in its faster
# layout), "vs_eager_cl" (over eager channels_last), "vs_compile", "bw_frac" (fraction of the
# measured device-to-device copy bandwidth).
CPU32 = ("cpu", ("fp32",))
GPU = ("cuda", ("fp32", "bf16"))


@dataclass(frozen=True)
class Target:
    device: str
    dtypes: tuple[str, ...]
    metric: str
    threshold: float
    source: str

    def label(self) -> str:
        what = {
            "vs_eager": "x eager (best layout)",
            "vs_eager_cl": "x eager channels_last",
            "vs_compile": "x torch.compile",
            "bw_frac": "of copy bandwidth",
        }[self.metric]
        return f">= {self.threshold:g}{what} ({self.source})"


@dataclass(frozen=True)
class Case:
    name: str  # unique, e.g. "mlpconv cifar.b2"
    group: str  # "ops" | "models"
    op: str  # "mlpconv" | "lrn" | "gap" | a model name
    mode: str  # "fwd" | "fwdbwd" | "infer" | "train"
    batch: int
    spec: dict = field(default_factory=dict, hash=False, compare=False)
    default: bool = True  # part of the default run (else --full only)
    targets: tuple[Target, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.name} {self.mode}"

    @property
    def shape(self) -> str:
        s = self.spec
        if self.op == "mlpconv":
            k = s["k"]
            chans = ",".join(str(c) for c in s["chans"])
            extra = f" s{s['stride']}" if s["stride"] != 1 else ""
            extra += f" p{s['padding']}" if s["padding"] else ""
            extra += " +gap" if s.get("gap") else ""
            return f"{self.batch}x{s['cin']}x{s['h']}x{s['w']} k{k}{extra} ->{chans}"
        if self.op in ("lrn", "gap"):
            return f"{self.batch}x{s['c']}x{s['h']}x{s['w']}"
        return f"batch {self.batch}"  # models: the input size comes from fastnin.models at setup

    # -- work, for throughput ---------------------------------------------------------------
    def flops(self) -> float | None:
        """mlpconv: multiply-adds x 2 of the forward; forward+backward counts 3x (the backward
        computes grad-input and grad-weight products of the forward's size each)."""
        if self.op != "mlpconv":
            return None
        s = self.spec
        ho, wo = out_hw(s)
        macs, prev = 0, s["cin"] * s["k"] * s["k"]
        for c in s["chans"]:
            macs += prev * c
            prev = c
        f = 2.0 * self.batch * ho * wo * macs
        return 3 * f if self.mode == "fwdbwd" else f

    def bytes(self, dtype: torch.dtype) -> float | None:
        """lrn/gap: the least traffic the op needs (each tensor read or written once)."""
        s, e = self.spec, _ELEMENT[dtype]
        if self.op == "lrn":
            n = self.batch * s["c"] * s["h"] * s["w"]
            return float(e * n * (2 if self.mode == "fwd" else 5))  # fwd x->y; bwd dy, x -> dx
        if self.op == "gap":
            n, nc = self.batch * s["c"] * s["h"] * s["w"], self.batch * s["c"]
            return float(e * ((n + nc) if self.mode == "fwd" else 2 * (n + nc)))
        return None


def out_hw(s: dict) -> tuple[int, int]:
    k, st, p = s["k"], s["stride"], s["padding"]
    return ((s["h"] + 2 * p - k) // st + 1, (s["w"] + 2 * p - k) // st + 1)


# ----------------------------------------------------------------------------------------------
# The case list
# ----------------------------------------------------------------------------------------------

MLPCONV_BLOCKS = [
    # name, cin, h, w, k, stride, padding, chans, gap, cpu batch, default
    ("nin.b1", 1, 224, 224, 11, 4, 0, (96, 96, 96), False, 8, True),
    ("nin.b2", 96, 26, 26, 5, 1, 2, (256, 256, 256), False, 8, True),
    ("nin.b3", 256, 12, 12, 3, 1, 1, (384, 384, 384), False, 8, True),
    ("nin.b4+gap", 384, 5, 5, 3, 1, 1, (10, 10, 10), True, 8, True),
    ("cifar.b1", 3, 32, 32, 5, 1, 2, (192, 160, 96), False, 32, True),
    ("cifar.b2", 96, 16, 16, 5, 1, 2, (192, 192, 192), False, 32, True),
    ("cifar.b3", 192, 8, 8, 3, 1, 1, (192, 192, 10), False, 32, True),
    ("cifar.b3+gap", 192, 8, 8, 3, 1, 1, (192, 192, 10), True, 32, False),
    ("imagenet.b4+gap", 384, 6, 6, 3, 1, 1, (1024, 1024, 1000), True, 8, False),
]
LRN_SHAPES = [("alexnet.lrn1", 96, 55, 55, 16, True), ("alexnet.lrn2", 256, 27, 27, 16, True)]
GAP_SHAPES = [("gap.384x13", 384, 13, 13, 64, True), ("imagenet.gap", 1000, 6, 6, 64, True)]
LRN_ARGS = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)  # AlexNet's

# name, fastnin.models.get kwargs, CPU batch, in the default run
MODELS = [
    ("lenet", {}, 32, False),
    ("nin_cifar10", {}, 32, True),
    ("nin", {}, 4, True),
    ("alexnet_lrn", {"lrn": True}, 4, True),
    ("vgg11", {}, 2, False),
    ("googlenet", {}, 8, False),
    ("resnet18", {}, 8, False),
]
QUICK_MODELS = ("lenet", "nin_cifar10")
GPU_BATCH = 128


def _mlpconv_targets(name: str, mode: str) -> tuple[Target, ...]:
    t: list[Target] = []
    if name.startswith("cifar.b") and "+gap" not in name:
        t.append(Target(*CPU32, "vs_eager", 1.15 if mode == "fwd" else 1.0, "issue 2"))
    if name.startswith(("nin.", "cifar.")):
        if mode == "fwd":
            t += [Target(*GPU, "vs_eager_cl", 1.5, "issues 3/4"), Target(*GPU, "vs_compile", 1.3, "issues 3/4")]
        else:
            t.append(Target(*GPU, "vs_eager_cl", 1.3, "issues 3/4"))
    return tuple(t)


def all_cases(device: str = "cpu", batch: int | None = None, quick: bool = False) -> list[Case]:
    """Every case, with batch sizes for `device` (the issue-2 sizes on the CPU, 128 on the GPU)
    or `batch` if given; `quick` shrinks every shape to a tiny one."""
    gpu = torch.device(device).type == "cuda"
    cases: list[Case] = []

    def pick(cpu_batch: int) -> int:
        return batch if batch is not None else (GPU_BATCH if gpu else cpu_batch)

    for name, cin, h, w, k, st, p, chans, gap, cb, dflt in MLPCONV_BLOCKS:
        spec = dict(cin=cin, h=h, w=w, k=k, stride=st, padding=p, chans=chans, gap=gap)
        for mode in ("fwd", "fwdbwd"):
            cases.append(
                Case(f"mlpconv {name}", "ops", "mlpconv", mode, pick(cb), spec, dflt, _mlpconv_targets(name, mode))
            )
    for name, c, h, w, cb, dflt in LRN_SHAPES:
        for mode in ("fwd", "fwdbwd"):
            t: tuple[Target, ...] = ()
            if name == "alexnet.lrn1":
                t = (Target(*CPU32, "vs_eager", 8.0 if mode == "fwd" else 5.0, "issue 2"),)
            if mode == "fwdbwd":
                t += (Target(*GPU, "vs_eager", 10.0, "issues 3/4"), Target(*GPU, "bw_frac", 0.8, "issues 3/4"))
            cases.append(Case(f"lrn {name}", "ops", "lrn", mode, pick(cb), dict(c=c, h=h, w=w, **LRN_ARGS), dflt, t))
    for name, c, h, w, cb, dflt in GAP_SHAPES:
        for mode in ("fwd", "fwdbwd"):
            t = (Target(*GPU, "bw_frac", 0.85, "issues 3/4"),)
            if name == "gap.384x13":
                t += (Target(*CPU32, "vs_eager", 1.0, "issue 2"),)
            cases.append(Case(f"gap {name}", "ops", "gap", mode, pick(cb), dict(c=c, h=h, w=w), dflt, t))
    for name, kwargs, cb, dflt in MODELS:
        for mode in ("infer", "train"):
            cases.append(Case(f"model {name}", "models", name, mode, pick(cb), dict(kwargs=kwargs), dflt))
    # The issues' target cases first (the paper CIFAR-10 blocks, AlexNet's LRN, GAP), then the
    # other op shapes, then the models: a run cut short by --budget has measured those that matter.
    def rank(c: Case) -> int:
        if c.group == "models":
            return 3
        return 0 if c.name.startswith("mlpconv cifar") else 1 if c.op in ("lrn", "gap") else 2

    cases.sort(key=rank)
    if quick:
        cases = [shrink(c) for c in cases if c.group == "ops" or c.op in QUICK_MODELS]
    return cases


def shrink(case: Case) -> Case:
    """The tiny version of a case (quick mode: CI runs every case in seconds). Targets dropped."""
    s = dict(case.spec)
    if case.op == "mlpconv":
        s["cin"] = min(s["cin"], 3) if s["cin"] <= 3 else max(2, s["cin"] // 16)
        s["chans"] = tuple(max(2, c // 16) for c in s["chans"])
        s["h"] = max(s["k"], s["h"] // 8)
        s["w"] = max(s["k"], s["w"] // 8) + 1  # odd and non-square
    elif case.op in ("lrn", "gap"):
        s["c"] = max(6, s["c"] // 16)
        s["h"], s["w"] = max(2, s["h"] // 6), max(3, s["w"] // 6 + 1)
    return replace(case, batch=2, spec=s, default=True, targets=())


def select(cases: list[Case], ops: list[str] | None, models: list[str] | None, full: bool) -> list[Case]:
    """--ops / --models: op names ("mlpconv", "lrn", "gap"), case-name substrings ("cifar") or
    "all"/"none"; model names or "all"/"none". Without them: the default cases, or all with --full."""

    def keep(c: Case, wanted: list[str] | None) -> bool:
        if wanted is None:
            return full or c.default
        if wanted == ["none"]:
            return False
        if "all" in wanted:
            return True
        return any(w == c.op or w in c.name for w in wanted)

    return [c for c in cases if keep(c, ops if c.group == "ops" else models)]


# ----------------------------------------------------------------------------------------------
# Inputs, functions to time, errors
# ----------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    fn: Callable[[], object]  # one call of the case (cycling over the input sets)
    error: Callable[[], dict | None]  # {abs, rel} error vs the float64 reference over outputs (+ gradients)
    sets: int  # how many input sets the timed function rotates over
    note: str = ""
    shape: str | None = None  # the input shape, where the case cannot tell it before setup (models)


def _randn(shape, device, dtype, scale=1.0, gen=None):
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def op_inputs(case: Case, device, dtype, seed: int = 0) -> dict:
    """One input set of an op case (float values drawn on the CPU, so every device and dtype
    sees the same numbers). Weights are Kaiming-scaled so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    s, n = case.spec, case.batch
    if case.op == "mlpconv":
        x = _randn((n, s["cin"], s["h"], s["w"]), device, dtype, gen=g)
        ws, bs, prev = [], [], s["cin"]
        for i, c in enumerate(s["chans"]):
            k = s["k"] if i == 0 else 1
            ws.append(_randn((c, prev, k, k), device, dtype, math.sqrt(2.0 / (prev * k * k)), g))
            bs.append(_randn((c,), device, dtype, 0.1, g))
            prev = c
        if s.get("gap"):
            out_shape = (n, prev)
        else:
            out_shape = (n, prev, *out_hw(s))
        return dict(x=x, weights=ws, biases=bs, grad_out=_randn(out_shape, device, dtype, gen=g))
    x = _randn((n, s["c"], s["h"], s["w"]), device, dtype, gen=g)
    out_shape = tuple(x.shape) if case.op == "lrn" else (n, s["c"])
    return dict(x=x, grad_out=_randn(out_shape, device, dtype, gen=g))


def _leaves(inp: dict) -> list[torch.Tensor]:
    return [inp["x"], *inp.get("weights", []), *inp.get("biases", [])]


def _to_layout(inp: dict, channels_last: bool) -> dict:
    if not channels_last:
        return inp
    out = dict(inp)
    cl = torch.channels_last
    out["x"] = inp["x"].contiguous(memory_format=cl)
    if "weights" in inp:
        out["weights"] = [w.contiguous(memory_format=cl) for w in inp["weights"]]
    if inp["grad_out"].dim() == 4:  # the gradient the next layer would hand back has its layout
        out["grad_out"] = inp["grad_out"].contiguous(memory_format=cl)
    return out


def _eager_op(case: Case) -> Callable:
    """The plain torch composition of an op case: f(x, weights, biases) -> Tensor."""
    from .. import reference

    s = case.spec
    if case.op == "mlpconv":
        st, p, gap = (s["stride"],) * 2, (s["padding"],) * 2, s.get("gap", False)
        return lambda x, weights, biases: reference.mlpconv(x, weights, biases, st, p, gap)
    if case.op == "lrn":
        return lambda x, weights=None, biases=None: reference.local_response_norm(
            x, s["size"], s["alpha"], s["beta"], s["k"]
        )
    # The comparator for GAP: adaptive_avg_pool2d(x, 1).
    return lambda x, weights=None, biases=None: F.adaptive_avg_pool2d(x, 1).flatten(1)


def _fastnin_op(case: Case) -> Callable:
    from .. import ops

    s = case.spec
    if case.op == "mlpconv":
        return lambda x, weights, biases: ops.mlpconv(
            x, weights, biases, s["stride"], s["padding"], gap=s.get("gap", False)
        )
    if case.op == "lrn":
        return lambda x, weights=None, biases=None: ops.local_response_norm(x, s["size"], s["alpha"], s["beta"], s["k"])
    return lambda x, weights=None, biases=None: ops.global_avg_pool2d(x)


def _with_backend(provider: Provider, f: Callable) -> Callable:
    def run(*args, **kwargs):
        with provider.context():
            return f(*args, **kwargs)

    return run


def _op_function(case: Case, provider: Provider) -> Callable:
    if provider.is_fastnin:
        return _with_backend(provider, _fastnin_op(case))
    f = _eager_op(case)
    if provider.kind == "compile":
        torch._dynamo.reset()
        f = torch.compile(f, mode=provider.compile_mode, dynamic=False)
    return f


def _call(case: Case, f: Callable, inp: dict):
    """One call: the output (fwd), or the output and the gradient of every input (fwdbwd).
    torch.autograd.grad rather than .backward(): no accumulation into .grad to time."""
    out = f(inp["x"], inp.get("weights"), inp.get("biases"))
    if case.mode == "fwd":
        return (out,)
    leaves = _leaves(inp)
    grads = torch.autograd.grad(out, leaves, inp["grad_out"])
    return (out, *grads)


def _max_err(got, ref) -> dict:
    """{"abs": max |a - r|, "rel": the largest over tensors of max |a - r| / max |r|}. The relative
    form makes cases comparable: weight gradients summed over a batch of images reach 1e3-1e4,
    where fp32 rounding alone moves them by more than 1e-3."""
    abs_err = rel_err = 0.0
    for a, r in zip(got, ref):
        if a is None or r is None or a.numel() == 0:
            continue
        r = r.detach().double()
        d = (a.detach().double() - r).abs().max().item()
        abs_err = max(abs_err, d)
        rel_err = max(rel_err, d / max(r.abs().max().item(), 1e-30))
    return {"abs": abs_err, "rel": rel_err}


# The float64 reference of the case being measured: every provider of a case starts from the
# same seeded inputs (only their layout differs), so it is computed once per case and dtype.
_REF_CACHE: dict = {}


def _reference(case: Case, dtype, compute: Callable[[], list]):
    key = (case.id, case.batch, str(dtype))
    if key not in _REF_CACHE:
        _REF_CACHE.clear()
        _REF_CACHE[key] = [None if t is None else t.detach() for t in compute()]
    return _REF_CACHE[key]


def clear_reference_cache() -> None:
    _REF_CACHE.clear()


def _prepare_op(case: Case, provider: Provider, device, dtype) -> Prepared:
    inp0 = op_inputs(case, device, dtype, seed=0)
    per_set = sum(t.numel() * t.element_size() for t in (inp0["x"], inp0["grad_out"]))
    nsets = timing.rotation_count(per_set, device)
    sets = [inp0] + [op_inputs(case, device, dtype, seed=i) for i in range(1, nsets)]
    sets = [_to_layout(s, provider.channels_last) for s in sets]
    grad = case.mode == "fwdbwd"
    for s in sets:
        for t in _leaves(s):
            t.requires_grad_(grad)
    f = _op_function(case, provider)
    state = {"i": 0}

    def fn():
        i = state["i"]
        state["i"] = (i + 1) % len(sets)
        return _call(case, f, sets[i])

    def error() -> dict:
        got = _call(case, f, sets[0])
        ref_inp = {k: v for k, v in sets[0].items()}
        ref_inp["x"] = sets[0]["x"].detach().double().requires_grad_(grad)
        if "weights" in ref_inp:
            ref_inp["weights"] = [w.detach().double().requires_grad_(grad) for w in sets[0]["weights"]]
            ref_inp["biases"] = [b.detach().double().requires_grad_(grad) for b in sets[0]["biases"]]
        ref_inp["grad_out"] = sets[0]["grad_out"].double()
        ref = _reference(case, dtype, lambda: _call(case, _eager_op(case), ref_inp))
        return _max_err(got, ref)

    return Prepared(fn, error, len(sets))


# -- models ------------------------------------------------------------------------------------


def models_module():
    """fastnin.models, or None while it is not part of this install."""
    try:
        from .. import models
    except ImportError:
        return None
    return models


def build_model(case: Case, device, dtype, seed: int = 0):
    """(model, (C, H, W)) for a model case, from fastnin.models."""
    models = models_module()
    if models is None:
        raise RuntimeError("fastnin.models is not available in this install")
    name = case.op.removesuffix("_lrn")
    size = models.input_size(name)
    size = (size, size) if isinstance(size, int) else tuple(size)
    kwargs = dict(case.spec.get("kwargs", {}))
    if len(size) == 3:
        kwargs["in_channels"] = size[0]
    torch.manual_seed(seed)
    model = models.get(name, num_classes=10, **kwargs)
    cin = size[0] if len(size) == 3 else _first_conv_in_channels(model)
    return model.to(device=device, dtype=dtype), (cin, *size[-2:])


def _torch_twin(case: Case, model):
    """(the plain-torch model that `model` replaces, with its weights; a note or "").

    fastnin.models.twin(name, **kwargs), where the models package offers it, builds the textbook
    torch definition (same state_dict keys). Without it the torch providers run fastnin's own
    model on the "torch" backend: the same function in plain torch ops, but with fastnin's
    graph-level rewrites (BatchNorm folded in eval, the Inception 1x1 convs concatenated), which
    makes the baseline faster than a textbook model and fastnin's speedup an underestimate."""
    models = models_module()
    twin = getattr(models, "twin", None)
    if twin is not None:
        kwargs = dict(case.spec.get("kwargs", {}))
        kwargs["in_channels"] = _first_conv_in_channels(model)
        plain = twin(case.op.removesuffix("_lrn"), num_classes=10, **kwargs)
        plain.load_state_dict(model.state_dict())
        p0 = next(model.parameters())
        return plain.to(device=p0.device, dtype=p0.dtype), ""
    return copy.deepcopy(model), "torch providers: fastnin's model on its 'torch' backend (no textbook twin)"


def _first_conv_in_channels(model) -> int:
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return m.in_channels
    raise RuntimeError(f"cannot tell the input channels of {type(model).__name__}")


def _prepare_model(case: Case, provider: Provider, device, dtype) -> Prepared:
    base, (c, h, w) = build_model(case, device, dtype)
    g = torch.Generator().manual_seed(0)
    x_shape = (case.batch, c, h, w)
    nsets = timing.rotation_count(math.prod(x_shape) * _ELEMENT[dtype], device)
    fmt = torch.channels_last if provider.channels_last else torch.contiguous_format
    xs = [_randn(x_shape, device, dtype, gen=g).contiguous(memory_format=fmt) for _ in range(nsets)]
    ys = [torch.randint(0, 10, (case.batch,), generator=g).to(device) for _ in range(nsets)]
    note = ""
    if provider.is_fastnin:
        model = copy.deepcopy(base)
    else:
        model, note = _torch_twin(case, base)
    if provider.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fwd = model
    if provider.kind == "compile":
        torch._dynamo.reset()
        fwd = torch.compile(model, mode=provider.compile_mode)
    state = {"i": 0}

    def next_set():
        i = state["i"]
        state["i"] = (i + 1) % nsets
        return xs[i], ys[i]

    if case.mode == "infer":
        model.eval()

        def fn():
            x, _ = next_set()
            with torch.no_grad(), provider.context():
                return fwd(x)

    else:
        model.train()
        # A small learning rate and no momentum: hundreds of timed steps must not drive the
        # weights to inf/NaN or denormals, which would change the speed being measured.
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def fn():
            x, y = next_set()
            with provider.context():
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(fwd(x).float(), y)
                loss.backward()
                opt.step()
            return loss

    def reference_run(m, x, y, grads: bool):
        out = m(x)
        if not grads:
            return [out]
        loss = F.cross_entropy(out.double(), y)
        gs = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad], allow_unused=True)
        return [out, *gs]

    def error() -> dict | None:
        # Eval mode (no dropout, BatchNorm on running statistics), so that the provider and the
        # float64 reference compute the same function. For "train": logits and the parameter
        # gradients of one forward+backward (the SGD step itself is torch's in every provider).
        # torch.compile is compiled for one mode: its error is that of the inference case.
        if case.mode == "train" and provider.kind == "compile":
            return None
        grads = case.mode == "train"
        x, y = xs[0], ys[0]
        with torch.no_grad() if not grads else contextlib.nullcontext():
            def compute():
                ref_model = copy.deepcopy(base).double().eval()
                with _backend("torch"):
                    return reference_run(ref_model, x.detach().double(), y, grads)

            ref = _reference(case, dtype, compute)
            if case.mode == "infer":
                got = [fn_first(x)]
            else:
                # A fresh copy: the timed steps have moved the provider's own weights.
                m = copy.deepcopy(base).eval()
                if provider.channels_last:
                    m = m.to(memory_format=torch.channels_last)
                with provider.context():
                    got = reference_run(m, x, y, grads)
        return _max_err(got, ref)

    def fn_first(x):
        with torch.no_grad(), provider.context():
            return fwd(x)

    if provider.kind == "compile" and case.mode == "train":
        note = "; ".join(x for x in (note, "error: see the infer case") if x)
    return Prepared(fn, error, nsets, note, shape=f"{case.batch}x{c}x{h}x{w}")


def _backend(name: str):
    import fastnin

    return fastnin.use_backend(name)


def prepare(case: Case, provider: Provider, device, dtype: torch.dtype) -> Prepared:
    if case.group == "models":
        return _prepare_model(case, provider, device, dtype)
    return _prepare_op(case, provider, device, dtype)
