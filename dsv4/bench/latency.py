"""`dsv4 bench latency`: a concurrency sweep. For each batch size B, B requests of fixed input / output
lengths run together (after an untimed warm-up pass of the same workload): TTFT, TPOT, per-user tok/s and
total output tok/s. `--engine transformers` runs transformers' DeepseekV4ForCausalLM (random bf16 weights,
the same config and layer count, `generate` with greedy decoding) on the same workloads in the same
command, so the two are compared side by side; per-layer decode time = TPOT / layers for both."""

from __future__ import annotations

import dataclasses
import time

import torch

from dsv4.bench.throughput import run_throughput
from dsv4.engine.sampling_params import SamplingParams

ENGINES = ("dsv4", "transformers", "both")


def weight_flops_per_token(model) -> float:
    """Matrix FLOPs per token through the layers' weights (2 x in x out per linear, the top-k routed experts'
    share of the expert GEMMs); attention scores, the LM head and MTP are not counted."""
    from dsv4.model.linear import Linear
    from dsv4.model.moe import Experts

    cfg = model.cfg
    total = 0.0
    for name, m in model.layers.named_modules():
        if isinstance(m, Linear):
            total += 2.0 * m.in_features * m.out_features
        elif isinstance(m, Experts):
            total += 2.0 * cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size * cfg.hidden_size
    return total


def breakdown(fn, top: int = 15) -> list[dict]:
    """Per-kernel (GPU) or per-op (CPU) time of fn() under torch.profiler: the `top` busiest, with shares."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        fn()
        if gpu:
            torch.cuda.synchronize()
    ev = prof.key_averages()
    key = (lambda e: e.self_device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    ev = [e for e in ev if key(e) > 0]
    total = sum(key(e) for e in ev) or 1.0
    return [{"name": e.key[:90], "calls": e.count, "ms": key(e) / 1e3, "share": key(e) / total}
            for e in sorted(ev, key=lambda e: -key(e))[:top]]


def dsv4_rows(llm, batch_sizes: list[int], input_len: int, output_len: int, seed: int = 0,
              progress: bool = True, with_breakdown: bool = False, warmup_output_len: int | None = None,
              warmup_prompts: int | None = None, draft_oracle: float | None = None) -> list[dict]:
    """`warmup_output_len` / `warmup_prompts`: output tokens / requests of the untimed warm-up pass (default:
    those of the timed one). Fewer tokens are enough to compile and capture when the run's sequences stay in
    one context bucket (all equal lengths do); fewer requests compile the kernels but leave the capture of
    the batch's own graph bucket (about a second per bucket) inside the timed pass.
    `draft_oracle` (an engine with speculative_tokens k): draft with a DRAFT ORACLE instead of the MTP block:
    each batch's own greedy outputs are recorded first (install_oracle: replayed until the replay emits the
    recording), then replayed as drafts, each kept with probability `draft_oracle` (spec_decode.OracleDrafter;
    the MTP passes still run): a speculative step's cost and the speed-up against acceptance, measurable
    without real weights. Rows say so ("drafter": "oracle p=...", with the recording's rounds and whether it
    converged)."""
    layers = llm.engine.cfg.num_layers
    gpus = llm.engine.world  # expert-parallel ranks
    fpt = weight_flops_per_token(llm.engine.lm.model)
    rows = []
    eng = llm.engine
    k = eng.config.speculative_tokens
    if draft_oracle is not None and not k:
        raise ValueError("a draft oracle needs an engine with speculative_tokens > 0")
    for B in batch_sizes:
        if draft_oracle is not None:
            oracle = install_oracle(llm, B, input_len, output_len, seed, k, draft_oracle)
        run_throughput(llm, min(B, warmup_prompts or B), input_len, warmup_output_len or output_len, seed=seed,
                       progress=False)  # warm-up
        st0 = dataclasses.replace(eng.spec_stats)
        r = run_throughput(llm, B, input_len, output_len, seed=seed, progress=False)
        st = eng.spec_stats
        spec = {}
        if k:
            d_steps, d_drafted, d_acc = st.steps - st0.steps, st.drafted - st0.drafted, st.accepted - st0.accepted
            spec = {"speculative_tokens": k,
                    "drafter": f"oracle p={draft_oracle}" if draft_oracle is not None else "mtp",
                    **({"oracle_rounds": oracle["rounds"], "oracle_converged": oracle["converged"],
                        "oracle_over_mtp_passes": oracle["mtp_passes"]} if draft_oracle is not None else {}),
                    "acceptance_rate": d_acc / d_drafted if d_drafted else 0.0,
                    "mean_accepted_length": (d_acc + d_steps) / d_steps if d_steps else 0.0}
        tpot = r["tpot_s"]["p50"]
        ttft = r["ttft_s"]["p50"]
        rows.append({"engine": "dsv4", "batch": B, "ttft_s": ttft, "tpot_ms": tpot * 1e3,
                     "tpot_ms_per_layer": tpot * 1e3 / layers, "user_tok_s": 1 / tpot if tpot else float("nan"),
                     "output_tok_s": r["output_tok_s"], "gpus": gpus, "output_tok_s_per_gpu": r["output_tok_s"] / gpus,
                     # decode rate once every sequence is running: B / TPOT over the GPUs
                     "decode_tok_s_per_gpu": B / tpot / gpus if tpot else float("nan"),
                     "elapsed_s": r["elapsed_s"], "graph_steps": r["graph_steps"],
                     "engine_steps": r["engine_steps"], "errors": r["errors"],
                     # prefill matrix rate: weight FLOPs of every prompt token over the run's median TTFT
                     # (meaningful for batch 1, or when the whole batch is prefilled before the first token)
                     "prefill_weight_tflops_s": fpt * input_len * B / ttft / 1e12 if ttft else float("nan"),
                     **spec})
        if with_breakdown:
            rows[-1]["breakdown"] = breakdown(
                lambda: run_throughput(llm, B, input_len, output_len, seed=seed, progress=False))
        if progress:
            print(format_row(rows[-1]), flush=True)
            for k in rows[-1].get("breakdown", []):
                print(f"      {k['ms']:10.3f} ms  {100 * k['share']:5.1f}%  x{k['calls']:<6} {k['name']}")
    return rows


def install_oracle(llm, B: int, input_len: int, output_len: int, seed: int, k: int, accept: float,
                   max_rounds: int | None = None) -> dict:
    """Install an OracleDrafter that replays the batch's own greedy outputs, recorded so that the measured
    run takes them: the fixed point of "replay, then record what the replay emitted".

    With bf16 weights a token's logits depend a little on the chunk it is computed in (its slot among a
    verify step's drafts, the rows of the step: reduction orders change with the shapes), and dummy
    weights give near-flat logits whose top two differ by ~0.01 nat, so a continuation recorded with every
    draft failing leaves the replay's own greedy path after a few tokens (docs/perf.md, 2026-12-06). Each
    round replays the recording with this run's accept/reject pattern (fixed per prompt and position) and
    records what was emitted; the agreed prefix grows by at least one token per round, so within
    output_len + 1 rounds the replay emits exactly the recording: every kept draft is accepted.
    The engine's MTP drafter (if any) stays in place under the oracle: its passes run and cost what they
    cost, the oracle's tokens replace its drafts, so the measured step is a whole speculative step.
    Returns {"rounds": replays run, "converged": bool, "mtp_passes": bool}; a run that did not converge
    still measures, with its acceptance as reported."""
    from dsv4.bench.throughput import bench_prompts
    from dsv4.engine.spec_decode import OracleDrafter

    eng = llm.engine
    V = eng.cfg.vocab_size
    prompts = bench_prompts(V, B, input_len, seed)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0, detokenize=False)
    inner = eng.runner.drafter  # the MTP drafter: its passes keep running (and costing) under the oracle
    while isinstance(inner, OracleDrafter):
        inner = inner.inner

    def run(drafter) -> dict:
        eng.runner.drafter = drafter
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return {tuple(p): list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)}

    # first recording through verify steps whose drafts all fail (a plain decode step rounds differently)
    cont = run(OracleDrafter({}, k, 0.0, vocab_size=V, inner=inner))
    rounds, converged = 0, False
    for rounds in range(1, (output_len + 1 if max_rounds is None else max_rounds) + 1):
        emitted = run(OracleDrafter(cont, k, accept, seed=seed, vocab_size=V, inner=inner))
        converged = emitted == cont
        cont = emitted
        if converged:
            break
    eng.runner.drafter = OracleDrafter(cont, k, accept, seed=seed, vocab_size=V, inner=inner)
    return {"rounds": rounds, "converged": converged, "mtp_passes": inner is not None}


def transformers_model(model: str, num_layers: int | None, device: str, dtype: torch.dtype):
    """transformers' DeepseekV4ForCausalLM on the same config (first `num_layers` layers), random weights in
    `dtype` made on `device` (no checkpoint: this measures speed only)."""
    import transformers
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from dsv4.model.builder import resolve_model

    transformers.logging.set_verbosity_error()
    _, cfg = resolve_model(model)
    d = cfg.to_official_dict()
    d.pop("quantization_config", None)  # bf16 weights: the speed of its bf16 path
    L = num_layers or cfg.num_layers
    d["num_hidden_layers"] = L
    for k in ("compress_ratios", "layer_types"):
        if isinstance(d.get(k), list):
            d[k] = d[k][:L]
    d["num_nextn_predict_layers"] = 0
    hf_cfg = DeepseekV4Config(**d)
    with torch.device(device):
        m = DeepseekV4ForCausalLM._from_config(hf_cfg, torch_dtype=dtype)
    return m.eval(), L


@torch.no_grad()
def transformers_rows(model: str, num_layers: int | None, device: str, dtype: torch.dtype, batch_sizes: list[int],
                      input_len: int, output_len: int, seed: int = 0, progress: bool = True) -> list[dict]:
    m, layers = transformers_model(model, num_layers, device, dtype)
    V = m.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    rows = []

    def timed(ids, n):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for B in batch_sizes:
        ids = torch.randint(0, V, (B, input_len), generator=g).to(device)
        timed(ids, 2)  # warm-up
        ttft = timed(ids, 1)
        total = timed(ids, output_len)
        tpot = (total - ttft) / max(1, output_len - 1)
        rows.append({"engine": "transformers", "batch": B, "ttft_s": ttft, "tpot_ms": tpot * 1e3,
                     "tpot_ms_per_layer": tpot * 1e3 / layers, "user_tok_s": 1 / tpot if tpot > 0 else float("nan"),
                     "output_tok_s": B * output_len / total})
        if progress:
            print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r: dict) -> str:
    return (f"{r['engine']:>12}  batch {r['batch']:>4}  TTFT {r['ttft_s'] * 1e3:9.1f} ms  TPOT {r['tpot_ms']:8.2f} ms "
            f"({r['tpot_ms_per_layer']:.3f} ms/layer)  {r['user_tok_s']:8.1f} tok/s/user  "
            f"{r['output_tok_s']:9.1f} tok/s total"
            + (f" ({r['output_tok_s_per_gpu']:.1f} per GPU over {r['gpus']}; decode {r['decode_tok_s_per_gpu']:.1f} "
               f"per GPU)" if r.get("gpus", 1) > 1 else "")
            + (f"  [speculative {r['speculative_tokens']}, drafter {r['drafter']}: acceptance "
               f"{r['acceptance_rate']:.2f}, {r['mean_accepted_length']:.2f} tokens/step"
               + (f"; recorded in {r['oracle_rounds']} rounds"
                  + ("" if r["oracle_converged"] else ", NOT CONVERGED") if "oracle_rounds" in r else "") + "]"
               if r.get("speculative_tokens") else ""))


def plot(rows: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit(f"--plot {path}: matplotlib is not installed ({e}); the JSON has the numbers") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for eng in sorted({r["engine"] for r in rows}):
        rs = sorted((r for r in rows if r["engine"] == eng), key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        axes[0].plot(b, [r["tpot_ms_per_layer"] for r in rs], "o-", label=eng)
        axes[1].plot(b, [r["output_tok_s"] for r in rs], "o-", label=eng)
    for ax, yl in zip(axes, ("decode ms per layer (TPOT / layers)", "output tok/s (all users)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent requests (batch)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
