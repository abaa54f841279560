"""Manifold-constrained hyper-connections (mHC, spec §2.2 and §2.9), all mixing math in float32.

hc_pre(X, fn, scale, base, rms_eps, hc_eps, iters) -> (u, post, comb)
    X: [T, n, D] residual streams; fn: [(2+n)n, nD]; scale: [3]; base: [(2+n)n].
    mu = (fn . flat(X)) * rsqrt(mean(flat(X)^2) + rms_eps)
    pre = sigmoid(mu[:n]*scale0 + base[:n]) + hc_eps; post = 2*sigmoid(mu[n:2n]*scale1 + base[n:2n])
    comb = Sinkhorn(softmax_rows(mu[2n:].view(n,n)*scale2 + base[2n:]) + hc_eps): column-normalise,
           then (iters-1) x (row, column) normalisations, eps in every denominator.
    u = sum_j pre_j X_j (float32, cast to X's dtype). u: [T, D]; post: [T, n]; comb: [T, n, n] float32.
hc_post(f, X, post, comb) -> X'[T, n, D]: X'_k = post_k f + sum_j comb[j, k] X_j, float32 then X's dtype.
hc_head(X, fn, scale, base, rms_eps, hc_eps) -> h[T, D]: pre-weights only (fn: [n, nD], scale: [1]).

hc_pre and hc_head take `norm=(weight, eps)` (default None): u / h then comes out through the RMSNorm that follows
it in the model (attn_norm, ffn_norm, the final norm), i.e. rms_norm(u, weight, eps) of u in X's dtype, so a provider
can do both in one pass. hc_pre with `quant=dialect` (with `norm` only) returns a fourth value, (q, s) = the
fp8_act_quant (block 128) of that output in `dialect`: what linear's `x_q` takes (q may have padding rows).
hc_pre with `prev=(f, post, comb)` (the previous sublayer's output and hc_pre outputs): X is the streams before that
sublayer's hc_post, which hc_pre applies first, X' = hc_post(f, X, post, comb); it returns X' first,
(X', u, post, comb[, (q, s)]), so a provider can form X' and mix it in one pass.
"""

import torch

from dsv4.ops.norm import rms_norm_reference
from dsv4.ops.quant import fp8_act_quant_reference
from dsv4.ops.registry import define_op


def _mix(X, fn, rms_eps):
    xf = X.flatten(1).float()
    rho = torch.rsqrt(xf.square().mean(-1, keepdim=True) + rms_eps)
    return (xf * rho) @ fn.float().t()


def hc_pre_reference(X, fn, scale, base, rms_eps: float, hc_eps: float, iters: int, norm=None, quant=None,
                     prev=None):
    if prev is not None:
        X = hc_post_reference(prev[0], X, prev[1], prev[2])
        return (X, *hc_pre_reference(X, fn, scale, base, rms_eps, hc_eps, iters, norm, quant))
    n = X.shape[1]
    mu = _mix(X, fn, rms_eps)
    scale, base = scale.float(), base.float()
    pre = torch.sigmoid(mu[:, :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mu[:, n:2 * n] * scale[1] + base[n:2 * n])
    logits = (mu[:, 2 * n:] * scale[2] + base[2 * n:]).view(-1, n, n)
    comb = torch.softmax(logits, dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    u = (pre.unsqueeze(-1) * X.float()).sum(dim=1).to(X.dtype)
    if norm is not None:
        u = rms_norm_reference(u, norm[0], norm[1])
    if quant is not None:
        if norm is None:
            raise ValueError("hc_pre: quant= needs norm= (the act_quant is of the normed output)")
        return u, post, comb, fp8_act_quant_reference(u, 128, quant)
    return u, post, comb


def hc_post_reference(f, X, post, comb):
    out = post.unsqueeze(-1) * f.float().unsqueeze(1) + torch.einsum("tjk,tjd->tkd", comb, X.float())
    return out.to(X.dtype)


def hc_head_reference(X, fn, scale, base, rms_eps: float, hc_eps: float, norm=None):
    mu = _mix(X, fn, rms_eps)
    pre = torch.sigmoid(mu * scale.float() + base.float()) + hc_eps
    h = (pre.unsqueeze(-1) * X.float()).sum(dim=1).to(X.dtype)
    return h if norm is None else rms_norm_reference(h, norm[0], norm[1])


hc_pre = define_op("hc_pre", hc_pre_reference)
hc_post = define_op("hc_post", hc_post_reference)
hc_head = define_op("hc_head", hc_head_reference)
