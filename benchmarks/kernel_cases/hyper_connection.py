"""GPU check cases of the Triton mHC providers hc_pre / hc_post / hc_head
(dsv4/kernels/triton/hyper_connection.py) at DeepSeek-V4-Flash shapes (benchmarks/gpu_kernels_check.py)."""

from __future__ import annotations

import torch

from benchmarks.kernel_cases.common import bench_ms, roofline
from dsv4.kernels.triton.hyper_connection import hc_head_triton, hc_post_triton, hc_pre_triton
from dsv4.ops.hyper_connection import hc_head_reference, hc_post_reference, hc_pre_reference


def _err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-3) -> dict:
    g, w = got.double(), want.double()
    d = (g - w).abs()
    return {"max_abs": float(d.max()), "max_rel": float((d / w.abs().clamp_min(floor)).max())}


def _hc_inputs(T, device, n=4, D=4096, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(T, n, D, device=device, generator=g).to(torch.bfloat16)
    fn = 0.02 * torch.randn((2 + n) * n, n * D, device=device, generator=g)
    scale = 0.5 + torch.rand(3, device=device, generator=g)
    base = 0.5 * torch.randn((2 + n) * n, device=device, generator=g)
    return X, fn, scale, base


def gpu_check_cases(device="cuda"):
    """[(name, fn)]: hc_pre / hc_post / hc_head at DeepSeek-V4-Flash shapes (n = 4, D = 4096, bf16 streams,
    fp32 fn [24, 16384]), vs the references, timed (median ms). bytes: what the kernels must move at
    the floor (hc_pre: X twice, u, fn once; hc_post: f, X, X')."""
    def pre_case(T):
        def run():
            X, fn, scale, base = _hc_inputs(T, device)
            args = (X, fn, scale, base, 1e-6, 1e-6, 20)
            u, post, comb = hc_pre_triton(*args)
            wu, wpost, wcomb = hc_pre_reference(*args)
            out = {f"u_{k}": v for k, v in _err(u, wu).items()}
            out.update({f"post_{k}": v for k, v in _err(post, wpost).items()})
            out.update({f"comb_{k}": v for k, v in _err(comb, wcomb).items()})
            out["u_bf16_equal_frac"] = float((u == wu).float().mean())
            out["triton_ms"] = bench_ms(lambda: hc_pre_triton(*args), device)
            out["torch_ms"] = bench_ms(lambda: hc_pre_reference(*args), device)
            out["bytes_floor_single_read"] = X.numel() * 2 + T * 4096 * 2 + fn.numel() * 4
            out["bytes"] = 2 * X.numel() * 2 + T * 4096 * 2 + fn.numel() * 4
            out["flops"] = 2 * T * 24 * 16384
            return roofline(out)
        return run

    def post_case(T):
        def run():
            X, _, _, _ = _hc_inputs(T, device)
            g = torch.Generator(device=device).manual_seed(1)
            f = torch.randn(T, 4096, device=device, generator=g).to(torch.bfloat16)
            post = 2 * torch.rand(T, 4, device=device, generator=g)
            comb = torch.rand(T, 4, 4, device=device, generator=g)
            got = hc_post_triton(f, X, post, comb)
            want = hc_post_reference(f, X, post, comb)
            out = _err(got, want)
            out["bf16_equal_frac"] = float((got == want).float().mean())
            out["triton_ms"] = bench_ms(lambda: hc_post_triton(f, X, post, comb), device)
            out["torch_ms"] = bench_ms(lambda: hc_post_reference(f, X, post, comb), device)
            out["bytes"] = (2 * X.numel() + f.numel()) * 2 + T * 20 * 4
            out["flops"] = 2 * T * 4 * 5 * 4096
            return roofline(out)
        return run

    def head_case(T):
        def run():
            X, fn, scale, base = _hc_inputs(T, device)
            args = (X, fn[:4].contiguous(), scale[:1].contiguous(), base[:4].contiguous(), 1e-6, 1e-6)
            got = hc_head_triton(*args)
            out = _err(got, hc_head_reference(*args))
            out["triton_ms"] = bench_ms(lambda: hc_head_triton(*args), device)
            out["bytes"] = 2 * X.numel() * 2 + T * 4096 * 2 + 4 * 16384 * 4
            out["flops"] = 2 * T * 4 * 16384
            return roofline(out)
        return run

    return [("hc_pre[256,4,4096] bf16", pre_case(256)),
            ("hc_pre[8192,4,4096] bf16", pre_case(8192)),
            ("hc_pre[1,4,4096] bf16 (decode, one token)", pre_case(1)),
            ("hc_post[256,4,4096] bf16", post_case(256)),
            ("hc_post[8192,4,4096] bf16", post_case(8192)),
            ("hc_head[256,4,4096] bf16", head_case(256))]
