"""The MTP block (spec §6): Transformer.mtp_forward / mtp_logits against a plain-PyTorch reference written
from the spec's equations (tiny model, fp32, plain numerics), run as one chunk, token by token and in uneven
chunks past the 128-token window (its ring wraps), several sequences in one step, the MTP ring apart from
the layers' caches, and the cache layout's count of the MTP ring."""

from __future__ import annotations

import pytest
import torch

from dsv4.cache.direct import DirectCache
from dsv4.cache.model_cache import CacheLayout, ModelCache
from dsv4.ops.kv_format import Fp8KV
from dsv4.ops.linear import dequantize_weight

S = 200  # > sliding_window (128): the MTP ring wraps
CHUNKS = (3, 1, 5, 64, 2, 90, 1, 34)
MAX_LEN = 256
TOL = dict(rtol=1e-5, atol=1e-5)


def _parts(store):
    return [store.nope, store.scale, store.rope] if isinstance(store, Fp8KV) else [store]


def main_streams(lm, ids, chunks=(S,)):
    """The main model's streams over `ids` (a fresh cache), run in `chunks`."""
    dc = DirectCache(lm.cfg, 1, MAX_LEN, "cpu", torch.float32)
    s, out, p = dc.add(), [], 0
    for c in chunks:
        out.append(lm.model(ids[p:p + c], dc.meta([s], [p], [c]), dc.cache))
        p += c
    return torch.cat(out)


def reference_logits(lm, H, nxt):
    """Spec §6 steps 1-4 for one whole sequence from position 0, in plain torch; the MTP block itself (step 3,
    the §2 block math tested elsewhere) runs as one prefill chunk on its own fresh ring."""
    m, c = lm.model, lm.cfg
    blk = m.mtp[0]
    eps = c.rms_norm_eps

    def rms(x, w):
        x = x.float()
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w.float()

    We = dequantize_weight(blk.e_proj.weight, blk.e_proj.scale)
    Wh = dequantize_weight(blk.h_proj.weight, blk.h_proj.scale)
    e_hat = rms(m.embed.weight[nxt], blk.enorm.weight)  # step 1 (no zeroing at position 0: official code)
    X = rms(H, blk.hnorm.weight) @ Wh.t() + (e_hat @ We.t()).unsqueeze(1)  # step 2, per stream
    dc = DirectCache(c, 1, MAX_LEN, "cpu", torch.float32, with_mtp=True)
    s = dc.add()
    Y = blk(X, nxt, dc.meta([s], [0], [len(nxt)]), dc.cache.mtp_layers[0])  # step 3
    Yf = Y.flatten(1).float()  # step 4: hc_head (pre-weights only), norm, shared head
    mix = (Yf * torch.rsqrt(Yf.square().mean(-1, keepdim=True) + eps)) @ blk.hc_head_fn.t()
    pre = torch.sigmoid(mix * blk.hc_head_scale + blk.hc_head_base) + c.hc_eps
    h = (pre.unsqueeze(-1) * Y.float()).sum(1)
    return rms(h, blk.norm.weight) @ m.head.weight.float().t()


@pytest.fixture(scope="module")
def seq(lm):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.cfg.vocab_size, (S + 1,), generator=g)
    with torch.no_grad():
        H = main_streams(lm, ids[:S])
        ref = reference_logits(lm, H, ids[1:])
    return ids, H, ref


def mtp_logits_in_chunks(lm, H, nxt, chunks):
    dc = DirectCache(lm.cfg, 1, MAX_LEN, "cpu", torch.float32, with_mtp=True)
    s, out, p = dc.add(), [], 0
    for c in chunks:
        Y = lm.model.mtp_forward(H[p:p + c], nxt[p:p + c], dc.meta([s], [p], [c]), dc.cache)
        assert Y.shape == (c, lm.cfg.hc_mult, lm.cfg.hidden_size)
        out.append(lm.model.mtp_logits(Y))
        p += c
    return torch.cat(out)


def check(got, ref):
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, **TOL)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_sliding_window_wraps(lm):
    assert lm.cfg.sliding_window < S and lm.cfg.num_mtp_layers == 1 and len(lm.model.mtp) == 1
    assert sum(CHUNKS) == S


@pytest.mark.parametrize("chunks", [(S,), (1,) * S, CHUNKS], ids=["one-chunk", "token-by-token", "uneven"])
@torch.no_grad()
def test_mtp_matches_reference(lm, seq, chunks):
    ids, H, ref = seq
    check(mtp_logits_in_chunks(lm, H, ids[1:], chunks), ref)


@torch.no_grad()
def test_mtp_interleaved_with_main_model(lm, seq):
    """As speculative decoding runs it: each chunk through the main model, then its streams through the MTP
    block, both on one cache (a shared ring would mix the two)."""
    ids = seq[0]
    dc = DirectCache(lm.cfg, 1, MAX_LEN, "cpu", torch.float32, with_mtp=True)
    s, Hs, out, p = dc.add(), [], [], 0
    for c in CHUNKS:
        meta = dc.meta([s], [p], [c])
        H = lm.model(ids[p:p + c], meta, dc.cache)
        out.append(lm.model.mtp_logits(lm.model.mtp_forward(H, ids[p + 1:p + c + 1], meta, dc.cache)))
        Hs.append(H)
        p += c
    check(torch.cat(out), reference_logits(lm, torch.cat(Hs), ids[1:]))


@torch.no_grad()
def test_varlen_step_equals_each_alone(lm, seq):
    ids, H = seq[0], seq[1]
    g = torch.Generator().manual_seed(1)
    ids_b = torch.randint(0, lm.cfg.vocab_size, (21,), generator=g)
    H_b = main_streams(lm, ids_b[:20], (20,))
    seqs = [(H, ids[1:]), (H_b, ids_b[1:])]
    steps = [(150, 7), (1, 13), (49, 0)]  # tokens per sequence per step (0: not scheduled)
    alone = [mtp_logits_in_chunks(lm, h, n, [st[b] for st in steps if st[b]]) for b, (h, n) in enumerate(seqs)]
    dc = DirectCache(lm.cfg, 2, MAX_LEN, "cpu", torch.float32, with_mtp=True)
    slots, pos, got = [dc.add(), dc.add()], [0, 0], [[], []]
    for st in steps:
        bs = [b for b in range(2) if st[b]]
        Hx = torch.cat([seqs[b][0][pos[b]:pos[b] + st[b]] for b in bs])
        nx = torch.cat([seqs[b][1][pos[b]:pos[b] + st[b]] for b in bs])
        L = lm.model.mtp_logits(lm.model.mtp_forward(Hx, nx, dc.meta([slots[b] for b in bs], [pos[b] for b in bs],
                                                                     [st[b] for b in bs]), dc.cache))
        for b, part in zip(bs, L.split([st[b] for b in bs])):
            got[b].append(part)
            pos[b] += st[b]
    for b in range(2):
        check(torch.cat(got[b]), alone[b])


@torch.no_grad()
def test_rows_keep_only_the_rows_asked_for(lm, seq):
    """mtp_forward(rows=...) (the drafter: only each sequence's last kept row goes past the attention): its
    output rows equal the full pass's rows (its MoE and hc_post are row-wise), and every row still wrote its ring
    entry (the ring afterwards equals the full pass's), in a two-sequence step and again after it."""
    ids, H = seq[0], seq[1]
    g = torch.Generator().manual_seed(3)
    ids_b = torch.randint(0, lm.cfg.vocab_size, (11,), generator=g)
    H_b = main_streams(lm, ids_b[:10], (10,))
    steps = [(140, 6), (3, 4)]  # tokens per sequence per step
    ring = []
    outs = []
    for with_rows in (False, True):
        dc = DirectCache(lm.cfg, 2, MAX_LEN, "cpu", torch.float32, with_mtp=True)
        slots, pos, got = [dc.add(), dc.add()], [0, 0], []
        for st in steps:
            Hx = torch.cat([H[pos[0]:pos[0] + st[0]], H_b[pos[1]:pos[1] + st[1]]])
            nx = torch.cat([ids[1 + pos[0]:1 + pos[0] + st[0]], ids_b[1 + pos[1]:1 + pos[1] + st[1]]])
            last = torch.tensor([st[0] - 1, st[0] + st[1] - 1])
            Y = lm.model.mtp_forward(Hx, nx, dc.meta(slots, pos, list(st)), dc.cache,
                                     rows=last if with_rows else None)
            got.append(Y if with_rows else Y[last])
            pos = [pos[0] + st[0], pos[1] + st[1]]
        outs.append(got)
        ring.append([t.clone() for t in _parts(dc.cache.mtp_layers[0].window)])
    for a, b in zip(*outs):
        assert a.shape == b.shape == (2, lm.cfg.hc_mult, lm.cfg.hidden_size)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # (CPU GEMMs over 2 rows vs 146: not bitwise)
    for a, b in zip(*ring):
        assert torch.equal(a, b)


@torch.no_grad()
def test_mtp_ring_is_apart_from_layer_caches(lm, seq):
    ids, H = seq[0], seq[1]
    dc = DirectCache(lm.cfg, 1, MAX_LEN, "cpu", torch.float32, with_mtp=True)
    s = dc.add()
    meta = dc.meta([s], [0], [S])
    lm.model(ids[:S], meta, dc.cache)
    tensors = lambda lcs: [t.clone() for lc in lcs for t in _parts(lc.window) + [  # noqa: E731
        x for x in (lc.state, lc.prev, lc.idx_state, lc.idx_prev, lc.idx_pool) if x is not None] + (
        _parts(lc.pool) if lc.pool is not None else [])]
    layers_before, mtp_before = tensors(dc.cache.layers), tensors(dc.cache.mtp_layers)
    lm.model.mtp_forward(H, ids[1:], meta, dc.cache)
    for a, b in zip(layers_before, tensors(dc.cache.layers)):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(mtp_before, tensors(dc.cache.mtp_layers)))


@pytest.mark.parametrize("kv_fp8", [False, True])
def test_layout_counts_the_mtp_ring(lm, kv_fp8):
    cfg, n = lm.cfg, 3
    plain = ModelCache(cfg, n, 64, "cpu", torch.bfloat16, kv_fp8=kv_fp8)
    assert plain.mtp_layers == [] and plain.layout == CacheLayout.of(cfg, torch.bfloat16, kv_fp8)
    mc = ModelCache(cfg, n, 64, "cpu", torch.bfloat16, kv_fp8=kv_fp8, with_mtp=True)
    assert len(mc.mtp_layers) == cfg.num_mtp_layers == 1
    for lc in mc.mtp_layers:
        assert lc.pool is None and lc.state is None and lc.idx_pool is None
        assert _parts(lc.window)[0].shape[:2] == (n, cfg.sliding_window)
    ring = sum(t.numel() * t.element_size() for lc in mc.mtp_layers for t in _parts(lc.window))
    a, b = CacheLayout.of(cfg, torch.bfloat16, kv_fp8), CacheLayout.of(cfg, torch.bfloat16, kv_fp8, with_mtp=True)
    assert b.slot_bytes - a.slot_bytes == ring // n and b.page_bytes == a.page_bytes
    assert mc.layout == b


@torch.no_grad()
def test_draft_head_is_the_fp8_head(lm, seq):
    """build_draft_head: the shared head in FP8 128 x 128 blocks, quantised in row chunks exactly as in one
    piece; mtp_draft_tokens is then the argmax of the MTP hidden state times that head (activations quantised
    per 1x128, the linear op's reference), and its drafts mostly agree with the exact head's argmax."""
    from dsv4.numerics.fp8 import quantize_fp8_blocks
    from dsv4.ops.linear import linear_reference

    ids, H, ref = seq
    m = lm.model
    saved = m.draft_head
    try:
        m.draft_head = None
        dc = DirectCache(lm.cfg, 1, MAX_LEN, "cpu", torch.float32, with_mtp=True)
        s = dc.add()
        Y = m.mtp_forward(H, ids[1:], dc.meta([s], [0], [S]), dc.cache)
        assert torch.equal(m.mtp_draft_tokens(Y), ref.argmax(-1))  # no draft head: the exact head's argmax
        m.build_draft_head(rows_per_chunk=128)
        q, sc = m.draft_head
        q1, s1 = quantize_fp8_blocks(m.head.weight.float(), (128, 128), m.opts.fp8_dialect)
        assert q.dtype == m.opts.fp8_dtype and torch.equal(q.view(torch.uint8), q1) and torch.equal(sc, s1)
        got = m.mtp_draft_tokens(Y)
        want = linear_reference(m._mtp_hidden(Y, 0), q, sc, True, m.opts.fp8_dialect).argmax(-1)
        assert torch.equal(got, want)
        agree = float((got == ref.argmax(-1)).float().mean())
        assert agree >= 0.8, agree
    finally:
        m.draft_head = saved
