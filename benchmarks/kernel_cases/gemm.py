"""GPU check cases of the Triton linear / grouped_linear providers (dsv4/kernels/triton/gemm.py) and the
scaled_mm vendor provider at DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import math

import torch

from benchmarks.kernel_cases.common import H200_BW, H200_FLOPS, H200_FP8_FLOPS, bench_ms
from dsv4.kernels.triton.gemm import grouped_linear_triton, linear_triton
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.linear import grouped_linear_reference, linear_reference


# DeepSeek-V4-Flash linear shapes (N, K): every FP8 weight outside the routed experts
FLASH_LINEARS = (("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096), ("wo_b", 4096, 8192),
                 ("shared_w13", 2048, 4096), ("shared_w2", 4096, 2048), ("indexer_wq_b", 8192, 1024),
                 ("e_h_proj", 4096, 4096))
GPU_MS = (1, 64, 256, 1024, 8192)


def _make_fp8_weight(N: int, K: int, device, seed: int = 0, dialect=Fp8Dialect.OCP):
    """Random FP8 block weight of the checkpoint's kind: ~N(0, 1/K), a different scale per 128 x 128 block."""
    from dsv4.numerics.fp8 import quantize_fp8_blocks

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(N, K, device=device, generator=g) / math.sqrt(K)
    blk = torch.exp2(torch.randint(-2, 3, (-(-N // 128), -(-K // 128)), device=device, generator=g).float())
    w = w * blk.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    q, s = quantize_fp8_blocks(w, (128, 128), dialect)
    q = torch.where(q == 0x80, torch.zeros_like(q), q)  # -0 -> +0 (same value; not the fnuz NaN byte)
    return q.view(dialect.torch_dtype), s


def _err(got: torch.Tensor, want: torch.Tensor) -> dict:
    d = (got.float() - want.float()).abs()
    ref = want.float().abs().max().clamp_min(1e-30)
    return {"max_abs_err": float(d.max()), "max_rel_err": float(d.max() / ref), "mean_abs_err": float(d.mean()),
            "ref_abs_max": float(ref)}


def _roof(res: dict, t_ms: float, bytes_: float, flops: float, peak: float) -> dict:
    res.update(time_ms=t_ms, triton_ms=t_ms, bytes=bytes_, flops=flops, peak_flops=peak,
               floor_us=max(bytes_ / H200_BW, flops / peak) * 1e6)
    t = t_ms * 1e-3
    ok = t == t and t > 0
    res["hbm_roofline_frac"] = bytes_ / H200_BW / t if ok else float("nan")
    res["flop_roofline_frac"] = flops / peak / t if ok else float("nan")
    res["roofline_frac"] = res["floor_us"] * 1e-6 / t if ok else float("nan")
    return res


def _gpu_linear_case(N: int, K: int, M: int, act_quant: bool, provider: str = "triton", *, device="cuda",
                     bench: bool = True, dtype=None):
    """linear at [M, K] x [N, K]^T, FP8 OCP weight, bf16 activations (fp32 on the CPU smoke test), vs the
    reference; bytes = weight + scales + x + y (the weight dominates at small M: the HBM floor), FLOPs =
    2 M N K at the FP8 (official) / bf16 (plain) matrix rate."""

    def run():
        dev = torch.device(device)
        dt = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        if provider == "scaled_mm":
            from dsv4.kernels.vendor.scaled_mm import _scaled_mm_official, scaled_mm_supported
            from dsv4.platforms import detect

            why = scaled_mm_supported(detect(dev)) if dev.type == "cuda" else "needs CUDA"
            if why is not None:
                return {"skipped": why}

            def fn(x, w, s, act_quant):  # cuBLASLt itself (the provider hands decode sizes to Triton)
                return _scaled_mm_official(x, w, s)
        else:
            fn = linear_triton
        w, s = _make_fp8_weight(N, K, dev)
        g = torch.Generator(device=dev).manual_seed(1)
        x = torch.randn(M, K, device=dev, generator=g).to(dt)
        got = fn(x, w, s, act_quant)
        want = linear_reference(x, w, s, act_quant)
        res = _err(got, want)
        res["weight_bytes"] = N * K + s.numel()
        t = bench_ms(lambda: fn(x, w, s, act_quant), dev, warmup=10, rep=50) if bench else float("nan")
        bytes_ = N * K + s.numel() + M * K * x.element_size() + M * N * x.element_size()
        return _roof(res, t, bytes_, 2.0 * M * N * K, H200_FP8_FLOPS if act_quant else H200_FLOPS)

    return run


def _gpu_grouped_case(M: int, G: int = 8, R: int = 1024, Kg: int = 4096, *, device="cuda", bench: bool = True):
    """grouped wo_a: x [M, G, Kg] bf16, weight [G*R, Kg] FP8 (plain numerics: weight dequantised to bf16)."""

    def run():
        dev = torch.device(device)
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        w, s = _make_fp8_weight(G * R, Kg, dev)
        g = torch.Generator(device=dev).manual_seed(2)
        x = torch.randn(M, G, Kg, device=dev, generator=g).to(dt)
        got = grouped_linear_triton(x, w, s)
        want = grouped_linear_reference(x, w, s)
        res = _err(got, want)
        res["weight_bytes"] = G * R * Kg + s.numel()
        t = bench_ms(lambda: grouped_linear_triton(x, w, s), dev, warmup=10, rep=50) if bench else float("nan")
        bytes_ = G * R * Kg + s.numel() + M * G * (Kg + R) * x.element_size()
        return _roof(res, t, bytes_, 2.0 * M * G * R * Kg, H200_FLOPS)

    return run


def gpu_check_cases(device="cuda"):
    """[(name, fn)]: every DeepSeek-V4-Flash FP8 linear at M = 1, 64, 256, 1024, 8192 tokens: Triton plain
    (act_quant False), Triton official (act_quant True) and the scaled_mm vendor provider (official; a
    'skipped' record where it cannot run), and the grouped wo_a projection at M = 1, 256, 8192. Each
    returns errors vs the reference, the median time, bytes / FLOPs and fractions of both rooflines
    (H200: 4.8e12 B/s; 1,460e12 FP8 / 790e12 bf16 FLOP/s)."""
    cases = []
    for name, N, K in FLASH_LINEARS:
        for M in GPU_MS:
            for aq, prov in ((False, "triton"), (True, "triton"), (True, "scaled_mm")):
                tag = "official" if aq else "plain"
                cases.append((f"linear {name} {N}x{K} M={M} {tag} {prov}",
                              _gpu_linear_case(N, K, M, aq, prov, device=device)))
    for M in (1, 256, 8192):
        cases.append((f"grouped_linear wo_a 8x1024x4096 M={M} triton", _gpu_grouped_case(M, device=device)))
    return cases
