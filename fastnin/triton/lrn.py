"""Local response normalization in Triton, forward and backward, one pass each.

Semantics (torch.nn.functional.local_response_norm), for x of shape [N, C, *]:
    d[c]  = k + alpha/size * sum_{c' = c-LO}^{c+HI} x[c']^2      LO = size//2, HI = (size-1)//2,
    y[c]  = x[c] / d[c]^beta                                     channels outside [0, C) count as 0
    gx[c] = g[c] / d[c]^beta - (2*alpha*beta/size) * x[c] * sum_{j = c-HI}^{c+LO} g[j] x[j] / d[j]^(beta+1)

Design. The kernels see x as [N, C, S] (S = the flattened spatial dims) with strides (sN, sC, sS):
(C*S, S, 1) contiguous, (S*C, 1, C) channels_last. A program owns one image, BLOCK_S spatial
positions and a chunk of channels, and loads its tile [T, BLOCK_S] (T channels, a power of two)
once: every input element is read from memory once (plus a small halo, below). Triton lays the tile
out along the stride-1 axis (stride-1 arguments are specialized), so contiguous input is read
along S and channels_last input along C, both with full-width transactions.

The channel window is summed on chip, exactly: for each offset o in [-LO, HI] the squares are
shifted along the channel axis with tl.gather (registers / shared memory, no memory traffic) and
added. No running add/subtract sum: those cancel badly in fp32 when a large value leaves the
window. The backward computes d, then t = g*x*d^-(beta+1) on the whole tile, and sums t over the
reversed window the same way. Math is fp32 (fp64 for fp64 input).

Channel chunks. When C fits one tile (next_pow2(C) <= _MAX_T) a program takes all channels and
the zero padding at both ends comes from masked loads. Otherwise channels are split in chunks of
CB = T - 2*HALO outputs, each loading HALO extra channels on both sides (HALO = LO|HI for the
forward, LO+HI for the backward, which needs d one window further out): the re-read costs
2*HALO/CB of the input bytes (6% for size 5, T = 256 forward), served mostly from L2.

Roofline (H100, ~3.0 TB/s): forward moves 2 * numel * itemsize bytes, backward 3 * numel *
itemsize (x and g read, gx written); flops ~ (3 + size) per element forward and ~(6 + 2*size)
backward, far below the compute roof. AlexNet's LRN on 128x96x55x55 fp32 (148 MB) is ~50 us
forward and ~74 us backward at the copy bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._backend import triton_interpreting, wrap_triton
from ..ops import check_lrn_args, check_lrn_backward_args, lrn_output_format

# Largest channel tile taken whole (no halo). 512 fp32 channels x 8 pixels = 4096 elements.
_MAX_T = 512
# Channel tile when C is split into chunks.
_CHUNK_T = 256
# Tile elements per program: forward holds ~4 fp32 tiles, backward ~8.
_FWD_ELEMS = 4096
_BWD_ELEMS = 2048


@triton.jit
def _lrn_window_sum(v, rows, LO: tl.constexpr, HI: tl.constexpr, T: tl.constexpr):
    """out[r, :] = sum_{o=-LO}^{HI} v[r + o, :], rows outside [0, T) counting as zero."""
    acc = tl.zeros(v.shape, dtype=v.dtype)
    for o in tl.static_range(0, LO + HI + 1):
        src = rows + (o - LO)
        ok = (src >= 0) & (src < T)
        idx = tl.broadcast_to(tl.where(ok, src, 0)[:, None], v.shape)
        acc += tl.where(ok[:, None], tl.gather(v, idx, axis=0), 0.0)
    return acc


@triton.jit
def _lrn_pow(d, beta, INTERP: tl.constexpr):
    """d^beta as torch's pow: libdevice's correctly rounded-to-2-ulp pow on the GPU (exp2/log2 are
    approximate, and fp32 for fp64 input); the interpreter has no libdevice, numpy's exp2/log2
    are exact enough there."""
    if INTERP:
        out = tl.exp2(beta * tl.log2(d))
    else:
        out = libdevice.pow(d, beta)
    return out


@triton.jit
def _lrn_params(prm_ptr, alpha_over_size, beta, k, coef, ACC: tl.constexpr, PRM_TENSOR: tl.constexpr):
    """The scalars in the math dtype. Triton passes Python floats as fp32: fp64 input gets them
    from a small fp64 tensor instead (fp32 alpha / beta / k would cost fp64 results 1e-8)."""
    if PRM_TENSOR:
        a = tl.load(prm_ptr + 0)
        b = tl.load(prm_ptr + 1)
        kk = tl.load(prm_ptr + 2)
        c = tl.load(prm_ptr + 3)
    else:
        a = tl.cast(alpha_over_size, ACC)
        b = tl.cast(beta, ACC)
        kk = tl.cast(k, ACC)
        c = tl.cast(coef, ACC)
    return a, b, kk, c


@triton.jit
def _lrn_fwd_kernel(
    x_ptr,
    y_ptr,
    C,
    S,
    sN,
    sC,
    sS,
    NUM_SB,  # ceil(S / BLOCK_S)
    NUM_CB,  # channel chunks
    CB,  # output channels per chunk
    prm_ptr,
    alpha_over_size,
    beta,
    k,
    LO: tl.constexpr,
    HI: tl.constexpr,
    HALO: tl.constexpr,  # channels loaded below (and above) the chunk: 0 when one chunk covers C
    T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRM_TENSOR: tl.constexpr,
    INTERP: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    a_s, beta_v, k_v, _ = _lrn_params(prm_ptr, alpha_over_size, beta, k, beta, ACC, PRM_TENSOR)
    pid = tl.program_id(0)
    sb = pid % NUM_SB
    cb = (pid // NUM_SB) % NUM_CB
    n = pid // (NUM_SB * NUM_CB)
    rows = tl.arange(0, T)
    ch = cb * CB - HALO + rows
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    in_c = (ch >= 0) & (ch < C)
    mask_s = offs_s < S
    offs = n.to(tl.int64) * sN + ch.to(tl.int64)[:, None] * sC + offs_s.to(tl.int64)[None, :] * sS
    x = tl.load(x_ptr + offs, mask=in_c[:, None] & mask_s[None, :], other=0.0).to(ACC)
    d = k_v + a_s * _lrn_window_sum(x * x, rows, LO, HI, T)
    y = x / _lrn_pow(d, beta_v, INTERP)
    out_row = (rows >= HALO) & (rows < HALO + CB) & in_c
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=out_row[:, None] & mask_s[None, :])


@triton.jit
def _lrn_bwd_kernel(
    g_ptr,
    x_ptr,
    gx_ptr,
    C,
    S,
    sN,
    sC,
    sS,
    NUM_SB,
    NUM_CB,
    CB,
    prm_ptr,
    alpha_over_size,
    beta,
    k,
    coef,  # 2 * alpha * beta / size
    LO: tl.constexpr,
    HI: tl.constexpr,
    HALO: tl.constexpr,
    T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PRM_TENSOR: tl.constexpr,
    INTERP: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    a_s, beta_v, k_v, coef_v = _lrn_params(prm_ptr, alpha_over_size, beta, k, coef, ACC, PRM_TENSOR)
    pid = tl.program_id(0)
    sb = pid % NUM_SB
    cb = (pid // NUM_SB) % NUM_CB
    n = pid // (NUM_SB * NUM_CB)
    rows = tl.arange(0, T)
    ch = cb * CB - HALO + rows
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    in_c = (ch >= 0) & (ch < C)
    mask_s = offs_s < S
    m = in_c[:, None] & mask_s[None, :]
    offs = n.to(tl.int64) * sN + ch.to(tl.int64)[:, None] * sC + offs_s.to(tl.int64)[None, :] * sS
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
    d = k_v + a_s * _lrn_window_sum(x * x, rows, LO, HI, T)
    p = 1.0 / _lrn_pow(d, beta_v, INTERP)  # d^-beta
    # Outside [0, C) t is 0 (not 0 * inf when k == 0 and the window is empty).
    t = tl.where(m, g * x * (p / d), 0.0)
    # gx[c] needs t over the reversed window [c - HI, c + LO].
    tsum = _lrn_window_sum(t, rows, HI, LO, T)
    gx = g * p - coef_v * x * tsum
    out_row = (rows >= HALO) & (rows < HALO + CB) & in_c
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=out_row[:, None] & mask_s[None, :])


def _plan(c: int, s: int, lo: int, hi: int, halo_one_side: int, elems: int, channels_last: bool):
    """(T, HALO, CB, NUM_CB, BLOCK_S)."""
    t_all = triton.next_power_of_2(c)
    if t_all <= _MAX_T:
        t, halo, cb = t_all, 0, c
    else:
        t = _CHUNK_T
        while t - 2 * halo_one_side < t // 2 and t < 4 * _MAX_T:
            t *= 2
        halo, cb = halo_one_side, t - 2 * halo_one_side
        if cb < 1:
            raise RuntimeError(
                f"lrn (triton): a window of {lo + hi + 1} channels (size) is too wide for the kernel's "
                f"channel tile with C = {c}; use the cpu/cuda/torch backend"
            )
    num_cb = triton.cdiv(c, cb)
    block_s = max(1, elems // t)
    block_s = min(block_s, triton.next_power_of_2(s))
    return t, halo, cb, num_cb, block_s


def _prep(x: torch.Tensor, size: int):
    fmt = lrn_output_format(x)
    x = x.contiguous(memory_format=fmt)
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1) if n * c > 0 else 0
    channels_last = fmt == torch.channels_last
    strides = (s * c, 1, c) if channels_last else (c * s, s, 1)
    # Channels beyond C on either side only add zeros: clamp the window to [-(C-1), C-1].
    lo = min(size // 2, max(c - 1, 0))
    hi = min((size - 1) // 2, max(c - 1, 0))
    return x, fmt, n, c, s, strides, lo, hi, channels_last


def _params(x: torch.Tensor, size, alpha, beta, k):
    """(prm tensor or x as a dummy, PRM_TENSOR): fp64 input reads its scalars from an fp64 tensor."""
    if x.dtype != torch.float64:
        return x, False
    vals = [float(alpha) / size, float(beta), float(k), 2.0 * float(alpha) * float(beta) / size]
    return torch.tensor(vals, dtype=torch.float64, device=x.device), True


def _num_warps(t: int, block_s: int) -> int:
    return 8 if t * block_s >= 2048 else 4


def lrn_forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """y = x / (k + alpha/size * sum_window x^2)^beta over channels; x: Tensor[N, C, *]."""
    check_lrn_args(x, size, alpha, beta, k)  # rank, dtype, size: the messages of every backend
    x, fmt, n, c, s, (sN, sC, sS), lo, hi, cl = _prep(x, size)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    t, halo, cb, num_cb, bs = _plan(c, s, lo, hi, max(lo, hi), _FWD_ELEMS, cl)
    grid = (n * num_cb * triton.cdiv(s, bs),)
    prm, prm_tensor = _params(x, size, alpha, beta, k)
    wrap_triton(_lrn_fwd_kernel)[grid](
        x, y, c, s, sN, sC, sS, triton.cdiv(s, bs), num_cb, cb, prm, float(alpha) / size, float(beta), float(k),
        LO=lo, HI=hi, HALO=halo, T=t, BLOCK_S=bs, PRM_TENSOR=prm_tensor, INTERP=triton_interpreting(),
        num_warps=_num_warps(t, bs),
    )  # fmt: skip
    return y


def lrn_backward(grad_out: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float, k: float):
    """Gradient of lrn_forward with respect to x (d recomputed from x, nothing saved)."""
    check_lrn_backward_args(grad_out, x, size, alpha, beta, k)
    x, fmt, n, c, s, (sN, sC, sS), lo, hi, cl = _prep(x, size)
    g = grad_out.to(x.dtype).contiguous(memory_format=fmt)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if gx.numel() == 0:
        return gx
    t, halo, cb, num_cb, bs = _plan(c, s, lo, hi, lo + hi, _BWD_ELEMS, cl)
    grid = (n * num_cb * triton.cdiv(s, bs),)
    prm, prm_tensor = _params(x, size, alpha, beta, k)
    wrap_triton(_lrn_bwd_kernel)[grid](
        g, x, gx, c, s, sN, sC, sS, triton.cdiv(s, bs), num_cb, cb, prm,
        float(alpha) / size, float(beta), float(k), 2.0 * float(alpha) * float(beta) / size,
        LO=lo, HI=hi, HALO=halo, T=t, BLOCK_S=bs, PRM_TENSOR=prm_tensor, INTERP=triton_interpreting(),
        num_warps=_num_warps(t, bs),
    )  # fmt: skip
    return gx
