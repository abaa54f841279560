"""The one-launch paths of a small decode step change no bit of the model's output: the tiny model with every op
through its Triton provider (the interpreter on the CPU), official numerics in bf16, prefilled, then decode steps
of one and two tokens, run with the fused paths on and off (knobs; several are off by default, being slower on the
H200: docs/perf.md 2026-12-07 (c)) on identical caches:
  - hc_pre(prev=): a block's hc_post applied by the next hc_pre's mixing programs (hyper_connection.POST_IN_MIX),
  - the mHC finish run by the last mixing program (hyper_connection.LAST_FINISH_T),
  - the router's select run by the last logits program (router.LAST_SELECT_T),
  - the attention output's inverse RoPE in the kernel that writes it (attention.FUSE_INV_ROPE),
  - the split-KV combine by the last split program (attention.LAST_COMBINE), the norm in the mHC finish.
Streams and logits must be equal bit for bit; the fused paths must have run (their kernels counted)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

import dsv4.model.builder as builder  # noqa: E402
from dsv4.cache.direct import DirectCache  # noqa: E402
from dsv4.kernels.triton import attention as kattn  # noqa: E402
from dsv4.kernels.triton import hyper_connection as khc  # noqa: E402
from dsv4.kernels.triton import router as kr  # noqa: E402
from dsv4.model import build_model  # noqa: E402
from dsv4.ops.registry import OpTable, all_ops  # noqa: E402
from dsv4.ops.registry import resolve as real_resolve  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::RuntimeWarning"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                 reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")]

ON = [(khc, "POST_IN_MIX", True), (khc, "LAST_FINISH_T", 2), (khc, "MAX_NORM_D", 8192), (kr, "LAST_SELECT_T", 2),
      (kattn, "FUSE_INV_ROPE", True), (kattn, "LAST_COMBINE", True)]  # (several are off by default: measured)
OFF = [(khc, "POST_IN_MIX", False), (khc, "LAST_FINISH_T", 0), (khc, "MAX_NORM_D", 0), (kr, "LAST_SELECT_T", 0),
       (kattn, "FUSE_INV_ROPE", False), (kattn, "LAST_COMBINE", False)]


# the ops whose Triton providers hold the one-launch paths above; the others run their references (interpreted,
# they took most of this test's time and are not what it is about)
FUSED_OPS = {"hc_pre", "hc_post", "hc_head", "moe_route", "sparse_attention"}


def triton_table(platform, overrides=None):
    t = real_resolve(platform, overrides)
    ops = all_ops()
    fns, choices = {}, {}
    for n, c in t.choices.items():
        p = "triton" if "triton" in ops[n].providers and n in FUSED_OPS else c.provider
        fns[n] = ops[n].providers[p].fn
        choices[n] = type(c)(c.op, p, "test: interpreted Triton", ())
    return OpTable(platform, choices, fns)


def test_fused_decode_paths_equal_unfused(tiny_dir, monkeypatch, launches):
    monkeypatch.setattr(builder, "resolve", triton_table)
    for mod, name, v in ON:
        monkeypatch.setattr(mod, name, v)
    lm = build_model(tiny_dir, device="cpu", dtype="bfloat16", numerics="official")
    caches = [DirectCache(lm.cfg, 3, 64, "cpu", torch.bfloat16) for _ in range(2)]
    for dc in caches:
        assert [dc.add() for _ in range(2)] == [0, 1]
    gen = torch.Generator().manual_seed(3)
    launched = {name: launches(mod, name) for mod, name in ((khc, "_hc_mix_finish_kernel"), (khc, "_hc_post_kernel"),
                                                            (kr, "_router_logits_select_kernel"))}
    with torch.no_grad():
        for slot, n in ((0, 3), (1, 5)):
            ids = torch.randint(0, lm.cfg.vocab_size, (n,), generator=gen)
            for dc in caches:
                lm.model(ids, dc.meta([slot], [0], [n]), dc.cache)
        lens = [3, 5]
        for slots in ([0], [0, 1]):
            ids = torch.randint(0, lm.cfg.vocab_size, (len(slots),), generator=gen)
            pos = [lens[s] for s in slots]
            for log in launched.values():
                log.clear()
            X = lm.model(ids, caches[0].meta(slots, pos, [1] * len(slots)), caches[0].cache)
            got = lm.model.logits(X)
            fused = {name: len(log) for name, log in launched.items()}
            with monkeypatch.context() as m:
                for mod, name, v in OFF:
                    m.setattr(mod, name, v)
                X0 = lm.model(ids, caches[1].meta(slots, pos, [1] * len(slots)), caches[1].cache)
                want = lm.model.logits(X0)
            assert torch.equal(X, X0) and torch.equal(got, want), slots
            layers = len(lm.model.layers)
            # per block two hc_pre and the router in one launch each, hc_head too; one hc_post (the last block's)
            assert fused["_hc_mix_finish_kernel"] == 2 * layers + 1, fused
            assert fused["_hc_post_kernel"] == 1, fused
            assert fused["_router_logits_select_kernel"] >= 1, fused
            for s in slots:
                lens[s] += 1
