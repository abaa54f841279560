"""Shared Triton pieces: the capability check every Triton provider uses, and FP8 e4m3 encode /
decode by bit arithmetic in either dialect (so fnuz bytes can be produced and read on any hardware,
and in the CPU interpreter, whose float8 casts are unreliable).

Byte layout s|eeee|mmm. OCP (e4m3fn): bias 7, max 448. FNUZ (e4m3fnuz): bias 8, max 240, no -0.
value = (-1)^s * (e == 0 ? m : 8 + m) * 2^(max(e, 1) - bias - 3)
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from dsv4.platforms import Platform


def triton_supported(platform: Platform) -> str | None:
    """Triton providers run on GPUs; on the CPU only the interpreter runs them (tests)."""
    if not platform.is_gpu:
        return "needs a GPU (on the CPU the Triton interpreter runs these kernels only in tests)"
    return None


def register(op, fn, priority: int = 100) -> None:
    op.register("triton", fn, supported=triton_supported, priority=priority, interpretable=True)


def interpreting(device: torch.device | None = None) -> bool:
    """Kernels run in the Triton interpreter: TRITON_INTERPRET is set (tests), or `device` is the CPU."""
    return (device is not None and device.type == "cpu") or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int | None:
    """SMs / CUs of a CUDA (or ROCm) device; None elsewhere (each wrapper picks its interpreter stand-in)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_e4m3_native(device: torch.device, fnuz: bool) -> bool:
    """The GPU converts (and multiplies) e4m3 bytes of this dialect in hardware: OCP on NVIDIA sm_89+, FNUZ on
    ROCm (MI300). Never in the interpreter, whose float8 casts are unreliable; elsewhere kernels decode by bit
    arithmetic (fp8_decode)."""
    if device.type != "cuda" or interpreting(device):
        return False
    if torch.version.hip is not None:
        return fnuz
    return not fnuz and _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


# Programmatic dependent launch (NVIDIA sm_90+): a kernel launched with `launch_pdl` may be scheduled while the
# previous kernel of the stream is still running (once all of that kernel's programs have started, since every
# kernel here signals `gdc_launch_dependents` first), and waits in `gdc_wait` until it has finished and its
# writes are visible. The launch latency and ramp of the next kernel hide behind the tail of the last, which is
# most of a small kernel's cost inside a decode graph. Contract of a kernel taking PDL: no memory access (read or
# write) before `pdl_start` returns. `PDL = False` turns it off (benchmarks' A/B).
PDL = True


def pdl_args(device: torch.device) -> dict:
    """Launch keywords for a kernel with a `PDL` constexpr: {PDL, launch_pdl} on NVIDIA sm_90+, {} elsewhere (the
    interpreter, ROCm, older GPUs), where the kernel's default PDL=False compiles the waits out."""
    if not PDL or device.type != "cuda" or interpreting(device) or torch.version.hip is not None:
        return {}
    if _capability(device.index if device.index is not None else torch.cuda.current_device()) < (9, 0):
        return {}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (see PDL above); nothing without PDL."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


# ----------------------------------------------------------------------------- last-program counters
# A kernel split over programs that must be combined (split-K partials, the mHC mix's K split) lets the last of
# a tile's programs do the combining: each program stores its part, then counts itself done on an int32 counter
# of the tile (atomic add, acq_rel); the one that sees count S - 1 reads the parts (.cg loads) and resets the
# counter to 0. Kernels on one stream run one after the other (PDL included: a kernel touches memory only after
# the previous one ended), so they share one zeroed buffer per device.
COUNTER_SLOTS = 16384  # int32 counters per device (allocated once, never grown)
_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


@triton.jit
def load_parts(ptr, mask, CG: tl.constexpr):
    """A float load (masked lanes 0) of what other programs wrote: CG, when they wrote it in this launch (the
    last-program pattern above), reads through L2 (.cg) and never a stale L1 line."""
    if CG:
        return tl.load(ptr, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        return tl.load(ptr, mask=mask, other=0.0)


def tile_counters(device: torch.device) -> torch.Tensor | None:
    """The device's zeroed int32 tile counters (each use leaves them zero again), or None while a CUDA graph is
    being captured before they exist (the caller then takes its path without them): the buffer must not come from
    a graph's private pool. Allocated once per device and never grown, so captured graphs keep a valid pointer.
    Calls on one device must not run concurrently on two streams (the engine runs its forward on one)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    c = _COUNTERS.get(key)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        c = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
        _COUNTERS[key] = c
    return c


@functools.lru_cache(maxsize=None)
def _max_shared_mem(index: int) -> int:
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def max_shared_mem(device: torch.device) -> int | None:
    """Bytes of shared memory (LDS on AMD) one program may use on a CUDA / ROCm device (H200: 232,448;
    MI300X: 65,536); None elsewhere (the interpreter has no limit)."""
    if device.type != "cuda" or interpreting(device):
        return None
    return _max_shared_mem(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def fp8_decode(b, FNUZ: tl.constexpr):
    """uint8 (any int) codes -> float32 values. NaN codes are not special-cased (never stored)."""
    c = b.to(tl.int32) & 0xFF
    e = (c >> 3) & 0xF
    m = (c & 7).to(tl.float32)
    mant = tl.where(e == 0, m, m + 8.0)
    bias = 8 if FNUZ else 7
    v = mant * tl.exp2((tl.maximum(e, 1) - bias - 3).to(tl.float32))
    return tl.where((c & 0x80) != 0, -v, v)


@triton.jit
def fp8_encode(x, FNUZ: tl.constexpr):
    """float32 values already scaled into range (|x| <= 448 OCP / 240 FNUZ) -> uint8 codes, round to
    nearest even. Zero (either sign) encodes as 0x00."""
    a = tl.abs(x)
    if FNUZ:
        min_normal = 0.0078125  # 2^-7
        sub_steps = 1024.0  # 1 / 2^-10
        bias = 8
    else:
        min_normal = 0.015625  # 2^-6
        sub_steps = 512.0  # 1 / 2^-9
        bias = 7
    # subnormal (and zero): round a / step to an integer 0..8 with the 2^23 trick (exact RNE in fp32)
    sub = ((a * sub_steps + 8388608.0) - 8388608.0).to(tl.int32)
    # normal: round the float32 mantissa to 3 bits, ties to even, on the bit pattern
    bits = a.to(tl.int32, bitcast=True)
    rounded = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = (rounded >> 20) - ((127 - bias) << 3)
    code = tl.where(a < min_normal, sub, normal)
    code = tl.where((x < 0) & (code != 0), code | 0x80, code)
    return code.to(tl.uint8)


@triton.jit
def fp8_block_exponent(amax, FNUZ: tl.constexpr):
    """Exponent e of a block's power-of-two scale (the E8M0 byte is e + 127) for the block max |x| = amax
    (>= 1e-4, so normal): OCP e = ceil(log2(amax / 448)); FNUZ e + 1 (scale 2s, clamp 224, the same values).
    Exact from the float32 bits: amax = (1 + M / 2^23) 2^(E - 127) and 448 = 1.75 * 2^8, 1.75 having
    mantissa bits 0x600000, so e = E - 135 + (M > 0x600000). Use `fp8_pow2(-e)` for 1 / scale."""
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    if FNUZ:
        e = tl.minimum(tl.maximum(e, -127), 126) + 1
    else:
        e = tl.minimum(tl.maximum(e, -127), 127)
    return e


@triton.jit
def fp8_quant_max(FNUZ: tl.constexpr):
    """The clamp the quantisers use: 448 (OCP) / 224 (FNUZ, with the doubled scale)."""
    return 224.0 if FNUZ else 448.0


@triton.jit
def fp8_pow2(e):
    """2^e as float32 from integer e in [-126, 127], exactly (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


# ----------------------------------------------------------------------------- store-side cast (bf16 RNE in the interpreter)


def bf16_rne_bits(dtype: torch.dtype) -> bool:
    """The `RNE_BITS` constexpr for `cast_out`: round fp32 -> bf16 on the bits (interpreter only)."""
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def cast_out(y, ptr, RNE_BITS: tl.constexpr):
    """Cast float32 `y` to the element type of `ptr` for a store. RNE_BITS: bf16 by bit arithmetic
    (round to nearest even; finite values), for the interpreter whose bf16 cast truncates."""
    if RNE_BITS:
        b = y.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(ptr.dtype.element_ty)


# ----------------------------------------------------------------------------- act_quant inside producer kernels


@triton.jit
def act_quant_blocks(x, FNUZ: tl.constexpr):
    """The act_quant of each row of the fp32 tile x [blocks, block] (one block per row; masked lanes 0): (FP8
    bytes, scale exponents e: the scale byte is e + 127). Shared by every kernel that writes an act_quant."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    e = fp8_block_exponent(amax, FNUZ)  # FNUZ: scale 2x OCP's, clamp 224 (numerics.Fp8Dialect.quant_max)
    qmax = fp8_quant_max(FNUZ)
    inv_s = fp8_pow2(-e)  # exact: amax in [1e-4, 3.4e38] gives e in [-22, 121]
    y = tl.minimum(tl.maximum(x * inv_s[:, None], -qmax), qmax)
    return fp8_encode(y, FNUZ), e


@triton.jit
def act_quant_store(y, rows, row_ok, cols, q_ptr, s_ptr, sq, ss, K, R: tl.constexpr, BN: tl.constexpr,
                    FNUZ: tl.constexpr):
    """Store the act_quant (block 128) of the fp32 tile y [R, BN] (rows `rows` [R], consecutive columns `cols`
    [BN] starting at a multiple of 128; lanes at or past K, or of rows not row_ok, masked and 0 in y): bytes at
    q_ptr + row * sq + column, scale bytes at s_ptr + row * ss + column // 128."""
    nb: tl.constexpr = R * BN // 128
    r64 = rows.to(tl.int64)
    ok = tl.reshape(row_ok[:, None] & (cols[None, :] < K), (nb, 128))
    qoff = tl.reshape(r64[:, None] * sq + cols[None, :], (nb, 128))
    soff = tl.max(tl.reshape(r64[:, None] * ss + (cols // 128)[None, :], (nb, 128)), axis=1)
    qb, e = act_quant_blocks(tl.reshape(y, (nb, 128)), FNUZ)
    tl.store(q_ptr + qoff, qb, mask=ok)
    tl.store(s_ptr + soff, (e + 127).to(tl.uint8), mask=tl.max(ok.to(tl.int32), axis=1) > 0)
