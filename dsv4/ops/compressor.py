"""compress_kv: the KV compressor of CSA / HCA layers and of the lightning indexer (spec §2.5, §2.6).

Every `ratio` consecutive tokens (window w = tokens w*m .. w*m+m-1) pool into one compressed entry:
    entry_w = sum_j softmax_j(score_j + ape[j]) * kv_j      (softmax per channel over the slots)
HCA (no overlap, c = 1): the slots are the m tokens of window w.
CSA (overlap, c = 2): each token projects two series; dims [0:d] ("A") serve the NEXT window's entry,
dims [d:2d] ("B") the current one's. Entry w mixes the A-halves of window w-1 with the B-halves of
window w (2m slots; for w = 0 the A-slots are empty).
Then: cast to `act_dtype`, RMSNorm(norm_weight), RoPE on the trailing dims at position w*m, and the
optional quantisation simulation `post`: "fp8" (FP8 round trip of the non-rotary dims in 64-wide
blocks: the official main compressor) or "hadamard_fp4" (orthonormal Hadamard over all d dims, then an
FP4 round trip in 32-wide blocks: the official indexer); "none" otherwise. The entry is written to
`pool[block_table[slot, w // E], w % E]` (E = pool.shape[1] entries per page; pool is a KV store, see
kv_format.py: float rows or FP8).

State (per cache slot, float32, updated in place) is an online softmax, so it is small and the same
for any split of a prompt into chunks: `state[slot] = (running max, running sum of exp, running
exp-weighted sum of kv)` over the tokens seen so far of the open window ([S, 3, c*d]); for CSA,
`prev[slot]` ([S, 3, d]) keeps the A-series statistics of the last completed window. An empty
accumulator is (-inf, 0, 0); `reset_compressor_state` sets that.

Inputs: kv, score: [T, c*d] float32 (the wkv / wgate projections); ape: [m, c*d]; norm_weight: [d];
inv_freq: [r/2]; meta: ForwardMeta. Entries are emitted only for completed windows.
"""

import torch

from dsv4.numerics.fp4 import fp4_roundtrip
from dsv4.numerics.fp8 import Fp8Dialect, fp8_roundtrip
from dsv4.numerics.hadamard import hadamard_transform
from dsv4.ops.kv_format import kv_write
from dsv4.ops.meta import ForwardMeta
from dsv4.ops.norm import rms_norm_reference
from dsv4.ops.registry import define_op
from dsv4.ops.rope import apply_rope_reference

POSTPROCESS = ("none", "fp8", "hadamard_fp4")


def reset_compressor_state(state: torch.Tensor, prev: torch.Tensor | None, slots) -> None:
    """Empty accumulators (max -inf, sum 0, weighted sum 0) for the given slots."""
    for t in (state, prev):
        if t is None:
            continue
        t[slots, 0] = float("-inf")
        t[slots, 1:] = 0.0


def postprocess_entries(c: torch.Tensor, post: str, rope_dim: int, dialect) -> torch.Tensor:
    """The official quantisation simulation applied to finished (normed, roped) entries."""
    if post == "none":
        return c
    if post == "fp8":
        nope = c.shape[-1] - rope_dim
        out = c.clone()
        out[..., :nope] = fp8_roundtrip(c[..., :nope], 64, dialect)
        return out
    if post == "hadamard_fp4":
        return fp4_roundtrip(hadamard_transform(c), 32)
    raise ValueError(f"unknown compressor postprocess {post!r}; expected one of {POSTPROCESS}")


def pool_windows(z: torch.Tensor, v: torch.Tensor, local: torch.Tensor, nw: int, carry: torch.Tensor):
    """Online-softmax statistics (max, sum, weighted sum) per window of the rows (z, v), window of
    each row given by `local` (0..nw-1), window 0 merged with the carried accumulator `carry` [3, C]."""
    C = z.shape[1]
    idx = local[:, None].expand(-1, C)
    M = torch.full((nw, C), float("-inf"), device=z.device).scatter_reduce(0, idx, z, "amax")
    M[0] = torch.maximum(M[0], carry[0])
    e = torch.exp(z - M[local])
    L = torch.zeros((nw, C), device=z.device).index_add_(0, local, e)
    A = torch.zeros((nw, C), device=z.device).index_add_(0, local, e * v)
    f = torch.exp(carry[0] - M[0])
    L[0] += carry[1] * f
    A[0] += carry[2] * f
    return M, L, A


def compress_kv_reference(kv, score, ape, norm_weight, inv_freq, state, prev, pool, block_table,
                          meta: ForwardMeta, ratio: int, eps: float, act_dtype: torch.dtype,
                          post: str = "none", dialect=Fp8Dialect.OCP) -> None:
    m = ratio
    overlap = prev is not None
    d = pool.shape[-1]
    E = pool.shape[1]
    z_all = score.float() + ape.float()[meta.positions % m]
    v_all = kv.float()
    ents, seqs, wids = [], [], []
    for b in range(meta.num_seqs):
        t0, t1 = meta.seq_range(b)
        s = meta.seq_slots_host[b]
        p0, p1 = meta.seq_start_host[b], meta.seq_lens_host[b]
        w_first = p0 // m
        nw = (p1 - 1) // m - w_first + 1
        local = meta.positions[t0:t1] // m - w_first
        M, L, A = pool_windows(z_all[t0:t1], v_all[t0:t1], local, nw, state[s])
        nc = p1 // m - w_first  # windows completed by this step
        if nc > 0:
            if not overlap:
                pooled = A[:nc] / L[:nc]
            else:
                MA = torch.cat([prev[s, 0:1], M[:nc - 1, :d]])
                LA = torch.cat([prev[s, 1:2], L[:nc - 1, :d]])
                AA = torch.cat([prev[s, 2:3], A[:nc - 1, :d]])
                MB, LB, AB = M[:nc, d:], L[:nc, d:], A[:nc, d:]
                Mx = torch.maximum(MA, MB)
                fa, fb = torch.exp(MA - Mx), torch.exp(MB - Mx)
                pooled = (AA * fa + AB * fb) / (LA * fa + LB * fb)
                prev[s] = torch.stack([M[nc - 1, :d], L[nc - 1, :d], A[nc - 1, :d]])
            ents.append(pooled)
            seqs.append(torch.full((nc,), s, dtype=torch.int64, device=kv.device))
            wids.append(torch.arange(w_first, w_first + nc, device=kv.device))
        if p1 % m:
            state[s] = torch.stack([M[-1], L[-1], A[-1]])
        else:
            reset_compressor_state(state, None, s)
    if not ents:
        return
    c = torch.cat(ents).to(act_dtype)
    slots, w = torch.cat(seqs), torch.cat(wids)
    c = rms_norm_reference(c, norm_weight, eps)
    c = apply_rope_reference(c, w * m, inv_freq)
    c = postprocess_entries(c, post, 2 * inv_freq.numel(), dialect)
    kv_write(pool, (block_table[slots, w // E], w % E), c)


compress_kv = define_op("compress_kv", compress_kv_reference)
