"""Modules over fastnin's ops, with the parameters and state_dict keys of their plain-torch twins."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import ops
from ._backend import get_backend

__all__ = [
    "MLPConv", "nin_block", "LocalResponseNorm", "GlobalAvgPool2d", "FusedSequential", "channels_last_inside",
    "fold_batch_norm",
]  # fmt: skip


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class MLPConv(nn.Sequential):
    """A fused NiN mlpconv block: Conv2d(k) -> ReLU [-> Conv2d(1x1) -> ReLU [-> Conv2d(1x1) -> ReLU]].

    It *is* the nn.Sequential it replaces (same children, same state_dict keys `0.weight`,
    `0.bias`, `2.weight`, ...), so the weights of a plain nin block load into it unchanged; only
    forward differs: one fused kernel per direction (fastnin.ops.mlpconv).

    Args:
        in_channels: Cin.
        channels: output channels of each stage, 1 to 3 ints (an int means one stage).
        kernel_size, stride, padding: of the first convolution (int or pair).
        bias: whether the convolutions have biases.
        gap: average the result over H and W (output Tensor[N, Cout]), fused into the kernel.

    Shape: Tensor[N, Cin, H, W] -> Tensor[N, Cout, Ho, Wo] (or Tensor[N, Cout] with gap=True).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int | Sequence[int],
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        gap: bool = False,
        device=None,
        dtype=None,
    ):
        channels = [channels] if isinstance(channels, int) else list(channels)
        if not 1 <= len(channels) <= 3:
            raise ValueError(f"MLPConv: channels must hold 1 to 3 ints, got {channels}")
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            if i == 0:
                conv = nn.Conv2d(prev, c, kernel_size, stride, padding, bias=bias, device=device, dtype=dtype)
            else:
                conv = nn.Conv2d(prev, c, 1, bias=bias, device=device, dtype=dtype)
            layers += [conv, nn.ReLU()]
            prev = c
        super().__init__(*layers)
        self.gap = gap

    @classmethod
    def from_modules(cls, convs: Sequence[nn.Conv2d], gap: bool = False) -> MLPConv:
        """Wrap existing Conv2d modules (their parameters are shared, not copied)."""
        self = cls.__new__(cls)
        layers: list[nn.Module] = []
        for c in convs:
            layers += [c, nn.ReLU()]
        nn.Sequential.__init__(self, *layers)
        self.gap = gap
        return self

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self if isinstance(m, nn.Conv2d)]

    def extra_repr(self) -> str:
        return "gap=True" if self.gap else ""

    def forward(self, x: Tensor) -> Tensor:
        convs = self.convs
        first = convs[0]
        if first.padding_mode != "zeros":
            raise ValueError(f"MLPConv: padding_mode {first.padding_mode!r} is not supported (only 'zeros')")
        return ops.mlpconv(
            x,
            [c.weight for c in convs],
            [c.bias for c in convs],
            first.stride,
            first.padding,
            gap=self.gap,
        )


def nin_block(
    in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride=1, padding=0
) -> MLPConv:
    """The textbook NiN block: Conv2d(k, stride, padding) -> ReLU -> (Conv2d 1x1 -> ReLU) x 2, fused."""
    return MLPConv(in_channels, [out_channels] * 3, kernel_size, stride, padding)


class LocalResponseNorm(nn.LocalResponseNorm):
    """torch.nn.LocalResponseNorm with fastnin's one-pass kernel (same arguments, same result)."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.local_response_norm(x, self.size, self.alpha, self.beta, self.k)


class GlobalAvgPool2d(nn.Module):
    """Global average pooling: Tensor[N, C, H, W] -> Tensor[N, C] (flatten=True) or Tensor[N, C, 1, 1]."""

    def __init__(self, flatten: bool = True):
        super().__init__()
        self.flatten = flatten

    def extra_repr(self) -> str:
        return f"flatten={self.flatten}"

    def forward(self, x: Tensor) -> Tensor:
        y = ops.global_avg_pool2d(x)
        return y if self.flatten else y[:, :, None, None]


# ----------------------------------------------------------------------------------------------
# FusedSequential: an nn.Sequential that runs what it can with fastnin's kernels, keeping its
# children (and so its state_dict keys) exactly as they are.
# ----------------------------------------------------------------------------------------------


def _has_hooks(m: nn.Module) -> bool:
    """A module with hooks must run as itself: fusing it away would skip the hooks."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """conv's zero padding as a pair, or None when mlpconv cannot reproduce it."""
    p = conv.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        # torch pads an even kernel asymmetrically (the extra row/column at the end): not a pair.
        if any(k % 2 == 0 for k in conv.kernel_size):
            return None
        return (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    return (int(p[0]), int(p[1]))


def _fusable_conv(m: nn.Module, first: bool) -> bool:
    """A plain Conv2d that mlpconv computes exactly: no groups, no dilation, zero padding;
    a later stage must be a 1x1, stride-1, unpadded convolution."""
    if type(m) is not nn.Conv2d or _has_hooks(m):  # subclasses may override forward
        return False
    if m.groups != 1 or m.dilation != (1, 1) or m.padding_mode != "zeros":
        return False
    pad = _conv_padding(m)
    if pad is None:
        return False
    if not first:
        return m.kernel_size == (1, 1) and m.stride == (1, 1) and pad == (0, 0)
    return True


def _is_relu(m: nn.Module) -> bool:
    # nn.ReLU(inplace=True) qualifies too: right after a convolution it only overwrites the
    # convolution's fresh output, which nothing else can see (hooks excluded above), so the fused
    # result is the same function with the same side effects.
    return type(m) is nn.ReLU and not _has_hooks(m)


def _foldable_bn(m: nn.Module, conv: nn.Conv2d) -> bool:
    """An eval-mode BatchNorm2d that normalizes with its running statistics (an affine map)."""
    return (
        type(m) is nn.BatchNorm2d
        and not m.training
        and m.track_running_stats
        and m.running_mean is not None
        and m.num_features == conv.out_channels
        and not _has_hooks(m)
    )


def fold_batch_norm(
    weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d
) -> tuple[Tensor, Tensor]:
    """The weight and bias of conv(x) followed by the eval-mode bn, as one convolution.

    bn(y) = (y - mean) / sqrt(var + eps) * gamma + beta, so with s = gamma / sqrt(var + eps):
    w' = w * s (per output channel), b' = (b - mean) * s + beta. Computed on every call (the cost
    is one pass over the weights) so that gradients reach the conv and BN parameters alike and
    the result follows any change of the running statistics.
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale if bias is None else (bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale.reshape(-1, 1, 1, 1), shift


def _gap_kind(m: nn.Module) -> str | None:
    """'gap' for a module that is a global average pool whatever the input size, 'avgpool' for an
    AvgPool2d that is one only when its kernel covers the whole map (checked at run time)."""
    if _has_hooks(m):
        return None
    if isinstance(m, GlobalAvgPool2d):
        return "gap"
    if type(m) is nn.AdaptiveAvgPool2d and _pair(m.output_size) == (1, 1):
        return "gap"
    if type(m) is nn.AvgPool2d and _pair(m.padding) == (0, 0) and m.divisor_override is None:
        return "avgpool"
    return None


def _gap_keeps_dims(m: nn.Module) -> bool:
    return not (isinstance(m, GlobalAvgPool2d) and m.flatten)


def _is_flatten(m: nn.Module) -> bool:
    return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1 and not _has_hooks(m)


def _avgpool_covers(m: nn.AvgPool2d, h: int, w: int) -> bool:
    return _pair(m.kernel_size) == (h, w)


class _Step:
    """One step of a FusedSequential's plan: children [start, end) run as `kind`."""

    __slots__ = ("kind", "start", "end", "stages", "gap", "note")

    def __init__(self, kind, start, end, stages=(), gap=None, note=""):
        self.kind = kind  # "module" | "mlpconv" | "conv_bn" | "gap" | "module_gap"
        self.start, self.end = start, end
        self.stages = stages  # ((conv index, bn index or None), ...)
        self.gap = gap  # None or (gap index, end after the gap (and a Flatten), keeps [N, C, 1, 1])
        self.note = note


def _match_gap(mods: list[nn.Module], j: int):
    """A global average pool at j (and a Flatten after it): (j, end, keep_dims) or None."""
    if j >= len(mods) or _gap_kind(mods[j]) is None:
        return None
    keep = _gap_keeps_dims(mods[j])
    end = j + 1
    if end < len(mods) and _is_flatten(mods[end]):
        keep, end = False, end + 1
    return (j, end, keep)


def plan_sequential(mods: list[nn.Module]) -> list[_Step]:
    """Group a Sequential's children into fused steps (see FusedSequential)."""
    steps: list[_Step] = []
    n, i = len(mods), 0
    while i < n:
        m = mods[i]
        if _fusable_conv(m, first=True):
            stages, j, relu = [], i, False
            while j < n and len(stages) < 3 and _fusable_conv(mods[j], first=not stages):
                bn = j + 1 if j + 1 < n and _foldable_bn(mods[j + 1], mods[j]) else None
                k = (bn if bn is not None else j) + 1
                if k < n and _is_relu(mods[k]):
                    stages.append((j, bn))
                    j, relu = k + 1, True
                elif not stages and bn is not None:  # conv -> BN with no ReLU: fold only
                    stages.append((j, bn))
                    j = k
                    break
                else:
                    break
            if stages and relu:
                gap = _match_gap(mods, j)
                steps.append(_Step("mlpconv", i, gap[1] if gap else j, tuple(stages), gap))
                i = steps[-1].end
                continue
            if stages:
                steps.append(_Step("conv_bn", i, j, tuple(stages)))
                i = j
                continue
            if i + 1 < n and type(mods[i + 1]) is nn.BatchNorm2d and mods[i + 1].training:
                note = "the BatchNorm2d after it is in training mode; folded in eval mode"
            else:
                nxt = _name(mods[i + 1]) if i + 1 < n else "nothing"
                note = f"followed by {nxt}, not by ReLU or an eval-mode BatchNorm2d"
            steps.append(_Step("module", i, i + 1, note=note))
            i += 1
            continue
        elif not _has_hooks(m) and (
            (isinstance(m, MLPConv) and not m.gap and _conv_padding(m.convs[0]) is not None)
            or callable(getattr(m, "fastnin_forward_gap", None))
        ):
            gap = _match_gap(mods, i + 1)
            if gap is not None:
                steps.append(_Step("module_gap", i, gap[1], gap=gap))
                i = gap[1]
                continue
        elif _gap_kind(m) is not None:
            gap = _match_gap(mods, i)
            steps.append(_Step("gap", i, gap[1], gap=gap))
            i = gap[1]
            continue
        note = ""
        if type(m) is nn.Conv2d:
            note = _unfusable_reason(m)
        steps.append(_Step("module", i, i + 1, note=note))
        i += 1
    return steps


def _unfusable_reason(conv: nn.Conv2d) -> str:
    if _has_hooks(conv):
        return "it has hooks"
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if conv.dilation != (1, 1):
        return f"dilation={conv.dilation}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if _conv_padding(conv) is None:
        return "'same' padding of an even kernel is asymmetric"
    return ""


def _name(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        k = "x".join(map(str, m.kernel_size))
        s = "" if m.stride == (1, 1) else f"/{m.stride[0]}"
        return f"Conv2d({m.in_channels}->{m.out_channels}, {k}{s})"
    return type(m).__name__


def describe_plan(mods: list[nn.Module], steps: list[_Step], prefix: str = "") -> list[str]:
    """One readable line per fused step (plain steps are not listed unless they carry a note)."""
    lines = []
    for st in steps:
        where = f"{prefix}{st.start}" if st.end == st.start + 1 else f"{prefix}{st.start}-{prefix}{st.end - 1}"
        chain = " -> ".join(_name(m) for m in mods[st.start : st.end])
        if st.kind == "mlpconv":
            what = f"fastnin mlpconv ({len(st.stages)} stage{'s' if len(st.stages) > 1 else ''}"
            if any(b is not None for _, b in st.stages):
                what += ", BatchNorm folded (eval mode)"
            if st.gap is not None:
                what += ", global average pool fused"
                if _gap_kind(mods[st.gap[0]]) == "avgpool":
                    what += " when the AvgPool2d covers the whole map"
            lines.append(f"{where} {chain} => {what})")
        elif st.kind == "conv_bn":
            lines.append(f"{where} {chain} => Conv2d with BatchNorm folded (eval mode)")
        elif st.kind == "module_gap":
            lines.append(f"{where} {chain} => {_name(mods[st.start])} with the global average pool fused")
        elif st.kind == "gap":
            if _gap_kind(mods[st.start]) == "avgpool":  # not a replacement unless the map fits
                k = "x".join(map(str, _pair(mods[st.start].kernel_size)))
                lines.append(f"{where} {chain}: fastnin gap only when its {k} kernel covers the whole map")
            else:
                lines.append(f"{where} {chain} => fastnin gap")
        elif st.note:
            lines.append(f"{where} {chain}: kept ({st.note})")
    return lines


class FusedSequential(nn.Sequential):
    """An nn.Sequential that runs its fusable runs of children with fastnin's kernels.

    The children stay exactly those of the plain Sequential (so do the state_dict keys and the
    parameters); only forward differs. At every call the children are grouped (plan_sequential):
      - Conv2d [-> eval BatchNorm2d] -> ReLU, then up to two more 1x1 Conv2d [-> BN] -> ReLU:
        one fastnin mlpconv (BatchNorm folded into the convolution's weight and bias);
      - Conv2d -> eval BatchNorm2d (no ReLU): one convolution with the BatchNorm folded;
      - a global average pool (GlobalAvgPool2d, AdaptiveAvgPool2d(1), or an AvgPool2d whose
        kernel covers the whole map), with a Flatten after it or not: fastnin gap, fused into
        the mlpconv (or MLPConv child, or child with `fastnin_forward_gap`) right before it;
      - everything else runs as itself: convolutions with groups, dilation or non-zero padding
        modes, other activations, BatchNorm in training mode, modules with hooks.
    Inputs that are not 4-D run every child as itself.

    channels_last_inside (False here; True on fastnin's own models, see channels_last_inside()):
    on the CPU kernels, every 4-D map with more than one channel goes on in channels_last, and a
    4-D result goes back to NCHW where the input was NCHW (unless channels_last_restore is False:
    the blocks nested in such a model hand their maps on as they are). Why: the CPU kernels work
    in NHWC, so an NCHW map costs a transposing copy in and out of every fused op, and torch's
    pools between them run slower in NCHW (the CIFAR-10 NiN's inference fed NCHW: 50.5 -> 34.8
    ms, as when fed channels_last). Dropout draws its mask in memory order, so in training mode,
    where the plain model runs NCHW maps (its input NCHW), the map goes back to NCHW for each
    Dropout child: the same seed drops the same elements as in the plain model (with
    channels_last weights and an active Dropout nothing is converted: the plain model's maps turn
    channels_last there). Not the default for fastnin.fuse'd user models: a child of theirs may
    .view() a map, which channels_last strides refuse.
    """

    channels_last_inside: bool = False
    channels_last_restore: bool = True

    def fastnin_plan(self, prefix: str = "") -> list[str]:
        """What forward fuses, one line per fused step (children named prefix + index), in the
        current train/eval mode; unfused convolutions get a line saying why."""
        mods = list(self._modules.values())
        return describe_plan(mods, plan_sequential(mods), prefix)

    def forward(self, x: Tensor) -> Tensor:
        mods = list(self._modules.values())
        to_cl = self.channels_last_inside and _on_cpu_kernels(x)
        if to_cl and any(_active_dropout(m) for m in mods) and _any_channels_last_weight(mods):
            to_cl = False  # the plain model's layout at its Dropout is not known here: see below
        # Whether the plain model runs NCHW maps here (its input does not suggest channels_last;
        # one channel counts as NCHW, as torch counts it).
        plain_nchw = to_cl and not (
            isinstance(x, Tensor) and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        )  # fmt: skip
        for st in plan_sequential(mods):
            if to_cl and _wants_channels_last(x):
                x = x.contiguous(memory_format=torch.channels_last)
            if st.kind == "module" or not (isinstance(x, Tensor) and x.dim() == 4):
                for m in mods[st.start : st.end]:
                    if plain_nchw and _active_dropout(m) and isinstance(x, Tensor):
                        x = x.contiguous()  # NCHW, as in the plain model: see the class docstring
                    x = m(x)
                continue
            x = _run_step(mods, st, x)
        if plain_nchw and self.channels_last_restore and isinstance(x, Tensor) and x.dim() == 4:
            x = x.contiguous()
        return x


def channels_last_inside(model: FusedSequential) -> FusedSequential:
    """Set FusedSequential.channels_last_inside on model and on the FusedSequentials nested in it
    (those without channels_last_restore: the map stays channels_last from block to block, and
    only the model's own result goes back). For fastnin's models, whose children are known to
    take any layout. Returns model."""
    for m in model.modules():
        if isinstance(m, FusedSequential):
            m.channels_last_inside = True
            m.channels_last_restore = m is model
    return model


def _active_dropout(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0


def _any_channels_last_weight(mods: list[nn.Module]) -> bool:
    return any(p.dim() == 4 and not p.is_contiguous() for m in mods for p in m.parameters())


def _on_cpu_kernels(x) -> bool:
    if ops.torch_func_transforms():
        return False  # under torch.func (vmap cannot even ask whether a map is channels_last)
    return isinstance(x, Tensor) and x.device.type == "cpu" and get_backend() in ("auto", "cpu")


def _wants_channels_last(x) -> bool:
    # One channel: NCHW and channels_last are the same bytes, and torch (so fastnin's output rule)
    # calls such a tensor NCHW; the map after the first layer is converted instead.
    return (
        isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] > 1
        and not x.is_contiguous(memory_format=torch.channels_last)
    )  # fmt: skip


def _stage_params(mods, stages):
    ws, bs = [], []
    for ci, bi in stages:
        conv = mods[ci]
        w, b = conv.weight, conv.bias
        if bi is not None:
            w, b = fold_batch_norm(w, b, mods[bi])
        ws.append(w)
        bs.append(b)
    return ws, bs


def _gap_applies(mod: nn.Module, h: int, w: int) -> bool:
    return _gap_kind(mod) == "gap" or _avgpool_covers(mod, h, w)


def _run_step(mods: list[nn.Module], st: _Step, x: Tensor) -> Tensor:
    if st.kind == "conv_bn":
        ((ci, _),) = st.stages
        conv = mods[ci]
        (w,), (b,) = _stage_params(mods, st.stages)
        return torch.nn.functional.conv2d(x, w, b, conv.stride, _conv_padding(conv))
    if st.kind == "gap":
        j, end, keep = st.gap
        if not _gap_applies(mods[j], x.shape[2], x.shape[3]):
            for m in mods[st.start : st.end]:
                x = m(x)
            return x
        y = ops.global_avg_pool2d(x)
        return y[:, :, None, None] if keep else y
    if st.kind == "mlpconv":
        first = mods[st.stages[0][0]]
        ws, bs = _stage_params(mods, st.stages)
        stride, padding = first.stride, _conv_padding(first)
        if st.gap is not None:
            j, end, keep = st.gap
            ho, wo = ops.mlpconv_output_size(x.shape[2], x.shape[3], *first.kernel_size, stride, padding)
            if _gap_applies(mods[j], ho, wo):
                y = ops.mlpconv(x, ws, bs, stride, padding, gap=True)
                return y[:, :, None, None] if keep else y
            y = ops.mlpconv(x, ws, bs, stride, padding)
            for m in mods[j:end]:
                y = m(y)
            return y
        return ops.mlpconv(x, ws, bs, stride, padding)
    if st.kind == "module_gap":
        m = mods[st.start]
        j, end, keep = st.gap
        if _gap_kind(mods[j]) == "avgpool":  # the producer's output size is needed: run it
            y = m(x)
            for mm in mods[j:end]:
                y = mm(y)
            return y
        if isinstance(m, MLPConv):
            convs = m.convs
            y = ops.mlpconv(x, [c.weight for c in convs], [c.bias for c in convs], convs[0].stride,
                            _conv_padding(convs[0]), gap=True)
        else:
            y = m.fastnin_forward_gap(x)
        return y[:, :, None, None] if keep else y
    raise AssertionError(st.kind)
