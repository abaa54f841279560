"""Batched sampling: float32 logits [B, V], one row per request, each row with its own parameters.

Per row, in this order:

(a) logprobs, when asked, are those of the RAW model distribution (log_softmax of the logits as they
    came from the model, before penalties, temperature or truncation), as in vLLM's default; the
    top-n list is ordered by logprob, exactly tied entries by lowest id first (which of several
    tokens exactly tied at the n-th place makes the list is not defined); the rank is 1 + the number
    of tokens strictly more likely, so tied tokens share a rank. Two batchings of one request agree
    on logprobs to rounding (~1e-6), not bit for bit, so near-tied tokens may swap places and a deep
    rank may move by the number of tokens within rounding of the chosen one;
(b) repetition penalty over prompt + output tokens (a positive logit is divided by the penalty, a
    negative one multiplied), then frequency (x count) and presence (x [count > 0]) penalties over
    the OUTPUT tokens only, subtracted; then the request's logit_bias is added (OpenAI's semantics:
    -100 bans a token in practice, +100 all but forces it);
(c) while fewer than min_tokens tokens are out, the row's stop ids (EOS + stop_token_ids) get -inf;
(d) greedy rows (temperature 0) take the argmax of the processed logits, the lowest id on exact
    ties (torch.argmax's first maximum, on every device; any other provider must follow this rule);
(e) other rows: divide by the temperature, keep the top-k, then the top-p nucleus (the smallest set
    of most likely tokens whose probability mass reaches top_p; the most likely token always stays),
    then drop tokens below min_p x the largest probability, renormalise, and sample by the
    exponential race: token = argmax_i p_i / E_i with E_i ~ Exp(1), one E per vocabulary entry drawn
    from the row's own generator (torch's default generator where the row has none). The race is
    run in log space, argmax_i (z_i - log E_i) with z the truncated scaled logits, which is the same
    argmax and needs no normalisation. A seeded row therefore draws the same numbers, and gets the
    same token, whatever else is in the batch and wherever it sits in it.

Everything but the random draws is vectorised across rows; nothing a row gets depends on the other
rows. A row left with no finite logit is a bug upstream (NaN logits, or min_tokens suppressing the
whole vocabulary) and raises.

State (which changes no number above): a row that names its request (`SamplingRow.request_id`) and
uses a penalty or logit_bias keeps, in the Sampler, on the logits' device, what (b) needs: a "seen in
prompt + output" mask (repetition penalty), the output token counts (frequency / presence) and its
logit_bias entries. They are built from the token lists the first time the request is sampled, then
each call adds only the output tokens appended since the previous one, so a call's host work and
copies grow with the batch, not with the outputs' length. The engine drops a request's state with
`Sampler.release(request_id)` when the request finishes or is aborted (a preempted request keeps its
output tokens, hence its state). A row without request_id gets its state built for that call only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.engine.sampling_params import SamplingParams
from dsv4.engine.to_device import to_device


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float  # under the raw model distribution
    rank: int  # 1 = most likely (1 + the number of tokens strictly more likely)
    top: list[tuple[int, float]]  # the top-n (token, logprob) pairs, most likely first


class DrawnTokens:
    """Tokens drawn on the device, not read back yet (Sampler.draw -> Sampler.read)."""

    def __init__(self, both: torch.Tensor, rows: list, host: torch.Tensor | None, event, parts=None):
        self.both = both  # [2B] int64 on the device: the tokens, then each row's no-finite-logit flag
        self.rows = rows
        self.host = host  # pinned [2B] copy target, or None (read copies synchronously)
        self.event = event  # recorded after the copies to the host (CUDA), or None
        # rows asking for logprobs: (their indices, their top-n, chosen logprob [N], rank [N], top values and ids
        # [N, kmax]); `read` turns them into `logprobs` (one entry per row, None where not asked)
        self.parts = parts
        self.logprobs: list[TokenLogprobs | None] = []

    @property
    def tokens(self) -> torch.Tensor:
        """[B] int64 on the device (an async decode step's next input ids)."""
        return self.both[:len(self.rows)]


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None
    stop_ids: frozenset[int]  # EOS ids + params.stop_token_ids: what min_tokens suppresses
    # set: the Sampler keeps this request's penalty / logit_bias state across calls (pass the request's own
    # prompt and output lists, the same objects every call; the output list only grows)
    request_id: str | None = None


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (use torch's default generator)."""
    if seed is None:
        return None
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


class Sampler:
    """`sampler(logits, rows) -> (token ids, logprobs)`; logprobs[i] is None unless
    rows[i].params.logprobs is set. Rows with a request_id keep their penalty / logit_bias state here
    until `release(request_id)`."""

    def __init__(self) -> None:
        self._states: dict[str, _RowState] = {}
        self._where: tuple | None = None  # (V, device, logits dtype) of the pools and states
        self._seen: _Pool | None = None  # bool rows: token in prompt + output (repetition penalty)
        self._counts: _Pool | None = None  # float32 rows: count of the token in the output (frequency / presence)

    def release(self, request_id: str) -> None:
        """Drop the state kept for `request_id` (call when the request finishes or is aborted; not on
        preemption). Idempotent, O(1); the pools go once no request holds state."""
        st = self._states.pop(request_id, None)
        if st is not None:
            self._free(st)
            if not self._states:
                self._seen = self._counts = None

    @property
    def num_states(self) -> int:
        """Requests holding state (tests, metrics)."""
        return len(self._states)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[TokenLogprobs | None]]:
        drawn = self.draw(logits, rows)
        if drawn is None:
            return [], []
        return self.read(drawn), drawn.logprobs

    def draw(self, logits: torch.Tensor, rows: list[SamplingRow], host: torch.Tensor | None = None,
             pending: torch.Tensor | None = None) -> "DrawnTokens | None":
        """Every step of sampling but the read-back: the tokens, each row's no-finite-logit flag and the
        logprobs asked for stay on the device. `host` (pinned, >= 2B int64; async decode steps): their copy to
        the host is queued now, behind this step's work only, so `read` later waits for this step and not for
        work queued after it. `pending` [B] (async decode steps): each row's last token, still on the device and
        not yet in its output list (penalty state, min_tokens and the like count it). None for B = 0."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [B, V] with B = {len(rows)} rows, got {tuple(logits.shape)}")
        logits = logits.float()
        B, V = logits.shape
        if B == 0:
            return None
        x = self.apply_penalties(logits, rows, pending)
        x = suppress_stop_ids(x, rows, lag=int(pending is not None))

        tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        bad = ~torch.isfinite(x.max(dim=-1).values)  # (max propagates NaN): read back with the tokens, one sync
        if len(greedy) == B:  # (all greedy: no index tensor to send, no [B, V] gather)
            tokens = x.argmax(dim=-1)
        elif greedy:
            gi = to_device(greedy, torch.int64, logits.device)
            tokens[gi] = x[gi].argmax(dim=-1)
        if sampled:
            si = to_device(sampled, torch.int64, logits.device)
            ps = [rows[i].params for i in sampled]
            xs = x if len(sampled) == B else x[si]  # (all sampled: no [B, V] gather)
            z = truncate(xs / _col([p.temperature for p in ps], x), [p.top_k for p in ps],
                         [p.top_p for p in ps], [p.min_p for p in ps])
            noise = _race_noise([rows[i].generator for i in sampled], V, x.device)
            drawn = (z - noise.log()).argmax(dim=-1)
            if len(sampled) == B:
                tokens = drawn
            else:
                tokens[si] = drawn
        both = torch.cat([tokens, bad.to(torch.int64)])
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        parts = None
        if want:
            wi = to_device(want, torch.int64, logits.device)
            ns = [rows[i].params.logprobs for i in want]
            parts = (want, ns, *_logprob_parts(logits[wi], tokens[wi], ns))
        event = None
        if host is not None:
            if host.numel() < 2 * B:
                raise ValueError(f"the host buffer holds {host.numel()} values; {B} rows need {2 * B}")
            host = host[:2 * B]
            host.copy_(both, non_blocking=True)
            if parts is not None:  # (pinned copies from torch's caching host allocator)
                parts = parts[:2] + tuple(_pinned_copy(t) for t in parts[2:])
            if both.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
        return DrawnTokens(both, rows, host, event, parts)

    @staticmethod
    def read(drawn: "DrawnTokens") -> list[int]:
        """The drawn tokens on the host (waits for their step only when `draw` was given a host buffer).
        Raises naming the first row that had no finite logit."""
        if drawn.event is not None:
            drawn.event.synchronize()
        both = (drawn.host if drawn.host is not None else drawn.both).tolist()
        B = len(drawn.rows)
        if any(both[B:]):
            _no_finite_logit(drawn.rows, both[B:].index(1))
        drawn.logprobs = [None] * B
        if drawn.parts is not None:
            want, ns, *tensors = drawn.parts
            got = _logprob_objects([both[i] for i in want], ns, *tensors)
            for i, lp in zip(want, got):
                drawn.logprobs[i] = lp
        return both[:B]

    def apply_penalties(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                        pending: torch.Tensor | None = None) -> torch.Tensor:
        """(b): repetition penalty over prompt + output tokens, frequency and presence penalties over
        output tokens, then logit_bias. Returns a new tensor, or the input itself when no row has a penalty or a
        bias (the input is never changed). `pending`: see `draw`."""
        V = logits.shape[1]
        states, scratch = self._row_states(rows, V, logits.device, logits.dtype, pending)
        x = logits if all(st is None for st in states) else logits.clone()
        try:
            rep = [i for i, st in enumerate(states) if st is not None and st.seen is not None]
            if rep:
                ix = to_device([rep, [states[i].seen for i in rep]], torch.int64, x.device)
                seen = self._seen.data[ix[1]][:, :V]
                pen = _col([rows[i].params.repetition_penalty for i in rep], x)
                sub = x[ix[0]]
                x[ix[0]] = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
            fp = [i for i, st in enumerate(states) if st is not None and st.counts is not None]
            if fp:
                ix = to_device([fp, [states[i].counts for i in fp]], torch.int64, x.device)
                counts = self._counts.data[ix[1]][:, :V]
                freq = _col([rows[i].params.frequency_penalty for i in fp], x)
                pres = _col([rows[i].params.presence_penalty for i in fp], x)
                x[ix[0]] = x[ix[0]] - freq * counts - pres * (counts > 0).float()
            bi = [i for i, st in enumerate(states) if st is not None and st.bias is not None]
            if bi:
                toks = [states[i].bias[0] for i in bi]
                vals = [states[i].bias[1] for i in bi]
                ri = torch.tensor(bi).repeat_interleave(torch.tensor([len(t) for t in toks]))
                ri = ri.to(x.device, non_blocking=True)
                x.index_put_((ri, torch.cat(toks)), torch.cat(vals), accumulate=True)
        finally:
            for st in scratch:
                self._free(st)
        return x

    # ---- per-request state ----------------------------------------------------------------------------

    def _row_states(self, rows: Sequence[SamplingRow], V: int, device: torch.device, dtype: torch.dtype,
                    pending: torch.Tensor | None = None) -> tuple[list[_RowState | None], list[_RowState]]:
        """Each row's state (None: no penalty, no logit_bias), brought up to date with the row's output
        tokens and, with `pending`, with each row's token not yet in them (counted on the device; `ahead`
        remembers it, so the host list's copy of it is skipped once it arrives); and the states to free after
        this call (rows without request_id, stale ones)."""
        if self._where != (V, device, dtype):
            self._where, self._states = (V, device, dtype), {}
            self._seen = self._counts = None
        states: list[_RowState | None] = [None] * len(rows)
        fresh: list[tuple[SamplingRow, _RowState]] = []
        scratch: list[_RowState] = []
        seen_r: list[int] = []  # incremental updates: (pool row, token) pairs
        seen_t: list[int] = []
        cnt_r: list[int] = []
        cnt_t: list[int] = []
        try:
            for i, r in enumerate(rows):
                p = r.params
                rep = p.repetition_penalty != 1.0
                fp = p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
                if not (rep or fp or p.logit_bias):
                    continue
                out = r.output_token_ids
                rid = r.request_id
                st = self._states.get(rid) if rid is not None else None
                if st is not None and st.params is p and st.output is out and st.counted + st.ahead <= len(out):
                    if st.counted + st.ahead < len(out):
                        new = out[st.counted + st.ahead:]
                        if st.seen is not None:
                            seen_r += [st.seen] * len(new)
                            seen_t += new
                        if st.counts is not None:
                            cnt_r += [st.counts] * len(new)
                            cnt_t += new
                    st.counted, st.ahead = len(out), 0
                else:
                    if st is not None:  # another request under this id, or its lists were replaced: start over
                        scratch.append(self._states.pop(rid))  # (freed after the call: a row above may use it)
                    st = _RowState(p, out, len(out))
                    if rep:
                        st.seen = self._pool("_seen", torch.bool, V, device).take()
                    if fp:
                        st.counts = self._pool("_counts", torch.float32, V, device).take()
                    fresh.append((r, st))
                    if rid is not None:
                        self._states[rid] = st
                    else:
                        scratch.append(st)
                states[i] = st
            if seen_r:
                ix = to_device([seen_r, seen_t], torch.int64, device)
                self._seen.data[ix[0], ix[1]] = True
            if cnt_r:
                ix = to_device([cnt_r, cnt_t], torch.int64, device)
                self._counts.data.index_put_((ix[0], ix[1]), torch.ones(len(cnt_r), device=device),
                                             accumulate=True)
            if fresh:
                self._build(fresh, V, device, dtype)
            if pending is not None:
                self._count_pending(states, pending, device)
        except BaseException:  # (bad token ids): forget every state this call touched; later calls rebuild them
            for r in rows:
                if r.request_id is not None and r.request_id in self._states:
                    scratch.append(self._states.pop(r.request_id))
            for st in scratch:
                self._free(st)
            raise
        return states, scratch

    def _count_pending(self, states: list, pending: torch.Tensor, device: torch.device) -> None:
        """Count each stateful row's pending token (on the device) into its seen / counts row."""
        sr, si, cr, ci = [], [], [], []
        for i, st in enumerate(states):
            if st is None or (st.seen is None and st.counts is None):
                continue
            if st.seen is not None:
                sr.append(st.seen)
                si.append(i)
            if st.counts is not None:
                cr.append(st.counts)
                ci.append(i)
            st.ahead = 1
        if sr:
            ix = to_device([sr, si], torch.int64, device)
            self._seen.data[ix[0], pending[ix[1]]] = True
        if cr:
            ix = to_device([cr, ci], torch.int64, device)
            self._counts.data.index_put_((ix[0], pending[ix[1]]), torch.ones(len(cr), device=device), accumulate=True)

    def _build(self, fresh: list[tuple[SamplingRow, _RowState]], V: int, device: torch.device,
               dtype: torch.dtype) -> None:
        """Fill new states from the rows' token lists (once per request)."""
        rep = [(r, st) for r, st in fresh if st.seen is not None]
        if rep:
            lists = [list(r.prompt_token_ids) + list(r.output_token_ids) for r, _ in rep]
            self._seen.data[to_device([st.seen for _, st in rep], torch.int64, device)] = _token_mask(
                lists, V, device, pad=True)
        fp = [(r, st) for r, st in fresh if st.counts is not None]
        if fp:
            lists = [r.output_token_ids for r, _ in fp]
            self._counts.data[to_device([st.counts for _, st in fp], torch.int64, device)] = _token_counts(
                lists, V, device, pad=True)
        ti: list[int] = []
        bv: list[float] = []
        sizes: list[int] = []
        biased = []
        for r, st in fresh:
            n = len(ti)
            for t, b in (r.params.logit_bias or {}).items():
                if 0 <= t < V:
                    ti.append(t)
                    bv.append(float(b))
            if len(ti) > n:
                biased.append(st)
                sizes.append(len(ti) - n)
        if biased:
            tt = to_device(ti, torch.int64, device).split(sizes)
            vv = to_device(bv, dtype, device).split(sizes)
            for st, t, v in zip(biased, tt, vv):
                st.bias = (t, v)

    def _pool(self, name: str, dtype: torch.dtype, V: int, device: torch.device) -> _Pool:
        pool = getattr(self, name)
        if pool is None:
            pool = _Pool(V + 1, dtype, device)  # a last column for out-of-vocabulary padding (never read)
            setattr(self, name, pool)
        return pool

    def _free(self, st: _RowState) -> None:
        if st.seen is not None and self._seen is not None:
            self._seen.give(st.seen)
        if st.counts is not None and self._counts is not None:
            self._counts.give(st.counts)
        st.seen = st.counts = st.bias = None


class _RowState:
    """A request's sampling state: pool rows (Sampler._seen / _counts) or None, its logit_bias entries
    within the vocabulary as (token ids, values) device tensors or None, and how many of its output
    tokens are counted. `params` and `output` tell whether a row still belongs to it."""
    __slots__ = ("params", "output", "counted", "ahead", "seen", "counts", "bias")

    def __init__(self, params: SamplingParams, output: Sequence[int], counted: int):
        self.params, self.output, self.counted = params, output, counted
        self.ahead = 0  # tokens after output[:counted] already counted on the device (async decode: 0 or 1)
        self.seen: int | None = None
        self.counts: int | None = None
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None


class _Pool:
    """Rows of one [capacity, width] device tensor, handed out and back (capacity doubles when short)."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device):
        self.data = torch.zeros(0, width, dtype=dtype, device=device)
        self.free: list[int] = []

    def take(self) -> int:
        if not self.free:
            cap = self.data.shape[0]
            grown = self.data.new_zeros(max(8, 2 * cap), self.data.shape[1])
            grown[:cap] = self.data
            self.data = grown
            self.free = list(range(grown.shape[0] - 1, cap - 1, -1))
        return self.free.pop()

    def give(self, row: int) -> None:
        self.free.append(row)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """(b) with every row's state built for this call only (a fresh Sampler)."""
    return Sampler().apply_penalties(logits, rows)


def suppress_stop_ids(x: torch.Tensor, rows: Sequence[SamplingRow], lag: int = 0) -> torch.Tensor:
    """(c): -inf on the stop ids of rows that have fewer than min_tokens output tokens (`lag`: tokens each row
    has beyond its output list, async decode steps). Returns x itself when nothing is suppressed, else a copy
    (x is never changed: it may be the raw logits that logprobs read)."""
    V = x.shape[1]
    ri: list[int] = []
    ti: list[int] = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) + lag < r.params.min_tokens:
            ids = [t for t in r.stop_ids if 0 <= t < V]
            ri += [i] * len(ids)
            ti += ids
    if ri:
        x = x.clone()
        x[to_device(ri, torch.int64, x.device), to_device(ti, torch.int64, x.device)] = -math.inf
    return x


def truncate(z: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]) -> torch.Tensor:
    """(e) truncation of temperature-scaled logits z [B, V]: top-k, then top-p over the top-k
    renormalised distribution, then min-p. Dropped entries become -inf; the most likely token always
    stays. Returns a new tensor."""
    B, V = z.shape
    ks = [V if k <= 0 or k >= V else k for k in top_k]
    if all(k == V for k in ks) and all(p >= 1.0 for p in top_p) and all(m <= 0.0 for m in min_p):
        return z.clone()
    zs, order = z.sort(dim=-1, descending=True, stable=True)
    pos = torch.arange(V, device=z.device)
    drop = pos[None, :] >= to_device(ks, torch.int64, z.device)[:, None]  # top-k
    zs = zs.masked_fill(drop, -math.inf)
    if any(p < 1.0 for p in top_p):
        probs = torch.softmax(zs, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        tp = to_device(top_p, z.dtype, z.device)[:, None]
        nucleus = (before < tp) | (tp >= 1.0)
        drop = drop | ~nucleus
    if any(m > 0.0 for m in min_p):
        # p_i < min_p * p_max  <=>  z_i - z_max < log(min_p); the max is at sorted position 0
        logm = to_device([math.log(m) if m > 0 else -math.inf for m in min_p], z.dtype, z.device)
        drop = drop | (zs - zs[:, :1] < logm[:, None])
    drop[:, 0] = False  # the most likely token always stays (each rule above keeps it already)
    keep = torch.zeros_like(drop).scatter_(1, order, ~drop)
    return z.masked_fill(~keep, -math.inf)


def kept_set(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """The token ids a non-greedy row with these params may draw from 1-D `logits` (already
    penalised): what `truncate` keeps after temperature scaling."""
    z = truncate(logits.float()[None] / params.temperature, [params.top_k], [params.top_p], [params.min_p])[0]
    return set(torch.nonzero(z > -math.inf).flatten().tolist())


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], ns: Sequence[int]) -> list[TokenLogprobs]:
    """Raw-distribution logprob, rank and top-n of token_ids[i] in row i of logits [N, V]."""
    ids = to_device(list(token_ids), torch.int64, logits.device)
    return _logprob_objects(list(token_ids), ns, *_logprob_parts(logits, ids, ns))


def _logprob_parts(logits: torch.Tensor, ids: torch.Tensor, ns: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """On the device: the chosen ids' logprobs [N] and ranks [N], and the top max(ns) logprobs and ids [N, kmax]
    of each row of logits [N, V] (raw distribution)."""
    V = logits.shape[1]
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, ids[:, None])[:, 0]
    rank = (lp > chosen[:, None]).sum(dim=-1) + 1
    kmax = min(max(ns, default=0), V)
    tv, ti = lp.topk(kmax, dim=-1) if kmax > 0 else (lp[:, :0], torch.zeros_like(lp[:, :0], dtype=torch.int64))
    return chosen, rank, tv, ti


def _logprob_objects(token_ids: Sequence[int], ns: Sequence[int], chosen, rank, tv, ti) -> list[TokenLogprobs]:
    tv, ti = tv.tolist(), ti.tolist()
    out = []
    for j, (c, r, n) in enumerate(zip(chosen.tolist(), rank.tolist(), ns)):
        top = sorted(zip(ti[j][:n], tv[j][:n]), key=lambda e: (-e[1], e[0])) if n > 0 else []
        out.append(TokenLogprobs(token_id=int(token_ids[j]), logprob=c, rank=r, top=top))
    return out


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` copied to pinned host memory, queued (not waited for) on a CUDA device; `t` itself on the CPU."""
    if t.device.type != "cuda":
        return t
    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    h.copy_(t, non_blocking=True)
    return h


def prompt_logprobs(logits: torch.Tensor, next_ids: Sequence[int], n: int) -> list[TokenLogprobs]:
    """For prompt positions: logits [L, V] at L positions and the L actual next tokens -> the raw
    logprob of each next token, its rank and the top-n alternatives."""
    if logits.dim() != 2 or logits.shape[0] != len(next_ids):
        raise ValueError(f"prompt_logprobs: logits {tuple(logits.shape)} for {len(next_ids)} next tokens")
    if len(next_ids) == 0:
        return []
    return token_logprobs(logits, next_ids, [n] * len(next_ids))


# ---- helpers ------------------------------------------------------------------------------------------

def _col(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, like.dtype, like.device)[:, None]


def _padded(lists: Sequence[Sequence[int]], V: int, device) -> torch.Tensor:
    """Token lists as one [n, max_len] int64 tensor padded with V (a column dropped afterwards)."""
    width = max((len(t) for t in lists), default=0)
    idx = torch.full((len(lists), max(width, 1)), V, dtype=torch.int64)
    for j, t in enumerate(lists):
        if len(t):
            idx[j, :len(t)] = torch.as_tensor(list(t), dtype=torch.int64)
    return idx.to(device, non_blocking=True)


def _token_counts(lists: Sequence[Sequence[int]], V: int, device, pad: bool = False) -> torch.Tensor:
    """[n, V] float32 counts of each token in each list ([n, V + 1] with the padding column if `pad`)."""
    idx = _padded(lists, V, device)
    counts = torch.zeros(len(lists), V + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float32, device=device))
    return counts if pad else counts[:, :V]


def _token_mask(lists: Sequence[Sequence[int]], V: int, device, pad: bool = False) -> torch.Tensor:
    """[n, V] bool: token in list ([n, V + 1] with the padding column if `pad`)."""
    idx = _padded(lists, V, device)
    mask = torch.zeros(len(lists), V + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, idx, True)
    return mask if pad else mask[:, :V]


def _race_noise(gens: Sequence[torch.Generator | None], V: int, device: torch.device) -> torch.Tensor:
    """[len(gens), V] draws of Exp(1): a row with a generator draws its V values from it (on the
    generator's device), the rows without one draw together from torch's default generator (in row
    order). Clamped away from 0 so log() stays finite."""
    noise = torch.empty(len(gens), V, dtype=torch.float32, device=device)
    free = [j for j, g in enumerate(gens) if g is None]
    if free:
        noise[to_device(free, torch.int64, device)] = torch.empty(len(free), V, device=device).exponential_()
    for j, g in enumerate(gens):
        if g is not None:
            noise[j] = torch.empty(V, dtype=torch.float32, device=g.device).exponential_(generator=g).to(device)
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def _no_finite_logit(rows: Sequence[SamplingRow], i: int) -> None:
    """Row i's max logit is not finite (all -inf after masking, or a NaN): refuse to emit its token."""
    raise RuntimeError(f"sampler: row {i} has no finite logit to choose from after penalties and min_tokens "
                       f"masking (its max is -inf or NaN; min_tokens={rows[i].params.min_tokens}, "
                       f"{len(rows[i].stop_ids)} stop ids): a bug upstream")
