"""CPU: the host work of verify-graph speculative steps, with the device work faked, under cProfile.

The tiny model's engine gets verify and MTP draft graphs run uncaptured (as in tests/engine/test_verify_graphs.py),
then the verify forward and the MTP draft body are replaced by static buffers: the verify logits' argmax is one
token, and every draft is that token (every draft accepted). What remains is the runner's and the engine's host
work per step (staging, verification, draft inputs, outputs) plus the torch ops that would be launches on a GPU;
the max / argmax over the 129,280-token vocabulary runs on the CPU here (the GPU does it in microseconds), so read
the per-function lines, not the step total.

    python benchmarks/spec_host_probe.py --batch 1 --drafts 1 [--host-accept] [--temperature 0.8]

--temperature > 0: sampled requests (speculative sampling on the host; the faked drafter's q rows one-hot on the
drafted token, so most drafts are rejected and the rollback path runs too).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import dsv4.engine.cuda_graphs as cuda_graphs
import dsv4.engine.llm_engine as llm_engine
from dsv4.config import EngineConfig
from dsv4.engine.cuda_graphs import DecodeGraphs
from dsv4.engine.draft_graphs import MTPDraftGraphs
from dsv4.engine.sampling_params import SamplingParams
from dsv4.model import build_model

WATCH = ("stage_decode", "(_verify_sampled)", "(verify)", "(draft_inputs)", "multinomial", "softmax", "(run)", "(run_accepting)", "(_accept_body)", "(__call__)", "(verify_all)", "(step)",
         "(_views)", "(spec_state)", "(schedule)", "(execute)", "(_output)", "(rollback)", "'max'", "argmax")


class _NoSnapshot:
    def bind(self, slots):
        return self

    def put_back(self, *a):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--drafts", type=int, default=1)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--host-accept", action="store_true", help="verification on the host (the sampler's path)")
    ap.add_argument("--temperature", type=float, default=0.0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    # the references run uncaptured here: let them through the capture check
    cuda_graphs.capture_blockers = llm_engine.capture_blockers = lambda ops: []
    B, K, q, TOK = a.batch, a.drafts, a.drafts + 1, 7
    lm = build_model("tiny", device="cpu", dtype="float32", numerics="plain", num_layers=1)
    eng = llm_engine.LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain",
                                            max_model_len=1024, max_num_seqs=max(B, 4), speculative_tokens=K,
                                            enforce_eager=True), lm=lm)
    scratch = eng.kv.take_scratch_slot(q)
    vg = DecodeGraphs(lm.model, eng.cache, scratch, max_batch=max(B, 4), batch_buckets=(1, 4, 8, 16, 32),
                      min_context=64, capture=False, buffers=eng.buffers, query_len=q, keep_streams=True)
    dg = MTPDraftGraphs(lm.model, eng.cache, vg, capture=False)
    eng.runner.verify_graphs, eng.runner.scratch, eng.runner.draft_graphs = vg, scratch, dg
    eng.runner.device_accept = not a.host_accept
    vg.logits.zero_()
    vg.logits[:, TOK] = 1.0
    vg._eager_spec = (_NoSnapshot(), [])
    vg.replay = lambda key: vg.logits[:key[0] * q]

    def fake_body(Bb, frozen, sampled=True):
        dg.drafts[:Bb].fill_(TOK)
        if sampled:
            if dg.q_rows is None:
                dg.q_rows = torch.zeros((dg.drafts.shape[0], K, vg.logits.shape[-1]))
            dg.q_rows[:, :, TOK] = 1.0

    dg._body = fake_body
    for i in range(B):
        p = SamplingParams(max_tokens=(a.steps + 10) * q, temperature=a.temperature, seed=i if a.temperature else None,
                           ignore_eos=True, detokenize=False)
        eng.add_request(list(range(1000 + i, 1016 + i)), p)
    for _ in range(3):  # prefill and the first (eager) drafts
        eng.step()
    prof = cProfile.Profile()
    n0, steps = eng.runner.verify_graph_steps, 0
    t = time.perf_counter()
    prof.enable()
    while eng.has_unfinished_requests() and steps < a.steps:
        eng.step()
        steps += 1
    prof.disable()
    dt = time.perf_counter() - t
    print(f"batch {B}, {K} drafts, temperature {a.temperature}, {'host' if a.host_accept else 'device'} acceptance: "
          f"{steps} steps "
          f"({eng.runner.verify_graph_steps - n0} verify graph steps), {1e3 * dt / steps:.3f} ms a step under cProfile")
    st = pstats.Stats(prof)
    for (f, line, name), (_, _, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][3]):
        s = f"{f}:{line}({name})"
        if any(w in s for w in WATCH):
            print(f"  {s[-64:]:64s} {1e3 * ct / steps:8.3f} ms a step (cumulative), {1e3 * tt / steps:8.3f} own")


if __name__ == "__main__":
    main()
