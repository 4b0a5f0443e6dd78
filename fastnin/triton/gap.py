"""Global average pooling in Triton: Tensor[N, C, H, W] -> Tensor[N, C] and its gradient.

Both directions are one pass over the big tensor, memory-bound:
  forward   reads N*C*H*W elements once, writes N*C        -> bytes ~ N*C*H*W * itemsize
  backward  reads N*C,         writes N*C*H*W once        -> bytes ~ N*C*H*W * itemsize
(flops are negligible: one add per element). On an H100 (~3.0 TB/s copy bandwidth, REFERENCE.md)
the roofline for the NiN shape 128x384x13x13 bf16 (16.6 MB) is ~5.5 us, so launch overhead and
the number of programs in flight matter as much as the inner loop.

The kernels see x as [N, C, S] (S = H*W) with strides (sN, sC, sS): (C*S, S, 1) for contiguous
input, (S*C, 1, C) for channels_last. A program owns one image n, a block of BLOCK_C channels and
one slice of S; its tile [BLOCK_C, BLOCK_S] is laid out along whichever axis has stride 1 (Triton
specializes stride-1 arguments and coalesces along that axis), so both layouts are read with
full-width transactions. Block shapes follow the layout: long along S and short along C for
contiguous input, the reverse for channels_last.

Parallelism: when N * ceil(C / BLOCK_C) programs cannot fill the GPU (small batch, few channels,
large images), S is split over SPLIT programs that each write an fp32 partial sum; the partials
are then added in a fixed order (deterministic, no atomics). With SPLIT == 1 the kernel writes the
mean directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import wrap_triton
from ..ops import check_gap_args, check_gap_backward_args


# Programs we want in flight before splitting S: 4 per SM on a 132-SM H100.
_TARGET_PROGRAMS = 528
# Elements per program per loop iteration: 4096 fp32 = 32 per thread at 4 warps, enough loads in
# flight per thread to cover DRAM latency without spilling.
_TILE_ELEMS = 4096


def _pow2_at_most(v: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(int(v), 1)), cap)


def _blocks(c: int, s: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) for a [C, S] plane: the stride-1 axis gets the long side."""
    if channels_last:
        bc = _pow2_at_most(c, 256)
        bs = max(1, _TILE_ELEMS // bc)
        bs = _pow2_at_most(min(s, bs), bs)
    else:
        bs = _pow2_at_most(s, 512)
        bc = max(1, _TILE_ELEMS // bs)
        bc = _pow2_at_most(min(c, bc), bc)
    return bc, bs


@triton.jit
def _gap_fwd_kernel(
    x_ptr,
    out_ptr,  # [N, C] output (SPLIT == 1) or fp32 partials [SPLIT, N, C] (SPLIT > 1)
    C,
    S,
    s_per_split,  # elements of S handled per split (a multiple of BLOCK_S)
    sN,
    sC,
    sS,
    NUM_CB,  # ceil(C / BLOCK_C)
    NC,  # N * C: the partials' split stride
    SPLIT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # fp32 accumulation (fp64 for fp64 input, which exists for gradcheck).
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid // NUM_CB
    cb = pid % NUM_CB
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    # int64: n * sN passes 2**31 for tensors beyond 2**31 elements.
    base = x_ptr + n.to(tl.int64) * sN + offs_c.to(tl.int64)[:, None] * sC
    s_begin = split * s_per_split
    s_end = tl.minimum(s_begin + s_per_split, S)
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m = mask_c[:, None] & (offs_s < s_end)[None, :]
        v = tl.load(base + offs_s.to(tl.int64)[None, :] * sS, mask=m, other=0.0)
        acc += v.to(ACC)
    total = tl.sum(acc, axis=1)
    if SPLIT == 1:
        # sum / (H*W) as torch's mean; S arrives as an int (a float argument would be fp32 in Triton)
        tl.store(out_ptr + n.to(tl.int64) * C + offs_c, (total / S).to(out_ptr.dtype.element_ty), mask=mask_c)
    else:
        tl.store(out_ptr + split.to(tl.int64) * NC + n.to(tl.int64) * C + offs_c, total, mask=mask_c)


@triton.jit
def _gap_bwd_kernel(
    g_ptr,  # grad_out [N, C], any strides (even expanded)
    gx_ptr,  # grad_x, logically [N, C, S] with strides (sN, sC, sS)
    C,
    S,
    sgN,
    sgC,
    sN,
    sC,
    sS,
    NUM_CB,
    NUM_SB,  # ceil(S / BLOCK_S)
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if gx_ptr.dtype.element_ty == tl.float64 else tl.float32
    # One flat grid axis (axis 1 is limited to 65535 programs): pid -> (image, channel block, S block).
    pid = tl.program_id(0)
    sb = pid % NUM_SB
    n = pid // (NUM_SB * NUM_CB)
    cb = (pid // NUM_SB) % NUM_CB
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_c = offs_c < C
    g = tl.load(g_ptr + n.to(tl.int64) * sgN + offs_c.to(tl.int64) * sgC, mask=mask_c, other=0.0)
    # torch's mean backward: grad / (H*W) in the input's dtype; the product is formed in fp32.
    v = (g.to(ACC) / S).to(gx_ptr.dtype.element_ty)
    tile = tl.zeros((BLOCK_C, BLOCK_S), dtype=gx_ptr.dtype.element_ty) + v[:, None]
    m = mask_c[:, None] & (offs_s < S)[None, :]
    ptrs = gx_ptr + n.to(tl.int64) * sN + offs_c.to(tl.int64)[:, None] * sC + offs_s.to(tl.int64)[None, :] * sS
    tl.store(ptrs, tile, mask=m)


def _plane_strides(t: torch.Tensor, channels_last: bool) -> tuple[int, int, int]:
    n, c, h, w = t.shape
    if channels_last:
        return (h * w * c, 1, c)
    return (c * h * w, h * w, 1)


def _num_warps(bc: int, bs: int) -> int:
    return 8 if bc * bs >= 4096 else 4


def gap_forward(x: torch.Tensor, *, split: int | None = None) -> torch.Tensor:
    """Tensor[N, C, H, W] -> Tensor[N, C]: the mean over H and W, accumulated in fp32.

    `split` forces the number of programs per (image, channel block) along H*W (tests use it to
    reach the partial-sum path on small shapes); by default it is chosen to fill the GPU.
    """
    check_gap_args(x)  # rank, dtype, spatial size: the messages of every backend
    n, c, h, w = x.shape
    s = h * w
    out = x.new_empty((n, c))
    if out.numel() == 0:
        return out
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not channels_last and not x.is_contiguous():
        x = x.contiguous()
    bc, bs = _blocks(c, s, channels_last)
    num_cb = triton.cdiv(c, bc)
    programs = n * num_cb
    if split is None:
        split = 1
        if programs < _TARGET_PROGRAMS and s > 4 * bs:
            split = min(triton.cdiv(_TARGET_PROGRAMS, programs), triton.cdiv(s, 4 * bs))
    split = max(1, min(int(split), triton.cdiv(s, bs)))
    s_per_split = triton.cdiv(triton.cdiv(s, split), bs) * bs
    split = triton.cdiv(s, s_per_split)
    sN, sC, sS = _plane_strides(x, channels_last)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dst = out if split == 1 else torch.empty((split, n, c), dtype=acc_dtype, device=x.device)
    wrap_triton(_gap_fwd_kernel)[(programs, split)](
        x, dst, c, s, s_per_split, sN, sC, sS, num_cb, n * c,
        SPLIT=split, BLOCK_C=bc, BLOCK_S=bs, num_warps=_num_warps(bc, bs),
    )  # fmt: skip
    if split > 1:
        # Fixed-order reduction of the fp32 partials: deterministic.
        out = (dst.sum(0) / s).to(x.dtype)
    return out


def gap_backward(grad_out: torch.Tensor, input_size, channels_last: bool) -> torch.Tensor:
    """grad_x[n, c, h, w] = grad_out[n, c] / (H*W), channels_last layout iff `channels_last`."""
    check_gap_backward_args(grad_out, input_size)
    n, c, h, w = (int(v) for v in input_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gx = torch.empty((n, c, h, w), dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)
    if gx.numel() == 0:
        return gx
    s = h * w
    bc, bs = _blocks(c, s, channels_last)
    num_cb = triton.cdiv(c, bc)
    sN, sC, sS = _plane_strides(gx, channels_last)
    num_sb = triton.cdiv(s, bs)
    wrap_triton(_gap_bwd_kernel)[(n * num_cb * num_sb,)](
        grad_out, gx, c, s, grad_out.stride(0), grad_out.stride(1), sN, sC, sS, num_cb, num_sb,
        BLOCK_C=bc, BLOCK_S=bs, num_warps=_num_warps(bc, bs),
    )  # fmt: skip
    return gx

