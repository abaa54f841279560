"""Vendor providers "humming" and "humming_w4a8" for `moe_experts` (dsv4/ops/moe.py): the routed MXFP4
experts through humming-kernels (Apache-2.0; vLLM's quantized-GEMM backend, kernels JIT-compiled through
NVRTC; optional: `pip install dsv4[nvidia]`). "humming": W4A16, bf16 activations times MXFP4 weights decoded
inside its GEMM, fp32 accumulation, bf16 output. "humming_w4a8" (opt-in, never chosen by itself): FP8
activations on FP8 tensor cores, faster but outside the reference's tolerance on Hopper.

Pipeline per call (every size from T, k and the tile choice; no host syncs: graph-capturable once each
bucket has run eagerly, which compiles its kernels):
  1. dispatch: dsv4's own on-device dispatch (kernels/triton/moe_dispatch.py) at humming's block M for
     T k rows, padding slots = T k (humming skips slots >= T k), num_tokens_padded = blocks x BM;
  2. act_quant: x rounded through FP8 per (row, 128) (the official recipe) and kept in bf16, where it is
     exact, so the W4A16 GEMM computes exactly the official FP8-activation products (W4A8: x, and h in
     step 5, go in as the FP8 bytes with fp32 power-of-two scales per (row, 128) instead);
  3. gate-up: humming's "indexed" MoE GEMM gathers x[slot // k] itself and writes row `slot` of
     gu [T k, 2I] (bf16, as `linear` returns);
  4. `swiglu_rows` (Triton): SwiGLU with the clamps, routing weight, bf16, FP8 round trip of h;
  5. down: the indexed GEMM again (top_k 1) -> y [T k, D] bf16;
  6. `moe_combine` (Triton): out[t] = sum_j y[t k + j] in fp32, j in order.
Numerics: the same products as the reference (FP8 x 2^e activations and FP4 x 2^s weights are exact in
bf16), fp32 sums in another order, the same roundings. humming's stream-K splits add partial sums in
bf16 (lossy, order-dependent); BATCH_INVARIANT turns stream-K off.

Weights: transformed into humming's layout on first use and cached by the weight tensor (a second copy
of the expert weights; the checkpoint layout stays for the other providers). The engine's memory profile
step runs the first forward, so the copies count against the KV-cache budget; a weight whose copy does
not fit in free memory stays on the Triton kernels (logged). Expert parallelism: the ExpertMap's local
experts are the weights' rows; remote pairs are dispatched nowhere.

Capability: CUDA, an architecture this integration was checked on (VERIFIED_ARCHS), humming importable.
Delegated to the Triton provider (same results, decided from shapes and dtypes only, so one model always
takes one path): activations not bf16, experts not MXFP4, N or K of a GEMM not a multiple of 64.
"""

from __future__ import annotations

import logging
import weakref

import torch

from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.linear import weight_format
from dsv4.ops.moe import moe_experts as moe_experts_op
from dsv4.ops.moe_dispatch import ExpertMap

try:
    from dsv4.kernels.triton import moe as km
    from dsv4.kernels.triton.gemm import act_quant_into
    from dsv4.kernels.triton.moe_dispatch import moe_dispatch_triton

    _HAVE_TRITON = True
except ImportError:
    _HAVE_TRITON = False

log = logging.getLogger(__name__)
QB = 128
VERIFIED_ARCHS = ("sm90",)  # checked against the reference on an H200 (docs/perf.md)
BATCH_INVARIANT = True  # no stream-K: fp32 sums only (stream-K adds partial sums in bf16)
ALIGN = 64  # humming needs N and K multiples of 64 (FP8 inputs; 32 for bf16) without padding
# free device memory asked for before transforming a weight, in weight bytes (the copy, plus humming's
# padded intermediate; measured peak not yet recorded): with less, that weight stays on the Triton kernels
TRANSFORM_MEMORY_FACTOR = 2.2
W4A8_SCALE_WINDOW = 11  # binades of 32-block scales per row that humming's W4A8 transform keeps exactly


def _humming():
    """The humming modules used here (imported lazily: importing humming imports Triton and cuda.bindings)."""
    from humming.forward import humming_forward
    from humming.schema import HummingInputSchema, HummingWeightSchema
    from humming.transform import prepare_fp16_e8m0_scale, prepare_layer_config, transform_humming_tensors
    from humming.tune import get_heuristics_config

    return dict(forward=humming_forward, input_schema=HummingInputSchema, weight_schema=HummingWeightSchema,
                prepare_scale=prepare_fp16_e8m0_scale, prepare_config=prepare_layer_config,
                transform=transform_humming_tensors, heuristics=get_heuristics_config)


class HummingExperts:
    """One stacked expert weight ([E, N, K/2] FP4 + [E, N, K/32] E8M0) in humming's layout: W4A16 (bf16
    activations) or, with a8, W4A8 (FP8 e4m3 activations with fp32 scales per (row, 128 channels))."""

    def __init__(self, w: torch.Tensor, s: torch.Tensor, hm: dict, a8: bool = False):
        E, N, K2 = w.shape
        self.hm = hm
        ws = hm["weight_schema"](b_dtype="float4e2m1", bs_dtype="float8e8m0", weight_scale_group_size=32)
        ins = (hm["input_schema"](a_dtype="float8e4m3", input_scale_group_size=QB) if a8
               else hm["input_schema"](a_dtype="bfloat16"))
        t = {"weight": w.contiguous().view(torch.int32), "weight_scale": s.contiguous().view(torch.float8_e8m0fnu)}
        cfg = hm["prepare_config"](shape_n=N, shape_k=2 * K2, weight_schema=ws, input_schema=ins, num_experts=E,
                                   torch_dtype=torch.bfloat16, device=w.device, tensors=t)
        cfg, t = hm["prepare_scale"](cfg, t)
        self.cfg = cfg
        self.tensors = hm["transform"](cfg, t, allow_inplace=False)
        self.locks = torch.zeros(2048, dtype=torch.int32, device=w.device)
        self.compute = {"gemm_type": "indexed", "use_batch_invariant": BATCH_INVARIANT}
        self._bm: dict[int, int] = {}

    def block_m(self, rows: int) -> int:
        """humming's block M for an indexed GEMM over `rows` (token, slot) rows (its heuristics; cached)."""
        bm = self._bm.get(rows)
        if bm is None:
            c = self.hm["heuristics"](self.cfg, shape_m=rows, use_batch_invariant=BATCH_INVARIANT,
                                      gemm_type="indexed", device=self.locks.device)
            bm = self._bm[rows] = int(c["block_shape"][0])
        return bm

    def __call__(self, a: torch.Tensor, top_k: int, sorted_ids, expert_ids, num_padded, out: torch.Tensor,
                 a_scale: torch.Tensor | None = None):
        t = self.tensors
        return self.hm["forward"](self.cfg, inputs=a, weight=t["weight"], weight_scale=t.get("weight_scale"),
                                  weight_scale_2=t.get("weight_scale_2"), outputs=out, input_scale=a_scale,
                                  sorted_ids=sorted_ids, expert_ids=expert_ids, num_tokens_padded=num_padded,
                                  locks=self.locks, top_k=top_k, compute_config=self.compute)


def scale_window_ok(w: torch.Tensor, s: torch.Tensor) -> bool:
    """True when, in every row of every expert, the E8M0 scales of the 32-blocks holding a nonzero code span
    at most W4A8_SCALE_WINDOW binades: then humming's W4A8 weight transform (one scale per expert or row
    plus bounded per-block exponents) keeps every FP4 value exactly; blocks outside it would be re-quantized.
    One pass over the weight on its device (load time)."""
    E, N, K2 = w.shape
    nz = (w.reshape(E, N, K2 // 16, 16) != 0).any(-1)
    sb = s.view(torch.uint8).to(torch.int16)
    hi = torch.where(nz, sb, -1).amax(dim=-1)
    lo = torch.where(nz, sb, 999).amin(dim=-1)
    spread = torch.where(hi >= 0, hi - lo, 0)
    return bool((spread <= W4A8_SCALE_WINDOW).all())


_CACHE: dict[tuple[int, bool], tuple] = {}


def prepared(w: torch.Tensor, s: torch.Tensor, a8: bool = False) -> HummingExperts | None:
    """The humming form of (w, s), transformed once per weight tensor and mode (cached by identity and
    version). None, with a warning in the log once, when the device has too little free memory for the copy
    (the caller then runs the Triton kernels), or, for W4A8, when the weight's scales do not fit the exact
    window (scale_window_ok; the caller then takes W4A16, which is exact for every scale)."""
    key = (id(w), a8)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    conv = None
    need = int(TRANSFORM_MEMORY_FACTOR * (w.numel() * w.element_size() + s.numel() * s.element_size()))
    free = torch.cuda.mem_get_info(w.device)[0] if w.is_cuda else need
    if free < need:
        log.warning("humming: %.2f GiB free on %s, its copy of expert weight %s needs ~%.2f GiB: this weight is "
                    "served by the Triton kernels (same results up to summation order)", free / 2**30, w.device,
                    tuple(w.shape), need / 2**30)
    elif not a8 or scale_window_ok(w, s):
        conv = HummingExperts(w, s, _humming(), a8)
    else:
        log.warning("humming W4A8: expert weight %s has 32-block scales spanning more than %d binades in a row; "
                    "served by W4A16 (exact)", tuple(w.shape), W4A8_SCALE_WINDOW)
    _CACHE[key] = (weakref.ref(w), w._version, conv)
    return conv


def delegate_reason_shapes(x_dtype, w13, w2) -> str | None:
    """Why experts of these dtypes and shapes go to the Triton provider (None: humming takes them)."""
    if x_dtype != torch.bfloat16:
        return f"activations {x_dtype} (W4A16 takes bf16)"
    if weight_format(w13) != "fp4" or weight_format(w2) != "fp4":
        return "experts not MXFP4"
    D, I = w13.shape[2] * 2, w13.shape[1] // 2
    if (2 * I) % ALIGN or D % ALIGN or I % ALIGN:
        return f"hidden {D} / intermediate {I} not multiples of {ALIGN}"
    return None


def delegate_reason(x, w13, w2) -> str | None:
    """Why this call goes to the Triton provider (None: humming takes it). Host metadata only."""
    if not x.is_cuda:
        return "not on CUDA"
    return delegate_reason_shapes(x.dtype, w13, w2)


def _slots_for(ids: torch.Tensor, emap: ExpertMap, bm: int):
    """dsv4's dispatch at block bm in humming's indexed form: (sorted_ids int32 with padding = T k,
    expert_ids int32 per block, num_tokens_padded int32 [1])."""
    slots, bexp, _, _, ids_ok, rows = moe_dispatch_triton(ids, emap, bm, pad=ids.numel())
    km.check_ids(ids_ok)
    return slots, bexp, rows


def _fp8_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a [M, K] -> (OCP FP8 e4m3 [M, K], fp32 scales [M, K/128]): the official 1x128 quantisation
    (power-of-two scales), so q x scale is exactly what act_roundtrip gives, in either dialect (the fnuz
    recipe yields the same values: tests/ops/test_moe_triton.py::test_act_quant_fnuz_equals_ocp_exactly)."""
    M, K = a.shape
    q = torch.empty((M, K), dtype=torch.uint8, device=a.device)
    sb = torch.empty((M, K // QB), dtype=torch.uint8, device=a.device)
    act_quant_into(a, q, sb, Fp8Dialect.OCP)
    # act_quant_into's scale bytes are never 0 or 255, the cases numerics.fp8.e8m0_to_float special-cases with
    # four more launches per call (measured on the H200: W4A8 at T = 1 80 -> 88 us); exp2 is exact here
    return q.view(torch.float8_e4m3fn), torch.exp2(sb.to(torch.float32) - 127.0)


def moe_experts_humming(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit: float, act_quant: bool = False,
                        dialect=Fp8Dialect.OCP, expert_map: ExpertMap | None = None, shared=None, *, gemm=prepared,
                        a8: bool = False):
    """`moe_experts` through humming (module docstring). `gemm(w, s, a8)` builds the expert GEMM callable for a
    weight (tests substitute a plain-PyTorch stand-in with humming's documented indexed semantics). `a8`:
    W4A8 where official numerics allow it (act_quant: the FP8 activations are then exactly the official
    ones) and the weights pass the window check; W4A16 otherwise."""
    if delegate_reason(x, w13, w2) is not None and gemm is prepared:
        return km.moe_experts_triton(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant, dialect,
                                     expert_map, shared)
    T, D = x.shape
    k = ids.shape[1]
    N = T * k
    E_loc = w13.shape[0]
    emap = ExpertMap.identity(E_loc) if expert_map is None else expert_map
    if emap.num_local != E_loc or w2.shape[0] != E_loc:
        raise ValueError(f"moe_experts: expert map has {emap.num_local} local experts, weights hold "
                         f"{E_loc} / {w2.shape[0]}")
    I = w13.shape[1] // 2
    out = km.experts_out(T, D, x.device, shared)
    if N == 0 or I == 0 or D == 0:
        return km.experts_nothing_routed(T, D, x.device, shared)
    ids_c = ids.contiguous()
    use8 = a8 and act_quant
    if use8:
        g13, g2 = gemm(w13, w13_scale, True), gemm(w2, w2_scale, True)
        use8 = g13 is not None and g2 is not None
    if not use8:
        g13, g2 = gemm(w13, w13_scale, False), gemm(w2, w2_scale, False)
        if g13 is None or g2 is None:  # no memory for humming's copy of these weights
            return km.moe_experts_triton(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant,
                                         dialect, expert_map, shared)
    bm13, bm2 = g13.block_m(N), g2.block_m(N)
    d13 = _slots_for(ids_c, emap, bm13)
    d2 = d13 if bm2 == bm13 else _slots_for(ids_c, emap, bm2)
    gu = torch.empty((N, 2 * I), dtype=x.dtype, device=x.device)
    if use8:
        xq, xs = _fp8_rows(x.contiguous())
        g13(xq, k, *d13, out=gu, a_scale=xs)
    else:
        xa = km.act_roundtrip(x.contiguous(), dialect) if act_quant else x.contiguous()
        g13(xa, k, *d13, out=gu)
    h = km.swiglu_rows(gu, ids_c, weights, emap, swiglu_limit, act_quant, dialect)
    y = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if use8:  # h already holds FP8 x 2^e values: quantising again gives back exactly those codes and scales
        hq, hs = _fp8_rows(h)
        g2(hq, 1, *d2, out=y, a_scale=hs)
    else:
        g2(h, 1, *d2, out=y)
    return km.moe_combine(y, ids_c, emap, out, shared)


def humming_supported(platform) -> str | None:
    if platform.name != "cuda":
        return f"needs CUDA (humming-kernels); platform is {platform.name}"
    if platform.arch not in VERIFIED_ARCHS:
        return f"not verified on {platform.arch} (checked on {', '.join(VERIFIED_ARCHS)})"
    if not _HAVE_TRITON:
        return "needs Triton (dispatch, SwiGLU and combine kernels)"
    try:
        _humming()
    except Exception as e:  # noqa: BLE001 - not installed, or does not import here: say why
        return f"humming-kernels not usable (pip install dsv4[nvidia]): {type(e).__name__}: {str(e)[:200]}"
    return None


def moe_experts_humming_w4a8(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit: float,
                             act_quant: bool = False, dialect=Fp8Dialect.OCP, expert_map: ExpertMap | None = None,
                             shared=None):
    """Provider "humming_w4a8": W4A8 wherever official numerics allow it (and the weights pass the window
    check). Opt-in only (`--op moe_experts=humming_w4a8`): 1.5-2.4x faster than W4A16 from 8 tokens up on an
    H200, but Hopper's FP8 MMA accumulates with fewer bits than fp32, so results are 0.3-1.9% (max-relative)
    off the reference where W4A16 stays within 0.2% (docs/perf.md, 2026-12-04)."""
    return moe_experts_humming(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant, dialect,
                               expert_map, shared, a8=True)


moe_experts_op.register("humming", moe_experts_humming, supported=humming_supported, priority=200)
moe_experts_op.register("humming_w4a8", moe_experts_humming_w4a8, supported=humming_supported, priority=50)
