"""Per-step batch metadata shared by the attention-side ops.

A step runs T tokens of B sequences flattened one after another (varlen, no padding): sequence b owns
tokens query_start[b] .. query_start[b+1]-1, which sit at positions seq_start[b] .. seq_lens[b]-1, and
its per-request state lives in cache slot seq_slots[b]. Decode is the case of one token per sequence,
prefill (or one chunk of it) the case of many; both mix freely in one step.

Kernels size grids from shapes, num_tokens / num_seqs and `max_seq_len` only; the other host mirrors are
for the reference ops and host bookkeeping. A captured decode graph (engine/cuda_graphs.py) replaces them
by mirrors that raise when read, so a kernel that reads per-step host values fails at capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardMeta:
    positions: torch.Tensor  # [T] int64
    token_seq: torch.Tensor  # [T] int64: batch index b of each token
    seq_slots: torch.Tensor  # [B] int64: cache slot of each sequence
    query_start: torch.Tensor  # [B+1] int64
    seq_start: torch.Tensor  # [B] int64: tokens already in the cache before this step
    seq_lens: torch.Tensor  # [B] int64: tokens in the cache after this step
    # host mirrors (python ints), for host-side bookkeeping and the reference ops
    query_start_host: list[int]
    seq_start_host: list[int]
    seq_lens_host: list[int]
    seq_slots_host: list[int]
    # an upper bound on seq_lens that kernels may size work by (None: max(seq_lens_host)); a captured
    # graph sets it to its context bucket, so the kernels never read per-step host values
    seq_len_bound: int | None = None
    # the cache's block table [slots, pages per sequence] int64 (row seq_slots[b] pages sequence b's
    # compressed entries; None: no paged state is read or written, e.g. a model of window layers only)
    block_table: torch.Tensor | None = None
    # expert parallelism: the largest token count of any rank in this step, agreed before it (the MoE
    # exchange pads to it and skips exchanging counts); None: exchange the counts in each MoE layer
    ep_tokens: int | None = None
    # speculative (verify) steps: every write of per-slot state that is not indexed by position (window ring
    # rows, compressor accumulators) also appends a redo function f(rows, meta) here, which repeats that write
    # for token rows `rows` of this step under another step's meta. The engine restores the state of requests
    # whose drafts were rejected and redoes the writes of the tokens it kept (cache/spec_state.py).
    redo: list | None = None
    # piecewise graphs (engine/piecewise_graphs.py): a callable islands(fn, *token_tensors) that runs each layer's
    # sequence-dependent core fn(meta, *token_tensors) between captured pieces; None: the model calls fn inline
    islands: object | None = None

    @property
    def max_seq_len(self) -> int:
        """What kernels size per-sequence work by: seq_len_bound if set, else the longest sequence."""
        if self.seq_len_bound is not None:
            return self.seq_len_bound
        return max(self.seq_lens_host) if self.seq_lens_host else 0

    @property
    def num_tokens(self) -> int:
        return self.query_start_host[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_slots_host)

    def seq_range(self, b: int) -> tuple[int, int]:
        return self.query_start_host[b], self.query_start_host[b + 1]

    @classmethod
    def build(cls, slots: list[int], start_positions: list[int], num_new: list[int],
              device: torch.device | str = "cpu", block_table: torch.Tensor | None = None,
              ep_tokens: int | None = None) -> "ForwardMeta":
        """Metadata from host lists (references, tests and direct model use; the engine builds its steps'
        through one staging buffer, engine/step_batch.py)."""
        if not (len(slots) == len(start_positions) == len(num_new)):
            raise ValueError("slots, start_positions and num_new must have one entry per sequence")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a cache slot appears twice in one step: {slots}")
        qs = [0]
        for n in num_new:
            if n < 1:
                raise ValueError(f"every scheduled sequence needs at least one new token, got {num_new}")
            qs.append(qs[-1] + n)
        pos = [p for s, n in zip(start_positions, num_new) for p in range(s, s + n)]
        tseq = [b for b, n in enumerate(num_new) for _ in range(n)]
        lens = [s + n for s, n in zip(start_positions, num_new)]
        li = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
        return cls(positions=li(pos), token_seq=li(tseq), seq_slots=li(slots), query_start=li(qs),
                   seq_start=li(start_positions), seq_lens=li(lens), query_start_host=qs,
                   seq_start_host=list(start_positions), seq_lens_host=lens, seq_slots_host=list(slots),
                   block_table=block_table, ep_tokens=ep_tokens)
