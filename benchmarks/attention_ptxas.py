"""Registers and spills of the sparse-attention kernel per launch configuration, without a GPU: compiles
`_sparse_attn_kernel` (dsv4/kernels/triton/attention.py) for sm_90a with Triton's bundled ptxas and prints what
ptxas reports (registers per thread, spill bytes) and the shared memory Triton asks for. Integer arguments that
are multiples of 16 at Flash shapes (strides, H, D, W, E, ...) are marked divisible as Triton's launcher
specialises them on the GPU, so the loads vectorise as they will there.

    PYTHONPATH=. python3 benchmarks/attention_ptxas.py "block_h=32" "block_h=16" "block_h=16,num_stages=2"
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_sass import compile_sm90  # noqa: E402
from kernel_sass import report as sass_report  # noqa: E402

from dsv4.kernels.triton import attention as A  # noqa: E402

POINTERS = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "wb_ptr": "*u8", "ws_ptr": "*u8", "wr_ptr": "*bf16", "pb_ptr": "*u8",
            "ps_ptr": "*u8", "pr_ptr": "*bf16", "bt_ptr": "*i32", "idx_ptr": "*i64", "sink_ptr": "*fp32",
            "pos_ptr": "*i64", "tseq_ptr": "*i32", "slots_ptr": "*i64", "qstart_ptr": "*i32", "sstart_ptr": "*i32",
            "out_ptr": "*bf16", "wsm_ptr": "*fp32", "wsa_ptr": "*fp32", "freq_ptr": "*fp32",
            "cnt_ptr": "*i32"}
# multiples of 16 at Flash shapes (64 heads x 512 = 448 FP8 + 64 rope, window 128, 64 CSA entries per page)
DIVISIBLE = set(POINTERS) | set("s_qt s_qh s_kvt wb_s0 wb_s1 ws_s0 wr_s0 wr_s1 pb_s0 pb_s1 ps_s0 pr_s0 pr_s1 s_idx "
                                "K s_ot s_oh H D DN_W DN_P W E".split())


def compile_kernel(mode: int = 1, block_h: int = 32, block_n: int = 32, num_warps: int = 8, num_stages: int = 1,
                   split: bool = False, hw_ocp: bool = True, prefetch: bool = False, rope: bool = False,
                   last_combine: bool = False):
    """`_sparse_attn_kernel` compiled for sm_90a at one launch configuration (FP8 OCP stores, Flash widths)."""
    const = dict(MODE=mode, W_FP8=True, W_FNUZ=False, P_FP8=True, P_FNUZ=False, SPLIT=bool(split), DOT_F32=False,
                 PREC=None, HW_OCP=bool(hw_ocp), PREFETCH=bool(prefetch), BLOCK_H=block_h, BLOCK_N=block_n,
                 BLOCK_D=512, ROPE=bool(rope), RNE_BITS=False,
                 LAST_COMBINE=bool(last_combine and split))
    return compile_sm90(A._sparse_attn_kernel, POINTERS, const, divisible=DIVISIBLE - set(POINTERS),
                        num_warps=num_warps, num_stages=num_stages, floats=("qk_scale",))


def report(**kw) -> dict:
    r = sass_report(compile_kernel(**kw))
    return {"registers": r["registers"], "spill_store_bytes": r["spill_store_bytes"],
            "spill_load_bytes": r["spill_load_bytes"], "shared_bytes": r["shared_bytes"],
            "wgmma": any(m.startswith("wgmma") for m in r["mma"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", help="comma-separated key=value launch settings, e.g. block_h=16,num_warps=4 "
                                               "(keys: mode, block_h, block_n, num_warps, num_stages, split, "
                                               "prefetch, rope, last_combine)")
    for c in ap.parse_args().configs:
        kw = {k: int(v) for k, v in (x.split("=") for x in c.split(",") if x)}
        print(c, report(**kw), flush=True)


if __name__ == "__main__":
    main()
