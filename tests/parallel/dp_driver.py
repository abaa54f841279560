"""Rank 0 of a two-rank expert-parallel engine on the CPU (gloo), driven by test_dp_engine.py in a fresh
process (the process group must not leak into the test process). Writes what it saw as JSON."""

from __future__ import annotations

import asyncio
import json
import sys

import torch

from dsv4 import LLM, AsyncLLM, SamplingParams
from dsv4.engine import sampler as sampler_mod

ENGINE = dict(device="cpu", dtype="float32", numerics="plain", max_model_len=256)
PROMPTS = [[0, 1234, 56, 789, 10], [0, 42], [0, 7, 7, 99, 1000, 3, 17, 5, 2048, 11, 12], [0, 5, 6]]


def params() -> list[SamplingParams]:
    greedy = dict(temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    return [SamplingParams(max_tokens=6, **greedy), SamplingParams(max_tokens=7, temperature=0.9, seed=3, ignore_eos=True),
            SamplingParams(max_tokens=5, **greedy), SamplingParams(max_tokens=4, temperature=0.7, seed=11, ignore_eos=True)]


# Two batchings of the same model give logprobs that agree to ~1e-6, not bit for bit: which of two
# (nearly) tied tokens ranks first, or makes the top-n cut, is not defined. The one-process reference
# therefore also records, per entry, what any other batching may legitimately report: the band of
# ranks the chosen token can take when every logprob moves by up to TIE, and every token (with its
# logprob) whose logprob lies within TIE of the n-th best, i.e. every id that may appear in a top-n.
TIE = 1e-4


def _parts_with_lp(orig):
    """The sampler's device-side logprob parts, plus the log-softmax rows the bands below are read from."""
    def parts(logits, ids, ns):
        return (*orig(logits, ids, ns), torch.log_softmax(logits.float(), dim=-1))
    return parts


def _objects_with_tie_bands(orig):
    def objects(token_ids, ns, chosen, rank, tv, ti, lp):
        out = orig(token_ids, ns, chosen, rank, tv, ti)
        for j, t in enumerate(out):
            d = lp[j] - lp[j, t.token_id]
            above_tie = int((d > TIE).sum())
            t.rank_band = [1 + above_tie, above_tie + int(((d > -TIE) & (d <= TIE)).sum())]
            if t.top:
                near = torch.nonzero(lp[j] >= t.top[-1][1] - TIE).flatten()
                t.may_top = [[int(i), float(lp[j, i])] for i in near.tolist()]
        return out
    return objects


def lp(x):
    return None if x is None else [None if t is None else
                                   {"id": t.token_id, "logprob": t.logprob, "rank": t.rank, "top": t.top,
                                    "rank_band": getattr(t, "rank_band", None), "may_top": getattr(t, "may_top", None)}
                                   for t in x]


def row(o) -> dict:
    c = o.outputs[0]
    return {"token_ids": c.token_ids, "text": c.text, "logprobs": lp(c.logprobs), "prompt_logprobs": lp(o.prompt_logprobs),
            "finish_reason": c.finish_reason, "num_generated": o.metrics.num_generated_tokens, "error": o.error}


def reference(tiny: str) -> dict:
    sampler_mod._logprob_parts = _parts_with_lp(sampler_mod._logprob_parts)  # (every logprob goes through these)
    sampler_mod._logprob_objects = _objects_with_tie_bands(sampler_mod._logprob_objects)
    llm = LLM(tiny, **ENGINE)
    return {"batch": [row(o) for o in llm.generate(PROMPTS, params(), use_tqdm=False)]}


async def streams(llm: AsyncLLM) -> list[dict]:
    async def one(i):
        toks, text, last = [], "", None
        async for o in llm.generate(PROMPTS[i], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)):
            toks += o.outputs[0].delta_token_ids
            text += o.outputs[0].delta_text
            last = o
        return {"delta_tokens": toks, "delta_text": text, "final": row(last)}
    return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))


def two_ranks(tiny: str) -> dict:
    llm = LLM(tiny, gpus=2, **ENGINE)
    eng = llm.engine
    res = {"world": eng.world}
    try:
        eng.add_request([0, 10**9], SamplingParams(max_tokens=3))
        res["bad"] = None
    except ValueError as e:
        res["bad"] = str(e)
    res["unfinished_after_bad"] = eng.num_unfinished_requests()
    res["batch"] = [row(o) for o in llm.generate(PROMPTS, params(), use_tqdm=False)]
    # a remote request aborted while it runs: its final output comes back with the next step
    a = eng.add_request([0, 1, 2], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), request_id="a")
    b = eng.add_request([0, 3, 4], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), request_id="b")
    res["owners"] = {"a": eng._owner["a"], "b": eng._owner["b"]}
    for _ in range(3):
        eng.step()
    res["load_running"] = eng.load()["running"]
    res["abort_return"] = eng.abort_request(b.request_id)
    final = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = row(o)
    res["aborted"], res["other"] = final["b"], final["a"]
    res["load_after"] = eng.load()
    res["streams"] = asyncio.run(streams(AsyncLLM(engine=eng)))
    llm.shutdown()
    res["children_exit"] = [p.exitcode for p in eng.children]
    assert a.request_id == "a"
    return res


def two_ranks_spec(tiny: str) -> dict:
    """Speculative decoding (MTP drafter, 2 drafts) over two ranks: the requests finish at different steps, so
    a rank with nothing left takes part in the other's steps and MTP passes."""
    llm = LLM(tiny, gpus=2, speculative_tokens=2, **ENGINE)
    try:
        outs = llm.generate(PROMPTS, params(), use_tqdm=False)
        return {"batch": [row(o) for o in outs], "spec_steps": [o.metrics.num_spec_steps for o in outs]}
    finally:
        llm.shutdown()


def two_ranks_prefix(tiny: str) -> dict:
    """Prefix caching over two ranks, with speculation: two conversations of 600-token prefixes, a first wave
    making the cache entries and a second one that must land on the same ranks (affinity) and hit; greedy
    tokens against one process without the cache."""
    g = torch.Generator().manual_seed(5)
    pre = [torch.randint(0, 129280, (600,), generator=g).tolist() for _ in range(2)]
    waves = [[pre[0] + [5, 6, 7], pre[1] + [8]], [pre[1] + [9, 10], pre[0] + [11]]]
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    eng_kw = dict(ENGINE, max_model_len=1024)
    ref = LLM(tiny, **eng_kw)
    want = [[o.outputs[0].token_ids for o in ref.generate(w, sp, use_tqdm=False)] for w in waves]
    llm = LLM(tiny, gpus=2, speculative_tokens=2, enable_prefix_caching=True, **eng_kw)
    try:
        res = {"want": want, "got": [], "cached": [], "owners": []}
        for k, w in enumerate(waves):
            outs = llm.generate(w, sp, use_tqdm=False)
            res["got"].append([o.outputs[0].token_ids for o in outs])
            res["cached"].append([o.num_cached_tokens for o in outs])
        res["load_after"] = llm.engine.load()
        return res
    finally:
        llm.shutdown()


def rank_dies(tiny: str, busy: bool) -> dict:
    """Rank 1's process is killed (SIGKILL) with requests on both ranks; `busy`: the next step runs at once (its
    collective fails), else rank 0 stays idle long enough for its watcher to see the death first."""
    import os
    import signal
    import time

    llm = LLM(tiny, gpus=2, **ENGINE)
    eng = llm.engine
    sp = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    eng.add_request([0, 1, 2], sp, request_id="a")
    eng.add_request([0, 3, 4], sp, request_id="b")
    for _ in range(3):
        eng.step()
    os.kill(eng.children[0].pid, signal.SIGKILL)
    if not busy:
        time.sleep(3)
    res = {"closed_before_step": eng.closed, "step_error": None}
    try:
        for _ in range(1000):
            eng.step()
    except Exception as e:
        res["step_error"] = f"{type(e).__name__}: {e}"
    try:
        eng.add_request([0, 5], sp)
        res["add_error"] = None
    except Exception as e:
        res["add_error"] = str(e)
    res.update(closed=eng.closed, failure=eng.failure, unfinished=eng.num_unfinished_requests(),
               health=AsyncLLM(engine=eng).health())
    return res


if __name__ == "__main__":
    tiny, mode, out = sys.argv[1:4]
    with open(out, "w") as f:
        json.dump({"two": two_ranks, "spec": two_ranks_spec, "one": reference, "prefix": two_ranks_prefix,
                   "kill_busy": lambda t: rank_dies(t, True), "kill_idle": lambda t: rank_dies(t, False)}[mode](tiny), f)
