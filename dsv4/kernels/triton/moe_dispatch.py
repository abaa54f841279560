"""Triton dispatch of (token, slot) pairs to their experts: the layout of dsv4/ops/moe_dispatch.py built on
the device with no host sync (graph-capturable; sizes from T, k, num_local and block_m).

Few pairs (N <= SMALL_N: decode of a few tokens): ONE program, `_dispatch_small_kernel`, does it all in registers
(ranks by comparing each pair with the earlier ones, counts by a one-hot sum over the experts, block starts by a
cumsum), in ascending pair order within an expert (the reference's order), writing every counter and flag itself
(no memset): one launch where the general path takes three.

More pairs: three launches:

Zero the per-expert counters and flags (one memset), then `_dispatch_count_kernel` (fill the padded slot list with the
pad value, map global ids to local through the ExpertMap table, rank each pair inside its expert with an
atomic counter) and `_dispatch_place_kernel` (per-expert block starts by a cumsum over the counters,
recomputed by every program; scatter each pair to start * block_m + rank; write block_expert, the valid
block count and the ids-in-range flag the consumers' device-side assert reads). The order inside an expert is whatever the atomics give: consumers must not depend on it.
Used by the Triton MoE (moe.py) and the humming provider (dsv4/kernels/vendor/humming_moe.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.ops.moe_dispatch import ExpertMap, dispatch_sizes


# Grid = cdiv(max(N, max_rows), CH). Each program fills CH entries of the padded slot list with PAD and,
# for its CH pairs p < N, maps the global id through the ExpertMap table and takes a rank in its expert
# from an atomic counter (remote / out-of-range pairs take none; out-of-range ids are counted in
# counts[num_local] for the device-side assert). Reads 8 B and writes ~8 B per pair: negligible.
@triton.jit
def _dispatch_count_kernel(ids_ptr, g2l_ptr, counts_ptr, rank_ptr, slots_ptr, N, E_glob, E_loc, max_rows, PAD,
                           CH: tl.constexpr):
    i = tl.program_id(0) * CH + tl.arange(0, CH)
    tl.store(slots_ptr + i, tl.full((CH,), 0, tl.int32) + PAD, mask=i < max_rows)
    in_n = i < N
    gid = tl.load(ids_ptr + i, mask=in_n, other=0).to(tl.int64)
    inr = (gid >= 0) & (gid < E_glob)
    loc = tl.load(g2l_ptr + tl.where(inr, gid, 0), mask=in_n & inr, other=-1)
    valid = in_n & (loc >= 0)
    r = tl.atomic_add(counts_ptr + tl.where(valid, loc, 0), tl.full((CH,), 1, tl.int32), mask=valid,
                      sem="relaxed")
    tl.store(rank_ptr + i, r, mask=valid)
    nbad = tl.sum((in_n & ~inr).to(tl.int32), axis=0)
    if nbad > 0:
        tl.atomic_add(counts_ptr + E_loc, nbad, sem="relaxed")


# Grid = cdiv(max(N, max_blocks), CH). Every program recomputes the per-expert block starts from the
# counters ([EP] cumsum: cheaper than another launch), scatters its pairs to start * BM + rank, and writes
# block_expert for its CH blocks (expert of block b = number of experts whose blocks end at or before b).
@triton.jit
def _dispatch_place_kernel(ids_ptr, g2l_ptr, counts_ptr, rank_ptr, slots_ptr, bexp_ptr, nvb_ptr, ok_ptr, rows_ptr, N, E_glob,
                           E_loc, max_blocks, BM, CH: tl.constexpr, EP: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.arange(0, EP)
    e_ok = e < E_loc
    cnt = tl.load(counts_ptr + e, mask=e_ok, other=0)
    nblk = (cnt + BM - 1) // BM
    bend = tl.cumsum(nblk, axis=0)
    bstart = bend - nblk
    total = tl.sum(nblk, axis=0)

    i = pid * CH + tl.arange(0, CH)
    in_n = i < N
    gid = tl.load(ids_ptr + i, mask=in_n, other=0).to(tl.int64)
    inr = (gid >= 0) & (gid < E_glob)
    loc = tl.load(g2l_ptr + tl.where(inr, gid, 0), mask=in_n & inr, other=-1)
    valid = in_n & (loc >= 0)
    r = tl.load(rank_ptr + i, mask=valid, other=0)
    bs = tl.sum(tl.where(loc[:, None] == e[None, :], bstart[None, :], 0), axis=1)
    dest = bs * BM + r
    tl.store(slots_ptr + tl.where(valid, dest, 0), i, mask=valid)

    b = pid * CH + tl.arange(0, CH)
    eb = tl.sum(((bend[None, :] <= b[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
    tl.store(bexp_ptr + b, tl.where(b < total, eb, -1), mask=b < max_blocks)
    if pid == 0:
        tl.store(nvb_ptr, total)
        tl.store(ok_ptr, (tl.load(counts_ptr + E_loc) == 0).to(tl.int32))
        tl.store(rows_ptr, total * BM)


# One program (N <= SMALL_N pairs, NP = next_pow2(N) lanes; EP = next_pow2(num_local) expert lanes; a [NP, NP]
# and an [NP, EP] comparison in registers). The pad fill and the scatter write the same slots from different
# threads: the barrier between them orders the two (CTA-wide memory ordering of global stores).
@triton.jit
def _dispatch_small_kernel(ids_ptr, g2l_ptr, flags_ptr, slots_ptr, bexp_ptr, N, E_glob, E_loc, max_rows, max_blocks,
                           BM, PAD, NP: tl.constexpr, EP: tl.constexpr, RB: tl.constexpr, BB: tl.constexpr):
    i = tl.arange(0, NP)
    in_n = i < N
    gid = tl.load(ids_ptr + i, mask=in_n, other=0).to(tl.int64)
    inr = (gid >= 0) & (gid < E_glob)
    loc = tl.load(g2l_ptr + tl.where(inr, gid, 0), mask=in_n & inr, other=-1)
    valid = in_n & (loc >= 0)
    earlier = (loc[:, None] == loc[None, :]) & valid[None, :] & (i[None, :] < i[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    e = tl.arange(0, EP)
    e_ok = e < E_loc
    onehot = (loc[:, None] == e[None, :]) & valid[:, None]
    cnt = tl.sum(onehot.to(tl.int32), axis=0)
    nblk = (cnt + BM - 1) // BM
    bend = tl.cumsum(nblk, axis=0)
    bstart = bend - nblk
    total = tl.sum(nblk, axis=0)
    dest = tl.sum(tl.where(onehot, bstart[None, :], 0), axis=1) * BM + rank
    for r0 in range(0, max_rows, RB):
        r = r0 + tl.arange(0, RB)
        tl.store(slots_ptr + r, tl.full((RB,), 0, tl.int32) + PAD, mask=r < max_rows)
    tl.debug_barrier()
    tl.store(slots_ptr + tl.where(valid, dest, 0), i, mask=valid)
    for b0 in range(0, max_blocks, BB):  # BB x EP comparisons per step
        b = b0 + tl.arange(0, BB)
        eb = tl.sum(((bend[None, :] <= b[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
        tl.store(bexp_ptr + b, tl.where(b < total, eb, -1), mask=b < max_blocks)
    nbad = tl.sum((in_n & ~inr).to(tl.int32), axis=0)
    tl.store(flags_ptr + e, cnt, mask=e_ok)  # counts | out-of-range ids | valid blocks | ids ok | used rows
    tl.store(flags_ptr + E_loc, nbad)
    tl.store(flags_ptr + E_loc + 1, total)
    tl.store(flags_ptr + E_loc + 2, (nbad == 0).to(tl.int32))
    tl.store(flags_ptr + E_loc + 3, total * BM)


SMALL_N = 0  # pairs up to which the one-program dispatch runs (64: ~10 decode tokens at k = 6); 0: off, the measured
# default (docs/perf.md 2026-12-07 (c))


def moe_dispatch_triton(ids: torch.Tensor, expert_map: ExpertMap, block_m: int, pad: int = -1):
    """The dispatch layout of dsv4/ops/moe_dispatch.py on the device (one launch for few pairs, else three; no
    host sync): (sorted_token_slots [max_rows] int32, block_expert [max_blocks] int32, num_valid_blocks int32
    scalar, counts [num_local + 1] int32: pairs per local expert, then the number of out-of-range ids, ids_ok [1]
    int32: 1 when that number is 0, for `torch._assert_async` without another launch, used_rows [1] int32:
    num_valid_blocks * block_m, humming's num_tokens_padded, without another launch). Padding and
    unused slots hold `pad`: -1 as the layout defines, or any value outside 0..N-1 a consumer asks for
    (humming's indexed GEMM skips slots >= N, not -1)."""
    T, k = ids.shape
    N = T * k
    dev = ids.device
    E_loc = expert_map.num_local
    mb, mr = dispatch_sizes(N, E_loc, block_m)
    g2l = expert_map.global_to_local(dev)
    ids_c = ids.contiguous()
    small = 0 < N <= SMALL_N
    # counts | valid blocks | ids ok | used rows (the small kernel writes them all; otherwise one memset)
    flags = (torch.empty if small else torch.zeros)(E_loc + 4, dtype=torch.int32, device=dev)
    counts, nvb, ok, rows = (flags[:E_loc + 1], flags[E_loc + 1:E_loc + 2], flags[E_loc + 2:E_loc + 3],
                             flags[E_loc + 3:])
    slots = torch.empty(max(mr, 1), dtype=torch.int32, device=dev)[:mr]
    bexp = torch.empty(max(mb, 1), dtype=torch.int32, device=dev)[:mb]
    if N == 0:
        ok.fill_(1)
        return slots, bexp, nvb[0], counts, ok, rows
    ep = max(16, triton.next_power_of_2(E_loc))
    if small:
        _dispatch_small_kernel[(1,)](ids_c, g2l, flags, slots, bexp, N, expert_map.num_global, E_loc, mr, mb,
                                     block_m, int(pad), NP=max(16, triton.next_power_of_2(N)), EP=ep, RB=256,
                                     BB=32, num_warps=4)
        return slots, bexp, nvb[0], counts, ok, rows
    rank = torch.empty(max(N, 1), dtype=torch.int32, device=dev)
    ch = 64
    _dispatch_count_kernel[(triton.cdiv(max(N, mr), ch),)](ids_c, g2l, counts, rank, slots, N, expert_map.num_global,
                                                          E_loc, mr, int(pad), CH=ch, num_warps=2)
    _dispatch_place_kernel[(triton.cdiv(max(N, mb), ch),)](ids_c, g2l, counts, rank, slots, bexp, nvb, ok, rows, N,
                                                          expert_map.num_global, E_loc, mb, block_m, CH=ch, EP=ep,
                                                          num_warps=4)
    return slots, bexp, nvb[0], counts, ok, rows
