"""Our forward vs transformers 5.17 DeepseekV4ForCausalLM (fp32, plain numerics), loaded from the
transformers model's own `save_pretrained` output through our loader.

Layer patterns: sliding-window + CSA + HCA with hash and learned routing; window-only; HCA-heavy with a
different hc_mult; and partial indexer top-k with well-separated scores. Each compares the logits of
every position for one-shot prefill, chunked prefill and token-by-token decode, and a batch of
several sequences of different lengths advancing in mixed prefill/decode steps."""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_reference import hf_logits, make_hf_model  # noqa: E402

from dsv4.cache.model_cache import ModelCache  # noqa: E402
from dsv4.model import build_model  # noqa: E402
from dsv4.ops.meta import ForwardMeta  # noqa: E402

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
    cache = ModelCache(lm.cfg, len(seqs), max(len(s) for s in seqs), "cpu", torch.float32)
    slots = [cache.allocate() for _ in seqs]
    done = [0] * len(seqs)
    out = [[] for _ in seqs]
    with torch.no_grad():
        for step in schedule:
            meta = ForwardMeta.build([slots[b] for b, _ in step], [done[b] for b, _ in step], [n for _, n in step])
            ids = torch.cat([seqs[b][done[b]:done[b] + n] for b, n in step])
            logits = lm.model.logits(lm.model(ids, meta, cache))
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


def test_partial_topk_well_separated(tmp_path):
    """index_topk smaller than the number of compressed entries. Random weights give near-ties in the
    indexer scores that would make the selected set depend on rounding; a large indexer head weight
    spreads the scores, and the test first checks that the chosen set is unambiguous (a clear gap at
    the k-th score) before comparing logits."""
    cfg = dict(CONFIGS["swa-csa-hca"], index_topk=3, index_n_heads=16)
    hf = make_hf_model(seed=5, **cfg)
    with torch.no_grad():
        for layer in hf.model.layers:
            comp = layer.self_attn.compressor
            if comp is not None and hasattr(comp, "indexer"):
                comp.indexer.scorer.weights_proj.weight.mul_(30.0)
    hf.save_pretrained(tmp_path)
    ours = build_model(tmp_path, device="cpu", dtype="float32", numerics="plain")
    ids = _ids(4, N, hf.config.vocab_size)

    gaps = []
    from dsv4.ops import indexer as indexer_mod
    orig = indexer_mod.indexer_topk_reference

    def spy(q, w, k_pool, block_table, meta, ratio, topk):
        for b in range(meta.num_seqs):
            t0, t1 = meta.seq_range(b)
            n = meta.seq_lens_host[b] // ratio
            keys = k_pool[block_table[meta.seq_slots_host[b], torch.arange(n) // k_pool.shape[1]],
                          torch.arange(n) % k_pool.shape[1]].float()
            s = (torch.einsum("thd,nd->thn", q[t0:t1].float(), keys).relu() * w[t0:t1, :, None]).sum(1)
            vis = (meta.positions[t0:t1] + 1) // ratio
            for i in range(t1 - t0):
                v = s[i, : vis[i]].sort(descending=True).values
                if len(v) > topk:
                    gaps.append(((v[topk - 1] - v[topk]) / v.abs().max().clamp(min=1e-30)).item())
        return orig(q, w, k_pool, block_table, meta, ratio, topk)

    ours.ops.indexer_topk = spy
    for layer in ours.model.layers:
        if layer.attn.indexer is not None:
            layer.attn.indexer._topk = spy
    got = run_ours(ours, [ids], [[(0, 40)], [(0, 40)]])[0]
    assert gaps and min(gaps) > 1e-4, f"indexer scores not well separated (min relative gap {min(gaps):.2e})"
    err = (got - hf_logits(hf, ids)).abs().max().item()
    assert err <= TOL, f"partial top-k: max |diff| {err:.2e}"
