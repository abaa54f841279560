"""GPU check cases of the Triton fp8_act_quant / fp8_roundtrip / fp4_roundtrip providers
(dsv4/kernels/triton/quant.py) at DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import torch

from benchmarks.kernel_cases.common import bench_ms, roofline
from dsv4.kernels.triton.quant import fp4_roundtrip_triton, fp8_act_quant_triton, fp8_roundtrip_triton
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.quant import fp4_roundtrip_reference, fp8_act_quant_reference, fp8_roundtrip_reference


def gpu_check_cases(device="cuda"):
    """[(name, fn)]: fp8_act_quant [T, 4096] bf16 in both dialects vs the reference: bytes must be equal
    (zeros compared by value), timed (median ms); fp8_roundtrip [T, 448] (T = 1, 256, 8192) and
    fp4_roundtrip [T * 64, 128] (T = 1, 256, 4096) bf16 at the model's shapes, equal to the reference."""
    from dsv4.numerics.fp8 import fp8_decode

    def case(M, K=4096, dialect=Fp8Dialect.OCP):
        def run():
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(M, K, device=device, generator=g)
            # a different power-of-two range per block, so the scales vary along a row too
            mag = torch.exp2(torch.randint(-12, 12, (M, K // 128), device=device, generator=g).float())
            x = (x * mag.repeat_interleave(128, dim=1)).to(torch.bfloat16)
            q, s = fp8_act_quant_triton(x, 128, dialect)
            wq, ws = fp8_act_quant_reference(x, 128, dialect)
            same = (q == wq) | ((fp8_decode(q, dialect) == 0) & (fp8_decode(wq, dialect) == 0))
            out = {"q_mismatch": int((~same).sum()), "scale_mismatch": int((s != ws).sum())}
            out["triton_ms"] = bench_ms(lambda: fp8_act_quant_triton(x, 128, dialect), device)
            out["torch_ms"] = bench_ms(lambda: fp8_act_quant_reference(x, 128, dialect), device)
            out["bytes"] = M * K * (x.element_size() + 1) + M * (K // 128)
            out["flops"] = 4 * M * K
            return roofline(out)
        return run

    def rt_case(kind, T, dialect=Fp8Dialect.OCP):
        """fp8: the KV rows' non-RoPE part, a [T, 448] view of the [T, 512] bf16 kv (row stride 512) as
        attention.py passes it, per 64; fp4: the Hadamard-rotated indexer queries [T, 64, 128] bf16
        (= [T * 64, 128]) per 32. Results must be equal to the reference (torch.equal), timed."""
        def run():
            g = torch.Generator(device=device).manual_seed(1)
            if kind == "fp8":
                full = torch.randn(T, 512, device=device, generator=g)
                mag = torch.exp2(torch.randint(-8, 8, (T, 8), device=device, generator=g).float())
                x = (full * mag.repeat_interleave(64, dim=1)).to(torch.bfloat16)[:, :448]
                fn = lambda: fp8_roundtrip_triton(x, 64, dialect)  # noqa: E731
                ref = lambda: fp8_roundtrip_reference(x, 64, dialect)  # noqa: E731
            else:
                x = torch.randn(T, 64, 128, device=device, generator=g)
                mag = torch.exp2(torch.randint(-8, 8, (T, 64, 4), device=device, generator=g).float())
                x = (x * mag.repeat_interleave(32, dim=-1)).to(torch.bfloat16)
                fn = lambda: fp4_roundtrip_triton(x, 32)  # noqa: E731
                ref = lambda: fp4_roundtrip_reference(x, 32)  # noqa: E731
            got, want = fn(), ref()
            out = {"equal": bool(torch.equal(got, want)), "mismatch": int((got != want).sum()),
                   "max_abs": float((got.float() - want.float()).abs().max()),
                   "contiguous_out": got.is_contiguous() and got.shape == x.shape}
            out["triton_ms"] = bench_ms(fn, device)
            out["torch_ms"] = bench_ms(ref, device)
            out["bytes"] = 2 * x.numel() * x.element_size()
            out["flops"] = 20 * x.numel()
            return roofline(out)
        return run

    return [("fp8_act_quant[256,4096] bf16 ocp", case(256)),
            ("fp8_act_quant[8192,4096] bf16 ocp", case(8192)),
            ("fp8_act_quant[8192,4096] bf16 fnuz", case(8192, dialect=Fp8Dialect.FNUZ)),
            ("fp8_roundtrip[1,448/512] bf16 ocp", rt_case("fp8", 1)),
            ("fp8_roundtrip[256,448/512] bf16 ocp", rt_case("fp8", 256)),
            ("fp8_roundtrip[8192,448/512] bf16 ocp", rt_case("fp8", 8192)),
            ("fp8_roundtrip[8192,448/512] bf16 fnuz", rt_case("fp8", 8192, Fp8Dialect.FNUZ)),
            ("fp4_roundtrip[1*64,128] bf16", rt_case("fp4", 1)),
            ("fp4_roundtrip[256*64,128] bf16", rt_case("fp4", 256)),
            ("fp4_roundtrip[4096*64,128] bf16", rt_case("fp4", 4096))]
