"""`dsv4 batch`: OpenAI batch files round trip with a malformed line in them; resumable."""

import asyncio
import json


from dsv4.config import EngineConfig
from dsv4.engine.async_engine import AsyncLLM
from dsv4.engine.llm_engine import LLMEngine
from dsv4.serve.batch import run_batch
from dsv4.serve.handlers import OpenAIServing, ServeLimits


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
        (r,) = by_id[cid]
        assert r["error"] is None and r["response"]["status_code"] == 200
    assert len(by_id["b"][0]["response"]["body"]["choices"]) == 2
    assert by_id["c"][0]["response"]["body"]["object"] == "text_completion"
    assert by_id["d"][0]["error"] and by_id["d"][0]["response"]["status_code"] == 400
    assert "temperature" in by_id["d"][0]["error"]["message"]
    bad_json, dup = sorted(by_id[None], key=lambda r: r["error"]["line"])  # no id of their own: named by line
    assert bad_json["error"]["code"] == "invalid_json" and bad_json["error"]["line"] == 3
    assert "duplicate custom_id 'a'" in dup["error"]["message"] and dup["error"]["line"] == 6
    assert by_id["e"][0]["error"]["code"] == "invalid_request"
    assert stats["succeeded"] == 4 and stats["failed"] == 4 and stats["skipped"] == 0

    # resume: everything already has a line, nothing runs again
    again = run(lm, inp, out)
    assert again["total"] == 0 and len(read(out)) == len(rows)

    # an interrupted run: keep only some lines (plus a torn one), the rest runs again, once
    keep = [json.dumps(r) for r in rows if r["custom_id"] in ("a", "b")]
    out.write_text("\n".join(keep) + "\n" + '{"custom_id": "c", "resp')
    third = run(lm, inp, out)
    rows = read(out)  # the torn line is gone
    assert {r["custom_id"] for r in rows[:len(keep)]} == {"a", "b"}
    assert third["succeeded"] == 2 and third["dropped_output_lines"] == 1  # c and f
    final = sorted(str(r["custom_id"]) for r in rows[len(keep):])
    assert final == ["None", "None", "c", "d", "e", "f"]  # line 3 (bad JSON), line 6 (duplicate id)


def chat(cid, text="Hi", **kw):
    line = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 2,
                     "temperature": 0, **kw}}
    return json.dumps(line if cid is None else {"custom_id": cid, **line})


def test_batch_torn_last_line_is_dropped_on_resume(lm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([chat("a"), chat("b")]) + "\n")
    assert run(lm, inp, out)["succeeded"] == 2
    first, second = out.read_text().splitlines()
    out.write_text(first + "\n" + second[: len(second) // 2])  # killed half way through the second line
    stats = run(lm, inp, out)
    assert stats["succeeded"] == 1 and stats["skipped"] == 1
    rows = read(out)  # every line parses: the torn one is gone, not kept as a line of its own
    assert sorted(r["custom_id"] for r in rows) == ["a", "b"]
    assert out.read_text().endswith("\n")


def test_batch_lines_without_an_id_are_recorded_once(lm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([chat("a"), chat(None), "{torn json", "[1, 2]", chat(None, "again")]) + "\n")
    stats = run(lm, inp, out)
    assert stats["succeeded"] == 1 and stats["failed"] == 4
    rows = read(out)
    errs = sorted((r for r in rows if r["error"]), key=lambda r: r["error"]["line"])
    assert [r["error"]["line"] for r in errs] == [2, 3, 4, 5]
    assert all(r["custom_id"] is None for r in errs)
    assert [r["error"]["code"] for r in errs] == ["invalid_request", "invalid_json", "invalid_json",
                                                  "invalid_request"]
    again = run(lm, inp, out)
    assert again["total"] == 0 and again["skipped"] == 5
    assert len(read(out)) == len(rows)


def test_batch_duplicate_id_error_is_not_the_first_requests_line(lm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([chat("a"), chat("a", "second")]) + "\n")
    run(lm, inp, out)
    rows = read(out)
    (ok,) = [r for r in rows if r["custom_id"] == "a"]  # only the first request's line carries the id
    assert ok["error"] is None and ok["response"]["status_code"] == 200
    (dup,) = [r for r in rows if r["error"]]
    assert dup["custom_id"] is None and dup["error"]["line"] == 2 and "duplicate custom_id 'a'" in \
        dup["error"]["message"]
    # killed after the duplicate's error line but before the first request finished: a resume runs it
    out.write_text(json.dumps(dup) + "\n")
    stats = run(lm, inp, out)
    assert stats["succeeded"] == 1 and stats["total"] == 1
    assert sorted(str(r["custom_id"]) for r in read(out)) == ["None", "a"]


def test_batch_error_ids_cannot_collide_with_real_ids(lm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(["{bad json", chat("line-1"), chat("line-3")]) + "\n" + "[]\n")
    stats = run(lm, inp, out)
    assert stats["succeeded"] == 2 and stats["failed"] == 2
    rows = read(out)
    assert sorted(r["custom_id"] for r in rows if r["error"] is None) == ["line-1", "line-3"]
    assert all(r["custom_id"] is None for r in rows if r["error"])
    # only the bad lines' errors survived an interruption: the real "line-1" and "line-3" still run
    out.write_text("".join(json.dumps(r) + "\n" for r in rows if r["error"]))
    stats = run(lm, inp, out)
    assert stats["succeeded"] == 2 and stats["total"] == 2


def test_batch_custom_id_must_be_a_string(lm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([json.dumps({**json.loads(chat(None)), "custom_id": ["x"]}), chat("ok")]) + "\n")
    stats = run(lm, inp, out)
    assert stats["succeeded"] == 1 and stats["failed"] == 1
    (err,) = [r for r in read(out) if r["error"]]
    assert err["error"]["line"] == 1 and "custom_id" in err["error"]["message"]


def test_batch_output_cleanup_keeps_whole_lines(tmp_path):
    """A torn line in the middle (left by an older version that only ended it) and a last line missing its
    newline: the file is rewritten with whole lines only, keeping its permissions."""
    import os
    import stat

    from dsv4.serve.batch import _clean_output

    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a", "error": null}\n{"custom_id": "b", "re\n\n{"custom_id": "c", "error": null}')
    os.chmod(out, 0o640)
    rows, dropped = _clean_output(out)
    assert [r["custom_id"] for r in rows] == ["a", "c"] and dropped == 1
    assert out.read_text() == '{"custom_id": "a", "error": null}\n{"custom_id": "c", "error": null}\n'
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert _clean_output(out) == (rows, 0) and _clean_output(tmp_path / "none.jsonl") == ([], 0)
