"""`dsv4 batch INPUT.jsonl OUTPUT.jsonl`: OpenAI batch files through the engine with full continuous
batching (all lines in flight at once, up to a concurrency bound).

Input lines: {"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}. Output lines (in completion order, appended and flushed one by one): {"id", "custom_id",
"response": {"status_code", "request_id", "body"} | null, "error": null | {"code", "message"}}.
Resumable: custom_ids already present in OUTPUT are skipped. A bad line is recorded as an error line;
it never stops the run.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from pydantic import ValidationError

from dsv4.serve.handlers import ApiError, OpenAIServing
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest

ROUTES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


def _done_ids(output: Path) -> set[str]:
    done = set()
    if output.exists():
        for line in output.read_text(encoding="utf-8").splitlines():
            try:
                cid = json.loads(line).get("custom_id")
            except (json.JSONDecodeError, AttributeError):
                continue  # a torn last line from an interrupted run: that request runs again
            if cid is not None:
                done.add(cid)
    return done


def _error_line(cid, code: str, message: str, status: int | None = None, body: dict | None = None) -> dict:
    resp = None if status is None else {"status_code": status, "request_id": None, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid, "response": resp,
            "error": {"code": code, "message": message}}


async def run_batch(serving: OpenAIServing, input_path: str | Path, output_path: str | Path,
                    max_concurrency: int = 256, progress: bool = True) -> dict:
    input_path, output_path = Path(input_path), Path(output_path)
    lines = input_path.read_text(encoding="utf-8").splitlines()
    done = _done_ids(output_path)
    jobs: list[tuple[object, object]] = []  # (custom_id, request model or error line dict)
    seen: set = set()
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
            if not isinstance(item, dict):
                raise ValueError("a line must be a JSON object")
        except (json.JSONDecodeError, ValueError) as e:
            cid = f"line-{n}"
            if cid not in done:
                jobs.append((cid, _error_line(cid, "invalid_json", f"line {n}: {e}")))
            continue
        cid = item.get("custom_id")
        if cid in done:
            continue
        if cid is None or cid in seen:
            why = "missing custom_id" if cid is None else f"duplicate custom_id {cid!r}"
            jobs.append((cid, _error_line(cid, "invalid_request", f"line {n}: {why}")))
            continue
        seen.add(cid)
        url, method, body = item.get("url"), item.get("method", "POST"), item.get("body")
        if method != "POST" or url not in ROUTES or not isinstance(body, dict):
            jobs.append((cid, _error_line(cid, "invalid_request",
                                          f"line {n}: needs method POST, url one of {sorted(ROUTES)}, and a body")))
            continue
        try:
            req = ROUTES[url].model_validate({**body, "stream": False})
        except ValidationError as e:
            err = e.errors()[0] if e.errors() else {}
            loc = ".".join(str(x) for x in err.get("loc", ()))
            jobs.append((cid, _error_line(cid, "invalid_request", f"line {n}: {loc}: {err.get('msg', e)}", 400)))
            continue
        jobs.append((cid, req))

    sem = asyncio.Semaphore(max_concurrency)
    stats = {"total": len(jobs), "succeeded": 0, "failed": 0, "skipped": len(done)}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="batch", unit="req")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    torn = output_path.exists() and output_path.stat().st_size > 0 and not output_path.read_bytes().endswith(b"\n")
    with output_path.open("a", encoding="utf-8") as out:
        if torn:  # an interrupted run left half a line: end it so new lines stay whole
            out.write("\n")
        async def one(cid, job):
            if isinstance(job, dict):
                line = job
            else:
                async with sem:
                    try:
                        body = await (serving.chat(job) if isinstance(job, ChatCompletionRequest)
                                      else serving.completions(job))
                        line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid,
                                "response": {"status_code": 200, "request_id": body["id"], "body": body},
                                "error": None}
                    except ApiError as e:
                        line = _error_line(cid, e.code or e.type, e.message, e.status, e.body())
                    except Exception as e:  # noqa: BLE001 - recorded per line, the run goes on
                        line = _error_line(cid, "internal_error", f"{type(e).__name__}: {e}", 500)
            stats["failed" if line["error"] else "succeeded"] += 1
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            if bar is not None:
                bar.update(1)

        await asyncio.gather(*(one(cid, job) for cid, job in jobs))
    if bar is not None:
        bar.close()
    return stats
