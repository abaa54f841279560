"""Random but valid weights: for `--load-format dummy` (any size, generated on the target device, in
the real shapes and dtypes) and for `make-tiny` (dense values that are then quantised).

Values are seeded per tensor name (so they do not depend on load order or on which tensors a rank
owns; stacked routed experts per global expert, so a rank holding experts 128..255 holds exactly those
rows of the whole model) and scaled so activations stay O(1): linear weights ~ N(0, 1/in_features), norms ~ 1, mHC
mixing weights small, sinks / ape / biases non-zero, tid2eid rows of distinct experts.
"""

from __future__ import annotations

import math
import zlib

import torch


def generator(seed: int, name: str, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def distinct_rows(rows: int, k: int, n: int, g: torch.Generator, device) -> torch.Tensor:
    """[rows, k] int64, each row k distinct values from 0..n-1."""
    return torch.rand(rows, n, generator=g, device=device).argsort(dim=1)[:, :k].contiguous()


def dense_values(role: str, shape: tuple, g: torch.Generator, device) -> torch.Tensor:
    """float32 values of a tensor of the given role (see checkpoint_format.TensorSpec.role)."""
    def randn():
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    if role == "norm":
        return 1.0 + 0.1 * randn()
    if role == "hc_fn":
        return 0.02 * randn()
    if role == "hc_base":
        return 0.5 * randn()
    if role == "hc_scale":
        return 1.0 + 0.2 * randn()
    if role == "sink":
        return randn()
    if role == "ape":
        return 0.5 * randn()
    if role == "bias":
        return 0.1 * randn()
    if role == "embed":
        return randn()
    if role in ("head", "gate", "dense", "fp8_weight", "fp4_weight"):
        return randn() / math.sqrt(shape[-1])
    raise ValueError(f"no dense values for role {role!r}")


def _scale_byte(fan_in: int, value_rms: float) -> int:
    """E8M0 byte b with value_rms * 2^(b-127) ~ 1/sqrt(fan_in)."""
    return 127 - round(math.log2(value_rms * math.sqrt(fan_in)))


_FP4_RMS = math.sqrt(sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8)


@torch.no_grad()
def fill_dummy(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every persistent buffer of `model` in place with random valid values of its dtype."""
    bufs = {n: b for n, b in model.named_buffers() if n in model.state_dict()}
    stacked = {f"{m}.{w}": mod.expert_map.local_ids for m, mod in model.named_modules()
               if hasattr(mod, "expert_map") and hasattr(mod, "w13") for w in ("w13", "w2")}
    for name, b in bufs.items():
        if name in stacked:
            for i, e in enumerate(stacked[name]):  # row i is global expert e: the same values on any rank
                _fill(f"{name}.{e}", b[i], bufs, seed, row_of=name)
            continue
        _fill(name, b, bufs, seed)


def _fill(name: str, b: torch.Tensor, bufs: dict, seed: int, row_of: str | None = None) -> None:
    """`row_of`: b is one expert's row of that stacked buffer (seeded by `name`, which names the expert)."""
    with torch.no_grad():
        dev = b.device
        g = generator(seed, name, dev)
        name = row_of or name
        if b.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            b.copy_(torch.randn(b.shape, generator=g, device=dev).to(b.dtype))
        elif b.dtype == torch.uint8 and name.endswith("scale"):
            w = bufs[name[: -len(".scale")] + ".weight"] if name.endswith(".scale") else bufs[name[: -len("_scale")]]
            if w.dtype == torch.uint8:  # FP4
                b.fill_(_scale_byte(2 * w.shape[-1], _FP4_RMS))
            else:
                b.fill_(_scale_byte(w.shape[-1], 1.0))
        elif b.dtype == torch.uint8:  # packed FP4
            b.copy_(torch.randint(0, 256, b.shape, generator=g, device=dev, dtype=torch.uint8))
        elif name.endswith("tid2eid"):
            n_exp = bufs[name[: -len("tid2eid")] + "weight"].shape[0]
            b.copy_(distinct_rows(b.shape[0], b.shape[1], n_exp, g, dev))
        elif b.dtype.is_floating_point:
            v = dense_values(buffer_role(name), tuple(b.shape), g, dev)
            if name.endswith((".compressor.wkv.weight", ".compressor.wgate.weight", ".ffn.gate.weight")):
                v = v.to(torch.bfloat16).float()  # BF16 in a release checkpoint (held in float32 until compacted)
            b.copy_(v.to(b.dtype))
        else:
            raise ValueError(f"fill_dummy: no rule for buffer {name!r} of dtype {b.dtype}")


def buffer_role(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("norm.weight"):
        return "norm"
    if leaf.endswith("_fn"):
        return "hc_fn"
    if leaf.endswith("_base"):
        return "hc_base"
    if leaf.endswith("_scale") and leaf.startswith("hc_"):
        return "hc_scale"
    if leaf == "attn_sink":
        return "sink"
    if leaf == "ape":
        return "ape"
    if name.endswith("gate.bias"):
        return "bias"
    if name == "embed.weight":
        return "embed"
    if name == "head.weight":
        return "head"
    return "dense"
