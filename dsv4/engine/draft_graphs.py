"""MTP drafting from captured graphs: after a verify graph step (engine/cuda_graphs.py, q = k + 1 tokens per
sequence) the k drafts of the next step come from one more graph per batch bucket, so a speculative decode
step is two graph replays and the host work between them.

What the graph of batch bucket Bb does, reading the verify step's staged values (slots, first positions
p_b) and its final streams (`DecodeGraphs.streams`), plus two inputs written by one copy per step:
next_ids [Bb * q] (row j of sequence b: the token after its position p_b + j; the verified tokens, the
rest zeros) and kept [Bb] (tokens sequence b kept of its q):
1. saves the MTP block's window-ring rows of positions p_b .. p_b + q + k - 2 (all it may overwrite);
2. runs the MTP block over all q positions of every sequence (uniform shape: the rows past kept_b are
   junk, put back in 4; past the attention only the row of position p_b + kept_b - 1 goes on: the MoE runs on
   Bb rows), and drafts that row's token
   (spec_decode.draft_choose: the greedy token, or for a sampled request a draw from its draft
   distribution at the uniform staged for it);
3. runs k - 1 single-token steps at positions p_b + kept_b .. fed by its own output streams (as
   spec_decode.MTPDrafter does eagerly);
4. puts back the saved ring rows of positions >= p_b + kept_b (by a device mask; also between 2 and 3,
   since the junk rows' writes wrap onto rows of positions W earlier that step 3 reads), so the ring holds
   the kept positions only, and writes the drafts to the static [Bm, k] buffer `drafts` and their draft
   distributions to `q_rows` [Bm, k, V] float32 (the sampled requests' rows are copied out after the replay).
Per step two more inputs: temp [Bb] (0: greedy) and u [Bb, k] (uniforms from each request's generator). Each
bucket has two graphs: the sampled one (some request of the step samples: q rows kept, draft_choose) and the greedy
one (argmax only: no softmax or cumulative sum over the vocabulary), replayed as the step needs.
Rows of padding sequences (the scratch slot) run the same and are discarded. Under expert parallelism
every rank replays the same bucket (a rank without requests: all padding rows); the MoE exchanges pad to
the bucket's rows (q Bb in the first pass, Bb in the single-token steps). Work is sized by shapes only;
the meta's host mirrors raise if read (as in every captured graph).
"""

from __future__ import annotations

import logging

import torch

from dsv4.engine.cuda_graphs import DecodeGraphs, GraphCaptureError, _FrozenMirror
from dsv4.engine.spec_decode import draft_choose, draft_inputs, draft_q
from dsv4.engine.step_batch import stage_decode
from dsv4.engine.to_device import to_device
from dsv4.ops.kv_format import Fp8KV
from dsv4.ops.meta import ForwardMeta

log = logging.getLogger("dsv4.graphs")


def _parts(store) -> list[torch.Tensor]:
    return [store.nope, store.scale, store.rope] if isinstance(store, Fp8KV) else [store]


class MTPDraftGraphs:
    """Draft graphs over the verify graphs `verify` (its buckets, step buffers, streams and memory pool),
    drafting `k` = verify.q - 1 tokens per sequence with MTP block 0 of `model`."""

    def __init__(self, model, cache, verify: DecodeGraphs, capture: bool = True):
        if verify.q < 2 or verify.streams is None:
            raise ValueError("draft graphs need verify graphs (query_len >= 2) that keep their streams")
        if not cache.mtp_layers:
            raise ValueError("draft graphs need the cache's MTP window ring (ModelCache(with_mtp=True))")
        self.model, self.cache, self.vg = model, cache, verify
        self.q, self.k = verify.q, verify.q - 1
        self.use_capture = capture
        W = _parts(cache.mtp_layers[0].window)[0].shape[1]
        if 2 * verify.q - 2 > W:
            raise ValueError(f"draft graphs need q + k - 1 = {2 * verify.q - 2} ring rows without wrap-around; the "
                             f"MTP window has {W}")
        Bm = verify.batch_buckets[-1]
        dev = cache.device
        self._n_ids = Bm * self.q
        self.host = torch.zeros(self._n_ids + Bm, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self.host_np = self.host.numpy()  # (the same memory: staged by numpy writes, ~1 us each)
        self.dev = torch.zeros(self._n_ids + Bm, dtype=torch.int64, device=dev)
        # [Bm, k + q + 2]: the drafts, then (accept graphs) the verify step's argmax tokens [q], kept count and a
        # non-finite flag per sequence: one read-back for all of it
        self.out = torch.zeros(Bm, self.k + self.q + 2, dtype=torch.int64, device=dev)
        self.drafts = self.out[:, :self.k]
        # per step: each row's draft temperature (0: greedy) and its k uniforms, staged by one copy
        self.host_f = torch.zeros(Bm * (1 + self.k), dtype=torch.float32, pin_memory=dev.type == "cuda")
        self.host_f_np = self.host_f.numpy()
        self.dev_f = torch.zeros(Bm * (1 + self.k), dtype=torch.float32, device=dev)
        self.q_rows = None  # [Bm, k, V] float32 draft distributions (made by the sampled warm-up before its capture)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (batch bucket, sampled)
        self.accept_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # batch bucket -> device-side greedy acceptance

    # ---- the graph body -------------------------------------------------------------------------------
    def _body(self, Bb: int, frozen: bool, sampled: bool = True) -> None:
        q, k, vg, model, cache = self.q, self.k, self.vg, self.model, self.cache
        mirror = _FrozenMirror if frozen else list
        d = vg.buffers.device_views(Bb * q, Bb)
        C = vg.ctx_buckets[-1]
        start, slots = d["seq_start"], d["slots"]
        next_ids = self.dev[:Bb * q]
        kept = self.dev[self._n_ids:self._n_ids + Bb]
        dev = start.device
        W = _parts(cache.mtp_layers[0].window)[0].shape[1]
        span = q + k - 1
        pos = start[:, None] + torch.arange(span, dtype=torch.int64, device=dev)[None, :]  # [Bb, span]
        rs = slots[:, None].expand(-1, span).reshape(-1)
        rp = (pos % W).reshape(-1)
        saved = [[t[rs, rp] for t in _parts(lc.window)] for lc in cache.mtp_layers]
        meta = vg._meta(Bb, C, frozen)  # the verify step's: q tokens per sequence at p_b ..
        last = torch.arange(Bb, dtype=torch.int64, device=dev) * q + kept - 1
        H = model.mtp_forward(vg.streams[:Bb * q], next_ids, meta, cache, rows=last)  # (the MoE: Bb rows)
        stale = (pos >= (start + kept)[:, None]).reshape(-1)

        def put_back():  # the saved rows of positions >= p_b + kept_b
            for lc, sv in zip(cache.mtp_layers, saved):
                for t, s in zip(_parts(lc.window), sv):
                    cur = t[rs, rp]
                    t[rs, rp] = torch.where(stale.view(-1, *([1] * (cur.dim() - 1))), s, cur)

        # the junk rows' ring writes (positions past the kept ones) wrap onto rows of positions W earlier, which
        # the single-token steps read as their window: put them back first
        put_back()
        Bm = self.drafts.shape[0]
        temp = self.dev_f[:Bb]
        u = self.dev_f[Bm:Bm + Bm * k].view(Bm, k)[:Bb]

        def choose(H, j):
            if not sampled:  # (the greedy variant: every row drafts its argmax; no distribution kept)
                return model.mtp_draft_tokens(H)
            lg = model.mtp_draft_logits(H)
            if self.q_rows is None:
                self.q_rows = torch.zeros((Bm, k, lg.shape[-1]), dtype=torch.float32, device=lg.device)
            qj = self.q_rows[:Bb, j]
            qj.copy_(draft_q(lg, temp))
            return draft_choose(lg, temp, u[:, j], qj)

        tok = choose(H, 0)
        out = [tok]
        seq = torch.arange(Bb, dtype=torch.int64, device=dev)
        qs = torch.arange(Bb + 1, dtype=torch.int64, device=dev)
        for j in range(1, k):
            pj = start + kept + (j - 1)
            mj = ForwardMeta(positions=pj, token_seq=seq, seq_slots=slots, query_start=qs, seq_start=pj,
                             seq_lens=pj + 1, query_start_host=list(range(Bb + 1)), seq_start_host=mirror([0] * Bb),
                             seq_lens_host=mirror([1] * Bb), seq_slots_host=mirror([vg.scratch] * Bb),
                             seq_len_bound=C, block_table=cache.block_table,
                             ep_tokens=Bb if vg.expert_parallel else None)
            H = model.mtp_forward(H, tok, mj, cache)
            tok = choose(H, j)
            out.append(tok)
        put_back()
        self.drafts[:Bb].copy_(torch.stack(out, dim=1))

    def _accept_body(self, Bb: int) -> None:
        """Greedy acceptance on the device, after a verify replay of bucket Bb whose requests all take the plain
        argmax (no penalty, bias or suppression changes it): each sequence's argmax tokens t_0..t_{q-1} over the
        verify logits, a = the drafts (its staged ids 1..q-1) matching t_0.. in a row, kept = a + 1 (padding rows:
        1); the draft graph's inputs (next_ids: t_j for j < kept, zeros after; kept) are written where `run`
        would stage them, and the tokens, kept and a non-finite-logits flag go to `out` for the host."""
        q, k = self.q, self.k
        vg = self.vg
        d = vg.buffers.device_views(Bb * q, Bb)
        ids = d["ids"].view(Bb, q)
        mx, tok = vg.logits[:Bb * q].max(dim=-1)  # (one pass: the values for the finite check, the argmax)
        tok = tok.view(Bb, q)
        match = (tok[:, :-1] == ids[:, 1:]).to(torch.int64)
        kept = match.cumprod(dim=1).sum(dim=1) + 1
        kept = torch.where(d["slots"] == vg.scratch, torch.ones_like(kept), kept)
        ar = torch.arange(q, dtype=torch.int64, device=tok.device)
        self.dev[:Bb * q].copy_(torch.where(ar[None, :] < kept[:, None], tok, torch.zeros_like(tok)).view(-1))
        self.dev[self._n_ids:self._n_ids + Bb].copy_(kept)
        o = self.out[:Bb]
        o[:, k:k + q].copy_(tok)
        o[:, k + q].copy_(kept)
        o[:, k + q + 1].copy_((~torch.isfinite(mx)).view(Bb, q).any(dim=1))

    def run_accepting(self, Bb: int, B: int) -> list[tuple[list[int], int, bool, list[int]]]:
        """After a verify replay of bucket Bb over B sequences whose requests all take the plain argmax: the
        acceptance on the device and the greedy draft graph, back to back (no host work, no sync between the
        two replays), then one read-back. Returns per sequence (its q argmax tokens, kept, any non-finite
        logits, its k new drafts)."""
        if not self.use_capture:
            self._accept_body(Bb)
            self._body(Bb, frozen=True, sampled=False)
        else:
            if Bb not in self.accept_graphs or (Bb, False) not in self.graphs:
                raise GraphCaptureError(f"MTP accept / greedy draft graph of batch {Bb} missing (capture them before "
                                        f"verify steps)")
            self.accept_graphs[Bb].replay()
            self.graphs[(Bb, False)].replay()
        k, q = self.k, self.q
        return [(row[k:k + q], row[k + q], bool(row[k + q + 1]), row[:k]) for row in self.out[:B].tolist()]

    # ---- capture ----------------------------------------------------------------------------------------
    def capture_all(self) -> None:
        for Bb in sorted(self.vg.batch_buckets, reverse=True):
            for sampled in (True, False):
                if (Bb, sampled) not in self.graphs:
                    self.capture(Bb, sampled)
            if Bb not in self.accept_graphs:
                self.capture_accept(Bb)

    def capture_accept(self, Bb: int) -> None:
        """Capture the device-side greedy acceptance of batch bucket Bb (tiny: a max over the verify logits and a
        few [Bb, q] ops)."""
        stage_decode(self.vg.buffers, Bb, self.vg.scratch, [], [], [], self.q)
        self.accept_graphs[Bb] = self._captured(lambda frozen: self._accept_body(Bb), f"accept graph of batch {Bb}")

    def capture(self, Bb: int, sampled: bool = True) -> None:
        """Capture the draft graph of batch bucket Bb: `sampled` (some row drafts by sampling: the q rows kept and
        draft_choose over them) or the greedy variant (argmax only), replayed when no request of the step samples."""
        stage_decode(self.vg.buffers, Bb, self.vg.scratch, [], [], [], self.q)  # every row a scratch row
        self.host.zero_()
        self.host[self._n_ids:].fill_(1)
        self.dev.copy_(self.host)
        self.dev_f.zero_()
        what = f"draft graph of batch {Bb} ({'sampled' if sampled else 'greedy'})"
        self.graphs[(Bb, sampled)] = self._captured(lambda frozen: self._body(Bb, frozen=frozen, sampled=sampled), what)
        log.debug("captured MTP %s", what)

    def _captured(self, body, what: str) -> torch.cuda.CUDAGraph:
        """body(frozen) run once (warm-up), then captured in the verify graphs' memory pool with device -> host
        syncs raising."""
        torch.cuda.synchronize(self.dev.device)
        body(False)  # warm-up
        torch.cuda.synchronize(self.dev.device)
        g = torch.cuda.CUDAGraph()
        prev = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(g, pool=self.vg.pool):
                body(True)
        except Exception as e:
            raise GraphCaptureError(f"capture of the MTP {what} failed: {type(e).__name__}: {e}") from e
        finally:
            torch.cuda.set_sync_debug_mode(prev)
        self.vg.pool = g.pool()
        return g

    # ---- one step ---------------------------------------------------------------------------------------
    def run(self, Bb: int, tokens: list[list[int]], reqs=None) -> list[tuple[list[int], torch.Tensor | None]]:
        """After the verify graph of batch bucket Bb: tokens[b] are the tokens sequence b emitted (its kept
        drafts and one more, 1..q of them); reqs[b] its request (temperature and generator of its drafts; None:
        greedy drafts). Returns each sequence's k drafts and, for a sampled request, the rows [k, V] of the
        distribution they were drawn from."""
        B = len(tokens)
        temps, u = draft_inputs(reqs, self.k, self.dev.device) if reqs is not None else ([0.0] * B, None)
        Bm = self.drafts.shape[0]
        sampled = u is not None
        q = self.q
        for b, t in enumerate(tokens):
            if not 1 <= len(t) <= q:
                raise ValueError(f"sequence {b} emitted {len(t)} tokens; a verify step of {q} emits 1..{q}")
        # (numpy views of the pinned staging buffers; the previous step's copies out of them were consumed by its
        # replay, which the drafts' read-back below waited for)
        hf = self.host_f_np
        hf.fill(0.0)
        if sampled:
            hf[:B] = temps
        self.dev_f.copy_(self.host_f, non_blocking=True)
        if sampled:  # (the uniforms were drawn on the device: a device copy after the staged one)
            self.dev_f[Bm:Bm + B * self.k].copy_(u.view(-1))
        h = self.host_np
        h.fill(0)
        for b, t in enumerate(tokens):
            h[b * q:b * q + len(t)] = t
        h[self._n_ids:self._n_ids + B] = [len(t) for t in tokens]
        h[self._n_ids + B:self._n_ids + Bb] = 1
        self.dev.copy_(self.host, non_blocking=True)
        if not self.use_capture:
            self._body(Bb, frozen=True, sampled=sampled)
        else:
            if (Bb, sampled) not in self.graphs:
                raise GraphCaptureError(f"MTP draft graph of batch {Bb} ({'sampled' if sampled else 'greedy'}) missing "
                                        f"(capture it before verify steps)")
            self.graphs[(Bb, sampled)].replay()
        drafts = self.drafts[:B].tolist()
        sb = [b for b in range(B) if temps[b] > 0]
        if not sb:
            return [(d, None) for d in drafts]
        # the sampled rows' distributions, copied out of the static buffer (the next replay overwrites it)
        qs = dict(zip(sb, self.q_rows[to_device(sb, torch.int64, self.drafts.device)]))
        return [(d, qs.get(b)) for b, d in enumerate(drafts)]
