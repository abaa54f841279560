"""Vendor provider "scaled_mm" for `linear` (dsv4/ops/linear.py): the official numerics (act_quant=True) of
an OCP FP8 block weight through torch._scaled_mm's cuBLASLt block-scaled FP8 GEMM (DeepSeek style: 1x128
activation scales, 128x128 weight scales, fp32 scales, fp32 accumulation with the scales applied per
K block of 128, bf16 output).

Per call: (1) the Triton fp8_act_quant kernel quantises x per (row, 128 channels) into FP8 bytes + E8M0
scale bytes (rows padded to a multiple of 4 for cuBLASLt; padded rows are never read back), (2) a tiny
Triton kernel turns the scale bytes into fp32 powers of two in the outer-dim-major (M, K/128) layout
cuBLASLt wants (strides (1, M)), (3) torch._scaled_mm(a, weight.t(), scale_a, scale_b) with scale_b =
the weight's (N/128, K/128) scales as fp32, transposed (converted once per weight and cached). The same
values as the reference: both operands are FP8 grid values times powers of two, the products are exact
and the sums are fp32 (up to the order cuBLASLt uses).

Capability: CUDA with FP8 tensor cores, and this torch's _scaled_mm must accept and correctly compute
block-scaled FP8 (torch >= 2.9 with cuBLASLt >= 12.9, on sm90 only as of torch 2.11/2.12). That is
probed once per device, lazily, inside supported(): a tiny GEMM checked against the reference; any
error becomes the reason string. Cases it does not take (act_quant False, fnuz or FP4 or dense weights,
non-bf16 activations, K not a multiple of 512, N not a multiple of 128, tensors off CUDA) go to the
Triton provider, and so do calls of at most TRITON_MAX_M rows: at decode sizes the Triton GEMM (split-K,
one M tile, weight read once) beats cuBLASLt's blockwise GEMM 1.2-2x at every Flash projection (H200,
CUDA graphs, docs/perf.md 2026-12-06: e.g. wq_b 10.1 against 19.7 us at M = 1), and from 64 rows
cuBLASLt is as fast or faster (wq_b 16.0 against 18.1 us at M = 64; 4 layers at batch 64: 17.9 against
19.2 ms per step with every linear on Triton).
"""

from __future__ import annotations

import weakref

import torch

from dsv4.numerics.fp8 import Fp8Dialect, e8m0_to_float
from dsv4.ops.linear import linear as linear_op
from dsv4.ops.linear import linear_reference, usable_x_q

try:
    from dsv4.kernels.triton.gemm import act_quant_into, act_scales_f32_t, linear_triton

    _HAVE_TRITON = True
except ImportError:  # Triton not installed: nothing to quantise activations with
    _HAVE_TRITON = False
    linear_triton = linear_reference

QBLOCK = 128
TRITON_MAX_M = 32  # rows up to which the Triton GEMM serves (module docstring)


# ----------------------------------------------------------------------------- operand preparation


def _pad4(m: int) -> int:
    return -(-m // 4) * 4


def prepare_activation(x2: torch.Tensor, x_q=None):
    """x2 [M, K] float -> (a: float8_e4m3fn [MP, K] (rows >= M unset), scale_a: fp32 (MP, K/128) with
    strides (1, MP), M), MP = M rounded up to a multiple of 4; rows >= M have scale 1.0. x_q: the producer's OCP
    act_quant of x2 (linear's `x_q`), used when its bytes hold MP rows."""
    M, K = x2.shape
    mp = _pad4(max(M, 1))
    nb = -(-K // QBLOCK)
    if usable_x_q(x_q, M, K) and x_q[0].shape[0] >= mp:
        q, s = x_q
        return q[:mp].view(torch.float8_e4m3fn), act_scales_f32_t(s, mp), M
    q = torch.empty((mp, K), dtype=torch.uint8, device=x2.device)
    s = torch.empty((M, nb), dtype=torch.uint8, device=x2.device)
    act_quant_into(x2, q, s, Fp8Dialect.OCP)
    return q.view(torch.float8_e4m3fn), act_scales_f32_t(s, mp), M


_WSCALE_CACHE: dict[int, tuple] = {}


def weight_scale_b(scale: torch.Tensor) -> torch.Tensor:
    """The weight's E8M0 scale bytes [N/128, K/128] -> scale_b: fp32 (K/128, N/128) = the fp32 scales
    transposed (strides (1, K/128)). Converted once per scale tensor (cached by identity and version, so
    a forward pass, and a captured graph, reuse the same buffer)."""
    key = id(scale)
    hit = _WSCALE_CACHE.get(key)
    if hit is not None:
        ref, version, conv = hit
        if ref() is scale and version == scale._version:
            return conv.t()
    conv = e8m0_to_float(scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale).contiguous()
    _WSCALE_CACHE[key] = (weakref.ref(scale), scale._version, conv)
    return conv.t()


def prepare_operands(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, x_q=None):
    """Every argument of the torch._scaled_mm call, plus M: (a [MP, K] e4m3fn, b = weight.t() [K, N]
    (column-major), scale_a (MP, K/128) strides (1, MP), scale_b (K/128, N/128) strides (1, K/128), M)."""
    a, sa, M = prepare_activation(x2, x_q)
    return a, weight.t(), sa, weight_scale_b(scale), M


def _scaled_mm_official(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, x_q=None) -> torch.Tensor:
    K = x.shape[-1]
    N = weight.shape[0]
    a, b, sa, sb, M = prepare_operands(x.reshape(-1, K), weight, scale, x_q)
    out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=x.dtype)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    return out[:M].reshape(*x.shape[:-1], N)


def delegate_reason(x, weight, scale, act_quant) -> str | None:
    """Why this call goes to the Triton provider (None: scaled_mm takes it). Host metadata only."""
    if not act_quant:
        return "plain numerics (act_quant False)"
    if weight.dtype != torch.float8_e4m3fn:
        return f"weight dtype {weight.dtype} (only OCP FP8 block weights)"
    if scale is None:
        return "no weight scale"
    if not x.is_cuda:
        return "not on CUDA"
    if x.dtype != torch.bfloat16:
        return f"activations {x.dtype} (bf16 output only)"
    K, N = x.shape[-1], weight.shape[0]
    if K % (4 * QBLOCK) or N % QBLOCK or weight.shape[1] != K:
        return f"shape N={N}, K={K} (needs K % 512 == 0, N % 128 == 0)"
    if x.numel() == 0:
        return "empty"
    if x.numel() // K <= TRITON_MAX_M:
        return f"{x.numel() // K} rows <= {TRITON_MAX_M} (the Triton GEMM is faster at decode sizes)"
    return None


def linear_scaled_mm(x, weight, scale=None, act_quant: bool = False, dialect=Fp8Dialect.OCP, x_q=None,
                     out_dtype=None):
    if out_dtype is not None or delegate_reason(x, weight, scale, act_quant) is not None:
        return linear_triton(x, weight, scale, act_quant, dialect, x_q, out_dtype)
    # the weight is OCP (delegate_reason), so are the bytes it multiplies: the producer's only if made in OCP
    return _scaled_mm_official(x, weight, scale, x_q if Fp8Dialect.parse(dialect) is Fp8Dialect.OCP else None)


# ----------------------------------------------------------------------------- capability


_PROBE: dict[str, str | None] = {}


def _probe(device: str) -> str | None:
    """A tiny block-scaled GEMM on the device (M = 6: row padding; K = 512; N = 256: two weight row
    blocks; a different activation scale per (row, block) and weight scale per block) against the
    reference. Any exception, or a wrong result, is the reason this provider cannot run."""
    try:
        from dsv4.numerics.fp8 import quantize_fp8_blocks

        g = torch.Generator().manual_seed(0)
        M, K, N = 6, 512, 256
        x = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-6, 6, (M, K // 128), generator=g).float()
                                                        ).repeat_interleave(128, 1)
        x = x.to(torch.bfloat16)
        w = torch.randn(N, K, generator=g) * torch.exp2(torch.randint(-8, -2, (N // 128, K // 128), generator=g)
                                                        .float()).repeat_interleave(128, 0).repeat_interleave(128, 1)
        wq, ws = quantize_fp8_blocks(w, (128, 128), Fp8Dialect.OCP)
        wq = torch.where(wq == 0x80, torch.zeros_like(wq), wq).view(torch.float8_e4m3fn)
        want = linear_reference(x, wq, ws, True).float()
        got = _scaled_mm_official(x.to(device), wq.to(device), ws.to(device)).float().cpu()
        err = float((got - want).abs().max() / want.abs().max())
        if not err < 1e-2:  # bf16 output: ~4e-3 at most when the layout is right; a wrong layout is O(1)
            return f"block-scaled torch._scaled_mm gave wrong results in the capability probe (rel err {err:.3g})"
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run here", with the message
        msg = " ".join(str(e).split())[:300]
        return (f"torch {torch.__version__} _scaled_mm does not run block-scaled FP8 (1x128, 128x128) here: "
                f"{type(e).__name__}: {msg}")


def scaled_mm_supported(platform) -> str | None:
    if platform.name != "cuda":
        return f"needs CUDA (cuBLASLt block-scaled FP8); platform is {platform.name}"
    if not platform.has_fp8_mma:
        return f"no FP8 tensor cores on {platform.arch}"
    if not _HAVE_TRITON:
        return "needs Triton (the activation quantiser)"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    if platform.device not in _PROBE:
        _PROBE[platform.device] = _probe(platform.device)
    return _PROBE[platform.device]


linear_op.register("scaled_mm", linear_scaled_mm, supported=scaled_mm_supported, priority=200)
