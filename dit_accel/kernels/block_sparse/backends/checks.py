"""The vendor backends' self-check variants (:mod:`dit_accel.kernels.selfcheck`): ``block_sparse.fa4.fwd``,
``block_sparse.fa4.bwd``, ``block_sparse.cudnn.fwd``, ``block_sparse.cudnn.bwd``, ``block_sparse.natten.fwd``,
``block_sparse.natten.bwd``.

Each runs a small synthetic problem through the same path ``backend=<name>`` takes (:func:`.call`)
against the fp32 masked-dense oracle: on a GPU 2 x 40 heads (more query tiles than an H100 has SMs), ragged
lengths, per-head layouts where the backend takes them (FA4: full, partial and skipped blocks and a row that
sees no key; cuDNN: whole blocks only, an empty query block; NATTEN: one GNA window over a grid that pads its
last tile). ``applies`` is the backend's own reason (package, CUDA, architecture), so on a machine without
the package the variant is listed with that reason and never run.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...request import Request
from ...selfcheck import Result, Variant, register, relative_error

FWD_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-3}
BWD_TOL = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 5e-3}
_DEFAULT_SHAPE = {"head_dim": 128, "block_q": 64, "block_k": 64}


def _applies(name: str, backward: bool):
    def applies(device: torch.device) -> Optional[str]:
        from . import module

        return module(name).reason(Request(torch.device(device), torch.bfloat16, 128, needs_grad=backward))

    return applies


def _heads(device) -> int:
    return 40 if torch.device(device).type == "cuda" else 2


def _qkv(b, h, n, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))


def _fa4_problem(device, shape, seed):
    """Per-head element masks on whole-block structure, ragged, a row with no key."""
    from ...layout import BlockLayout

    bq, bk, h = shape["block_q"], shape["block_k"], _heads(device)
    n = 8 * bq + 37
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // bq)
    pick = torch.rand(h, nb, -(-n // bk), generator=g)
    blocks = lambda sel: sel.repeat_interleave(bq, 1).repeat_interleave(bk, 2)[:, :n, :n]  # noqa: E731
    mask = blocks(pick < 0.25) | (blocks(pick < 0.5) & (torch.rand(h, n, n, generator=g) < 0.4))
    mask[:, 5] = False
    layout = BlockLayout.from_dense_mask(mask, block_q=bq, block_k=bk)
    return n, mask, layout, f"{h} per-head layouts with partial and skipped blocks, N={n}, an empty row"


def _cudnn_problem(device, shape, seed):
    from ...layout import BlockLayout
    from .common import cuda_arch
    from .cudnn import block_size_for

    block = block_size_for(cuda_arch(torch.device(device))) if torch.device(device).type == "cuda" else 64
    h = _heads(device)
    n = 8 * block + 37 if block == 64 else 4 * block + 37
    g = torch.Generator().manual_seed(seed)
    visited = torch.rand(h, -(-n // block), -(-n // block), generator=g) < 0.4
    visited[:, 2] = False  # a query block that sees no key
    layout = BlockLayout.from_block_masks(visited, q_len=n, kv_len=n, block_q=block, block_k=block)
    text = f"{h} per-head block layouts ({block}-token blocks), N={n}, an empty block row"
    return n, layout.to_dense_mask(), layout, text


def _natten_problem(device, shape, seed):
    from ....patterns.gna import gna_layout
    from .natten import attach_gna

    grid, kernel, stride = (5, 12, 13), (3, 5, 5), (1, 2, 2)
    perm, layout = gna_layout(grid, kernel, stride, tile=(1, 8, 8), block_q=64, block_k=64)
    attach_gna(layout, perm, kernel, stride)
    text = f"GNA {kernel} stride {stride} on {grid} (padded tiles)"
    return perm.num_padded, layout.to_dense_mask(), layout, text, perm


def _problem(name, device, shape, seed):
    if name == "fa4":
        return _fa4_problem(device, shape, seed) + (None,)
    if name == "cudnn":
        return _cudnn_problem(device, shape, seed) + (None,)
    return _natten_problem(device, shape, seed)


def _check(name: str, backward: bool):
    def check(device, dtype, shape=None) -> Result:
        from ...reference import dense_attention_reference
        from . import LSE_GRAD_DROPPED, call

        device, shape = torch.device(device), dict(shape or _DEFAULT_SHAPE)
        n, mask, layout, text, perm = _problem(name, device, shape, seed=11 if backward else 10)
        layout = layout.to(device)
        if name == "natten":
            from .natten import attach_gna

            attach_gna(layout, perm, (3, 5, 5), (1, 2, 2))
        mask = mask.to(device)
        rows = slice(None) if perm is None else (perm.order >= 0).to(device)
        q, k, v = _qkv(2, mask.shape[0] if mask.shape[0] > 1 else _heads(device), n, shape["head_dim"], dtype,
                       device, seed=3)
        scale = shape["head_dim"] ** -0.5
        text = f"2x{q.shape[1]} heads, d={shape['head_dim']}, {str(dtype).replace('torch.', '')}: {text}"
        if not backward:
            with torch.no_grad():
                o, lse = call(name, q, k, v, layout, scale, return_lse=True)
            ref_o, ref_lse = dense_attention_reference(q, k, v, mask, scale)
            err = max(relative_error(o[:, :, rows], ref_o[:, :, rows]),
                      relative_error(lse[:, :, rows], ref_lse[:, :, rows]))
            return Result(err, FWD_TOL[dtype], text)
        do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(device)
        if perm is not None:
            do[:, :, ~rows] = 0  # padded query rows are dropped by the caller: no gradient flows from them

        def grads(fn):
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            return torch.autograd.grad((fn(*leaves).float() * do).sum(), leaves)

        got = grads(lambda a, b, c: call(name, a, b, c, layout, scale, return_lse=False)[0])
        want = grads(lambda a, b, c: dense_attention_reference(a, b, c, mask, scale)[0])
        err = max(relative_error(g, w) for g, w in zip(got, want))
        if name not in LSE_GRAD_DROPPED:
            # The backend takes calls whose lse needs a gradient (a plan's text merge): check that one too.
            got = grads(lambda a, b, c: _with_lse(*call(name, a, b, c, layout, scale, return_lse=True)))
            want = grads(lambda a, b, c: _with_lse(*dense_attention_reference(a, b, c, mask, scale)))
            err = max([err] + [relative_error(g, w) for g, w in zip(got, want)])
            text += ", and through the lse"
        return Result(err, BWD_TOL[dtype], text + ", dQ dK dV")

    return check


def _with_lse(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``o`` plus its row's lse (0 where a row sees no key), so a loss on it differentiates through the lse."""
    return o.float() + torch.where(torch.isfinite(lse), lse, 0.0).float()[..., None]


def _package_version(name: str):
    def version() -> str:
        from . import PACKAGES, versions

        return f"{PACKAGES[name]} {versions()[name] or 'not installed'}"

    return version


def _dtypes(name: str, backward: bool):
    def dtypes(device) -> tuple:
        if name == "cudnn" and backward:
            return (torch.bfloat16,)  # cuDNN's block-sparse backward takes bfloat16 only
        return (torch.bfloat16, torch.float16)

    return dtypes


for _name in ("fa4", "cudnn", "natten"):
    for _backward in (False, True):
        register(Variant(name=f"block_sparse.{_name}.{'bwd' if _backward else 'fwd'}", family="block_sparse",
                         backend=_name, applies=_applies(_name, _backward), check=_check(_name, _backward),
                         dtypes=_dtypes(_name, _backward), package_version=_package_version(_name)))
