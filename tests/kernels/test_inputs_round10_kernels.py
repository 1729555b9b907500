"""Kernel entry points' inputs, round 10: each test pins one fault found by calling ``block_sparse_attention``,
``dense_attention_reference``, ``BlockLayout.from_block_masks``, ``vsa_attention``, ``sla_classify`` and
``shipped_kernel_configs`` directly with odd but plausible
values (a raw error from inside torch, a silent wrong shape or acceptance, or a misleading error, before the fix).
Numbers are checked against an fp64 brute force written here, at sizes that are not whole blocks, in fp32."""

import re

import pytest
import torch

from dit_accel.kernels import (BlockLayout, SLAParams, block_sparse_attention, dense_attention_reference,
                               shipped_kernel_configs, sla_attention, sla_classify)
from dit_accel.kernels.backends import BackendUnavailable
from dit_accel.kernels.dense import dense_attention
from dit_accel.kernels.vsa import vsa_attention
from dit_accel.patterns import tile_layout, tile_mask

N, M, D, BLOCK = 40, 56, 20, 16  # ragged last blocks each way, a head dim that is no power of two


def _qkv(b=1, h=2, n=N, m=M, d=D):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, length, d, generator=g) for length in (n, m, m)]


def _brute(q, k, v, mask, scale=None):
    """softmax(q k^T * scale) v over the token mask ([N, M] or [H, N, M]) in fp64; rows seeing no key give 0."""
    q, k, v = (x.double() for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def _mask(h=2, n=N, m=M):
    mask = torch.rand(h, n, m, generator=torch.Generator().manual_seed(1)) < 0.4
    mask[:, :3] = False  # rows that see no key
    return mask


# ------------------------------------------------------------ flex on CPU under torch.no_grad
def test_flex_under_no_grad_runs_inputs_that_require_grad():
    """Before: ``block_sparse_attention(q.requires_grad_(), k, v, layout, backend="flex")`` under ``torch.no_grad()``
    (an eval loop over a trained model's tensors) raised FlexAttention's NotImplementedError "FlexAttention does not
    support backward on CPU", though nothing records a backward there; torch and triton ran."""
    q, k, v = _qkv()
    mask = _mask()
    layout = BlockLayout.from_dense_mask(mask, BLOCK, BLOCK)
    q = q.requires_grad_()
    with torch.no_grad():
        o = block_sparse_attention(q, k, v, layout, backend="flex")
    assert not o.requires_grad
    torch.testing.assert_close(o, _brute(q.detach(), k, v, mask).float())
    with pytest.raises(BackendUnavailable, match="no backward on CPU"):  # (recording: still said, one line)
        block_sparse_attention(q, k, v, layout, backend="flex")


# ------------------------------------------------------------ the checked answer of a call is kept per type
@pytest.mark.parametrize("kw, first, match", [
    ("scale", 1, "scale must be a positive finite number"),
    ("return_lse", True, "return_lse=1 is invalid: expected True or False"),
], ids=["scale-True-after-1", "return_lse-1-after-True"])
def test_a_bool_scale_or_int_flag_is_refused_after_a_valid_call(kw, first, match):
    """Before: ``scale=True`` was refused on a fresh layout but ran as scale 1 once a call with ``scale=1`` had
    run on that layout (the per-layout cache keyed on the value, and ``True == 1``); ``return_lse=1`` likewise
    after ``return_lse=True``."""
    q, k, v = _qkv()
    layout = BlockLayout.from_dense_mask(_mask(), BLOCK, BLOCK)
    block_sparse_attention(q, k, v, layout, backend="torch", **{kw: first})
    bad = {"scale": True, "return_lse": 1}[kw]
    with pytest.raises((ValueError, TypeError), match=match):
        block_sparse_attention(q, k, v, layout, backend="torch", **{kw: bad})


# ------------------------------------------------------------ the public dense oracle
@pytest.mark.parametrize("k_shape", [(2, 2, M, D), (1, 1, M, D), (1, 3, M, D)],
                         ids=["k-of-another-batch", "one-kv-head", "three-kv-heads"])
def test_dense_reference_refuses_k_v_of_another_batch_or_head_count(k_shape):
    """Before: ``dense_attention_reference`` let matmul broadcast: q of batch 1 with k/v of batch 2 returned an
    output of batch 2 (not q's shape), one k/v head was shared by every q head without a word, and 3 k/v heads
    against q's 2 raised torch's "The size of tensor a (2) must match"; its own message claimed the check."""
    q = _qkv(h=2)[0]
    k = torch.randn(k_shape)
    with pytest.raises(ValueError, match=r"k and v must be \(B, H, M, D\) matching q \(1, 2, 40, 20\)"):
        dense_attention_reference(q, k, k.clone())


def test_dense_reference_still_matches_the_brute_force():
    q, k, v = _qkv(b=2)
    mask = _mask()
    o, lse = dense_attention_reference(q, k, v, mask)
    torch.testing.assert_close(o, _brute(q, k, v, mask).float())
    assert torch.isneginf(lse[:, :, :3]).all()


def test_dense_reference_names_an_argument_that_is_no_tensor():
    """Before: AttributeError "'list' object has no attribute 'dim'"."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor; got list"):
        dense_attention_reference(q, k.tolist(), v)


# ------------------------------------------------------------ BlockLayout.from_block_masks
def _from_blocks(**kw):
    args = dict(visited=torch.ones(3, 4, dtype=torch.bool), q_len=N, kv_len=M, block_q=BLOCK, block_k=BLOCK)
    args.update(kw)
    return BlockLayout.from_block_masks(args.pop("visited"), **args)


@pytest.mark.parametrize("kw, exc, match", [
    # torch's "The expanded size of the tensor (4) must match the existing size (2)"
    ({"mask_ids": torch.zeros(2, 2, dtype=torch.int32), "mask_table": torch.ones(1, 16, 16, dtype=torch.bool)},
     ValueError, r"mask_ids has shape \(2, 2\); expected the visit matrix's \(3, 4\)"),
    # built; a call then said "build layouts with BlockLayout.from_block_masks", the function the user had called
    ({"mask_ids": torch.zeros(3, 4, dtype=torch.int32), "mask_table": torch.ones(16, 16, dtype=torch.bool)},
     ValueError, r"mask_table has shape \(16, 16\); expected \[P, block_q, block_k\] = \[P, 16, 16\]"),
    ({"mask_ids": torch.zeros(3, 4, dtype=torch.int32), "mask_table": torch.ones(1, 8, 8, dtype=torch.bool)},
     ValueError, r"mask_table has shape \(1, 8, 8\)"),
    # float ids were truncated to ints (0.7 -> mask 0), silently
    ({"mask_ids": torch.full((3, 4), 0.7), "mask_table": torch.ones(1, 16, 16, dtype=torch.bool)},
     TypeError, "mask_ids must be an integer tensor"),
    # a float visit matrix (scores) was read as "nonzero": every block visited, silently
    ({"visited": torch.rand(3, 4)}, TypeError, "visited must be a bool tensor .* got torch.float32"),
    # a layout of 0 heads, whose repr raised ZeroDivisionError
    ({"visited": torch.ones(0, 3, 4, dtype=torch.bool)}, ValueError, r"visited has 0 heads \(0, 3, 4\)"),
], ids=["mask-ids-of-another-shape", "table-without-its-count-axis", "table-of-another-block-size",
        "float-mask-ids", "float-visit-matrix", "zero-heads"])
def test_from_block_masks_refuses_tensors_it_would_misread(kw, exc, match):
    with pytest.raises(exc, match=match):
        _from_blocks(**kw)


def test_from_block_masks_still_takes_int_visits_and_broadcast_ids():
    """0/1 int visit matrices and one mask-id row per key block (broadcast over query blocks) keep working, and the
    layout computes the pattern they say."""
    table = (torch.rand(1, BLOCK, BLOCK, generator=torch.Generator().manual_seed(2)) < 0.5)
    visited = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.uint8)
    ids = torch.tensor([0, -1, -1, 0], dtype=torch.int64)
    layout = _from_blocks(visited=visited, mask_ids=ids, mask_table=table)
    tiles = torch.where(ids[None, :, None, None] >= 0, table[0], torch.ones(BLOCK, BLOCK, dtype=torch.bool))
    tiles = tiles.expand(3, 4, BLOCK, BLOCK) & visited.bool()[..., None, None]
    mask = tiles.permute(0, 2, 1, 3).reshape(3 * BLOCK, 4 * BLOCK)[:N, :M]
    q, k, v = _qkv()
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout, backend="torch"), _brute(q, k, v, mask).float())


# ------------------------------------------------------------ VSA forced onto the Triton kernels
def test_vsa_forced_triton_with_cubes_it_cannot_take_names_the_tile():
    """Before: ``vsa_attention(..., tile=(2, 2, 2), backend="triton")`` raised "layout.block_q=8 is not one of
    (16, 32, 64, 128, 256) ... rebuild the layout with blocks of 64 or 128": the caller built no layout."""
    grid = (4, 4, 4)
    q, k, v = _qkv(n=64, m=64, d=16)
    with pytest.raises(BackendUnavailable, match=r"tile=\(2, 2, 2\) on grid=\(4, 4, 4\) gives cubes of 8 tokens") \
            as err:
        vsa_attention(q, k, v, grid, sparsity=0.5, tile=(2, 2, 2), backend="triton")
    assert "layout" not in str(err.value) and "backend='torch'" in str(err.value)
    # the same call on the twin: top-2 of 8 cubes per query cube, exact over the selected cubes' tokens
    out, sel = vsa_attention(q, k, v, grid, sparsity=0.75, tile=(2, 2, 2), backend="torch", return_selection=True)
    cube = torch.arange(64).view(4, 4, 4)
    ids = ((cube // 16 // 2) * 4 + (cube // 4 % 4 // 2) * 2 + cube % 4 // 2).flatten()
    chosen = torch.zeros(1, 2, 8, 8, dtype=torch.bool).scatter_(-1, sel, True)
    torch.testing.assert_close(out, _brute(q, k, v, chosen[0][:, ids][:, :, ids]).float())


# ------------------------------------------------------------ sla_classify, exported beside sla_attention
@pytest.mark.parametrize("q_shape, k_shape, match", [
    ((2, 100, 16), (2, 100, 16), r"q must have 4 dims \(B, H, N, D\)"),  # "not enough values to unpack"
    ((1, 2, 100, 16), (1, 2, 100, 8), r"k/v must be \(B, H, M, D\) with q's B=1, H=2, D=16"),  # torch's bmm error
    ((1, 2, 100, 16), (1, 1, 100, 16), r"k/v must be \(B, H, M, D\) with q's B=1, H=2, D=16"),  # ran, broadcast
], ids=["three-dims", "other-head-dim", "one-k-head"])
def test_sla_classify_checks_q_and_k_like_sla_attention(q_shape, k_shape, match):
    """Before: ``sla_classify`` checked nothing: a 3-D q raised "not enough values to unpack", k of another head
    dim torch's "Expected size for first two dimensions of batch2 tensor", and k of one head against q's two ran,
    shared by both heads, where ``sla_attention`` refuses those k."""
    method = SLAParams(topk=0.25, block_q=32, block_k=32)
    with pytest.raises(ValueError, match=match):
        sla_classify(torch.randn(q_shape), torch.randn(k_shape), method)


def test_sla_classify_still_picks_the_brute_force_top_blocks():
    """The checked call's critical blocks: per query block, the top-k key blocks by pooled q . pooled centred k."""
    method = SLAParams(topk=0.25, block_q=32, block_k=32)
    q, k, _ = _qkv(n=70, m=100, d=16)  # ragged last blocks: 3 query blocks, 4 key blocks, 1 critical each
    k = k + torch.linspace(-2, 2, 100)[None, None, :, None]
    qb = torch.stack([q[:, :, i:i + 32].double().mean(2) for i in range(0, 70, 32)], 2)
    kc = (k - k.mean(2, keepdim=True)).double()
    kb = torch.stack([kc[:, :, j:j + 32].mean(2) for j in range(0, 100, 32)], 2)
    want = (qb @ kb.transpose(-1, -2)).argmax(-1, keepdim=True)
    assert torch.equal(sla_classify(q, k, method).critical.long(), want)


# ------------------------------------------------------------ shipped_kernel_configs
@pytest.mark.parametrize("arch", [8.9, (9, 0), 75, True], ids=["float-capability", "capability-tuple", "sm75", "bool"])
def test_shipped_kernel_configs_refuses_an_arch_it_has_no_kernels_for(arch):
    """Before: ``shipped_kernel_configs(8.9)`` (the capability as torch prints it) and 75 listed configurations
    (sm_80's defaults) as if they were that target's; ``(9, 0)`` (``get_device_capability()``) raised "'>=' not
    supported between instances of 'tuple' and 'int'"."""
    match = re.escape(f"arch={arch!r}") + " is invalid: expected an int compute capability of 80"
    with pytest.raises(ValueError, match=match):
        shipped_kernel_configs(arch)
    assert shipped_kernel_configs(89) and shipped_kernel_configs(90, "sla")


# ------------------------------------------------------------ a backend forced by $DIT_ACCEL_BACKEND
@pytest.mark.parametrize("entry", ["block_sparse", "sla", "vsa"])
def test_a_backend_forced_by_the_environment_says_so(entry, monkeypatch):
    """Before: with ``DIT_ACCEL_BACKEND=triton`` set (and no backend argument), a head dim of 300 raised "... head dim
    300 > 256 is not supported by the Triton kernels; use backend='torch'.": an argument the call did not pass, and
    no word of the variable that forced the kernel, which stays set for every later call."""
    monkeypatch.setenv("DIT_ACCEL_BACKEND", "triton")
    q = torch.randn(1, 2, 27, 300)
    call = {"block_sparse": lambda: block_sparse_attention(q, q, q, BlockLayout.from_dense_mask(
        torch.ones(27, 27, dtype=torch.bool), BLOCK, BLOCK)),
            "sla": lambda: sla_attention(q, q, q, SLAParams(topk=0.5)),
            "vsa": lambda: vsa_attention(q, q, q, (3, 3, 3), topk=1)}[entry]
    with pytest.raises(BackendUnavailable, match=r"head dim 300 > .* forced by the environment, "
                                                 r"DIT_ACCEL_BACKEND='triton': unset it"):
        call()
    monkeypatch.delenv("DIT_ACCEL_BACKEND")
    assert call().shape == q.shape  # (auto: the PyTorch twin)


# ------------------------------------------------------------ dense_attention (the dense Triton kernel)
def test_dense_attention_without_the_interpreter_says_why_not_a_failed_self_check(monkeypatch):
    """Before: on a CPU without ``TRITON_INTERPRET=1``, ``dense_attention`` raised "kernel variant dense.triton.fwd
    failed its self-check on cpu (see dit-accel selftest) ... use backend='auto'": no check had failed (triton
    cannot run there), and ``dense_attention`` has no backend argument."""
    from dit_accel.kernels import backends

    monkeypatch.setattr(backends, "interpreting", lambda: False)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(BackendUnavailable, match="dense_attention cannot run on cpu .*triton needs a CUDA device") \
            as err:
        dense_attention(q, q, q)
    assert "backend=" not in str(err.value) and "scaled_dot_product_attention" in str(err.value)


def test_dense_attention_in_bfloat16_on_the_interpreter_is_refused_with_the_reason():
    """Before: it ran its self-check, whose interpreter bf16 dot is wrong, and raised "failed its self-check ...
    relative error 4.56e+09 ... use backend='auto'" (an argument it lacks)."""
    q = torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="bfloat16 dot is wrong .* cast to float32 on the CPU") as err:
        dense_attention(q, q, q)
    assert "backend=" not in str(err.value)
    q32 = q.float()
    want = _brute(q32, q32, q32, torch.ones(8, 8, dtype=torch.bool)).float()
    torch.testing.assert_close(dense_attention(q32, q32, q32), want)


@pytest.mark.parametrize("rows", [(0.0, 32), (0, 32.0), 32], ids=["float-start", "float-stop", "one-int"])
def test_select_names_rows_that_are_not_two_ints(rows):
    """Before: ``layout.select(rows=(0.0, 32))`` raised "slice indices must be integers or None or have an
    __index__ method" from inside, and ``rows=32`` "cannot unpack non-iterable int object"."""
    layout = BlockLayout.from_dense_mask(_mask(), BLOCK, BLOCK)
    assert torch.equal(layout.select(rows=(16, 40)).to_dense_mask(), _mask()[:, 16:40])
    with pytest.raises(ValueError, match=r"rows=.* must be \(start, stop\), two ints"):
        layout.select(rows=rows)


def test_raster_inputs_with_a_tiled_pattern_layout_are_told_to_permute():
    """Before: q in raster order (105 tokens of a (3, 5, 7) grid) with ``tile_layout``'s layout (144 tiled positions)
    was told "build the layout for these lengths", and a layout built again comes out 144 long again: the fix is
    ``perm.permute(q)``, which the message now says."""
    grid, tile, window = (3, 5, 7), (2, 2, 2), (1, 3, 3)
    perm, layout = tile_layout(grid, tile, window, block_q=BLOCK, block_k=BLOCK)
    q, k, v = _qkv(n=105, m=105)
    with pytest.raises(ValueError, match=r"q_len=144.* but q has N=105 .* pass perm.permute\(q\)"):
        block_sparse_attention(q, k, v, layout, backend="torch")
    out = perm.unpermute(block_sparse_attention(perm.permute(q), perm.permute(k), perm.permute(v), layout))
    torch.testing.assert_close(out, _brute(q, k, v, tile_mask(grid, tile, window)).float())


@pytest.mark.parametrize("x, dim, match", [
    (torch.randn(105, 4), 0.0, r"dim=0.0 is invalid: expected an int"),  # "tuple indices must be integers"
    (torch.randn(105, 4), True, r"dim=True is invalid: expected an int"),  # ran as dim 1 (4 positions: refused)
    ([[0.0]] * 105, 0, "x must be a torch.Tensor; got list"),  # "'list' object has no attribute 'dim'"
], ids=["float-dim", "bool-dim", "list"])
def test_permutation_names_a_dim_or_input_it_cannot_take(x, dim, match):
    perm = tile_layout((3, 5, 7), (2, 2, 2), (1, 1, 1), block_q=BLOCK, block_k=BLOCK)[0]
    tokens = torch.randn(105, 4)
    assert torch.equal(perm.unpermute(perm.permute(tokens, dim=0), dim=0), tokens)
    with pytest.raises(TypeError, match=match):
        perm.permute(x, dim=dim)
