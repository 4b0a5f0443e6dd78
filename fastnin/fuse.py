"""fastnin.fuse: run a user's own plain-torch model with fastnin's kernels (work in progress)."""

from __future__ import annotations


def fuse(model, inplace: bool = False):
    raise NotImplementedError
