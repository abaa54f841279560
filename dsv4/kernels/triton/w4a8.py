"""W4A8 building blocks in Triton (issue 15, the portable path): MXFP4 weights kept as FP4 in memory and turned
into exact FP8 e4m3 operands inside the kernel, times FP8 activations, with fp32 accumulation per 128-block.

Numerics (dsv4/numerics/w4a8.py): per weight row and 128-element K block, the four E8M0 sub-block scales s_j
become offsets k_j = s_j - base (int8, precomputed at load by `fp4_block_offsets`) and one block scale byte
`base`; every e2m1(code) * 2^k is then a normal e4m3 value (the window, checked at load).

The conversion (`w4a8_weight_bytes`, the weight tile [BN, 128] of one K block in column order):
- NVIDIA (compiled): `_fp4x8_to_e4m3`, PTX on 8 codes per 32-bit word: the byte of code c at offset k is
  table[c & 7] + ((k - KMIN) << 3) for c & 7 != 0, the same table in both dialects; magnitudes by `prmt` from
  the table in two registers, the sign by a `prmt` in sign-replicate mode. 19 instructions per 8 codes.
- Elsewhere (interpreter, AMD): `fp4_to_fp8_bits`, the same bytes by integer arithmetic per code (about 4x
  slower on an H100; no `v_perm_b32` version yet). The two agree bit for bit (GPU test), -0 aside (PTX: +0).

`w4a8_linear` is the dense GEMM out = (x_q * x_scale) (w * w_scale)^T over one weight [N, K]. Per 128-block:
one FP8 x FP8 dot with fp32 accumulation on the tensor cores (on NVIDIA sm_89+ for OCP bytes; elsewhere, and
in the interpreter, both operands decoded to fp32 and dotted in IEEE fp32), scaled by the activations' (row,
block) scale and the weight's (row, block) scale. The MoE kernels (moe_w4a8.py) share its weight-tile dot; it
is not registered as a provider of any op (tests only).

Work decomposition: grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); program (i, j) loops over the K/128 blocks:
loads x bytes [BLOCK_M, 128], the packed weight bytes [BLOCK_N, 64] and their four offsets, converts both
nibbles to e4m3 bytes joined back into column order, and adds one dot(x, w^T) times the two scales to the fp32
accumulator. Each weight byte is read once per M block. With BLOCK_M < 64 Triton converts the e4m3 operands to
f16 (exact) for mma.sync: the same result, not the FP8 rate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv4.kernels.triton.common import fp8_decode, fp8_e4m3_native, fp8_pow2, interpreting
from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.numerics.w4a8 import fp4_block_offsets, fp8_window

log = logging.getLogger(__name__)
W4A8_BLOCK = 128


@dataclass(frozen=True)
class W4A8Experts:
    """MXFP4 experts prepared for the W4A8 kernels: the checkpoint's packed codes (not copied), the int8 offsets
    [E, N, K/32] and E8M0 block scales [E, N, K/128], and which experts fit the window everywhere (the others are
    served by the W4A16 path, exact for every scale)."""
    packed: torch.Tensor
    offsets: torch.Tensor
    block_scale: torch.Tensor
    expert_fits: torch.Tensor  # bool [E]
    bad_blocks: int


def prepare_w4a8(packed: torch.Tensor, scale: torch.Tensor, dialect=Fp8Dialect.OCP,
                 name: str = "experts") -> W4A8Experts:
    """Load-time pass over one expert weight ([E, N, K/2] codes, [E, N, K/32] scales): offsets and block scales,
    and a warning naming the tensor, the count of 128-blocks outside the exact window and the experts they
    belong to. Nothing is approximated: those experts keep the W4A16 path."""
    off, base, fits = fp4_block_offsets(scale, dialect, packed=packed)
    expert_fits = fits.flatten(1).all(dim=1)
    bad = int((~fits).sum())
    if bad:
        kmin, kmax = fp8_window(dialect)
        worst = (~expert_fits).nonzero().flatten().tolist()
        log.warning("W4A8: %s: %d of %d 128-blocks have 32-block scales spanning more than %d binades (experts %s%s); "
                    "those experts are served by the W4A16 path (exact)", name, bad, fits.numel(), kmax - kmin,
                    worst[:8], " ..." if len(worst) > 8 else "")
    return W4A8Experts(packed, off, base, expert_fits, bad)


@triton.jit
def fp4_to_fp8_bits(code, k, FNUZ: tl.constexpr):
    """E2M1 codes (int32, 0..15) and exponent offsets k (int32, broadcastable, inside the window) -> the e4m3
    bytes (int32, 0..255) of e2m1(code) * 2^k. |e2m1| = (1 + m / 2) * 2^u with u = (c >> 1) - 1 and m the low
    bit (c >= 2), 0.5 = 1.0 * 2^-1 (c = 1); the e4m3 exponent field is E = u + k + bias (7 OCP, 8 FNUZ):
    normal E >= 1 -> E << 3 | m << 2; else subnormal mantissa (2 + m) * 2^(E + 1), exact for E >= -2 (m = 0)
    / -1 (m = 1). Zero keeps its sign in OCP (0x80, as fp8_encode), is 0x00 in FNUZ (0x80 is its NaN)."""
    mc = code & 7
    m = tl.where(mc >= 2, mc & 1, 0)
    u = (mc >> 1) - 1
    E = u + k + (8 if FNUZ else 7)
    sub = ((2 + m) << tl.maximum(E + 2, 0)) >> 1
    mag = tl.where(E >= 1, (E << 3) | (m << 2), sub)
    mag = tl.where(mc == 0, 0, mag)
    neg = (code & 8) != 0
    if FNUZ:
        neg = neg & (mc != 0)
    return tl.where(neg, mag | 0x80, mag)


@triton.jit
def _fp4_to_fp8_kernel(c_ptr, k_ptr, out_ptr, n, FNUZ: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise fp4_to_fp8_bits (tests of the mapping, every code x every offset)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = i < n
    c = tl.load(c_ptr + i, mask=msk, other=0).to(tl.int32)
    k = tl.load(k_ptr + i, mask=msk, other=0).to(tl.int32)
    tl.store(out_ptr + i, fp4_to_fp8_bits(c, k, FNUZ).to(tl.uint8), mask=msk)


def fp4_to_fp8_bytes(codes: torch.Tensor, offsets: torch.Tensor, dialect=Fp8Dialect.OCP) -> torch.Tensor:
    """uint8 e4m3 bytes of e2m1(codes) * 2^offsets, elementwise (same shapes)."""
    c = codes.to(torch.uint8).contiguous().view(-1)
    k = offsets.to(torch.int32).contiguous().view(-1)
    out = torch.empty_like(c)
    if c.numel():
        _fp4_to_fp8_kernel[(triton.cdiv(c.numel(), 1024),)](c, k, out, c.numel(),
                                                           FNUZ=Fp8Dialect.parse(dialect) is Fp8Dialect.FNUZ,
                                                           BLOCK=1024)
    return out.view(codes.shape)


def _fp4x8_asm() -> str:
    """PTX of `_fp4x8_to_e4m3`: 8 E2M1 codes (one 32-bit word, low nibble first) -> the e4m3 bytes of the even
    codes ($0) and of the odd codes ($1), four per register, with the window offset kx = (k - KMIN) << 3 in
    every byte of $3. The magnitudes come from an 8-byte table in two registers (prmt: byte c & 7 of
    {thi, tlo}); the table is the one at KMIN (code 1 -> exponent field 1, code c >= 2 -> field (c >> 1) + 1,
    mantissa bit c & 1, code 0 -> 0x00) plus kx on the nonzero codes. The sign comes from a second prmt in
    sign-replicate mode (selector bit 3 = the code's sign) over a table whose bytes are 0x80 except code 0's:
    byte 0xFF for a negative nonzero code, 0x80 / 0x00 otherwise; shifted left by one its bit 7 is the sign
    (-0 gives +0, so FNUZ never sees 0x80). The 4 selector nibbles (codes 0, 2, 4, 6 or 1, 3, 5, 7) are
    gathered from the word by a shift, a lop3 select and a byte prmt. 19 instructions per 8 codes."""
    lines = [".reg .b32 tlo, thi, s4, s8, t, sel, ms, m, g, sa, sb, msk, sg;",
             "mov.b32 msk, 0x0F0F0F0F;", "mov.b32 sa, 0x80808000;", "mov.b32 sb, 0x80808080;",
             "and.b32 tlo, $3, 0xFFFFFF00;", "add.u32 tlo, tlo, 0x14100800;", "add.u32 thi, $3, 0x24201C18;",
             "shr.b32 s4, $2, 4;", "shr.b32 s8, $2, 8;"]
    for out, (a, b) in enumerate([("$2", "s4"), ("s4", "s8")]):
        lines += [f"lop3.b32 t, {a}, {b}, msk, 0xE4;",  # (a & msk) | (b & ~msk): bytes c2c0 . c6c4 .
                  "prmt.b32 sel, t, 0, 0x20;",  # low 16 bits: nibbles c0 c2 c4 c6
                  "and.b32 ms, sel, 0x7777;", "prmt.b32 m, tlo, thi, ms;",
                  "prmt.b32 g, sa, sb, sel;", "shl.b32 g, g, 1;",
                  f"lop3.b32 ${out}, m, g, sb, 0xF8;"]  # m | (g & 0x80808080)
    return "{\n" + "\n".join(lines) + "\n}"


_FP4X8_ASM = tl.constexpr(_fp4x8_asm())


@triton.jit
def _fp4x8_to_e4m3(wp, kx):
    """Packed FP4 bytes wp (uint8, byte j = columns 2j, 2j + 1) and kx = ((k - KMIN) << 3) * 0x01010101 per byte
    (int32) -> (even, odd): uint8 e4m3 bytes of columns 2j and 2j + 1 (NVIDIA PTX; `fp4_to_fp8_bits` is the
    same mapping in Triton arithmetic, inside the normal window)."""
    return tl.inline_asm_elementwise(asm=_FP4X8_ASM, constraints="=r,=r,r,r,r,r,r", args=[wp, kx],
                                     dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)


@triton.jit
def w4a8_weight_bytes(w_ptr, o_ptr, n, n_ok, kb, s_wn, s_on, FNUZ: tl.constexpr, ASM: tl.constexpr,
                      BN: tl.constexpr):
    """The e4m3 bytes [BN, 128] (uint8, K order) of weight rows n in K block kb: the packed FP4 bytes [BN, 64]
    (low nibble = even column) with the rows' four sub-block offsets (int8 k, inside the window)."""
    n64 = n.to(tl.int64)
    c = tl.arange(0, 64)
    wp = tl.load(w_ptr + n64[:, None] * s_wn + kb * 64 + c[None, :], mask=n_ok[:, None], other=0)
    ko = tl.load(o_ptr + n64[:, None] * s_on + kb * 4 + tl.arange(0, 4)[None, :], mask=n_ok[:, None], other=0)
    ko = ko.to(tl.int32)[:, :, None]  # columns 2c, 2c + 1 lie in sub-block c // 16
    if ASM:
        kx = ((ko - (-6 if FNUZ else -5)) << 3) * 0x01010101
        lo, hi = _fp4x8_to_e4m3(wp, tl.reshape(tl.broadcast_to(kx, (BN, 4, 16)), (BN, 64)))
    else:
        wq = wp.to(tl.int32)
        lo = tl.reshape(fp4_to_fp8_bits(tl.reshape(wq & 15, (BN, 4, 16)), ko, FNUZ), (BN, 64)).to(tl.uint8)
        hi = tl.reshape(fp4_to_fp8_bits(tl.reshape(wq >> 4, (BN, 4, 16)), ko, FNUZ), (BN, 64)).to(tl.uint8)
    return tl.reshape(tl.join(lo, hi), (BN, 128))


@triton.jit
def _w4a8_bytes_kernel(w_ptr, o_ptr, out_ptr, N, s_wn, s_on, s_out, FNUZ: tl.constexpr, ASM: tl.constexpr,
                       BN: tl.constexpr):
    """w4a8_weight_bytes of every (row tile, K block) to memory (tests of the conversion paths)."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    kb = tl.program_id(1)
    b = w4a8_weight_bytes(w_ptr, o_ptr, n, n < N, kb, s_wn, s_on, FNUZ, ASM, BN)
    tl.store(out_ptr + n.to(tl.int64)[:, None] * s_out + kb * 128 + tl.arange(0, 128)[None, :], b,
             mask=(n < N)[:, None])


def w4a8_weight_to_fp8(packed: torch.Tensor, offsets: torch.Tensor, dialect=Fp8Dialect.OCP,
                       use_asm: bool | None = None) -> torch.Tensor:
    """uint8 e4m3 bytes [N, K] of an MXFP4 weight (packed [N, K/2], offsets int8 [N, K/32] inside the window),
    by the kernels' own conversion: the PTX one (`use_asm`, NVIDIA only) or the Triton arithmetic."""
    N, K2 = packed.shape
    fnuz = Fp8Dialect.parse(dialect) is Fp8Dialect.FNUZ
    out = torch.empty((N, 2 * K2), dtype=torch.uint8, device=packed.device)
    asm = fp4_asm_supported(packed.device) if use_asm is None else use_asm
    w, o = packed.view(torch.uint8).contiguous(), offsets.view(torch.int8).contiguous()
    if N:
        _w4a8_bytes_kernel[(triton.cdiv(N, 16), K2 // 64)](w, o, out, N, w.stride(0), o.stride(0), out.stride(0),
                                                           FNUZ=fnuz, ASM=asm, BN=16)
    return out


def fp4_asm_supported(device: torch.device) -> bool:
    """The PTX conversion runs on NVIDIA GPUs (compiled, not interpreted)."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting(device)


@triton.jit
def w4a8_weight_tile(w_ptr, o_ptr, n, n_ok, kb, s_wn, s_on, FNUZ: tl.constexpr, F32_DOT: tl.constexpr,
                     ASM: tl.constexpr, BN: tl.constexpr):
    """w4a8_weight_bytes as a dot operand: e4m3 [BN, 128] (fp32 values when F32_DOT)."""
    return fp8_operand(w4a8_weight_bytes(w_ptr, o_ptr, n, n_ok, kb, s_wn, s_on, FNUZ, ASM, BN), FNUZ, F32_DOT)


@triton.jit
def fp8_operand(b, FNUZ: tl.constexpr, F32_DOT: tl.constexpr):
    """e4m3 bytes (uint8) as a dot operand: the FP8 type, or their fp32 values when F32_DOT."""
    if F32_DOT:
        return fp8_decode(b, FNUZ)
    elif FNUZ:
        return b.to(tl.float8e4b8, bitcast=True)
    else:
        return b.to(tl.float8e4nv, bitcast=True)


@triton.jit
def fp8_act_block(q_ptr, s_ptr, rows64, ok, kb, s_q, s_s, FNUZ: tl.constexpr, F32_DOT: tl.constexpr):
    """K block kb of FP8 activation rows (act_quant bytes [BM, 128] and their E8M0 scales): the dot operand and
    the rows' exponents. Rows not `ok` read as zeros with scale 1."""
    kk = tl.arange(0, 128)
    b = tl.load(q_ptr + rows64[:, None] * s_q + kb * 128 + kk[None, :], mask=ok[:, None], other=0)
    ea = tl.load(s_ptr + rows64 * s_s + kb, mask=ok, other=127).to(tl.int32) - 127
    return fp8_operand(b, FNUZ, F32_DOT), ea


@triton.jit
def w4a8_weight_dot(acc, a, ea, w_ptr, o_ptr, b_ptr, n, n_ok, kb, s_wn, s_on, s_bn,
                    FNUZ: tl.constexpr, F32_DOT: tl.constexpr, ASM: tl.constexpr, BN: tl.constexpr):
    """acc += (a . W^T) * 2^ea[:, None] * 2^(base - 127)[None, :] for weight rows n, K block kb: a is the
    activations' block [BM, 128] as an e4m3 operand (fp32 values when F32_DOT) with row exponents ea; W the
    rows' e4m3 tile (w4a8_weight_tile) with block scale bytes base. One dot per 128-block, promoted to the fp32
    accumulator with both scales (the FP8 MMA's own accumulation spans one block only). The dense W4A8 GEMM
    below and the grouped MoE kernels (moe_w4a8.py) share it."""
    w = w4a8_weight_tile(w_ptr, o_ptr, n, n_ok, kb, s_wn, s_on, FNUZ, F32_DOT, ASM, BN)
    if F32_DOT:
        part = tl.dot(a, tl.trans(w), input_precision="ieee")
    else:
        part = tl.dot(a, tl.trans(w))
    base = tl.load(b_ptr + n.to(tl.int64) * s_bn + kb, mask=n_ok, other=127).to(tl.int32)
    return acc + part * fp8_pow2(ea)[:, None] * tl.exp2((base - 127).to(tl.float32))[None, :]


@triton.jit
def _w4a8_gemm_kernel(x_ptr, xs_ptr, w_ptr, wk_ptr, wb_ptr, out_ptr, M, N, NKB,
                      s_xm, s_xsm, s_wn, s_wkn, s_wbn, s_om,
                      FNUZ: tl.constexpr, F32_DOT: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    nm = rn < N
    rm64 = rm.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, NKB):
        a, ea = fp8_act_block(x_ptr, xs_ptr, rm64, mm, kb, s_xm, s_xsm, FNUZ, F32_DOT)
        acc = w4a8_weight_dot(acc, a, ea, w_ptr, wk_ptr, wb_ptr, rn, nm, kb, s_wn,
                              s_wkn, s_wbn, FNUZ, F32_DOT, ASM, BLOCK_N)
    tl.store(out_ptr + rm64[:, None] * s_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mm[:, None] & nm[None, :])


def w4a8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_packed: torch.Tensor, w_offsets: torch.Tensor,
                w_block_scale: torch.Tensor, dialect=Fp8Dialect.OCP, out_dtype: torch.dtype = torch.float32,
                block_m: int = 64, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """out [M, N] = sum over 128-blocks b of (x_q[:, b] . w[:, b]) * 2^(x_scale[:, b] - 127) * 2^(base[:, b] - 127).
    x_q: e4m3 bytes uint8 [M, K] and x_scale E8M0 uint8 [M, K/128] (fp8_act_quant); w_packed uint8 [N, K/2],
    w_offsets int8 [N, K/32] and w_block_scale uint8 [N, K/128] (numerics.w4a8.fp4_block_offsets, every block
    fitting). K a multiple of 128."""
    M, K = x_q.shape
    N = w_packed.shape[0]
    if K % W4A8_BLOCK or tuple(w_packed.shape) != (N, K // 2):
        raise ValueError(f"w4a8_linear: x [M, K] = {tuple(x_q.shape)} needs K % 128 == 0 and w_packed [N, K/2], "
                         f"got {tuple(w_packed.shape)}")
    if tuple(w_offsets.shape) != (N, K // 32) or tuple(w_block_scale.shape) != (N, K // 128):
        raise ValueError(f"w4a8_linear: offsets {tuple(w_offsets.shape)} / block scales {tuple(w_block_scale.shape)}"
                         f" must be [N, K/32] / [N, K/128] = {(N, K // 32)} / {(N, K // 128)}")
    if tuple(x_scale.shape) != (M, K // 128):
        raise ValueError(f"w4a8_linear: x_scale {tuple(x_scale.shape)} must be [M, K/128] = {(M, K // 128)}")
    fnuz = Fp8Dialect.parse(dialect) is Fp8Dialect.FNUZ
    args = [t.contiguous() for t in (x_q.view(torch.uint8), x_scale.view(torch.uint8), w_packed.view(torch.uint8),
                                     w_offsets.view(torch.int8), w_block_scale.view(torch.uint8))]
    out = torch.empty((M, N), dtype=out_dtype, device=x_q.device)
    if M == 0 or N == 0:
        return out
    x, xs, w, wk, wb = args
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _w4a8_gemm_kernel[grid](x, xs, w, wk, wb, out, M, N, K // W4A8_BLOCK,
                            x.stride(0), xs.stride(0), w.stride(0), wk.stride(0), wb.stride(0), out.stride(0),
                            FNUZ=fnuz, F32_DOT=not fp8_e4m3_native(x_q.device, fnuz),
                            ASM=fp4_asm_supported(x_q.device), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out
