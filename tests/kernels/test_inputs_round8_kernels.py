"""Kernel entry points' inputs, round 8: each test pins one fault found by calling ``block_sparse_attention``,
``sla_attention``, ``vsa_attention``, ``dense_attention`` and the layouts they take with odd but plausible values
(a silent wrong answer, a raw traceback from deep inside torch or triton, or a misleading error, before the fix).
Numbers are checked against an fp64 brute force written here, in fp32 (the interpreter's bf16 dot is wrong)."""

import numpy as np
import pytest
import torch

from dit_accel.kernels import BlockLayout, SLAParams, block_sparse_attention, sla_attention, sla_density
from dit_accel.kernels.backends import BackendUnavailable
from dit_accel.kernels.dense import dense_attention
from dit_accel.kernels.vsa import vsa_attention

N, D, BLOCK = 64, 16, 16  # four 16-token blocks each way


def _qkv(b=1, h=2, n=N, d=D, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g).to(device) for _ in range(3)]


def _brute(q, k, v, mask):
    """softmax(q k^T / sqrt(D)) v over ``mask`` ([N, M] or [H, N, M]) in fp64; empty rows give 0."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def _block_mask(visited: torch.Tensor) -> torch.Tensor:
    """The token mask of a block visit matrix [nQ, nK] of BLOCK-sized blocks."""
    return visited.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)


def _two_keys_per_row():
    """A layout where every query block visits key blocks 0 and 1, and its visit matrix."""
    visited = torch.zeros(N // BLOCK, N // BLOCK, dtype=torch.bool)
    visited[:, :2] = True
    return BlockLayout.from_block_masks(visited, q_len=N, kv_len=N, block_q=BLOCK, block_k=BLOCK), visited


def _raw(layout: BlockLayout, **fields) -> BlockLayout:
    """``layout`` rebuilt through the plain constructor with some tensors replaced (as a user may build one)."""
    tensors = {name: getattr(layout, name) for name in BlockLayout.TENSORS}
    sizes = {name: fields.pop(name, getattr(layout, name)) for name in ("q_len", "kv_len", "block_q", "block_k")}
    tensors.update(fields)
    return BlockLayout(**sizes, **tensors)


# ------------------------------------------------------------ layouts built with the plain constructor
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_key_block_listed_twice_is_refused_not_counted_twice(backend):
    """Before: ``kv_indices`` [0, 0, 1] with count 3 ran; block 0 took its softmax mass twice (error 0.3 against
    the pattern on the PyTorch twin and the Triton kernel alike, forward and backward)."""
    q, k, v = _qkv()
    good, visited = _two_keys_per_row()
    expected = _brute(q, k, v, _block_mask(visited))
    torch.testing.assert_close(block_sparse_attention(q, k, v, good, backend=backend), expected.float())
    rows = good.num_q_blocks
    twice = _raw(good, kv_counts=torch.full((1, rows), 3, dtype=torch.int32),
                 kv_indices=torch.tensor([[[0, 0, 1]] * rows], dtype=torch.int32),
                 kv_mask_ids=torch.full((1, rows, 3), -1, dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_indices must list each block once, in increasing order"):
        block_sparse_attention(q, k, v, twice, backend=backend)


def _faulty(fault: str) -> BlockLayout:
    good, _ = _two_keys_per_row()
    rows = good.num_q_blocks
    if fault == "index-past-the-last-block":
        return _raw(good, kv_indices=torch.tensor([[[0, 7]] * rows], dtype=torch.int32))
    if fault == "count-past-the-list":
        return _raw(good, kv_counts=torch.full((1, rows), 3, dtype=torch.int32))
    if fault == "mask-table-of-another-block-size":
        ids = good.kv_mask_ids.clone()
        ids[..., 0] = 0
        return _raw(good, kv_mask_ids=ids, mask_table=torch.ones(1, 8, 8, dtype=torch.bool))
    if fault == "int64-lists":
        return _raw(good, **{name: getattr(good, name).long() for name in BlockLayout.TENSORS[:6]})
    ids = torch.full((rows, N // BLOCK), -1, dtype=torch.int32)
    visited = torch.ones(rows, N // BLOCK, dtype=torch.bool)
    if fault == "mask-id-past-the-table":
        ids[0, 0] = 5
        return BlockLayout.from_block_masks(visited, q_len=N, kv_len=N, block_q=BLOCK, block_k=BLOCK, mask_ids=ids,
                                            mask_table=torch.rand(2, BLOCK, BLOCK) < 0.5)
    ids[0, 0] = 0
    assert fault == "mask-ids-without-a-table"
    return BlockLayout.from_block_masks(visited, q_len=N, kv_len=N, block_q=BLOCK, block_k=BLOCK, mask_ids=ids)


@pytest.mark.parametrize("fault, backend, match", [
    # Triton read past the key blocks (or past each mask row) and returned an output; the twin and flex raised
    # torch's IndexError / "Sizes of tensors must match" from inside.
    ("index-past-the-last-block", "triton", r"kv_indices must lie in \[0, 4\); got 7"),
    ("count-past-the-list", "triton", r"kv_counts must lie in \[0, 2\]"),
    ("mask-table-of-another-block-size", "triton", r"mask_table has shape \(1, 8, 8\); expected \[P, 16, 16\]"),
    # IndexError from inside the twin; the Triton path raised one too, naming an index that is in no argument.
    ("mask-id-past-the-table", "torch", "kv_mask_ids must be -1 .* mask_table, which has 2; got 5 in slot 0"),
    # The partial block's mask id 0 named no mask: it ran as a full block, on every backend.
    ("mask-ids-without-a-table", "torch", "kv_mask_ids must be -1 .* which has 0; got 0"),
    # FlexAttention raised "Index put requires the source and destination dtypes match" (the others ran).
    ("int64-lists", "flex", "kv_counts must be a torch.int32 tensor; got a torch.int64 tensor"),
], ids=["index-past-the-last-block", "count-past-the-list", "table-of-another-block-size", "mask-id-past-the-table",
        "mask-ids-without-a-table", "int64-lists"])
def test_a_layout_the_kernels_would_misread_is_refused(fault, backend, match):
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError), match=match) as err:
        block_sparse_attention(q, k, v, _faulty(fault), backend=backend)
    assert "from_block_masks" in str(err.value)  # (says how to build a right one)


def test_a_transposed_side_that_disagrees_is_refused_for_a_training_call():
    """Before: a layout whose ``q_*`` lists (the transposed side the dK/dV backward reads) were empty while the
    rows listed blocks ran; the Triton backward returned dK off by 3.3, without an error. A forward-only call,
    which reads the rows alone, still runs and is right."""
    q, k, v = _qkv()
    good, visited = _two_keys_per_row()
    bad = _raw(good, q_counts=torch.zeros_like(good.q_counts))
    torch.testing.assert_close(block_sparse_attention(q, k, v, bad, backend="triton"),
                               _brute(q, k, v, _block_mask(visited)).float())
    with pytest.raises(ValueError, match="transposed side the backward reads"):
        block_sparse_attention(q, k.requires_grad_(), v, bad, backend="triton")


@pytest.mark.parametrize("q_len", [0, 64.0, True], ids=["zero", "float", "bool"])
def test_from_block_masks_checks_the_lengths(q_len):
    """Before: q_len=0 raised a raw IndexError from the packing; 64.0 and True were kept as the layout's length."""
    with pytest.raises(ValueError, match=f"q_len={q_len!r} is invalid: expected a positive int"):
        BlockLayout.from_block_masks(torch.ones(4, 4, dtype=torch.bool), q_len=q_len, kv_len=N, block_q=BLOCK,
                                     block_k=BLOCK)


@pytest.mark.parametrize("heads", [(5, 9), (1, 1), (-1, 2)], ids=["past-the-end", "empty", "negative"])
def test_select_refuses_heads_outside_the_layout(heads):
    """Before: a 2-head layout's ``select(heads=(5, 9))`` returned a layout of 0 heads (its repr raised
    ZeroDivisionError, a call failed late) and (-1, 2) silently took head 1 alone."""
    layout = BlockLayout.from_dense_mask(torch.rand(2, N, N, generator=torch.Generator().manual_seed(0)) < 0.5,
                                         BLOCK, BLOCK)
    assert layout.select(heads=(1, 2)).num_heads == 1
    with pytest.raises(ValueError, match=r"heads=.* must be \(start, stop\) with 0 <= start < stop <= 2"):
        layout.select(heads=heads)


# ------------------------------------------------------------ meta tensors (shape inference)
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "flex"])
def test_block_sparse_attention_on_meta_tensors_gives_shapes(backend):
    """Before: "Cannot copy out of meta tensor" (auto, torch), flex's nonzero error, BackendUnavailable (triton)."""
    layout, _ = _two_keys_per_row()
    q, k, v = (x.to("meta") for x in _qkv())
    q.requires_grad_()
    o, lse = block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    assert o.device.type == lse.device.type == "meta" and o.shape == q.shape and lse.shape == q.shape[:-1]
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    (o.sum() + lse.sum()).backward()  # (a shape-only backward reaches q)
    assert q.grad.shape == q.shape
    half = block_sparse_attention(*(x.detach().half() for x in (q, k, v)), layout, backend=backend)
    assert half.dtype == torch.float16 and half.device.type == "meta"


def test_a_meta_call_still_checks_the_backend_name():
    """The meta paths return before a backend is resolved; a misspelt name must still be refused there."""
    layout, _ = _two_keys_per_row()
    q, k, v = (x.to("meta") for x in _qkv(n=84))
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q[:, :, :N], k[:, :, :N], v[:, :, :N], layout, backend="tritn")
    with pytest.raises(ValueError, match="backend must be one of"):
        vsa_attention(q, k, v, (3, 4, 7), topk=3, tile=(2, 2, 4), backend="tritn")


def test_a_meta_layout_with_real_tensors_is_refused():
    """Before: torch's "Cannot copy out of meta tensor; no data!" from the layout's move to q's device."""
    layout, _ = _two_keys_per_row()
    with pytest.raises(ValueError, match="layout is on the meta device"):
        block_sparse_attention(*_qkv(), layout.to("meta"))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_vsa_attention_on_meta_tensors_gives_shapes(backend):
    """Before: "Cannot copy out of meta tensor" (auto; the fine branch's block-sparse call), "Tensor.item() cannot
    be called on meta tensors" (triton; its launch tables)."""
    grid, tile = (3, 4, 7), (2, 2, 4)  # 8 cubes of 16 tokens, partial ones at the edge
    q, k, v, gate = (x.to("meta") for x in _qkv(b=2, n=84) + [torch.ones(2, 2, 84, D)])
    out, selection = vsa_attention(q, k, v, grid, topk=3, tile=tile, gate=gate, backend=backend,
                                   return_selection=True)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype
    assert selection.shape == (2, 2, 8, 3) and selection.dtype == torch.int64


def test_dense_attention_on_meta_tensors_gives_shapes():
    """Before: VariantFailed, "kernel variant dense.triton.fwd failed its self-check on cpu": the self-check has
    no verdict for meta, so the kernel was called broken."""
    q, k, v = (x.to("meta") for x in _qkv())
    o, lse = dense_attention(q, k, v, return_lse=True)
    assert o.shape == q.shape and lse.shape == q.shape[:-1] and o.device.type == "meta"


# ------------------------------------------------------------ SLA
@pytest.mark.parametrize("kw, match", [
    (dict(topk=-1.0), r"topk=-1.0 is invalid: must be a number in \(0, 1\]"),  # ran one block per row
    (dict(topk=2.0), r"topk=2.0 is invalid"),  # ran every block
    (dict(topk=float("nan")), r"topk=nan is invalid"),  # "cannot convert float NaN to integer"
    (dict(topk=0.5, negligible=-0.5), r"negligible=-0.5 is invalid: must be a number in \[0, 0.5\]"),  # narrow()
    (dict(topk=0.5, linear_tokens="al"), "linear_tokens='al' is invalid: must be one of 'marginal', 'all'"),  # ran
    (dict(topk=0.5, rounding="round"), "rounding='round' is invalid"),  # ran as ceil
    (dict(topk=0.5, linear_eps=-1.0), r"linear_eps=-1.0 is invalid"),  # ran
    (dict(topk=0.5, feature_map="gelu"), "feature_map='gelu' is invalid"),  # KeyError: 'gelu' on triton
    (dict(topk=0.5, block_q=0), "block_q=0 is invalid: expected a positive int"),  # ZeroDivisionError
    (dict(topk=0.5, block_q=64.0), "block_q=64.0 is invalid"),  # TypeError: slice indices must be integers
], ids=["topk-negative", "topk-2", "topk-nan", "negligible-negative", "linear-tokens-typo", "rounding-typo",
        "eps-negative", "feature-map-unknown", "block-0", "block-float"])
def test_sla_params_are_checked_like_the_sla_config(kw, match):
    with pytest.raises(ValueError, match=f"SLAParams.{match}"):
        SLAParams(**kw)


def test_sla_params_take_numpy_numbers_as_plain_ones():
    """Before: topk=np.float32(0.5) raised "slice indices must be integers" inside the twin."""
    q, k, v = _qkv(n=130)
    params = SLAParams(topk=np.float32(0.5), block_q=np.int64(64))
    assert type(params.topk) is float and type(params.block_q) is int
    torch.testing.assert_close(sla_attention(q, k, v, params, backend="torch"),
                               sla_attention(q, k, v, SLAParams(topk=0.5), backend="torch"))


def test_sla_triton_with_a_query_block_it_cannot_take_says_so():
    """Before: backend="triton" with SLAParams(block_q=32) raised VariantFailed, "sla.triton.classify failed its
    self-check", for a block size the kernel never takes (the twin runs it)."""
    q, k, v = _qkv(n=130)
    with pytest.raises(BackendUnavailable, match="query blocks that are multiples of 64.*block_q=32"):
        sla_attention(q, k, v, SLAParams(topk=0.5, block_q=32), backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("proj", [lambda x: x.sum(-1, keepdim=True), lambda x: x.mean()], ids=["to-1", "to-scalar"])
def test_sla_refuses_a_projection_that_does_not_keep_the_head_dim(proj, backend):
    """Before: a projection to (..., 1) or to a scalar broadcast into ``o_sparse + proj(o_linear)``: a wrong output
    of the right shape, without an error."""
    q, k, v = _qkv(n=130)
    with pytest.raises(ValueError, match=r"proj must map the linear branch \(\.\.\., D\) to \(\.\.\., D\)"):
        sla_attention(q, k, v, SLAParams(topk=0.25), proj, backend=backend)


@pytest.mark.parametrize("n", [np.int64(100), True], ids=["numpy", "bool"])
def test_sla_density_reads_its_token_count_like_the_rest(n):
    """Before: a numpy int was refused as "not a positive int" and True passed as one token."""
    if n is True:
        with pytest.raises(ValueError, match="n_tokens must be a positive int"):
            sla_density(n, SLAParams(topk=0.5))
    else:
        assert sla_density(n, SLAParams(topk=0.5)) == 1 / 2


# ------------------------------------------------------------ VSA
def test_vsa_takes_a_numpy_sparsity():
    """Before: sparsity=np.float32(0.5) was refused as "expected a number in [0, 1)" (topk took numpy ints)."""
    q, k, v = _qkv(n=84)
    grid, tile = (3, 4, 7), (2, 2, 4)
    torch.testing.assert_close(vsa_attention(q, k, v, grid, sparsity=np.float32(0.5), tile=tile, backend="torch"),
                               vsa_attention(q, k, v, grid, sparsity=0.5, tile=tile, backend="torch"))
