"""One engine step on the device: turn the scheduled requests into one StepBatch (engine/step_batch.py:
T tokens, varlen, no padding; or a decode graph bucket), agree on it with the other ranks through the
coordinator (engine/coordinator.py; a lone engine's agrees with itself), run the model, and sample the
next token of every request whose scheduled tokens reach its end (plus prompt logprobs where asked). Pure
decode steps replay a captured graph (engine/cuda_graphs.py) when the engine made one. In lockstep
(expert parallelism) a rank with nothing scheduled still takes part (a one-token step on its scratch slot,
or the agreed graph over scratch rows)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dsv4.cache.kv_manager import KVCacheManager
from dsv4.cache.spec_state import StateSnapshot, rollback
from dsv4.engine.async_decode import PendingDecode
from dsv4.engine.coordinator import EAGER, GRAPH, NONE, SingleRank, StepCoordinator
from dsv4.engine.cuda_graphs import DecodeGraphs
from dsv4.engine.request import Request
from dsv4.engine.sampler import Sampler, SamplingRow, TokenLogprobs, prompt_logprobs
from dsv4.engine.spec_decode import plain_argmax, verify_all
from dsv4.engine.step_batch import StepBatch, StepBuffers, build_eager, stage_decode
from dsv4.engine.to_device import to_device
from dsv4.model.builder import LoadedModel
from dsv4.ops.meta import ForwardMeta

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    token_id: int | None = None  # sampled next token (None: a prefill chunk that did not reach the end)
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # for prompt positions covered by this step
    # speculative decoding: the step verified drafts; it emits `tokens` (accepted drafts + one) and keeps
    # the first `kept` = len(tokens) of its scheduled tokens in the cache (the rest were rejected drafts)
    tokens: list[int] | None = None
    token_logprobs: list[TokenLogprobs | None] | None = None
    drafted: int = 0

    @property
    def kept(self) -> int | None:
        return None if self.tokens is None else len(self.tokens)


class ModelRunner:
    def __init__(self, lm: LoadedModel, kv: KVCacheManager, buffers: StepBuffers, sampler: Sampler | None = None,
                 graphs: DecodeGraphs | None = None, coordinator: StepCoordinator | None = None,
                 scratch_slot: int | None = None, drafter=None, verify_graphs: DecodeGraphs | None = None,
                 draft_graphs=None, piecewise=None, spec_pause_batch: int | None = None):
        self.coord = coordinator or SingleRank()
        if self.coord.lockstep and scratch_slot is None:
            raise ValueError("lockstep (expert-parallel) steps need a scratch cache slot for ranks without work")
        self.lm, self.kv, self.cache = lm, kv, kv.cache
        self.buffers, self.scratch = buffers, scratch_slot
        self.model = lm.model
        self.device = lm.platform.torch_device
        self.sampler = sampler or Sampler()
        self.graphs = graphs
        self.drafter = drafter  # speculative decoding (engine/spec_decode.py), or None
        self.verify_graphs = verify_graphs  # speculative decoding: graphs of q = drafts + 1 tokens per sequence
        self.draft_graphs = draft_graphs  # MTP drafting after verify graph steps (engine/draft_graphs.py), or None
        # no drafts in steps where more than this many requests decode (the MTP block still writes its ring);
        # None: never. Under expert parallelism (ranks would disagree on the step shape) it is not applied
        self.spec_pause_batch = None if self.coord.lockstep else spec_pause_batch
        self.spec_paused_steps = 0
        self._spec_paused = False
        # steps decode graphs do not cover, up to its largest token bucket (engine/piecewise_graphs.py), or None;
        # not under expert parallelism (those eager steps exchange tokens with counts agreed per layer)
        self.piecewise = piecewise if not self.coord.lockstep else None
        self.piecewise_steps = 0
        self.verify_graph_steps = 0
        self.graph_steps = 0
        self.last_batch: StepBatch | None = None  # (tests: what the model received)
        # verify graph steps of plain-argmax requests: acceptance on the device, the draft graph right after the
        # verify graph (False: the host's sampler path always; tests compare the two)
        self.device_accept = True
        self.async_steps = 0  # decode steps launched before the previous step's tokens were read (async_decode.py)
        self._async_host: list[torch.Tensor] = []  # two pinned read-back buffers, taken in turn
        self._async_turn = 0

    def _graph_step(self, reqs, starts, ns) -> bool:
        """A pure decode step (one token per request, each reaching its end, no prompt logprobs) that fits a
        graph bucket."""
        return (self.graphs is not None and self.drafter is None and len(reqs) <= self.graphs.batch_buckets[-1]
                and all(n == 1 and s + 1 == r.num_tokens and r.params.prompt_logprobs is None
                        for r, s, n in zip(reqs, starts, ns)))

    def _verify_graph_step(self, reqs, starts, ns) -> bool:
        """Every sequence runs its last token and exactly q - 1 drafts, no prompt logprobs, and the batch
        fits a verify graph bucket."""
        vg = self.verify_graphs
        return (vg is not None and len(reqs) <= vg.batch_buckets[-1]
                and all(n == vg.q and s + 1 == r.num_tokens and r.params.prompt_logprobs is None
                        for r, s, n in zip(reqs, starts, ns)))

    def _sample(self, logits, reqs, sample_at, results) -> None:
        srows = self._rows([reqs[i] for i, _ in sample_at])
        ks = [k for _, k in sample_at]
        rows = logits[:len(ks)] if ks == list(range(len(ks))) else logits[ks]  # (decode: a view, no [B, V] copy)
        toks, lps = self.sampler(rows, srows)
        for (i, _), t, lp in zip(sample_at, toks, lps):
            results[i].token_id = t
            results[i].logprobs = lp

    @property
    def async_capable(self) -> bool:
        """Decode steps may be launched before the previous one is read back (engine/async_decode.py): not with
        a drafter (speculative steps) nor in lockstep (expert parallelism)."""
        return self.drafter is None and not self.coord.lockstep

    def _rows(self, reqs) -> list[SamplingRow]:
        return [SamplingRow(params=r.params, prompt_token_ids=r.prompt_token_ids, output_token_ids=r.output_token_ids,
                            generator=r.generator, stop_ids=r.stop_ids, request_id=r.request_id) for r in reqs]

    def _async_buffer(self, B: int) -> torch.Tensor | None:
        """A pinned buffer for a step's read-back, the two used in turn (one step in flight while the one
        before is read). None on the CPU."""
        if self.device.type != "cuda":
            return None
        if not self._async_host or self._async_host[0].numel() < 2 * B:
            n = 2 * max(B, self.buffers.max_seqs)
            self._async_host = [torch.empty(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._async_turn ^= 1
        return self._async_host[self._async_turn]

    @torch.no_grad()
    def launch_decode(self, reqs: list[Request], prev: PendingDecode | None = None) -> PendingDecode:
        """Launch a pure decode step of `reqs` (one token each, at the end of its cache) and draw its tokens on
        the device without reading them back (`finish_decode` does). With `prev` (the step in flight), each
        request's input token is the one `prev` drew for it, copied on the device: its host token list does not
        have it yet. A decode graph replays when one fits, else the eager (or piecewise graph) forward."""
        if not self.async_capable:
            raise RuntimeError("async decode steps need a single rank without speculative decoding")
        B = len(reqs)
        slots = [r.slot for r in reqs]
        starts = [self.kv.seq_len(s) for s in slots]
        src = None
        if prev is None:
            ids = [r.token_slice(s, s + 1)[0] for r, s in zip(reqs, starts)]
        else:
            ids = [0] * B
            row = {id(r): i for i, r in enumerate(prev.reqs)}
            idx = [row[id(r)] for r in reqs]
            src = prev.drawn.tokens if idx == list(range(len(prev.reqs))) else \
                prev.drawn.tokens[to_device(idx, torch.int64, self.device)]
        self.kv.begin_step(slots, starts, [s + 1 for s in starts])
        self.kv.sync_block_table()
        g = self.graphs
        if g is not None and B <= g.batch_buckets[-1]:
            key = g.bucket(B, max(starts) + 1)
            g.ensure(key)
            dev_ids = stage_decode(self.buffers, key[0], self.scratch, ids, slots, starts)
            if src is not None:
                dev_ids[:B].copy_(src)
            batch = StepBatch(reqs, starts, [1] * B, dev_ids, None, key)
            logits = g.replay(key)[:B]
            self.graph_steps += 1
        else:
            pad = self.piecewise.bucket(B) if self.piecewise is not None else None
            batch = build_eager(self.buffers, reqs, starts, [1] * B, slots, self.cache.block_table, ids=ids, pad_to=pad)
            if src is not None:
                batch.ids.copy_(src)
            if pad is not None:
                X = self.piecewise.run(pad, batch.meta)
                self.piecewise_steps += 1
            else:
                X = self.model(batch.ids, batch.meta, self.cache)
            logits = self.model.logits(X[:B])
        self.last_batch = batch
        self.async_steps += prev is not None
        drawn = self.sampler.draw(logits, self._rows(reqs), host=self._async_buffer(B), pending=src)
        return PendingDecode(list(reqs), drawn)

    def finish_decode(self, p: PendingDecode) -> list[StepResult]:
        """Read the tokens (and logprobs) of a launched decode step (waits for that step only)."""
        toks = self.sampler.read(p.drawn)
        return [StepResult(token_id=t, logprobs=lp) for t, lp in zip(toks, p.drawn.logprobs)]

    @torch.no_grad()
    def execute(self, scheduled: list[tuple[Request, int]]) -> list[StepResult]:
        reqs = [r for r, _ in scheduled]
        ns = [n for _, n in scheduled]
        starts = [r.num_computed_tokens for r in reqs]
        results = [StepResult() for _ in reqs]
        verify_graph = bool(reqs) and self._verify_graph_step(reqs, starts, ns)
        graph = bool(reqs) and (verify_graph or self._graph_step(reqs, starts, ns))
        plan = self.coord.agree(NONE if not reqs else GRAPH if graph else EAGER, len(reqs),
                                max((s + n for s, n in zip(starts, ns)), default=0), sum(ns))
        if plan.kind == NONE:
            return results
        slots = [r.slot for r in reqs]
        self.kv.begin_step(slots, starts, [s + n for s, n in zip(starts, ns)])
        self.kv.sync_block_table()
        ep_tokens = plan.tokens if self.coord.lockstep else None
        if plan.kind == GRAPH and self.verify_graphs is not None and (verify_graph or not reqs):
            # (in lockstep every rank replays the agreed bucket; a rank without requests: all padding rows)
            key = self.verify_graphs.bucket(plan.batch, plan.max_len) if self.coord.lockstep else None
            return self._run_verify_graph(reqs, starts, ns, slots, results, key)
        if plan.kind == GRAPH:
            key = self.graphs.bucket(plan.batch, plan.max_len)
            self.graphs.ensure(key)
            ids = [r.token_slice(s, s + 1)[0] for r, s in zip(reqs, starts)]
            dev_ids = stage_decode(self.buffers, key[0], self.scratch, ids, slots, starts)
            self.last_batch = StepBatch(reqs, starts, ns, dev_ids, None, key)
            logits = self.graphs.replay(key)
            self.graph_steps += 1
            if reqs:
                self._sample(logits, reqs, [(i, i) for i in range(len(reqs))], results)
            return results
        if not reqs:  # the others run a step: take part with one token on the scratch slot (lengths unrecorded)
            batch = build_eager(self.buffers, [], [0], [1], [self.scratch], self.cache.block_table, ep_tokens, ids=[0])
            self.last_batch = batch
            self.model(batch.ids, batch.meta, self.cache)
            if getattr(self.drafter, "needs_streams", False):  # (the MTP drafter's passes are collective too)
                self.drafter.take_part(self.device, self.cache.block_table)
            return results
        pad = self.piecewise.bucket(sum(ns)) if self.piecewise is not None else None
        batch = build_eager(self.buffers, reqs, starts, ns, slots, self.cache.block_table, ep_tokens, pad_to=pad)
        self.last_batch = batch
        return self._run_eager(batch, results)

    def _run_verify_graph(self, reqs, starts, ns, slots, results, key=None) -> list[StepResult]:
        vg = self.verify_graphs
        q = vg.q
        key = key or vg.bucket(len(reqs), max(s + q for s in starts))
        vg.ensure(key)
        ids = [t for r, s in zip(reqs, starts) for t in r.token_slice(s, s + q)]
        dev_ids = stage_decode(self.buffers, key[0], self.scratch, ids, slots, starts, q)
        logits = vg.replay(key)
        self.verify_graph_steps += 1
        snap, meta = vg.spec_state(key, slots, starts)
        batch = StepBatch(reqs, starts, ns, dev_ids, meta, key)
        self.last_batch = batch
        mtp_graphs = (self.draft_graphs is not None and getattr(self.drafter, "needs_streams", False)  # (the MTP drafter)
                      and not self._pause_drafts(len(reqs), record=False))  # (paused: _draft below records it)
        if mtp_graphs and reqs and self.device_accept and all(plain_argmax(r, q - 1) for r in reqs):
            if self._accept_on_device(batch, key, slots, starts, results):
                return results
            mtp_graphs = False  # (non-finite logits: the sampler's path below raises its error)
        self._verify(batch, logits, [(i, i * q) for i in range(len(reqs))], [q - 1] * len(reqs), snap, results,
                     rollback_fn=lambda keep: vg.rollback(key, slots, starts, keep))
        if mtp_graphs:
            for r, (dr, dq) in zip(reqs, self.draft_graphs.run(key[0], [res.tokens for res in results], reqs)):
                r.set_drafts(dr, dq)
            self._oracle_override(reqs, [res.tokens for res in results])
        elif self.drafter is not None and reqs:
            self._draft(batch, vg.streams, results)
        elif getattr(self.drafter, "needs_streams", False):  # (lockstep, no requests here: the MTP passes are collective)
            self.drafter.take_part(self.device, self.cache.block_table)
        return results

    def _accept_on_device(self, batch: StepBatch, key, slots, starts, results) -> bool:
        """A verify graph step whose requests all take the plain argmax: acceptance on the device and the greedy
        draft graph replayed right after the verify graph (draft_graphs.run_accepting: one read-back for the
        verdicts and the new drafts), then the bookkeeping `_verify` does (results, cache lengths, rollback of
        the rejected drafts' state). The device's verdict is checked against each request's drafts on the
        host. False (nothing recorded) when some logits row is not finite: the sampler's path reports it."""
        vg, reqs, q = self.verify_graphs, batch.reqs, self.verify_graphs.q
        got = self.draft_graphs.run_accepting(key[0], len(reqs))
        if any(bad for _, _, bad, _ in got):
            return False
        keep: dict[int, int] = {}
        for i, (r, (tok, kept, _, _)) in enumerate(zip(reqs, got)):
            d = r.spec_ids[:q - 1]
            a = kept - 1
            if not (0 <= a < q and tok[:a] == d[:a] and (a == q - 1 or tok[a] != d[a])):
                raise RuntimeError(f"request {r.request_id}: the device accepted {a} of the drafts {d} against the "
                                   f"argmax tokens {tok} (staged inputs and drafts disagree)")
            res = results[i]
            res.drafted = q - 1
            res.tokens, res.token_logprobs = tok[:kept], [None] * kept
            if kept < q:
                keep[i] = kept
                self.kv.truncate(slots[i], starts[i] + kept)
        vg.rollback(key, slots, starts, keep)
        for r, (_, _, _, drafts) in zip(reqs, got):
            r.set_drafts(drafts)
        self._oracle_override(reqs, [res.tokens for res in results])
        return True

    def _verify(self, batch: StepBatch, logits, verify_at, k, snap, results, rollback_fn=None) -> None:
        """Accept or reject the drafts of the sequences in `verify_at` ((request index, its first logits row));
        k[i]: drafts of request i. Rolls back the state of sequences that lost drafts (`rollback_fn(keep)`: the
        verify graphs' own rollback; default cache/spec_state.rollback)."""
        reqs, meta = batch.reqs, batch.meta
        items = [(reqs[i], logits[j:j + batch.num_new[i]], reqs[i].spec_ids[:k[i]]) for i, j in verify_at]
        keep: dict[int, int] = {}
        for (i, _), (toks, lps) in zip(verify_at, verify_all(self.sampler, items)):
            res = results[i]
            res.drafted = k[i]
            res.tokens, res.token_logprobs = toks, lps
            if res.kept < batch.num_new[i]:
                keep[i] = res.kept
                self.kv.truncate(meta.seq_slots_host[i], batch.starts[i] + res.kept)
        if rollback_fn is not None:
            rollback_fn(keep)
        else:
            rollback(snap, meta, keep)

    def _run_eager(self, batch: StepBatch, results: list[StepResult]) -> list[StepResult]:
        meta, reqs = batch.meta, batch.reqs
        # drafts in this step: sequence i runs its last token and k[i] drafts (engine/spec_decode.py)
        k = [s + n - r.num_tokens for r, s, n in zip(reqs, batch.starts, batch.num_new)]
        spec = [i for i, ki in enumerate(k) if ki > 0]
        snap = None
        if spec:
            meta.redo = []
            snap = StateSnapshot(self.cache.layers, [meta.seq_slots_host[i] for i in spec],
                                 [batch.starts[i] for i in spec], [batch.num_new[i] for i in spec])
        shots = self._snapshots_inside(batch)
        try:
            results = self._eager_forward(batch, results, k, spec, snap, shots)
        except BaseException:
            for *_, s in shots:
                self.kv.prefix.give_back(s)
            raise
        for _, _, key, s in shots:
            self.kv.prefix.put(key, s)
        return results

    def _snapshots_inside(self, batch: StepBatch) -> list[tuple[int, int, bytes, int]]:
        """Prefix caching: (request index, point, key, snapshot slot) for each snapshot point strictly inside a
        request's tokens of this step. Each snapshot slot gets a copy of the request's slot now; after the
        forward, the step's writes of the tokens before the point are redone onto it (the machinery of
        speculative rollback, cache/spec_state.py): the state at the point, without a step ending there."""
        pc = self.kv.prefix
        if pc is None:
            return []
        shots = []
        for i, (r, s, n) in enumerate(zip(batch.reqs, batch.starts, batch.num_new)):
            for p, key in (pc.inside(r, s, n) if r.snapshot_points else ()):
                slot = pc.take_slot()
                if slot is not None:
                    shots.append((i, p, key, slot))
        if shots:
            if batch.meta.redo is None:
                batch.meta.redo = []
            self.cache.copy_slots([batch.meta.seq_slots_host[i] for i, *_ in shots], [s for *_, s in shots])
        return shots

    def _redo_onto_snapshots(self, batch: StepBatch, shots, redo: list, row0: list[int]) -> None:
        """Redo the writes recorded in `redo` of request i's tokens start .. point - 1 (its rows from row0[i])
        onto each shot's snapshot slot."""
        for i, p, _, s in shots:
            c = batch.starts[i]
            sub = ForwardMeta.build([s], [c], [p - c], device=self.device, block_table=self.cache.block_table)
            rows = torch.arange(row0[i], row0[i] + p - c, device=self.device)
            for f in redo:
                f(rows, sub)

    def _eager_forward(self, batch: StepBatch, results, k, spec, snap, shots) -> list[StepResult]:
        meta, reqs = batch.meta, batch.reqs
        if batch.piecewise is not None:
            X = self.piecewise.run(batch.piecewise, meta)
            self.piecewise_steps += 1
        else:
            X = self.model(batch.ids, meta, self.cache)
        if shots:
            self._redo_onto_snapshots(batch, shots, meta.redo, meta.query_start_host)
        rows: list[int] = []  # token rows of X whose logits we need
        sample_at: list[tuple[int, int]] = []  # (request index, row position in `rows`)
        verify_at: list[tuple[int, int]] = []  # (request index, first of its k + 1 rows in `rows`)
        plp_at: list[tuple[int, int, int, list[int]]] = []  # (request index, first row, count, next ids)
        for i, (r, s, n) in enumerate(zip(reqs, batch.starts, batch.num_new)):
            q0 = meta.query_start_host[i]
            if k[i] > 0:
                verify_at.append((i, len(rows)))
                rows.extend(range(q0, q0 + n))
                continue
            want = r.params.prompt_logprobs
            if want is not None:
                # prompt positions p (< prompt length - 1) in this step whose logprobs are not yet recorded
                lo = max(s, len(r.prompt_logprobs) - 1 if r.prompt_logprobs else 0)
                hi = min(s + n, r.num_prompt_tokens - 1)
                if hi > lo:
                    plp_at.append((i, len(rows), hi - lo, r.prompt_token_ids[lo + 1:hi + 1]))
                    rows.extend(range(q0 + lo - s, q0 + hi - s))
            if s + n == r.num_tokens:
                sample_at.append((i, len(rows)))
                rows.append(q0 + n - 1)
        if rows:
            logits = self.model.logits(X[to_device(rows, torch.int64, self.device)])
            if sample_at:
                self._sample(logits, reqs, sample_at, results)
            for i, j, c, nxt in plp_at:
                results[i].prompt_logprobs = prompt_logprobs(logits[j:j + c], nxt, reqs[i].params.prompt_logprobs)
            if verify_at:
                self._verify(batch, logits, verify_at, k, snap, results)
        if self.drafter is not None:
            self._draft(batch, X, results, shots)
        elif spec:
            for i in spec:
                reqs[i].set_drafts([])
        return results

    def _pause_drafts(self, decoding: int, record: bool = True) -> bool:
        """Speculation pauses in a step where more than spec_pause_batch requests decode (`record`: counted in
        spec_paused_steps, logged when it pauses and resumes)."""
        paused = self.spec_pause_batch is not None and decoding > self.spec_pause_batch
        if not record or not decoding:  # (a step with nothing decoding neither pauses nor resumes)
            return paused
        if paused != self._spec_paused:
            log.info("speculative decoding %s: %d requests decoding (pauses above %d)",
                     "paused" if paused else "resumed", decoding, self.spec_pause_batch)
            self._spec_paused = paused
        self.spec_paused_steps += paused
        return paused

    def _oracle_override(self, reqs, new) -> None:
        """A draft oracle over the MTP passes (spec_decode.OracleDrafter with `inner`): after the passes ran, its
        tokens replace their drafts (new[i]: the tokens reqs[i] emits in this step)."""
        if getattr(self.drafter, "inner", None) is not None:
            self.drafter.override(reqs, new)

    def _draft(self, batch: StepBatch, X: torch.Tensor, results: list[StepResult], shots=()) -> None:
        """Drafts for the next step (the drafter sets each sampling request's spec_ids); `shots`: prefix-cache
        snapshots inside this step, whose MTP ring rows the MTP pass's writes are redone onto."""
        reqs, meta = batch.reqs, batch.meta
        kept, nxt, sample = [], [], []
        for i, (r, s, n) in enumerate(zip(reqs, batch.starts, batch.num_new)):
            res = results[i]
            if res.tokens is not None:  # verified: its kept tokens, then the new one
                kept.append(res.kept)
                nxt.append(r.spec_ids[:res.kept - 1] + [res.tokens[-1]])
                sample.append(True)
            else:
                kept.append(n)
                after = [res.token_id] if res.token_id is not None else r.token_slice(s + n, s + n + 1)
                nxt.append(r.token_slice(s + 1, s + n) + after)
                sample.append(res.token_id is not None)
            if sample[-1]:
                r.set_drafts([])
        if self._pause_drafts(sum(sample)):  # no drafts this step: the MTP pass only writes its ring
            sample = [False] * len(sample)
        # (tokens this step emits: not yet in the requests' outputs)
        new = [res.tokens if res.tokens is not None else [res.token_id] for res in results]
        if getattr(self.drafter, "needs_streams", False):
            redo = [] if shots else None
            self.drafter.propose(reqs, X=X, meta=meta, kept=kept, next_ids=nxt, sample=sample, redo=redo)
            if shots:
                self._redo_onto_snapshots(batch, shots, redo, [sum(kept[:i]) for i in range(len(kept))])
            self._oracle_override([r for r, f in zip(reqs, sample) if f], [t for t, f in zip(new, sample) if f])
        else:
            self.drafter.propose([r for r, f in zip(reqs, sample) if f], new=[t for t, f in zip(new, sample) if f])
