"""`dsv4 batch`: OpenAI batch files round trip with a malformed line in them; resumable."""

import asyncio
import json

import pytest

from dsv4.config import EngineConfig
from dsv4.engine.async_engine import AsyncLLM
from dsv4.engine.llm_engine import LLMEngine
from dsv4.model import build_model
from dsv4.serve.batch import run_batch
from dsv4.serve.handlers import OpenAIServing, ServeLimits


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain")


def lines():
    chat = lambda cid, text, **kw: {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",  # noqa: E731
                                    "body": {"model": "tiny", "messages": [{"role": "user", "content": text}],
                                             "max_tokens": 4, "temperature": 0, **kw}}
    return [
        json.dumps(chat("a", "Hello")),
        json.dumps(chat("b", "Bonjour", n=2, seed=1, temperature=1.0)),
        "{this is not json",
        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/completions",
                    "body": {"model": "tiny", "prompt": [0, 5, 6], "max_tokens": 3, "temperature": 0}}),
        json.dumps(chat("d", "bad", temperature=-1)),
        json.dumps(chat("a", "duplicate id")),
        json.dumps({"custom_id": "e", "method": "GET", "url": "/v1/models", "body": {}}),
        "",
        json.dumps(chat("f", "Hola")),
    ]


def run(lm, inp, out):
    async def main():
        eng = LLMEngine(EngineConfig(model="unused", device="cpu", dtype="float32", numerics="plain",
                                     max_model_len=256), lm=lm)
        llm = AsyncLLM(engine=eng)
        try:
            stats = await run_batch(OpenAIServing(llm, "tiny", ServeLimits(max_queued=1 << 30)), inp, out,
                                    progress=False)
        finally:
            await llm.shutdown(timeout=0)
        assert eng.kv.num_free_pages == eng.cache.num_pages
        return stats
    return asyncio.run(main())


def read(out):
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_batch_round_trip_and_resume(lm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines()) + "\n")
    stats = run(lm, inp, out)
    rows = read(out)
    by_id = {}
    for r in rows:
        by_id.setdefault(r["custom_id"], []).append(r)
    for cid in ("a", "b", "c", "f"):
        (r,) = by_id[cid] if cid != "a" else [x for x in by_id["a"] if x["error"] is None]
        assert r["error"] is None and r["response"]["status_code"] == 200
    assert len(by_id["b"][0]["response"]["body"]["choices"]) == 2
    assert by_id["c"][0]["response"]["body"]["object"] == "text_completion"
    assert by_id["d"][0]["error"] and by_id["d"][0]["response"]["status_code"] == 400
    assert "temperature" in by_id["d"][0]["error"]["message"]
    assert by_id["line-3"][0]["error"]["code"] == "invalid_json"
    assert any("duplicate custom_id" in x["error"]["message"] for x in by_id["a"] if x["error"])
    assert by_id["e"][0]["error"]["code"] == "invalid_request"
    assert stats["succeeded"] == 4 and stats["failed"] == 4 and stats["skipped"] == 0

    # resume: everything already has a line, nothing runs again
    again = run(lm, inp, out)
    assert again["total"] == 0 and len(read(out)) == len(rows)

    # an interrupted run: keep only some lines (plus a torn one), the rest runs again, once
    keep = [json.dumps(r) for r in rows if r["custom_id"] in ("a", "b")]
    out.write_text("\n".join(keep) + "\n" + '{"custom_id": "c", "resp')
    third = run(lm, inp, out)
    ids = [r.get("custom_id") for r in (json.loads(x) for x in out.read_text().splitlines()[:len(keep)])]
    assert set(ids) == {"a", "b"}
    assert third["succeeded"] == 2  # c and f
    final_ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()[len(keep) + 1:]]
    assert sorted(final_ids, key=str) == sorted(["c", "d", "f", "line-3", "e"], key=str)
