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
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsv4.kernels.triton import attention as A

POINTERS = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "wb_ptr": "*u8", "ws_ptr": "*u8", "wr_ptr": "*bf16", "pb_ptr": "*u8",
            "ps_ptr": "*u8", "pr_ptr": "*bf16", "bt_ptr": "*i32", "idx_ptr": "*i64", "sink_ptr": "*fp32",
            "pos_ptr": "*i64", "tseq_ptr": "*i32", "slots_ptr": "*i64", "qstart_ptr": "*i32", "sstart_ptr": "*i32",
            "out_ptr": "*bf16", "wsm_ptr": "*fp32", "wsa_ptr": "*fp32"}
# multiples of 16 at Flash shapes (64 heads x 512 = 448 FP8 + 64 rope, window 128, 64 CSA entries per page)
DIVISIBLE = set(POINTERS) | set("s_qt s_qh s_kvt wb_s0 wb_s1 ws_s0 wr_s0 wr_s1 pb_s0 pb_s1 ps_s0 pr_s0 pr_s1 s_idx "
                                "K s_ot s_oh H D DN_W DN_P W E".split())


def report(mode: int = 1, block_h: int = 32, block_n: int = 32, num_warps: int = 8, num_stages: int = 1,
           split: bool = False, hw_ocp: bool = True, prefetch: bool = False) -> dict:
    fn = A._sparse_attn_kernel
    const = dict(MODE=mode, W_FP8=True, W_FNUZ=False, P_FP8=True, P_FNUZ=False, SPLIT=split, DOT_F32=False,
                 PREC=None, HW_OCP=hw_ocp, PREFETCH=prefetch, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=512)
    sig = {n: "constexpr" if n in const else POINTERS.get(n, "fp32" if n == "qk_scale" else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in DIVISIBLE}
    k = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(k.asm["ptx"])
        err = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "shared_bytes": k.metadata.shared, "wgmma": "wgmma.mma_async" in k.asm["ptx"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", help="comma-separated key=value launch settings, e.g. block_h=16,num_warps=4 "
                                               "(keys: mode, block_h, block_n, num_warps, num_stages, split, prefetch)")
    for c in ap.parse_args().configs:
        kw = {k: int(v) for k, v in (x.split("=") for x in c.split(",") if x)}
        print(c, report(**kw), flush=True)


if __name__ == "__main__":
    main()
