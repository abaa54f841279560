"""GPU check cases of the Triton moe_experts provider (dsv4/kernels/triton/moe.py) at
DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py), and the random MXFP4 experts / routings
the MoE benchmarks share (moe_floor.py, moe_tile_sweep.py, fp4_decode_sweep.py)."""

from __future__ import annotations

import functools

import torch

from benchmarks.kernel_cases.common import H200_BW, H200_FLOPS, bench_ms, rel_err, roofline
from dsv4.kernels.triton.moe import moe_experts_impl, moe_tiles
from dsv4.kernels.triton.moe_dispatch import moe_dispatch_triton
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.moe_dispatch import ExpertMap


FLASH = dict(D=4096, I=2048, E=256, k=6)
GPU_TOKENS = (1, 8, 64, 256, 1024, 8192)


@functools.lru_cache(maxsize=2)
def _fp4_experts(E: int, D: int, I: int, device: str):
    """Random MXFP4 experts of the release's layout (random codes; scale bytes 118..120, so |w| <~ 0.05):
    w13 [E, 2I, D/2] + [E, 2I, D/32], w2 [E, D, I/2] + [E, D, I/32] (uint8). Cached: ~13.4 MB per expert."""
    g = torch.Generator(device=device).manual_seed(0)
    w13 = torch.randint(0, 256, (E, 2 * I, D // 2), dtype=torch.uint8, device=device, generator=g)
    s13 = torch.randint(118, 121, (E, 2 * I, D // 32), dtype=torch.uint8, device=device, generator=g)
    w2 = torch.randint(0, 256, (E, D, I // 2), dtype=torch.uint8, device=device, generator=g)
    s2 = torch.randint(118, 121, (E, D, I // 32), dtype=torch.uint8, device=device, generator=g)
    return w13, s13, w2, s2


def _route_inputs(T: int, E: int, k: int, device, seed: int = 1):
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randn(T, E, device=device, generator=g).topk(k, dim=-1).indices
    w = 0.1 + 0.4 * torch.rand(T, k, device=device, generator=g)
    return ids, w


def case_inputs(T: int, D: int, I: int, E: int, k: int, device: str):
    """(device, cached MXFP4 experts, x [T, D] (bf16 on a GPU, fp32 on the CPU smoke run), ids, routing weights)
    of one experts case."""
    dev = torch.device(device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(T, D, device=dev, generator=g).to(dt)
    return (dev, _fp4_experts(E, D, I, str(dev)), x) + _route_inputs(T, E, k, dev)


def experts_case(T: int, act_quant: bool, *, D=4096, I=2048, E=256, k=6, device="cuda", scaled_dot=None,
                 bench: bool = True, dialect=Fp8Dialect.OCP):
    """moe_experts with FP4 experts at [T, D] (bf16 on a GPU, fp32 on the CPU smoke run) vs the reference.
    bytes = unique experts hit x (w13 + w2 bytes incl. scales; 13.37 MB at Flash shapes) + x + out;
    flops = 2 T k (2 I D + D I) at the bf16 rate (the FP8-activation path also dots in bf16)."""
    from dsv4.ops.moe import moe_experts_reference

    def run():
        dev, (w13, s13, w2, s2), x, ids, w = case_inputs(T, D, I, E, k, device)

        def fn():
            return moe_experts_impl(x, w13, s13, w2, s2, ids, w, 10.0, act_quant, dialect, scaled_dot=scaled_dot)

        got = fn()
        want = moe_experts_reference(x, w13, s13, w2, s2, ids, w, 10.0, act_quant, dialect)
        out = rel_err(got, want)
        uniq = int(torch.unique(ids).numel())
        per_expert = w13[0].numel() + s13[0].numel() + w2[0].numel() + s2[0].numel()
        out.update(unique_experts=uniq, weight_bytes=uniq * per_expert)
        out["bytes"] = uniq * per_expert + T * D * (x.element_size() + 4)
        out["flops"] = 2.0 * T * k * (2 * I * D + D * I)
        out["triton_ms"] = bench_ms(fn, dev) if bench else float("nan")
        cfg = moe_tiles(T * k, E, I, D, False)
        out["block_m"] = cfg["block_m"]
        out["dispatch_ms"] = (bench_ms(lambda: moe_dispatch_triton(ids, ExpertMap.identity(E), cfg["block_m"]), dev)
                              if bench else float("nan"))
        out = roofline(out)
        t = out["triton_ms"] * 1e-3
        out["floor_us"] = max(out["bytes"] / H200_BW, out["flops"] / H200_FLOPS) * 1e6
        out["roofline_frac"] = out["floor_us"] * 1e-6 / t if t > 0 else float("nan")
        return out

    return run


def gpu_check_cases(device="cuda"):
    """[(name, fn)] at DeepSeek-V4-Flash shapes (D 4096, I 2048, 256 experts, top-6, FP4 experts):
    experts with FP8 activations (official) and bf16 activations
    (plain) for T = 1 .. 8192, plus the register-decode FP4 variant (FP4_SCALED_DOT off) at a few T. Each
    returns the error vs the reference, the median Triton time, bytes / FLOPs and roofline fractions."""
    cases = []
    for T in GPU_TOKENS:
        cases.append((f"moe_experts fp4 T={T} fp8-act", experts_case(T, True, device=device)))
        cases.append((f"moe_experts fp4 T={T} bf16-act", experts_case(T, False, device=device)))
    for T in (1, 64, 1024, 8192):
        cases.append((f"moe_experts fp4 T={T} bf16-act register-decode", experts_case(T, False, device=device,
                                                                                    scaled_dot=False)))
        cases.append((f"moe_experts fp4 T={T} fp8-act register-decode", experts_case(T, True, device=device,
                                                                                   scaled_dot=False)))
    return cases
