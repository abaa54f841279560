"""Mixture of experts (spec §2.8).

moe_route(x, gate_weight, bias, tid2eid, input_ids, top_k, score_func, norm_topk_prob, scaling)
    -> (weights [T, k] float32, ids [T, k] int64)
    scores s = score_func(x W_g^T) in float32 (sqrtsoftplus: sqrt(softplus(.)); sigmoid; softmax).
    Selection: the hash table tid2eid[input_ids] when given (hash layers), else top-k of s + bias
    (bias only steers the choice). Weights: the selected unbiased scores, normalised over the k chosen
    when norm_topk_prob, times `scaling`.

moe_experts(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit, act_quant, dialect, expert_map)
    -> [T, D] float32: sum over the k selected experts e of
       w2_e( (weights[t, e] * silu(min(g, L)) * clamp(u, -L, L)) cast to x's dtype ),
    where (g, u) = x w13_e^T split in halves (w1 = gate first, w3 = up second), computed through
    `linear` in x's dtype and upcast to float32. Routing weight before w2, as the official code does.
    w13: [E, 2I, D] (dense or FP8) or [E, 2I, D/2] packed FP4; w2: [E, D, I] or [E, D, I/2];
    scales as for `linear`, per expert. `ids` are GLOBAL expert ids; `expert_map`
    (dsv4/ops/moe_dispatch.ExpertMap, default: identity over w13's E experts) says which are local and at
    which index of w13 / w2. Remote experts contribute zero on this rank (the other ranks add theirs).
    Expert ids outside 0..num_global-1 are an error.
    `shared` ([T, D], default None): the shared expert's output; the result is then
    (routed sum in float32 + shared in float32) rounded to shared's dtype, the MoE layer's output (one pass for the
    sum, the add and the cast).

swiglu(gu, limit, quant=None) -> [T, I] in gu's dtype: silu(min(g, L)) * clamp(u, -L, L) in float32 for
    gu = [g | u], rounded once to gu's dtype (the shared expert's activation, what its w2 reads). With
    `quant=dialect` (gu [T, 2I]): (h, (q, s)), (q, s) the fp8_act_quant (block 128) of h in that dialect, what
    linear's `x_q` takes (q may have padding rows).
"""

import torch
import torch.nn.functional as F

from dsv4.numerics.fp8 import Fp8Dialect
from dsv4.ops.linear import linear_reference
from dsv4.ops.quant import fp8_act_quant_reference
from dsv4.ops.registry import define_op


def expert_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if score_func == "sigmoid":
        return logits.sigmoid()
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    raise ValueError(f"unknown scoring_func {score_func!r}")


def moe_route_reference(x, gate_weight, bias, tid2eid, input_ids, top_k: int, score_func: str,
                        norm_topk_prob: bool, scaling: float):
    scores = expert_scores(x.float() @ gate_weight.float().t(), score_func)
    if tid2eid is not None:
        ids = tid2eid[input_ids].long()
    else:
        sel = scores if bias is None else scores + bias.float()
        ids = sel.topk(top_k, dim=-1).indices
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w * scaling, ids


def swiglu(gu: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(g, L)) * clamp(u, -L, L) for gu = [g | u] (float32)."""
    g, u = gu.float().chunk(2, dim=-1)
    return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)


def moe_experts_reference(x, w13, w13_scale, w2, w2_scale, ids, weights, swiglu_limit: float,
                          act_quant: bool = False, dialect=Fp8Dialect.OCP, expert_map=None, shared=None):
    from dsv4.ops.moe_dispatch import ExpertMap, check_expert_ids

    emap = ExpertMap.identity(w13.shape[0]) if expert_map is None else expert_map
    if emap.num_local != w13.shape[0] or emap.num_local != w2.shape[0]:
        raise ValueError(f"moe_experts: expert map has {emap.num_local} local experts, weights hold "
                         f"{w13.shape[0]} / {w2.shape[0]}")
    check_expert_ids(ids, emap.num_global)
    local = {g: i for i, g in enumerate(emap.local_ids)}
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for g in torch.unique(ids).tolist():
        e = local.get(g)
        if e is None:  # remote expert: another rank adds its contribution
            continue
        tok, k = torch.where(ids == g)
        s13 = None if w13_scale is None else w13_scale[e]
        s2 = None if w2_scale is None else w2_scale[e]
        h = swiglu(linear_reference(x[tok], w13[e], s13, act_quant, dialect), swiglu_limit)
        h = (h * weights[tok, k].float().unsqueeze(-1)).to(x.dtype)
        out.index_add_(0, tok, linear_reference(h, w2[e], s2, act_quant, dialect).float())
    return with_shared(out, shared)


def with_shared(routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """The MoE output from the routed experts' float32 sum and the shared expert's output (moe_experts' `shared`)."""
    return routed if shared is None else (routed + shared.float()).to(shared.dtype)


def swiglu_reference(gu: torch.Tensor, limit: float, quant=None):
    h = swiglu(gu, limit).to(gu.dtype)
    return h if quant is None else (h, fp8_act_quant_reference(h, 128, quant))


swiglu_op = define_op("swiglu", swiglu_reference)
moe_route = define_op("moe_route", moe_route_reference)
moe_experts = define_op("moe_experts", moe_experts_reference)
