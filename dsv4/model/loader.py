"""Load checkpoint tensors into a `Transformer`'s buffers.

Sharded safetensors (+ `model.safetensors.index.json`) in the official release's names or transformers'
(names.py). Weights stay in their quantised form: FP8 e4m3 bytes in the platform's dialect (an OCP
checkpoint loaded for a fnuz platform is converted: byte 0x80 -> 0, scale byte + 1, and back), FP4
packed bytes, E8M0 scales as uint8 bytes (reinterpreted, never converted numerically; the float32
power-of-two scales of the "FP8 mixed" Base checkpoints are converted exactly). Every problem names the
tensor and the file; all problems of a checkpoint are reported together.
"""

from __future__ import annotations


import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open

from dsv4.model.names import Target, target_of
from dsv4.numerics.fp8 import Fp8Dialect, float_to_e8m0, fnuz_to_ocp, ocp_to_fnuz

INDEX_FILE = "model.safetensors.index.json"
_FP8 = {"F8_E4M3": Fp8Dialect.OCP, "F8_E4M3FNUZ": Fp8Dialect.FNUZ}
_FLOAT = ("BF16", "F16", "F32", "F64")
_MAX_LISTED = 25


class CheckpointError(RuntimeError):
    pass


@dataclass
class CheckpointIndex:
    root: Path
    files: dict[str, Path]  # tensor name -> file
    shapes: dict[str, tuple[list[int], str]] = field(default_factory=dict)  # name -> (shape, dtype string)

    def names(self) -> list[str]:
        return list(self.files)

    def has_mtp(self) -> bool:
        return any(target_of(n).name.startswith("mtp.") for n in self.files)


def _open(path: Path, device: str = "cpu"):
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def index_checkpoint(root: str | Path) -> CheckpointIndex:
    """Find the checkpoint's tensors: through the index file when there is one, else every
    *.safetensors file in the folder. Reads headers only."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    idx = root / INDEX_FILE
    files: dict[str, Path] = {}
    if idx.exists():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{idx}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        shard_paths = sorted({root / f for f in wm.values()})
        missing = [str(p) for p in shard_paths if not p.exists()]
        if missing:
            raise CheckpointError(f"{idx} names shard files that do not exist: {', '.join(missing[:_MAX_LISTED])}")
        files = {k: root / v for k, v in wm.items()}
    else:
        shard_paths = sorted(root.glob("*.safetensors"))
        if not shard_paths:
            raise CheckpointError(f"{root}: no *.safetensors files and no {INDEX_FILE}")
    ci = CheckpointIndex(root, {})
    for p in shard_paths:
        with _open(p) as f:
            for k in f.keys():
                if idx.exists() and files.get(k) != p:
                    if k not in files:
                        raise CheckpointError(f"{p}: tensor {k!r} is not listed in {idx}")
                    continue
                if k in ci.files:
                    raise CheckpointError(f"tensor {k!r} appears in both {ci.files[k]} and {p}")
                sl = f.get_slice(k)
                ci.files[k] = p
                ci.shapes[k] = (list(sl.get_shape()), sl.get_dtype())
    if idx.exists():
        absent = [k for k in files if k not in ci.files]
        if absent:
            raise CheckpointError(f"{idx} lists tensors that are not in their shard: " + ", ".join(
                f"{k!r} ({files[k].name})" for k in absent[:_MAX_LISTED]))
    return ci


def _region(buf: torch.Tensor, t: Target) -> torch.Tensor:
    r = buf if t.expert is None else buf[t.expert]
    if t.half is not None:
        h = r.shape[0] // 2
        r = r[t.half * h:(t.half + 1) * h]
    return r


def expected_pieces(buffers: dict[str, torch.Tensor]) -> set[tuple]:
    """Every (buffer, expert, half) piece a complete checkpoint must fill."""
    out = set()
    for name, b in buffers.items():
        if name.endswith((".experts.w13", ".experts.w13_scale")):
            out |= {(name, e, h) for e in range(b.shape[0]) for h in (0, 1)}
        elif name.endswith((".experts.w2", ".experts.w2_scale")):
            out |= {(name, e, None) for e in range(b.shape[0])}
        else:
            out.add((name, None, None))
    return out


def _dtype_problem(dst: torch.Tensor, sdtype: str, is_scale: bool) -> str | None:
    """Why a checkpoint tensor of safetensors dtype `sdtype` cannot fill `dst` (None: it can).
    Checked from the headers before anything is read, so that every dtype problem of a checkpoint is
    reported together with the missing / unexpected / mis-shaped tensors (module docstring)."""
    if dst.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        if sdtype not in _FP8:
            return f"dtype {sdtype}, expected FP8 e4m3 (F8_E4M3 or F8_E4M3FNUZ)"
    elif dst.dtype == torch.uint8:
        if is_scale and sdtype not in ("F8_E8M0", "U8", "F32"):
            return f"dtype {sdtype}, expected E8M0 scales (F8_E8M0) or F32 powers of two"
        if not is_scale and sdtype not in ("I8", "U8", "F4"):
            return f"dtype {sdtype}, expected packed FP4 bytes (I8)"
    elif dst.dtype.is_floating_point:
        if sdtype not in _FLOAT:
            hint = " (the checkpoint is quantised but config.json has no quantization_config)" if sdtype in _FP8 else ""
            return f"dtype {sdtype}, expected a float tensor{hint}"
    elif sdtype not in ("I64", "I32", "I16", "U8", "I8"):
        return f"dtype {sdtype}, expected an integer tensor"
    return None


def _fill(dst: torch.Tensor, src: torch.Tensor, sdtype: str, name: str, file: Path, is_scale: bool) -> str | None:
    """Copy `src` into `dst` by the rules of the module docstring. Returns the source FP8 dialect when
    the bytes were copied verbatim from another dialect (to convert afterwards), else None."""
    where = f"tensor {name!r} in {file}"
    why = _dtype_problem(dst, sdtype, is_scale)
    if why is not None:  # normally caught earlier, in load_checkpoint's header pass
        raise CheckpointError(f"{where}: {why}")
    if dst.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        dst.view(torch.uint8).copy_(src.view(torch.uint8))
        src_d, dst_d = _FP8[sdtype], Fp8Dialect.parse(dst.dtype)
        return src_d if src_d != dst_d else None
    if dst.dtype == torch.uint8 and is_scale and sdtype == "F32":
        try:
            dst.copy_(float_to_e8m0(src.float()).to(dst.device))
        except ValueError as e:
            raise CheckpointError(f"{where}: float32 scales must be powers of two ({e})") from None
    elif dst.dtype == torch.uint8:  # E8M0 scale bytes or packed FP4 bytes: reinterpreted, never converted
        dst.copy_(src.view(torch.uint8))
    else:
        dst.copy_(src.to(dst.dtype))
    return None


def _is_expert_buffer(name: str) -> bool:
    return name.endswith((".experts.w13", ".experts.w13_scale", ".experts.w2", ".experts.w2_scale"))


def load_checkpoint(model: torch.nn.Module, ckpt: CheckpointIndex, progress: bool = False,
                    expert_map=None) -> None:
    """Fill the model's buffers from the checkpoint. `expert_map` (dsv4/ops/moe_dispatch.ExpertMap; None = all
    experts local): routed-expert tensors of remote experts are not read at all, local ones land at their
    local index (per-expert tensors), and stacked [E, ...] tensors (transformers' layout) are read and
    their local rows kept."""
    persistent = model.state_dict(keep_vars=True)  # once: calling state_dict() per buffer was quadratic
    buffers = {n: b for n, b in model.named_buffers() if n in persistent}
    device = str(next(iter(buffers.values())).device)
    need = expected_pieces(buffers)
    problems: list[str] = []
    plan: dict[Path, list[tuple[str, Target]]] = {}
    present_but_bad: list[Target] = []  # reported for their shape / dtype, so not again as missing
    unexpected = []
    local = None
    if expert_map is not None and not expert_map.is_identity:
        local = {g: i for i, g in enumerate(expert_map.local_ids)}
    stacked_rows: dict[str, list[int]] = {}  # stacked expert tensors: the global rows this rank keeps
    for name, file in ckpt.files.items():
        t = target_of(name)
        if t.name not in buffers:
            unexpected.append(f"{name!r} ({file.name})")
            continue
        shape, sdtype = ckpt.shapes[name]
        if local is not None and _is_expert_buffer(t.name):
            if t.expert is not None:
                if t.expert not in local:
                    if not 0 <= t.expert < expert_map.num_global:
                        problems.append(f"tensor {name!r} in {file}: expert {t.expert} out of range "
                                        f"(model has {expert_map.num_global})")
                    continue  # a remote expert: another rank reads it
                t = replace(t, expert=local[t.expert])
            else:
                if not shape or shape[0] != expert_map.num_global:
                    problems.append(f"tensor {name!r} in {file}: stacked experts {list(shape)}, expected "
                                    f"{expert_map.num_global} rows")
                    continue
                stacked_rows[name] = list(expert_map.local_ids)
                shape = [expert_map.num_local, *shape[1:]]
        region = _region(buffers[t.name], t) if t.expert is None or t.expert < buffers[t.name].shape[0] else None
        if region is None:
            problems.append(f"tensor {name!r} in {file}: expert {t.expert} out of range "
                            f"(model has {buffers[t.name].shape[0]})")
            continue
        if list(region.shape) != list(shape):
            problems.append(f"tensor {name!r} in {file}: shape {list(shape)}, expected {list(region.shape)}")
            present_but_bad.append(t)
            continue
        why = _dtype_problem(region, sdtype, t.name.endswith("scale"))
        if why is not None:
            problems.append(f"tensor {name!r} in {file}: {why}")
            present_but_bad.append(t)
            continue
        plan.setdefault(file, []).append((name, t))
    if not any(b.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) for b in buffers.values()) and any(
            ckpt.shapes[n][1] in _FP8 for n in ckpt.files):
        # Say the cause first: otherwise it hides behind hundreds of shape / unexpected-scale lines.
        problems.insert(0, "the checkpoint holds FP8 tensors but config.json has no quantization_config")
    if len(problems) > _MAX_LISTED:  # per-tensor lines: keep the message readable for a 69k-tensor checkpoint
        problems = problems[:_MAX_LISTED] + [f"... and {len(problems) - _MAX_LISTED} more tensor problem(s)"]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (not part of this model): "
                        + ", ".join(unexpected[:_MAX_LISTED]) + (" ..." if len(unexpected) > _MAX_LISTED else ""))
    by_buffer: dict[str, set] = {}
    for p in need:
        by_buffer.setdefault(p[0], set()).add(p)
    got = set()
    for t in [t for items in plan.values() for _, t in items] + present_but_bad:
        got |= by_buffer[t.name] if t.expert is None and t.half is None else {t.piece()}
    missing = sorted(need - got, key=str)
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) in {ckpt.root}: " + ", ".join(
            _describe_piece(p) for p in missing[:_MAX_LISTED]) + (" ..." if len(missing) > _MAX_LISTED else ""))
    if problems:
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))

    foreign: list[tuple[Target, Fp8Dialect]] = []
    files = sorted(plan)
    it = files
    if progress:
        from tqdm import tqdm
        it = tqdm(files, desc=f"loading {len(files)} shard(s)", unit="shard")
    for file in it:
        with _open(file, device) as f:
            for name, t in plan[file]:
                try:
                    src = f.get_tensor(name)
                    if name in stacked_rows:
                        src = src[stacked_rows[name]]
                except Exception as e:
                    raise CheckpointError(f"tensor {name!r} in {file}: cannot be read ({type(e).__name__}: {e})") from None
                d = _fill(_region(buffers[t.name], t), src, ckpt.shapes[name][1], name, file, t.name.endswith("scale"))
                if d is not None:
                    foreign.append((t, d))
                if t.name.endswith("gate.tid2eid"):  # checked here so the message can name the file
                    b = buffers[t.name]
                    E = buffers[t.name.replace("tid2eid", "weight")].shape[0]
                    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= E):
                        raise CheckpointError(f"tensor {name!r} in {file}: expert ids must be in 0..{E - 1}, "
                                              f"got {int(b.min())}..{int(b.max())}")
    for t, d in foreign:
        _convert_dialect(buffers, t, d)


def _describe_piece(p: tuple) -> str:
    name, e, h = p
    if e is None:
        return repr(name)
    base = name.rsplit(".", 1)[0]
    w = "w2" if ".w2" in name else ("w1" if h == 0 else "w3")
    return repr(f"{base}.{e}.{w}.{'scale' if name.endswith('scale') else 'weight'}")


def _scale_target(t: Target) -> Target:
    if t.name.endswith(".weight"):
        return Target(t.name[: -len("weight")] + "scale", t.expert, t.half)
    return Target(t.name + "_scale", t.expert, t.half)


def _convert_dialect(buffers, t: Target, src: Fp8Dialect) -> None:
    w = _region(buffers[t.name], t)
    st = _scale_target(t)
    if st.name not in buffers:
        raise CheckpointError(f"FP8 tensor {t.name!r} has no scale tensor {st.name!r}")
    s = _region(buffers[st.name], st)
    try:
        nw, ns = (ocp_to_fnuz if src == Fp8Dialect.OCP else fnuz_to_ocp)(w.view(torch.uint8), s)
    except ValueError as e:
        raise CheckpointError(f"tensor {t.name!r}: cannot convert from {src.value} to the platform's dialect: {e}") from None
    w.view(torch.uint8).copy_(nw)
    s.copy_(ns)
