"""FP8 KV cache (non-rotary dims in FP8 with per-64 power-of-two scales, rotary dims in float) against
float storage, in both FP8 dialects.

Stated tolerances: with official numerics the cached values are already FP8-rounded on the same 64-wide
blocks, so FP8 storage is exact (logits identical); with plain numerics it rounds the KV, and on the
tiny model the logits stay within 10% relative L2 of float storage. fnuz storage gives the OCP values
bit for bit (scale x2, clamp 224)."""

import pytest
import torch

from dsv4.cache.direct import DirectCache
from dsv4.cache.model_cache import CacheLayout
from dsv4.model import build_model
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.kv_format import Fp8KV, kv_alloc, kv_read, kv_write

CHUNKS = (100, 37, 1, 1, 128, 33)


def logits(lm, ids, kv_fp8, dialect=Fp8Dialect.OCP):
    dc = DirectCache(lm.cfg, 1, 512, "cpu", torch.float32, kv_fp8=kv_fp8, dialect=dialect)
    assert isinstance(dc.cache.layers[0].window, Fp8KV) == kv_fp8
    s = dc.add()
    out, p = [], 0
    with torch.no_grad():
        for c in CHUNKS:
            out.append(lm.model.logits(lm.model(ids[p:p + c], dc.meta([s], [p], [c]), dc.cache)))
            p += c
    return torch.cat(out)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 129280, (sum(CHUNKS),), generator=torch.Generator().manual_seed(0))


def test_fp8_kv_is_exact_under_official_numerics(tiny_dir, ids):
    lm = build_model(tiny_dir, device="cpu", dtype="float32", numerics="official")
    a, b = logits(lm, ids, False), logits(lm, ids, True)
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item():.2e}"


def test_fp8_kv_within_tolerance_under_plain_numerics(tiny_dir, ids):
    lm = build_model(tiny_dir, device="cpu", dtype="float32", numerics="plain")
    a, b = logits(lm, ids, False), logits(lm, ids, True)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.10, f"plain numerics, FP8 vs float KV: relative L2 {rel:.3e}"


@pytest.mark.parametrize("numerics", ["official", "plain"])
def test_fnuz_kv_equals_ocp_kv(tiny_dir, ids, numerics):
    lm = build_model(tiny_dir, device="cpu", dtype="float32", numerics=numerics)
    assert torch.equal(logits(lm, ids, True, Fp8Dialect.OCP), logits(lm, ids, True, Fp8Dialect.FNUZ))


@pytest.mark.parametrize("dialect", [Fp8Dialect.OCP, Fp8Dialect.FNUZ])
def test_store_round_trip(dialect):
    g = torch.Generator().manual_seed(1)
    store = kv_alloc((3, 5), 512, 64, True, torch.bfloat16, "cpu", dialect)
    assert store.shape == (3, 5, 512) and store.nope.shape[-1] == 448 and store.scale.shape[-1] == 7
    x = torch.randn(2, 512, generator=g) * torch.logspace(-3, 2, 512)
    kv_write(store, (torch.tensor([0, 2]), torch.tensor([4, 1])), x)
    y = kv_read(store, (torch.tensor([0, 2]), torch.tensor([4, 1]))).float()
    assert torch.equal(y[:, 448:], x[:, 448:].to(torch.bfloat16).float())  # rotary dims stored as floats
    blocks = x[:, :448].view(2, 7, 64)
    # e4m3 with a power-of-two block scale s < 2 amax / 448: half an ulp is |x| / 16 for normal values and
    # s * 2^-10 in the subnormal range
    bound = torch.maximum(blocks.abs() / 16, blocks.abs().amax(-1, keepdim=True) / 448 * 2 ** -9)
    assert bool(((y[:, :448].view(2, 7, 64) - blocks).abs() <= bound).all())
    # rounding an already rounded row is exact
    kv_write(store, (torch.tensor([1]), torch.tensor([0])), y[:1])
    assert torch.equal(kv_read(store, (torch.tensor([1]), torch.tensor([0]))).float(), y[:1])


def test_fp8_layout_bytes(tiny_dir):
    from dsv4.config import ModelConfig

    cfg = ModelConfig.from_file(tiny_dir)
    bf, f8 = CacheLayout.of(cfg, torch.bfloat16, False), CacheLayout.of(cfg, torch.bfloat16, True)
    assert f8.page_bytes < bf.page_bytes and f8.slot_bytes < bf.slot_bytes
    flash = ModelConfig.from_file(__import__("dsv4").__path__[0] + "/configs/deepseek-v4-flash.json")
    L = CacheLayout.of(flash, torch.bfloat16, False)
    # spec §2.12: ~6.9 KB per token of compressed KV + indexer keys (bf16)
    assert abs(L.page_bytes / L.page_tokens - (5536 + 1344)) < 1
    L8 = CacheLayout.of(flash, torch.bfloat16, True)
    assert abs(L8.page_bytes / L8.page_tokens - (583 * (21 / 4 + 20 / 128) + 1344)) < 1
