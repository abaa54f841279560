"""Loading only this rank's routed experts (expert parallelism, the one ExpertMap): per-expert tensors of
remote experts are never placed, local ones land at their local index, stacked [E, ...] tensors
(transformers' layout) keep their local rows; the ranks' routed-expert outputs add up to the full one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hf_reference import make_hf_model  # noqa: E402

from dsv4.model import build_model  # noqa: E402
import dsv4.model.loader as loader  # noqa: E402
from dsv4.ops.moe import moe_experts_reference, moe_route_reference  # noqa: E402
from dsv4.ops.moe_dispatch import ExpertMap  # noqa: E402


def experts_of(lm):
    return [b.ffn.experts for b in lm.model.layers]


def test_official_format_halves(tiny_dir, monkeypatch):
    full = build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain")
    E = full.cfg.n_routed_experts
    halves = [ExpertMap(E, tuple(range(0, E, 2))), ExpertMap(E, tuple(range(E - 1, 0, -2)))]  # 2nd: reversed
    read: list[str] = []
    real_open = loader._open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def __getattr__(self, k):  # keys(), metadata(), ... of the real file
            return getattr(self.f, k)

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(loader, "_open", lambda path, device="cpu": Spy(real_open(path, device)))
    ranks = []
    for m in halves:
        read.clear()
        ranks.append(build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain", expert_map=m))
        experts_read = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
        assert experts_read == set(m.local_ids)  # remote experts' tensors are never read
    for m, lm in zip(halves, ranks):
        ids = list(m.local_ids)
        for ef, er in zip(experts_of(full), experts_of(lm)):
            assert er.w13.shape[0] == m.num_local
            for name in ("w13", "w13_scale", "w2", "w2_scale"):
                assert torch.equal(getattr(er, name), getattr(ef, name)[ids]), name
    # the ranks' routed outputs sum to the full layer's (float32, summation order only)
    g = torch.Generator().manual_seed(0)
    blk = full.model.layers[-1].ffn
    c = full.cfg
    x = torch.randn(37, c.hidden_size, generator=g)
    w, ids = moe_route_reference(x, blk.gate.weight, blk.gate.bias, blk.gate.tid2eid,
                                 torch.randint(0, c.vocab_size, (37,), generator=g), c.num_experts_per_tok,
                                 c.scoring_func, c.norm_topk_prob, c.routed_scaling_factor)
    e = blk.experts
    want = moe_experts_reference(x, e.w13, e.w13_scale, e.w2, e.w2_scale, ids, w, c.swiglu_limit)
    parts = []
    for m, lm in zip(halves, ranks):
        er = lm.model.layers[-1].ffn.experts
        assert er.expert_map == m
        parts.append(moe_experts_reference(x, er.w13, er.w13_scale, er.w2, er.w2_scale, ids, w, c.swiglu_limit,
                                           expert_map=m))
    assert not torch.equal(parts[0], want)
    torch.testing.assert_close(parts[0] + parts[1], want, atol=1e-5, rtol=1e-5)


def test_stacked_transformers_format(tmp_path):
    hf = make_hf_model(seed=4)
    hf.save_pretrained(tmp_path)
    full = build_model(tmp_path, device="cpu", dtype="float32", numerics="plain")
    m = ExpertMap(8, (6, 1, 3))
    lm = build_model(tmp_path, device="cpu", dtype="float32", numerics="plain", expert_map=m)
    for ef, er in zip(experts_of(full), experts_of(lm)):
        assert torch.equal(er.w13, ef.w13[[6, 1, 3]]) and torch.equal(er.w2, ef.w2[[6, 1, 3]])


def test_map_must_cover_the_config(tiny_dir):
    with pytest.raises(ValueError, match="n_routed_experts"):
        build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain", expert_map=ExpertMap(7, (0, 1)))


def test_dummy_weights_of_a_rank_are_rows_of_the_whole_model():
    """--load-format dummy: a rank holding experts 8..15 holds exactly those experts of the one-device model
    (seeded per global expert), so multi-GPU dummy runs compute the same model as one GPU."""
    kw = dict(device="cpu", dtype="float32", numerics="plain", load_format="dummy", num_layers=2)
    full = build_model("tiny", **kw).model.state_dict()
    half = build_model("tiny", expert_map=ExpertMap.contiguous(16, 1, 2), **kw).model.state_dict()
    assert full.keys() == half.keys()
    stacked = 0
    for k, v in half.items():
        w = full[k]
        if v.shape != w.shape:
            w, stacked = w[8:], stacked + 1
        assert torch.equal(v.view(torch.uint8) if v.element_size() == 1 else v,
                           w.view(torch.uint8) if w.element_size() == 1 else w), k
    assert stacked >= 4
