"""`dsv4` command line: generate | make-tiny | doctor."""

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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="checkpoint folder, or a built-in name: tiny (default), deepseek-v4-flash (config only)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="activation dtype")
    p.add_argument("--numerics", default="official", choices=["official", "plain"],
                   help="official: simulate the release's FP8/FP4 numerics; plain: no simulation")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="dummy: random weights of the real shapes and dtypes, made on the device")
    p.add_argument("--num-layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (and dummy-weight seed)")
    p.add_argument("--op", action="append", default=[], metavar="NAME=PROVIDER",
                   help="force an op's provider (see `dsv4 doctor`)")


def cmd_generate(a: argparse.Namespace) -> int:
    from dsv4.engine.generate import generate
    from dsv4.model.builder import build_model
    from dsv4.ops.registry import parse_overrides
    from dsv4.tokenizer import Tokenizer

    lm = build_model(a.model, device=a.device, dtype=a.dtype, numerics=a.numerics, load_format=a.load_format,
                     op_overrides=parse_overrides(a.op), seed=a.seed or 0, num_layers=a.num_layers,
                     progress=not a.json)
    tok = None
    if a.prompt:
        tok = Tokenizer(lm.path)
        if tok.vocab_size > lm.cfg.vocab_size:
            print(f"warning: tokenizer ({tok.source}) has {tok.vocab_size} ids, the model {lm.cfg.vocab_size}",
                  file=sys.stderr)
        prompts = [tok.encode(p) for p in a.prompt]
    else:
        prompts = [a.prompt_token_ids]
        if lm.path is not None:
            try:
                tok = Tokenizer(lm.path)
            except ValueError:
                tok = None
    res = generate(lm, prompts, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                   ignore_eos=a.ignore_eos)

    def text(ids):
        if tok is None or max(ids, default=0) >= tok.vocab_size:
            return None
        return tok.decode(ids)

    if a.json:
        out = [{"prompt_token_ids": o.prompt_token_ids, "token_ids": o.token_ids, "logprobs": o.logprobs,
                "text": text(o.token_ids), "finish_reason": o.finish_reason} for o in res.outputs]
        print(json.dumps({"outputs": out, "prefill_seconds": res.prefill_seconds,
                          "decode_seconds": res.decode_seconds,
                          "decode_tokens_per_second": res.decode_tokens_per_second}, ensure_ascii=False))
        return 0
    for i, o in enumerate(res.outputs):
        if len(res.outputs) > 1:
            print(f"--- prompt {i}")
        t = text(o.token_ids)
        print(t if t is not None else o.token_ids)
    print(f"[{res.generated_tokens} tokens, prefill {res.prefill_seconds * 1e3:.0f} ms, decode "
          f"{res.decode_tokens_per_second:.1f} tok/s over {len(res.outputs)} sequence(s), "
          f"{lm.platform.name}, {a.dtype}, {a.numerics} numerics]", file=sys.stderr)
    return 0


def cmd_make_tiny(a: argparse.Namespace) -> int:
    from dsv4.tiny import make_tiny

    out = make_tiny(a.out, seed=a.seed, num_shards=a.num_shards)
    print(f"wrote a tiny DeepSeek-V4 checkpoint to {out}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    import torch

    from dsv4.ops.registry import parse_overrides, resolve
    from dsv4.platforms import detect

    p = detect(a.device)
    print(f"torch {torch.__version__}")
    print(f"platform: {p.describe()}")
    print(resolve(p, parse_overrides(a.op)).report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4-Flash inference engine")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-token-ids", type=_token_ids, help="comma-separated token ids, e.g. 0,1234,56")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--json", action="store_true", help="print token ids and logprobs as JSON")
    g.set_defaults(fn=cmd_generate)

    t = sub.add_parser("make-tiny", help="write a small random checkpoint in the release's format")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-shards", type=int, default=3)
    t.set_defaults(fn=cmd_make_tiny)

    d = sub.add_parser("doctor", help="platform, capabilities, and the provider chosen for each op")
    d.add_argument("--device", default=None)
    d.add_argument("--op", action="append", default=[], metavar="NAME=PROVIDER")
    d.set_defaults(fn=cmd_doctor)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    from dsv4.config import ConfigError
    from dsv4.model.loader import CheckpointError
    from dsv4.ops.registry import OpResolutionError
    from dsv4.platforms import PlatformError

    try:
        return a.fn(a)
    except (ConfigError, CheckpointError, OpResolutionError, PlatformError, FileNotFoundError, ValueError) as e:
        print(f"dsv4 {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
