"""What a Triton kernel compiles to on Hopper, without a GPU: registers, spills, shared memory, the MMA
instructions, and the SASS of each loop (instructions per iteration and the most frequent opcodes).

Triton's wheel bundles ptxas and nvdisasm, so any kernel compiles here for sm_90a exactly as the launcher would
compile it on an H100 / H200 (integer arguments that are multiples of 16 marked divisible, as the launcher
specialises them, so loads vectorise as they will there). The loop table is what to read first when a kernel is
slow: instructions per K step divided by the elements each thread handles per step is the per-element cost
(the W4A8 MoE down kernel went from 32 to ~6 SASS per weight element this way, docs/perf.md 2026-12-06).

    PYTHONPATH=. python3 benchmarks/kernel_sass.py moe_w4a8 bm=64,bn=128,warps=4,stages=3,asm=1 asm=0
    PYTHONPATH=. python3 benchmarks/kernel_sass.py attention block_h=16,num_warps=4 --dump /tmp/attn.sass

Kernels: moe_w4a8 (gate-up and down; keys bm, bn, warps, stages, asm, fnuz), attention (the sparse-attention
kernel; keys as benchmarks/attention_ptxas.py's report()) and decode_glue (the decode step's fused small kernels:
GEMM with last-program split-K, hc finish + norm + act_quant, norm / SwiGLU + act_quant, one-program dispatch).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(fn, pointers: dict, constexprs: dict, divisible=(), num_warps: int = 4, num_stages: int = 3,
                 floats=()):
    """Compile `fn` for sm_90a. pointers: argument -> Triton pointer type ('*u8', '*bf16', ...); other
    arguments are i32 (fp32 if named in `floats`); `divisible`: integer arguments marked multiples of 16
    (pointers always are)."""
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
           for n in fn.arg_names}
    div = set(pointers) | set(divisible)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in div}
    return triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_and_sass(k) -> tuple[str, str]:
    """(ptxas -v report, nvdisasm listing) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(k.asm["ptx"])
        err = subprocess.run([f"{BIN}/ptxas", "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                             capture_output=True, text=True).stderr
        dis = subprocess.run([f"{BIN}/nvdisasm", "-c", f"{d}/k.cubin"], capture_output=True, text=True).stdout
    return err, dis


def _opcode(instr: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instr).split(" ")[0].split(".")[0]


def loops(sass: str) -> list[dict]:
    """Every backward branch of the listing: its body's size and most frequent opcodes."""
    labels, seq = {}, []
    for ln in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", ln)
        if m:
            labels[m.group(1)] = len(seq)
            continue
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", ln)
        if m:
            seq.append(m.group(1))
    out = []
    for i, t in enumerate(seq):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", t)
        if m and labels.get(m.group(1), i + 1) < i:
            body = seq[labels[m.group(1)]:i + 1]
            out.append({"instructions": len(body),
                        "top": collections.Counter(_opcode(x) for x in body).most_common(10)})
    return out


def report(k) -> dict:
    err, dis = ptxas_and_sass(k)
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    mma = sorted(set(re.findall(r"(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", k.asm["ptx"])))
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None,
            "spill_load_bytes": int(spill.group(2)) if spill else None,
            "shared_bytes": k.metadata.shared, "mma": mma,
            "sass_instructions": sum(1 for ln in dis.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/\s+\S", ln)),
            "loops": loops(dis), "sass": dis}


def moe_w4a8(bm: int = 64, bn: int = 128, warps: int = 4, stages: int = 3, asm: int = 1, fnuz: int = 0) -> dict:
    """Reports of the W4A8 MoE gate-up (BN 128, its h-quant block) and down kernels at one launch setting."""
    import triton.language as tl

    from dsv4.kernels.triton import moe_w4a8 as M

    const = dict(FNUZ=bool(fnuz), F32_DOT=False, ASM=bool(asm), OUT_DT=tl.bfloat16, OUT_RNE=False, BM=bm, BN=bn)
    common = {"w_ptr": "*u8", "o_ptr": "*i8", "b_ptr": "*u8", "slots_ptr": "*i32", "bexp_ptr": "*i32"}
    div = [n for n in M._w4a8_gate_up_kernel.arg_names + M._w4a8_down_kernel.arg_names
           if n.startswith("s_") or n in ("I", "D")]  # strides and the Flash widths: multiples of 16
    gu = compile_sm90(M._w4a8_gate_up_kernel, {**common, "xq_ptr": "*u8", "xs_ptr": "*u8", "rw_ptr": "*fp32",
                                               "hq_ptr": "*u8", "hs_ptr": "*u8"},
                      {**const, "BN": 128}, divisible=div, num_warps=warps, num_stages=stages, floats=("limit",))
    dn = compile_sm90(M._w4a8_down_kernel, {**common, "hq_ptr": "*u8", "hs_ptr": "*u8", "y_ptr": "*bf16"}, const,
                      divisible=div, num_warps=warps, num_stages=stages)
    return {"gate_up": report(gu), "down": report(dn)}


def attention(**kw) -> dict:
    """Report of the sparse-attention kernel (launch keys of benchmarks/attention_ptxas.py)."""
    from attention_ptxas import compile_kernel

    return {"sparse_attn": report(compile_kernel(**kw))}


def decode_glue(warps: int = 4, fnuz: int = 0) -> dict:
    """Reports of the decode step's fused small kernels at Flash widths: the decode-regime FP8 GEMM with the
    last-program split-K reduction, the split-KV attention combine with the inverse RoPE, hc_pre's finish with the
    norm and act_quant (alone, and run by the last program of the mixing GEMM that applies the previous hc_post),
    the q norm and the shared expert's SwiGLU with their act_quant, the q and kv rows' norm + RoPE in one launch,
    the router's logits with the select in their last program, the indexer's row top-k and its queries' RoPE +
    Hadamard + FP4, the one-program MoE dispatch (`warps` applies to the GEMM)."""
    import triton.language as tl

    from dsv4.kernels.triton import attention as A
    from dsv4.kernels.triton import gemm as G
    from dsv4.kernels.triton import hyper_connection as H
    from dsv4.kernels.triton import indexer as IX
    from dsv4.kernels.triton import moe as M
    from dsv4.kernels.triton import moe_dispatch as MD
    from dsv4.kernels.triton import norm as NM
    from dsv4.kernels.triton import quant as Q
    from dsv4.kernels.triton import rope as RP
    from dsv4.kernels.triton import router as R

    q = dict(FNUZ=bool(fnuz), PDL=True)
    gemm = compile_sm90(G._gemm_kernel, {"a_ptr": "*u8", "sa_ptr": "*u8", "w_ptr": "*u8", "sw_ptr": "*u8",
                                         "c_ptr": "*fp32", "out_ptr": "*bf16", "cnt_ptr": "*i32"},
                        dict(A_FP8=True, A_FNUZ=False, W_FMT=1, W_FNUZ=False, HW=1, DOT_DT=tl.bfloat16, IEEE=False,
                             BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, EVEN_K=True, PREFETCH=True,
                             LAST_REDUCE=True, PDL=True),
                        divisible=("R", "K", "s_am", "s_sam", "s_wn", "s_swn", "s_cm", "s_cs"), num_warps=warps,
                        num_stages=4)
    fin = compile_sm90(H._hc_finish_kernel, {"x_ptr": "*bf16", "part_ptr": "*fp32", "sq_ptr": "*fp32",
                                             "scale_ptr": "*fp32", "base_ptr": "*fp32", "u_ptr": "*bf16",
                                             "post_ptr": "*fp32", "comb_ptr": "*fp32", "nw_ptr": "*fp32",
                                             "q_ptr": "*u8", "qs_ptr": "*u8"},
                       dict(N=4, NP=4, NC=32, SPLIT_P=32, HEAD=False, BD=4096, RNE_BITS=False, NORM=True, QUANT=True,
                            **q), divisible=("D", "K", "sx_t", "sx_j", "su_t"), floats=("rms_eps", "hc_eps",
                                                                                         "norm_eps"), num_warps=4)
    mixfin = compile_sm90(H._hc_mix_finish_kernel, {"x_ptr": "*bf16", "fn_ptr": "*fp32", "part_ptr": "*fp32",
                                                    "sq_ptr": "*fp32", "cnt_ptr": "*i32", "scale_ptr": "*fp32",
                                                    "base_ptr": "*fp32", "u_ptr": "*bf16", "post_ptr": "*fp32",
                                                    "comb_ptr": "*fp32", "nw_ptr": "*fp32", "q_ptr": "*u8",
                                                    "qs_ptr": "*u8", "f_ptr": "*bf16", "xo_ptr": "*bf16",
                                                    "pp_ptr": "*fp32", "pc_ptr": "*fp32"},
                          dict(BLOCK_T=16, BK=64, SPLIT_BF16=True, N=4, NP=4, NC=32, SPLIT_P=32, HEAD=False, BD=4096,
                               RNE_BITS=False, NORM=True, QUANT=True, POST=True, **q),
                          divisible=("K", "k_split", "sfn", "D", "sx_t", "sx_j", "su_t", "sf_t"),
                          floats=("rms_eps", "hc_eps", "norm_eps"), num_warps=4)
    route = compile_sm90(R._router_logits_select_kernel, {"x_ptr": "*bf16", "w_ptr": "*fp32", "p_ptr": "*fp32",
                                                         "cnt_ptr": "*i32", "bias_ptr": "*fp32", "tid_ptr": "*i64",
                                                         "inid_ptr": "*i64", "w_out": "*fp32", "i_out": "*i64"},
                         dict(BT=16, BE=64, BK=64, KTOP=6, KP=8, SCORE=0, HAS_BIAS=True, HASH=False, NORM=True, EP=256,
                              SB=16, PDL=True), divisible=("E", "D", "s_x", "s_w", "s_ps"), floats=("scaling",),
                         num_warps=4, num_stages=3)
    topk = compile_sm90(IX._row_topk_kernel, {"s_ptr": "*fp32", "vis_ptr": "*i64", "out_ptr": "*i64"},
                        dict(BLOCK=1024, BLOCK_K=512), divisible=("s_rs", "s_or", "n_max", "topk"), num_warps=4)
    hfp4 = compile_sm90(Q._hadamard_fp4_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "pos_ptr": "*i64",
                                                 "freq_ptr": "*fp32"},
                        dict(N=128, LOG_N=7, G=16, RNE_BITS=False, AMAX_FLOOR=6 * 2.0**-126, ROPE=True),
                        divisible=("R", "sx", "ROWS_PER_TOKEN"), floats=("scale",), num_warps=4)
    qkv = compile_sm90(RP._norm_rope_qkv_kernel, {"q_ptr": "*bf16", "qy_ptr": "*bf16", "kv_ptr": "*bf16",
                                                  "w_ptr": "*bf16", "kvy_ptr": "*bf16", "pos_ptr": "*i64",
                                                  "freq_ptr": "*fp32"},
                       dict(FP8=True, FNUZ=bool(fnuz), BLOCK_HQ=8, BLOCK_DQ=512, BLOCK_DK=512, RNE_BITS=False,
                            PDL=True), divisible=("DQ", "sq_t", "sq_h", "sqy_t", "sqy_h", "DK", "skv_t", "skvy_t"),
                       floats=("q_eps", "kv_eps"), num_warps=8)
    norm = compile_sm90(NM._rms_norm_tile_kernel, {"x_ptr": "*bf16", "w_ptr": "*fp32", "y_ptr": "*bf16",
                                                   "q_ptr": "*u8", "qs_ptr": "*u8"},
                        dict(HAS_W=True, ROWS=2, BLOCK_N=2048, RNE_BITS=False, QUANT=True, **q),
                        divisible=("N", "stride_x", "stride_y"), floats=("eps",), num_warps=8)
    swi = compile_sm90(M._swiglu_kernel, {"gu_ptr": "*bf16", "h_ptr": "*bf16", "q_ptr": "*u8", "qs_ptr": "*u8"},
                       dict(RNE_BITS=False, BN=1024, QUANT=True, **q), divisible=("I", "s_gu", "s_h"),
                       floats=("limit",), num_warps=4)
    disp = compile_sm90(MD._dispatch_small_kernel, {"ids_ptr": "*i64", "g2l_ptr": "*i32", "flags_ptr": "*i32",
                                                    "slots_ptr": "*i32", "bexp_ptr": "*i32"},
                        dict(NP=64, EP=256, RB=256, BB=32), num_warps=4)
    comb = compile_sm90(A._combine_kernel, {"wsm_ptr": "*fp32", "wsa_ptr": "*fp32", "sink_ptr": "*fp32",
                                            "out_ptr": "*bf16", "q_ptr": "*bf16", "freq_ptr": "*fp32",
                                            "pos_ptr": "*i64"},
                        dict(BLOCK_H=16, BLOCK_D=512, ROPE=True, RNE_BITS=False), divisible=("s_ot", "s_oh", "H", "D"),
                        num_warps=4)
    return {"gemm_last_reduce": report(gemm), "attention_combine_inv_rope": report(comb),
            "hc_finish_norm_quant": report(fin),
            "hc_mix_last_program_finish": report(mixfin), "router_last_program_select": report(route),
            "indexer_row_topk": report(topk), "indexer_q_rope_hadamard_fp4": report(hfp4),
            "norm_rope_qkv": report(qkv), "rms_norm_quant": report(norm),
            "swiglu_quant": report(swi), "dispatch_one_program": report(disp)}


KERNELS = {"moe_w4a8": moe_w4a8, "attention": attention, "decode_glue": decode_glue}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kernel", choices=sorted(KERNELS))
    ap.add_argument("configs", nargs="+", help="comma-separated key=value launch settings (integers)")
    ap.add_argument("--dump", default=None, help="write the SASS of the last configuration here")
    ap.add_argument("--json", action="store_true", help="print the reports as JSON (without the SASS)")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernel_sass: run with TRITON_INTERPRET=0 (the interpreter does not compile kernels)")
    for c in a.configs:
        kw = {k: int(v) for k, v in (x.split("=") for x in c.split(",") if x)}
        reports = KERNELS[a.kernel](**kw)
        if a.json:
            print(json.dumps({"config": c, **{n: {k: v for k, v in r.items() if k != "sass"}
                                             for n, r in reports.items()}}), flush=True)
            continue
        for name, r in reports.items():
            loop = r["loops"][-1] if r["loops"] else {"instructions": None, "top": []}
            print(f"{c} {name}: {r['registers']} registers, spills {r['spill_store_bytes']} B, shared "
                  f"{r['shared_bytes']} B, {r['sass_instructions']} SASS, last loop {loop['instructions']} per "
                  f"iteration {loop['top'][:6]}, {r['mma'][:1]}", flush=True)
            if a.dump:
                with open(a.dump, "w") as f:
                    f.write(r["sass"])


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
