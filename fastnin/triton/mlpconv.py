"""The NiN mlpconv block in Triton: KxK conv + bias + ReLU, then up to two 1x1 conv + bias + ReLU.

Notation: P = N*Ho*Wo output pixels; K0 = Cin*kh*kw; C1, C2, C3 the stage widths; CxP the width
padded to a power of two (>= 16, tl.dot's minimum) inside the kernels, with masks. Activations
inside the kernels are fp32 accumulators (fp64 for fp64 input); a stage's ReLU output is rounded to
the input dtype before it feeds the next tl.dot, which is where torch rounds it too.

Forward, _mlpconv_fwd_kernel: one program per tile of BM output pixels.
  stage 1   implicit GEMM [BM, K0] x [K0, C1]: the x patches are gathered from x's strides (any
            layout; no im2col tensor), K walked in BK chunks, output channels in BN1 chunks.
            Two gather orders: "taps" (loop over kernel taps, then BK input channels at a time:
            one bounds check per tap and row, loads contiguous along C for channels_last) and
            "flat" (K0 in BK chunks of the flattened (r, s, ci) index: for Cin < 16, where a
            channel chunk would be mostly padding, e.g. the textbook NiN's 1-channel 11x11 conv).
  stage 2   each stage-1 chunk, after bias+ReLU, is multiplied straight into the stage-2
            accumulator [BM, C2P] (held whole in registers) and then dropped: h1 never exists
            in full, anywhere.
  stage 3   h2 = ReLU(acc2 + b1) [BM, C2P] stays in registers; the output is produced in BN3
            column chunks, h2 x W2^T[:, chunk] (one tl.dot with K = C2P), + bias + ReLU, stored.
  gap=True  tiles never span two images (grid = N x tiles-per-image); each tile stores its
            column sums to an fp32 buffer [N, tiles, C], summed afterwards in a fixed order:
            deterministic, no atomics. The [N, C, Ho, Wo] map is never written.
  Cost: x is re-gathered once per stage-1 chunk (C1P / BN1 times, from L1/L2) and W0/W1/W2 are
  re-read from L2 by every tile: the kernel is compute-bound once BM * (C1+C2+C3) outweighs
  the weights, as for all NiN blocks at batch 128.
  Roofline per call: flops = 2*P*(K0*C1 + C1*C2 + C2*C3); DRAM bytes ~ (N*Cin*H*W + P*C3)*itemsize
  + weights. Textbook NiN block 2 (96->256, k5, 26x26, batch 128, bf16): 110 GFLOP vs 27 MB,
  ~0.14 ms at 800 TFLOP/s; block 0 (1->96, k11 s4, 54x54): 18 GFLOP vs 85 MB (~28 us at 3 TB/s
  for the bytes), so there the output write and the padded K (121 -> 128) set the time.

Wide stages (channel counts up to 1024). Only one width is held whole on chip: the stage-2 output
C2 (the middle of a 3-stage chain, or the output of a 2-stage one). Stages 1 and 3 are chunked and
can be any width. When C2P exceeds the fused limit (_max_width: 512 for fp16/bf16, 256 for fp32,
set by the [BM, C2P] fp32 accumulator's registers and the [C2P, BN3] weight tile's shared
memory), the chain is split into segments at the wide boundary: [1][2,3] when C3 fits, else
[1][2][3] (or [1][2] for two stages). Each segment is one launch of the same kernel; a
non-first segment reads the previous one's output as a 1x1 conv input. Cost: the activation at
each cut is written once and read once: 2 * P * C * itemsize extra bytes per cut, no recompute.
The ImageNet NiN's 1024-1024-1000 block runs as [1][2][3]; every block of the paper's and the
textbook's NiN (widths <= 384) runs as one launch in bf16.

Backward (forward saved only x and out): per segment, from the last to the first,
  1. _mlpconv_bwd_kernel, per pixel tile: recomputes h1 (stage-1 GEMM, as the forward) and h2,
     writes h1 to a temporary [P, C1] (the mask for g1 and the input of gW1), forms
     g3 = gout * (out > 0) (with gap: gout/(Ho*Wo) and the mask from a recomputed z3),
     gh2 = g3 W2 accumulated over C3 chunks, g2 = gh2 * (h2 > 0) in registers, then (after a
     CTA barrier, since other threads wrote the h1 tile) g1 = (g2 W1) * (h1 > 0) in C1 chunks.
     It writes g1 [P, C1] (needed across tile borders by the KxK gradients) and, when weight or
     bias gradients are wanted, g2, g3 and h2. With one stage g1 = gout * (out > 0) directly.
  2. _mlpconv_wgrad_kernel: gW_i[co, k] = sum_p G[p, co] A[p, k] and gb_i = sum_p G[p, co], with
     A the implicit im2col of x for W0 (same gather as the forward) or the [P, C] temporary for
     the 1x1 stages. The reduction over P is split over SPLIT programs that write fp32 partials,
     summed in a fixed order afterwards: deterministic, no atomics.
  3. _mlpconv_dgrad_kernel: gx = the transposed convolution of g1 with W0, as an implicit GEMM in
     gather form: each input pixel sums over the output pixels whose window covers it. Input
     pixels are grouped by (ih mod sh, iw mod sw): within a group exactly the taps r = (ih + ph)
     mod sh (step sh) contribute, so a strided conv wastes no work on taps that do not hit.
     Skipped when output_mask says so.
  Temporaries live only during the backward (h1, g1 [P, C1]; h2, g2, g3 when weight grads are
  wanted), in the input dtype. Roofline: flops = 2x the forward for the weight and input grads
  plus one forward recompute; bytes ~ the temporaries written and read once.

fp32 follows torch's convolution flag: TF32 tensor cores iff torch.backends.cudnn.allow_tf32,
else input_precision="ieee". fp64 (gradcheck) uses tl.dot on fp64, which Triton supports on
sm_80+ and in the interpreter. The interpreter (triton 3.8) multiplies bf16 dot operands as raw
uint16 bits, so under TRITON_INTERPRET=1 bf16 operands are widened to fp32 first (exact: the
product of two bf16 values fits in fp32, as on the tensor cores).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting, wrap_triton
from ..ops import check_mlpconv_args, check_mlpconv_backward_args, empty_mlpconv_grads, empty_mlpconv_output, mlpconv_output_size

# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 (fp64) accumulation. One exit: triton 3.6 compiles the statements
    after an early `return` inside a compile-time `if` too."""
    if a.dtype == tl.float64:
        # fp64 exists for gradcheck; triton 3.6's fp64 tl.dot rejects an fp64 accumulator, so
        # multiply-add on the FMA units (the launcher gives fp64 small tiles, see _FP64_CFG).
        out = acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return out


@triton.jit
def _relu(z):
    # where(z < 0, 0, z), not maximum(z, 0): NaN stays NaN, as torch.relu.
    return tl.where(z < 0, 0.0, z)


@triton.jit
def _pixel_rows(pid, P, HoWo, Wo, BM: tl.constexpr, GAP: tl.constexpr):
    """The BM output pixels of tile `pid`: (row_ok, p, n, oh, ow). With GAP a tile never spans
    two images: tile pid is tile pid % TPI of image pid // TPI, TPI = ceil(Ho*Wo / BM)."""
    if GAP:
        tpi = tl.cdiv(HoWo, BM)
        local = (pid % tpi) * BM + tl.arange(0, BM)
        row_ok = local < HoWo
        p = (pid // tpi) * HoWo + local
    else:
        p = pid * BM + tl.arange(0, BM)
        row_ok = p < P
    n = p // HoWo
    rem = p % HoWo
    oh = rem // Wo
    ow = rem % Wo
    return row_ok, p, n, oh, ow


@triton.jit
def _im2col_tile(x_ptr, it, xbase, ih0, iw0, row_ok, H, W, Cin, K0, KW, sxc, sxh, sxw, sw1, sw2, sw3,
                 FLAT: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """The it-th K chunk [BM, BK] of the implicit im2col matrix of x for the given pixel rows
    (xbase = n * sxn, ih0 = oh*sh - ph, iw0 = ow*sw - pw), zero outside the image.

    K is ordered (r, s, ci). Returns (a, koff, kflat, kmask): koff = the weight offsets
    ci*sw1 + r*sw2 + s*sw3 of the chunk's K entries, kflat = their flat index (r*KW + s)*Cin + ci.
    """
    kk = tl.arange(0, BK)
    if FLAT:
        k = it * BK + kk
        kmask = k < K0
        ci = k % Cin
        rs = k // Cin
        r = rs // KW
        s = rs % KW
        ih = ih0[:, None] + r[None, :]
        iw = iw0[:, None] + s[None, :]
        m = row_ok[:, None] & kmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ptrs = x_ptr + xbase[:, None] + ci.to(tl.int64)[None, :] * sxc + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a = tl.load(ptrs, mask=m, other=0.0)
        koff = ci * sw1 + r * sw2 + s * sw3
        kflat = k
    else:
        ncib = tl.cdiv(Cin, BK)
        rs = it // ncib
        ci = (it % ncib) * BK + kk
        r = rs // KW
        s = rs % KW
        kmask = ci < Cin
        ih = ih0 + r
        iw = iw0 + s
        rm = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        rowoff = xbase + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a = tl.load(x_ptr + rowoff[:, None] + ci.to(tl.int64)[None, :] * sxc, mask=rm[:, None] & kmask[None, :],
                    other=0.0)  # fmt: skip
        koff = ci * sw1 + r * sw2 + s * sw3
        kflat = rs * Cin + ci
    return a, koff, kflat, kmask


@triton.jit
def _stage1(x_ptr, w0_ptr, b0_ptr, xbase, ih0, iw0, row_ok, offs_n, mask_n, H, W, Cin, K0, KH, KW,
            sxc, sxh, sxw, sw0, sw1, sw2, sw3,
            HAS_B: tl.constexpr, FLAT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
            ACC: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """z1[:, offs_n] = im2col(x)[rows] @ W0^T[:, offs_n] + b0[offs_n]: [BM, BN], before the ReLU."""
    if FLAT:
        num_it = tl.cdiv(K0, BK)
    else:
        num_it = KH * KW * tl.cdiv(Cin, BK)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for it in range(0, num_it):
        a, koff, kflat, kmask = _im2col_tile(x_ptr, it, xbase, ih0, iw0, row_ok, H, W, Cin, K0, KW, sxc, sxh, sxw,
                                             sw1, sw2, sw3, FLAT, BK)  # fmt: skip
        w = tl.load(w0_ptr + koff[:, None] + offs_n[None, :] * sw0, mask=kmask[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(a, w, acc, DOT_PREC, UPCAST)
    if HAS_B:
        acc += tl.load(b0_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    # Padded columns hold inf * 0 = NaN when x has an inf; they are the next stage's K, where the
    # zero-padded weights would turn that NaN into every real output of the row. Zero them.
    return tl.where(mask_n[None, :], acc, 0.0)


@triton.jit
def _emit(out_ptr, val, pid, row_ok, n, oh, ow, offs_c, mask_c, son, soc, soh, sow, HoWo,
          BM: tl.constexpr, GAP: tl.constexpr):  # fmt: skip
    """Store a [BM, BNc] block of the final ReLU output; or, with GAP, its column sums into the
    fp32 partial buffer [N * ceil(Ho*Wo / 16), C] (soc = C).

    GAP partial rows are counted in units of 16 pixels, whatever BM the autotuner picked: the
    tile covering pixel rows [16j, 16j + BM) writes its column sum to row j and zeros to the
    BM/16 - 1 rows after it, so every row is written by exactly one tile and benchmark runs of
    other configs leave nothing stale. The host sums the rows in a fixed order."""
    m = row_ok[:, None] & mask_c[None, :]
    if GAP:
        colsum = tl.sum(tl.where(m, val, 0.0), axis=0)
        r16 = tl.cdiv(HoWo, 16)
        tpi = tl.cdiv(HoWo, BM)
        sub = tl.arange(0, BM // 16)
        row = (pid % tpi) * (BM // 16) + sub
        blk = tl.where(sub[:, None] == 0, colsum[None, :], 0.0)
        ptrs = out_ptr + ((pid // tpi).to(tl.int64) * r16 + row)[:, None] * soc + offs_c[None, :]
        tl.store(ptrs, blk, mask=(row < r16)[:, None] & mask_c[None, :])
    else:
        rowoff = n.to(tl.int64) * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
        ptrs = out_ptr + rowoff[:, None] + offs_c.to(tl.int64)[None, :] * soc
        tl.store(ptrs, val.to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mlpconv_fwd_kernel(
    x_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
    P, HoWo, Wo, H, W, Cin, K0, C1, C2, C3, KH, KW, SH, SW, PH, PW,
    sxn, sxc, sxh, sxw,
    sw0, sw1, sw2, sw3,  # weights[0] [C1, Cin, KH, KW]
    s1o, s1i,  # weights[1] [C2, C1]
    s2o, s2i,  # weights[2] [C3, C2]
    son, soc, soh, sow,  # out [N, Cout, Ho, Wo]; with GAP: (0, Cout, 0, 0) for the partials
    P_BUCKET,  # autotune key only
    NSTAGES: tl.constexpr, HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    FLAT: tl.constexpr, GAP: tl.constexpr, C2P: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN1: tl.constexpr, BN3: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    row_ok, p, n, oh, ow = _pixel_rows(pid, P, HoWo, Wo, BM, GAP)
    xbase = n.to(tl.int64) * sxn
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    if NSTAGES == 1:
        for c0 in range(0, C1, BN1):
            offs1 = c0 + tl.arange(0, BN1)
            mask1 = offs1 < C1
            z1 = _stage1(x_ptr, w0_ptr, b0_ptr, xbase, ih0, iw0, row_ok, offs1, mask1, H, W, Cin, K0, KH, KW,
                         sxc, sxh, sxw, sw0, sw1, sw2, sw3, HAS_B0, FLAT, BM, BK, BN1, ACC, DOT_PREC, UPCAST)
            _emit(out_ptr, _relu(z1), pid, row_ok, n, oh, ow, offs1, mask1, son, soc, soh, sow, HoWo, BM, GAP)
    else:
        offs2 = tl.arange(0, C2P)
        mask2 = offs2 < C2
        acc2 = tl.zeros((BM, C2P), dtype=ACC)
        for c0 in range(0, C1, BN1):
            offs1 = c0 + tl.arange(0, BN1)
            mask1 = offs1 < C1
            z1 = _stage1(x_ptr, w0_ptr, b0_ptr, xbase, ih0, iw0, row_ok, offs1, mask1, H, W, Cin, K0, KH, KW,
                         sxc, sxh, sxw, sw0, sw1, sw2, sw3, HAS_B0, FLAT, BM, BK, BN1, ACC, DOT_PREC, UPCAST)
            h1 = _relu(z1).to(DT)
            # W1^T chunk [BN1, C2P]: element (c1, c2) = w1[c2, c1]
            w1t = tl.load(w1_ptr + offs1[:, None] * s1i + offs2[None, :] * s1o,
                          mask=mask1[:, None] & mask2[None, :], other=0.0)  # fmt: skip
            acc2 = _mma(h1, w1t, acc2, DOT_PREC, UPCAST)
        if HAS_B1:
            acc2 += tl.load(b1_ptr + offs2, mask=mask2, other=0.0).to(ACC)[None, :]
        acc2 = tl.where(mask2[None, :], acc2, 0.0)  # padded columns: see _stage1
        h2 = _relu(acc2)
        if NSTAGES == 2:
            _emit(out_ptr, h2, pid, row_ok, n, oh, ow, offs2, mask2, son, soc, soh, sow, HoWo, BM, GAP)
        else:
            h2 = h2.to(DT)
            for c0 in range(0, C3, BN3):
                offs3 = c0 + tl.arange(0, BN3)
                mask3 = offs3 < C3
                w2t = tl.load(w2_ptr + offs2[:, None] * s2i + offs3[None, :] * s2o,
                              mask=mask2[:, None] & mask3[None, :], other=0.0)  # fmt: skip
                z3 = _mma(h2, w2t, tl.zeros((BM, BN3), dtype=ACC), DOT_PREC, UPCAST)
                if HAS_B2:
                    z3 += tl.load(b2_ptr + offs3, mask=mask3, other=0.0).to(ACC)[None, :]
                _emit(out_ptr, _relu(z3), pid, row_ok, n, oh, ow, offs3, mask3, son, soc, soh, sow, HoWo, BM, GAP)


# ------------------------------------------------------------------------------------------------
# Backward, 1: recompute the chain per pixel tile and propagate the gradient down to g1
# ------------------------------------------------------------------------------------------------


@triton.jit
def _load_gout(gout_ptr, mask_ptr, row_ok, n, oh, ow, offs_c, mask_c, sgn, sgc, sgh, sgw,
               smn, smc, smh, smw, HoWo, z, GAP: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """gout * relu'(last stage) for a [BM, BNc] block. Without GAP the mask is out > 0 (torch's
    threshold_backward on the ReLU output); with GAP gout is [N, C] (sgh = sgw = 0), scaled by
    1/(Ho*Wo), and the mask comes from the recomputed pre-activation z."""
    m = row_ok[:, None] & mask_c[None, :]
    goff = n.to(tl.int64) * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
    g = tl.load(gout_ptr + goff[:, None] + offs_c.to(tl.int64)[None, :] * sgc, mask=m, other=0.0).to(ACC)
    if GAP:
        g = g / HoWo  # torch's mean backward: grad / (Ho*Wo)
        keep = ~(z <= 0)  # not z > 0: a NaN pre-activation passes the gradient, as in torch
    else:
        moff = n.to(tl.int64) * smn + oh.to(tl.int64) * smh + ow.to(tl.int64) * smw
        o = tl.load(mask_ptr + moff[:, None] + offs_c.to(tl.int64)[None, :] * smc, mask=m, other=0.0)
        keep = ~(o <= 0)
    return tl.where(keep & m, g, 0.0)


@triton.jit
def _store_rows(ptr, val, p, row_ok, offs_c, mask_c, C):
    """Store a [BM, BNc] block into a row-major [P, C] temporary."""
    ptrs = ptr + p.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=row_ok[:, None] & mask_c[None, :])


@triton.jit
def _mlpconv_bwd_kernel(
    x_ptr, w0_ptr, b0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    gout_ptr, mask_ptr,  # grad_out; out (the ReLU mask of the last stage; unused with GAP)
    g1_ptr, h1_ptr, g2_ptr, h2_ptr, g3_ptr,  # [P, Ci] temporaries
    P, HoWo, Wo, H, W, Cin, K0, C1, C2, C3, KH, KW, SH, SW, PH, PW,
    sxn, sxc, sxh, sxw,
    sw0, sw1, sw2, sw3,
    s1o, s1i,
    s2o, s2i,
    sgn, sgc, sgh, sgw,
    smn, smc, smh, smw,
    P_BUCKET,
    NSTAGES: tl.constexpr, HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    FLAT: tl.constexpr, GAP: tl.constexpr, STORE_WB: tl.constexpr, C2P: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN1: tl.constexpr, BN3: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    DT: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    row_ok, p, n, oh, ow = _pixel_rows(pid, P, HoWo, Wo, BM, GAP)
    xbase = n.to(tl.int64) * sxn
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    if NSTAGES == 1:
        for c0 in range(0, C1, BN1):
            offs1 = c0 + tl.arange(0, BN1)
            mask1 = offs1 < C1
            if GAP:
                z1 = _stage1(x_ptr, w0_ptr, b0_ptr, xbase, ih0, iw0, row_ok, offs1, mask1, H, W, Cin, K0, KH, KW,
                             sxc, sxh, sxw, sw0, sw1, sw2, sw3, HAS_B0, FLAT, BM, BK, BN1, ACC, DOT_PREC, UPCAST)
            else:
                z1 = tl.zeros((BM, BN1), dtype=ACC)
            g1 = _load_gout(gout_ptr, mask_ptr, row_ok, n, oh, ow, offs1, mask1, sgn, sgc, sgh, sgw,
                            smn, smc, smh, smw, HoWo, z1, GAP, ACC)  # fmt: skip
            _store_rows(g1_ptr, g1, p, row_ok, offs1, mask1, C1)
    else:
        # Recompute h1 chunk by chunk (kept in the h1 temporary) and z2 whole.
        offs2 = tl.arange(0, C2P)
        mask2 = offs2 < C2
        acc2 = tl.zeros((BM, C2P), dtype=ACC)
        for c0 in range(0, C1, BN1):
            offs1 = c0 + tl.arange(0, BN1)
            mask1 = offs1 < C1
            z1 = _stage1(x_ptr, w0_ptr, b0_ptr, xbase, ih0, iw0, row_ok, offs1, mask1, H, W, Cin, K0, KH, KW,
                         sxc, sxh, sxw, sw0, sw1, sw2, sw3, HAS_B0, FLAT, BM, BK, BN1, ACC, DOT_PREC, UPCAST)
            h1 = _relu(z1).to(DT)
            _store_rows(h1_ptr, h1, p, row_ok, offs1, mask1, C1)
            w1t = tl.load(w1_ptr + offs1[:, None] * s1i + offs2[None, :] * s1o,
                          mask=mask1[:, None] & mask2[None, :], other=0.0)  # fmt: skip
            acc2 = _mma(h1, w1t, acc2, DOT_PREC, UPCAST)
        if HAS_B1:
            acc2 += tl.load(b1_ptr + offs2, mask=mask2, other=0.0).to(ACC)[None, :]
        acc2 = tl.where(mask2[None, :], acc2, 0.0)  # padded columns: see _stage1
        if NSTAGES == 2:
            g2 = _load_gout(gout_ptr, mask_ptr, row_ok, n, oh, ow, offs2, mask2, sgn, sgc, sgh, sgw,
                            smn, smc, smh, smw, HoWo, acc2, GAP, ACC)  # fmt: skip
        else:
            h2 = _relu(acc2).to(DT)
            if STORE_WB:
                _store_rows(h2_ptr, h2, p, row_ok, offs2, mask2, C2)
            gh2 = tl.zeros((BM, C2P), dtype=ACC)
            for c0 in range(0, C3, BN3):
                offs3 = c0 + tl.arange(0, BN3)
                mask3 = offs3 < C3
                if GAP:
                    w2t = tl.load(w2_ptr + offs2[:, None] * s2i + offs3[None, :] * s2o,
                                  mask=mask2[:, None] & mask3[None, :], other=0.0)  # fmt: skip
                    z3 = _mma(h2, w2t, tl.zeros((BM, BN3), dtype=ACC), DOT_PREC, UPCAST)
                    if HAS_B2:
                        z3 += tl.load(b2_ptr + offs3, mask=mask3, other=0.0).to(ACC)[None, :]
                else:
                    z3 = tl.zeros((BM, BN3), dtype=ACC)
                g3 = _load_gout(gout_ptr, mask_ptr, row_ok, n, oh, ow, offs3, mask3, sgn, sgc, sgh, sgw,
                                smn, smc, smh, smw, HoWo, z3, GAP, ACC).to(DT)  # fmt: skip
                if STORE_WB:
                    _store_rows(g3_ptr, g3, p, row_ok, offs3, mask3, C3)
                # W2 rows [BN3, C2P]
                w2 = tl.load(w2_ptr + offs3[:, None] * s2o + offs2[None, :] * s2i,
                             mask=mask3[:, None] & mask2[None, :], other=0.0)  # fmt: skip
                gh2 = _mma(g3, w2, gh2, DOT_PREC, UPCAST)
            g2 = tl.where(h2 <= 0, 0.0, gh2)
        g2 = g2.to(DT)
        if STORE_WB:
            _store_rows(g2_ptr, g2, p, row_ok, offs2, mask2, C2)
        # g1 = (g2 W1) * (h1 > 0). The h1 tile was stored above by other threads of this program:
        # a CTA barrier makes those global writes visible before they are read back.
        tl.debug_barrier()
        for c0 in range(0, C1, BN1):
            offs1 = c0 + tl.arange(0, BN1)
            mask1 = offs1 < C1
            w1 = tl.load(w1_ptr + offs2[:, None] * s1o + offs1[None, :] * s1i,
                         mask=mask2[:, None] & mask1[None, :], other=0.0)  # fmt: skip
            gh1 = _mma(g2, w1, tl.zeros((BM, BN1), dtype=ACC), DOT_PREC, UPCAST)
            m1 = row_ok[:, None] & mask1[None, :]
            h1 = tl.load(h1_ptr + p.to(tl.int64)[:, None] * C1 + offs1[None, :], mask=m1, other=0.0)
            _store_rows(g1_ptr, tl.where(h1 <= 0, 0.0, gh1), p, row_ok, offs1, mask1, C1)


# ------------------------------------------------------------------------------------------------
# Backward, 2: weight and bias gradients (reduction over pixels, split, fixed-order sum)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mlpconv_wgrad_kernel(
    x_ptr, g_ptr, ws_ptr, wsb_ptr,
    P, HoWo, Wo, H, W, Cin, K0, Cout, KH, KW, SH, SW, PH, PW,
    sxn, sxc, sxh, sxw,
    p_per_split,
    P_BUCKET,
    FLAT: tl.constexpr, DO_W: tl.constexpr, DO_B: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """ws[split, co, k] = sum_{p in split} g[p, co] * im2col(x)[p, k];  wsb[split, co] = sum g[p, co].

    x is the stage's input ([N, Cin, H, W] with its strides; for a 1x1 stage the [P, C]
    temporary seen as channels_last with KH = KW = 1) and g the [P, Cout] gradient of its output.
    K ordered (r, s, ci), kflat as in _im2col_tile.
    """
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if DO_W:
        if FLAT:
            num_kb = tl.cdiv(K0, BK)
        else:
            num_kb = KH * KW * tl.cdiv(Cin, BK)
        kb = pid % num_kb
        nb = pid // num_kb
    else:
        kb = 0
        nb = pid
    offs_co = nb * BN + tl.arange(0, BN)
    mask_co = offs_co < Cout
    acc = tl.zeros((BN, BK), dtype=ACC)
    bacc = tl.zeros((BN,), dtype=ACC)
    p_begin = split * p_per_split
    p_end = tl.minimum(p_begin + p_per_split, P)
    for p0 in range(p_begin, p_end, BM):
        p = p0 + tl.arange(0, BM)
        row_ok = p < p_end
        # g^T tile [BN, BM]
        gt = tl.load(g_ptr + p.to(tl.int64)[None, :] * Cout + offs_co[:, None],
                     mask=mask_co[:, None] & row_ok[None, :], other=0.0)  # fmt: skip
        if DO_B:
            bacc += tl.sum(gt.to(ACC), axis=1)
        if DO_W:
            n = p // HoWo
            rem = p % HoWo
            oh = rem // Wo
            ow = rem % Wo
            a, koff, kflat, kmask = _im2col_tile(x_ptr, kb, n.to(tl.int64) * sxn, oh * SH - PH, ow * SW - PW, row_ok,
                                                 H, W, Cin, K0, KW, sxc, sxh, sxw, 0, 0, 0, FLAT, BK)  # fmt: skip
            acc = _mma(gt, a, acc, DOT_PREC, UPCAST)
    if DO_W:
        kk = tl.arange(0, BK)
        if FLAT:
            kflat = kb * BK + kk
            kmask = kflat < K0
        else:
            ncib = tl.cdiv(Cin, BK)
            ci = (kb % ncib) * BK + kk
            kflat = (kb // ncib) * Cin + ci
            kmask = ci < Cin
        wptrs = ws_ptr + split.to(tl.int64) * Cout * K0 + offs_co[:, None] * K0 + kflat[None, :]
        tl.store(wptrs, acc, mask=mask_co[:, None] & kmask[None, :])
    if DO_B:
        tl.store(wsb_ptr + split.to(tl.int64) * Cout + offs_co, bacc, mask=mask_co & (kb == 0))


# ------------------------------------------------------------------------------------------------
# Backward, 3: input gradient of the KxK stage (transposed conv as a gather-form implicit GEMM)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mlpconv_dgrad_kernel(
    g1_ptr, w0_ptr, gx_ptr,
    N, H, W, Ho, Wo, Cin, C1, KH, KW, SH, SW, PH, PW,
    sw0, sw1, sw2, sw3,
    sgxn, sgxc, sgxh, sgxw,
    HR, WR,
    P_BUCKET,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """gx[n, ci, ih, iw] = sum over taps (r, s) with oh = (ih + ph - r) / sh, ow = (iw + pw - s) / sw
    integral and inside the output, of sum_c1 g1[n, oh, ow, c1] * W0[c1, ci, r, s].

    Programs are grouped by residue class (ih mod sh, iw mod sw) = (rh, rw): in a class the taps
    that hit are r = (rh + ph) mod sh, + sh, ... (likewise s), so no tap is tried in vain.
    """
    ACC: tl.constexpr = tl.float64 if gx_ptr.dtype.element_ty == tl.float64 else tl.float32
    num_nb = tl.cdiv(Cin, BN)
    num_pt = tl.cdiv(N * HR * WR, BM)
    pid = tl.program_id(0)
    nb = pid % num_nb
    pt = (pid // num_nb) % num_pt
    cls = pid // (num_nb * num_pt)
    rh = cls // SW
    rw = cls % SW
    q = pt * BM + tl.arange(0, BM)
    n = q // (HR * WR)
    rem = q % (HR * WR)
    ih = rh + SH * (rem // WR)
    iw = rw + SW * (rem % WR)
    row_ok = (n < N) & (ih < H) & (iw < W)
    offs_ci = nb * BN + tl.arange(0, BN)
    mask_ci = offs_ci < Cin
    acc = tl.zeros((BM, BN), dtype=ACC)
    r0 = (rh + PH) % SH
    s0 = (rw + PW) % SW
    for r in range(r0, KH, SH):
        # exact division: ih + ph - r is a multiple of sh in this class
        oh = (ih + PH - r) // SH
        ok_h = row_ok & (oh >= 0) & (oh < Ho)
        for s in range(s0, KW, SW):
            ow = (iw + PW - s) // SW
            ok = ok_h & (ow >= 0) & (ow < Wo)
            gbase = ((n * Ho + oh) * Wo + ow).to(tl.int64) * C1
            # Each tap is summed apart and added only on the rows where it lands inside the
            # output: a row whose tap falls outside multiplies zeros by W0, and 0 * NaN (a NaN
            # or Inf weight) would otherwise reach a gradient that torch keeps finite.
            tap = tl.zeros((BM, BN), dtype=ACC)
            for c0 in range(0, C1, BK):
                offs_k = c0 + tl.arange(0, BK)
                mask_k = offs_k < C1
                a = tl.load(g1_ptr + gbase[:, None] + offs_k[None, :], mask=ok[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(w0_ptr + offs_k[:, None] * sw0 + offs_ci[None, :] * sw1 + r * sw2 + s * sw3,
                            mask=mask_k[:, None] & mask_ci[None, :], other=0.0)  # fmt: skip
                tap = _mma(a, b, tap, DOT_PREC, UPCAST)
            acc += tl.where(ok[:, None], tap, 0.0)
    rowoff = n.to(tl.int64) * sgxn + ih.to(tl.int64) * sgxh + iw.to(tl.int64) * sgxw
    ptrs = gx_ptr + rowoff[:, None] + offs_ci.to(tl.int64)[None, :] * sgxc
    tl.store(ptrs, acc.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None] & mask_ci[None, :])


# ------------------------------------------------------------------------------------------------
# Configurations (Hopper: H100 / H200, 228 KB shared memory and 64K registers per SM)
# ------------------------------------------------------------------------------------------------


def _cfg(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


# Under the interpreter every config would run (autotuning), and block sizes only change how many
# numpy steps it takes: one small config.
_INTERP_CHAIN = [_cfg(4, 1, BM=32, BK=16)]
_INTERP_WGRAD = [_cfg(4, 1, BM=32, BN=32, BK=32)]
_INTERP_DGRAD = [_cfg(4, 1, BM=32, BN=32, BK=32)]

# Checked offline with ptxas (triton 3.6 for sm_90, the NiN shapes, bf16): every config compiles;
# the forward configs mostly run spill-free once BN1 = BN3 <= 64 (BN 128 spilled 200-950 B/thread),
# the backward chain kernel still spills (100-1500 B of stack) at C2P >= 128: a GPU profile should
# decide between these and smaller BM. Unmeasured on a GPU so far. tests/_triton_aot.py compiles
# every config for sm_90 in CI, every dtype (shared memory checked, spills not).
# The chain kernels hold a [BM, C2P] fp32 accumulator (two in the backward): BM shrinks as C2P
# grows to stay near 128 accumulator registers per thread; num_stages is the depth of the
# stage-1 K loop's pipeline, whose tiles (BM + BN1) * BK * itemsize per stage are small next to
# the W1/W2 tiles ([BN1, C2P], [C2P, BN3]) that share the 228 KB.
_FWD_CONFIGS = {
    "narrow": [  # C2P <= 128, or one stage
        _cfg(8, 3, BM=128, BK=32),
        _cfg(4, 3, BM=64, BK=64),
        _cfg(8, 3, BM=128, BK=64),
        _cfg(4, 4, BM=64, BK=32),
    ],
    "mid": [  # C2P == 256
        _cfg(8, 3, BM=64, BK=32),
        _cfg(8, 3, BM=64, BK=64),
        _cfg(8, 2, BM=128, BK=32),
    ],
    "wide": [  # C2P == 512 (fp16/bf16 only). ptxas (triton 3.6, sm_90, offline): BM=32 at 4 warps
        # came out at 32 registers and a 6 KB stack, so 8 warps for both.
        _cfg(8, 2, BM=32, BK=32),
        _cfg(8, 2, BM=64, BK=32),
    ],
}
_BWD_CONFIGS = {
    "narrow": [_cfg(8, 3, BM=64, BK=32), _cfg(4, 3, BM=64, BK=64), _cfg(8, 3, BM=128, BK=32)],
    "mid": [_cfg(8, 2, BM=64, BK=32), _cfg(8, 2, BM=32, BK=64)],
    "wide": [_cfg(8, 2, BM=32, BK=32)],
}
# fp32 operands (TF32 or IEEE dots) take twice the shared memory of bf16: compiled for sm_90
# (tests/_triton_aot.py, triton 3.8), the 3-stage BM=64 "mid" forward configs need 272 KB and the
# BM=128 "narrow" backward one 288 KB in fp32, over the 227 KB a block may have (the autotuner
# would drop them at run time with OutOfResources, each after a wasted compile). In fp32 those run
# with 2 stages: 208 and 160 KB.
_FWD_CONFIGS_FP32 = {
    **_FWD_CONFIGS,
    "mid": [_cfg(8, 2, BM=64, BK=32), _cfg(8, 2, BM=64, BK=64), _cfg(8, 2, BM=128, BK=32)],
}
_BWD_CONFIGS_FP32 = {
    **_BWD_CONFIGS,
    "narrow": [_cfg(8, 3, BM=64, BK=32), _cfg(4, 3, BM=64, BK=64), _cfg(8, 2, BM=128, BK=32)],
}
_WGRAD_CONFIGS = [
    _cfg(8, 3, BM=32, BN=128, BK=128),
    _cfg(4, 3, BM=64, BN=64, BK=64),
    _cfg(8, 4, BM=64, BN=128, BK=64),
]
_DGRAD_CONFIGS = [
    _cfg(8, 3, BM=128, BN=64, BK=32),
    _cfg(4, 3, BM=64, BN=64, BK=64),
    _cfg(8, 3, BM=128, BN=128, BK=32),
]

_CHAIN_KEY = ["K0", "C1", "C2", "C3", "P_BUCKET", "NSTAGES", "GAP"]


def _width_class(c2p: int) -> str:
    return "narrow" if c2p <= 128 else ("mid" if c2p <= 256 else "wide")


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, cls: str = "", fp32: bool = False):
    """The autotuned launcher of a kernel (one per width class, and fp32 or not, for the chain
    kernels)."""
    interp = triton_interpreting()
    if kind == "fwd":
        configs = (_FWD_CONFIGS_FP32 if fp32 else _FWD_CONFIGS)[cls]
        return triton.autotune(_INTERP_CHAIN if interp else configs, key=_CHAIN_KEY)(_mlpconv_fwd_kernel)
    if kind == "bwd":
        configs = (_BWD_CONFIGS_FP32 if fp32 else _BWD_CONFIGS)[cls]
        return triton.autotune(_INTERP_CHAIN if interp else configs, key=_CHAIN_KEY)(_mlpconv_bwd_kernel)
    if kind == "wgrad":
        return triton.autotune(
            _INTERP_WGRAD if interp else _WGRAD_CONFIGS, key=["K0", "Cout", "P_BUCKET", "FLAT", "DO_W"]
        )(_mlpconv_wgrad_kernel)
    if kind == "dgrad":
        return triton.autotune(_INTERP_DGRAD if interp else _DGRAD_CONFIGS, key=["Cin", "C1", "P_BUCKET"])(
            _mlpconv_dgrad_kernel
        )
    raise KeyError(kind)


# fp64 (gradcheck only) multiplies on the FMA units with [BM, BK, BN] broadcasts: small fixed tiles.
_FP64_CFG = {
    "fwd": {"BM": 16, "BK": 16, "BN1": 16, "BN3": 16, "num_warps": 4, "num_stages": 1},
    "bwd": {"BM": 16, "BK": 16, "BN1": 16, "BN3": 16, "num_warps": 4, "num_stages": 1},
    "wgrad": {"BM": 16, "BN": 16, "BK": 16, "num_warps": 4, "num_stages": 1},
    "dgrad": {"BM": 16, "BN": 16, "BK": 16, "num_warps": 4, "num_stages": 1},
}


def _launch(kind, cls, grid, args, constexprs, config):
    """Launch through the autotuner, or with `config` (a dict of block sizes plus num_warps /
    num_stages), which tests use to reach specific tilings."""
    if config is None and args[0].dtype == torch.float64 and not triton_interpreting():
        config = _FP64_CFG[kind]
    if config is None:
        wrap_triton(_autotuned(kind, cls, args[0].dtype == torch.float32))[grid](*args, **constexprs)
        return
    cfg = dict(constexprs)
    cfg.update(config)  # a config may also override the launcher's BN1 / BN3
    num_warps = cfg.pop("num_warps", 4)
    num_stages = cfg.pop("num_stages", 2)
    kernel = _autotuned(kind, cls).fn
    wrap_triton(kernel)[grid](*args, **cfg, num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

_P2_MIN = 16  # tl.dot's smallest M/N/K


def _p2(c: int) -> int:
    return max(_P2_MIN, triton.next_power_of_2(int(c)))


def _max_width(dtype: torch.dtype, direction: str) -> int:
    """The widest C2 (padded) a single fused launch holds on chip."""
    if dtype == torch.float64:
        return 64
    if dtype == torch.float32:
        return 256 if direction == "fwd" else 128
    return 512 if direction == "fwd" else 256


def plan_segments(widths, max_width: int) -> list[tuple[int, int]]:
    """Split the chain [C1, (C2, (C3))] into fused segments (start, stop) of stage indices so that
    no segment holds a stage-2 output wider than max_width (padded) on chip. See the module doc."""
    s = len(widths)
    if s == 1:
        return [(0, 1)]
    if _p2(widths[1]) <= max_width:
        return [(0, s)]
    if s == 3 and _p2(widths[2]) <= max_width:
        return [(0, 1), (1, 3)]
    return [(i, i + 1) for i in range(s)]


def conv_allows_tf32() -> bool:
    """Whether torch lets its float32 convolutions use TF32 (what csrc/cuda's conv_allows_tf32
    asks ATen). torch.backends.cudnn.allow_tf32 raises once torch >= 2.9's per-op flags disagree
    (e.g. after torch.backends.cudnn.conv.fp32_precision = "ieee"); then conv's own setting
    decides, else the nearest parent's that is set (cudnn's, then the generic one), else IEEE."""
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        pass
    cudnn = torch.backends.cudnn
    for module in (getattr(cudnn, "conv", None), cudnn, torch.backends):
        prec = getattr(module, "fp32_precision", None)
        if prec not in (None, "none"):
            return prec == "tf32"
    return False


def _dot_precision(dtype: torch.dtype) -> str:
    """TF32 only for fp32 and only where torch's convolutions may use it (conv_allows_tf32)."""
    if dtype == torch.float32 and conv_allows_tf32():
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    return triton_interpreting() and dtype == torch.bfloat16


def _flat(cin: int) -> bool:
    """Gather K as one flat (r, s, ci) index when a channel chunk would be mostly padding."""
    return cin < _P2_MIN


def _check_sizes(p: int, op: str) -> None:
    if p >= 2**31:
        raise RuntimeError(f"{op} (triton): {p} output pixels; the kernels index pixels with int32 (< 2**31)")


def _stage_dims(weights):
    c = [int(w.shape[0]) for w in weights]
    while len(c) < 3:
        c.append(1)
    return c


def _weight_args(weights, biases):
    """Pointers and strides of up to three weights and biases (dummies for missing ones)."""
    ws = list(weights) + [weights[0]] * (3 - len(weights))
    bs = [b.contiguous() if b is not None else None for b in biases] + [None] * (3 - len(biases))
    has_b = [b is not None for b in bs]
    bs = [b if b is not None else weights[0] for b in bs]
    w0 = ws[0]
    s1 = (ws[1].stride(0), ws[1].stride(1)) if len(weights) > 1 else (0, 0)
    s2 = (ws[2].stride(0), ws[2].stride(1)) if len(weights) > 2 else (0, 0)
    return ws, bs, has_b, tuple(w0.stride()), s1, s2


def _chain_common(x, weights, stride, padding):
    n, cin, h, w = x.shape
    c1, kh, kw = weights[0].shape[0], weights[0].shape[2], weights[0].shape[3]
    ho, wo = mlpconv_output_size(h, w, kh, kw, stride, padding)
    return n, cin, h, w, c1, kh, kw, ho, wo


def _fwd_segment(x, weights, biases, stride, padding, gap, out, config=None):
    """One fused launch of _mlpconv_fwd_kernel for 1 to 3 stages into `out` ([N, C, Ho, Wo] with
    any strides, or [N, C] with gap)."""
    n, cin, h, w, c1, kh, kw, ho, wo = _chain_common(x, weights, stride, padding)
    nst = len(weights)
    c1, c2, c3 = _stage_dims(weights)
    cout = int(weights[-1].shape[0])
    howo = ho * wo
    p = n * howo
    _check_sizes(p, "mlpconv")
    c2p = _p2(c2) if nst >= 2 else _P2_MIN
    cls = _width_class(c2p) if nst >= 2 else "narrow"
    ws, bs, has_b, sw, s1, s2 = _weight_args(weights, biases)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if gap:
        part = torch.empty((n * triton.cdiv(howo, 16), cout), dtype=acc_dtype, device=x.device)
        dst, so = part, (0, cout, 0, 0)
    else:
        dst, so = out, tuple(out.stride())

    def grid(meta):
        bm = meta["BM"]
        return (n * triton.cdiv(howo, bm),) if gap else (triton.cdiv(p, bm),)

    args = (
        x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], dst,
        p, howo, wo, h, w, cin, cin * kh * kw, c1, c2, c3, kh, kw, stride[0], stride[1], padding[0], padding[1],
        *x.stride(), *sw, *s1, *s2, *so,
        _p2(p),
    )  # fmt: skip
    constexprs = dict(
        NSTAGES=nst, HAS_B0=has_b[0], HAS_B1=has_b[1], HAS_B2=has_b[2], FLAT=_flat(cin), GAP=gap, C2P=c2p,
        DOT_PREC=_dot_precision(x.dtype), UPCAST=_upcast(x.dtype),
        BN1=min(_p2(c1), 64), BN3=min(_p2(c3), 64),
    )  # fmt: skip
    _launch("fwd", cls, grid, args, constexprs, config)
    if gap:
        # Fixed-order sum of the per-tile column sums, then the mean: deterministic.
        out.copy_(part.view(n, -1, cout).sum(1) / howo)
    return out


def _boundary(x, weights, like):
    """The activation at a segment cut: [N, C, Ho, Wo] channels_last (the next segment gathers it
    as a 1x1 conv input, contiguous along C)."""
    n, _, ho, wo = like
    return torch.empty((n, int(weights[-1].shape[0]), ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)  # fmt: skip


def mlpconv_forward(x, weights, biases, stride, padding, gap=False, *, max_width=None, config=None):
    """relu(conv1x1(relu(conv1x1(relu(conv2d(x, w0, b0, stride, padding)), w1, b1)), w2, b2)).

    x: Tensor[N, Cin, H, W] (any strides); weights: 1 to 3 tensors, weights[0] [C1, Cin, kh, kw],
    the others [C(i+1), Ci, 1, 1]; biases: as many Tensor or None. Returns Tensor[N, Cout, Ho, Wo]
    in the layout of ops.empty_mlpconv_output, or Tensor[N, Cout] (the mean over Ho*Wo) with gap.

    max_width overrides the fused width limit (_max_width) and config the autotuner:
    {"fwd": {"BM": .., "BK": .., optionally "BN1", "BN3", "num_warps", "num_stages"}}; tests use
    both to reach the split and multi-chunk paths with small shapes.
    """
    # rank, dtypes, devices, counts, shapes: the checks and messages of every backend
    weights, biases, stride, padding, _ = check_mlpconv_args(x, weights, biases, list(stride), list(padding))
    out = empty_mlpconv_output(x, weights, stride, padding, gap)
    if out.numel() == 0:
        return out
    n, cin, h, w, c1, kh, kw, ho, wo = _chain_common(x, weights, stride, padding)
    if x.shape[0] * ho * wo == 0:
        return out.zero_()
    widths = [int(wt.shape[0]) for wt in weights]
    segs = plan_segments(widths, max_width or _max_width(x.dtype, "fwd"))
    cur, st, pd = x, stride, padding
    for a, b in segs:
        last = b == len(weights)
        dst = out if last else _boundary(x, weights[a:b], (n, 0, ho, wo))
        _fwd_segment(cur, weights[a:b], biases[a:b], st, pd, gap and last, dst, (config or {}).get("fwd"))
        cur, st, pd = dst, (1, 1), (0, 0)
    return out


# ------------------------------------------------------------------------------------------------
# Backward host side
# ------------------------------------------------------------------------------------------------


def _wgrad(a_src, a_geom, g, gw, gb, need_w, need_b, config):
    """gw (= gradient of a [Cout, Cin, kh, kw] weight) and gb from the stage input a_src (with its
    conv geometry a_geom = (stride, padding, kh, kw, Ho, Wo)) and the [P, Cout] gradient g."""
    (sh, sw), (ph, pw), kh, kw, ho, wo = a_geom
    n, cin, h, w = a_src.shape
    cout = g.shape[1]
    p = g.shape[0]
    k0 = cin * kh * kw
    flat = _flat(cin)
    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    if k0 == 0:  # Cin == 0: the weight gradient is an empty tensor
        need_w = False
        if not need_b:
            return
    # Split the reduction over P so that ~4 programs per SM run; each split >= 4 tiles of 64 pixels.
    out_tiles_est = triton.cdiv(cout, 64) * max(1, triton.cdiv(k0, 64) if need_w else 1)
    split = max(1, min(triton.cdiv(528, out_tiles_est), triton.cdiv(p, 256)))
    if config is not None and "SPLIT" in config:
        config = dict(config)
        split = int(config.pop("SPLIT"))
    p_per_split = triton.cdiv(p, split)
    ws = torch.empty((split, cout, k0) if need_w else (1,), dtype=acc_dtype, device=g.device)
    wsb = torch.empty((split, cout) if need_b else (1,), dtype=acc_dtype, device=g.device)

    def grid(meta):
        num_kb = (triton.cdiv(k0, meta["BK"]) if flat else kh * kw * triton.cdiv(cin, meta["BK"])) if need_w else 1
        return (triton.cdiv(cout, meta["BN"]) * num_kb, split)

    args = (a_src, g, ws, wsb, p, ho * wo, wo, h, w, cin, k0, cout, kh, kw, sh, sw, ph, pw, *a_src.stride(),
            p_per_split, _p2(p))  # fmt: skip
    constexprs = dict(FLAT=flat, DO_W=need_w, DO_B=need_b, DOT_PREC=_dot_precision(g.dtype), UPCAST=_upcast(g.dtype))
    _launch("wgrad", "", grid, args, constexprs, config)
    if need_w:
        red = ws.sum(0).view(cout, kh, kw, cin).permute(0, 3, 1, 2)
        gw.copy_(red)
    if need_b:
        gb.copy_(wsb.sum(0))


def _dgrad(g1, w0, gx, geom, config):
    """gx (the [N, Cin, H, W] output, any strides) = transposed conv of g1 [P, C1] with w0."""
    (sh, sw), (ph, pw), ho, wo = geom
    n, cin, h, w = gx.shape
    c1, _, kh, kw = w0.shape
    hr, wr = triton.cdiv(h, sh), triton.cdiv(w, sw)

    def grid(meta):
        return (sh * sw * triton.cdiv(n * hr * wr, meta["BM"]) * triton.cdiv(cin, meta["BN"]),)

    args = (g1, w0, gx, n, h, w, ho, wo, cin, c1, kh, kw, sh, sw, ph, pw, *w0.stride(), *gx.stride(), hr, wr,
            _p2(n * h * w))  # fmt: skip
    constexprs = dict(DOT_PREC=_dot_precision(gx.dtype), UPCAST=_upcast(gx.dtype))
    _launch("dgrad", "", grid, args, constexprs, config)


def _bwd_segment(gout, x, weights, biases, out, stride, padding, gap, need_x, need_w, need_b, gx, gws, gbs,
                 config=None):  # fmt: skip
    """Gradients of one fused segment: writes gws[i] / gbs[i] (when wanted) and gx (when need_x)."""
    n, cin, h, w, c1, kh, kw, ho, wo = _chain_common(x, weights, stride, padding)
    nst = len(weights)
    c1, c2, c3 = _stage_dims(weights)
    howo = ho * wo
    p = n * howo
    _check_sizes(p, "mlpconv_backward")
    c2p = _p2(c2) if nst >= 2 else _P2_MIN
    cls = _width_class(c2p) if nst >= 2 else "narrow"
    ws, bs, has_b, sw, s1, s2 = _weight_args(weights, biases)
    wants = [need_w or (need_b and has_b[i]) for i in range(nst)]  # a gradient of stage i's params is wanted
    store_wb = any(wants[1:])
    dt, dev = x.dtype, x.device
    g1 = torch.empty((p, c1), dtype=dt, device=dev)
    h1 = torch.empty((p, c1), dtype=dt, device=dev) if nst >= 2 else g1
    g2 = torch.empty((p, c2), dtype=dt, device=dev) if nst >= 2 and store_wb else g1
    h2 = torch.empty((p, c2), dtype=dt, device=dev) if nst == 3 and store_wb else g1
    g3 = torch.empty((p, c3), dtype=dt, device=dev) if nst == 3 and store_wb else g1
    if gap:
        sg = (gout.stride(0), gout.stride(1), 0, 0)
        mask_t, sm = gout, (0, 0, 0, 0)
    else:
        sg = tuple(gout.stride())
        mask_t, sm = out, tuple(out.stride())

    def grid(meta):
        bm = meta["BM"]
        return (n * triton.cdiv(howo, bm),) if gap else (triton.cdiv(p, bm),)

    args = (
        x, ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], gout, mask_t, g1, h1, g2, h2, g3,
        p, howo, wo, h, w, cin, cin * kh * kw, c1, c2, c3, kh, kw, stride[0], stride[1], padding[0], padding[1],
        *x.stride(), *sw, *s1, *s2, *sg, *sm,
        _p2(p),
    )  # fmt: skip
    constexprs = dict(
        NSTAGES=nst, HAS_B0=has_b[0], HAS_B1=has_b[1], HAS_B2=has_b[2], FLAT=_flat(cin), GAP=gap,
        STORE_WB=store_wb, C2P=c2p, DOT_PREC=_dot_precision(dt), UPCAST=_upcast(dt),
        BN1=min(_p2(c1), 64 if c2p <= 128 else 32), BN3=min(_p2(c3), 64 if c2p <= 128 else 32),
    )  # fmt: skip
    config = config or {}
    _launch("bwd", cls, grid, args, constexprs, config.get("bwd"))

    # Weight and bias gradients, stage by stage: (stage input, its conv geometry, output gradient).
    inputs = [
        (x, (stride, padding, kh, kw, ho, wo), g1),
        (_as_nchw(h1, n, ho, wo), ((1, 1), (0, 0), 1, 1, ho, wo), g2),
        (_as_nchw(h2, n, ho, wo), ((1, 1), (0, 0), 1, 1, ho, wo), g3),
    ]
    wcfg = config.get("wgrad")
    for i in range(nst):
        if not wants[i]:
            continue
        a_src, geom, gi = inputs[i]
        nb = need_b and has_b[i]
        _wgrad(a_src, geom, gi, gws[i] if need_w else None, gbs[i] if nb else None, need_w, nb, wcfg)
    if need_x and gx.numel() > 0:
        _dgrad(g1, ws[0], gx, (stride, padding, ho, wo), config.get("dgrad"))


def _as_nchw(t, n, ho, wo):
    """A [P, C] temporary seen as the [N, C, Ho, Wo] channels_last tensor it is."""
    c = t.shape[1]
    return t.view(n, ho, wo, c).permute(0, 3, 1, 2)


def mlpconv_backward(grad_out, x, weights, biases, out, stride, padding, gap, output_mask, *, max_width=None,
                     config=None):  # fmt: skip
    """Gradients of mlpconv_forward: (grad_x, grad_weights, grad_biases), shaped as
    ops.empty_mlpconv_grads (empty [0] / [] where output_mask says not wanted).

    The intermediate activations are recomputed from x; `out` (the forward's result, or None)
    gives the last stage's ReLU mask; without it (and without gap) it is recomputed too.
    config: {"bwd": chain-kernel config, "fwd": ..., "wgrad": ..., "dgrad": ...} for tests.
    """
    # the checks and messages of the C++ backward (csrc/cpu/mlpconv.cpp)
    check_mlpconv_backward_args(grad_out, x, weights, biases, out, stride, padding, gap)
    weights, biases, stride, padding, _ = check_mlpconv_args(x, weights, biases, list(stride), list(padding))
    need_x, need_w, need_b = (bool(v) for v in output_mask)
    gx, gws, gbs = empty_mlpconv_grads(x, weights, biases, (need_x, need_w, need_b))
    if not (need_x or need_w or need_b):
        return gx, gws, gbs
    n, cin, h, w, c1, kh, kw, ho, wo = _chain_common(x, weights, stride, padding)
    if n * ho * wo == 0:
        # No pixels: every weight / bias gradient is a sum over nothing.
        for t in gws + gbs:
            t.zero_()
        gx.zero_()
        return gx, gws, gbs
    cfg = config or {}
    widths = [int(wt.shape[0]) for wt in weights]
    segs = plan_segments(widths, max_width or _max_width(x.dtype, "bwd"))
    # Recompute the activations at the segment cuts (and `out` if it was not kept).
    inputs = [x]
    for a, b in segs[:-1]:
        st, pd = (stride, padding) if a == 0 else ((1, 1), (0, 0))
        dst = _boundary(x, weights[a:b], (n, 0, ho, wo))
        _fwd_segment(inputs[-1], weights[a:b], biases[a:b], st, pd, False, dst, cfg.get("fwd"))
        inputs.append(dst)
    if not gap and out is None:
        a, b = segs[-1]
        st, pd = (stride, padding) if a == 0 else ((1, 1), (0, 0))
        out = _fwd_segment(inputs[-1], weights[a:b], biases[a:b], st, pd, False,
                           _boundary(x, weights, (n, 0, ho, wo)), cfg.get("fwd"))  # fmt: skip
    g = grad_out
    for j in reversed(range(len(segs))):
        a, b = segs[j]
        last = j == len(segs) - 1
        st, pd = (stride, padding) if j == 0 else ((1, 1), (0, 0))
        if j == 0:
            seg_need_x, seg_gx = need_x, gx
        else:
            seg_need_x = True
            seg_gx = torch.empty(inputs[j].shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        _bwd_segment(
            g, inputs[j], weights[a:b], biases[a:b], out if last else inputs[j + 1], st, pd, gap and last,
            seg_need_x, need_w, need_b, seg_gx, gws[a:b] if need_w else [], gbs[a:b] if need_b else [], cfg,
        )  # fmt: skip
        g = seg_gx
    return gx, gws, gbs
