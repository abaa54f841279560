"""Our forward vs transformers 5.17 DeepseekV4ForCausalLM (fp32, plain numerics), loaded from the
transformers model's own `save_pretrained` output through our loader.

Layer patterns: sliding-window + CSA + HCA with hash and learned routing; window-only; HCA-heavy with a
different hc_mult. Each compares the logits of every position for one-shot prefill, chunked prefill and
token-by-token decode, and a batch of several sequences of different lengths advancing in mixed
prefill/decode steps. Then partial indexer top-k (index_topk below the visible entry count, scores well
separated): chunked prefill, token-by-token decode and batched decode steps."""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_reference import hf_logits, make_hf_model  # noqa: E402

from dsv4.cache.direct import DirectCache  # noqa: E402
from dsv4.model import build_model  # noqa: E402

TOL = 1e-4
N = 80

CONFIGS = {
    "swa-csa-hca": dict(
        num_hidden_layers=4, sliding_window=8, index_topk=64,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"]),
    "window-only": dict(
        num_hidden_layers=3, sliding_window=16, index_topk=64,
        layer_types=["sliding_attention"] * 3, mlp_layer_types=["hash_moe", "moe", "moe"]),
    "hca-heavy-hc2": dict(
        num_hidden_layers=5, sliding_window=8, index_topk=64, hc_mult=2, n_routed_experts=6, num_experts_per_tok=3,
        layer_types=["heavily_compressed_attention", "heavily_compressed_attention", "compressed_sparse_attention",
                     "heavily_compressed_attention", "sliding_attention"],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        mlp_layer_types=["moe", "moe", "moe", "hash_moe", "moe"]),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = make_hf_model(seed=hash(request.param) % 1000, **CONFIGS[request.param])
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    ours = build_model(d, device="cpu", dtype="float32", numerics="plain")
    return request.param, hf, ours


def run_ours(lm, seqs: list[torch.Tensor], schedule: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """Run `schedule` (steps of (sequence, n_new_tokens)) and return the logits of every position."""
    dc = DirectCache(lm.cfg, len(seqs), max(len(s) for s in seqs), "cpu", torch.float32)
    slots = [dc.add() for _ in seqs]
    done = [0] * len(seqs)
    out = [[] for _ in seqs]
    with torch.no_grad():
        for step in schedule:
            meta = dc.meta([slots[b] for b, _ in step], [done[b] for b, _ in step], [n for _, n in step])
            ids = torch.cat([seqs[b][done[b]:done[b] + n] for b, n in step])
            logits = lm.model.logits(lm.model(ids, meta, dc.cache))
            for (b, n), (t0, t1) in zip(step, zip(meta.query_start_host, meta.query_start_host[1:])):
                out[b].append(logits[t0:t1])
                done[b] += n
    assert done == [len(s) for s in seqs]
    return [torch.cat(o) for o in out]


def random_schedule(lengths: list[int], rng: random.Random) -> list[list[tuple[int, int]]]:
    """Steps in which a random subset of the unfinished sequences advances by a random chunk (often 1)."""
    done, steps = [0] * len(lengths), []
    while any(d < n for d, n in zip(done, lengths)):
        step = []
        for b, n in enumerate(lengths):
            if done[b] < n and rng.random() < 0.7:
                k = min(n - done[b], rng.choice([1, 1, 1, 2, 5, 13, 40]))
                step.append((b, k))
                done[b] += k
        if step:
            rng.shuffle(step)
            steps.append(step)
    return steps


def _ids(seed: int, n: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_prefill(pair):
    name, hf, ours = pair
    ids = _ids(1, N, hf.config.vocab_size)
    ref = hf_logits(hf, ids)
    got = run_ours(ours, [ids], [[(0, N)]])[0]
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"{name}: prefill max |diff| {err:.2e}"


def test_chunked_prefill(pair):
    name, hf, ours = pair
    ids = _ids(2, N, hf.config.vocab_size)
    chunks = [23, 1, 9, 16, 31]
    ref = hf_logits(hf, ids, chunks)
    ref_full = hf_logits(hf, ids)
    got = run_ours(ours, [ids], [[(0, c)] for c in chunks])[0]
    assert (ref - ref_full).abs().max().item() <= TOL  # transformers agrees with itself
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"{name}: chunked prefill max |diff| {err:.2e}"


def test_decode(pair):
    name, hf, ours = pair
    ids = _ids(3, 48, hf.config.vocab_size)
    ref = hf_logits(hf, ids, [1] * len(ids))
    got = run_ours(ours, [ids], [[(0, 1)] for _ in range(len(ids))])[0]
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"{name}: decode max |diff| {err:.2e}"


def test_batched_mixed_steps(pair):
    """Several sequences of different lengths, admitted together, advancing by random chunks in shared
    steps (prefill chunks and decodes mixed): each equals its own single-sequence reference."""
    name, hf, ours = pair
    lengths = [N, 37, 5, 61]
    seqs = [_ids(10 + i, n, hf.config.vocab_size) for i, n in enumerate(lengths)]
    got = run_ours(ours, seqs, random_schedule(lengths, random.Random(7)))
    for b, s in enumerate(seqs):
        err = (got[b] - hf_logits(hf, s)).abs().max().item()
        assert err <= TOL, f"{name}: sequence {b} (length {len(s)}) max |diff| {err:.2e}"


# ---- partial indexer top-k: index_topk below the number of visible compressed entries ------------------
# The configs above have index_topk >= every query's visible entry count, so the indexer keeps everything
# and its selection is never tested. Here index_topk = 3 over up to 20 entries (CSA ratio 4, 80 tokens).
# Random weights give near-ties in the indexer scores that would make the selected set depend on rounding;
# a large indexer head weight spreads the scores, and a spy checks that every selection is unambiguous (a
# clear gap at the k-th score) before the logits are compared with transformers.

PARTIAL_TOPK = 3


@pytest.fixture(scope="module")
def partial_pair(tmp_path_factory):
    cfg = dict(CONFIGS["swa-csa-hca"], index_topk=PARTIAL_TOPK, index_n_heads=16)
    hf = make_hf_model(seed=5, **cfg)
    with torch.no_grad():
        for layer in hf.model.layers:
            comp = layer.self_attn.compressor
            if comp is not None and hasattr(comp, "indexer"):
                comp.indexer.scorer.weights_proj.weight.mul_(30.0)
    d = tmp_path_factory.mktemp("hf-partial")
    hf.save_pretrained(d)
    return hf, build_model(d, device="cpu", dtype="float32", numerics="plain")


class SelectionSpy:
    """Wraps each CSA layer's indexer_topk. For every query with more visible entries than top-k it records
    the relative gap between the k-th and (k+1)-th naive score (float32, recomputed from the cached keys),
    and whether the query was a decode token (its sequence advanced by one token in that step)."""

    def __init__(self, lm):
        self.gaps, self.decode_selections = [], 0
        self.indexers = [layer.attn.indexer for layer in lm.model.layers if layer.attn.indexer is not None]
        assert self.indexers, "no CSA layer"
        self.wrapped = [ix._topk for ix in self.indexers]
        for ix, fn in zip(self.indexers, self.wrapped):
            ix._topk = self._spy(fn)

    def remove(self):
        for ix, fn in zip(self.indexers, self.wrapped):
            ix._topk = fn

    def _spy(self, fn):
        def spy(q, w_raw, k_pool, block_table, meta, ratio, topk, weights_scale=1.0):
            w = w_raw.float() * weights_scale
            for b in range(meta.num_seqs):
                t0, t1 = meta.seq_range(b)
                n = meta.seq_lens_host[b] // ratio
                E = k_pool.shape[1]
                ent = torch.arange(n)
                keys = k_pool[block_table[meta.seq_slots_host[b], ent // E], ent % E].float()
                s = (torch.einsum("thd,nd->thn", q[t0:t1].float(), keys).relu() * w[t0:t1, :, None]).sum(1)
                vis = (meta.positions[t0:t1] + 1) // ratio
                for i in range(t1 - t0):
                    v = s[i, : vis[i]].sort(descending=True).values
                    if len(v) > topk:
                        self.gaps.append(((v[topk - 1] - v[topk]) / v.abs().max().clamp(min=1e-30)).item())
                        self.decode_selections += t1 - t0 == 1
            return fn(q, w_raw, k_pool, block_table, meta, ratio, topk, weights_scale)

        return spy

    def check_separated(self):
        gap = min(self.gaps, default=0.0)
        assert gap > 1e-4, f"indexer scores not well separated (min relative gap {gap:.2e}): change the seed"


def run_spied(lm, seqs, schedule):
    spy = SelectionSpy(lm)
    try:
        got = run_ours(lm, seqs, schedule)
    finally:
        spy.remove()
    spy.check_separated()
    return got, spy


def test_partial_topk_well_separated(partial_pair):
    """Prefill in two chunks of 40 tokens."""
    hf, ours = partial_pair
    ids = _ids(4, N, hf.config.vocab_size)
    got, _ = run_spied(ours, [ids], [[(0, 40)], [(0, 40)]])
    err = (got[0] - hf_logits(hf, ids)).abs().max().item()
    assert err <= TOL, f"partial top-k: max |diff| {err:.2e}"


def test_partial_topk_decode(partial_pair):
    """Token-by-token decode: from position 15 on, every CSA query selects 3 of 4..20 visible entries (the
    newest one included whenever a window has just completed)."""
    hf, ours = partial_pair
    ids = _ids(6, N, hf.config.vocab_size)
    got, spy = run_spied(ours, [ids], [[(0, 1)] for _ in range(N)])
    assert spy.decode_selections >= N - 4 * (PARTIAL_TOPK + 1), spy.decode_selections
    ref = hf_logits(hf, ids)
    assert (hf_logits(hf, ids, [1] * N) - ref).abs().max().item() <= TOL  # transformers agrees with itself
    err = (got[0] - ref).abs().max().item()
    assert err <= TOL, f"partial top-k decode: max |diff| {err:.2e}"
    # the selection matters: keeping every visible entry instead moves the decode logits far beyond TOL
    first = 4 * (PARTIAL_TOPK + 1) - 1  # the first position with more than top-k visible entries
    for ix in spy.indexers:
        ix.topk = 10 * N
    try:
        keep_all = run_ours(ours, [ids], [[(0, 1)] for _ in range(N)])[0]
    finally:
        for ix in spy.indexers:
            ix.topk = PARTIAL_TOPK
    assert (keep_all[first:] - ref[first:]).abs().max().item() > 100 * TOL
    assert (keep_all[:first] - ref[:first]).abs().max().item() <= TOL


def test_partial_topk_batched_mixed_steps(partial_pair):
    """Several sequences at different lengths in shared steps: each joins at its own step with a prefill
    chunk, then decodes one token per step, so most steps mix decode tokens of different block tables
    (selecting their top-k at once) with another sequence's prefill."""
    hf, ours = partial_pair
    lengths, prefill, join = [N, 37, 61, 52], [30, 9, 25, 1], [0, 0, 5, 12]
    seqs = [_ids(30 + i, n, hf.config.vocab_size) for i, n in enumerate(lengths)]
    done, schedule = [0] * len(seqs), []
    while done != lengths:
        step = []
        for b in range(len(seqs)):
            if len(schedule) >= join[b] and done[b] < lengths[b]:
                step.append((b, prefill[b] if done[b] == 0 else 1))
                done[b] += step[-1][1]
        schedule.append(step)
    got, spy = run_spied(ours, seqs, schedule)
    assert spy.decode_selections > 200, spy.decode_selections
    for b, s in enumerate(seqs):
        err = (got[b] - hf_logits(hf, s)).abs().max().item()
        assert err <= TOL, f"partial top-k, sequence {b} (length {len(s)}): max |diff| {err:.2e}"
