"""Triton router (dsv4/ops/moe.py `moe_route`): sqrt-softplus / sigmoid / softmax scores from IEEE fp32
logits, bias-corrected top-k (the bias only steers the choice) or hash routing through tid2eid, the
selected unbiased scores normalised and scaled. Two kernels: split-K logits, then one fused select (one kernel for
a few tokens: the last logits program selects).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import (interpreting, load_parts, pdl_args, pdl_start, register, sm_count,
                                        tile_counters)
from dsv4.ops.moe import moe_route as moe_route_op

_SCORE = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}
SELECT_CHUNK = 4096  # partial logits the select kernel loads at once per token (decode: 16 of 256 experts)
LAST_SELECT_T = 0  # up to this many tokens, the last logits program selects (one launch); 0: two kernels (measured
# default, docs/perf.md 2026-12-07 (c))


# Logits: grid = (cdiv(T, BT) * cdiv(E, BE), S). Program (tile, s) computes x[t-tile] . W_g[e-tile]^T over
# its share of D in IEEE fp32 (the reference is an fp32 matmul) and stores the partial to ws[s]. Decode
# (T small) splits D so that ~2 programs per SM stream the 4 MB gate weight (the HBM floor); prefill uses
# S = 1 (FMA-bound fp32: 2 T E D FLOPs).
@triton.jit
def _router_logits_kernel(x_ptr, w_ptr, p_ptr, T, E, D, s_x, s_w, n_e_tiles, KT_PER,
                          BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, NATIVE: tl.constexpr = False,
                          PDL: tl.constexpr = False):
    pdl_start(PDL)
    _logits_part(x_ptr, w_ptr, p_ptr, tl.program_id(0), tl.program_id(1), T, E, D, s_x, s_w, n_e_tiles, KT_PER,
                 BT, BE, BK, NATIVE)


@triton.jit
def _logits_part(x_ptr, w_ptr, p_ptr, pid, s, T, E, D, s_x, s_w, n_e_tiles, KT_PER,
                 BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, NATIVE: tl.constexpr):
    """Program (pid, s) of the logits: its tile's partial dot over its share of D, stored to the workspace.
    NATIVE (x and the gate weight both bf16): the bf16 dot, whose products are exact in its float32 accumulator
    (the same products as the fp32 matmul of the upcast operands, on tensor cores); else IEEE fp32."""
    t = (pid // n_e_tiles) * BT + tl.arange(0, BT)
    e = (pid % n_e_tiles) * BE + tl.arange(0, BE)
    t_ok = t < T
    e_ok = e < E
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    kt0 = s * KT_PER
    kt1 = tl.minimum(kt0 + KT_PER, tl.cdiv(D, BK))
    for kt in range(kt0, kt1):
        kk = kt * BK + tl.arange(0, BK)
        k_ok = kk < D
        a = tl.load(x_ptr + t.to(tl.int64)[:, None] * s_x + kk[None, :], mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + e.to(tl.int64)[None, :] * s_w + kk[:, None], mask=k_ok[:, None] & e_ok[None, :],
                    other=0.0)
        if NATIVE:
            acc = tl.dot(a, w, acc=acc)
        else:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc=acc, input_precision="ieee")
    tl.store(p_ptr + s.to(tl.int64) * T * E + t.to(tl.int64)[:, None] * E + e[None, :], acc,
             mask=t_ok[:, None] & e_ok[None, :])


@triton.jit
def _log1p(y):
    """log(1 + y) for y in [0, 1], accurate for tiny y (u - 1 is exact, so log(u) y / (u - 1) corrects it)."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


# Selection: grid = cdiv(T, BT). Sums the S partials (SB at a time: one [BT, SB, EP] load per chunk, so a
# decode step's 32-64 partials cost a few L2 round trips, not S dependent ones), scores (fp32), then either
# the hash row tid2eid[input_ids[t]] or top-k of scores + bias by k rounds of argmax (ties to the lower id),
# gathers the unbiased scores, normalises over the k chosen and scales. [BT, EP] in registers; tiny.
@triton.jit
def _router_select_kernel(p_ptr, S, s_ps, bias_ptr, tid_ptr, inid_ptr, w_out, i_out, T, E, s_tid, scaling,
                          KTOP: tl.constexpr, KP: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HASH: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr,
                          SB: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    _select_rows(tl.program_id(0) * BT, p_ptr, S, s_ps, bias_ptr, tid_ptr, inid_ptr, w_out, i_out, T, E, s_tid,
                 scaling, KTOP, KP, SCORE, HAS_BIAS, HASH, NORM, BT, EP, SB, False)


# Logits + select in one launch (a few tokens, LAST_SELECT_T): the logits programs as above, then the last of
# them to count itself done (tile_counters, acq_rel; one counter for the launch) selects for every token, one at
# a time, reading the partials with .cg loads: the select kernel's arithmetic and order (bit-equal).
@triton.jit
def _router_logits_select_kernel(x_ptr, w_ptr, p_ptr, cnt_ptr, T, E, D, s_x, s_w, n_e_tiles, KT_PER, S, s_ps,
                                 bias_ptr, tid_ptr, inid_ptr, w_out, i_out, s_tid, scaling,
                                 BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, NATIVE: tl.constexpr,
                                 KTOP: tl.constexpr, KP: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 HASH: tl.constexpr, NORM: tl.constexpr, EP: tl.constexpr, SB: tl.constexpr,
                                 PDL: tl.constexpr = False):
    pdl_start(PDL)
    _logits_part(x_ptr, w_ptr, p_ptr, tl.program_id(0), tl.program_id(1), T, E, D, s_x, s_w, n_e_tiles, KT_PER,
                 BT, BE, BK, NATIVE)
    tl.debug_barrier()  # every thread's partial is stored before the program counts itself done
    done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if done == tl.num_programs(0) * tl.num_programs(1) - 1:
        for t0 in range(0, T):
            _select_rows(t0, p_ptr, S, s_ps, bias_ptr, tid_ptr, inid_ptr, w_out, i_out, T, E, s_tid, scaling,
                         KTOP, KP, SCORE, HAS_BIAS, HASH, NORM, 1, EP, SB, True)
        tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _select_rows(t0, p_ptr, S, s_ps, bias_ptr, tid_ptr, inid_ptr, w_out, i_out, T, E, s_tid, scaling,
                 KTOP: tl.constexpr, KP: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HASH: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr, SB: tl.constexpr,
                 CG: tl.constexpr):
    """The selection of tokens t0 .. t0 + BT - 1 (CG: partials written in this launch, read with .cg loads)."""
    t = t0 + tl.arange(0, BT)
    e = tl.arange(0, EP)
    t_ok = t < T
    e_ok = e < E
    m2 = t_ok[:, None] & e_ok[None, :]
    lg = tl.zeros((BT, EP), dtype=tl.float32)
    sb = tl.arange(0, SB)
    rows = t.to(tl.int64)[:, None, None] * E + e[None, None, :]
    for s0 in range(0, S, SB):
        sv = s0 + sb
        ptr = p_ptr + sv.to(tl.int64)[None, :, None] * s_ps + rows
        lg += tl.sum(load_parts(ptr, m2[:, None, :] & (sv < S)[None, :, None], CG), axis=1)
    if SCORE == 0:  # sqrt(softplus), softplus as torch: x beyond 20 is kept
        sp = tl.where(lg > 20.0, lg, tl.maximum(lg, 0.0) + _log1p(tl.exp(-tl.abs(lg))))
        sc = tl.sqrt_rn(sp)
    elif SCORE == 1:
        sc = tl.sigmoid(lg)
    else:
        lgm = tl.where(e_ok[None, :], lg, float("-inf"))
        ex = tl.exp(lgm - tl.max(lgm, axis=1)[:, None])
        sc = ex / tl.sum(ex, axis=1)[:, None]
    sc = tl.where(e_ok[None, :], sc, 0.0)
    col = tl.arange(0, KP)
    wt = tl.zeros((BT, KP), dtype=tl.float32)
    it = tl.zeros((BT, KP), dtype=tl.int64)
    if HASH:
        tok = tl.load(inid_ptr + t, mask=t_ok, other=0).to(tl.int64)
        for j in tl.static_range(KTOP):
            idj = tl.load(tid_ptr + tok * s_tid + j, mask=t_ok, other=0).to(tl.int64)
            wj = tl.sum(tl.where(e[None, :] == idj[:, None], sc, 0.0), axis=1)
            wt = tl.where(col[None, :] == j, wj[:, None], wt)
            it = tl.where(col[None, :] == j, idj[:, None], it)
    else:
        sel = sc
        if HAS_BIAS:
            sel = sel + tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
        sel = tl.where(e_ok[None, :], sel, float("-inf"))
        for j in tl.static_range(KTOP):
            m = tl.argmax(sel, axis=1, tie_break_left=True)
            hit = e[None, :] == m[:, None]
            wj = tl.sum(tl.where(hit, sc, 0.0), axis=1)
            wt = tl.where(col[None, :] == j, wj[:, None], wt)
            it = tl.where(col[None, :] == j, m.to(tl.int64)[:, None], it)
            sel = tl.where(hit, float("-inf"), sel)
    if NORM:
        wt = wt / tl.sum(wt, axis=1)[:, None]
    wt = wt * scaling
    om = t_ok[:, None] & (col < KTOP)[None, :]
    off = t.to(tl.int64)[:, None] * KTOP + col[None, :]
    tl.store(w_out + off, wt, mask=om)
    tl.store(i_out + off, it, mask=om)


# ============================================================================= host side: router


def moe_route_triton(x, gate_weight, bias, tid2eid, input_ids, top_k: int, score_func: str, norm_topk_prob: bool,
                     scaling: float):
    if score_func not in _SCORE:
        raise ValueError(f"unknown scoring_func {score_func!r}")
    if x.dim() != 2 or gate_weight.dim() != 2 or gate_weight.shape[1] != x.shape[1]:
        raise ValueError(f"moe_route: x {tuple(x.shape)} and gate weight {tuple(gate_weight.shape)} do not match")
    T, D = x.shape
    E = gate_weight.shape[0]
    hashed = tid2eid is not None
    k = int(tid2eid.shape[1]) if hashed else int(top_k)
    if not hashed and k > E:
        raise ValueError(f"moe_route: top_k {k} > {E} experts")
    dev = x.device
    w_out = torch.empty((T, k), dtype=torch.float32, device=dev)
    i_out = torch.empty((T, k), dtype=torch.int64, device=dev)
    if T == 0 or k == 0:
        return w_out, i_out
    if x.stride(1) != 1:
        x = x.contiguous()
    gw = gate_weight if gate_weight.stride(1) == 1 else gate_weight.contiguous()
    # logits (split over D when there are few tiles, so the gate weight streams at the HBM rate)
    bt = 16 if T <= 16 else (32 if T <= 64 else 64)
    be = min(64, max(16, triton.next_power_of_2(E)))
    bk = min(64, max(16, triton.next_power_of_2(D)))
    n_e = triton.cdiv(E, be)
    tiles = triton.cdiv(T, bt) * n_e
    nkt = triton.cdiv(D, bk)
    split = min(nkt, max(1, triton.cdiv(2 * (sm_count(dev) or 132), tiles)))
    kt_per = triton.cdiv(nkt, split)
    split = triton.cdiv(nkt, kt_per)
    part = torch.empty((split, T, E), dtype=torch.float32, device=dev)
    ep = max(16, triton.next_power_of_2(E))
    if split > 1:  # decode: one token per program, its partials summed SB at a time
        bt2 = 1
        sb = min(triton.next_power_of_2(split), max(1, SELECT_CHUNK // ep))
    else:
        bt2 = max(1, min(16, 4096 // ep))
        sb = 1
    if hashed:
        tid = tid2eid if tid2eid.stride(1) == 1 else tid2eid.contiguous()
        inid = input_ids.reshape(-1)
        s_tid = tid.stride(0)
    else:
        tid, inid, s_tid = i_out, i_out, 0
    b_arg = bias if bias is not None else w_out
    sel = dict(KTOP=k, KP=max(2, triton.next_power_of_2(k)), SCORE=_SCORE[score_func],
               HAS_BIAS=bias is not None and not hashed, HASH=hashed, NORM=bool(norm_topk_prob), EP=ep, SB=sb,
               **pdl_args(dev))
    # both bf16 (a release's gate weight, compacted): the bf16 dot; not in the interpreter, whose bf16 tl.dot is
    # garbage (design.md §6): there the IEEE fp32 dot of the same values
    native = x.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16 and not interpreting(dev)
    cnt = tile_counters(dev) if T <= LAST_SELECT_T else None
    if cnt is not None:  # one launch: the last logits program selects
        _router_logits_select_kernel[(tiles, split)](
            x, gw, part, cnt, T, E, D, x.stride(0), gw.stride(0), n_e, kt_per, split, part.stride(0), b_arg, tid,
            inid, w_out, i_out, s_tid, float(scaling), BT=bt, BE=be, BK=bk, NATIVE=native, **sel, num_warps=4,
            num_stages=3)
        return w_out, i_out
    _router_logits_kernel[(tiles, split)](x, gw, part, T, E, D, x.stride(0), gw.stride(0), n_e, kt_per,
                                          BT=bt, BE=be, BK=bk, NATIVE=native, **pdl_args(dev), num_warps=4,
                                          num_stages=3)
    _router_select_kernel[(triton.cdiv(T, bt2),)](part, split, part.stride(0), b_arg, tid, inid, w_out, i_out, T, E,
                                                  s_tid, float(scaling), BT=bt2, **sel, num_warps=4)
    return w_out, i_out


register(moe_route_op, moe_route_triton)
