"""An SLA reference written from METHODS.md, independent of the package's SLA code.

Block classes by a per-(batch, head, query block) loop with Python's stable sort; the
output from dense token masks expanded from those classes: masked softmax attention
(the package's dense oracle, ``tests.utils.reference``) plus plain quadratic linear
attention over the marginal (or all) tokens.
"""

import math

import torch
import torch.nn.functional as F

from tests.utils import reference


def _per_batch_reference(q, k, v, crit, scale):
    """The dense oracle takes one [H, N, M] mask: run it per batch element."""
    outs = [reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], crit[b], scale) for b in range(q.shape[0])]
    return torch.cat([o for o, _ in outs]), torch.cat([lse for _, lse in outs])


def brute_force_classes(q, k, method):
    """Per (b, h, query block) loop: pooled scores, ranked with Python's sorted (stable)."""
    b_, h_, nq, _ = q.shape
    nk = k.shape[-2]
    bq, bk = method.block_q, method.block_k
    q, k = q.double(), k.double()
    ks = k - k.mean(dim=-2, keepdim=True)
    n_qb, n_kb = math.ceil(nq / bq), math.ceil(nk / bk)
    n_crit = max(1, math.ceil(round(method.topk * n_kb, 9)))
    n_neg = min(n_kb - n_crit, math.floor(round(method.negligible * n_kb, 9)))
    out = torch.zeros(b_, h_, n_qb, n_kb, dtype=torch.int8)
    for b in range(b_):
        for h in range(h_):
            kbs = [ks[b, h, j * bk:(j + 1) * bk].mean(0) for j in range(n_kb)]
            for i in range(n_qb):
                qb = q[b, h, i * bq:(i + 1) * bq].mean(0)
                sc = [float(qb @ kb) for kb in kbs]
                ranked = sorted(range(n_kb), key=lambda j: -sc[j])  # stable: lower index first on ties
                for j in ranked[:n_crit]:
                    out[b, h, i, j] = 1
                for j in ranked[n_kb - n_neg:]:
                    out[b, h, i, j] = 2
    return out


def reference_sla(q, k, v, classes, method, proj=None, scale=None, eps=1e-6):
    """fp32 dense reference of O = O_s + proj(O_l) given the block classes (1 crit, 0 marg, 2 negl)."""
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = scale if scale is not None else d ** -0.5
    q, k, v = q.float(), k.float(), v.float()
    tok = classes.long().repeat_interleave(method.block_q, -2)[..., :nq, :]
    tok = tok.repeat_interleave(method.block_k, -1)[..., :nk]
    crit, marg = tok == 1, tok == 0
    o_s, lse = _per_batch_reference(q, k, v, crit, scale)
    phi = {"softmax": lambda x: torch.softmax(x, -1), "elu": lambda x: F.elu(x) + 1,
           "relu": torch.relu}[method.feature_map]
    a = phi(q) @ phi(k).transpose(-1, -2)
    if method.linear_tokens == "marginal":
        a = a * marg
    o_l = (a @ v) / (a.sum(-1, keepdim=True) + eps)
    o_lp = proj(o_l) if proj is not None else torch.zeros_like(o_s)
    return o_s + o_lp, o_s, lse, o_lp


def make_qkv(b, h, n, d, dtype=torch.float32, nk=None, requires_grad=False):
    nk = n if nk is None else nk
    q = torch.randn(b, h, n, d, dtype=dtype)
    k = torch.randn(b, h, nk, d, dtype=dtype)
    v = torch.randn(b, h, nk, d, dtype=dtype)
    # Give keys some block structure so the ranking is not all ties.
    k = k + 0.5 * torch.randn(b, h, 1, d, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def make_proj(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    proj = torch.nn.Linear(d, d)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(d, d, generator=g) * 0.3)
        proj.bias.copy_(torch.randn(d, generator=g) * 0.1)
    return proj
