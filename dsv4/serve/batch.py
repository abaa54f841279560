"""`dsv4 batch INPUT.jsonl OUTPUT.jsonl`: OpenAI batch files through the engine with full continuous
batching (all lines in flight at once, up to a concurrency bound).

Input lines: {"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}. Output lines (in completion order, appended and flushed one by one): {"id", "custom_id",
"response": {"status_code", "request_id", "body"} | null, "error": null | {"code", "message", "line"}}.
A bad line is recorded as an error line; it never stops the run. A line that has no usable custom_id of
its own (not JSON, no custom_id or not a string, a custom_id already used by an earlier line) gets
"custom_id": null and is named by its input line number in error.line (as OpenAI's batch errors name
lines): it can never be mistaken for another request's line.

Resumable: the custom_ids, and the line numbers of null-id error lines, already in OUTPUT are skipped (the
input is assumed unchanged). Lines of OUTPUT that do not parse (a torn last line from a killed run) are
dropped first, so that the file stays valid JSONL; their requests run again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path

from pydantic import ValidationError

from dsv4.serve.handlers import ApiError, OpenAIServing
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest

ROUTES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


def _clean_output(output: Path) -> tuple[list[dict], int]:
    """The parsed lines of an existing OUTPUT, after dropping those that do not parse (a torn last line
    from a killed run; the request runs again) from the file itself. Returns (rows, lines dropped)."""
    if not output.exists():
        return [], 0
    data = output.read_bytes()
    pieces = data.split(b"\n")
    rows, kept, dropped = [], [], 0
    for piece in pieces:
        try:
            row = json.loads(piece)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            row = None
        if isinstance(row, dict):
            rows.append(row)
            kept.append(piece)
        elif piece.strip():
            dropped += 1
    clean = b"".join(k + b"\n" for k in kept)
    if clean != data:
        if data.startswith(clean):  # only a torn (or blank) tail: cut it off in place
            os.truncate(output, len(clean))
        else:  # bad lines in the middle, or a last line without its newline: rewrite, atomically
            tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(clean)
            shutil.copymode(output, tmp)
            os.replace(tmp, output)
    return rows, dropped


def _done(rows: list[dict]) -> tuple[set[str], set[int]]:
    """custom_ids with a line, and input line numbers with a null-id error line."""
    ids, lines = set(), set()
    for r in rows:
        cid, err = r.get("custom_id"), r.get("error")
        if isinstance(cid, str):
            ids.add(cid)
        elif cid is None and isinstance(err, dict) and isinstance(err.get("line"), int):
            lines.add(err["line"])
    return ids, lines


def _error_line(cid, line: int | None, code: str, message: str, status: int | None = None,
                body: dict | None = None) -> dict:
    resp = None if status is None else {"status_code": status, "request_id": None, "body": body}
    err = {"code": code, "message": message}
    if line is not None:
        err["line"] = line
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid, "response": resp, "error": err}


async def run_batch(serving: OpenAIServing, input_path: str | Path, output_path: str | Path,
                    max_concurrency: int = 256, progress: bool = True) -> dict:
    input_path, output_path = Path(input_path), Path(output_path)
    lines = input_path.read_text(encoding="utf-8").splitlines()
    rows, dropped = _clean_output(output_path)
    done_ids, done_lines = _done(rows)
    jobs: list[tuple[object, int, object]] = []  # (custom_id, line number, request model or error line dict)
    first_line: dict[str, int] = {}  # custom_id -> the line that uses it
    skipped = 0

    def line_error(n: int, code: str, why: str) -> None:  # a line without a usable custom_id of its own
        nonlocal skipped
        if n in done_lines:
            skipped += 1
        else:
            jobs.append((None, n, _error_line(None, n, code, f"line {n}: {why}")))

    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
            if not isinstance(item, dict):
                raise ValueError("a line must be a JSON object")
        except ValueError as e:  # JSONDecodeError too
            line_error(n, "invalid_json", str(e))
            continue
        cid = item.get("custom_id")
        if cid is None:
            line_error(n, "invalid_request", "missing custom_id")
            continue
        if not isinstance(cid, str) or not cid:
            line_error(n, "invalid_request", f"custom_id must be a non-empty string, got {json.dumps(cid)}")
            continue
        if cid in first_line:
            line_error(n, "invalid_request", f"duplicate custom_id {cid!r} (first used on line {first_line[cid]})")
            continue
        first_line[cid] = n
        if cid in done_ids:
            skipped += 1
            continue
        url, method, body = item.get("url"), item.get("method", "POST"), item.get("body")
        if method != "POST" or url not in ROUTES or not isinstance(body, dict):
            jobs.append((cid, n, _error_line(cid, n, "invalid_request", f"line {n}: needs method POST, url one "
                                                                        f"of {sorted(ROUTES)}, and a body")))
            continue
        try:
            req = ROUTES[url].model_validate({**body, "stream": False})
        except ValidationError as e:
            err = e.errors()[0] if e.errors() else {}
            loc = ".".join(str(x) for x in err.get("loc", ()))
            jobs.append((cid, n, _error_line(cid, n, "invalid_request", f"line {n}: {loc}: {err.get('msg', e)}",
                                             400)))
            continue
        jobs.append((cid, n, req))

    sem = asyncio.Semaphore(max_concurrency)
    stats = {"total": len(jobs), "succeeded": 0, "failed": 0, "skipped": skipped, "dropped_output_lines": dropped}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="batch", unit="req")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("a", encoding="utf-8") as out:
        async def one(cid, n, job):
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
                        line = _error_line(cid, n, e.code or e.type, e.message, e.status, e.body())
                    except Exception as e:  # noqa: BLE001 - recorded per line, the run goes on
                        line = _error_line(cid, n, "internal_error", f"{type(e).__name__}: {e}", 500)
            stats["failed" if line["error"] else "succeeded"] += 1
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            if bar is not None:
                bar.update(1)

        await asyncio.gather(*(one(*job) for job in jobs))
    if bar is not None:
        bar.close()
    return stats
