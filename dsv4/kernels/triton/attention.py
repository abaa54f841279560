"""Triton providers for `sparse_attention` and `write_window` (dsv4/ops/attention.py).

sparse_attention: one softmax per (token, head) over [sliding window keys | compressed entries] plus the
sink (denominator only), K = V (one shared head, MQA), fp32 scores / accumulation. KV stores are float
tensors or `Fp8KV` (FP8 bytes + per-64 E8M0 scales + float rope dims), decoded inside the kernel (no
dequantised copy of any cache is ever made).

write_window: ring[slot, pos % W] = kv row for the last W tokens of each sequence of the step, quantising
the non-rotary dims exactly like `dsv4.numerics.fp8.quantize_fp8_blocks` for FP8 stores.

Both wrappers take exactly the reference's arguments, do no device->host syncs (grid sizes and the
split count come from argument shapes and the host mirrors of ForwardMeta) and are graph-capturable.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (COUNTER_SLOTS, bf16_rne_bits, cast_out, fp8_block_exponent, fp8_decode,
                                        fp8_e4m3_native, fp8_encode, fp8_pow2, fp8_quant_max, load_parts, register,
                                        sm_count, tile_counters)
from dsv4.kernels.triton.rope import apply_rope_triton
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.attention import sparse_attention as sparse_attention_op
from dsv4.ops.attention import write_window_op
from dsv4.ops.kv_format import FP8_BLOCK, Fp8KV
from dsv4.ops.meta import ForwardMeta

LOG2E = 1.4426950408889634

# Launch configuration (tunable; sweeps: benchmarks/attention_floor.py, docs/perf.md). BLOCK_H heads share
# every key tile; BLOCK_N keys per tile; >= 16 each so tl.dot runs on the tensor cores. PREFETCH: compressed-
# entry ids and pages fetched ahead (the compressed loop below).
CONFIG = {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "PREFETCH": False}  # float stores
# FP8 stores (graph-replay sweeps 2026-12-06, docs/perf.md): 16 heads per program and 4 warps, one stage, no
# prefetch: two programs fit an SM (98 KB of shared memory, 255 registers each), so one program's dependent
# loads hide behind the other's dots. 16-28% faster than 32 heads / 8 warps at batch 64-256 (H200), 4-25% at
# batch 4-32 and 4-10% in 4K-token prefill (H100). At batch 1 (1-2 tokens) the 8-warp program with the entry
# ids and pages fetched ahead stays: 20.0 against 23.2 us (H200).
CONFIG_FP8 = {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "PREFETCH": False}
CONFIG_FP8_SMALL_T = {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 8, "num_stages": 1, "PREFETCH": True}
SMALL_T = 2
INTERPRETER_BLOCK_N = 128  # the interpreter pays per loop iteration and per program, not per lane: wide key tiles
MIN_KEYS_PER_SPLIT = 64  # split-KV (flash-decoding) never gives a split fewer keys than this
MAX_SPLITS = 64
FUSE_INV_ROPE = True  # `inv_rope` de-rotates in the kernel that writes the output (else: apply_rope after)
LAST_COMBINE = False  # split-KV: the last split program of a (token, head block) combines (off: the combine kernel,
# the measured default, docs/perf.md 2026-12-07 (c))


# ----------------------------------------------------------------------------------------- helpers


@triton.jit
def _load_rows(b_ptr, s_ptr, r_ptr, off_b, off_s, off_r, rmask, D, DN,
               FP8: tl.constexpr, FNUZ: tl.constexpr, HW_OCP: tl.constexpr, DT: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Rows of a KV store as a [BLOCK_N, BLOCK_D] tile in DT (zeros where masked). off_*: int64 [BLOCK_N]
    element offsets of each row in the store's components. Float store: b_ptr holds the rows. Fp8KV: b_ptr = nope
    bytes, s_ptr = E8M0 scale bytes (one per 64 nope dims), r_ptr = rope floats; column d < DN decodes byte *
    2^(scale - 127) (exact: e4m3 times a power of two), d >= DN reads rope column d - DN.

    Every load is contiguous along the columns (masks, never `where`, in the offsets), so it vectorises; the
    scales are loaded once per 64-column block and broadcast through a reshape (a per-element gather of them
    was the first version's main cost: 2.6-3x slower at batch 64-256 on an H100, docs/perf.md 2026-12-06);
    OCP bytes decode by the hardware conversion where there is one (HW_OCP), else by bit arithmetic."""
    d = tl.arange(0, BLOCK_D)
    if FP8:
        is_n = d < DN
        byte = tl.load(b_ptr + off_b[:, None] + d[None, :], mask=rmask[:, None] & is_n[None, :], other=0)
        if FNUZ:
            v = fp8_decode(byte, FNUZ)
        elif HW_OCP:
            v = byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            v = fp8_decode(byte, FNUZ)
        NB: tl.constexpr = (BLOCK_D + 63) // 64
        blk = tl.arange(0, NB)
        sb = tl.load(s_ptr + off_s[:, None] + blk[None, :], mask=rmask[:, None] & (blk * 64 < DN)[None, :], other=127)
        sc = fp8_pow2(sb.to(tl.int32) - 127)
        BN: tl.constexpr = v.shape[0]
        xn = tl.reshape(tl.reshape(v, (BN, NB, BLOCK_D // NB)) * sc[:, :, None], (BN, BLOCK_D))
        mr = rmask[:, None] & ((d >= DN) & (d < D))[None, :]
        xr = tl.load(r_ptr + off_r[:, None] + (d - DN)[None, :], mask=mr, other=0.0)
        x = tl.where(is_n[None, :], xn.to(DT), xr.to(DT))
    else:
        x = tl.load(b_ptr + off_b[:, None] + d[None, :], mask=rmask[:, None] & (d < D)[None, :], other=0.0).to(DT)
    return x


@triton.jit
def _attend(q, k, valid, m_i, l_i, acc, qk_scale, PREC: tl.constexpr):
    """Online-softmax step (log2 domain) of BLOCK_H heads over one key tile k [BLOCK_N, BLOCK_D] (K = V).
    m_i starts finite (the sink), so masked keys (-inf) never produce NaN."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_H, BLOCK_N] fp32
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _attend_rows(q, b_ptr, s_ptr, r_ptr, off_b, off_s, off_r, rmask, D, DN, m_i, l_i, acc, qk_scale,
                 FP8: tl.constexpr, FNUZ: tl.constexpr, HW_OCP: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Load one tile of store rows and attend to it."""
    k = _load_rows(b_ptr, s_ptr, r_ptr, off_b, off_s, off_r, rmask, D, DN, FP8, FNUZ, HW_OCP, q.dtype, BLOCK_D)
    return _attend(q, k, rmask, m_i, l_i, acc, qk_scale, PREC)


@triton.jit
def _entry_ids(idx_row_ptr, c0, c_hi, MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Compressed-entry ids of list positions c0 .. c0 + BLOCK_N - 1 (int32) and which are valid: CSA reads
    them from the token's top-k row (-1 = none), HCA counts them."""
    c = c0 + tl.arange(0, BLOCK_N)
    cm = c < c_hi
    if MODE == 1:
        w = tl.load(idx_row_ptr + tl.where(cm, c, 0), mask=cm, other=-1)
        cm = cm & (w >= 0)
        w = tl.where(cm, w, 0).to(tl.int32)  # entry ids < 2^31: 32-bit division
    else:
        w = tl.where(cm, c, 0)
    return w, cm


@triton.jit
def _entry_pages(bt_row_ptr, MAXP, E, w, cm):
    """Physical page (int64), row within the page (int64) and validity of entries w through the block table."""
    pg = w // E
    cm = cm & (pg < MAXP)
    page = tl.load(bt_row_ptr + tl.where(cm, pg, 0), mask=cm, other=0).to(tl.int64)
    return page, (w % E).to(tl.int64), cm


# ----------------------------------------------------------------------------------------- attention
#
# Work decomposition: grid (T * cdiv(H, BLOCK_H), NSPLIT). Program (t, head block, split) loads the query
# rows of BLOCK_H heads of token t once ([BLOCK_H, D]) and streams that token's key list in tiles of BLOCK_N
# rows: first the window positions max(0, p-W+1)..p (ring rows window[slot, pos % W] for positions before
# this step, then rows of this step's `kv`), then the compressed entries (CSA: the ids of topk_idx[t], -1
# skipped; HCA: 0 .. (p+1)//ratio - 1, counted, never listed), gathered through the block table. Per tile:
# one [BLOCK_H, D] x [D, BLOCK_N] dot for the logits, an online softmax in fp32 (exp2, log2 domain), one
# [BLOCK_H, BLOCK_N] x [BLOCK_N, D] dot into the fp32 accumulator. The head-block programs of one token are
# adjacent in launch order, so a key tile comes from HBM once per token and from L2 after that; FP8 tiles are
# decoded once per head block.
# Measured alternatives (H100, graph replays, docs/perf.md 2026-12-06), all slower at every batch: 64 heads
# per program with the value columns split over programs (wgmma, queries in shared memory), and a kernel over
# 64-column chunks as 3-D batched dots (no register spills, where this one spills ~0.9 KB per thread at
# BLOCK_H 32: benchmarks/attention_ptxas.py). What bounds this kernel is latency per tile (three dependent
# gathers: index, page, rows), not the spills: two 4-warp programs per SM (CONFIG_FP8) beat one 8-warp one.
# Split-KV (flash-decoding) when T * head blocks cannot fill the GPU (decode at small batch): split i takes a
# contiguous chunk of the token's [window | compressed] list and writes (max, sum, unnormalised acc) to an
# fp32 workspace; the last of a (token, head block)'s split programs to finish (a tile counter, acq_rel) merges
# them and adds the sink (`_combine_rows`; LAST_COMBINE off: `_combine_kernel`, one more launch, the same
# arithmetic). The split count changes speed only, never results' semantics, so a captured graph may keep it.


@triton.jit
def _sparse_attn_kernel(
    q_ptr, s_qt, s_qh,
    kv_ptr, s_kvt,
    wb_ptr, wb_s0, wb_s1, ws_ptr, ws_s0, ws_s1, wr_ptr, wr_s0, wr_s1,
    pb_ptr, pb_s0, pb_s1, ps_ptr, ps_s0, ps_s1, pr_ptr, pr_s0, pr_s1,
    bt_ptr, s_bt, MAXP,
    idx_ptr, s_idx, K,
    sink_ptr,
    pos_ptr, tseq_ptr, slots_ptr, qstart_ptr, sstart_ptr,
    out_ptr, s_ot, s_oh,
    wsm_ptr, wsa_ptr, freq_ptr, cnt_ptr,
    H, D, DN_W, DN_P, W, E, ratio, qk_scale, NHB, NSPLIT, HALF,
    MODE: tl.constexpr,  # 0 SWA, 1 CSA (topk ids), 2 HCA (all visible entries)
    W_FP8: tl.constexpr, W_FNUZ: tl.constexpr, P_FP8: tl.constexpr, P_FNUZ: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, HW_OCP: tl.constexpr, PREFETCH: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr = False, RNE_BITS: tl.constexpr = False, LAST_COMBINE: tl.constexpr = False,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    hb = pid % NHB
    t = pid // NHB
    t64 = t.to(tl.int64)
    b = tl.load(tseq_ptr + t)
    p = tl.load(pos_ptr + t).to(tl.int32)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    s0 = tl.load(sstart_ptr + b).to(tl.int32)
    qs = tl.load(qstart_ptr + b).to(tl.int32)

    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + t64 * s_qt + h[:, None].to(tl.int64) * s_qh + d[None, :],
                mask=hm[:, None] & dm[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    z = tl.load(sink_ptr + h, mask=hm, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = z  # running max starts at the sink logit: finite, so no -inf - -inf
    if SPLIT:
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # the combine kernel adds the sink
    else:
        l_i = tl.full([BLOCK_H], 1.0, dtype=tl.float32)  # exp2(z - m_i) = 1
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    lo = tl.maximum(p - W + 1, 0)
    nW = p - lo + 1
    if MODE == 1:
        nC = K
    elif MODE == 2:
        nC = (p + 1) // ratio
    else:
        nC = 0
    nV = nW + nC
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(nV, NSPLIT), BLOCK_N) * BLOCK_N
        v_lo = split * chunk
        v_hi = tl.minimum(v_lo + chunk, nV)
    else:
        v_lo = 0
        v_hi = nV

    # ---- window: positions lo + v, v in [w_lo, w_hi): first the ring rows (positions < s0, earlier
    # steps), then this step's rows of `kv`
    w_lo = tl.minimum(v_lo, nW)
    w_hi = tl.minimum(v_hi, nW)
    n_ring = tl.minimum(tl.maximum(s0 - lo, 0), nW)  # window keys held by the ring
    r_hi = tl.minimum(w_hi, n_ring)
    for v0 in range(w_lo, r_hi, BLOCK_N):
        v = v0 + tl.arange(0, BLOCK_N)
        vm = v < r_hi
        ring = tl.where(vm, (lo + v) % W, 0).to(tl.int64)
        m_i, l_i, acc = _attend_rows(q, wb_ptr, ws_ptr, wr_ptr, slot * wb_s0 + ring * wb_s1,
                                     slot * ws_s0 + ring * ws_s1, slot * wr_s0 + ring * wr_s1, vm, D, DN_W,
                                     m_i, l_i, acc, qk_scale, W_FP8, W_FNUZ, HW_OCP, PREC, BLOCK_D)
    for v0 in range(tl.maximum(w_lo, n_ring), w_hi, BLOCK_N):
        v = v0 + tl.arange(0, BLOCK_N)
        vm = v < w_hi
        row = tl.where(vm, qs + lo + v - s0, 0).to(tl.int64) * s_kvt
        m_i, l_i, acc = _attend_rows(q, kv_ptr, kv_ptr, kv_ptr, row, row, row, vm, D, D, m_i, l_i, acc,
                                     qk_scale, False, False, False, PREC, BLOCK_D)

    # ---- compressed entries c in [c_lo, c_hi). A tile's rows sit behind two dependent loads (CSA: its entry
    # ids, then their pages); PREFETCH issues them one and two tiles ahead, so that only the row loads wait.
    if MODE != 0:
        c_lo = tl.maximum(v_lo, nW) - nW
        c_hi = tl.maximum(v_hi, nW) - nW
        if PREFETCH:
            w, cm = _entry_ids(idx_ptr + t64 * s_idx, c_lo, c_hi, MODE, BLOCK_N)
            page, e, pm = _entry_pages(bt_ptr + slot * s_bt, MAXP, E, w, cm)
            w, cm = _entry_ids(idx_ptr + t64 * s_idx, c_lo + BLOCK_N, c_hi, MODE, BLOCK_N)
            for c0 in range(c_lo, c_hi, BLOCK_N):
                page_n, e_n, pm_n = _entry_pages(bt_ptr + slot * s_bt, MAXP, E, w, cm)  # tile + 1
                w, cm = _entry_ids(idx_ptr + t64 * s_idx, c0 + 2 * BLOCK_N, c_hi, MODE, BLOCK_N)  # tile + 2
                m_i, l_i, acc = _attend_rows(q, pb_ptr, ps_ptr, pr_ptr, page * pb_s0 + e * pb_s1,
                                             page * ps_s0 + e * ps_s1, page * pr_s0 + e * pr_s1, pm, D, DN_P,
                                             m_i, l_i, acc, qk_scale, P_FP8, P_FNUZ, HW_OCP, PREC, BLOCK_D)
                page, e, pm = page_n, e_n, pm_n
        else:
            for c0 in range(c_lo, c_hi, BLOCK_N):
                w, cm = _entry_ids(idx_ptr + t64 * s_idx, c0, c_hi, MODE, BLOCK_N)
                page, e, pm = _entry_pages(bt_ptr + slot * s_bt, MAXP, E, w, cm)
                m_i, l_i, acc = _attend_rows(q, pb_ptr, ps_ptr, pr_ptr, page * pb_s0 + e * pb_s1,
                                             page * ps_s0 + e * ps_s1, page * pr_s0 + e * pr_s1, pm, D, DN_P,
                                             m_i, l_i, acc, qk_scale, P_FP8, P_FNUZ, HW_OCP, PREC, BLOCK_D)

    if SPLIT:
        row = (t64 * NSPLIT + split) * 2
        tl.store(wsm_ptr + row * H + h, m_i, mask=hm)
        tl.store(wsm_ptr + (row + 1) * H + h, l_i, mask=hm)
        base = (t64 * NSPLIT + split) * H
        tl.store(wsa_ptr + (base + h[:, None]) * D + d[None, :], acc, mask=hm[:, None] & dm[None, :])
        if LAST_COMBINE:  # the last of the (token, head block)'s splits to finish combines them (no combine launch)
            tl.debug_barrier()  # every thread's partials stored before the program counts itself done
            done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if done == NSPLIT - 1:
                _combine_rows(t64, hb, wsm_ptr, wsa_ptr, sink_ptr, out_ptr, s_ot, s_oh, H, D, NSPLIT, q_ptr, freq_ptr,
                              p, HALF, BLOCK_H, BLOCK_D, ROPE, RNE_BITS, True)
                tl.atomic_xchg(cnt_ptr + pid, 0)
    else:
        o = acc / l_i[:, None]
        if ROPE:
            o = _inverse_rope(o, q_ptr, freq_ptr, p, D, HALF, RNE_BITS, BLOCK_H, BLOCK_D)
        tl.store(out_ptr + t64 * s_ot + h[:, None].to(tl.int64) * s_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=hm[:, None] & dm[None, :])


@triton.jit
def _inverse_rope(o, q_ptr, freq_ptr, p, D, HALF, RNE_BITS: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """The output rows o [BLOCK_H, BLOCK_D] (fp32) rounded to q's dtype, then de-rotated as apply_rope(inverse=True)
    does (pairs (2k, 2k + 1) of the trailing 2 HALF channels by -float32(p) * inv_freq, fp32 products) and rounded
    again: the two ops' values, without writing and re-reading the output (ops/rope.py)."""
    o = cast_out(o, q_ptr, RNE_BITS).to(tl.float32)
    oe, oo = tl.split(tl.reshape(o, [BLOCK_H, BLOCK_D // 2, 2]))
    k = tl.arange(0, BLOCK_D // 2)
    i = k - (D // 2 - HALF)
    rot = (i >= 0) & (k < D // 2)
    ang = p.to(tl.float32) * tl.load(freq_ptr + tl.where(rot, i, 0), mask=rot, other=0.0).to(tl.float32)
    c = tl.cos(ang)[None, :]
    s = -tl.sin(ang)[None, :]
    re = cast_out(oe * c - oo * s, q_ptr, RNE_BITS).to(tl.float32)
    ro = cast_out(oe * s + oo * c, q_ptr, RNE_BITS).to(tl.float32)
    return tl.reshape(tl.join(tl.where(rot[None, :], re, oe), tl.where(rot[None, :], ro, oo)), [BLOCK_H, BLOCK_D])


# Work decomposition: grid (T * cdiv(H, BLOCK_H)); each program reads the NSPLIT (max, sum) pairs and
# [BLOCK_H, D] fp32 partial accumulators of its token's splits once (from L2 right after the main
# kernel) and writes the output rows once; it only runs when NSPLIT > 1 (small decode batches).
@triton.jit
def _combine_kernel(wsm_ptr, wsa_ptr, sink_ptr, out_ptr, s_ot, s_oh, H, D, NHB, NSPLIT,
                    q_ptr, freq_ptr, pos_ptr, HALF,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr = False,
                    RNE_BITS: tl.constexpr = False):
    pid = tl.program_id(0)
    t64 = (pid // NHB).to(tl.int64)
    _combine_rows(t64, pid % NHB, wsm_ptr, wsa_ptr, sink_ptr, out_ptr, s_ot, s_oh, H, D, NSPLIT, q_ptr, freq_ptr,
                  tl.load(pos_ptr + t64).to(tl.int32), HALF, BLOCK_H, BLOCK_D, ROPE, RNE_BITS, False)


@triton.jit
def _combine_rows(t64, hb, wsm_ptr, wsa_ptr, sink_ptr, out_ptr, s_ot, s_oh, H, D, NSPLIT, q_ptr, freq_ptr, p, HALF,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, RNE_BITS: tl.constexpr,
                  CG: tl.constexpr):
    """Token t64's output rows of head block hb from its NSPLIT (max, sum, acc) partials and the sink."""
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    d = tl.arange(0, BLOCK_D)
    mask = hm[:, None] & (d < D)[None, :]
    z = tl.load(sink_ptr + h, mask=hm, other=0.0).to(tl.float32) * 1.4426950408889634
    mx = z
    for i in range(NSPLIT):
        row = (t64 * NSPLIT + i) * 2
        mx = tl.maximum(mx, load_parts(wsm_ptr + row * H + h, hm, CG))
    den = tl.exp2(z - mx)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for i in range(NSPLIT):
        row = (t64 * NSPLIT + i) * 2
        mi = load_parts(wsm_ptr + row * H + h, hm, CG)
        li = load_parts(wsm_ptr + (row + 1) * H + h, hm, CG)
        a = load_parts(wsa_ptr + ((t64 * NSPLIT + i) * H + h[:, None]) * D + d[None, :], mask, CG)
        wgt = tl.exp2(mi - mx)
        den += wgt * li
        acc += wgt[:, None] * a
    o = acc / den[:, None]
    if ROPE:
        o = _inverse_rope(o, q_ptr, freq_ptr, p, D, HALF, RNE_BITS, BLOCK_H, BLOCK_D)
    tl.store(out_ptr + t64 * s_ot + h[:, None].to(tl.int64) * s_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------- write_window
#
# Work decomposition: grid (T,); program t reads its sequence's end (query_start[b+1]) and stores its kv
# row into ring[slot, pos % W] only if it is one of the last W tokens of the sequence in this step
# (other programs exit after three scalar loads). Each written row is read once and written once:
# D * elt bytes in, D * elt (float) or D - r + ceil((D - r)/64) + r * elt (FP8) bytes out. For FP8 the
# non-rotary dims are viewed as [NB, 64] blocks: per-block amax (>= 1e-4), s = 2^ceil(log2(amax/448))
# from the float32 bits (exact, like pow2_scale_exponent), FNUZ doubles s and clamps at 224, bytes via
# fp8_encode (RNE), scale bytes e + 127; rotary dims are stored as floats.


@triton.jit
def _write_window_kernel(kvn_ptr, kvr_ptr, s_kvt, pos_ptr, tseq_ptr, slots_ptr, qstart_ptr,
                         wb_ptr, wb_s0, wb_s1, ws_ptr, ws_s0, ws_s1, wr_ptr, wr_s0, wr_s1,
                         W, D, DN,
                         FP8: tl.constexpr, FNUZ: tl.constexpr,
                         BLOCK_D: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    t64 = t.to(tl.int64)
    b = tl.load(tseq_ptr + t)
    q_end = tl.load(qstart_ptr + b + 1)
    keep = t >= q_end - W  # one of the last W tokens of its sequence in this step
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    ring = (pos % W).to(tl.int64)
    if FP8:
        blk = tl.arange(0, NB)
        j = tl.arange(0, 64)
        dn = blk[:, None] * 64 + j[None, :]
        mn = (dn < DN) & keep
        x = tl.load(kvn_ptr + t64 * s_kvt + dn, mask=mn, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
        e = fp8_block_exponent(amax, FNUZ)
        qmax = fp8_quant_max(FNUZ)
        inv = fp8_pow2(-e)
        y = tl.minimum(tl.maximum(x * inv[:, None], -qmax), qmax)
        code = fp8_encode(y, FNUZ)
        tl.store(wb_ptr + slot * wb_s0 + ring * wb_s1 + dn, code, mask=mn)
        nsc = (DN + 63) // 64
        tl.store(ws_ptr + slot * ws_s0 + ring * ws_s1 + blk, (e + 127).to(tl.uint8), mask=(blk < nsc) & keep)
        r = tl.arange(0, BLOCK_R)
        mr = (r < D - DN) & keep
        xr = tl.load(kvr_ptr + t64 * s_kvt + DN + r, mask=mr, other=0.0)
        tl.store(wr_ptr + slot * wr_s0 + ring * wr_s1 + r, xr.to(wr_ptr.dtype.element_ty), mask=mr)
    else:
        d = tl.arange(0, BLOCK_D)
        m = (d < D) & keep
        x = tl.load(kvn_ptr + t64 * s_kvt + d, mask=m, other=0.0)
        tl.store(wb_ptr + slot * wb_s0 + ring * wb_s1 + d, x.to(wb_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------- wrappers


def _store_args(store, D: int):
    """(pointer tensors + lead strides for (base, scale, rope)), fp8, fnuz, number of FP8 dims."""
    if isinstance(store, Fp8KV):
        parts = (store.nope, store.scale, store.rope)
        for x in parts:
            if x.shape[-1] > 1 and x.stride(-1) != 1:
                raise ValueError("sparse_attention (triton): KV store components need a unit last stride")
        args = []
        for x in parts:
            args += [x, x.stride(0), x.stride(1)]
        return args, True, Fp8Dialect.parse(store.dialect) is Fp8Dialect.FNUZ, store.nope.shape[-1]
    if store.stride(-1) != 1:
        raise ValueError("sparse_attention (triton): KV store rows need a unit last stride")
    return [store, store.stride(0), store.stride(1)] * 3, False, False, D


def _auto_splits(device: torch.device, progs: int, max_keys: int) -> int:
    n_sm = sm_count(device) or 4
    if progs >= n_sm:
        return 1
    want = triton.cdiv(2 * n_sm, progs)
    return max(1, min(want, max_keys // MIN_KEYS_PER_SPLIT, MAX_SPLITS))


def sparse_attention_impl(q, kv, window, sink, scale: float, meta: ForwardMeta, pool=None, block_table=None,
                          topk_idx=None, ratio: int = 0, inv_rope=None, *, num_splits: int | None = None,
                          block_h: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                          num_stages: int | None = None, prefetch: bool | None = None,
                          out: torch.Tensor | None = None):
    """`sparse_attention` with optional launch overrides (tests and tuning). `out`: a caller-provided
    [T, H, D] output (any strides, unit last stride, q's dtype; float32 under the interpreter)."""
    T, H, D = q.shape
    W = window.shape[1]
    on_cpu = q.device.type == "cpu"  # the Triton interpreter (tests)
    # Under the interpreter: dots in fp32 (its bf16 tl.dot is wrong) and the output rounded by torch
    # (its fp32 -> bf16 cast truncates). On a GPU: dots in q's dtype with fp32 accumulation.
    dot_f32 = on_cpu or q.dtype == torch.float32
    out_dtype = torch.float32 if on_cpu else q.dtype
    if out is None:
        out = torch.empty((T, H, D), dtype=out_dtype, device=q.device)
    elif out.dtype != out_dtype or tuple(out.shape) != (T, H, D) or out.stride(-1) != 1:
        raise ValueError(f"sparse_attention (triton): out must be [T, H, D] {out_dtype} with a unit last stride")
    if T == 0:
        return out.to(q.dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    sink = sink.float().contiguous()

    w_args, w_fp8, w_fnuz, dn_w = _store_args(window, D)
    if pool is None:
        mode, p_args, p_fp8, p_fnuz, dn_p, E = 0, w_args, w_fp8, w_fnuz, dn_w, 1
    else:
        mode = 1 if topk_idx is not None else 2
        p_args, p_fp8, p_fnuz, dn_p = _store_args(pool, D)
        E = pool.shape[1]
    if mode == 2 and ratio <= 0:
        raise ValueError("sparse_attention (triton): HCA needs ratio > 0")
    bt = block_table if block_table is not None else meta.positions
    maxp = block_table.shape[1] if block_table is not None else 1
    idx = topk_idx if topk_idx is not None else meta.positions.view(-1, 1)
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    Kk = topk_idx.shape[1] if topk_idx is not None else 0
    rope = inv_rope is not None and FUSE_INV_ROPE and D % 2 == 0 and 2 * inv_rope.numel() <= D
    freq = inv_rope.to(device=q.device, dtype=torch.float32).contiguous() if rope else sink
    half = inv_rope.numel() if rope else 0
    rne = bf16_rne_bits(q.dtype)

    if w_fp8 or p_fp8:
        cfg = CONFIG_FP8_SMALL_T if T <= SMALL_T else CONFIG_FP8
    else:
        cfg = CONFIG
    BH = block_h or cfg["BLOCK_H"]
    BN = block_n or (INTERPRETER_BLOCK_N if on_cpu else cfg["BLOCK_N"])
    BD = triton.next_power_of_2(D)
    nhb = triton.cdiv(H, BH)
    if num_splits is None:
        if mode == 1:
            max_keys = W + Kk
        elif mode == 2:
            max_keys = W + meta.max_seq_len // ratio
        else:
            max_keys = W
        num_splits = _auto_splits(q.device, T * nhb, max_keys)
    split = num_splits > 1
    cnt = tile_counters(q.device) if split and LAST_COMBINE and T * nhb <= COUNTER_SLOTS else None
    if split:
        wsm = torch.empty((T, num_splits, 2, H), dtype=torch.float32, device=q.device)
        wsa = torch.empty((T, num_splits, H, D), dtype=torch.float32, device=q.device)
    else:
        wsm = wsa = out
    _sparse_attn_kernel[(T * nhb, num_splits)](
        q, q.stride(0), q.stride(1),
        kv, kv.stride(0),
        *w_args, *p_args,
        bt, bt.stride(0), maxp,
        idx, idx.stride(0), Kk,
        sink,
        meta.positions, meta.token_seq, meta.seq_slots, meta.query_start, meta.seq_start,
        out, out.stride(0), out.stride(1),
        wsm, wsa, freq, cnt if cnt is not None else wsm,
        H, D, dn_w, dn_p, W, E, max(ratio, 1), float(scale) * LOG2E, nhb, num_splits, half,
        MODE=mode, W_FP8=w_fp8, W_FNUZ=w_fnuz, P_FP8=p_fp8, P_FNUZ=p_fnuz, SPLIT=split, DOT_F32=dot_f32,
        PREC="ieee" if dot_f32 else None, HW_OCP=fp8_e4m3_native(q.device, False),
        PREFETCH=cfg["PREFETCH"] if prefetch is None else prefetch, BLOCK_H=BH, BLOCK_N=BN,
        BLOCK_D=BD, ROPE=rope, RNE_BITS=rne, LAST_COMBINE=cnt is not None,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    if split and cnt is None:
        _combine_kernel[(T * nhb,)](wsm, wsa, sink, out, out.stride(0), out.stride(1), H, D, nhb, num_splits,
                                    q, freq, meta.positions, half, BLOCK_H=BH, BLOCK_D=BD, ROPE=rope,
                                    RNE_BITS=rne, num_warps=4)
    out = out if out.dtype == q.dtype else out.to(q.dtype)
    if inv_rope is not None and not rope:
        out = apply_rope_triton(out, meta.positions, inv_rope, inverse=True)
    return out


def sparse_attention_triton(q, kv, window, sink, scale: float, meta: ForwardMeta, pool=None, block_table=None,
                            topk_idx=None, ratio: int = 0, inv_rope=None):
    return sparse_attention_impl(q, kv, window, sink, scale, meta, pool, block_table, topk_idx, ratio, inv_rope)


def write_window_triton(window, kv: torch.Tensor, meta: ForwardMeta) -> None:
    T = kv.shape[0]
    if T == 0:
        return
    D = kv.shape[-1]
    W = window.shape[1]
    if kv.stride(-1) != 1:
        kv = kv.contiguous()
    args, fp8, fnuz, dn = _store_args(window, D)
    on_cpu = kv.device.type == "cpu"
    kvn = kvr = kv
    if on_cpu:  # the interpreter's float casts truncate: let torch round the float stores (tests)
        if fp8:
            kvr = kv.to(window.rope.dtype)
        else:
            kvn = kv.to(window.dtype)
    nb = triton.next_power_of_2(max(1, triton.cdiv(dn, FP8_BLOCK)))
    _write_window_kernel[(T,)](kvn, kvr, kv.stride(0), meta.positions, meta.token_seq, meta.seq_slots,
                               meta.query_start, *args, W, D, dn, FP8=fp8, FNUZ=fnuz,
                               BLOCK_D=triton.next_power_of_2(D), NB=nb,
                               BLOCK_R=triton.next_power_of_2(max(1, D - dn)), num_warps=4)


register(sparse_attention_op, sparse_attention_triton)
register(write_window_op, write_window_triton)
