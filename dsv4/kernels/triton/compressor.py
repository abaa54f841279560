"""Triton provider of `compress_kv` (dsv4/ops/compressor.py; spec §2.5, §2.6).

Same signature and in-place effects as the reference: online-softmax pooling of every `ratio` tokens
(HCA: one series; CSA overlap: A/B series with `prev`), the per-slot state carried across steps, emission
of completed windows only, then RMSNorm(norm_weight) in fp32, cast to act_dtype, RoPE at position
w * ratio on the trailing 2 * len(inv_freq) dims (interleaved pairs), the optional `post` simulation
("fp8" / "hadamard_fp4") and the write into the KV store `pool` (float rows or Fp8KV).

Two kernels, grids sized from T and B only (the number of touched windows is bounded by
min(T, (T - B) // ratio + 2B)); each program finds its (sequence, window) from the device metadata with
an in-register prefix sum over the sequences, so nothing is read back to the host and a decode step
has a fixed launch shape.

`_pool_kernel`, grid (touched windows, channel blocks of BLOCK_C): a program reduces the tokens of its
window that arrived in this step for BLOCK_C output channels (CSA: the B-half of the window, the A-half
of the previous window - from `prev` when that window precedes the step, else recomputed from this
step's tokens - and the A-half of its own window when it becomes the new state or the new `prev`); the
carried state enters the first window. A completed window's pooled entry goes to an fp32 scratch row;
the new open-window state / prev go to small per-sequence scratch rows, or, in decode steps (one token
per sequence, so one program per slot and channel block owns that slot's state), in place. Every input
row is read once (CSA: the A-half twice, the second time from L2), so the kernel streams T * c * d * 8
bytes: the memory floor of pooling.

`_finish_kernel`, grid (touched windows,): a program per completed window does RMSNorm + RoPE + post +
the store for all d dims of its entry (d <= 512 fp32 in registers), with the act_dtype roundings of the
reference done by bit arithmetic (exact in the interpreter too); the program of each sequence's last
window also installs the new state / prev (non-decode steps). O(entries * d) work, negligible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (fp8_block_exponent, fp8_decode, fp8_encode, fp8_pow2, fp8_quant_max,
                                        interpreting, register)
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.compressor import POSTPROCESS, compress_kv
from dsv4.ops.kv_format import FP8_BLOCK, Fp8KV
from dsv4.ops.meta import ForwardMeta

#: Test hooks (None: automatic).
FORCE_BLOCK_C: int | None = None
FORCE_BLOCK_TOK: int | None = None

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# tl.reduce / tl.associative_scan with the standard combine functions: what tl.sum / tl.max / tl.cumsum
# compile to, minus a nested jit call per use (which costs about a millisecond in the interpreter)
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
_POST = {"none": 0, "fp8": 1, "hadamard_fp4": 2}


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _round_to(x, KIND: tl.constexpr):
    """fp32 -> the nearest value of dtype KIND (0 fp32, 1 bf16 RNE by bit arithmetic, 2 fp16), kept in fp32."""
    if KIND == 1:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    elif KIND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _online_update(M, L, A, z, v):
    """One chunk [rows, C] of scores z / values v into a per-channel online softmax (max M, sum L, weighted
    sum A); -inf safe: a series may see no row in a chunk."""
    mn = tl.maximum(M, tl.reduce(z, 0, _MAX))
    ms = tl.where(mn == float("-inf"), 0.0, mn)
    al = tl.exp(M - ms)
    e = tl.exp(z - ms[None, :])
    return mn, L * al + tl.reduce(e, 0, _SUM), A * al + tl.reduce(e * v, 0, _SUM)


@triton.jit
def _locate(g, ss_ptr, sl_ptr, B, m, DECODE: tl.constexpr, BLOCK_B: tl.constexpr):
    """Touched window g -> (sequence b, window index j within the sequence's touched windows, total)."""
    if DECODE:
        b = g
        j = g * 0
        total = B
    else:
        offs = tl.arange(0, BLOCK_B)
        mb = offs < B
        p0 = tl.load(ss_ptr + offs, mask=mb, other=0)
        p1 = tl.load(sl_ptr + offs, mask=mb, other=1)
        nw = tl.where(mb, (p1 - 1) // m - p0 // m + 1, 0)
        cum = tl.associative_scan(nw, 0, _SUM)
        total = tl.reduce(nw, 0, _SUM)
        b = tl.reduce((cum <= g).to(tl.int32), 0, _SUM)
        j = g - tl.reduce(tl.where(offs == b, cum - nw, 0), 0, _SUM)
    return b, j, total



@triton.jit
def _fp8_quant(x, valid, BLOCK_D: tl.constexpr, FNUZ: tl.constexpr):
    """The KV FP8 recipe on 64-wide blocks of x [BLOCK_D] (dims outside `valid` ignored): per block
    amax = max(max|x|, 1e-4), s = 2^ceil(log2(amax / 448)) (FNUZ: 2s, clamp 224); returns (bytes,
    dequantised values, E8M0 exponent per block [BLOCK_D // 64])."""
    NB: tl.constexpr = BLOCK_D // 64
    a = tl.where(valid, tl.abs(x), 0.0)
    amax = tl.maximum(tl.max(tl.reshape(a, [NB, 64]), axis=1), 1e-4)
    e = fp8_block_exponent(amax, FNUZ)
    qmax = fp8_quant_max(FNUZ)
    eb = tl.reshape(tl.broadcast_to(e[:, None], [NB, 64]), [BLOCK_D])
    y = tl.minimum(tl.maximum(x * fp8_pow2(-eb), -qmax), qmax)
    code = fp8_encode(y, FNUZ)
    deq = fp8_decode(code, FNUZ) * fp8_pow2(eb)
    return code, deq, e


@triton.jit
def _fp4_roundtrip(x, BLOCK_D: tl.constexpr):
    """MXFP4 round trip of x [BLOCK_D] in 32-wide blocks (numerics.fp4_roundtrip): amax floor 6 * 2^-126,
    s = 2^ceil(log2(amax / 6)), e2m1 round to nearest (ties to even mantissa), times s."""
    NB: tl.constexpr = BLOCK_D // 32
    amax = tl.maximum(tl.max(tl.reshape(tl.abs(x), [NB, 32]), axis=1), 6.0 * 1.1754943508222875e-38)
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 129 + ((bits & 0x7FFFFF) > 0x400000).to(tl.int32)  # 6 = 1.5 * 2^2
    e = tl.minimum(tl.maximum(e, -126), 127)
    eb = tl.reshape(tl.broadcast_to(e[:, None], [NB, 32]), [BLOCK_D])
    y = tl.minimum(tl.maximum(x * fp8_pow2(-eb), -6.0), 6.0)
    a = tl.abs(y)
    q = (0.5 * (a > 0.25).to(tl.float32) + 0.5 * (a >= 0.75).to(tl.float32) + 0.5 * (a > 1.25).to(tl.float32)
         + 0.5 * (a >= 1.75).to(tl.float32) + (a > 2.5).to(tl.float32) + (a >= 3.5).to(tl.float32)
         + 2.0 * (a > 5.0).to(tl.float32))
    q = tl.where(y < 0, -q, q)
    return q * fp8_pow2(eb)


@triton.jit
def _hadamard(x, N: tl.constexpr, LOG_N: tl.constexpr):
    """Sylvester Hadamard (unscaled) of x [N] (N = 2^LOG_N) with the butterfly of
    numerics.hadamard_transform (same additions in the same order, so bit-identical in fp32)."""
    for stage in tl.static_range(LOG_N):
        y3 = tl.permute(tl.reshape(x, [N // (2 * 2 ** stage), 2, 2 ** stage]), [0, 2, 1])
        a, b = tl.split(y3)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 2, 1]), [N])
    return x


@triton.jit
def _rope(y, pos, if_ptr, d, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the pairs (y[d - 2*HALF + 2i], y[d - 2*HALF + 2i + 1]) by pos * inv_freq[i] (fp32 angle)."""
    ye, yo = tl.split(tl.reshape(y, [BLOCK_D // 2, 2]))
    k = tl.arange(0, BLOCK_D // 2)
    i = k - (d // 2 - HALF)
    is_r = (i >= 0) & (k < d // 2)
    f = tl.load(if_ptr + tl.where(is_r, i, 0), mask=is_r, other=0.0).to(tl.float32)
    ang = pos.to(tl.float32) * f
    # precise on GPUs (Triton 3.6 lowers these to __nv_cosf / __ocml_cos_f32 with full range reduction,
    # not cos.approx: checked in the PTX / LLVM IR), so positions up to 1M give the reference's angles
    c = tl.cos(ang)
    s = tl.sin(ang)
    ne = ye * c - yo * s
    no = ye * s + yo * c
    ye = tl.where(is_r, ne, ye)
    yo = tl.where(is_r, no, yo)
    return tl.reshape(tl.join(ye, yo), [BLOCK_D])


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _pool_kernel(
    kv_ptr, sc_ptr, ape_ptr, state_ptr, prev_ptr, scratch_ptr, sstate_ptr, sprev_ptr,
    slots_ptr, qs_ptr, ss_ptr, sl_ptr, B, m, d,
    s_kv, s_sc, s_ape, s_st0, s_st1, s_pv0, s_pv1,
    OVERLAP: tl.constexpr, DECODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_TOK: tl.constexpr,
):
    g = tl.program_id(0)
    cb = tl.program_id(1)
    b, j, total = _locate(g, ss_ptr, sl_ptr, B, m, DECODE, BLOCK_B)
    if g < total:
        slot = tl.load(slots_ptr + b).to(tl.int64)
        p0 = tl.load(ss_ptr + b)
        p1 = tl.load(sl_ptr + b)
        q0 = tl.load(qs_ptr + b)
        wf = p0 // m
        w = wf + j
        wl = (p1 - 1) // m
        nc = p1 // m - wf  # windows completed by this step
        w0 = w * m  # first position of window w
        lo = tl.maximum(p0, w0)
        hi = tl.minimum(p1, w0 + m)
        complete = hi == w0 + m
        is_open_last = (w == wl) & (hi < w0 + m)
        is_last_done = w == wf + nc - 1
        ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = ch < d
        first = j == 0
        fmask = cm & first
        if OVERLAP:
            C = 2 * d
            cho = ch + d  # own series: the B-half
        else:
            C = d
            cho = ch
        stp = state_ptr + slot * s_st0
        ninf = tl.full([BLOCK_C], float("-inf"), tl.float32)
        zero = tl.zeros([BLOCK_C], tl.float32)
        # own series of window w; the carried state enters the step's first window
        M = tl.load(stp + cho, mask=fmask, other=float("-inf"))
        L = tl.load(stp + s_st1 + cho, mask=fmask, other=0.0)
        A = tl.load(stp + 2 * s_st1 + cho, mask=fmask, other=0.0)
        start = lo
        if OVERLAP:
            # A-series of window w (MW..): needed when it becomes the new open state or the new prev
            need_aw = is_open_last | is_last_done
            MW = tl.load(stp + ch, mask=fmask, other=float("-inf"))
            LW = tl.load(stp + s_st1 + ch, mask=fmask, other=0.0)
            AW = tl.load(stp + 2 * s_st1 + ch, mask=fmask, other=0.0)
            # A-series of window w - 1 (MP..): `prev` if that window precedes the step (j == 0), else this
            # step's tokens of window w - 1 (plus the carried state when it is the step's first window)
            pvp = prev_ptr + slot * s_pv0
            pm = cm & first & complete
            sm = cm & (j == 1) & complete
            MP = tl.where(first, tl.load(pvp + ch, mask=pm, other=float("-inf")),
                          tl.load(stp + ch, mask=sm, other=float("-inf")))
            LP = tl.where(first, tl.load(pvp + s_pv1 + ch, mask=pm, other=0.0),
                          tl.load(stp + s_st1 + ch, mask=sm, other=0.0))
            AP = tl.where(first, tl.load(pvp + 2 * s_pv1 + ch, mask=pm, other=0.0),
                          tl.load(stp + 2 * s_st1 + ch, mask=sm, other=0.0))
            start = tl.where((j >= 1) & complete, tl.maximum(p0, w0 - m), lo)
        # one pass over this step's tokens of windows w - 1 (CSA, A-half only) and w, online softmax
        # per channel (-inf safe: a series may see no row in a chunk)
        for pos0 in range(start, hi, BLOCK_TOK):
            pos = pos0 + tl.arange(0, BLOCK_TOK)
            tm = pos < hi
            own = tm & (pos >= w0)
            t = q0 + pos - p0
            jj = pos % m
            om = own[:, None] & cm[None, :]
            z = tl.load(sc_ptr + t[:, None] * s_sc + cho[None, :], mask=om, other=float("-inf")).to(tl.float32)
            z += tl.load(ape_ptr + jj[:, None] * s_ape + cho[None, :], mask=om, other=0.0).to(tl.float32)
            v = tl.load(kv_ptr + t[:, None] * s_kv + cho[None, :], mask=om, other=0.0).to(tl.float32)
            M, L, A = _online_update(M, L, A, z, v)
            if OVERLAP:
                pv = tm & (pos < w0)
                am = ((pv | (own & need_aw))[:, None]) & cm[None, :]
                za = tl.load(sc_ptr + t[:, None] * s_sc + ch[None, :], mask=am, other=float("-inf")).to(tl.float32)
                za += tl.load(ape_ptr + jj[:, None] * s_ape + ch[None, :], mask=am, other=0.0).to(tl.float32)
                va = tl.load(kv_ptr + t[:, None] * s_kv + ch[None, :], mask=am, other=0.0).to(tl.float32)
                zw = tl.where(own[:, None], za, float("-inf"))
                MW, LW, AW = _online_update(MW, LW, AW, zw, va)
                zp = tl.where(pv[:, None], za, float("-inf"))
                MP, LP, AP = _online_update(MP, LP, AP, zp, va)
        if OVERLAP:
            mx = tl.maximum(MP, M)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            fa = tl.exp(MP - mx)
            fb = tl.exp(M - mx)
            num = AP * fa + A * fb
            den = LP * fa + L * fb
        else:
            num = A
            den = L
        pooled = num / tl.where(den == 0.0, 1.0, den)
        tl.store(scratch_ptr + g.to(tl.int64) * d + ch, pooled, mask=cm & complete)
        if DECODE:
            # one program owns these channels of this slot: update in place, after every read of them
            tl.debug_barrier()
            tl.store(stp + cho, tl.where(complete, ninf, M), mask=cm)
            tl.store(stp + s_st1 + cho, tl.where(complete, zero, L), mask=cm)
            tl.store(stp + 2 * s_st1 + cho, tl.where(complete, zero, A), mask=cm)
            if OVERLAP:
                tl.store(stp + ch, tl.where(complete, ninf, MW), mask=cm)
                tl.store(stp + s_st1 + ch, tl.where(complete, zero, LW), mask=cm)
                tl.store(stp + 2 * s_st1 + ch, tl.where(complete, zero, AW), mask=cm)
                tl.store(pvp + ch, MW, mask=cm & complete)
                tl.store(pvp + s_pv1 + ch, LW, mask=cm & complete)
                tl.store(pvp + 2 * s_pv1 + ch, AW, mask=cm & complete)
        else:
            ssp = sstate_ptr + b.to(tl.int64) * 3 * C
            om1 = cm & is_open_last
            tl.store(ssp + cho, M, mask=om1)
            tl.store(ssp + C + cho, L, mask=om1)
            tl.store(ssp + 2 * C + cho, A, mask=om1)
            if OVERLAP:
                tl.store(ssp + ch, MW, mask=om1)
                tl.store(ssp + C + ch, LW, mask=om1)
                tl.store(ssp + 2 * C + ch, AW, mask=om1)
                spp = sprev_ptr + b.to(tl.int64) * 3 * d
                pm2 = cm & is_last_done
                tl.store(spp + ch, MW, mask=pm2)
                tl.store(spp + d + ch, LW, mask=pm2)
                tl.store(spp + 2 * d + ch, AW, mask=pm2)


@triton.jit
def _finish_kernel(
    scratch_ptr, nw_ptr, if_ptr, state_ptr, prev_ptr, sstate_ptr, sprev_ptr,
    pool_ptr, pscale_ptr, prope_ptr, bt_ptr, slots_ptr, ss_ptr, sl_ptr,
    B, m, d, E, eps,
    s_st0, s_st1, s_pv0, s_pv1, s_p0, s_p1, s_sc0, s_sc1, s_r0, s_r1, s_bt,
    HALF: tl.constexpr, POST: tl.constexpr, POST_FNUZ: tl.constexpr, ACT: tl.constexpr,
    POOL_FP8: tl.constexpr, POOL_FNUZ: tl.constexpr, POOL_NOPE: tl.constexpr, OUT_KIND: tl.constexpr,
    HAD_SCALE: tl.constexpr, OVERLAP: tl.constexpr, DECODE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, LOG_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    g = tl.program_id(0)
    b, j, total = _locate(g, ss_ptr, sl_ptr, B, m, DECODE, BLOCK_B)
    if g < total:
        slot = tl.load(slots_ptr + b).to(tl.int64)
        p0 = tl.load(ss_ptr + b)
        p1 = tl.load(sl_ptr + b)
        wf = p0 // m
        w = wf + j
        if w * m + m <= p1:  # completed window: finish its entry
            offs = tl.arange(0, BLOCK_D)
            dm = offs < d
            x = _round_to(tl.load(scratch_ptr + g.to(tl.int64) * d + offs, mask=dm, other=0.0), ACT)
            r = tl.rsqrt(tl.sum(x * x, axis=0) / d + eps)
            y = _round_to(x * r * tl.load(nw_ptr + offs, mask=dm, other=0.0).to(tl.float32), ACT)
            if HALF > 0:
                y = _round_to(_rope(y, w * m, if_ptr, d, HALF, BLOCK_D), ACT)
            if POST == 1:
                nope = offs < d - 2 * HALF
                _c, deq, _e = _fp8_quant(y, nope, BLOCK_D, POST_FNUZ)
                y = tl.where(nope, deq, y)
            elif POST == 2:
                y = _round_to(_hadamard(y, BLOCK_D, LOG_D) * HAD_SCALE, ACT)
                y = _fp4_roundtrip(y, BLOCK_D)
            page = tl.load(bt_ptr + slot * s_bt + w // E).to(tl.int64)
            row = (w % E).to(tl.int64)
            if POOL_FP8:
                nm = offs < POOL_NOPE
                code, _deq, e = _fp8_quant(y, nm, BLOCK_D, POOL_FNUZ)
                tl.store(pool_ptr + page * s_p0 + row * s_p1 + tl.where(nm, offs, 0), code, mask=nm)
                nb = tl.arange(0, BLOCK_D // 64)
                tl.store(pscale_ptr + page * s_sc0 + row * s_sc1 + nb, (e + 127).to(tl.uint8),
                         mask=nb * 64 < POOL_NOPE)
                rm = (offs >= POOL_NOPE) & dm
                tl.store(prope_ptr + page * s_r0 + row * s_r1 + tl.where(rm, offs - POOL_NOPE, 0),
                         _round_to(y, OUT_KIND).to(prope_ptr.dtype.element_ty), mask=rm)
            else:
                tl.store(pool_ptr + page * s_p0 + row * s_p1 + offs,
                         _round_to(y, OUT_KIND).to(pool_ptr.dtype.element_ty), mask=dm)
        if not DECODE:
            if w == (p1 - 1) // m:  # the sequence's last window installs the new state / prev
                if OVERLAP:
                    C = 2 * d
                else:
                    C = d
                is_open = (p1 % m) != 0
                stp = state_ptr + slot * s_st0
                ssp = sstate_ptr + b.to(tl.int64) * 3 * C
                for c0 in range(0, C, BLOCK_S):
                    cc = c0 + tl.arange(0, BLOCK_S)
                    ck = cc < C
                    om = ck & is_open
                    tl.store(stp + cc, tl.load(ssp + cc, mask=om, other=float("-inf")), mask=ck)
                    tl.store(stp + s_st1 + cc, tl.load(ssp + C + cc, mask=om, other=0.0), mask=ck)
                    tl.store(stp + 2 * s_st1 + cc, tl.load(ssp + 2 * C + cc, mask=om, other=0.0), mask=ck)
                if OVERLAP:
                    if p1 // m > wf:
                        pvp = prev_ptr + slot * s_pv0
                        spp = sprev_ptr + b.to(tl.int64) * 3 * d
                        for c0 in range(0, d, BLOCK_S):
                            cc = c0 + tl.arange(0, BLOCK_S)
                            ck = cc < d
                            tl.store(pvp + cc, tl.load(spp + cc, mask=ck), mask=ck)
                            tl.store(pvp + s_pv1 + cc, tl.load(spp + d + cc, mask=ck), mask=ck)
                            tl.store(pvp + 2 * s_pv1 + cc, tl.load(spp + 2 * d + cc, mask=ck), mask=ck)


# ----------------------------------------------------------------------------- wrapper


def _npow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _kind(dtype: torch.dtype) -> int:
    if dtype not in _KIND:
        raise ValueError(f"compress_kv (triton): unsupported float dtype {dtype}")
    return _KIND[dtype]


def compress_kv_triton(kv, score, ape, norm_weight, inv_freq, state, prev, pool, block_table,
                       meta: ForwardMeta, ratio: int, eps: float, act_dtype: torch.dtype,
                       post: str = "none", dialect=Fp8Dialect.OCP) -> None:
    if post not in POSTPROCESS:
        raise ValueError(f"unknown compressor postprocess {post!r}; expected one of {POSTPROCESS}")
    T, B = meta.num_tokens, meta.num_seqs
    if T == 0 or B == 0:
        return
    m = int(ratio)
    overlap = prev is not None
    d = pool.shape[-1]
    E = pool.shape[1]
    C = (2 if overlap else 1) * d
    if kv.shape[-1] != C or score.shape[-1] != C or ape.shape != (m, C):
        raise ValueError(f"compress_kv (triton): kv/score/ape widths {kv.shape[-1]}/{score.shape[-1]}/"
                         f"{tuple(ape.shape)} do not match c*d = {C} (ratio {m})")
    half = inv_freq.numel()
    if post == "hadamard_fp4" and d & (d - 1):
        raise ValueError(f"hadamard_transform: last dimension must be a power of two, got {d}")
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    score = score if score.stride(-1) == 1 else score.contiguous()
    ape = ape if ape.stride(-1) == 1 else ape.contiguous()
    norm_weight = norm_weight.contiguous()
    inv_freq = inv_freq.contiguous()
    for t in (state, prev):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("compress_kv (triton): state / prev need a unit last stride")
    dev = kv.device
    decode = T == B  # one token per sequence: each sequence touches exactly one window
    G = B if decode else min(T, (T - B) // m + 2 * B)
    scratch = torch.empty((G, d), dtype=torch.float32, device=dev)
    if decode:
        sstate = sprev = scratch  # unused
    else:
        sstate = torch.empty((B, 3, C), dtype=torch.float32, device=dev)
        sprev = torch.empty((B, 3, d), dtype=torch.float32, device=dev) if overlap else scratch
    prev_t = prev if overlap else state
    BLOCK_B = max(2, _npow2(B))
    if FORCE_BLOCK_C:
        BLOCK_C = FORCE_BLOCK_C
    else:
        BLOCK_C = min(128, max(16, _npow2(d)))
        while BLOCK_C > 32 and G * triton.cdiv(d, BLOCK_C) < 512 and not interpreting(dev):
            BLOCK_C //= 2  # (GPU: enough programs for the SMs; the interpreter pays per program instead)
    BLOCK_TOK = FORCE_BLOCK_TOK or (2 if decode else min(16, max(2, _npow2(m))))
    _pool_kernel[(G, triton.cdiv(d, BLOCK_C))](
        kv, score, ape, state, prev_t, scratch, sstate, sprev,
        meta.seq_slots, meta.query_start, meta.seq_start, meta.seq_lens, B, m, d,
        kv.stride(0), score.stride(0), ape.stride(0), state.stride(0), state.stride(1),
        prev_t.stride(0), prev_t.stride(1),
        OVERLAP=overlap, DECODE=decode, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_TOK=BLOCK_TOK,
        num_warps=4,
    )
    if isinstance(pool, Fp8KV):
        nope_s = pool.nope.shape[-1]
        for t in (pool.nope, pool.scale, pool.rope):
            if t.stride(-1) != 1:
                raise ValueError("compress_kv (triton): Fp8KV parts need a unit last stride")
        pool_args = (pool.nope, pool.scale, pool.rope)
        pstr = (pool.nope.stride(0), pool.nope.stride(1), pool.scale.stride(0), pool.scale.stride(1),
                pool.rope.stride(0), pool.rope.stride(1))
        out_kind, pool_fp8, pool_fnuz = _kind(pool.rope.dtype), True, pool.dialect == Fp8Dialect.FNUZ
        if pool.scale.shape[-1] != triton.cdiv(nope_s, FP8_BLOCK):
            raise ValueError("compress_kv (triton): Fp8KV scale width does not match its nope width")
    else:
        if pool.stride(-1) != 1:
            raise ValueError("compress_kv (triton): pool needs a unit last stride")
        nope_s = 0
        pool_args = (pool, pool, pool)
        pstr = (pool.stride(0), pool.stride(1), 0, 0, 0, 0)
        out_kind, pool_fp8, pool_fnuz = _kind(pool.dtype), False, False
    BLOCK_D = max(64, _npow2(d))
    _finish_kernel[(G,)](
        scratch, norm_weight, inv_freq, state, prev_t, sstate, sprev,
        *pool_args, block_table, meta.seq_slots, meta.seq_start, meta.seq_lens,
        B, m, d, E, float(eps),
        state.stride(0), state.stride(1), prev_t.stride(0), prev_t.stride(1), *pstr, block_table.stride(0),
        HALF=half, POST=_POST[post], POST_FNUZ=Fp8Dialect.parse(dialect) == Fp8Dialect.FNUZ,
        ACT=_kind(act_dtype), POOL_FP8=pool_fp8, POOL_FNUZ=pool_fnuz, POOL_NOPE=nope_s, OUT_KIND=out_kind,
        HAD_SCALE=float(d) ** -0.5, OVERLAP=overlap, DECODE=decode,
        BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, LOG_D=BLOCK_D.bit_length() - 1, BLOCK_S=128, num_warps=4,
    )


register(compress_kv, compress_kv_triton)
