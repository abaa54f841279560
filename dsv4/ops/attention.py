"""sparse_attention: DeepSeek-V4 attention of one layer over window + compressed entries (spec §2.3, §2.7).

For the query of head h at position p, one softmax runs over
  - the sliding window: the shared K=V vectors of positions max(0, p-W+1) .. p (this step's tokens come
    from `kv`, earlier ones from the ring `window[slot, pos % W]`, which must still hold them: the
    caller writes the ring after attention);
  - compressed entries (pool rows of the sequence's slot): for CSA the indices in `topk_idx[t]`
    (-1 = empty), for HCA (topk_idx None) every entry w with (w + 1) * ratio <= p + 1;
  - the learned sink z_h, which joins the denominator only: a_i = exp(l_i) / (sum exp(l) + exp(z_h)).
logits l_i = scale * (q_h . k_i); values are the keys (K = V, all D dims). Float32 scores and
accumulation; the output [T, H, D] is in q's dtype. Window and compressed entries are not de-duplicated.

q: [T, H, D]; kv: [T, D]; window: [S, W, D]; sink: [H] float32; pool: [P, E, D] or None (sliding-window
layer); block_table: [S, max_pages]; topk_idx: [T, K] int64 or None. `window` and `pool` are KV stores
(kv_format.py: float rows, or FP8 non-rotary dims + float rotary dims, dequantised on read).
`inv_rope` (inv_freq [r/2] or None): the output then leaves de-rotated, apply_rope(out, positions, inv_rope,
inverse=True) (the layer's next op; a provider may do it while writing the output).
"""

import torch

from dsv4.ops.indexer import gather_entries
from dsv4.ops.kv_format import kv_read, kv_write
from dsv4.ops.meta import ForwardMeta
from dsv4.ops.registry import define_op
from dsv4.ops.rope import apply_rope_reference

_QUERY_BLOCK = 256  # bounds the reference's memory on long prefills


def sparse_attention_reference(q, kv, window, sink, scale: float, meta: ForwardMeta, pool=None, block_table=None,
                               topk_idx=None, ratio: int = 0, inv_rope=None):
    T, H, D = q.shape
    W = window.shape[1]
    out = torch.empty_like(q)
    sink = sink.float()
    for b in range(meta.num_seqs):
        t0, t1 = meta.seq_range(b)
        s = meta.seq_slots_host[b]
        p0 = meta.seq_start_host[b]
        lo = max(0, p0 - (W - 1))
        ring_pos = torch.arange(lo, p0, device=q.device)
        keys = torch.cat([kv_read(window, (s, ring_pos % W)).float(), kv[t0:t1].float()])  # positions lo .. p1-1
        kpos = torch.arange(lo, meta.seq_lens_host[b], device=q.device)
        hca = None
        if pool is not None and topk_idx is None:
            n_max = meta.seq_lens_host[b] // ratio
            hca = gather_entries(pool, block_table, s, n_max).float()
        for c0 in range(t0, t1, _QUERY_BLOCK):
            c1 = min(t1, c0 + _QUERY_BLOCK)
            qb = q[c0:c1].float()
            qpos = meta.positions[c0:c1]
            band = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - W)
            lw = torch.einsum("thd,kd->thk", qb, keys) * scale
            lw = lw.masked_fill(~band[:, None, :], float("-inf"))
            parts, vals = [lw], [None]
            if topk_idx is not None:
                idx = topk_idx[c0:c1]
                valid = idx >= 0
                E = pool.shape[1]
                safe = idx.clamp(min=0)
                ents = kv_read(pool, (block_table[s, safe // E], safe % E)).float()  # [t, K, D]
                lc = torch.einsum("thd,tkd->thk", qb, ents) * scale
                parts.append(lc.masked_fill(~valid[:, None, :], float("-inf")))
                vals.append(ents)
            elif hca is not None:
                vis = torch.arange(hca.shape[0], device=q.device)[None, :] < ((qpos + 1) // ratio)[:, None]
                lc = torch.einsum("thd,kd->thk", qb, hca) * scale
                parts.append(lc.masked_fill(~vis[:, None, :], float("-inf")))
                vals.append(hca)
            logits = torch.cat(parts + [sink.view(1, H, 1).expand(c1 - c0, H, 1)], dim=-1)
            p = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)
            nw = lw.shape[-1]
            o = torch.einsum("thk,kd->thd", p[..., :nw], keys)
            if topk_idx is not None:
                o = o + torch.einsum("thk,tkd->thd", p[..., nw:-1], vals[1])
            elif hca is not None:
                o = o + torch.einsum("thk,kd->thd", p[..., nw:-1], hca)
            out[c0:c1] = o.to(q.dtype)
    return out if inv_rope is None else apply_rope_reference(out, meta.positions, inv_rope, inverse=True)


def write_window(window: torch.Tensor, kv: torch.Tensor, meta: ForwardMeta) -> None:
    """Store this step's K=V vectors in the ring (slot position % W), the last W tokens of each sequence."""
    W = window.shape[1]
    for b in range(meta.num_seqs):
        t0, t1 = meta.seq_range(b)
        t0 = max(t0, t1 - W)
        kv_write(window, (meta.seq_slots_host[b], meta.positions[t0:t1] % W), kv[t0:t1])


sparse_attention = define_op("sparse_attention", sparse_attention_reference)
write_window_op = define_op("write_window", write_window)
