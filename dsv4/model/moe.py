"""MoE sub-layer (spec §2.8): sqrtsoftplus router (learned top-k with bias, or the hash table),
routed experts (FP4 in the release) with the SwiGLU clamp, one shared expert."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.config import HASH_MOE, ModelConfig
from dsv4.model.linear import Linear, LinearGroup, weight_dtype, weight_shapes
from dsv4.model.options import ModelOptions
from dsv4.ops.moe_dispatch import ExpertMap


class Gate(nn.Module):
    # the router weight is BF16 in a release and computed in fp32 (spec §2.8): held in bf16 once loaded when exactly
    # bf16-valued and the activations are bf16 (linear.compact_dense_weights); the router's bf16 products are exact
    compact = True

    def __init__(self, cfg: ModelConfig, is_hash: bool):
        super().__init__()
        E, D = cfg.n_routed_experts, cfg.hidden_size
        self.register_buffer("weight", torch.empty(E, D, dtype=torch.float32))
        if is_hash:
            self.register_buffer("tid2eid", torch.empty(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.int64))
            self.bias = None
        else:
            self.register_buffer("bias", torch.empty(E, dtype=torch.float32))
            self.tid2eid = None


class Experts(nn.Module):
    """The routed experts, stacked: w13 = [w1; w3] per expert ([E, 2I, D]), w2 ([E, D, I]).
    (The checkpoint stores `experts.E.w1/w2/w3` separately; the loader stacks them.) With an expert map
    that is not the identity, row i holds global expert expert_map.local_ids[i]."""

    def __init__(self, cfg: ModelConfig, opts: ModelOptions):
        super().__init__()
        fmt = cfg.expert_dtype or "dense"
        D, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.expert_map = opts.expert_map or ExpertMap.identity(cfg.n_routed_experts)
        if self.expert_map.num_global != cfg.n_routed_experts:
            raise ValueError(f"expert map covers {self.expert_map.num_global} experts, the config has "
                             f"n_routed_experts={cfg.n_routed_experts}")
        E = self.expert_map.num_local  # only the local experts' weights are held (rows in the map's order)
        self.fmt = fmt
        ws, ss = weight_shapes(2 * I, D, fmt)
        self.register_buffer("w13", torch.empty((E,) + ws, dtype=weight_dtype(fmt, opts)))
        self.register_buffer("w13_scale", torch.empty((E,) + ss, dtype=torch.uint8) if ss else None)
        ws, ss = weight_shapes(D, I, fmt)
        self.register_buffer("w2", torch.empty((E,) + ws, dtype=weight_dtype(fmt, opts)))
        self.register_buffer("w2_scale", torch.empty((E,) + ss, dtype=torch.uint8) if ss else None)


class SharedExpert(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: ModelOptions):
        super().__init__()
        fmt = "fp8" if cfg.quantization is not None else "dense"
        D, I = cfg.hidden_size, cfg.shared_intermediate_size
        self.w1 = Linear(D, I, fmt, opts)
        self.w2 = Linear(I, D, fmt, opts)
        self.w3 = Linear(D, I, fmt, opts)
        self.limit = cfg.swiglu_limit
        self._w13 = LinearGroup(self.w1, self.w3)  # one GEMM once fused: [w1(x) | w3(x)] without a cat
        self._swiglu = opts.ops.swiglu

    def forward(self, x: torch.Tensor, x_q=None) -> torch.Tensor:
        gu = self._w13.joined(x, x_q)  # in x's dtype
        if self.w2.act_quant and gu.dtype == x.dtype:  # h and its act_quant for w2 in one pass
            h, hq = self._swiglu(gu, self.limit, quant=self.w2.dialect)
            return self.w2(h, hq)
        h = self._swiglu(gu, self.limit)
        return self.w2(h if h.dtype == x.dtype else h.to(x.dtype))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp_type: str, opts: ModelOptions):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg, mlp_type == HASH_MOE)
        self.experts = Experts(cfg, opts)
        self.shared_experts = SharedExpert(cfg, opts) if cfg.n_shared_experts else None
        self.act_quant = opts.official
        self.dialect = opts.fp8_dialect
        self._route, self._experts = opts.ops.moe_route, opts.ops.moe_experts
        self.ep = opts.expert_parallel  # None: every routed expert is here

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, ep_tokens: int | None = None,
                x_q=None) -> torch.Tensor:
        """`ep_tokens`: expert parallelism's agreed step token count (ForwardMeta.ep_tokens); `x_q`: x's act_quant
        from its producer (for the shared expert's FP8 linear), or None."""
        c, g, e = self.cfg, self.gate, self.experts
        w, ids = self._route(x, g.weight, g.bias, g.tid2eid, input_ids, c.num_experts_per_tok, c.scoring_func,
                             c.norm_topk_prob, c.routed_scaling_factor)
        def local(xs, ids_, w_, shared=None):
            return self._experts(xs, e.w13, e.w13_scale, e.w2, e.w2_scale, ids_, w_, c.swiglu_limit, self.act_quant,
                                 self.dialect, e.expert_map, shared=shared)

        sh = self.shared_experts(x, x_q) if self.shared_experts is not None else None
        if self.ep is None and sh is not None and sh.dtype == x.dtype:
            return local(x, ids, w, sh)  # routed sum + shared expert, rounded to x's dtype, in the combine
        y = local(x, ids, w) if self.ep is None else self.ep.routed(x, ids, w, local, ep_tokens)
        if sh is not None:  # float32 + x's dtype: one promoting add (the values of .float())
            y = (y if y.dtype == torch.float32 else y.float()) + sh
        return y.to(x.dtype)
