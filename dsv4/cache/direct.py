"""A cache for driving the model directly, outside the engine (tests, benchmarks, the reference loop in
tests/engine/oracle.py, the engine's activation profile): sequences get a slot and the pages for
`max_seq_len` tokens up front, and `meta` builds a step's metadata, with the cache's block table,
checking and recording lengths through the same KVCacheManager the engine uses.

    dc = DirectCache(cfg, num_seqs=2, max_seq_len=64, device="cpu", dtype=torch.float32)
    a, b = dc.add(), dc.add()
    X = model(ids, dc.meta([a, b], [0, 0], [5, 3]), dc.cache)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from dsv4.cache.kv_manager import KVCacheManager
from dsv4.cache.model_cache import ModelCache
from dsv4.config import ModelConfig
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.meta import ForwardMeta


@dataclass(eq=False)
class _Seq:
    request_id: str
    slot: int | None = None
    pages: list[int] = field(default_factory=list)


class DirectCache:
    def __init__(self, cfg: ModelConfig, num_seqs: int, max_seq_len: int, device, dtype: torch.dtype,
                 kv_fp8: bool = False, dialect: Fp8Dialect = Fp8Dialect.OCP, page_tokens: int | None = None,
                 with_mtp: bool = False):
        probe = ModelCache.pages_needed(cfg, max_seq_len, page_tokens)
        self.cache = ModelCache(cfg, num_seqs, max_seq_len, device, dtype, page_tokens=page_tokens,
                                num_pages=num_seqs * probe, kv_fp8=kv_fp8, dialect=dialect, with_mtp=with_mtp)
        self.kv = KVCacheManager(self.cache)
        self._seqs: dict[int, _Seq] = {}
        self._ids = itertools.count()

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def add(self) -> int:
        """A new empty sequence: its slot."""
        seq = _Seq(f"direct-{next(self._ids)}")
        if not self.kv.admit(seq):
            raise RuntimeError(f"all {self.cache.num_slots} cache slots are in use")
        if not self.kv.reserve(seq, self.cache.max_seq_len):
            raise RuntimeError("the direct cache has too few pages (a bug)")
        self._seqs[seq.slot] = seq
        return seq.slot

    def remove(self, slot: int) -> None:
        seq = self._seqs.pop(slot, None)
        if seq is None:
            raise ValueError(f"slot {slot} is not allocated")
        self.kv.release(seq)

    def seq_len(self, slot: int) -> int:
        return self.kv.seq_len(slot)

    def meta(self, slots: list[int], starts: list[int], num_new: list[int]) -> ForwardMeta:
        """The metadata of one step that adds num_new[b] tokens at starts[b] to sequence slots[b]; the
        lengths are checked and recorded (ValueError if a sequence does not continue where it stopped)."""
        for s in slots:
            if s not in self._seqs:
                raise ValueError(f"slot {s} is not allocated")
        meta = ForwardMeta.build(slots, starts, num_new, self.device, block_table=self.cache.block_table)
        self.kv.begin_step(slots, starts, meta.seq_lens_host)
        self.kv.sync_block_table()
        return meta
