"""indexer_topk: the lightning indexer's selection of compressed entries for each query (spec §2.6).

score(t, w) = sum_h weights[t, h] * ReLU(q[t, h] . k_w)   for the cached indexer keys k_w
Entry w is visible to the query at position p iff (w + 1) * ratio <= p + 1. Each query selects its
`topk` highest-scoring visible entries; the result [T, topk] (int64) holds entry indices, with -1 in
the places left empty (fewer than topk visible entries). The order within a row is unspecified.

q: [T, H, d] (RoPE'd, after any Hadamard/FP4 simulation); weights: [T, H], used as float32(weights) *
weights_scale (the model passes the head projection's output and d^-1/2 * H^-1/2: a provider applies the scale
as it reads them, one fp32 product each); k_pool: [P, E, d] with entry w of slot s at
k_pool[block_table[s, w // E], w % E].
Scores are computed in float32.
"""

import torch

from dsv4.ops.kv_format import kv_read
from dsv4.ops.meta import ForwardMeta
from dsv4.ops.registry import define_op


def gather_entries(pool: torch.Tensor, block_table: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    """Entries 0..n-1 of one slot as a [n, d] tensor."""
    E = pool.shape[1]
    w = torch.arange(n, device=pool.device)
    return kv_read(pool, (block_table[slot, w // E], w % E))


def indexer_topk_reference(q, weights, k_pool, block_table, meta: ForwardMeta, ratio: int, topk: int,
                           weights_scale: float = 1.0):
    T = q.shape[0]
    weights = weights.float() * weights_scale
    out = torch.full((T, topk), -1, dtype=torch.int64, device=q.device)
    for b in range(meta.num_seqs):
        t0, t1 = meta.seq_range(b)
        n = meta.seq_lens_host[b] // ratio
        if n == 0:
            continue
        keys = gather_entries(k_pool, block_table, meta.seq_slots_host[b], n).float()
        s = torch.einsum("thd,nd->thn", q[t0:t1].float(), keys).relu()
        s = (s * weights[t0:t1].float().unsqueeze(-1)).sum(dim=1)  # [t, n]
        visible = (meta.positions[t0:t1] + 1) // ratio  # [t]
        future = torch.arange(n, device=q.device)[None, :] >= visible[:, None]
        s = s.masked_fill(future, float("-inf"))
        k = min(topk, n)
        idx = s.topk(k, dim=-1).indices
        idx = torch.where(idx >= visible[:, None], torch.full_like(idx, -1), idx)
        out[t0:t1, :k] = idx
    return out


indexer_topk = define_op("indexer_topk", indexer_topk_reference)
