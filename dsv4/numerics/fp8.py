"""FP8 E4M3 (OCP ``e4m3fn`` and AMD ``e4m3fnuz``) and E8M0 scale numerics.

Everything here is defined from the bit-level format descriptions (spec 4.1-4.5) and uses
only vectorised integer/float32 torch ops, so it runs unchanged on CPU and GPU tensors.
FP8 data is handled as raw ``uint8`` bytes; torch float8 tensors are accepted and viewed
as bytes (never value-cast).

Formats (s|eeee|mmm):

* OCP e4m3fn: bias 7, max finite +-448 (0x7E/0xFE), NaN 0x7F/0xFF, +0 0x00 and -0 0x80.
* FNUZ e4m3fnuz: bias 8, max finite +-240 (0x7F/0xFF), NaN only 0x80, no -0.

For every byte except 0x7F, 0xFF and 0x80 the FNUZ value is exactly half the OCP value.

FNUZ convention chosen for quantisation (spec 4.4): block quantisers compute the OCP
scale ``s_ocp = 2**ceil(log2(amax / 448))`` and, for FNUZ, use ``s_fnuz = 2 * s_ocp`` and
clamp ``x / s_fnuz`` to +-224 (``Fp8Dialect.quant_max``). This lands on the same bytes
and the same dequantised values as the OCP recipe, bit for bit (apart from OCP's -0,
which FNUZ stores as +0). The stored E8M0 scale byte is therefore the OCP byte + 1
(``Fp8Dialect.scale_exp_offset``). ``fp8_encode`` itself saturates at the format's
max finite value (448 OCP, 240 FNUZ).
"""

from __future__ import annotations

import enum
import math
from functools import lru_cache
from typing import Sequence

import torch

__all__ = [
    "Fp8Dialect",
    "fp8_decode_table",
    "fp8_decode",
    "fp8_encode",
    "e8m0_to_float",
    "float_to_e8m0",
    "pow2_scale_exponent",
    "quantize_fp8_blocks",
    "dequantize_fp8_blocks",
    "fp8_roundtrip",
    "ocp_to_fnuz",
    "fnuz_to_ocp",
]


class Fp8Dialect(str, enum.Enum):
    """FP8 E4M3 dialect: ``OCP`` (float8_e4m3fn) or ``FNUZ`` (float8_e4m3fnuz, MI300X)."""

    OCP = "ocp"
    FNUZ = "fnuz"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The matching torch float8 dtype."""
        return torch.float8_e4m3fn if self is Fp8Dialect.OCP else torch.float8_e4m3fnuz

    @property
    def exponent_bias(self) -> int:
        """Exponent bias of the format (7 OCP, 8 FNUZ)."""
        return 7 if self is Fp8Dialect.OCP else 8

    @property
    def max_finite(self) -> float:
        """Largest finite magnitude (448 OCP, 240 FNUZ)."""
        return 448.0 if self is Fp8Dialect.OCP else 240.0

    @property
    def max_finite_byte(self) -> int:
        """Byte of +max_finite (0x7E OCP, 0x7F FNUZ)."""
        return 0x7E if self is Fp8Dialect.OCP else 0x7F

    @property
    def quant_max(self) -> float:
        """Saturation bound used by the block quantisers (448 OCP, 224 FNUZ)."""
        return 448.0 if self is Fp8Dialect.OCP else 224.0

    @property
    def scale_exp_offset(self) -> int:
        """Added to the OCP scale exponent (0 OCP, 1 FNUZ: FNUZ scales are 2x OCP's)."""
        return 0 if self is Fp8Dialect.OCP else 1

    @property
    def nan_bytes(self) -> tuple[int, ...]:
        """Bytes that decode to NaN."""
        return (0x7F, 0xFF) if self is Fp8Dialect.OCP else (0x80,)

    @property
    def nan_byte(self) -> int:
        """Canonical NaN byte produced by the encoder (0x7F OCP, 0x80 FNUZ)."""
        return self.nan_bytes[0]

    @classmethod
    def parse(cls, x: "Fp8Dialect | str | torch.dtype") -> "Fp8Dialect":
        """Accept a dialect, ``"ocp"``/``"fnuz"``/``"e4m3fn"``/``"e4m3fnuz"`` or the torch dtype."""
        if isinstance(x, cls):
            return x
        if isinstance(x, torch.dtype):
            if x == torch.float8_e4m3fn:
                return cls.OCP
            if x == torch.float8_e4m3fnuz:
                return cls.FNUZ
        elif isinstance(x, str):
            key = x.strip().lower()
            if key.startswith("float8_"):
                key = key[len("float8_"):]
            aliases = {"ocp": cls.OCP, "e4m3fn": cls.OCP, "fnuz": cls.FNUZ, "e4m3fnuz": cls.FNUZ}
            if key in aliases:
                return aliases[key]
        raise ValueError(
            f"unknown FP8 dialect {x!r}: expected 'ocp', 'fnuz', 'e4m3fn', 'e4m3fnuz', "
            "torch.float8_e4m3fn or torch.float8_e4m3fnuz"
        )


# --------------------------------------------------------------------------------------
# byte views
# --------------------------------------------------------------------------------------

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _fp8_bytes(b: torch.Tensor, dialect: Fp8Dialect | None, what: str = "tensor") -> tuple[torch.Tensor, Fp8Dialect]:
    """View ``b`` as uint8 FP8 bytes; a torch float8 dtype must agree with ``dialect``."""
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(b).__name__}")
    if b.dtype in _FP8_DTYPES:
        own = Fp8Dialect.parse(b.dtype)
        if dialect is not None and Fp8Dialect.parse(dialect) is not own:
            raise ValueError(
                f"{what} has dtype {b.dtype} but dialect {Fp8Dialect.parse(dialect).value!r} was requested; "
                "view it as torch.uint8 to reinterpret the bytes deliberately"
            )
        return b.view(torch.uint8), own
    if dialect is None:
        raise ValueError(f"{what} has dtype {b.dtype}: an FP8 dialect must be given for raw bytes")
    if b.dtype == torch.int8:
        return b.view(torch.uint8), Fp8Dialect.parse(dialect)
    if b.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8/int8 bytes or a float8 e4m3 tensor, got {b.dtype}")
    return b, Fp8Dialect.parse(dialect)


def _e8m0_bytes(s: torch.Tensor, what: str = "scale") -> torch.Tensor:
    """View E8M0 scales (uint8 or float8_e8m0fnu) as uint8 bytes."""
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(s).__name__}")
    if s.dtype == torch.float8_e8m0fnu:
        return s.view(torch.uint8)
    if s.dtype != torch.uint8:
        raise TypeError(
            f"{what} must hold E8M0 bytes (uint8 or torch.float8_e8m0fnu), got {s.dtype}; "
            "float scales are not accepted here (convert with float_to_e8m0)"
        )
    return s


# --------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _decode_values(dialect: Fp8Dialect) -> tuple[float, ...]:
    bias = dialect.exponent_bias
    nan = set(dialect.nan_bytes)
    vals = []
    for byte in range(256):
        if byte in nan:
            vals.append(float("nan"))
            continue
        sign = -1.0 if byte & 0x80 else 1.0
        exp = (byte >> 3) & 0xF
        man = byte & 0x7
        if exp == 0:
            mag = math.ldexp(man, 1 - bias - 3)  # subnormal: 2^(1-bias) * m/8
        else:
            mag = math.ldexp(8 + man, exp - bias - 3)  # normal: 2^(e-bias) * (1 + m/8)
        vals.append(sign * mag)
    return tuple(vals)


_TABLE_CACHE: dict[tuple[Fp8Dialect, torch.device], torch.Tensor] = {}


def _decode_table_on(dialect: Fp8Dialect, device: torch.device) -> torch.Tensor:
    key = (dialect, torch.device(device))
    t = _TABLE_CACHE.get(key)
    if t is None:
        t = torch.tensor(_decode_values(dialect), dtype=torch.float32, device=device)
        _TABLE_CACHE[key] = t
    return t


def fp8_decode_table(dialect: Fp8Dialect | str | torch.dtype) -> torch.Tensor:
    """Float32 tensor [256]: value of every byte, built from the bit layout; NaN at NaN codes."""
    d = Fp8Dialect.parse(dialect)
    return torch.tensor(_decode_values(d), dtype=torch.float32)


def fp8_decode(b: torch.Tensor, dialect: Fp8Dialect | str | torch.dtype | None = None) -> torch.Tensor:
    """Decode FP8 bytes to float32 (same shape/device).

    ``b``: uint8/int8 bytes (``dialect`` required) or a float8 e4m3 tensor (viewed as bytes;
    ``dialect`` optional but must match its dtype).
    """
    raw, d = _fp8_bytes(b, None if dialect is None else Fp8Dialect.parse(dialect), "b")
    table = _decode_table_on(d, raw.device)
    return table.index_select(0, raw.reshape(-1).int()).view(raw.shape)  # (~2x faster than table[raw.long()])


# --------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------


def fp8_encode(x: torch.Tensor, dialect: Fp8Dialect | str | torch.dtype) -> torch.Tensor:
    """Encode floats to FP8 bytes (uint8, same shape): round to nearest, ties to even.

    Bit arithmetic on the IEEE representation (float64 input is handled exactly in
    float64, any other float dtype is converted to float32 exactly first). Finite values
    beyond the range and +-inf saturate to +-max_finite; NaN -> ``dialect.nan_byte``.
    Zero results keep the sign in OCP (0x00 / 0x80); FNUZ has no -0 so they become 0x00.
    """
    d = Fp8Dialect.parse(dialect)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("fp8_encode expects a floating-point tensor")
    if x.dtype == torch.float64:
        idt, nbits, mbits, ebias = torch.int64, 64, 52, 1023
        bits = x.view(torch.int64)
    else:
        idt, nbits, mbits, ebias = torch.int32, 32, 23, 127
        bits = x.to(torch.float32).view(torch.int32)
    emask = (1 << (nbits - 1 - mbits)) - 1  # all-ones exponent (inf/NaN)
    neg = bits < 0
    mag = bits & ((1 << (nbits - 1)) - 1)
    exp = mag >> mbits
    frac = mag & ((1 << mbits) - 1)
    is_nan = (exp == emask) & (frac != 0)

    # significand with the implicit bit, and the exponent it is scaled by
    sig = torch.where(exp > 0, frac | (1 << mbits), frac)
    exp_eff = exp.clamp(min=1)
    # biased target exponent if the value were a target normal; subnormals use exponent 1
    e_t = exp_eff - (ebias - d.exponent_bias)
    e_t_eff = e_t.clamp(min=1)
    # bits of `sig` to drop so that one unit is the target's quantum; beyond mbits + 2
    # the result is 0 regardless (half a unit then exceeds any significand)
    shift = ((mbits - 3) + (e_t_eff - e_t)).clamp(max=mbits + 2)
    kept = sig >> shift
    rem = sig - (kept << shift)
    half = torch.ones_like(shift) << (shift - 1)
    round_up = (rem > half) | ((rem == half) & ((kept & 1) == 1))
    # kept holds the implicit bit at position 3 for normals, so adding (e-1)<<3 yields the
    # code, and a rounding carry into bit 4 moves correctly to the next binade
    code = ((e_t_eff - 1) << 3) + kept + round_up.to(idt)
    code = code.clamp(max=d.max_finite_byte)

    if d is Fp8Dialect.OCP:
        out = code | (neg.to(idt) << 7)
    else:
        out = code | ((neg & (code != 0)).to(idt) << 7)
    out = torch.where(is_nan, torch.full_like(out, d.nan_byte), out)
    return out.to(torch.uint8)


# --------------------------------------------------------------------------------------
# E8M0
# --------------------------------------------------------------------------------------


def e8m0_to_float(b: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8 or float8_e8m0fnu, reinterpreted) -> float32 ``2**(b-127)``.

    Built from float32 bits ``b << 23``; byte 0 is 2**-127 (bits 0x00400000), 255 is NaN.
    """
    raw = _e8m0_bytes(b, "b").to(torch.int32)
    bits = raw << 23
    bits = torch.where(raw == 0, torch.full_like(bits, 0x00400000), bits)
    bits = torch.where(raw == 255, torch.full_like(bits, 0x7FC00000), bits)
    return bits.view(torch.float32)


def float_to_e8m0(s: torch.Tensor | float | Sequence[float]) -> torch.Tensor:
    """Exact powers of two in [2**-127, 2**127] -> E8M0 bytes (uint8, same shape).

    Raises ValueError if any value is not an exact positive power of two or out of range.
    """
    t = torch.as_tensor(s)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    elif t.dtype != torch.float64:
        t = t.to(torch.float32)
    mant, ex = torch.frexp(t)
    ok = mant == 0.5  # also rejects 0, negatives, inf and NaN
    if not bool(ok.all()):
        bad = t[~ok].flatten()[:4].tolist()
        raise ValueError(f"float_to_e8m0: values are not exact positive powers of two, e.g. {bad}")
    byte = ex.to(torch.int32) - 1 + 127  # value = 0.5 * 2^ex = 2^(ex-1)
    in_range = (byte >= 0) & (byte <= 254)
    if not bool(in_range.all()):
        bad = t[~in_range].flatten()[:4].tolist()
        raise ValueError(f"float_to_e8m0: powers of two outside [2**-127, 2**127], e.g. {bad}")
    return byte.to(torch.uint8)


def pow2_scale_exponent(amax: torch.Tensor, qmax: float | torch.Tensor) -> torch.Tensor:
    """Exact ``ceil(log2(amax / qmax))`` as int32 (shape of the broadcast inputs).

    Both inputs must be positive and finite. With ``amax = ma*2^ea``, ``qmax = mq*2^eq``
    (``torch.frexp``, mantissas in [0.5, 1)), the ratio ``ma/mq`` lies in (0.5, 2), so the
    result is ``ea - eq + (ma > mq)`` with no rounding anywhere.
    """
    a = torch.as_tensor(amax)
    if a.dtype not in (torch.float32, torch.float64):
        a = a.to(torch.float32)
    q = torch.as_tensor(qmax, dtype=a.dtype, device=a.device)
    ma, ea = torch.frexp(a)
    mq, eq = torch.frexp(q)
    return (ea.to(torch.int32) - eq.to(torch.int32) + (ma > mq).to(torch.int32)).to(torch.int32)


# --------------------------------------------------------------------------------------
# block quantisation
# --------------------------------------------------------------------------------------


def _normalise_block_shape(block_shape: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    bs = (int(block_shape),) if isinstance(block_shape, int) else tuple(int(b) for b in block_shape)
    if len(bs) == 0 or any(b <= 0 for b in bs):
        raise ValueError(f"block_shape must be a non-empty tuple of positive ints, got {block_shape!r}")
    if len(bs) > ndim:
        raise ValueError(f"block_shape {bs} has more dims than the tensor ({ndim})")
    return bs


def _to_blocks(x: torch.Tensor, bs: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the trailing dims to block multiples and view as [..., n1, b1, n2, b2, ...]."""
    lead = x.shape[: x.dim() - len(bs)]
    sizes = x.shape[x.dim() - len(bs):]
    nblk = tuple(-(-n // b) for n, b in zip(sizes, bs))
    pad: list[int] = []
    for n, b, k in reversed(list(zip(sizes, bs, nblk))):
        pad += [0, k * b - n]
    if any(pad):
        x = torch.nn.functional.pad(x, pad)
    inter: list[int] = []
    for k, b in zip(nblk, bs):
        inter += [k, b]
    return x.reshape(*lead, *inter), nblk


def _from_blocks(xb: torch.Tensor, lead: torch.Size, sizes: torch.Size, bs: tuple[int, ...]) -> torch.Tensor:
    padded = [-(-n // b) * b for n, b in zip(sizes, bs)]
    x = xb.reshape(*lead, *padded)
    return x[(Ellipsis, *[slice(0, n) for n in sizes])]


def _block_dims(nlead: int, nb: int) -> tuple[int, ...]:
    return tuple(nlead + 2 * i + 1 for i in range(nb))


def _quantize_blocks(x, bs, qmax_ocp, clamp_max, exp_offset, amax_floor):
    """Shared recipe: returns (clamp(x/s) in float32, x's shape; int32 exponent of s per block)."""
    xf = x.to(torch.float32)
    nlead = xf.dim() - len(bs)
    xb, nblk = _to_blocks(xf, bs)
    bdims = _block_dims(nlead, len(bs))
    amax = xb.abs().amax(dim=bdims, keepdim=True).clamp(min=amax_floor)
    e_ocp = pow2_scale_exponent(amax, qmax_ocp).clamp(-127, 127 - exp_offset)
    e = e_ocp + exp_offset
    s = e8m0_to_float((e + 127).to(torch.uint8))
    y = (xb / s).clamp(-clamp_max, clamp_max)
    y = _from_blocks(y, xf.shape[:nlead], xf.shape[nlead:], bs)
    return y, e.squeeze(bdims)


def quantize_fp8_blocks(
    x: torch.Tensor,
    block_shape: int | Sequence[int],
    dialect: Fp8Dialect | str | torch.dtype = Fp8Dialect.OCP,
    amax_floor: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 quantisation with power-of-two (E8M0) scales, in float32.

    ``block_shape`` covers the trailing dims: ``(128,)`` per-row activations (scale
    ``[..., ceil(K/128)]``), ``(64,)`` KV, ``(128, 128)`` weights (scale
    ``[..., ceil(N/128), ceil(K/128)]``); ragged last blocks use the partial block's amax.
    Per block: ``amax = max(max|x|, amax_floor)``, ``s = 2**ceil(log2(amax/448))``;
    OCP: ``q = encode(clamp(x/s, +-448))``; FNUZ: ``q = encode(clamp(x/(2s), +-224))`` with
    the scale byte of ``2s``. Returns ``(q uint8 shaped like x, scale uint8 E8M0 bytes)``.
    """
    d = Fp8Dialect.parse(dialect)
    bs = _normalise_block_shape(block_shape, x.dim())
    y, e = _quantize_blocks(x, bs, 448.0, d.quant_max, d.scale_exp_offset, amax_floor)
    return fp8_encode(y, d), (e + 127).to(torch.uint8)


def _expand_scale(sf: torch.Tensor, sizes: Sequence[int], bs: tuple[int, ...]) -> torch.Tensor:
    nb = len(bs)
    for i, (n, b) in enumerate(zip(sizes, bs)):
        dim = sf.dim() - nb + i
        sf = sf.repeat_interleave(b, dim=dim).narrow(dim, 0, n)
    return sf


def _check_scale_shape(scale: torch.Tensor, shape: Sequence[int], bs: tuple[int, ...], what: str) -> None:
    nlead = len(shape) - len(bs)
    expected = tuple(shape[:nlead]) + tuple(-(-n // b) for n, b in zip(shape[nlead:], bs))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{what}: scale shape {tuple(scale.shape)} does not match data shape {tuple(shape)} "
            f"with block shape {bs} (expected {expected})"
        )


def dequantize_fp8_blocks(
    q: torch.Tensor,
    scale: torch.Tensor,
    block_shape: int | Sequence[int],
    dialect: Fp8Dialect | str | torch.dtype | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``decode(q) * 2**(scale-127)`` with each scale broadcast over its block.

    ``q``: uint8 bytes (``dialect`` required) or a float8 e4m3 tensor (viewed as bytes);
    ``scale``: E8M0 bytes (uint8 / float8_e8m0fnu) shaped as ``quantize_fp8_blocks`` returns.
    The product is exact in float32, then cast to ``out_dtype``.
    """
    raw, d = _fp8_bytes(q, None if dialect is None else Fp8Dialect.parse(dialect), "q")
    sb = _e8m0_bytes(scale)
    bs = _normalise_block_shape(block_shape, raw.dim())
    _check_scale_shape(sb, raw.shape, bs, "dequantize_fp8_blocks")
    vals = fp8_decode(raw, d)
    sizes = raw.shape[raw.dim() - len(bs):]
    if all(n % b == 0 for n, b in zip(sizes, bs)):  # whole blocks: one broadcast multiply, no expanded scales
        lead = tuple(raw.shape[:raw.dim() - len(bs)])
        split = lead + tuple(x for n, b in zip(sizes, bs) for x in (n // b, b))
        sf = e8m0_to_float(sb).reshape(lead + tuple(x for n, b in zip(sizes, bs) for x in (n // b, 1)))
        return (vals.view(split) * sf).view(raw.shape).to(out_dtype)
    sf = _expand_scale(e8m0_to_float(sb), sizes, bs)
    return (vals * sf).to(out_dtype)


def fp8_roundtrip(
    x: torch.Tensor,
    block: int,
    dialect: Fp8Dialect | str | torch.dtype = Fp8Dialect.OCP,
    amax_floor: float = 1e-4,
) -> torch.Tensor:
    """Quantise along the last dim in ``block``-wide blocks and dequantise back to ``x.dtype``."""
    d = Fp8Dialect.parse(dialect)
    q, s = quantize_fp8_blocks(x, (int(block),), d, amax_floor)
    return dequantize_fp8_blocks(q, s, (int(block),), d, out_dtype=x.dtype)


# --------------------------------------------------------------------------------------
# checkpoint conversion
# --------------------------------------------------------------------------------------


def ocp_to_fnuz(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert an OCP e4m3fn weight + E8M0 scales to FNUZ exactly (spec 4.4).

    Weight bytes are kept (0x80, OCP -0, becomes 0x00) and every scale byte is incremented
    (x2). Raises ValueError for OCP NaN weight bytes (0x7F/0xFF: corrupt, they would turn
    into +-240) and for scale bytes 254/255. Returns new ``(weight uint8, scale uint8)``.
    """
    w, _ = _fp8_bytes(weight, Fp8Dialect.OCP, "weight")
    s = _e8m0_bytes(scale)
    n_nan = int(((w == 0x7F) | (w == 0xFF)).sum())
    if n_nan:
        raise ValueError(
            f"ocp_to_fnuz: weight is corrupt: {n_nan} NaN bytes (0x7F/0xFF) found; "
            "reinterpreted as FNUZ they would silently become +-240"
        )
    n_bad = int((s >= 254).sum())
    if n_bad:
        raise ValueError(f"ocp_to_fnuz: {n_bad} scale bytes are 254/255 and cannot be doubled in E8M0")
    w_out = torch.where(w == 0x80, torch.zeros_like(w), w)
    return w_out, s + 1


def fnuz_to_ocp(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``ocp_to_fnuz``: FNUZ weight + E8M0 scales -> OCP, exactly.

    Weight bytes are kept and every scale byte is decremented (/2). Raises ValueError for
    the FNUZ NaN byte 0x80, for 0x7F/0xFF (+-240 would need +-480, not representable in
    OCP e4m3fn) and for scale bytes 0/255. Returns new ``(weight uint8, scale uint8)``.
    """
    w, _ = _fp8_bytes(weight, Fp8Dialect.FNUZ, "weight")
    s = _e8m0_bytes(scale)
    n_nan = int((w == 0x80).sum())
    if n_nan:
        raise ValueError(f"fnuz_to_ocp: weight is corrupt: {n_nan} NaN bytes (0x80) found")
    n_big = int(((w == 0x7F) | (w == 0xFF)).sum())
    if n_big:
        raise ValueError(
            f"fnuz_to_ocp: {n_big} bytes are +-240 (0x7F/0xFF), which are not representable in OCP "
            "e4m3fn at the halved scale (+-480 > 448)"
        )
    n_bad = int(((s == 0) | (s == 255)).sum())
    if n_bad:
        raise ValueError(f"fnuz_to_ocp: {n_bad} scale bytes are 0/255 and cannot be halved in E8M0")
    return w.clone(), s - 1
