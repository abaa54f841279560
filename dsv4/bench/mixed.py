"""Decode latency under mixed load: `decoders` requests decode while `prefills` long prompts arrive.

What a user of a busy server feels: the time between two tokens of a running request (TPOT) when other
users' long prompts are prefilled in the same steps. Measured on the engine directly, per token: the
gap between consecutive tokens of each decoding request, first with nothing else running (pure decode)
then while the long prompts prefill, as p50 / p99, with the long prompts' time to first token.
The step composition (decodes first, at most `prefill_tokens_with_decodes` prefill tokens per step
with decodes, or what the decode-latency budget allows) is the engine's; this only drives and times it.
"""

from __future__ import annotations

import time

import torch

from dsv4.bench.throughput import percentiles
from dsv4.engine.sampling_params import SamplingParams


def run_mixed(llm, decoders: int, prefills: int, prefill_len: int, decode_input_len: int = 128,
              pure_steps: int = 32, seed: int = 0, progress: bool = True, warm: bool = True) -> dict:
    """`warm`: run the same workload once untimed first (it compiles the kernel variants of the mixed
    steps' shapes and captures the decoders' graphs, which would otherwise land in the timed pass)."""
    if warm:
        run_mixed(llm, decoders, prefills, prefill_len, decode_input_len, pure_steps, seed, False, warm=False)
    if decoders < 1 or prefills < 1 or prefill_len < 1 or decode_input_len < 1:
        raise ValueError("decoders, prefills, prefill_len and decode_input_len must be >= 1")
    eng = llm.engine
    V = eng.cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    room = eng.max_model_len - decode_input_len
    dec_params = SamplingParams(max_tokens=room, ignore_eos=True, temperature=0, detokenize=False)
    pre_params = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0, detokenize=False)
    tag = f"mixed{time.monotonic_ns()}"
    dec_ids = [f"{tag}-d{i}" for i in range(decoders)]
    for rid in dec_ids:
        eng.add_request(torch.randint(0, V, (decode_input_len,), generator=g).tolist(), dec_params, request_id=rid)
    times: dict[str, list[float]] = {rid: [] for rid in dec_ids}

    def step() -> list:
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id in times and o.outputs[0].delta_token_ids:
                times[o.request_id].append(now)
        return outs

    while any(not ts for ts in times.values()):  # the decoders' own prefill
        step()
    for _ in range(pure_steps):
        step()
    pure_end = {rid: len(ts) for rid, ts in times.items()}
    pre_ids = [f"{tag}-p{i}" for i in range(prefills)]
    pw0 = getattr(eng, "piecewise_steps", 0)
    t_arrive = time.perf_counter()
    for rid in pre_ids:
        eng.add_request(torch.randint(0, V, (prefill_len,), generator=g).tolist(), pre_params, request_id=rid)
    first: dict[str, float] = {}
    steps = 0
    while len(first) < prefills:
        for o in step():
            if o.request_id in pre_ids and o.outputs[0].token_ids and o.request_id not in first:
                first[o.request_id] = time.perf_counter() - t_arrive
            if o.request_id in times and o.finished:
                raise RuntimeError(f"decoder {o.request_id} finished ({o.outputs[0].finish_reason}) before the "
                                   f"prefills were done: give the decoders more room (a shorter decode input)")
        steps += 1
        if progress and steps % 20 == 0:
            print(f"  mixed: {len(first)}/{prefills} prompts prefilled after {steps} steps", flush=True)
    for rid in dec_ids:
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step()

    def gaps(ts: list[float]) -> list[float]:
        return [b - a for a, b in zip(ts, ts[1:])]

    pure = [x for rid in dec_ids for x in gaps(times[rid][1:pure_end[rid]])]  # (after the first token)
    mixed = [x for rid in dec_ids for x in gaps(times[rid][pure_end[rid] - 1:])]
    p, m = percentiles(pure), percentiles(mixed)
    lb = getattr(eng, "latency_budget", None)
    return {
        "decoders": decoders, "decode_input_len": decode_input_len, "prefills": prefills, "prefill_len": prefill_len,
        "max_num_batched_tokens": eng.config.max_num_batched_tokens,
        "prefill_tokens_with_decodes": eng.config.prefill_tokens_with_decodes,
        "decode_latency_budget": None if lb is None else lb.ratio,
        "latency_budget_state": None if lb is None else lb.describe(),  # what it measured, in ms
        "pure_tpot_ms": {k: v * 1e3 for k, v in p.items()}, "mixed_tpot_ms": {k: v * 1e3 for k, v in m.items()},
        "mixed_p99_over_pure_p50": m["p99"] / p["p50"] if p["p50"] else float("nan"),
        "prefill_ttft_s": percentiles(list(first.values())),
        "prefill_tok_s": prefills * prefill_len / max(first.values()),
        "mixed_steps": steps,
        "piecewise_steps": getattr(eng, "piecewise_steps", 0) - pw0,  # (of them: from piecewise graphs)
    }


def format_mixed(r: dict) -> str:
    p, m, t = r["pure_tpot_ms"], r["mixed_tpot_ms"], r["prefill_ttft_s"]
    return (f"mixed load: {r['decoders']} decoding + {r['prefills']} x {r['prefill_len']}-token prompts "
            f"(budget {r['max_num_batched_tokens']} tokens/step, prefill with decodes "
            f"{r['prefill_tokens_with_decodes'] or 'unbounded'}"
            + (f", latency budget {r['decode_latency_budget']:g}x" if r.get("decode_latency_budget") else "")
            + ")\n"
            f"  TPOT pure  p50 {p['p50']:8.2f} ms  p99 {p['p99']:8.2f} ms\n"
            f"  TPOT mixed p50 {m['p50']:8.2f} ms  p99 {m['p99']:8.2f} ms  (p99 / pure p50 = "
            f"{r['mixed_p99_over_pure_p50']:.2f})\n"
            f"  prompts: TTFT p50 {t['p50']:.3f} s, max {t['p99']:.3f} s; prefill {r['prefill_tok_s']:.0f} tok/s "
            f"over {r['mixed_steps']} steps ({r.get('piecewise_steps', 0)} from piecewise graphs)")
