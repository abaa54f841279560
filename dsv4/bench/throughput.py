"""`dsv4 bench throughput`: N requests of fixed input / output lengths through the engine (all queued at
once, continuous batching), reporting output tokens/s and latency percentiles."""

from __future__ import annotations

import time

import torch

from dsv4.engine.llm import LLM
from dsv4.engine.sampling_params import SamplingParams


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    if not xs:
        return {f"p{p}": float("nan") for p in ps}
    t = torch.tensor(xs, dtype=torch.float64)
    return {f"p{p}": float(torch.quantile(t, p / 100)) for p in ps} | {"mean": float(t.mean())}


def bench_prompts(vocab_size: int, num_prompts: int, input_len: int, seed: int = 0) -> list[list[int]]:
    """The benchmark's random prompts (the same for the same arguments)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_prompts, input_len), generator=g).tolist()


def run_throughput(llm: LLM, num_prompts: int, input_len: int, output_len: int, seed: int = 0,
                   temperature: float = 0.0, progress: bool = True) -> dict:
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_prompts, input_len and output_len must be >= 1")
    prompts = bench_prompts(llm.engine.cfg.vocab_size, num_prompts, input_len, seed)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=temperature,
                            seed=seed if temperature > 0 else None, detokenize=False)
    eng = llm.engine
    steps0, gsteps0, psteps0 = eng.num_steps, eng.graph_steps, getattr(eng, "piecewise_steps", 0)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=progress)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    errors = [o.error for o in outs if o.error]
    m = [o.metrics for o in outs]
    return {
        "model": eng.config.model, "device": str(eng.device), "dtype": eng.config.dtype,
        "kv_cache_dtype": eng.config.kv_cache_dtype, "numerics": eng.config.numerics,
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
        "max_num_seqs": min(eng.config.max_num_seqs, eng.plan.num_slots),  # per rank
        "max_num_batched_tokens": eng.config.max_num_batched_tokens,
        "cache": eng.plan.describe(), "elapsed_s": elapsed, "engine_steps": eng.num_steps - steps0,
        "output_tokens": n_out, "output_tok_s": n_out / elapsed,
        "total_tok_s": (n_out + num_prompts * input_len) / elapsed, "requests_s": num_prompts / elapsed,
        "preemptions": sum(x.num_preemptions for x in m), "errors": errors,
        "graph_steps": eng.graph_steps - gsteps0,  # decode steps replayed from captured graphs
        "piecewise_steps": getattr(eng, "piecewise_steps", 0) - psteps0,  # other steps from piecewise graphs
        "latency_s": percentiles([x.latency for x in m if x.latency is not None]),
        "ttft_s": percentiles([x.ttft for x in m if x.ttft is not None]),
        "tpot_s": percentiles([x.tpot for x in m if x.tpot is not None]),
    }


def format_report(r: dict) -> str:
    lat, ttft, tpot = r["latency_s"], r["ttft_s"], r["tpot_s"]
    return "\n".join([
        f"{r['num_prompts']} requests x ({r['input_len']} in, {r['output_len']} out) on {r['device']}, "
        f"{r['dtype']}, kv {r['kv_cache_dtype']}, {r['numerics']} numerics",
        r["cache"],
        f"elapsed {r['elapsed_s']:.2f} s over {r['engine_steps']} steps ({r['graph_steps']} from decode graphs, "
        f"{r.get('piecewise_steps', 0)} from piecewise graphs), "
        f"{r['preemptions']} preemptions, "
        f"{len(r['errors'])} errors",
        f"output {r['output_tok_s']:.1f} tok/s, total {r['total_tok_s']:.1f} tok/s, {r['requests_s']:.2f} req/s",
        f"latency  p50 {lat['p50']:.3f} s  p90 {lat['p90']:.3f} s  p99 {lat['p99']:.3f} s",
        f"TTFT     p50 {ttft['p50']:.3f} s  p90 {ttft['p90']:.3f} s  p99 {ttft['p99']:.3f} s",
        f"TPOT     p50 {tpot['p50'] * 1e3:.1f} ms  p90 {tpot['p90'] * 1e3:.1f} ms  p99 {tpot['p99'] * 1e3:.1f} ms",
    ])
