"""NiN and its siblings, built from fastnin's modules, each a drop-in for its plain-torch twin.

    model = fastnin.models.get("nin", num_classes=10, in_channels=1)
    fastnin.models.list_models()      # ['alexnet', 'googlenet', 'lenet', 'nin', 'nin_cifar10', 'resnet18', 'vgg11']
    fastnin.models.input_size("nin")  # 224: the side of the square input the model is defined for

Every model has the structure, the parameters and the state_dict keys of its textbook plain-torch
definition (REFERENCE.md; the twins are in tests/twins.py), so a checkpoint of the plain model
loads unchanged, and computes the same function; only its forward runs fastnin's fused kernels.
"""

from __future__ import annotations

import importlib

from torch import nn

# name -> (module of fastnin.models, factory in it, input side)
_MODELS: dict[str, tuple[str, str, int]] = {
    "nin": ("nin", "nin", 224),
    "nin_cifar10": ("nin", "nin_cifar10", 32),
    "lenet": ("lenet", "lenet", 28),
    "alexnet": ("alexnet", "alexnet", 224),
    "vgg11": ("vgg", "vgg11", 224),
    "googlenet": ("googlenet", "googlenet", 96),
    "resnet18": ("resnet", "resnet18", 96),
}

__all__ = [
    "get", "twin", "list_models", "input_size",
    "NiN", "nin", "nin_cifar10", "lenet", "alexnet", "vgg11", "googlenet", "resnet18",
]  # fmt: skip


def _check_name(name: str) -> tuple[str, str, int]:
    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(f"fastnin.models: unknown model {name!r}; expected one of {', '.join(list_models())}")
    return _MODELS[name]


def list_models() -> list[str]:
    """The names get() accepts, sorted."""
    return sorted(_MODELS)


def input_size(name: str) -> int:
    """The side of the square input the model is defined for (its classifier's sizes assume it)."""
    return _check_name(name)[2]


def twin(name: str, **kwargs) -> nn.Module:
    """The plain-torch textbook model that get(name, **kwargs) replaces (same state_dict keys, no
    fastnin op): the baseline of the benchmarks and the oracle of the tests."""
    _check_name(name)
    from . import twins

    return getattr(twins, name)(**kwargs)


def get(name: str, **kwargs) -> nn.Module:
    """Build model `name` (see list_models()); kwargs go to its factory: num_classes, in_channels,
    and the model's own options (dropout, lrn for alexnet)."""
    module, factory, _ = _check_name(name)
    return getattr(importlib.import_module(f".{module}", __name__), factory)(**kwargs)


from .nin import NiN, nin, nin_cifar10  # noqa: E402
from .lenet import lenet  # noqa: E402
from .alexnet import alexnet  # noqa: E402
from .vgg import vgg11  # noqa: E402
from .googlenet import googlenet  # noqa: E402
from .resnet import resnet18  # noqa: E402
