"""Triton mHC (dsv4/ops/hyper_connection.py): hc_pre, hc_post, hc_head.

hc_pre / hc_head run as two kernels:
  1. `_hc_mix_kernel`: the mixing GEMM mu_raw = flat(X) . fn^T ([T, nD] x [nD, (2+n)n], fp32 result) and
     the row sums of squares, split over K when there are too few token blocks to fill the GPU;
  2. `_hc_finish_kernel`: per token, sums the K-split partials, applies rsqrt(mean + eps), the sigmoids,
     the row softmax + eps and the Sinkhorn normalisation (n x n in registers), stores post / comb, and
     computes its D-chunk of u = sum_j pre_j X_j. With `norm=` (D <= MAX_NORM_D) one program holds a token's
     whole row and applies the RMSNorm that follows in the model to u rounded to X's dtype; with `quant=` it
     also writes that output's act_quant (common.act_quant_store) for the FP8 linears that read it.
X is therefore read twice (mix, then u). A single read would need a token's whole 4 x 4096 stream
resident across the GEMM while fn (1.5 MB fp32) is streamed per token block; with the >= 16-token
blocks that keep fn's L2 traffic below X's own traffic, that is 0.5-2 MB of live state per program, so
the second read is the practical floor here (bytes = 2 X + u + fn; see
benchmarks/kernel_cases/hyper_connection.py).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (act_quant_store, interpreting, load_parts, pdl_args, pdl_start, register,
                                        sm_count, tile_counters)
from dsv4.kernels.triton.norm import bf16_rne_bits, cast_out, rms_norm_triton
from dsv4.kernels.triton.quant import act_quant_out, fp8_act_quant_triton
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.hyper_connection import hc_head as hc_head_op
from dsv4.ops.hyper_connection import hc_post as hc_post_op
from dsv4.ops.hyper_connection import hc_pre as hc_pre_op

# ----------------------------------------------------------------------------- mixing GEMM
# grid = (cdiv(T, BLOCK_T), SPLIT). A program owns BLOCK_T tokens and one K range of the flattened stream
# (nD = 16384 at full size); it streams [BLOCK_T, BK] tiles of X (storage dtype) and [NC, BK] tiles of fn
# (fp32; NC = next_pow2((2+n)n) >= 16 output rows, padding masked to 0) and accumulates the dot in fp32,
# plus the sum of squares. bf16 X on a GPU: fn is split in-register into three bf16 parts
# (hi + mid + lo == fn to fp32 precision) and three bf16 tensor-core dots accumulate in fp32, so the
# result has fp32 accuracy (bf16 x bf16 products are exact in fp32) at tensor-core speed; the FMA-pipe fp32
# dot would make this GEMM (786 kFLOP per token) compute bound. fp32 X (tests, fp32 models, the
# interpreter): one IEEE fp32 dot. fn is re-read once per token block, from L2 (1.5 MB per block of 64
# tokens vs 2 MB of X; BLOCK_T = 16 / 32 / 64 for T <= 64 / <= 512 / more), X once from HBM. SPLIT is
# chosen so that blocks x splits ~ 2 x SMs (K ranges >= 512 columns). Partials go to a small fp32 workspace
# [SPLIT, T, NC] + [SPLIT, T] (<= 3 MB at T = 8192), reduced in the finish kernel.


@triton.jit
def _hc_mix_kernel(x_ptr, fn_ptr, part_ptr, sq_ptr, T, K, NOUT, k_split, sx_t, sfn,
                   BLOCK_T: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr, SPLIT_BF16: tl.constexpr,
                   PDL: tl.constexpr = False):
    pdl_start(PDL)
    _mix_part(x_ptr, fn_ptr, part_ptr, sq_ptr, tl.program_id(0), tl.program_id(1), T, K, NOUT, k_split, sx_t, sfn,
              BLOCK_T, BK, NC, SPLIT_BF16)


@triton.jit
def _mix_part(x_ptr, fn_ptr, part_ptr, sq_ptr, pid_t, pid_k, T, K, NOUT, k_split, sx_t, sfn,
              BLOCK_T: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr, SPLIT_BF16: tl.constexpr,
              f_ptr=None, xo_ptr=None, pp_ptr=None, pc_ptr=None, D=0, sx_j=0, sf_t=0, N: tl.constexpr = 1,
              POST: tl.constexpr = False, RNE_BITS: tl.constexpr = False):
    """Program (pid_t, pid_k) of the mixing GEMM: its token block's partial dot and sum of squares over its K
    range, stored in the workspace. POST: x_ptr holds the streams before the previous sublayer's hc_post
    (f_ptr its output, pp_ptr / pc_ptr its post / comb); the program forms its K range of the new streams as
    the hc_post kernel does (same products, same order, rounded to the streams' dtype), stores them to xo_ptr
    (contiguous [T, N, D]) and mixes them (D % BK == 0: each BK step lies inside one stream)."""
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    t64 = ts.to(tl.int64)
    cs = tl.arange(0, NC)
    cmask = cs < NOUT
    kk = tl.arange(0, BK)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    acc = tl.zeros([BLOCK_T, NC], dtype=tl.float32)
    sq = tl.zeros([BLOCK_T, BK], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + kk
        kmask = ks < k_hi
        m2 = tmask[:, None] & kmask[None, :]
        if POST:
            js = k0 // D  # the output stream of these BK columns (D % BK == 0: one stream per step)
            d = ks - js * D
            xacc = tl.zeros([BLOCK_T, BK], dtype=tl.float32)
            for i in tl.static_range(N):  # X'_js = sum_i comb[i, js] X_i + post_js f (the hc_post kernel's order)
                ci = tl.load(pc_ptr + t64 * (N * N) + i * N + js, mask=tmask, other=0.0)
                xi = tl.load(x_ptr + t64[:, None] * sx_t + i * sx_j + d[None, :], mask=m2, other=0.0)
                xacc += ci[:, None] * xi.to(tl.float32)
            pj = tl.load(pp_ptr + t64 * N + js, mask=tmask, other=0.0)
            fv = tl.load(f_ptr + t64[:, None] * sf_t + d[None, :], mask=m2, other=0.0).to(tl.float32)
            x = cast_out(pj[:, None] * fv + xacc, xo_ptr, RNE_BITS)
            tl.store(xo_ptr + t64[:, None] * (N * D) + ks[None, :], x, mask=m2)
        else:
            x = tl.load(x_ptr + t64[:, None] * sx_t + ks[None, :], mask=m2, other=0.0)
        xf = x.to(tl.float32)
        sq += xf * xf
        w = tl.load(fn_ptr + cs[:, None].to(tl.int64) * sfn + ks[None, :], mask=cmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        if SPLIT_BF16:
            w_hi = w.to(tl.bfloat16)
            r1 = w - w_hi.to(tl.float32)
            w_mid = r1.to(tl.bfloat16)
            w_lo = (r1 - w_mid.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(x, tl.trans(w_lo), acc)
            acc = tl.dot(x, tl.trans(w_mid), acc)
            acc = tl.dot(x, tl.trans(w_hi), acc)
        else:
            acc = tl.dot(xf, tl.trans(w), acc, input_precision="ieee")
    row = pid_k.to(tl.int64) * T + t64
    tl.store(part_ptr + row[:, None] * NC + cs[None, :], acc, mask=tmask[:, None])
    tl.store(sq_ptr + row, tl.sum(sq, axis=1), mask=tmask)


# ----------------------------------------------------------------------------- finish + u
# grid = (T, cdiv(D, BD)). A program sums its token's SPLIT partials (one [SPLIT_P, ...] load, L2), runs the
# small math (n sigmoids, n x n softmax + Sinkhorn; recomputed by each of the D/BD programs of a token,
# ~40 tiny reductions, hidden under the loads), stores post / comb (the d-chunk-0 program only) and
# writes u for BD channels from n [BD] loads of X: X and u are touched once here, at the copy roofline.


@triton.jit
def _hc_finish_kernel(x_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, u_ptr, post_ptr, comb_ptr,
                      T, D, K, SPLIT, rms_eps, hc_eps, iters, sx_t, sx_j, su_t, nw_ptr, norm_eps, q_ptr, qs_ptr,
                      N: tl.constexpr, NP: tl.constexpr, NC: tl.constexpr, SPLIT_P: tl.constexpr, HEAD: tl.constexpr,
                      BD: tl.constexpr, RNE_BITS: tl.constexpr, NORM: tl.constexpr = False,
                      QUANT: tl.constexpr = False, FNUZ: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_start(PDL)
    _finish_chunk(tl.program_id(0), tl.program_id(1), x_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, u_ptr, post_ptr,
                  comb_ptr, T, D, K, SPLIT, rms_eps, hc_eps, iters, sx_t, sx_j, su_t, nw_ptr, norm_eps, q_ptr, qs_ptr,
                  N, NP, NC, SPLIT_P, HEAD, BD, RNE_BITS, NORM, QUANT, FNUZ, False)


# Mix + finish in one launch (small T: one token block, LAST_FINISH_T): the mixing GEMM's programs as above,
# then the last of them to count itself done (tile_counters, acq_rel) runs the finish of every token of the
# block, chunk after chunk, reading the partials with .cg loads; the same arithmetic in the same order as the
# two kernels (bit-equal), one launch and one launch gap fewer.
@triton.jit
def _hc_mix_finish_kernel(x_ptr, fn_ptr, part_ptr, sq_ptr, cnt_ptr, T, K, NOUT, k_split, sfn,
                          scale_ptr, base_ptr, u_ptr, post_ptr, comb_ptr,
                          D, SPLIT, rms_eps, hc_eps, iters, sx_t, sx_j, su_t, nw_ptr, norm_eps, q_ptr, qs_ptr,
                          f_ptr, xo_ptr, pp_ptr, pc_ptr, sf_t,
                          BLOCK_T: tl.constexpr, BK: tl.constexpr, SPLIT_BF16: tl.constexpr,
                          N: tl.constexpr, NP: tl.constexpr, NC: tl.constexpr, SPLIT_P: tl.constexpr,
                          HEAD: tl.constexpr, BD: tl.constexpr, RNE_BITS: tl.constexpr, NORM: tl.constexpr = False,
                          QUANT: tl.constexpr = False, FNUZ: tl.constexpr = False, POST: tl.constexpr = False,
                          PDL: tl.constexpr = False):
    pdl_start(PDL)
    pid_t = tl.program_id(0)
    _mix_part(x_ptr, fn_ptr, part_ptr, sq_ptr, pid_t, tl.program_id(1), T, K, NOUT, k_split, sx_t, sfn,
              BLOCK_T, BK, NC, SPLIT_BF16, f_ptr, xo_ptr, pp_ptr, pc_ptr, D, sx_j, sf_t, N, POST, RNE_BITS)
    tl.debug_barrier()  # every thread's partial (and new streams) stored before the program counts itself done
    done = tl.atomic_add(cnt_ptr + pid_t, 1, sem="acq_rel")
    if done == SPLIT - 1:
        for t in range(pid_t * BLOCK_T, tl.minimum(pid_t * BLOCK_T + BLOCK_T, T)):
            for pd in range(0, tl.cdiv(D, BD)):
                if POST:  # the finish reads the new streams (contiguous, written by this launch's programs)
                    _finish_chunk(t, pd, xo_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, u_ptr, post_ptr, comb_ptr,
                                  T, D, K, SPLIT, rms_eps, hc_eps, iters, N * D, D, su_t, nw_ptr, norm_eps, q_ptr,
                                  qs_ptr, N, NP, NC, SPLIT_P, HEAD, BD, RNE_BITS, NORM, QUANT, FNUZ, True)
                else:
                    _finish_chunk(t, pd, x_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, u_ptr, post_ptr, comb_ptr,
                                  T, D, K, SPLIT, rms_eps, hc_eps, iters, sx_t, sx_j, su_t, nw_ptr, norm_eps, q_ptr,
                                  qs_ptr, N, NP, NC, SPLIT_P, HEAD, BD, RNE_BITS, NORM, QUANT, FNUZ, True)
        tl.atomic_xchg(cnt_ptr + pid_t, 0)


@triton.jit
def _finish_chunk(t, pd, x_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, u_ptr, post_ptr, comb_ptr,
                  T, D, K, SPLIT, rms_eps, hc_eps, iters, sx_t, sx_j, su_t, nw_ptr, norm_eps, q_ptr, qs_ptr,
                  N: tl.constexpr, NP: tl.constexpr, NC: tl.constexpr, SPLIT_P: tl.constexpr, HEAD: tl.constexpr,
                  BD: tl.constexpr, RNE_BITS: tl.constexpr, NORM: tl.constexpr, QUANT: tl.constexpr,
                  FNUZ: tl.constexpr, CG: tl.constexpr):
    """Token t's finish for channel chunk pd (see above)."""
    t64 = tl.cast(t, tl.int64)  # (a loop index: a Python int under the interpreter)
    jj = tl.arange(0, NP)
    jm = jj < N
    cm = jm[:, None] & jm[None, :]
    cidx = jj[:, None] * N + jj[None, :]
    # the K-split partials of this token, all loaded at once ([SPLIT_P, ...] tiles, one L2 round trip)
    ss = tl.arange(0, SPLIT_P)
    sm = ss < SPLIT
    prow = part_ptr + (ss.to(tl.int64) * T + t64) * NC
    pre_acc = tl.sum(load_parts(prow[:, None] + jj[None, :], sm[:, None] & jm[None, :], CG), axis=0)
    sq = tl.sum(load_parts(sq_ptr + ss.to(tl.int64) * T + t64, sm, CG), axis=0)
    rho = tl.rsqrt(sq / K + rms_eps)
    pre = tl.sigmoid(pre_acc * rho * tl.load(scale_ptr) + tl.load(base_ptr + jj, mask=jm, other=0.0)) + hc_eps
    pre = tl.where(jm, pre, 0.0)

    if not HEAD:
        first = pd == 0
        post_acc = tl.sum(load_parts(prow[:, None] + N + jj[None, :], sm[:, None] & jm[None, :], CG), axis=0)
        comb_acc = tl.sum(load_parts(prow[:, None, None] + 2 * N + cidx[None, :, :],
                                    sm[:, None, None] & cm[None, :, :], CG), axis=0)
        post = 2.0 * tl.sigmoid(post_acc * rho * tl.load(scale_ptr + 1)
                                + tl.load(base_ptr + N + jj, mask=jm, other=0.0))
        tl.store(post_ptr + t64 * N + jj, post, mask=jm & first)
        logits = comb_acc * rho * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * N + cidx, mask=cm, other=0.0)
        logits = tl.where(cm, logits, -1.0e30)
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        e = tl.where(cm, e, 0.0)
        rs = tl.sum(e, axis=1)
        c = tl.where(cm, e / tl.where(rs > 0, rs, 1.0)[:, None] + hc_eps, 0.0)
        c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
        for _ in range(iters - 1):
            c = c / (tl.sum(c, axis=1)[:, None] + hc_eps)
            c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
        tl.store(comb_ptr + t64 * (N * N) + cidx, c, mask=cm & first)

    d = pd * BD + tl.arange(0, BD)
    dm = d < D
    xrow = x_ptr + t64 * sx_t
    u = tl.zeros([BD], dtype=tl.float32)
    for j in tl.static_range(N):
        pj = tl.sum(tl.where(jj == j, pre, 0.0), axis=0)
        u += pj * load_parts(xrow + j * sx_j + d, dm, CG).to(tl.float32)
    if NORM:  # the RMSNorm after hc_pre / hc_head (BD covers D: one program per token): of u rounded to X's dtype
        ur = cast_out(u, u_ptr, RNE_BITS).to(tl.float32)
        ur = tl.where(dm, ur, 0.0)
        y = ur * tl.rsqrt(tl.sum(ur * ur, axis=0) / D + norm_eps)
        y = y * tl.load(nw_ptr + d, mask=dm, other=0.0).to(tl.float32)
        yo = cast_out(y, u_ptr, RNE_BITS)
        tl.store(u_ptr + t64 * su_t + d, yo, mask=dm)
        if QUANT:  # the output's act_quant (the standalone quantiser's arithmetic: the same bytes)
            act_quant_store(tl.where(dm, yo.to(tl.float32), 0.0)[None, :], tl.zeros([1], tl.int64) + t64,
                            tl.full([1], 1, tl.int1), d, q_ptr, qs_ptr, D, tl.cdiv(D, 128), D, 1, BD, FNUZ)
    else:
        tl.store(u_ptr + t64 * su_t + d, cast_out(u, u_ptr, RNE_BITS), mask=dm)


# ----------------------------------------------------------------------------- hc_post
# grid = (T, cdiv(D, BD)): a program reads post[t] (n), comb[t] (n x n), f[t, chunk] and the n stream
# chunks X[t, j, chunk], forms the [n, BD] output tile X'_k = sum_j comb[j, k] X_j + post_k f in fp32 and
# stores it: every byte of f and X read once, X' written once (bytes = (2n + 1) D elt per token).


@triton.jit
def _hc_post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, out_ptr, D, sf_t, sx_t, sx_j, so_t, so_j, sp_t, sc_t, sc_j,
                    N: tl.constexpr, NP: tl.constexpr, BD: tl.constexpr, RNE_BITS: tl.constexpr,
                    PDL: tl.constexpr = False):
    pdl_start(PDL)
    t64 = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = d < D
    kk = tl.arange(0, NP)
    km = kk < N
    acc = tl.zeros([NP, BD], dtype=tl.float32)
    xrow = x_ptr + t64 * sx_t
    for j in tl.static_range(N):
        cj = tl.load(comb_ptr + t64 * sc_t + j * sc_j + kk, mask=km, other=0.0)  # comb[t, j, :]
        xj = tl.load(xrow + j * sx_j + d, mask=dm, other=0.0).to(tl.float32)
        acc += cj[:, None] * xj[None, :]
    pk = tl.load(post_ptr + t64 * sp_t + kk, mask=km, other=0.0)
    f = tl.load(f_ptr + t64 * sf_t + d, mask=dm, other=0.0).to(tl.float32)
    out = pk[:, None] * f[None, :] + acc
    tl.store(out_ptr + t64 * so_t + kk[:, None] * so_j + d[None, :], cast_out(out, out_ptr, RNE_BITS),
             mask=km[:, None] & dm[None, :])


# ----------------------------------------------------------------------------- wrappers


def _target_programs(device: torch.device) -> int:
    n = sm_count(device)
    return 2 * n if n else 4  # interpreter: exercise the K split in tests without many programs


def _lastdim_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


BK = 64
MIN_K_SPLIT = 512  # K columns per split at least (8 BK steps)
BD_FINISH = 1024
FINISH_WARPS = 4
BD_POST = 1024
MAX_NORM_D = 0  # widest D whose norm is fused into the finish kernel (one program per token holds the row); 0:
# off, the measured default (docs/perf.md 2026-12-07 (c): the fused finish was slower at batch 1; 8192 turns it on)
QUANT_OUT = True  # the act_quant of the normed output (quant=) in the finish kernel; False: the standalone quantiser
LAST_FINISH_T = 0  # up to this many tokens, the last mixing program runs the finish (one launch); 0: two kernels,
# the measured default (docs/perf.md 2026-12-07 (c): the one launch was ~0.15 ms slower per 4-layer step)
POST_IN_MIX = True  # hc_pre(prev=): in that one launch, the mixing programs apply the previous hc_post first


def _mix_and_finish(X, fn, scale, base, rms_eps, hc_eps, iters, head: bool, norm=None, quant=None, prev=None):
    """hc_pre / hc_head; `prev` = (f, post, comb): X is the streams before that hc_post, applied here first (in the
    same launch when one launch does it all) and the new streams returned first."""
    T, n, D = X.shape
    K = n * D
    nout = fn.shape[0]
    if fn.shape[1] != K:
        raise ValueError(f"hc: fn has {fn.shape[1]} columns, expected n * D = {K}")
    dev = X.device
    fn = _lastdim_contig(fn)
    scale = scale.to(torch.float32).contiguous()
    base = base.to(torch.float32).contiguous()
    u = torch.empty((T, D), dtype=X.dtype, device=dev)
    post = u if head else torch.empty((T, n), dtype=torch.float32, device=dev)  # head: never written
    comb = u if head else torch.empty((T, n, n), dtype=torch.float32, device=dev)
    nc = max(16, triton.next_power_of_2(nout))
    block_t = 16 if T <= 64 else (32 if T <= 512 else 64)
    n_tb = triton.cdiv(T, block_t)
    split = max(1, min(triton.cdiv(_target_programs(dev), n_tb), triton.cdiv(K, MIN_K_SPLIT)))
    k_split = triton.cdiv(triton.cdiv(K, split), BK) * BK
    split = triton.cdiv(K, k_split)
    cnt = tile_counters(dev) if 0 < T <= LAST_FINISH_T and n_tb == 1 else None
    post_in = prev is not None and cnt is not None and POST_IN_MIX and D % BK == 0 and X.stride(2) == 1
    if prev is not None and not post_in:
        X = hc_post_triton(prev[0], X, prev[1], prev[2])
    if not post_in and not (X.stride(2) == 1 and X.stride(1) == D):
        X = X.contiguous()  # flat(X[t]) must be one contiguous row of n * D
    if T == 0:
        out = (u, post, comb) if quant is None else (u, post, comb, fp8_act_quant_triton(u, 128, quant))
        return out if prev is None else (X, *out)
    part = torch.empty((split, T, nc), dtype=torch.float32, device=dev)
    sq = torch.empty((split, T), dtype=torch.float32, device=dev)
    split_bf16 = X.dtype == torch.bfloat16 and not interpreting()
    fuse_norm = norm is not None and triton.next_power_of_2(D) <= MAX_NORM_D
    bd = triton.next_power_of_2(D) if fuse_norm else min(BD_FINISH, triton.next_power_of_2(D))
    nw = _norm_weight(norm[0], D) if fuse_norm else scale
    fuse_q = QUANT_OUT and quant is not None and fuse_norm and bd >= 128
    qd = Fp8Dialect.parse(quant) if quant is not None else Fp8Dialect.OCP
    q, qs = act_quant_out(T, D, dev) if fuse_q else (u, u)
    fin_warps = max(FINISH_WARPS, bd // 1024) if fuse_norm else FINISH_WARPS
    finish = dict(N=n, NP=triton.next_power_of_2(n), NC=nc, SPLIT_P=triton.next_power_of_2(split), HEAD=head, BD=bd,
                  RNE_BITS=bf16_rne_bits(X.dtype), NORM=fuse_norm, QUANT=fuse_q, FNUZ=qd is Fp8Dialect.FNUZ,
                  **pdl_args(dev))
    tail = (float(rms_eps), float(hc_eps), int(iters), X.stride(0), X.stride(1), u.stride(0), nw,
            float(norm[1]) if fuse_norm else 0.0, q, qs)
    if cnt is not None:  # one launch: the last mixing program finishes (post_in: the programs apply hc_post first)
        if post_in:
            f = _lastdim_contig(prev[0])
            xo = torch.empty((T, n, D), dtype=X.dtype, device=dev)
            pp, pc = (_lastdim_contig(t.to(torch.float32)) for t in prev[1:])
            post_args = (f, xo, pp, pc, f.stride(0))
        else:
            xo = X
            post_args = (X, X, scale, scale, 0)
        _hc_mix_finish_kernel[(n_tb, split)](X, fn, part, sq, cnt, T, K, nout, k_split, fn.stride(0), scale, base, u,
                                             post, comb, D, split, *tail, *post_args, BLOCK_T=block_t, BK=BK,
                                             SPLIT_BF16=split_bf16, POST=post_in, **finish,
                                             num_warps=max(4, fin_warps))
        X = xo
    else:
        _hc_mix_kernel[(n_tb, split)](X, fn, part, sq, T, K, nout, k_split, X.stride(0), fn.stride(0),
                                      BLOCK_T=block_t, BK=BK, NC=nc, SPLIT_BF16=split_bf16, **pdl_args(dev),
                                      num_warps=4)
        _hc_finish_kernel[(T, triton.cdiv(D, bd))](X, part, sq, scale, base, u, post, comb, T, D, K, split, *tail,
                                                   **finish, num_warps=fin_warps)
    q_ready = fuse_q
    if norm is not None and not fuse_norm:  # the norm after, with its output's act_quant in the same kernel
        if quant is None:
            u = rms_norm_triton(u, norm[0], norm[1])
        else:
            u, (q, qs) = rms_norm_triton(u, norm[0], norm[1], quant=qd)
            q_ready = True
    if quant is None:
        out = (u, post, comb)
    else:
        if not q_ready:
            q, qs = fp8_act_quant_triton(u, 128, qd)
        out = (u, post, comb, (q, qs))
    return out if prev is None else (X, *out)


def _norm_weight(w, D: int) -> torch.Tensor:
    if w is None or w.shape != (D,):
        raise ValueError(f"hc norm: weight of shape {None if w is None else tuple(w.shape)}, expected ({D},)")
    return _lastdim_contig(w)


def hc_pre_triton(X, fn, scale, base, rms_eps: float, hc_eps: float, iters: int, norm=None, quant=None, prev=None):
    n = X.shape[1]
    if fn.shape[0] != (2 + n) * n:
        raise ValueError(f"hc_pre: fn has {fn.shape[0]} rows, expected (2 + n) n = {(2 + n) * n}")
    if quant is not None and norm is None:
        raise ValueError("hc_pre: quant= needs norm= (the act_quant is of the normed output)")
    return _mix_and_finish(X, fn, scale, base, rms_eps, hc_eps, iters, head=False, norm=norm, quant=quant, prev=prev)


def hc_head_triton(X, fn, scale, base, rms_eps: float, hc_eps: float, norm=None):
    n = X.shape[1]
    if fn.shape[0] != n:
        raise ValueError(f"hc_head: fn has {fn.shape[0]} rows, expected n = {n}")
    return _mix_and_finish(X, fn, scale, base, rms_eps, hc_eps, 1, head=True, norm=norm)[0]


def hc_post_triton(f, X, post, comb):
    T, n, D = X.shape
    out = torch.empty((T, n, D), dtype=X.dtype, device=X.device)
    if T == 0:
        return out
    f = _lastdim_contig(f)
    X = _lastdim_contig(X)
    post = _lastdim_contig(post.to(torch.float32))
    comb = _lastdim_contig(comb.to(torch.float32))
    bd = min(BD_POST, triton.next_power_of_2(D))
    _hc_post_kernel[(T, triton.cdiv(D, bd))](
        f, X, post, comb, out, D, f.stride(0), X.stride(0), X.stride(1), out.stride(0), out.stride(1),
        post.stride(0), comb.stride(0), comb.stride(1), N=n, NP=triton.next_power_of_2(n), BD=bd,
        RNE_BITS=bf16_rne_bits(X.dtype), **pdl_args(X.device), num_warps=4)
    return out


register(hc_pre_op, hc_pre_triton)
register(hc_post_op, hc_post_triton)
register(hc_head_op, hc_head_triton)
