"""The in-repo Triton kernels' variants and their self-check problems (registered with :mod:`.selfcheck`).

Each problem is built to reach what production reaches, small: on a GPU, 2 x 40 heads over ragged lengths, so
there are more work items than resident CTAs (the persistent and warp-specialized kernels walk several items
per CTA, reuse their K/V rings and rewrite their in-kernel descriptors); everywhere per-head layouts with full,
partial (element-masked), skipped and ragged tiles and a row that sees no key. The reference is the fp32
masked-dense oracle (:func:`dit_accel.kernels.reference.dense_attention_reference`) for block-sparse and dense
attention, and the PyTorch twin in fp32 for SLA (its classification checked on its own, against the twin's).
Under the Triton interpreter the problems shrink (2 x 2 heads), and the persistent grid has
:data:`~dit_accel.kernels.block_sparse.triton.INTERPRETER_PROGRAMS` programs, so items still outnumber them.
"""

from __future__ import annotations

from typing import Optional

import torch

from .selfcheck import Result, Variant, register, relative_error
from .selfcheck import _default_shapes as selfcheck_shapes

#: Forward error bound per dtype (relative, Frobenius), and the gradients', for kernels whose products are
#: exact for their inputs: half-precision inputs (exact in the fp32 accumulator) and fp32 inputs multiplied
#: in full fp32 ("ieee": SLA, and every kernel under the interpreter).
FWD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
BWD_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}

#: Unit roundoff of tf32, the precision the block-sparse and dense kernels multiply fp32 inputs in on a GPU
#: (their configurations' ``dot_precision``): 10 stored mantissa bits.
TF32_U = 2.0 ** -11
#: The error model for fp32 inputs under tf32 products. Rounding each operand to tf32 moves a product by at
#: most 2u (relative); the forward goes through two products (QK^T, then PV), and a logit moved by e moves
#: its softmax weight by about e relative, so a correct kernel stays within a few u of the fp32 reference:
#: bound 8u = 3.9e-3. The backward chains four products per gradient (dP = dO V^T, dS, then dQ = dS K and
#: dK = dS^T Q): bound 16u = 7.8e-3. Measured on an H100 (triton 3.6.0, 2026-11-25, the self-check's own
#: problems): forward 1.35e-3 (block-sparse, d 32 and 128), 1.50e-3 (dense), backward 2.03e-3.
TF32_FWD_TOL = 8 * TF32_U
TF32_BWD_TOL = 16 * TF32_U


def fp32_bounds_text() -> str:
    """What the fp32 self-checks compare and bound, in one sentence (``selftest``'s and ``info``'s status)."""
    return ("on GPUs the block-sparse and dense Triton kernels multiply fp32 inputs in tf32; their fp32 self-check "
            "compares the kernel's outputs with an fp32 reference computed from the same fp32 inputs (every "
            "product in full fp32) and bounds the relative error ||out - ref|| / ||ref|| (Frobenius, over the "
            f"whole tensor): forward, the larger of o's and the lse's, <= {TF32_FWD_TOL:.1e} (8 tf32 unit "
            f"roundoffs); backward, the largest of dQ's, dK's and dV's, <= {TF32_BWD_TOL:.1e} (16). SLA's kernels "
            f"multiply fp32 in full fp32: the same errors, bounded by {FWD_TOL[torch.float32]:g} and "
            f"{BWD_TOL[torch.float32]:g}")


def _tol(table: dict, device: torch.device, dtype: torch.dtype, tf32_products: bool) -> float:
    """The bound for a kernel on ``device``: the tf32 model's where fp32 inputs are multiplied in tf32 (on a
    GPU; the interpreter multiplies in fp32), else ``table``'s exact-product bound."""
    if tf32_products and dtype == torch.float32 and device.type == "cuda":
        return TF32_FWD_TOL if table is FWD_TOL else TF32_BWD_TOL
    return table[dtype]


def _gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def _triton_applies(device: torch.device) -> Optional[str]:
    from .backends import triton_reason

    return triton_reason(device)  # (backends asks selfcheck, never this module: no import circle)


def _sm90_applies(device: torch.device) -> Optional[str]:
    reason = _triton_applies(device)
    if reason is not None:
        return reason
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "the warp-specialized forward is built for sm_90 (H100 / H200) only"
    from .block_sparse.configs import WS_OFF_REASON, ws_enabled

    return None if ws_enabled() else WS_OFF_REASON


def _lengths_applies(device: torch.device) -> Optional[str]:
    from .block_sparse.configs import LENGTHS_OFF_REASON, lengths_enabled

    return _triton_applies(device) or (None if lengths_enabled() else LENGTHS_OFF_REASON)


def _qkv(b, h, n, m, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, x, d, generator=g) for x in (n, m, m))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _mask(h, n, m, block, seed, *, full=0.5):
    """``[h, n, m]`` bool: per block row a random set of whole blocks (``full`` of them dense, the rest with
    random elements), a band so every row sees keys, and row 5 with none."""
    g = torch.Generator().manual_seed(seed)
    nb, mb = -(-n // block), -(-m // block)
    pick = torch.rand(h, nb, mb, generator=g)
    dense = (pick < full * 0.5).repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :m]
    some = (pick < 0.5).repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :m]
    mask = dense | (some & (torch.rand(h, n, m, generator=g) < 0.4))
    i = torch.arange(n)[:, None] * (m / n)
    mask |= ((i - torch.arange(m)[None, :]).abs() <= 3)[None]
    mask[:, 5] = False
    return mask


def _sizes(device, shape, rows_per_block=8, heads=40):
    bq, bk = shape["block_q"], shape["block_k"]
    if _gpu(device):
        return 2, heads, rows_per_block * bq + 37, (rows_per_block - 2) * bk + 11
    return 2, 2, 2 * bq + 37, 2 * bk + 11


def _block_sparse_problem(device, dtype, shape, seed=0, full=0.5):
    from .layout import BlockLayout

    b, h, n, m = _sizes(device, shape)
    mask = _mask(h, n, m, min(shape["block_q"], shape["block_k"]), seed, full=full)
    layout = BlockLayout.from_dense_mask(mask.to(device), block_q=shape["block_q"], block_k=shape["block_k"])
    q, k, v = _qkv(b, h, n, m, shape["head_dim"], dtype, device, seed)
    text = (f"{b}x{h} heads, N={n}, M={m}, d={shape['head_dim']}, {shape['block_q']}x{shape['block_k']} "
            f"blocks, {str(dtype).replace('torch.', '')}, per-head partial and ragged tiles, an empty row")
    return q, k, v, mask.to(device), layout, text


def _fwd_errors(o, lse, ref_o, ref_lse):
    return max(relative_error(o, ref_o), relative_error(lse, ref_lse))


def _check_block_sparse_fwd(device, dtype, shape) -> Result:
    from .block_sparse.triton import triton_forward
    from .reference import dense_attention_reference

    q, k, v, mask, layout, text = _block_sparse_problem(device, dtype, shape)
    scale = shape["head_dim"] ** -0.5
    o, lse = triton_forward(q, k, v, layout, scale)
    ref_o, ref_lse = dense_attention_reference(q, k, v, mask, scale)
    return Result(_fwd_errors(o, lse, ref_o, ref_lse), _tol(FWD_TOL, q.device, dtype, True), text)


def _check_block_sparse_ws(device, dtype, shape) -> Result:
    """The warp-specialized forward and its resume pass, reached through the launcher with the cost
    model's choice forced (mostly full tiles, a few partial ones)."""
    from .block_sparse import triton as bst
    from .reference import dense_attention_reference

    q, k, v, mask, layout, text = _block_sparse_problem(device, dtype, shape, seed=1, full=1.6)
    scale = shape["head_dim"] ** -0.5
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    cfg = bst._config("fwd", q, layout, (k, v))
    if not cfg.tma or not bst._ws_forward(q, k, v, o, lse, layout, cfg, scale, force=True):
        return Result(float("inf"), FWD_TOL[dtype], text + ": the ws forward was not reached (no ws configuration)")
    ref_o, ref_lse = dense_attention_reference(q, k, v, mask, scale)
    return Result(_fwd_errors(o, lse, ref_o, ref_lse), FWD_TOL[dtype], text + ", ws + resume")


def _gather_problem(device, dtype, shape):
    """Raster q, k, v, a tiled order with padding in every dimension, per-head random tiles over it with no padded
    key visited, the row table, the mask carried back to raster order, and the problem's text."""
    from ..patterns.permutation import TilePermutation
    from .layout import BlockLayout

    b, h, grid = (2, 40, (5, 15, 30)) if _gpu(device) else (1, 2, (3, 5, 7))
    perm = TilePermutation(grid, (2, 4, 8))
    mask = _mask(h, perm.num_padded, perm.num_padded, min(shape["block_q"], shape["block_k"]), 4)
    mask[:, :, perm.order < 0] = False  # (a query never sees a padded key)
    layout = BlockLayout.from_dense_mask(mask.to(device), block_q=shape["block_q"], block_k=shape["block_k"])
    q, k, v = _qkv(b, h, perm.num_tokens, perm.num_tokens, shape["head_dim"], dtype, device, 4)
    raster = perm.inverse  # the tiled position of each raster token
    text = (f"{b}x{h} heads, grid {grid} in (2, 4, 8) tiles ({perm.num_tokens} tokens, {perm.num_padded} tiled "
            f"positions), d={shape['head_dim']}, {shape['block_q']}x{shape['block_k']} blocks, "
            f"{str(dtype).replace('torch.', '')}, raster order in and out")
    return q, k, v, layout, perm.row_table(device), mask[:, raster][:, :, raster].to(device), text


def _check_block_sparse_gather(device, dtype, shape) -> Result:
    """The forward on raster-order tensors through a row table (:mod:`.block_sparse.gather`) on
    :func:`_gather_problem`, against the fp32 reference on the raster tokens."""
    from .block_sparse.triton import triton_forward
    from .reference import dense_attention_reference

    q, k, v, layout, rows, mask, text = _gather_problem(device, dtype, shape)
    scale = shape["head_dim"] ** -0.5
    o, lse = triton_forward(q, k, v, layout, scale, rows=rows)
    ref_o, ref_lse = dense_attention_reference(q, k, v, mask, scale)
    return Result(_fwd_errors(o, lse, ref_o, ref_lse), _tol(FWD_TOL, q.device, dtype, True), text)


def _check_block_sparse_gather_bwd(device, dtype, shape) -> Result:
    """The two-pass backward reading and writing raster order through the row table, on :func:`_gather_problem`
    (the gathered forward's o and lse), against the fp32 reference's gradients."""
    from .block_sparse.triton import triton_backward, triton_forward
    from .reference import dense_attention_reference

    q, k, v, layout, rows, mask, text = _gather_problem(device, dtype, shape)
    scale = shape["head_dim"] ** -0.5
    o, lse = triton_forward(q, k, v, layout, scale, rows=rows)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(device)
    got = triton_backward(do.to(dtype), q, k, v, o, lse, layout, scale, rows=rows)
    want = _grads(lambda a, b, c: dense_attention_reference(a, b, c, mask, scale)[0], q, k, v, do)
    return Result(_grad_error(got, want), _tol(BWD_TOL, q.device, dtype, True), text + ", dQ dK dV")


def prefix_layout(h, n, m, block_q, block_k, seed, device="cpu"):
    """A per-head layout over ``n`` x ``m`` tokens whose visited blocks are full, column-prefix (the first ``c``
    keys of every row: 1, 5, half a block plus 3, a block less 1) or element-masked, the last key block ragged."""
    from .layout import BlockLayout

    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-n // block_q), -(-m // block_k)
    visited = torch.rand(h, nq, nk, generator=g) < 0.6
    visited[..., 0] = True
    cols = torch.arange(block_k)
    table = [cols[None, :].expand(block_q, block_k) < c for c in (1, 5, block_k // 2 + 3, block_k - 1)]
    table.append(torch.rand(block_q, block_k, generator=g) < 0.5)
    ids = torch.randint(-1, len(table), (h, nq, nk), generator=g)
    return BlockLayout.from_block_masks(visited.to(device), q_len=n, kv_len=m, block_q=block_q, block_k=block_k,
                                        mask_ids=ids.to(device), mask_table=torch.stack(table).to(device))


def _check_block_sparse_len(device, dtype, shape) -> Result:
    """The forward with column-prefix tiles run by their length, forced, on :func:`prefix_layout`."""
    from .block_sparse.triton import triton_forward
    from .reference import dense_attention_reference

    b, h, n, m = _sizes(device, shape)
    layout = prefix_layout(h, n, m, shape["block_q"], shape["block_k"], seed=3, device=device)
    q, k, v = _qkv(b, h, n, m, shape["head_dim"], dtype, device, 3)
    scale = shape["head_dim"] ** -0.5
    o, lse = triton_forward(q, k, v, layout, scale, lengths=True)
    ref_o, ref_lse = dense_attention_reference(q, k, v, layout.to_dense_mask(), scale)
    text = (f"{b}x{h} heads, N={n}, M={m}, d={shape['head_dim']}, {shape['block_q']}x{shape['block_k']} blocks, "
            f"{str(dtype).replace('torch.', '')}, full, column-prefix, element-masked and ragged tiles")
    return Result(_fwd_errors(o, lse, ref_o, ref_lse), _tol(FWD_TOL, q.device, dtype, True), text)


def _grads(fn, q, k, v, do):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    return torch.autograd.grad((out.float() * do).sum(), leaves)


def _grad_error(got, want) -> float:
    return max(relative_error(g, w) for g, w in zip(got, want))


def _check_block_sparse_bwd(device, dtype, shape, one_pass: bool = False) -> Result:
    """The two-pass backward, or (``one_pass``) the one-pass one (:mod:`.block_sparse.bwd_fused`), forced."""
    from .block_sparse.triton import triton_backward, triton_forward
    from .reference import dense_attention_reference

    q, k, v, mask, layout, text = _block_sparse_problem(device, dtype, shape, seed=2)
    scale = shape["head_dim"] ** -0.5
    o, lse = triton_forward(q, k, v, layout, scale)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3)).to(device)
    got = triton_backward(do.to(dtype), q, k, v, o, lse, layout, scale, one_pass=one_pass)
    want = _grads(lambda a, b, c: dense_attention_reference(a, b, c, mask, scale)[0], q, k, v, do)
    text += ", dQ dK dV" + (" (one pass, dQ by atomic adds)" if one_pass else "")
    return Result(_grad_error(got, want), _tol(BWD_TOL, q.device, dtype, True), text)


def _fused_applies(device: torch.device) -> Optional[str]:
    reason = _triton_applies(device)
    if reason is not None:
        return reason
    if device.type != "cuda":
        return "the one-pass backward runs unasked on GPUs only (the interpreter tests check it on the CPU)"
    from .block_sparse.configs import fused_config

    major, minor = torch.cuda.get_device_capability(device)
    if fused_config(torch.float16, 64, 128, 128, major * 10 + minor) is None:
        return f"no one-pass backward ships for sm_{major}{minor} (sm_80 and sm_90 only): the two-pass one runs"
    return None


def _fused_shapes(device):
    """The production shapes the one-pass backward has a configuration for on this GPU."""
    from .block_sparse.configs import fused_config

    major, minor = torch.cuda.get_device_capability(device)
    return tuple(s for s in selfcheck_shapes(device)
                 if fused_config(torch.float16, s["head_dim"], s["block_q"], s["block_k"], major * 10 + minor))


def _check_dense(device, dtype, shape, backward: bool) -> Result:
    from .dense.triton import dense_backward, dense_forward
    from .reference import dense_attention_reference

    b, h, n, m = _sizes(device, shape, heads=12)
    q, k, v = _qkv(b, h, n, m, shape["head_dim"], dtype, device, 4)
    scale = shape["head_dim"] ** -0.5
    text = f"{b}x{h} heads, N={n}, M={m}, d={shape['head_dim']}, {str(dtype).replace('torch.', '')}"
    o, lse = dense_forward(q, k, v, scale)
    if not backward:
        ref_o, ref_lse = dense_attention_reference(q, k, v, None, scale)
        return Result(_fwd_errors(o, lse, ref_o, ref_lse), _tol(FWD_TOL, q.device, dtype, True), text)
    gen = torch.Generator().manual_seed(5)
    do, dlse = torch.randn(o.shape, generator=gen).to(device), torch.randn(lse.shape, generator=gen).to(device)
    # (with an upstream lse gradient, as dense_attention(..., return_lse=True) merged with other keys trains)
    got = dense_backward(do.to(dtype), q, k, v, o, lse, scale, dlse)
    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref_o, ref_lse = dense_attention_reference(*leaves, None, scale)
    want = torch.autograd.grad((ref_o * do).sum() + (ref_lse * dlse).sum(), leaves)
    return Result(_grad_error(got, want), _tol(BWD_TOL, q.device, dtype, True), text + ", dQ dK dV (o and lse used)")


# ----------------------------------------------------------------------------- SLA
def _sla_problem(device, dtype, shape, seed=6):
    from .sla.common import SLAParams

    b, h, n, m = _sizes(device, shape, heads=12)
    q, k, v = _qkv(b, h, n, m, shape["head_dim"], dtype, device, seed)
    params = SLAParams(topk=0.25, negligible=0.25, block_q=shape["block_q"], block_k=64)
    proj = torch.nn.Linear(shape["head_dim"], shape["head_dim"])
    torch.nn.init.normal_(proj.weight, std=0.2, generator=torch.Generator().manual_seed(seed))
    proj = proj.to(device=device, dtype=dtype)
    text = (f"{b}x{h} heads, N={n}, M={m}, d={shape['head_dim']}, {shape['block_q']}-row blocks, "
            f"{str(dtype).replace('torch.', '')}, critical, marginal (projected) and negligible blocks")
    return q, k, v, params, proj, text


def _sla_out(q, k, v, params, proj, blocks, backend, linear: bool = True):
    """SLA's output on ``backend``; ``linear`` False: without the linear branch (what a still-zero projection
    runs: :func:`.sla.api.inert_projections`)."""
    from .sla.common import sla_block_counts
    from .sla.naive import sla_torch
    from .sla.ops import sla_triton_attention

    scale = q.shape[-1] ** -0.5
    with_linear = linear and sla_block_counts(k.shape[-2], params)[3] > 0
    if backend == "triton":
        o_s, _, o_l = sla_triton_attention(q, k, v, blocks, params, scale, with_linear)
    else:
        o_s, _, o_l = sla_torch(q.float(), k.float(), v.float(), blocks, params, scale, with_linear)
    if o_l is None:
        return o_s.float()
    return o_s.float() + torch.nn.functional.linear(o_l.float(), proj.weight.float(), proj.bias.float())


def _check_sla(device, dtype, shape, backward: bool, glue: bool = False) -> Result:
    """The fused forward, or its backward (``glue``: with the glue kernels, :mod:`.sla.glue`, under both linear
    plans: marginal blocks added, and global sums less the critical blocks; else without them)."""
    import dataclasses

    from .sla import glue as sla_glue
    from .sla.ops import sla_triton_classify

    q, k, v, params, proj, text = _sla_problem(device, dtype, shape)
    blocks = sla_triton_classify(q, k, params)  # its own check is the classify variant's
    # Both kernels the variant runs: with the linear branch, and without it (a still-zero projection).
    text += "; with and without the linear branch"
    if not backward:
        def error(linear: bool) -> float:
            with torch.no_grad():
                got = _sla_out(q, k, v, params, proj, blocks, "triton", linear)
                want = _sla_out(q, k, v, params, proj, blocks, "torch", linear)
            return relative_error(got, want)

        return Result(max(error(True), error(False)), FWD_TOL[dtype], text)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(device)
    problems = [(params, blocks, True), (params, blocks, False)]
    if glue:  # (at top-k 0.4, fewer marginal than critical blocks: the linear branch sums the marginal ones)
        direct = dataclasses.replace(params, topk=0.4)
        problems = [problems[0], (direct, sla_triton_classify(q, k, direct), True)]
        text = text.replace("with and without the linear branch", "the linear branch as global sums less the "
                            "critical and negligible blocks, and as the marginal blocks (top-k 0.4)")

    def grad_error(p, b, linear: bool) -> float:
        with sla_glue.forced(glue):
            got = _grads(lambda x, y, z: _sla_out(x, y, z, p, proj, b, "triton", linear), q, k, v, do)
        want = _grads(lambda x, y, z: _sla_out(x.float(), y.float(), z.float(), p, proj, b, "torch", linear),
                      q, k, v, do)
        return _grad_error(got, want)

    return Result(max(grad_error(*problem) for problem in problems), BWD_TOL[dtype], text + ", dQ dK dV")


#: Classification: the fraction of (query block, key block) classes that may differ from the twin's (pooled
#: scores are fp32 dots in another order, so a near-tie may fall either way; a wrong selection moves many).
CLASSIFY_TOL = 0.01


def _check_sla_classify(device, dtype, shape) -> Result:
    from .sla.common import SLAParams, sla_classify
    from .sla.ops import sla_triton_classify

    q, k, _, params, _, text = _sla_problem(device, dtype, shape, seed=8)
    problems = [(q, k, params, text)]
    if _gpu(device):  # Wan 720p's row length: 1,182 key blocks
        n = 1182 * 64 - 13
        q2, k2, _ = _qkv(1, 2, n, n, shape["head_dim"], dtype, device, 9)
        problems.append((q2, k2, SLAParams(topk=0.05, negligible=0.1, block_q=shape["block_q"], block_k=64),
                         f"1x2 heads, N={n} (1,182 key blocks)"))
    worst = 0.0
    for q_, k_, p_, _ in problems:
        got, want = sla_triton_classify(q_, k_, p_).classes, sla_classify(q_, k_, p_).classes
        worst = max(worst, float((got != want).float().mean()))
    return Result(worst, CLASSIFY_TOL, "; ".join(t for *_, t in problems),
                  measure="fraction of (query block, key block) classes that differ from the fp32 twin's")


def _sla_shapes(device):
    if device.type == "cuda":
        return tuple({"head_dim": d, "block_q": b, "block_k": 64} for d in (64, 128) for b in (64, 128))
    return ({"head_dim": 64, "block_q": 64, "block_k": 64},)


def _ws_shapes(device):
    """The shapes the ws forward has a configuration for (:data:`.block_sparse.configs.WS_TUNED`): 128-row
    query blocks at the head dims of its tuned tiles."""
    from .block_sparse.configs import WS_TUNED

    return tuple({"head_dim": bd, "block_q": 128, "block_k": bk} for (_, _, bd), (bm, bn, _, _) in WS_TUNED.items()
                 for bk in (64, 128) if bn <= bk)


def _half(device):
    return (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float16,)


for _v in (
    Variant("block_sparse.triton.fwd", "block_sparse", "triton", _triton_applies, _check_block_sparse_fwd),
    Variant("block_sparse.triton.fwd_ws", "block_sparse", "triton", _sm90_applies, _check_block_sparse_ws,
            dtypes=_half, shapes=_ws_shapes),
    Variant("block_sparse.triton.fwd_len", "block_sparse", "triton", _lengths_applies, _check_block_sparse_len),
    Variant("block_sparse.triton.fwd_gather", "block_sparse", "triton", _triton_applies, _check_block_sparse_gather,
            dtypes=_half),  # (what pipelines run; an fp32 call checks its dtype on first use)
    Variant("block_sparse.triton.bwd", "block_sparse", "triton", _triton_applies, _check_block_sparse_bwd),
    Variant("block_sparse.triton.bwd_gather", "block_sparse", "triton", _triton_applies,
            _check_block_sparse_gather_bwd, dtypes=_half),  # (raster-order training calls)
    Variant("block_sparse.triton.bwd_dkdv_dq", "block_sparse", "triton", _fused_applies,
            lambda device, dtype, shape: _check_block_sparse_bwd(device, dtype, shape, one_pass=True), dtypes=_half,
            shapes=_fused_shapes),
    Variant("dense.triton.fwd", "dense", "triton", _triton_applies,
            lambda device, dtype, shape: _check_dense(device, dtype, shape, False)),
    Variant("dense.triton.bwd", "dense", "triton", _triton_applies,
            lambda device, dtype, shape: _check_dense(device, dtype, shape, True)),
    Variant("sla.triton.classify", "sla", "triton", _triton_applies, _check_sla_classify, shapes=_sla_shapes),
    Variant("sla.triton.fwd", "sla", "triton", _triton_applies,
            lambda device, dtype, shape: _check_sla(device, dtype, shape, False), shapes=_sla_shapes),
    Variant("sla.triton.bwd", "sla", "triton", _triton_applies,
            lambda device, dtype, shape: _check_sla(device, dtype, shape, True), shapes=_sla_shapes),
    Variant("sla.triton.bwd_glue", "sla", "triton", _triton_applies,
            lambda device, dtype, shape: _check_sla(device, dtype, shape, True, glue=True), dtypes=_half,
            shapes=lambda device: tuple(s for s in _sla_shapes(device) if s["block_q"] == 64)),  # (any block)
):
    register(_v)
