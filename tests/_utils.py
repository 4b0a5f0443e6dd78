"""Helpers for parity tests: layouts, runs with gradients, and the tolerance rule.

Tolerance rule (flash-attention's, CONVENTIONS.md): for a low-precision result,
    max|ours - ref64| <= 2 * max|torch_same_dtype - ref64| + tiny,
where ref64 is the reference computed in float64 from the same (rounded) inputs, and tiny is one
unit in the last place of the result's dtype at the reference's largest magnitude.
"""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout.

    "contiguous"; "channels_last" (4-D); "noncontig": a strided view (every other element of the
    last dimension of a tensor twice as wide); "expanded" is not offered here since a conv input
    that is expanded is just non-contiguous.
    """
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        out = wide[..., ::2]
        assert not out.is_contiguous() or t.shape[-1] <= 1
        return out
    raise ValueError(layout)


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    d = (a.detach().double() - ref64.detach().double()).abs()
    # NaN anywhere fails: max() of a tensor with NaN is NaN, and NaN <= bound is False.
    return d.max().item()


def rms_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - ref64.detach().double()).square().mean().sqrt().item()


def assert_close_rule(
    ours: torch.Tensor, ref64: torch.Tensor, same: torch.Tensor | None, name: str = "", norm: str = "max"
) -> None:
    """ours (any dtype) against ref64 (float64); `same` is torch's own result in ours' dtype.

    norm="max" compares the largest errors (the default). norm="rms" compares root-mean-square
    errors: for low-precision gradients through ReLU chains, where a pre-activation that rounds
    to the other side of zero in one implementation and not the other moves single elements by
    a large amount; the maximum then measures which elements flipped, not accuracy (seen on an
    H100 in bf16: ours and torch's gradients equally far from fp32, maxima 5x apart vs float64).
    """
    if norm == "rms" and ours.dtype != torch.float64:
        assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
        if ours.numel() == 0:
            return
        scale = max(ref64.detach().double().square().mean().sqrt().item(), 1e-30)
        err, base = rms_err(ours, ref64), rms_err(same, ref64)
        bound = 2 * base + ulp(ours.dtype) * scale
        assert err <= bound, f"{name}: {ours.dtype} rms error {err:.3g} > 2 * torch's {base:.3g} + 1 ulp"
        return
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    if ours.numel() == 0:
        return
    scale = max(ref64.detach().abs().max().item(), 1e-30)
    dtype = ours.dtype
    tiny = ulp(dtype) * scale
    err = max_err(ours, ref64)
    if dtype == torch.float64:
        bound = 1e-10 * max(scale, 1.0)
        assert err <= bound, f"{name}: float64 max error {err:.3g} > {bound:.3g}"
        return
    assert same is not None, f"{name}: the rule needs torch's {dtype} result"
    base = max_err(same, ref64)
    bound = 2 * base + tiny
    assert err <= bound, f"{name}: {dtype} max error {err:.3g} > 2 * torch's {base:.3g} + {tiny:.3g}"


def grads_of(out: torch.Tensor, inputs: list, grad_out: torch.Tensor) -> list:
    """d(out . grad_out)/d(inputs), None where an input needs no gradient."""
    req = [t for t in inputs if t is not None and t.requires_grad]
    g = torch.autograd.grad(out, req, grad_out, allow_unused=True)
    it = iter(g)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def check_grad_x(ys, xs, go: torch.Tensor, memory_format: torch.memory_format) -> None:
    """The input gradient of one op three ways, ys = (ours, float64 reference, torch in x's dtype)
    from their leaf inputs xs: ours has x's dtype, shape and the layout asked for, and meets the
    tolerance rule."""
    (y, yr, yt), (xo, xr, xt) = ys, xs
    (g,) = grads_of(y, [xo], go)
    (gr,) = grads_of(yr, [xr], go.double())
    (gt,) = grads_of(yt, [xt], go)
    assert g.dtype == xo.dtype and g.shape == xo.shape
    assert g.is_contiguous(memory_format=memory_format), f"grad layout {g.stride()}"
    assert_close_rule(g, gr, gt, "grad x")


def leaf(t: torch.Tensor | None, requires_grad: bool = True):
    if t is None:
        return None
    return t.detach().clone().requires_grad_(requires_grad)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both contiguous, or both channels_last (the layouts torch gives a conv/LRN output)."""
    if a.dim() != 4:
        return a.is_contiguous() == b.is_contiguous()
    return a.is_contiguous() == b.is_contiguous() and a.is_contiguous(
        memory_format=torch.channels_last
    ) == b.is_contiguous(memory_format=torch.channels_last)


def train_args(out, model: str, epochs: int, limit: int, batch: int, *extra: str) -> list[str]:
    """A `python -m fastnin.train` command line for the CPU tests: a small run, no progress bar."""
    a = ["--model", model, "--epochs", str(epochs), "--limit", str(limit), "--batch-size", str(batch),
         "--device", "cpu", "--no-progress"]
    if out is not None:
        a += ["--out", str(out)]
    return a + list(extra)
