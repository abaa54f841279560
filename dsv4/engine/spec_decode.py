"""Speculative decoding: drafts proposed for each decoding request, verified in the next step's one target
forward (the last token and its k drafts as one chunk), accepted so that the output keeps the target's
distribution exactly.

- Verification (`verify`): greedy requests accept the drafts while each equals the target's greedy token
  (penalties, logit_bias and min_tokens applied per position as the sampler applies them), then emit the
  target's token at the first mismatch (or the bonus token after the last draft): the output is the one of
  plain decoding. Sampled requests use rejection sampling (speculative sampling): draft d at position j, drawn
  from the drafter's distribution q_j, is accepted with probability min(1, p_j(d) / q_j(d)) (p_j: the target's
  processed distribution: penalties, temperature, top-k / top-p / min-p); on rejection the token is drawn from
  max(p_j - q_j, 0), renormalised; all accepted, the bonus token is drawn from p_k. The emitted tokens follow
  p exactly whatever q is. The MTP drafter samples its drafts for sampled requests (`draft_choose`: q_j =
  softmax of its logits at the request's temperature), so a draft is accepted with probability
  sum_x min(p_j(x), q_j(x)) instead of p_j(argmax q_j) for a greedy draft (much more when p is flat); drafts
  without a distribution (greedy drafter, the oracle) count as one-hot q (accepted with probability p_j(d), on
  rejection drawn from p_j without d). Every draw (the drafts' uniforms too) comes from the request's own
  generator, so a seeded request is reproducible (its tokens differ from those of the same seed without
  speculation: other draws).
- Rollback: what the rejected drafts wrote into per-slot state is undone (cache/spec_state.py).
- Drafters: `MTPDrafter` runs the checkpoint's MTP block (spec §6) over the step's kept positions (filling
  its own window ring), then k - 1 more single-token steps fed by its own output streams; `OracleDrafter`
  (benchmarks and tests only) replays known continuations, each draft kept with a chosen probability and
  otherwise replaced by a wrong token, so step costs and speed-up can be measured against acceptance
  without real weights.
"""

from __future__ import annotations

import array
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.cache.spec_state import StateSnapshot
from dsv4.engine.request import Request
from dsv4.engine.sampler import (Sampler, SamplingRow, TokenLogprobs, apply_penalties, suppress_stop_ids,
                                 token_logprobs, truncate)
from dsv4.engine.to_device import to_device
from dsv4.ops.meta import ForwardMeta


class _Extended(Sequence):
    """The output so far followed by some drafts, without copying the output (a row per verified position of a
    long output would copy it k + 1 times a step)."""

    def __init__(self, base: Sequence[int], tail: list[int]):
        self.base, self.tail = base, tail

    def __len__(self) -> int:
        return len(self.base) + len(self.tail)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self.base)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.base[i] if i < n else self.tail[i - n]

    def __iter__(self):
        yield from self.base
        yield from self.tail


def _rows(req: Request, drafts: list[int]) -> list[SamplingRow]:
    """One sampling row per verified position j (output so far + the drafts before j)."""
    return [SamplingRow(params=req.params, prompt_token_ids=req.prompt_token_ids,
                        output_token_ids=_Extended(req.output_token_ids, drafts[:j]), generator=req.generator,
                        stop_ids=req.stop_ids) for j in range(len(drafts) + 1)]


def verify(sampler: Sampler, logits: torch.Tensor, req: Request,
           drafts: list[int]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """The tokens to emit for a request whose step verified `drafts` (logits [k + 1, V]: row j predicts the
    token after draft j, row 0 the one after the last real token): the accepted drafts and one token more.
    Returns (tokens, logprobs) with 1 <= len(tokens) <= k + 1."""
    return verify_all(sampler, [(req, logits, drafts)])[0]


def _verify_sampled(items: list[tuple[Request, torch.Tensor, list[int]]]
                    ) -> list[tuple[list[int], list[TokenLogprobs | None]]]:
    """Speculative sampling for sampled requests ((request, its logits [k + 1, V], its drafts) each), all of them
    in one pass over their rows and ONE read-back (was: a few syncs per request). Per request, from its own
    generator: k uniforms (draft j kept while u_j q_j(d_j) < p_j(d_j)), then one draw from each of its k + 1
    candidate rows (row j < k: max(p_j - q_j, 0), or p_j without d_j for a one-hot q; row k: p_k); the token
    after the a accepted drafts is row a's draw. The draws do not depend on the uniforms, so taking row a's is a
    draw from it given the rejection at a: the emitted tokens follow p. A request's draws depend on its own
    generator only (the same tokens in any batch)."""
    rows = [row for r, _, d in items for row in _rows(r, d)]
    x = torch.cat([lg for _, lg, _ in items]) if len(items) > 1 else items[0][1]
    x = suppress_stop_ids(apply_penalties(x.float(), rows), rows)
    dev = x.device
    ps = [row.params for row in rows]
    temp = to_device([p.temperature for p in ps], torch.float32, dev)
    z = truncate(x / temp[:, None], [p.top_k for p in ps], [p.top_p for p in ps], [p.min_p for p in ps])
    bad = ~torch.isfinite(x.max(dim=-1).values)  # (no finite logit: reported after the read-back)
    probs = torch.softmax(z, dim=-1)  # (a row without a finite logit draws garbage by the race, then raises below)
    flat = [t for _, _, d in items for t in d]
    dt_all = to_device(flat, torch.int64, dev)
    packed, o, od = [], 0, 0
    for r, _, drafts in items:
        k = len(drafts)
        P = probs[o:o + k + 1]
        dt = dt_all[od:od + k]
        o, od = o + k + 1, od + k
        g = r.generator
        gdev = g.device if g is not None else dev
        u = torch.rand(k, generator=g, device=gdev).to(dev, non_blocking=True)
        q_rows = r.spec_q[:k].to(dev) if (k and r.spec_q is not None) else None
        if q_rows is not None and q_rows.shape[0] < k:
            raise RuntimeError(f"request {r.request_id}: {k} drafts but {q_rows.shape[0]} draft distribution rows")
        pd = P[:k].gather(1, dt[:, None]).squeeze(1)
        if q_rows is None:  # one-hot q: accepted with probability p(d); on rejection p without d
            qd = torch.ones_like(pd)
            R = P[:k].scatter(1, dt[:, None], 0.0)
        else:
            qd = q_rows.gather(1, dt[:, None]).squeeze(1)
            R = (P[:k] - q_rows).clamp_min(0.0)
        # p <= q everywhere (p == q up to rounding): a rejection is rounding too, draw from p
        R = torch.where(R.sum(dim=-1, keepdim=True) > 0, R, P[:k])
        cand = torch.cat([R, P[k:k + 1]])
        # one draw per row by the exponential race (argmax of p / Exp(1) noise: a draw from p; cheaper than
        # multinomial on every device, and nothing to assert on the device)
        noise = torch.empty(cand.shape, dtype=torch.float32, device=gdev).exponential_(generator=g).to(dev)
        draws = (cand / noise.clamp_min(1e-20)).argmax(dim=-1)
        a = (u * qd < pd).to(torch.int64).cumprod(dim=0).sum().view(1)  # (u < p(d) / q(d), in a row)
        packed.append(torch.cat([a, draws]))
    got = torch.cat(packed + [bad.to(torch.int64)]).tolist()  # the one read-back
    flags = got[len(got) - len(rows):]
    if any(flags):
        i = flags.index(1)
        raise RuntimeError(f"speculative sampling: row {i} has no finite logit to choose from after penalties and "
                           f"min_tokens masking (min_tokens={rows[i].params.min_tokens}): a bug upstream")
    out, o = [], 0
    for r, lg, drafts in items:
        k = len(drafts)
        a = got[o]
        toks = list(drafts[:a]) + [got[o + 1 + a]]
        o += k + 2
        lps: list[TokenLogprobs | None] = [None] * len(toks)
        if r.params.logprobs is not None:
            lps = token_logprobs(lg[:len(toks)], toks, [r.params.logprobs] * len(toks))
        out.append((toks, lps))
    return out


def plain_argmax(req: Request, k: int) -> bool:
    """The sampler's token for each of a verify step's k + 1 rows of `req` is the argmax of the logits as they
    are: greedy, no penalty or logit_bias, no logprobs to report, no min_tokens suppression left (what device-side
    acceptance may decide alone)."""
    p = req.params
    return (p.greedy and p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
            and not p.logit_bias and p.logprobs is None and len(req.output_token_ids) >= p.min_tokens
            and len(req.spec_ids) >= k)


def verify_all(sampler: Sampler, items: list[tuple[Request, torch.Tensor, list[int]]]
               ) -> list[tuple[list[int], list[TokenLogprobs | None]]]:
    """`verify` for many requests ((request, its logits [k + 1, V], its drafts) each): the greedy ones
    through one sampler call over all their rows, the sampled ones through one `_verify_sampled` pass."""
    out: list = [None] * len(items)
    greedy = [i for i, (r, _, _) in enumerate(items) if r.params.greedy]
    if greedy:
        rows = [row for i in greedy for row in _rows(items[i][0], items[i][2])]
        x = torch.cat([items[i][1] for i in greedy]) if len(greedy) > 1 else items[greedy[0]][1]
        toks, lps = sampler(x, rows)
        o = 0
        for i in greedy:
            drafts = items[i][2]
            k = len(drafts)
            a = 0
            while a < k and toks[o + a] == drafts[a]:
                a += 1
            out[i] = (toks[o:o + a + 1], lps[o:o + a + 1])
            o += k + 1
    sampled = [i for i in range(len(items)) if out[i] is None]
    if sampled:
        for i, res in zip(sampled, _verify_sampled([items[i] for i in sampled])):
            out[i] = res
    return out


def draft_choose(logits: torch.Tensor, temp: torch.Tensor, u: torch.Tensor, q: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """A drafter's tokens [R] from its logits [R, V]: argmax for rows with temp <= 0 (greedy requests); for the
    others a draw from q = softmax(logits / temp) by inverse CDF at u [R] (uniform in [0, 1)): the first token whose
    cumulative sum exceeds u times the total, so never a token of probability 0. Device ops only (no host read, no
    generator): it runs inside captured draft graphs with u staged per step. `q`: draft_q(logits, temp) when the
    caller already made it (it keeps the rows for verification)."""
    greedy = logits.argmax(dim=-1)
    c = (draft_q(logits, temp) if q is None else q).cumsum(dim=-1)
    s = torch.searchsorted(c, (u * c[:, -1]).unsqueeze(1), right=True).squeeze(1).clamp_max(logits.shape[-1] - 1)
    return torch.where(temp > 0, s, greedy)


def draft_q(logits: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """q = softmax(logits / temp) per row, float32 (rows with temp <= 0 at temperature 1; they draft greedily)."""
    t = torch.where(temp > 0, temp, torch.ones_like(temp))
    return torch.softmax(logits.float() / t.unsqueeze(1), dim=-1)


def draft_inputs(reqs: list[Request], k: int, dev) -> tuple[list[float], torch.Tensor | None]:
    """Per request: the temperature its drafts are drawn at (0: greedy, argmax drafts), and [len(reqs), k] uniforms
    on `dev` from each sampled request's own generator (zeros for greedy rows; None when no request samples).
    Nothing is read back: the uniforms stay on the device."""
    temps = [0.0 if r.params.greedy else float(r.params.temperature) for r in reqs]
    if not any(t > 0 for t in temps):
        return temps, None
    dev = torch.device(dev)
    rows = []
    for r, t in zip(reqs, temps):
        if t > 0:
            g = r.generator
            rows.append(torch.rand(k, generator=g, device=g.device if g is not None else dev).to(dev, non_blocking=True))
        else:
            rows.append(torch.zeros(k, dtype=torch.float32, device=dev))
    return temps, torch.stack(rows)


@dataclass
class SpecStats:
    steps: int = 0  # verify steps of a request (a request's step with drafts counts once)
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step (accepted drafts + the target's own)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


class OracleDrafter:
    """Drafts from known continuations (a previous greedy run's outputs, keyed by prompt): the next k
    tokens after the request's output so far, each kept with probability `accept` and otherwise replaced
    by a wrong token. A DRAFT ORACLE for benchmarks and tests: it measures the verify step's cost and the
    speed-up against acceptance without real weights; it is not a way to serve.

    `inner` (the engine's MTP drafter): its passes still run every step, at their full cost, and the
    oracle's tokens then replace what it drafted (`override`, called by the model runner after drafting),
    so a step costs what a real speculative step costs; without it only verification is timed.

    Whether the draft for output position i of a prompt is kept is a fixed draw of (seed, prompt, i), not a
    stream shared by the run: a replay of the same prompts takes the same accept/reject pattern whatever the
    recording or the other requests, which is what bench.latency.install_oracle needs to reach its fixed point."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], k: int, accept: float = 1.0,
                 seed: int = 0, vocab_size: int | None = None, inner=None):
        self.cont, self.k, self.accept = continuations, k, accept
        self.seed = seed
        self.vocab_size = vocab_size
        self.inner = inner
        self.needs_streams = bool(getattr(inner, "needs_streams", False))
        self._keep: dict[tuple[int, ...], tuple[random.Random, list[bool]]] = {}

    def keeps(self, prompt: tuple[int, ...], i: int) -> bool:
        """Whether the draft for output position i of `prompt` is the known token (probability accept): draw i
        of a generator seeded by (seed, prompt), drawn once per prompt and position and cached (the oracle runs
        on the host inside the measured steps)."""
        rng, pat = self._keep.get(prompt) or (None, None)
        if rng is None:
            rng, pat = random.Random(f"{self.seed}:{zlib.crc32(array.array('q', prompt).tobytes())}"), []
            self._keep[prompt] = (rng, pat)
        while len(pat) <= i:
            pat.append(rng.random() < self.accept)
        return pat[i]

    def take_part(self, dev, block_table) -> None:
        self.inner.take_part(dev, block_table)

    def propose(self, reqs: list[Request], new: list[list[int]] | None = None, **kw) -> None:
        """Without `inner`: new[i] are the tokens reqs[i] emits in this step (after its output so far). With
        it: the inner drafter's pass (its arguments), then `override` from the runner."""
        if self.inner is not None:
            self.inner.propose(reqs, **kw)
            return
        self.override(reqs, new)

    def override(self, reqs: list[Request], new: list[list[int]]) -> None:
        """Set each request's drafts to the oracle's (new[i]: the tokens reqs[i] emits in this step)."""
        for r, tail in zip(reqs, new):
            prompt = tuple(r.prompt_token_ids)
            ref = self.cont.get(prompt)
            out = r.output_token_ids + tail
            n = len(out)
            if ref is None or ref[:n] != out:  # off the known path: k drafts that fail (the step stays a verify step)
                r.set_drafts([(out[-1] + 1) % (self.vocab_size or out[-1] + 2)] * self.k if out else [])
                continue
            drafts = ref[n:n + self.k]
            V = self.vocab_size or (max(ref) + 2)
            r.set_drafts([t if self.keeps(prompt, n + j) else (t + 1) % V for j, t in enumerate(drafts)])


class MTPDrafter:
    """Drafts with the MTP block (spec §6): over the step's kept positions it takes the target's streams
    and the next tokens (filling its window ring at those positions; the last kept row of each sampling
    request drafts the first token), then k - 1 single-token steps fed by its own output streams. Those
    extra steps write ring rows of positions the next step will recompute from the target's streams; the
    rows they replace are restored."""

    needs_streams = True

    def __init__(self, model, cache, k: int, lockstep_slot: int | None = None):
        """`lockstep_slot`: under expert parallelism (the MTP block's MoE exchanges tokens with the other
        ranks), the scratch cache slot: every step runs the same number of MTP passes on every rank, a rank
        with nothing to draft taking part with a one-row pass on that slot."""
        if not len(getattr(model, "mtp", ())):
            raise ValueError("speculative decoding with the MTP drafter needs the checkpoint's MTP block "
                             "(mtp.0.*): this model was loaded without one")
        self.model, self.cache, self.k = model, cache, k
        self.lockstep_slot = lockstep_slot

    def _idle_pass(self, dev, block_table) -> None:
        """One MTP pass of one row on the scratch slot (position 0): this rank's part of a collective pass."""
        m = ForwardMeta.build([self.lockstep_slot], [0], [1], device=dev, block_table=block_table)
        n, D = self.model.cfg.hc_mult, self.model.cfg.hidden_size
        X = torch.zeros(1, n, D, dtype=self.model.opts.dtype, device=dev)
        self.model.mtp_forward(X, torch.zeros(1, dtype=torch.int64, device=dev), m, self.cache)

    @torch.no_grad()
    def take_part(self, dev, block_table) -> None:
        """Expert parallelism: this rank ran a step without requests; the others draft after it."""
        for _ in range(self.k):
            self._idle_pass(dev, block_table)

    @torch.no_grad()
    def propose(self, reqs: list[Request], X: torch.Tensor, meta: ForwardMeta, kept: list[int],
                next_ids: list[list[int]], sample: list[bool], redo: list | None = None, **_) -> None:
        """X: the step's target streams [T, hc, D]; sequence b kept its first kept[b] tokens of the step;
        next_ids[b]: the token after each kept position (kept[b] ids); sample[b]: it drafts (it sampled a
        token this step and goes on decoding). `redo`: a list to record the MTP pass's ring writes in
        (ForwardMeta.redo; prefix-cache snapshots inside the step)."""
        dev = X.device
        rows = [meta.query_start_host[b] + j for b in range(len(reqs)) for j in range(kept[b])]
        ids = [t for b in range(len(reqs)) for t in next_ids[b][:kept[b]]]
        slots, starts = meta.seq_slots_host, meta.seq_start_host
        m = ForwardMeta.build(slots, starts, kept, device=dev, block_table=meta.block_table)
        m.redo = redo
        ends, qs = [], 0
        for b in range(len(reqs)):
            qs += kept[b]
            ends.append(qs - 1)
        bs = [b for b in range(len(reqs)) if sample[b]]
        # every kept row writes its ring entry; past the attention only each sequence's last row goes on (its MoE
        # and output): Y [len(reqs), hc, D]; none when nobody drafts (the pass only writes the ring), unless the
        # pass is collective (expert parallelism: every rank runs the MoE exchange)
        out_rows = ends if (bs or self.lockstep_slot is not None) else []
        Y = self.model.mtp_forward(X[to_device(rows, torch.int64, dev)], to_device(ids, torch.int64, dev), m,
                                   self.cache, rows=to_device(out_rows, torch.int64, dev))
        if not bs:
            if self.lockstep_slot is not None:  # the other ranks may draft: their k - 1 passes are collective
                for _ in range(self.k - 1):
                    self._idle_pass(dev, meta.block_table)
            return
        H = Y[to_device(bs, torch.int64, dev)] if len(bs) < len(reqs) else Y
        temps, u = draft_inputs([reqs[b] for b in bs], self.k, dev)
        sampled = u is not None
        temp = to_device(temps, torch.float32, dev)
        qs = []  # per draft j: q rows [len(bs), V] (sampled requests only)

        def choose(H, j):
            if not sampled:
                return self.model.mtp_draft_tokens(H)
            lg = self.model.mtp_draft_logits(H)
            qs.append(draft_q(lg, temp))
            return draft_choose(lg, temp, u[:, j], qs[-1])

        d = choose(H, 0)
        drafts = [[t] for t in d.tolist()]
        if self.k > 1:
            dslots = [slots[b] for b in bs]
            pos0 = [starts[b] + kept[b] for b in bs]  # the first position past the kept ones
            snap = StateSnapshot(self.cache.mtp_layers, dslots, pos0, [self.k - 1] * len(bs))
            for j in range(1, self.k):
                mj = ForwardMeta.build(dslots, [p + j - 1 for p in pos0], [1] * len(bs), device=dev,
                                       block_table=meta.block_table)
                H = self.model.mtp_forward(H, d, mj, self.cache)
                d = choose(H, j)
                for dr, t in zip(drafts, d.tolist()):
                    dr.append(t)
            snap.restore(dslots)
        q_all = torch.stack(qs, dim=1) if qs else None  # [len(bs), k, V]
        for i, (b, dr) in enumerate(zip(bs, drafts)):
            reqs[b].set_drafts(dr, q_all[i] if q_all is not None and temps[i] > 0 else None)
