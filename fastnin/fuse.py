"""fastnin.fuse: run a user's own plain-torch model with fastnin's kernels, same function.

    fused = fastnin.fuse(model)            # a fused copy; `model` is untouched
    print(fused.fastnin_report)            # what was replaced, one line each
    fastnin.fuse(model, inplace=True)      # fuse `model` itself (its parameters are kept, shared)

What changes (everything else is left alone):
  - every plain nn.Sequential becomes a fastnin.nn.FusedSequential (its class is swapped: the same
    object, the same children, the same parameters and state_dict keys), whose forward runs
      Conv2d [-> eval BatchNorm2d] -> ReLU (-> 1x1 Conv2d [-> eval BatchNorm2d] -> ReLU, up to
      twice) as one fastnin mlpconv; Conv2d -> eval BatchNorm2d as one convolution with the
      BatchNorm folded; a global average pool (AdaptiveAvgPool2d(1), or an AvgPool2d whose kernel
      covers the whole map), with a Flatten after it or not, as fastnin gap, fused into the
      mlpconv before it when there is one. BatchNorm is folded only while it is in eval mode
      (decided at every call), so model.train() gets torch's BatchNorm back;
  - every nn.LocalResponseNorm becomes fastnin.nn.LocalResponseNorm (class swap: no state);
  - an AdaptiveAvgPool2d(1) outside any Sequential becomes fastnin.nn.GlobalAvgPool2d(flatten=False)
    (it then needs the 4-D input every image model gives it).
Left as plain torch: convolutions with groups, dilation, a padding mode other than zeros or
'same' padding of an even kernel; activations other than nn.ReLU (functional calls inside a
custom forward are never seen); BatchNorm in training mode; subclasses of these modules (they may
override forward); and any module with hooks (fusing it would skip the hooks).

nn.ReLU(inplace=True) right after a convolution is fused too: it only overwrites the
convolution's fresh output, which nothing else sees, so the result and the side effects match.
"""

from __future__ import annotations

import copy

from torch import nn

from .nn import FusedSequential, GlobalAvgPool2d, LocalResponseNorm, _has_hooks, _pair

__all__ = ["fuse", "FuseReport"]


class FuseReport:
    """What fuse() replaced: `lines` (one readable line per replacement or notable non-replacement,
    "0.3-0.5 A -> B => what runs instead", named as in the state_dict); str() joins them."""

    def __init__(self):
        self.lines: list[str] = []

    @property
    def replaced(self) -> list[str]:
        """The lines that describe a replacement (not the 'kept' notes)."""
        return [ln for ln in self.lines if "=>" in ln]

    def __str__(self) -> str:
        if not self.lines:
            return "fastnin.fuse: nothing to fuse"
        return "fastnin.fuse:\n" + "\n".join("  " + ln for ln in self.lines)

    __repr__ = __str__


def _convert(module: nn.Module, path: str, report: FuseReport, seen: set, in_sequential: bool = False) -> nn.Module:
    """Fuse module's subtree; return what should stand in module's place."""
    if id(module) in seen:  # a module reachable twice is converted once
        return module
    seen.add(id(module))
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        sub = f"{path}.{name}" if path else name
        new = _convert(child, sub, report, seen, in_sequential=type(module) is nn.Sequential)
        if new is not child:
            module._modules[name] = new
    if _has_hooks(module):
        return module
    if type(module) is nn.Sequential:
        module.__class__ = FusedSequential
        report.lines += module.fastnin_plan(f"{path}." if path else "")
        return module
    if type(module) is nn.LocalResponseNorm:
        module.__class__ = LocalResponseNorm
        report.lines.append(f"{path or '<model>'}: LocalResponseNorm => fastnin lrn")
        return module
    if type(module) is nn.AdaptiveAvgPool2d and _pair(module.output_size) == (1, 1) and path and not in_sequential:
        # Inside a Sequential the FusedSequential fuses it (and reports it) itself; this is the
        # case of a pool called from a custom forward, e.g. torchvision's ResNet `avgpool`.
        new = GlobalAvgPool2d(flatten=False)
        new.train(module.training)
        report.lines.append(f"{path}: AdaptiveAvgPool2d(1) => fastnin GlobalAvgPool2d(flatten=False)")
        return new
    return module


def fuse(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Return a model that computes the same function as `model` with fastnin's fused kernels.

    Args:
        model: any nn.Module; what is fused is described in this module's docstring.
        inplace: False (the default): fuse a deep copy (new parameters, `model` untouched).
            True: fuse `model` itself: its parameters are shared by the result, which is `model`
            unless `model` is itself an AdaptiveAvgPool2d.
        verbose: print the report.

    Returns:
        The fused model. Its attribute `fastnin_report` (a FuseReport) lists what was replaced;
        the state_dict keys are those of `model`, so its checkpoints load unchanged.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"fastnin.fuse: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()
    # AdaptiveAvgPool2d as the whole model stays: there is no parent Sequential to fuse it with.
    model = _convert(model, "", report, set())
    model.fastnin_report = report
    if verbose:
        print(report)
    return model
