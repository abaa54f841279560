"""Triton provider of `indexer_topk` (dsv4/ops/indexer.py; spec §2.6).

score(t, w) = sum_h weights[t, h] * relu(q[t, h] . k_w) for the cached indexer keys k_w of the token's
sequence (paged through the block table), -inf where entry w is not visible to the token
((w + 1) * ratio > p + 1) or past its sequence's cached count, written into an fp32 buffer
[T_chunk, n_max] (n_max = max over sequences of seq_lens // ratio, from the host mirrors); then
a row top-k kernel (`_row_topk_kernel`, below; torch.topk with the knob off), -1 for the places left empty:
the reference's result set. Query tokens are processed in chunks so that the score buffer
stays below MAX_SCORE_BYTES whatever the context length.

Work decomposition of `_indexer_scores_kernel`: grid (query groups, entry splits). A query group is
BLOCK_T consecutive tokens of ONE sequence (BLOCK_T = 1 for decode-only steps; for prefill chunks the
groups are cut per sequence on the device, no host sync); an entry split is TILES tiles of BLOCK_N
entries. A program loads its group's q as one [BLOCK_T * BLOCK_H, dI] tile once (all heads: 64 x 128
at full size, 16 KiB bf16 per token), then for each of its tiles that is at least partly visible
gathers the [dI, BLOCK_N] key tile through the block table (each key row is read once per group and
tile: 256 B contiguous per entry), does one tl.dot (bf16 in, fp32 accumulate) for all heads and tokens
of the group, relu, multiplies by the head weights and reduces over heads, and stores BLOCK_N fp32
scores per token. Tiles entirely beyond the group's last visible entry only store -inf (no loads, no
math), so causal prefill does half the work. Floor: decode reads every visible key once (the
HBM-bound part: 256 B per entry per sequence) and does 2 * H * dI FLOPs per (token, entry) on the
tensor cores; prefill re-reads keys once per group of BLOCK_T tokens (L2) and is tensor-core bound.
The score buffer (4 B per token and entry, written once and read by torch.topk) is the remaining
traffic; torch.topk itself is outside this kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import fp8_decode, register
from dsv4.ops.indexer import indexer_topk
from dsv4.ops.kv_format import Fp8KV
from dsv4.ops.meta import ForwardMeta

#: Upper bound on the fp32 score buffer of one chunk of query tokens (bytes).
MAX_SCORE_BYTES = 256 << 20
#: Test hooks: force the entry tile size / the query-group size (None: automatic).
FORCE_BLOCK_N: int | None = None
FORCE_BLOCK_T: int | None = None
FORCE_TILES: int | None = None


@triton.jit
def _indexer_scores_kernel(
    q_ptr, w_ptr, k_ptr, ks_ptr, kr_ptr, bt_ptr, pos_ptr, tseq_ptr, slots_ptr, gs_ptr, ge_ptr, out_ptr,
    t_base, n_out, H, D, E, ratio, w_scale,
    s_qt, s_qh, s_wt, s_kp, s_ke, s_sp, s_se, s_rp, s_re, s_bt, s_out,
    NOPE: tl.constexpr, IS_FP8: tl.constexpr, FNUZ: tl.constexpr, GROUPED: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES: tl.constexpr,
):
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUPED:
        ts = tl.load(gs_ptr + pid_g)
        te = tl.load(ge_ptr + pid_g)
    else:
        ts = (t_base + pid_g).to(tl.int64)
        te = ts + 1
    b = tl.load(tseq_ptr + ts)
    slot = tl.load(slots_ptr + b).to(tl.int64)

    tok = tl.arange(0, BLOCK_T)
    tt = ts + tok
    tmask = tt < te
    pos = tl.load(pos_ptr + tt, mask=tmask, other=-1)
    vis = (pos + 1) // ratio  # entries visible to each token (0 for padding lanes)
    vis_max = tl.max(vis, axis=0)

    # q of the whole group, all heads: rows = (token, head)
    rows = tl.arange(0, BLOCK_T * BLOCK_H)
    rtok = ts + rows // BLOCK_H
    rh = rows % BLOCK_H
    rmask = (rtok < te) & (rh < H)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + rtok[:, None] * s_qt + rh[:, None] * s_qh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    wts = tl.load(w_ptr + rtok * s_wt + rh, mask=rmask, other=0.0).to(tl.float32) * w_scale

    for i in range(TILES):
        w0 = (pid_n * TILES + i) * BLOCK_N
        offs_n = w0 + tl.arange(0, BLOCK_N)
        if w0 < vis_max:
            nmask = offs_n < vis_max
            page = tl.load(bt_ptr + slot * s_bt + offs_n // E, mask=nmask, other=0).to(tl.int64)
            ent = (offs_n % E).to(tl.int64)
            kmask = dmask[:, None] & nmask[None, :]
            if IS_FP8:
                is_n = offs_d < NOPE
                dn = tl.where(is_n, offs_d, 0)
                dr = tl.where(is_n, 0, offs_d - NOPE)
                byte = tl.load(k_ptr + page[None, :] * s_kp + ent[None, :] * s_ke + dn[:, None],
                               mask=kmask & is_n[:, None], other=0)
                sb = tl.load(ks_ptr + page[None, :] * s_sp + ent[None, :] * s_se + (dn // 64)[:, None],
                             mask=kmask & is_n[:, None], other=127)
                scale = (sb.to(tl.int32) << 23).to(tl.float32, bitcast=True)
                rv = tl.load(kr_ptr + page[None, :] * s_rp + ent[None, :] * s_re + dr[:, None],
                             mask=kmask & (offs_d >= NOPE)[:, None], other=0.0).to(tl.float32)
                kt = tl.where(is_n[:, None], fp8_decode(byte, FNUZ) * scale, rv)
            else:
                kt = tl.load(k_ptr + page[None, :] * s_kp + ent[None, :] * s_ke + offs_d[:, None],
                             mask=kmask, other=0.0)
            if DOT_F32:
                s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt.to(q.dtype))
            s = tl.maximum(s, 0.0) * wts[:, None]
            if BLOCK_T == 1:
                sc = tl.sum(s, axis=0)[None, :]
            else:
                sc = tl.sum(tl.reshape(s, [BLOCK_T, BLOCK_H, BLOCK_N]), axis=1)
            sc = tl.where(offs_n[None, :] < vis[:, None], sc, float("-inf"))
        else:
            sc = tl.full([BLOCK_T, BLOCK_N], float("-inf"), tl.float32)
        optr = out_ptr + (tt - t_base)[:, None] * s_out + offs_n[None, :]
        tl.store(optr, sc, mask=tmask[:, None] & (offs_n < n_out)[None, :])


def _npow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _key_parts(k_pool):
    """(tensor read by the kernel, scale, rope, strides, nope, is_fp8, fnuz, float dtype of the rows)."""
    if isinstance(k_pool, Fp8KV):
        nope = k_pool.nope.shape[-1]
        for t in (k_pool.nope, k_pool.scale, k_pool.rope):
            if t.stride(-1) != 1:
                raise ValueError("indexer_topk (triton): Fp8KV parts must have a unit last stride")
        return (k_pool.nope, k_pool.scale, k_pool.rope,
                (k_pool.nope.stride(0), k_pool.nope.stride(1), k_pool.scale.stride(0), k_pool.scale.stride(1),
                 k_pool.rope.stride(0), k_pool.rope.stride(1)),
                nope, True, k_pool.dialect.value == "fnuz", k_pool.rope.dtype)
    if k_pool.stride(-1) != 1:
        raise ValueError("indexer_topk (triton): k_pool must have a unit last stride")
    return (k_pool, k_pool, k_pool, (k_pool.stride(0), k_pool.stride(1), 0, 0, 0, 0), 0, False, False,
            k_pool.dtype)


def _groups(meta: ForwardMeta, c0: int, c1: int, bt: int, device):
    """Query groups of at most `bt` tokens of one sequence within tokens [c0, c1): (count from the host
    mirrors, group start / end token tensors computed on the device)."""
    qh = meta.query_start_host
    G = 0
    for b in range(meta.num_seqs):
        n = min(qh[b + 1], c1) - max(qh[b], c0)
        if n > 0:
            G += -(-n // bt)
    qs = meta.query_start
    lo = qs[:-1].clamp(c0, c1)
    hi = qs[1:].clamp(c0, c1)
    ng = (hi - lo + bt - 1) // bt
    off = torch.cumsum(ng, 0)
    gid = torch.arange(G, device=device, dtype=torch.int64)
    gb = torch.searchsorted(off, gid, right=True)
    gs = lo[gb] + (gid - (off[gb] - ng[gb])) * bt
    ge = torch.minimum(gs + bt, hi[gb])
    return G, gs, ge


def indexer_scores_triton(q, weights, k_pool, block_table, meta: ForwardMeta, ratio: int, c0: int, c1: int,
                          n_max: int, out: torch.Tensor | None = None, weights_scale: float = 1.0) -> torch.Tensor:
    """Scores of query tokens [c0, c1) against entries 0..n_max-1 ([c1 - c0, n_max] fp32, -inf where not
    visible), the head weights float32(weights) * weights_scale. Exposed for the GPU checks."""
    T, H, D = q.shape
    Tc = c1 - c0
    if out is None:
        out = torch.empty((Tc, n_max), dtype=torch.float32, device=q.device)
    if Tc == 0 or n_max == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if weights.stride(-1) != 1:
        weights = weights.contiguous()
    kt, ks, kr, (s_kp, s_ke, s_sp, s_se, s_rp, s_re), nope, is_fp8, fnuz, kdtype = _key_parts(k_pool)
    E = (k_pool.nope if is_fp8 else k_pool).shape[1]
    if q.dtype in (torch.bfloat16, torch.float16) and kdtype == q.dtype:
        dot_f32 = False
    else:
        dot_f32 = True
    BLOCK_H = max(16, _npow2(H))
    BLOCK_D = max(16, _npow2(D))
    max_per_seq = max(min(meta.query_start_host[b + 1], c1) - max(meta.query_start_host[b], c0)
                      for b in range(meta.num_seqs))
    grouped = max_per_seq > 1
    if grouped:
        bt = FORCE_BLOCK_T or max(2, min(8, 128 // BLOCK_H))
        G, gs, ge = _groups(meta, c0, c1, bt, q.device)
    else:
        bt, G, gs, ge = 1, Tc, meta.positions, meta.positions  # gs / ge unused
    # tiles sized so that the accumulator, the key tile and its gather addresses fit in registers at 8
    # warps (checked with ptxas for sm_90: no spills): wgmma bf16 128, FMA fp32 / FP8-decoding paths less
    if dot_f32:
        bn = 16 if bt * BLOCK_H > 64 else 32
    elif is_fp8:
        bn = 32
    else:
        bn = 128
    BLOCK_N = FORCE_BLOCK_N or min(bn, max(16, _npow2(n_max)))
    n_tiles = triton.cdiv(n_max, BLOCK_N)
    TILES = 1
    while TILES < 8 and TILES * 2 <= n_tiles and G * triton.cdiv(n_tiles, TILES * 2) >= 2048:
        TILES *= 2
    if FORCE_TILES:
        TILES = FORCE_TILES
    num_warps = 8 if bt * BLOCK_H >= 64 else 4
    grid = (G, triton.cdiv(n_tiles, TILES))
    _indexer_scores_kernel[grid](
        q, weights, kt, ks, kr, block_table, meta.positions, meta.token_seq, meta.seq_slots, gs, ge, out,
        c0, n_max, H, D, E, ratio, float(weights_scale),
        q.stride(0), q.stride(1), weights.stride(0), s_kp, s_ke, s_sp, s_se, s_rp, s_re,
        block_table.stride(0), out.stride(0),
        NOPE=nope, IS_FP8=is_fp8, FNUZ=fnuz, GROUPED=grouped, DOT_F32=dot_f32, BLOCK_T=bt, BLOCK_H=BLOCK_H,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, TILES=TILES, num_warps=num_warps,
    )
    return out


# Top-k of each row's visible scores (the n = vis[t] = (p + 1) // ratio first entries), grid (rows,): a program
# maps its row's fp32 scores to order-preserving uint32 keys and finds the k-th largest key by radix select, 8
# bits at a time from the top (4 passes: a 256-bin histogram of the digit among the keys that match the prefix
# found so far, then the bin where the count from the top reaches the number still wanted); a last pass writes
# every key above that threshold and the first (in entry order) of the keys equal to it, k in all, compacted by
# prefix sums. Rows with n <= k take entries 0..n-1. Every other column of the row's [topk] output is -1: the
# reference's set (ties broken by entry order where torch.topk breaks them its own way; the contract leaves the
# order within a row unspecified). Reads the row 5 times (L2: the scores kernel just wrote it); one launch where
# torch.topk, a fill, a where and a copy were.
@triton.jit
def _topk_key(s):
    b = s.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, b ^ 0xFFFFFFFF, b | 0x80000000)


@triton.jit
def _row_topk_kernel(s_ptr, s_rs, vis_ptr, out_ptr, s_or, t_base, n_max, topk, BLOCK: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    row = s_ptr + r.to(tl.int64) * s_rs
    orow = out_ptr + (r + t_base).to(tl.int64) * s_or
    n = tl.minimum(tl.load(vis_ptr + t_base + r).to(tl.int32), n_max)
    kk = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK)
    if n <= topk:
        for j0 in range(0, topk, BLOCK_K):
            j = j0 + kk
            tl.store(orow + j, tl.where(j < n, j, -1).to(tl.int64), mask=j < topk)
    else:
        prefix = tl.zeros([], dtype=tl.uint32)
        hi_mask = tl.zeros([], dtype=tl.uint32)
        want = tl.zeros([], dtype=tl.int32) + topk  # keys still to take at or below the prefix
        bins = tl.arange(0, 256)
        for d in tl.static_range(4):
            shift = 24 - 8 * d
            hist = tl.zeros([256], dtype=tl.int32)
            for c0 in range(0, n, BLOCK):
                c = c0 + cols
                m = c < n
                key = _topk_key(tl.load(row + c, mask=m, other=0.0))
                m = m & ((key & hi_mask) == prefix)
                hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=m)
            above = tl.cumsum(hist, axis=0, reverse=True)  # keys in this bin or a higher one
            b = tl.max(tl.where(above >= want, bins, -1), axis=0)
            want -= tl.sum(tl.where(bins == b, above - hist, 0), axis=0)  # those in higher bins are all taken
            prefix = prefix | (b.to(tl.uint32) << shift)
            hi_mask = hi_mask | (tl.full([], 255, tl.uint32) << shift)
        # prefix: the k-th largest key; take all keys above it and the first `want` equal to it
        n_gt = topk - want
        got_gt = tl.zeros([], dtype=tl.int32)
        got_eq = tl.zeros([], dtype=tl.int32)
        for c0 in range(0, n, BLOCK):
            c = c0 + cols
            m = c < n
            key = _topk_key(tl.load(row + c, mask=m, other=0.0))
            gt = m & (key > prefix)
            eq = m & (key == prefix)
            pos_gt = got_gt + tl.cumsum(gt.to(tl.int32), axis=0) - 1
            rank_eq = got_eq + tl.cumsum(eq.to(tl.int32), axis=0) - 1
            tl.store(orow + pos_gt, c.to(tl.int64), mask=gt)
            tl.store(orow + n_gt + rank_eq, c.to(tl.int64), mask=eq & (rank_eq < want))
            got_gt += tl.sum(gt.to(tl.int32), axis=0)
            got_eq += tl.sum(eq.to(tl.int32), axis=0)


#: The row top-k kernel (one launch) instead of torch.topk + where + copy; False: torch (A/B, fallback).
TOPK_KERNEL = True
TOPK_BLOCK = 1024


def indexer_topk_triton(q, weights, k_pool, block_table, meta: ForwardMeta, ratio: int, topk: int,
                        weights_scale: float = 1.0):
    T = q.shape[0]
    n_max = meta.max_seq_len // ratio if meta.num_seqs else 0
    own = TOPK_KERNEL and T > 0 and topk > 0 and n_max > 0
    out = (torch.empty((T, topk), dtype=torch.int64, device=q.device) if own
           else torch.full((T, topk), -1, dtype=torch.int64, device=q.device))
    if T == 0 or topk <= 0 or meta.num_seqs == 0 or n_max == 0:
        return out
    k = min(topk, n_max)
    vis = (meta.positions + 1) // ratio
    chunk = max(1, min(T, MAX_SCORE_BYTES // (4 * n_max)))
    buf = torch.empty((min(chunk, T), n_max), dtype=torch.float32, device=q.device)
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        s = indexer_scores_triton(q, weights, k_pool, block_table, meta, ratio, c0, c1, n_max, buf[: c1 - c0],
                                  weights_scale)
        if own:
            _row_topk_kernel[(c1 - c0,)](s, s.stride(0), vis, out, out.stride(0), c0, n_max, topk,
                                         BLOCK=TOPK_BLOCK, BLOCK_K=min(1024, triton.next_power_of_2(topk)),
                                         num_warps=4)
            continue
        idx = torch.topk(s, k, dim=1, sorted=False).indices
        out[c0:c1, :k] = torch.where(idx >= vis[c0:c1, None], torch.full_like(idx, -1), idx)
    return out


register(indexer_topk, indexer_topk_triton)
