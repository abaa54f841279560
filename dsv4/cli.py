"""`dsv4` command line: serve | generate | batch | bench throughput | make-tiny | doctor."""

from __future__ import annotations

import argparse
import json
import sys

from dsv4.model.builder import DEFAULT_MODEL, DTYPES, LOAD_FORMATS


def _token_ids(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-token-ids must be comma-separated integers, got {s!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-token-ids is empty")
    return ids


def _device(s: str) -> str:
    """--device: cpu, cuda or cuda:N (checked here, so a typo is one argparse error, not torch's traceback)."""
    kind, _, idx = s.partition(":")
    if kind not in ("cpu", "cuda") or (idx and not idx.isdigit()):
        raise argparse.ArgumentTypeError(f"{s!r} is not a device: expected cpu, cuda or cuda:N")
    if idx and kind == "cuda":
        import torch

        if torch.cuda.is_available() and int(idx) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{s!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return s


def _nonnegative_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint folder, or a built-in name: tiny (default), deepseek-v4-flash (config only)")
    p.add_argument("--device", default=None, type=_device,
                   help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="activation dtype")
    p.add_argument("--numerics", default="official", choices=["official", "plain"],
                   help="official: simulate the release's FP8/FP4 numerics; plain: no simulation")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="dummy: random weights of the real shapes and dtypes, made on the device")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (and dummy-weight seed)")
    p.add_argument("--op", action="append", default=[], metavar="NAME=PROVIDER",
                   help="force an op's provider (see `dsv4 doctor`)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32", "fp8"],
                   help="fp8: non-rotary KV dims in FP8 (platform dialect, per-64 power-of-two scales)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--prefill-tokens-with-decodes", type=_positive_int, default=None,
                   help="decode-latency budget: at most this many prefill tokens share a step with running decodes "
                        "(default: the whole step budget)")
    p.add_argument("--decode-latency-budget", type=float, default=None, metavar="R",
                   help="a step with running decodes takes at most R x a decode-only step: the prefill tokens "
                        "joining it adapt to measured step times (R > 1; at least 16 tokens, at most "
                        "--prefill-tokens-with-decodes; default: off)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens per request")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 8GiB (default: from "
                   "--gpu-memory-utilization on a GPU, 1 GiB on the CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--page-tokens", type=_positive_int, default=None, help="raw tokens per cache page")
    p.add_argument("--gpus", type=_positive_int, default=1,
                   help="expert parallelism over this many GPUs of this node: one rank each, holding the attention "
                        "and 1/N of the routed experts, serving its own requests; one front end (several nodes: "
                        "start with torchrun instead, see README)")
    p.add_argument("--ep-exchange", choices=("allgather", "alltoall"), default="allgather",
                   help="with --gpus > 1: eager steps send each token to every rank (allgather) or only to the "
                        "ranks holding its experts (alltoall); decode graphs always all-gather")
    p.add_argument("--speculative-tokens", type=int, default=0,
                   help="speculative decoding: draft this many tokens per step with the checkpoint's MTP block and "
                        "verify them in one forward (1-3 typical; 0: off)")
    p.add_argument("--speculative-disable-by-batch-size", type=int, default=None, metavar="B",
                   help="with --speculative-tokens: no drafts in steps where more than B requests decode (large "
                        "batches, where verifying costs more than it saves); the MTP block keeps its state, so "
                        "drafting resumes at full quality below B (default: never pauses)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=False,
                   help="automatic prefix caching: keep full cache pages and slot snapshots at page boundaries for "
                        "later requests with the same prefix (system prompts, conversation history); on by default "
                        "for serve and batch, off for generate and bench (cold numbers)")
    p.add_argument("--prefix-cache-snapshots", type=_positive_int, default=None,
                   help="with --enable-prefix-caching: slot snapshots kept (default: 2 x --max-num-seqs, at most a "
                        "tenth of the cache memory)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="launch each decode step before reading the previous one's tokens, so the host's output work "
                        "overlaps the device (pure decode steps without speculative decoding or expert parallelism; "
                        "--no-async-scheduling: every step waits for its tokens)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never replay captured graphs, decode or piecewise (default: capture them where the device and "
                        "every op's provider allow)")
    p.add_argument("--piecewise-graph-tokens", type=_nonnegative_int, default=None,
                   help="replay steps that are not pure decode (prefill chunks, prefill mixed with decodes) of up "
                        "to this many tokens from piecewise graphs around each layer's attention core (default: "
                        "min(--max-num-batched-tokens, 2048); 0: eager)")


def _probability(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a probability (0..1)")
    return v


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{s!r} is not a TCP port (0..65535)")
    return v


def _max_num_seqs(a: argparse.Namespace) -> int:
    """bench latency runs its largest batch at once: room for it on each rank (the front end spreads a batch
    evenly over the ranks). Every rank computes the same value (under torchrun each parses the command)."""
    sizes = getattr(a, "batch_sizes", None)
    if not sizes:
        return a.max_num_seqs
    from dsv4.parallel.launch import DistSpec

    spec = DistSpec.from_env()
    ranks = max(a.gpus, spec.world if spec else 1)
    return max(a.max_num_seqs, -(-max(_sizes(sizes)) // ranks))


def _sizes(s: str) -> list[int]:
    try:
        sizes = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--batch-sizes {s!r}: expected positive integers, e.g. 1,32,64")
    return sizes


def engine_config(a: argparse.Namespace):
    from dsv4.config import EngineConfig, parse_bytes
    from dsv4.ops.registry import parse_overrides

    return EngineConfig(
        model=str(a.model), device=a.device, dtype=a.dtype, numerics=a.numerics, load_format=a.load_format,
        seed=a.seed or 0, num_layers=a.num_layers, op_overrides=tuple(parse_overrides(a.op).items()),
        kv_cache_dtype=a.kv_cache_dtype, max_num_seqs=_max_num_seqs(a),
        max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len,
        prefill_tokens_with_decodes=a.prefill_tokens_with_decodes,
        decode_latency_budget=a.decode_latency_budget,
        page_tokens=a.page_tokens, gpu_memory_utilization=a.gpu_memory_utilization,
        kv_cache_memory=None if a.kv_cache_memory is None else parse_bytes(a.kv_cache_memory),
        enforce_eager=a.enforce_eager, piecewise_graph_tokens=a.piecewise_graph_tokens, gpus=a.gpus, ep_exchange=a.ep_exchange, speculative_tokens=a.speculative_tokens,
        speculative_disable_by_batch_size=a.speculative_disable_by_batch_size,
        enable_prefix_caching=a.enable_prefix_caching, prefix_cache_snapshots=a.prefix_cache_snapshots,
        async_scheduling=a.async_scheduling)


def _warn_max_tokens_cap(a: argparse.Namespace, llm, prompts: list) -> None:
    """The engine caps each request's output at max_model_len minus its prompt, silently: say so up front
    (a huge --max-tokens would otherwise run for a long time with no word of what it will stop at)."""
    limit = llm.engine.max_model_len
    lens = [len(llm.tokenizer.encode(p)) if isinstance(p, str) else len(p) for p in prompts]
    caps = sorted({limit - n for n in lens if 0 < limit - n < a.max_tokens})
    if not caps:
        return
    to = f"{caps[0]:,}" if len(caps) == 1 else f"{caps[0]:,}..{caps[-1]:,} (by prompt)"
    most = llm.engine.cfg.max_position_embeddings
    if a.max_model_len and a.max_model_len > limit:
        why = f"--max-model-len {a.max_model_len:,} is more than the model's {most:,} positions"
    elif limit >= most:
        why = "the model's positions"
    else:
        why = (f"{'--max-model-len' if a.max_model_len else 'the default'}; --max-model-len raises it, up to the "
               f"model's {most:,} positions")
    print(f"dsv4 generate: warning: --max-tokens {a.max_tokens:,} capped to {to}: max_model_len {limit:,} "
          f"holds prompt + output ({why})", file=sys.stderr)


def cmd_generate(a: argparse.Namespace) -> int:
    from dsv4.engine.sampling_params import SamplingParams
    from dsv4.entry import LLM

    llm = LLM.from_config(engine_config(a), dist=a.dist)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed, ignore_eos=a.ignore_eos, logprobs=0)
    prompts = list(a.prompt) if a.prompt else [a.prompt_token_ids]
    tok = llm.tokenizer
    if a.prompt and tok.vocab_size > llm.engine.cfg.vocab_size:
        print(f"warning: tokenizer ({tok.source}) has {tok.vocab_size} ids, the model {llm.engine.cfg.vocab_size}",
              file=sys.stderr)
    _warn_max_tokens_cap(a, llm, prompts)
    outs = llm.generate(prompts, params, use_tqdm=False)
    llm.shutdown()
    errors = [o.error for o in outs if o.error]
    if errors:
        raise ValueError("; ".join(errors))
    ttft = [o.metrics.ttft for o in outs if o.metrics.ttft is not None]
    tpot = [o.metrics.tpot for o in outs if o.metrics.tpot is not None]
    prefill_s = max(ttft) if ttft else float("nan")
    decode_tok_s = sum(1 / t for t in tpot if t > 0) if tpot else float("nan")  # all sequences together
    if a.json:
        rows = [{"prompt_token_ids": o.prompt_token_ids, "token_ids": o.outputs[0].token_ids,
                 "logprobs": [lp.logprob for lp in o.outputs[0].logprobs], "text": o.outputs[0].text,
                 "finish_reason": o.outputs[0].finish_reason} for o in outs]
        print(json.dumps({"outputs": rows, "prefill_seconds": prefill_s, "decode_tokens_per_second": decode_tok_s},
                         ensure_ascii=False))
        return 0
    for i, o in enumerate(outs):
        if len(outs) > 1:
            print(f"--- prompt {i}")
        print(o.outputs[0].text)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    e = llm.engine
    print(f"[{n} tokens, prefill {prefill_s * 1e3:.0f} ms, decode {decode_tok_s:.1f} tok/s over {len(outs)} "
          f"sequence(s), {e.lm.platform.name}, {a.dtype}, {a.numerics} numerics]", file=sys.stderr)
    return 0


def cmd_bench_throughput(a: argparse.Namespace) -> int:
    from dsv4.bench.throughput import format_report, run_throughput
    from dsv4.entry import LLM

    llm = LLM.from_config(engine_config(a), dist=a.dist)
    for _ in range(a.warmup):  # untimed: compiles kernels and captures decode graphs
        run_throughput(llm, a.num_prompts, a.input_len, a.output_len, seed=a.seed or 0,
                       temperature=a.temperature, progress=False)
    r = run_throughput(llm, a.num_prompts, a.input_len, a.output_len, seed=a.seed or 0,
                       temperature=a.temperature, progress=not a.json)
    r["warmup_passes"] = a.warmup
    llm.shutdown()
    print(json.dumps(r) if a.json else format_report(r))
    return 0


def cmd_bench_latency(a: argparse.Namespace) -> int:
    from dsv4.bench import latency as bl
    from dsv4.model.builder import parse_dtype

    sizes = _sizes(a.batch_sizes)
    rows: list[dict] = []
    cfg = engine_config(a)
    if a.engine in ("dsv4", "both"):
        from dsv4.entry import LLM

        llm = LLM.from_config(cfg, dist=a.dist)
        dev = str(llm.engine.device)
        rows += bl.dsv4_rows(llm, sizes, a.input_len, a.output_len, seed=a.seed or 0, progress=not a.json,
                             with_breakdown=a.breakdown, warmup_output_len=a.warmup_output_len,
                             warmup_prompts=a.warmup_prompts, draft_oracle=a.draft_oracle)
        if a.mixed_prefills:
            from dsv4.bench.mixed import format_mixed, run_mixed

            mixed = run_mixed(llm, max(sizes), a.mixed_prefills, a.mixed_prefill_len,
                              decode_input_len=a.input_len, seed=a.seed or 0, progress=False)
            if not a.json:
                print(format_mixed(mixed), flush=True)
        llm.shutdown()
        del llm
    else:
        from dsv4.platforms import detect

        dev = str(detect(a.device).torch_device)
    if a.engine in ("transformers", "both"):
        rows += bl.transformers_rows(a.model, a.num_layers, dev, parse_dtype(a.dtype), sizes, a.input_len,
                                     a.output_len, seed=a.seed or 0, progress=not a.json)
    res = {"model": str(a.model), "num_layers": a.num_layers, "device": dev,
           "mixed": mixed if a.engine in ("dsv4", "both") and a.mixed_prefills else None,
           "gpus": max(a.gpus, a.dist.world if a.dist else 1), "dtype": a.dtype,
           "numerics": a.numerics, "input_len": a.input_len, "output_len": a.output_len, "rows": rows}
    if a.plot:
        bl.plot(rows, a.plot, f"{a.model} ({a.num_layers or 'all'} layers) on {dev}, "
                f"{a.input_len} in / {a.output_len} out")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    if a.json:
        print(json.dumps(res))
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    import logging

    from dsv4.entry import AsyncLLM
    from dsv4.serve.handlers import ServeLimits
    from dsv4.serve.server import bind, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # before the model load (minutes for the real checkpoint): a busy port is reported at once
        sock = bind(a.host, a.port)
    except OSError as e:
        print(f"dsv4 serve: error: {e}", file=sys.stderr)
        return 1
    llm = AsyncLLM(engine_config(a), dist=a.dist, engine_process=a.engine_process)
    name = a.served_model_name or (a.model if "/" not in str(a.model) else str(a.model).rstrip("/").split("/")[-1])
    print(f"dsv4: serving {name!r} on http://{a.host}:{a.port}/v1 ({llm.engine.plan.describe()})", file=sys.stderr)
    serve(llm, name, host=a.host, port=a.port, api_key=a.api_key, limits=ServeLimits(max_queued=a.max_queued),
          log_level=a.log_level, sock=sock, shutdown_grace_s=a.shutdown_grace)
    return 0


def cmd_batch(a: argparse.Namespace) -> int:
    import asyncio

    from dsv4.entry import AsyncLLM
    from dsv4.serve.batch import run_batch
    from dsv4.serve.handlers import OpenAIServing, ServeLimits

    async def main():
        llm = AsyncLLM(engine_config(a), dist=a.dist)
        name = a.served_model_name or str(a.model)
        serving = OpenAIServing(llm, name, ServeLimits(max_queued=1 << 30))
        try:
            return await run_batch(serving, a.input, a.output, max_concurrency=a.max_concurrency,
                                   progress=not a.quiet)
        finally:
            await llm.shutdown(timeout=0)

    stats = asyncio.run(main())
    print(f"batch: {stats['succeeded']} succeeded, {stats['failed']} failed, {stats['skipped']} already done "
          f"-> {a.output}", file=sys.stderr)
    return 0


def cmd_make_tiny(a: argparse.Namespace) -> int:
    from dsv4.tiny import make_tiny

    try:
        out = make_tiny(a.out, seed=a.seed, num_shards=a.num_shards)
    except OSError as e:  # a file in the way, no permission, a full disk: one line, no traceback
        raise ValueError(f"cannot write {e.filename or a.out}: {e.strerror}" if e.strerror else str(e)) from None
    print(f"wrote a tiny DeepSeek-V4 checkpoint to {out}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    import torch

    from dsv4.engine.cuda_graphs import capture_blockers
    from dsv4.model.builder import resolve_ops
    from dsv4.ops.registry import parse_overrides
    from dsv4.platforms import detect

    p = detect(a.device)
    print(f"torch {torch.__version__}")
    print(f"platform: {p.describe()}")
    table = resolve_ops(p, parse_overrides(a.op))
    print(table.report())
    blockers = capture_blockers(table)
    if not p.supports_graphs:
        print("decode graphs: no (the platform has no device graphs)")
    elif blockers:
        print(f"decode graphs: no (ops on providers that cannot be captured: {', '.join(blockers)})")
    else:
        print("decode graphs: yes; piecewise graphs for other steps: yes (one GPU; --piecewise-graph-tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4-Flash inference engine")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_engine_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-token-ids", type=_token_ids, help="comma-separated token ids, e.g. 0,1234,56")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="print token ids and logprobs as JSON")
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks through the engine")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    bt = bsub.add_parser("throughput", help="N requests of fixed lengths: output tok/s and latency percentiles")
    _add_engine_args(bt)
    bt.add_argument("--num-prompts", type=int, default=64)
    bt.add_argument("--input-len", type=int, default=128)
    bt.add_argument("--output-len", type=int, default=64)
    bt.add_argument("--temperature", type=float, default=0.0)
    bt.add_argument("--warmup", type=int, default=1,
                    help="untimed passes of the same workload first (Triton compilation, graph capture)")
    bt.add_argument("--json", action="store_true", help="print the results as JSON")
    bt.set_defaults(fn=cmd_bench_throughput)
    bl = bsub.add_parser("latency", help="concurrency sweep: TTFT, TPOT, per-user and total tok/s "
                         "(optionally side by side with transformers)")
    _add_engine_args(bl)
    bl.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated concurrencies")
    bl.add_argument("--input-len", type=int, default=256)
    bl.add_argument("--output-len", type=int, default=32)
    bl.add_argument("--engine", default="dsv4", choices=["dsv4", "transformers", "both"],
                    help="transformers: its DeepseekV4ForCausalLM with random bf16 weights on the same config")
    bl.add_argument("--plot", default=None, help="write a PNG of the sweep here (needs matplotlib)")
    bl.add_argument("--out", default=None, help="write the results as JSON here")
    bl.add_argument("--warmup-output-len", type=int, default=None,
                    help="output tokens of each untimed warm-up pass (default: --output-len)")
    bl.add_argument("--warmup-prompts", type=int, default=None,
                    help="requests of each untimed warm-up pass (default: the batch size)")
    bl.add_argument("--mixed-prefills", type=int, default=0, metavar="N",
                    help="then: TPOT p50 / p99 of the largest batch's requests while N prompts of --mixed-prefill-len "
                         "tokens arrive and prefill (decode under mixed load; see --prefill-tokens-with-decodes)")
    bl.add_argument("--mixed-prefill-len", type=int, default=8192)
    bl.add_argument("--draft-oracle", type=_probability, default=None, metavar="P",
                    help="with --speculative-tokens N: draft with a DRAFT ORACLE (each batch's own greedy outputs, "
                         "recorded until a replay reproduces them, replayed as drafts, each kept with probability "
                         "P; the MTP passes still run, their drafts replaced): step cost and speed-up against "
                         "acceptance without real weights; rows are labelled")
    bl.add_argument("--breakdown", action="store_true",
                    help="per-kernel (GPU) / per-op (CPU) time of one more pass at each batch size (torch.profiler)")
    bl.add_argument("--json", action="store_true", help="print the results as JSON")
    bl.set_defaults(fn=cmd_bench_latency)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    sv.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                    help="checkpoint folder or built-in name (default: tiny); same as --model")
    _add_engine_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: local only)")
    sv.add_argument("--port", type=_port, default=8000)
    sv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1")
    sv.add_argument("--served-model-name", default=None)
    sv.add_argument("--max-queued", type=int, default=512, help="requests waiting or running before 429")
    sv.add_argument("--log-level", default="info")
    sv.add_argument("--shutdown-grace", type=float, default=5.0, metavar="SECONDS",
                    help="on SIGINT / SIGTERM: new requests get 503 at once, those running get this long to finish, "
                         "then end with an error their clients can read; exit 0")
    sv.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                    help="run the engine core (scheduler, model, sampler) in its own process, so that HTTP handling, "
                         "tokenisation and detokenisation do not share its interpreter lock (default); "
                         "--no-engine-process runs it on a thread of the server process")
    sv.set_defaults(fn=cmd_serve, enable_prefix_caching=True)  # (a server sees resent prefixes)

    bj = sub.add_parser("batch", help="run an OpenAI batch file (JSONL) through the engine")
    bj.add_argument("input")
    bj.add_argument("output")
    _add_engine_args(bj)
    bj.add_argument("--served-model-name", default=None)
    bj.add_argument("--max-concurrency", type=_positive_int, default=256)
    bj.add_argument("--quiet", action="store_true", help="no progress bar")
    bj.set_defaults(fn=cmd_batch, enable_prefix_caching=True)

    t = sub.add_parser("make-tiny", help="write a small random checkpoint in the release's format")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-shards", type=_positive_int, default=3)
    t.set_defaults(fn=cmd_make_tiny)

    d = sub.add_parser("doctor", help="platform, capabilities, and the provider chosen for each op")
    d.add_argument("--device", default=None, type=_device)
    d.add_argument("--op", action="append", default=[], metavar="NAME=PROVIDER")
    d.set_defaults(fn=cmd_doctor)
    return ap


def _finish(rc: int) -> int:
    """Processes that ran NCCL collectives in device graphs leave at once (see parallel/teardown.py)."""
    if "dsv4.parallel.teardown" in sys.modules:
        sys.modules["dsv4.parallel.teardown"].hard_exit_if_needed(rc)
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    from dsv4.config import ConfigError
    from dsv4.model.loader import CheckpointError
    from dsv4.ops.registry import OpResolutionError
    from dsv4.platforms import PlatformError

    try:
        if getattr(a, "model_pos", None) is not None:
            a.model = a.model_pos
        if hasattr(a, "gpus"):  # an engine command: under torchrun, ranks other than 0 serve steps only
            from dsv4.parallel.launch import DistSpec, run_worker

            a.dist = DistSpec.from_env()
            if a.dist is not None and a.dist.rank != 0:
                run_worker(engine_config(a), a.dist)
                return _finish(0)
        return _finish(a.fn(a))
    except (ConfigError, CheckpointError, OpResolutionError, PlatformError, FileNotFoundError, ValueError) as e:
        print(f"dsv4 {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
