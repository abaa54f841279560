"""One engine step on the device: flatten the scheduled requests to T tokens (varlen, no padding),
build the step's metadata once, run the model, and sample the next token of every request whose
scheduled tokens reach its end (plus prompt logprobs where asked). Pure decode steps replay a captured
graph (engine/cuda_graphs.py) when the engine made one. Under expert parallelism (`sync`), the ranks first
agree on the step (parallel/step_sync.py) and a rank with nothing scheduled still takes part."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.cache.model_cache import ModelCache
from dsv4.engine.cuda_graphs import DecodeGraphs
from dsv4.engine.request import Request
from dsv4.engine.sampler import Sampler, SamplingRow, TokenLogprobs, prompt_logprobs
from dsv4.model.builder import LoadedModel
from dsv4.ops.meta import ForwardMeta
from dsv4.parallel.step_sync import EAGER, GRAPH, NONE, StepSync


@dataclass
class StepResult:
    token_id: int | None = None  # sampled next token (None: a prefill chunk that did not reach the end)
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # for prompt positions covered by this step


class ModelRunner:
    def __init__(self, lm: LoadedModel, cache: ModelCache, sampler: Sampler | None = None,
                 graphs: DecodeGraphs | None = None, sync: StepSync | None = None, scratch_slot: int | None = None):
        if sync is not None and scratch_slot is None:
            raise ValueError("lockstep (expert-parallel) steps need a scratch cache slot for ranks without work")
        self.lm, self.cache = lm, cache
        self.sync, self.scratch = sync, scratch_slot
        self.model = lm.model
        self.device = lm.platform.torch_device
        self.sampler = sampler or Sampler()
        self.graphs = graphs
        self.graph_steps = 0

    def _graph_step(self, reqs, starts, ns) -> bool:
        """A pure decode step (one token per request, each reaching its end, no prompt logprobs) that fits a
        graph bucket."""
        return (self.graphs is not None and len(reqs) <= self.graphs.batch_buckets[-1]
                and all(n == 1 and s + 1 == r.num_tokens and r.params.prompt_logprobs is None
                        for r, s, n in zip(reqs, starts, ns)))

    def _sample(self, logits, reqs, sample_at, results) -> None:
        srows = [SamplingRow(params=reqs[i].params, prompt_token_ids=reqs[i].prompt_token_ids,
                             output_token_ids=reqs[i].output_token_ids, generator=reqs[i].generator,
                             stop_ids=reqs[i].eos_token_ids | frozenset(reqs[i].params.stop_token_ids))
                 for i, _ in sample_at]
        toks, lps = self.sampler(logits[[k for _, k in sample_at]], srows)
        for (i, _), t, lp in zip(sample_at, toks, lps):
            results[i].token_id = t
            results[i].logprobs = lp

    @torch.no_grad()
    def execute(self, scheduled: list[tuple[Request, int]]) -> list[StepResult]:
        reqs = [r for r, _ in scheduled]
        ns = [n for _, n in scheduled]
        starts = [r.num_computed_tokens for r in reqs]
        ids = [t for r, s, n in zip(reqs, starts, ns) for t in r.token_slice(s, s + n)]
        results = [StepResult() for _ in reqs]
        graph = bool(reqs) and self._graph_step(reqs, starts, ns)
        if self.sync is None:
            return self._run(reqs, starts, ns, ids, results, graph, None)
        plan = self.sync.agree(NONE if not reqs else GRAPH if graph else EAGER, len(reqs),
                               max((s + n for s, n in zip(starts, ns)), default=0), len(ids))
        if plan.kind == NONE:
            return results
        if plan.kind == GRAPH:
            return self._run(reqs, starts, ns, ids, results, True, self.graphs.bucket(plan.batch, plan.max_len))
        with self.sync.tokens(plan.tokens):
            if not reqs:  # the others run a step: take part with one token on the scratch slot
                meta = ForwardMeta.build([self.scratch], [0], [1], self.device)
                self.model(torch.zeros(1, dtype=torch.int64, device=self.device), meta, self.cache, check_cache=False)
                return results
            return self._run(reqs, starts, ns, ids, results, False, None)

    def _run(self, reqs, starts, ns, ids, results, graph: bool, bucket) -> list[StepResult]:
        if graph:
            logits = self.graphs.run(torch.tensor(ids, dtype=torch.int64), [r.slot for r in reqs], starts,
                                     bucket=bucket)
            self.graph_steps += 1
            if reqs:
                self._sample(logits, reqs, [(i, i) for i in range(len(reqs))], results)
            return results
        meta = ForwardMeta.build([r.slot for r in reqs], starts, ns, self.device)
        X = self.model(torch.tensor(ids, dtype=torch.int64, device=self.device), meta, self.cache)

        rows: list[int] = []  # token rows of X whose logits we need
        sample_at: list[tuple[int, int]] = []  # (request index, row position in `rows`)
        plp_at: list[tuple[int, int, int, list[int]]] = []  # (request index, first row, count, next ids)
        for i, (r, s, n) in enumerate(zip(reqs, starts, ns)):
            q0 = meta.query_start_host[i]
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
        if not rows:
            return results
        logits = self.model.logits(X[torch.tensor(rows, device=self.device)])
        if sample_at:
            self._sample(logits, reqs, sample_at, results)
        for i, k, c, nxt in plp_at:
            results[i].prompt_logprobs = prompt_logprobs(logits[k:k + c], nxt, reqs[i].params.prompt_logprobs)
        return results
